"""Turning raw class maps into explanations (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

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
        raise ValueError(f"got targets of shape {tuple(targets.shape)} for a batch of {b}: give one row of class ids per image")
    if targets.dtype.is_floating_point:
        raise ValueError("class ids must be integers")
    bad = (targets < 0) | (targets >= k)
    if bool(bad.any()):
        raise ValueError(f"class id {targets[bad][0].item()} is out of range: the classifier has {k} classes (0..{k - 1})")
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
