"""Localisation against bounding boxes: pointing game, energy-based pointing game, box IoU.

Maps and boxes share the model's input grid: ``maps`` (B, H, W) come from
:func:`.adic.prepare_cams` (min-max at their own resolution, bilinear upsampling to the
input size, so values in [0, 1]), and each image's boxes are (k, 4) ``x0, y0, x1, y1`` in
continuous input-pixel coordinates, end exclusive (``pipeline.images.boxes_in_crop`` maps
boxes of the original image there). Pixel (i, j) belongs to a box when its centre
(j + 0.5, i + 0.5) does; an image's mask is the union of its boxes. An image with no box
inside the input (none given, or all cropped away) scores NaN: callers leave it out of N.

* pointing game (Zhang et al. 2016, without their 15-pixel tolerance, as Quantus'
  ``PointingGame``): 1 when the map's maximum lies in the mask. Ties at the maximum (a
  bilinear peak covers 2x2 pixels; an all-zero map ties everywhere) count the share of the
  tied pixels inside the mask, the expected hit of a random tie break.
* energy-based pointing game (Score-CAM, Wang et al. 2020): the share of the map's energy
  (sum of its values) inside the mask, as Quantus' ``RelevanceMassAccuracy``; an all-zero
  map counts as uniform (its share is the mask's area share), as its pointing game does.
* box IoU: the map's top ``fraction`` of pixels (exactly ceil(fraction*H*W), ties per
  :data:`.adic.TIE_RULE`) against the mask, intersection over union.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .adic import keep_mask

TOP_FRACTION = 0.15  # box IoU's share of the map's pixels


def box_masks(boxes: Sequence[np.ndarray | Sequence[Sequence[float]]], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool: per image the union of its boxes ((k, 4) x0 y0 x1 y1, end exclusive)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    out = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for b, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in np.asarray(image_boxes, dtype=np.float64).reshape(-1, 4):
            rows = (ys >= y0) & (ys < y1)
            cols = (xs >= x0) & (xs < x1)
            out[b] |= rows[:, None] & cols[None, :]
    return out


def _check(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if maps.dim() != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and box masks {tuple(masks.shape)} must both be (B, H, W)")


def _no_box(masks: torch.Tensor) -> torch.Tensor:
    return ~masks.flatten(1).any(1)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64: 1 when the map's maximum is inside the mask (ties: the share inside); NaN without a box."""
    _check(maps, masks)
    flat, inside = maps.flatten(1).double(), masks.flatten(1)
    at_max = flat == flat.max(1, keepdim=True).values
    hit = (at_max & inside).sum(1).double() / at_max.sum(1).double()
    return hit.masked_fill(_no_box(masks), float("nan"))


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64: sum of the map inside the mask / sum of the map (maps >= 0); NaN without a box."""
    _check(maps, masks)
    flat, inside = maps.flatten(1).double(), masks.flatten(1)
    if (flat < 0).any():
        raise ValueError("the energy-based pointing game needs non-negative maps (min-max them first)")
    total = flat.sum(1)
    share = (flat * inside).sum(1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    area = inside.double().mean(1)  # an all-zero map: uniform
    return torch.where(total > 0, share, area).masked_fill(_no_box(masks), float("nan"))


def box_iou(maps: torch.Tensor, masks: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(B,) float64: IoU of the map's top ``fraction`` of pixels with the mask; NaN without a box."""
    _check(maps, masks)
    top, inside = keep_mask(maps, fraction).flatten(1), masks.flatten(1)
    inter = (top & inside).sum(1).double()
    union = (top | inside).sum(1).double()
    return (inter / union).masked_fill(_no_box(masks), float("nan"))
