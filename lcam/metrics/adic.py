"""Average Drop and Increase in Confidence (SPEC section 5), batched on the device.

Per image i with clean image x_i in [0, 1] and class c_i (predicted unless given):

    Y_i = softmax(model(x_i))[c_i]
    m_i = keep_top(up(minmax(cam_i)), r)           # soft values, exactly ceil(r*H*W) kept
    O_i = softmax(model(x_i * m_i))[c_i]           # pixel-space black masking
    AD  = 100/N * sum_i max(0, Y_i - O_i) / Y_i    # lower is better
    IC  = 100/N * sum_i [O_i > Y_i]                # higher is better, strict >

Every result carries a :class:`ProtocolInfo` saying exactly this, because other
repositories define AD differently (pytorch-grad-cam's ``DropInConfidence`` is
max(Y - O, 0) without the division by Y; some divide by the number of images whose
score dropped instead of N).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..explain import minmax_normalize, upsample

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.15)

TIE_RULE = (
    "pixels ranked by CAM value descending; equal values ranked by smaller row-major "
    "index first (stable sort); the first ceil(r*H*W) ranks are kept"
)
AD_FORMULA = "AD = 100/N * sum_i max(0, Y_i - O_i) / Y_i"
IC_FORMULA = "IC = 100/N * sum_i [O_i > Y_i]  (strict >)"


# ---------------------------------------------------------------------------- keep_top


def kept_count(ratio: float, num_pixels: int) -> int:
    """ceil(ratio * num_pixels); the product is rounded to 6 decimals first so that float
    error (0.07 * 100 = 7.000000000000001) does not add a pixel."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"keep ratio {ratio} must be in [0, 1]")
    return min(num_pixels, math.ceil(round(ratio * num_pixels, 6)))


def pixel_ranks(cams: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel of (B, H, W) maps per :data:`TIE_RULE` (0 = highest), (B, H, W) long."""
    flat = cams.flatten(1)
    # stable descending sort: equal values keep their row-major order (smaller index first)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view_as(cams)


def keep_mask(cams: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean (B, H, W): exactly ceil(ratio*H*W) pixels per map are True, chosen per :data:`TIE_RULE`."""
    k = kept_count(ratio, cams.shape[-2] * cams.shape[-1])
    return pixel_ranks(cams) < k


def keep_top(cams: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero all but the ceil(ratio*H*W) highest-valued pixels of each (H, W) map.

    ``cams``: (B, H, W) in [0, 1]. Kept pixels keep their soft values (the mask is not
    binarised). Ties: :data:`TIE_RULE` (rank by value descending, then smaller
    row-major index first). Exactly k = ceil(ratio*H*W) pixels are *kept*; a kept
    pixel whose CAM value is 0 stays 0, so the number of non-zero pixels is
    min(k, number of non-zero pixels), i.e. "exactly k non-zero" holds whenever the
    map has at least k non-zero pixels. ratio 1.0 returns the maps unchanged.
    """
    if kept_count(ratio, cams.shape[-2] * cams.shape[-1]) == cams.shape[-2] * cams.shape[-1]:
        return cams.clone()
    return cams * keep_mask(cams, ratio)


# ---------------------------------------------------------------------------- masking


def prepare_cams(cams: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """SPEC 5 step 2: min-max normalise (B, h, w) maps at their own resolution (a constant
    map becomes zeros), then bilinear (align_corners=False) upsampling to ``size``.
    ``normalize=False`` takes maps already in [0, 1] as they are (oracle checks)."""
    if cams.dim() != 3:
        raise ValueError(f"cams must be (B, h, w), got {tuple(cams.shape)}")
    cams = cams.float()
    if normalize:
        cams = minmax_normalize(cams)
    if tuple(cams.shape[-2:]) != tuple(size):
        cams = upsample(cams, size)
    return cams


def masked_images(
    images: torch.Tensor,
    cams: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    normalize: bool = True,
) -> torch.Tensor:
    """``x * keep_top(up(minmax(cam)), r)`` for every ratio: (R, B, 3, H, W).

    ``images``: (B, 3, H, W) in [0, 1]; ``cams``: (B, h, w) at the map's own resolution.
    Masking is in pixel space before the model's normalisation, so removed pixels are
    black. The pixel ranking is computed once and shared by all ratios.
    """
    b, _, hh, ww = images.shape
    if cams.shape[0] != b:
        raise ValueError(f"{cams.shape[0]} maps for {b} images")
    maps = prepare_cams(cams.to(images.device), (hh, ww), normalize).to(images.dtype)
    ranks = pixel_ranks(maps)
    ks = torch.tensor([kept_count(r, hh * ww) for r in ratios], device=images.device)
    kept = maps[None] * (ranks[None] < ks[:, None, None, None])  # (R, B, H, W)
    return images[None] * kept[:, :, None]


# ---------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class ProtocolInfo:
    """What an AD/IC number means; recorded with every result (SPEC section 5)."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    target: str = "predicted"  # "predicted": argmax of clean logits; "given": caller's class ids
    num_images: int = 0
    masking: str = "pixel space [0, 1]: x * cam before the model's normalisation (removed pixels black)"
    score: str = "softmax probability of the target class"
    cam_preprocessing: str = (
        "min-max per map at its own resolution (constant map -> zeros), bilinear "
        "align_corners=False upsampling to the input size, keep_top per ratio (soft values kept)"
    )
    kept_pixels: str = "ceil(r * H * W) per map"
    tie_rule: str = TIE_RULE
    ad_formula: str = AD_FORMULA
    ic_formula: str = IC_FORMULA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        return d


@dataclass
class ConfidenceScores:
    """Y (B,) clean scores, O (R, B) masked scores, class ids (B,) for one batch."""

    Y: torch.Tensor
    O: torch.Tensor
    class_ids: torch.Tensor
    protocol: ProtocolInfo

    def average_drop(self) -> torch.Tensor:
        return average_drop(self.Y, self.O)

    def increase_in_confidence(self) -> torch.Tensor:
        return increase_in_confidence(self.Y, self.O)


@torch.no_grad()
def confidence_scores(
    model: nn.Module,
    images: torch.Tensor,
    cams: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    class_ids: torch.Tensor | Sequence[int] | None = None,
    batch_size: int | None = None,
    normalize: bool = True,
    clean_probs: torch.Tensor | None = None,
) -> ConfidenceScores:
    """Y and O of SPEC section 5 for one batch, all ratios in one batched forward.

    ``model`` maps pixel-space images (B, 3, H, W) in [0, 1] to logits (a
    :class:`~lcam.backbones.registry.Backbone`). The clean images and the R masked batches are
    concatenated and run together (chunked by ``batch_size`` when set), so Y and O come
    from the same forward. A masked image bitwise equal to its clean image (an all-ones
    map at r = 1) is not forwarded again: its O is Y, so that float noise from a
    different batch position (oneDNN blocks over the batch) cannot decide the strict >
    of IC.

    ``clean_probs`` (B, K): softmax of the clean images' logits when already computed
    (one clean forward shared by every method evaluated on the batch); then only the
    masked images are forwarded and every method sees the same Y and predicted class.
    """
    ratios = tuple(float(r) for r in ratios)
    b = images.shape[0]
    if clean_probs is not None and clean_probs.shape[0] != b:
        raise ValueError(f"clean_probs has {clean_probs.shape[0]} rows for {b} images")
    masked = masked_images(images, cams, ratios, normalize)  # (R, B, 3, H, W)
    same = (masked == images[None]).flatten(2).all(-1)  # (R, B)
    inputs = masked[~same] if clean_probs is not None else torch.cat([images, masked[~same]])
    chunks = [inputs] if batch_size is None else inputs.split(batch_size)
    outs = [model(c).float().softmax(1) for c in chunks if len(c)]
    if clean_probs is not None:
        clean = clean_probs.float().to(images.device)
        probs = torch.cat([clean, *outs])
    else:
        probs = torch.cat(outs)
        clean = probs[:b]
    if class_ids is None:
        target = "predicted"
        ids = clean.argmax(1)
    else:
        target = "given"
        ids = torch.as_tensor(class_ids, device=probs.device).long().view(-1)
        if ids.shape[0] != b:
            raise ValueError(f"{ids.shape[0]} class ids for {b} images")
    y = clean.gather(1, ids[:, None])[:, 0]
    o = y.expand(len(ratios), b).clone()
    rows = ids.expand(len(ratios), b)[~same]
    o[~same] = probs[b:].gather(1, rows[:, None])[:, 0]
    return ConfidenceScores(y, o, ids, ProtocolInfo(ratios=ratios, target=target, num_images=b))


# ---------------------------------------------------------------------------- AD / IC


def per_image_drop(Y: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """max(0, Y - O) / Y elementwise; Y == 0 (softmax underflow) counts as no drop."""
    Y = Y.double()
    drop = (Y - O.double()).clamp_min(0)
    return torch.where(Y > 0, drop / Y.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(drop))


def average_drop(Y: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """``AD = 100/N * sum_i max(0, Y_i - O_i) / Y_i`` over the last dim; Y (N,), O (N,) or (R, N) -> () or (R,)."""
    return 100.0 * per_image_drop(Y, O).mean(-1)


def increase_in_confidence(Y: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """``IC = 100/N * sum_i [O_i > Y_i]`` (strict: equality counts 0); shapes as :func:`average_drop`."""
    return 100.0 * (O.double() > Y.double()).double().mean(-1)


@dataclass
class ADICResult:
    """Final AD/IC per ratio, per-image scores and the protocol."""

    ratios: tuple[float, ...]
    average_drop: list[float]
    increase_in_confidence: list[float]
    protocol: ProtocolInfo
    Y: torch.Tensor  # (N,)
    O: torch.Tensor  # (R, N)
    class_ids: torch.Tensor  # (N,)

    def per_image_drop(self) -> torch.Tensor:
        """(R, N): max(0, Y_i - O_i) / Y_i, whose mean x 100 is AD."""
        return per_image_drop(self.Y, self.O)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-image tensors); every number sits next to its formula."""
        return {
            "per_ratio": {
                f"{r:g}": {"AD": ad, "IC": ic}
                for r, ad, ic in zip(self.ratios, self.average_drop, self.increase_in_confidence)
            },
            "protocol": self.protocol.to_dict(),
        }


class ADICAccumulator:
    """Sums AD/IC over batches: ``update(scores)`` per batch, ``result()`` at the end.

    Sums are kept in float64 so the final numbers do not depend on the batching.
    All batches must share ratios and target mode (predicted vs given).
    ``keep_per_image=False`` drops the per-image Y/O/class ids (constant memory).
    """

    def __init__(self, keep_per_image: bool = True) -> None:
        self.keep_per_image = keep_per_image
        self._drop_sum: torch.Tensor | None = None
        self._inc_sum: torch.Tensor | None = None
        self._n = 0
        self._protocol: ProtocolInfo | None = None
        self._Y: list[torch.Tensor] = []
        self._O: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []

    def update(self, scores: ConfidenceScores) -> None:
        p = scores.protocol
        if self._protocol is not None and (p.ratios, p.target) != (self._protocol.ratios, self._protocol.target):
            raise ValueError(
                f"batch protocol {p.ratios}/{p.target} differs from {self._protocol.ratios}/{self._protocol.target}"
            )
        self._protocol = p
        drop = per_image_drop(scores.Y, scores.O).sum(-1).cpu()
        inc = (scores.O.double() > scores.Y.double()).double().sum(-1).cpu()
        self._drop_sum = drop if self._drop_sum is None else self._drop_sum + drop
        self._inc_sum = inc if self._inc_sum is None else self._inc_sum + inc
        self._n += scores.Y.shape[0]
        if self.keep_per_image:
            self._Y.append(scores.Y.detach().cpu())
            self._O.append(scores.O.detach().cpu())
            self._ids.append(scores.class_ids.detach().cpu())

    @property
    def num_images(self) -> int:
        return self._n

    def result(self) -> ADICResult:
        if self._n == 0 or self._protocol is None:
            raise ValueError("no batches accumulated")
        protocol = ProtocolInfo(ratios=self._protocol.ratios, target=self._protocol.target, num_images=self._n)
        ad = (100.0 * self._drop_sum / self._n).tolist()
        ic = (100.0 * self._inc_sum / self._n).tolist()

        def cat(xs: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
            return torch.cat(xs, dim) if xs else torch.empty(0)

        return ADICResult(protocol.ratios, ad, ic, protocol, cat(self._Y), cat(self._O, 1), cat(self._ids))


__all__ = [
    "ADICAccumulator",
    "ADICResult",
    "AD_FORMULA",
    "ConfidenceScores",
    "DEFAULT_RATIOS",
    "IC_FORMULA",
    "ProtocolInfo",
    "TIE_RULE",
    "average_drop",
    "confidence_scores",
    "increase_in_confidence",
    "keep_mask",
    "keep_top",
    "kept_count",
    "masked_images",
    "per_image_drop",
    "pixel_ranks",
    "prepare_cams",
]
