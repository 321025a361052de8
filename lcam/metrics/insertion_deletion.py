"""Insertion and deletion curves and their areas (Petsiuk et al. 2018, RISE; as torch-cam reports).

Per image x (pixel space [0, 1]), class c and map m, with pixels ranked by the upsampled
min-max map per :data:`~lcam.metrics.adic.TIE_RULE` (highest first):

    k_s      = ceil(s * H * W / S) pixels changed at step s = 0..S
    deletion : x with its k_s highest-ranked pixels set to the deletion baseline
    insertion: the insertion baseline with the k_s highest-ranked pixels of x put back
    P(s)     = softmax(model(image at step s))[c]
    AUC      = (sum_s P(s) - (P(0) + P(S)) / 2) / S     (trapezoid over x = s/S in [0, 1])

Deletion AUC: lower is better (the class should vanish fast); insertion AUC: higher is
better. RISE's baselines: deletion to black, insertion from a blurred copy of the image
(an 11 x 11 Gaussian kernel, sigma 5, zero padding). Cost: 2 (S + 1) forwards per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as nnf

from .adic import TIE_RULE, pixel_ranks, prepare_cams

BASELINES = ("black", "blur")
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def changed_counts(steps: int, num_pixels: int) -> list[int]:
    """k_s = ceil(s * n / S) for s = 0..S (rounded to 6 decimals first, as :func:`kept_count`)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [min(num_pixels, math.ceil(round(s * num_pixels / steps, 6))) for s in range(steps + 1)]


def area_under_curve(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid over S + 1 equally spaced points in [0, 1], along the first dim."""
    s = curve.shape[0] - 1
    if s < 1:
        raise ValueError("a curve needs at least two points")
    c = curve.double()
    return (c.sum(0) - (c[0] + c[-1]) / 2) / s


def blurred(images: torch.Tensor, size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's insertion start: a Gaussian blur (kernel ``size``, normalised to sum 1, zero padding)."""
    r = torch.arange(size, dtype=torch.float64, device=images.device) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g / g.sum()).to(images.dtype)
    c = images.shape[1]
    x = nnf.conv2d(images, g.view(1, 1, 1, size).expand(c, 1, 1, size), padding=(0, size // 2), groups=c)
    return nnf.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), padding=(size // 2, 0), groups=c)


def baseline_image(images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "blur":
        return blurred(images)
    raise ValueError(f"unknown baseline {kind!r}; use one of {', '.join(BASELINES)}")


@dataclass
class InsertionDeletion:
    """Curves (S + 1, B) of the target class's softmax probability, and the protocol."""

    steps: int
    insertion: torch.Tensor
    deletion: torch.Tensor
    insertion_baseline: str = "blur"
    deletion_baseline: str = "black"

    def insertion_auc(self) -> torch.Tensor:
        return area_under_curve(self.insertion)

    def deletion_auc(self) -> torch.Tensor:
        return area_under_curve(self.deletion)

    def protocol(self) -> dict[str, Any]:
        return protocol(self.steps, self.insertion_baseline, self.deletion_baseline)


def protocol(steps: int, insertion_baseline: str = "blur", deletion_baseline: str = "black") -> dict[str, Any]:
    blur = f"Gaussian blur of the image ({BLUR_KERNEL} x {BLUR_KERNEL} kernel, sigma {BLUR_SIGMA:g}, zero padding)"
    describe = {"black": "black (zeros in pixel space)", "blur": blur}
    return {
        "metric": "insertion / deletion AUC (Petsiuk et al. 2018, RISE)",
        "steps": steps,
        "pixels_changed_at_step_s": f"ceil(s * H * W / {steps}), s = 0..{steps}",
        "insertion_baseline": describe[insertion_baseline],
        "deletion_baseline": describe[deletion_baseline],
        "score": "softmax probability of the target class",
        "auc": "trapezoid over s/S in [0, 1]: (sum_s P(s) - (P(0) + P(S)) / 2) / S",
        "order": TIE_RULE,
        "cam_preprocessing": "min-max at own resolution, bilinear align_corners=False upsampling",
        "better": "insertion higher, deletion lower",
        "forwards_per_image": 2 * (steps + 1),
    }


@torch.no_grad()
def insertion_deletion(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    cams: torch.Tensor,
    class_ids: torch.Tensor | Sequence[int],
    steps: int = 16,
    insertion_baseline: str = "blur",
    deletion_baseline: str = "black",
    batch_size: int | None = None,
    normalize: bool = True,
) -> InsertionDeletion:
    """Both curves for a batch: ``images`` (B, 3, H, W) in [0, 1], ``cams`` (B, h, w) at their
    own resolution, one class id per image; ``model`` maps pixel-space images to logits.
    ``batch_size``: images per forward (default: the 2B images of one step together)."""
    b, _, hh, ww = images.shape
    ids = torch.as_tensor(class_ids, device=images.device).long().view(-1)
    if ids.shape[0] != b or cams.shape[0] != b:
        raise ValueError(f"{cams.shape[0]} maps and {ids.shape[0]} class ids for {b} images")
    ranks = pixel_ranks(prepare_cams(cams.to(images.device), (hh, ww), normalize))[:, None]  # (B, 1, H, W)
    gone, start = baseline_image(images, deletion_baseline), baseline_image(images, insertion_baseline)
    ins, dele = [], []
    for k in changed_counts(steps, hh * ww):
        changed = ranks < k
        batch = torch.cat([torch.where(changed, images, start), torch.where(changed, gone, images)])
        chunks = [batch] if batch_size is None else batch.split(batch_size)
        probs = torch.cat([model(c).float().softmax(1) for c in chunks])
        p = probs.gather(1, ids.repeat(2)[:, None])[:, 0]
        ins.append(p[:b])
        dele.append(p[b:])
    return InsertionDeletion(
        steps, torch.stack(ins).cpu(), torch.stack(dele).cpu(), insertion_baseline, deletion_baseline
    )


__all__ = [
    "BASELINES",
    "InsertionDeletion",
    "area_under_curve",
    "baseline_image",
    "blurred",
    "changed_counts",
    "insertion_deletion",
    "protocol",
]
