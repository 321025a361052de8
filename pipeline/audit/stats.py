"""Statistics of class activation maps, one number per map: where does the evidence lie?

Pure numpy (no Ray, no files): the audit job (:mod:`pipeline.audit`) runs these on its
workers, the tests on hand-made maps. Every function takes maps as an array ``(..., h, w)``
of non-negative values (min-max normalised CAMs in [0, 1]) and returns one value per map.

A map whose values are all zero (min-max of a constant map) carries no evidence anywhere;
it is treated as **uniform** by every statistic: area 1, entropy 1, border share = the
band's share of the pixels, centre of mass at the image centre. Coordinates are in units of
the image side: (0, 0) is the top-left corner, (1, 1) the bottom-right, pixel centres at
(i + 0.5) / h.

Why these live in ``pipeline/`` and not ``lcam/``: they describe maps as data (an audit of a
dataset), not the method; ``lcam/`` holds what L-CAM is and how it is evaluated (SPEC).
"""

from __future__ import annotations

import math

import numpy as np

# defined beside AuditConfig, whose defaults they are (the torch-free pipeline.configs)
from ..configs import BORDER_BAND, TOP_FRACTION

STAT_NAMES = ("area", "entropy", "border", "com_y", "com_x", "spread")


def _mass(maps: np.ndarray) -> np.ndarray:
    """Maps as probability distributions over their pixels (flattened); an all-zero map is uniform."""
    m = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    flat = m.reshape(*m.shape[:-2], -1)
    total = flat.sum(-1, keepdims=True)
    uniform = np.full_like(flat, 1.0 / flat.shape[-1])
    return np.where(total > 0, flat / np.where(total > 0, total, 1.0), uniform)


def area_above_half_max(maps: np.ndarray) -> np.ndarray:
    """Fraction of pixels at or above half the map's maximum (1 for an all-zero map)."""
    m = np.asarray(maps, dtype=np.float64)
    flat = m.reshape(*m.shape[:-2], -1)
    peak = flat.max(-1, keepdims=True)
    return np.where(peak[..., 0] > 0, (flat >= 0.5 * peak).mean(-1), 1.0)


def entropy(maps: np.ndarray) -> np.ndarray:
    """Shannon entropy of the map as a distribution over pixels, divided by log(h*w): in [0, 1].

    0: all evidence on one pixel; 1: spread evenly over the image.
    """
    p = _mass(maps)
    n = p.shape[-1]
    if n < 2:
        return np.zeros(p.shape[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h / math.log(n)


def border_mask(h: int, w: int, band: float = BORDER_BAND) -> np.ndarray:
    """(h, w) bool: pixels whose centre lies within ``band`` x side of the nearest edge."""
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    dy = np.minimum(ys, 1.0 - ys)[:, None]
    dx = np.minimum(xs, 1.0 - xs)[None, :]
    return (dy < band) | (dx < band)


def border_share(maps: np.ndarray, band: float = BORDER_BAND) -> np.ndarray:
    """Share of the map's mass in the border band of the image (context, not object)."""
    h, w = np.shape(maps)[-2:]
    return (_mass(maps) * border_mask(h, w, band).reshape(-1)).sum(-1)


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return ys.reshape(-1), xs.reshape(-1)


def centre_of_mass(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the map's centre of mass, in units of the image side."""
    h, w = np.shape(maps)[-2:]
    p = _mass(maps)
    ys, xs = _coords(h, w)
    return (p * ys).sum(-1), (p * xs).sum(-1)


def spread(maps: np.ndarray) -> np.ndarray:
    """Root mean squared distance of the mass from its centre, in units of the image side.

    0 for a single pixel; sqrt(1/6) ~ 0.41 for a uniform map on a fine grid.
    """
    h, w = np.shape(maps)[-2:]
    p = _mass(maps)
    ys, xs = _coords(h, w)
    cy, cx = (p * ys).sum(-1, keepdims=True), (p * xs).sum(-1, keepdims=True)
    return np.sqrt((p * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum(-1))


def map_statistics(maps: np.ndarray, band: float = BORDER_BAND) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STAT_NAMES` for maps ``(..., h, w)``: name -> array ``(...)``."""
    cy, cx = centre_of_mass(maps)
    return {
        "area": area_above_half_max(maps),
        "entropy": entropy(maps),
        "border": border_share(maps, band),
        "com_y": cy,
        "com_x": cx,
        "spread": spread(maps),
    }


def top_region(maps: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """(..., h, w) bool: the ceil(fraction * h * w) highest pixels of each map, less those at 0.

    Ties as in the evaluation: among equal values the smaller row-major index comes first.
    A pixel at 0 holds no evidence, so it is never part of a region (a map with evidence on
    fewer pixels has a smaller region; an all-zero map has none).
    """
    m = np.asarray(maps, dtype=np.float64)
    flat = m.reshape(-1, m.shape[-2] * m.shape[-1])
    k = math.ceil(fraction * flat.shape[-1])
    order = np.argsort(-flat, axis=-1, kind="stable")[:, :k]
    out = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=-1)
    return (out & (flat > 0)).reshape(m.shape)


def top_region_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Intersection over union of the top-``fraction`` regions of two maps of the same shape (0 when both are empty)."""
    ra, rb = top_region(a, fraction), top_region(b, fraction)
    inter = (ra & rb).sum((-2, -1))
    union = (ra | rb).sum((-2, -1))
    return inter / np.maximum(union, 1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank (as Spearman's rho needs)."""
    v = np.asarray(values, dtype=np.float64)
    flat = v.reshape(-1, v.shape[-1])
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        upper = np.cumsum(counts)  # rank of the last member of each tie group
        out[i] = (upper - (counts - 1) / 2.0)[inverse]
    return out.reshape(v.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each pair of maps (..., h, w) over their pixels.

    NaN where a map is constant (its ranks carry no order to correlate).
    """
    ra = average_ranks(np.reshape(a, (*np.shape(a)[:-2], -1)))
    rb = average_ranks(np.reshape(b, (*np.shape(b)[:-2], -1)))
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps (..., h, w) bilinearly to (..., size, size) (align_corners=False, as the CAMs are upsampled)."""
    import torch

    from lcam.explain import upsample

    m = np.asarray(maps, dtype=np.float32)
    if m.shape[-2:] == (size, size):
        return m
    return upsample(torch.from_numpy(np.ascontiguousarray(m)), size).numpy()
