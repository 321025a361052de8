"""RISE (Petsiuk et al. 2018)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import CAMMethod, Option, register

if TYPE_CHECKING:
    import torch


def probability(p: float | str) -> float:
    p = float(p)
    if not 0 < p <= 1:
        raise ValueError(f"p={p} must be in (0, 1]")
    return p


@register
class RISE(CAMMethod, name="rise", label="RISE", cost="masks", default=True, rank=30):
    """saliency_c = sum_i P_c(x * M_i) M_i / (N p).

    M_i: a random binary s x s grid (each cell 1 with probability p), upsampled
    bilinearly (align_corners=False) to ((s+1)*ch, (s+1)*cw) with cell size
    (ch, cw) = (ceil(H/s), ceil(W/s)), then cropped to H x W at a random integer
    shift in [0, ch) x [0, cw). P_c is the softmax probability of class c.

    The random draws (grids and shifts) are made once, from a generator seeded with
    ``seed``, and reused for every image; the mask pixels are rebuilt from them chunk
    by chunk (cheap next to the forward), so memory is O(N s^2) rather than O(N H W)
    (8000 masks at 224 x 224 in float32 would take 1.6 GB).

    Cost: N forward passes per image (the papers: N = 4000 for VGG-16, 8000 for
    ResNet-50). ``mask_batch`` masked images go through each forward, taken across the
    images of the batch (B images x mask_batch // B masks), so a GPU stays busy whatever
    the batch, and memory is bounded by ``mask_batch`` alone: raise it on a GPU (e.g.
    512-2048), keep it small on a CPU. Output at input resolution.
    """

    options = (
        Option("num_masks", int, 4000, "RISE masks per image (papers: 4000 VGG-16, 8000 ResNet-50)", flag="rise-masks"),
        Option("grid", int, 7, "RISE grid cells per side", flag="rise-grid"),
        Option("p", probability, 0.5, "RISE probability that a cell is kept", flag="rise-p"),
        Option(
            "mask_batch",
            int,
            32,
            "RISE masked images per forward, across the batch's images: bounds memory (GPU: raise to 512-2048)",
            flag="rise-batch",
        ),
        Option("seed", int, 0, "RISE mask seed", flag="rise-seed"),
    )

    def setup(self) -> None:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        self.grids = (torch.rand(self.num_masks, 1, self.grid, self.grid, generator=g) < self.p).float()
        self.shift_u = torch.rand(self.num_masks, 2, generator=g)  # uniform in [0, 1), scaled by the cell size

    def masks(
        self, size: tuple[int, int], start: int = 0, stop: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Masks ``start:stop`` at ``size`` = (H, W), (n, H, W) in [0, 1], built on ``device``."""
        import torch
        import torch.nn.functional as nnf

        hh, ww = size
        s = self.grid
        ch, cw = math.ceil(hh / s), math.ceil(ww / s)
        grids = self.grids[start:stop].to(device)
        up = nnf.interpolate(grids, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
        u = self.shift_u[start:stop].to(device)
        dy = (u[:, 0] * ch).long()
        dx = (u[:, 1] * cw).long()
        rows = dy[:, None] + torch.arange(hh, device=up.device)  # (n, H)
        cols = dx[:, None] + torch.arange(ww, device=up.device)  # (n, W)
        n = torch.arange(up.shape[0], device=up.device)[:, None, None]
        return up[n, rows[:, :, None], cols[:, None, :]]

    def forwards_per_image(self, channels: int) -> int:
        return self.num_masks

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        import torch

        b, _, hh, ww = images.shape
        sal = torch.zeros(b, hh * ww, dtype=torch.float64, device=images.device)
        # One forward holds at most mask_batch masked images: every image of a group of
        # images times the same chunk of masks (fewer images per group when B > mask_batch).
        group = max(1, min(b, self.mask_batch))
        per_step = max(1, self.mask_batch // group)
        with torch.no_grad():
            for start in range(0, self.num_masks, per_step):
                m = self.masks((hh, ww), start, start + per_step, images.device).to(images.dtype)  # (k, H, W)
                k = m.shape[0]
                flat = m.flatten(1).double()
                for g0 in range(0, b, group):
                    imgs = images[g0 : g0 + group]
                    masked = (imgs[:, None] * m[None, :, None]).flatten(0, 1)  # (g*k, 3, H, W), image-major
                    probs = self.backbone(masked).float().softmax(1).view(imgs.shape[0], k, -1)
                    p = probs.gather(2, class_ids[g0 : g0 + group, None, None].expand(-1, k, 1))[:, :, 0]  # (g, k)
                    sal[g0 : g0 + group] += p.double() @ flat
        return (sal / (self.num_masks * self.p)).float().view(b, hh, ww)
