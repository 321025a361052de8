"""Turning raw class maps into explanations (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max over the last two dims; a constant map becomes zeros, never NaN."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    out = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return out.view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Bilinear, align_corners=False, for (..., h, w) maps."""
    if isinstance(size, int):
        size = (size, size)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    up = nnf.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return up.view(*lead, *size)


def choose_targets(
    logits: torch.Tensor,
    targets: torch.Tensor | list[int] | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Class ids (B, T): the given ones (B,) or (B, T), else the top-k (default top-1)."""
    b, k = logits.shape
    if targets is not None and top_k is not None:
        raise ValueError("give either targets or top_k, not both")
    if targets is None:
        top_k = 1 if top_k is None else top_k
        if not 1 <= top_k <= k:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of classes ({k})")
        return logits.topk(top_k, dim=1).indices
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.dim() == 1:
        targets = targets[:, None]
    if targets.dim() != 2 or targets.shape[0] != b:
        raise ValueError(
            f"got targets of shape {tuple(targets.shape)} for a batch of {b}: give one row of class ids per image"
        )
    if targets.dtype.is_floating_point:
        raise ValueError("class ids must be integers")
    bad = (targets < 0) | (targets >= k)
    if bool(bad.any()):
        raise ValueError(
            f"class id {targets[bad][0].item()} is out of range: the classifier has {k} classes (0..{k - 1})"
        )
    return targets.long()


@dataclass
class Explanation:
    """Explanations for T classes of each of B images, all from one forward pass.

    ``raw``: Z[b, t] before the sigmoid, (B, T, h, w); ``maps``: min-max normalised
    raw maps; ``upsampled``: maps at the input size when asked; ``all_maps``: the raw
    maps of every class, (B, K, h, w), when asked.
    """

    class_ids: torch.Tensor  # (B, T) long
    probs: torch.Tensor  # (B, T) softmax of the clean logits
    logits: torch.Tensor  # (B, K)
    raw: torch.Tensor
    maps: torch.Tensor
    upsampled: torch.Tensor | None = None
    all_maps: torch.Tensor | None = None
    names: Sequence[str] | None = (
        None  # the classifier's class names, index = class id (set by pipeline.cams.explainer.Explainer)
    )

    @property
    def class_names(self) -> list[list[str]]:
        """The name of every explained class, (B, T) like ``class_ids`` ("class k" where no names are known)."""
        names = self.names or ()
        return [[names[c] if 0 <= c < len(names) else f"class {c}" for c in row] for row in self.class_ids.tolist()]

    def __repr__(self) -> str:
        """One line: sizes and the first images' classes and scores, never the tensors
        themselves (a dataclass repr would print every map: ~18,000 characters an image)."""
        b, t = self.class_ids.shape
        shown = 3
        ids = self.class_ids[:shown].tolist()
        probs = [[round(float(p), 3) for p in row] for row in self.probs[:shown].tolist()]
        more = f", ... {b - shown} more" if b > shown else ""
        parts = [
            f"images={b}",
            f"targets={t}",
            f"classes={self.logits.shape[1]}",
            f"maps={'x'.join(map(str, self.maps.shape[-2:]))}",
            f"class_ids={ids}{more}",
            f"probs={probs}{more}",
        ]
        if self.upsampled is not None:
            parts.append(f"upsampled={'x'.join(map(str, self.upsampled.shape[-2:]))}")
        if self.all_maps is not None:
            parts.append(f"all_maps={tuple(self.all_maps.shape)}")
        return f"Explanation({', '.join(parts)})"

    def overlay(
        self, image: torch.Tensor | np.ndarray, index: int = 0, target: int = 0, cmap: str = "jet", alpha: float = 0.5
    ) -> np.ndarray:
        """The map of image ``index``, class ``target`` (column of ``class_ids``), colour-mapped
        and blended over ``image``: (H, W, 3) uint8 at the image's size.

        ``image``: that image as a (3, H, W) tensor in [0, 1] (what the model was given) or
        an (H, W, 3) uint8 array. The normalised map is upsampled bilinearly to the image
        size (the stored ``upsampled`` maps are used when they have that size already).
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"give one image as (3, H, W) in [0, 1], got {tuple(image.shape)}")
            rgb = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f"give one image as (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
        size = rgb.shape[:2]
        if self.upsampled is not None and tuple(self.upsampled.shape[-2:]) == size:
            cam = self.upsampled[index, target]
        else:
            cam = upsample(self.maps[index, target], size)
        from matplotlib import colormaps  # lazy: plotting is optional for the method itself

        heat = colormaps[cmap](cam.detach().float().cpu().clamp(0, 1).numpy())[..., :3] * 255.0
        blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
        return blended.round().clip(0, 255).astype(np.uint8)

    def show(
        self,
        image: torch.Tensor | np.ndarray,
        index: int = 0,
        target: int = 0,
        ax: Any = None,
        class_names: Any = None,
        **overlay_kwargs: Any,
    ) -> Any:
        """Draw :meth:`overlay` with matplotlib (in a notebook: inline), titled with the class
        and its probability; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(self.overlay(image, index, target, **overlay_kwargs))
        c = int(self.class_ids[index, target])
        name = class_names[c] if class_names is not None else f"class {c}"
        ax.set_title(f"{name}: p = {float(self.probs[index, target]):.3f}")
        ax.axis("off")
        return ax


def explain_from_features(
    attention: torch.nn.Module,
    feats: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor | list[int] | None = None,
    top_k: int | None = None,
    upsample_to: int | tuple[int, int] | None = None,
    all_classes: bool = False,
) -> Explanation:
    """Steps 2-4 of SPEC section 4 given F and the clean logits (from images or a cache)."""
    class_ids = choose_targets(logits, targets, top_k)
    probs = logits.float().softmax(1).gather(1, class_ids)
    if all_classes:
        all_maps = attention(feats)
        raw = all_maps.gather(1, class_ids[:, :, None, None].expand(-1, -1, *all_maps.shape[-2:]))
    else:
        all_maps = None
        raw = attention.selected_many(feats, class_ids)
    raw = raw.float()
    maps = minmax_normalize(raw)
    up = upsample(maps, upsample_to) if upsample_to is not None else None
    return Explanation(class_ids, probs, logits, raw, maps, up, all_maps)


def upsampled_uint8(raw: torch.Tensor, size: int) -> torch.Tensor:
    """Raw maps (..., h, w) -> min-max normalised, bilinear to size x size, round(255 x) as uint8."""
    return (upsample(minmax_normalize(raw.float()), size) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
