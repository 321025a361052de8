"""A centred Gaussian: the centre-bias floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CAMMethod, Option, register

if TYPE_CHECKING:
    import torch


@register
class CenteredGaussian(CAMMethod, name="gaussian", label="Centred Gaussian", cost="free", default=True, rank=90):
    """exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2)) at pixel centres, the same for every
    image; sigma = ``sigma`` x the shorter image side."""

    options = (Option("sigma", float, 0.25, "centred Gaussian sigma, x the shorter image side", flag="gaussian-sigma"),)

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        import torch

        b, _, hh, ww = images.shape
        sd = self.sigma * min(hh, ww)
        y = torch.arange(hh, device=images.device, dtype=torch.float32) + 0.5 - hh / 2
        x = torch.arange(ww, device=images.device, dtype=torch.float32) + 0.5 - ww / 2
        g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sd**2))
        return g.expand(b, hh, ww).clone()
