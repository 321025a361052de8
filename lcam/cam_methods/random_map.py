"""Uniform noise: the chance floor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CAMMethod, Option, register

if TYPE_CHECKING:
    import torch


@register
class RandomMap(CAMMethod, name="random", label="Random map", cost="free", default=True, rank=91):
    """Uniform noise in [0, 1) at ``size`` x ``size`` (default 7 x 7).

    The generator is seeded once at construction: two instances with the same seed give
    the same sequence of maps; successive calls give fresh maps. A dataset evaluation
    reseeds it per batch from the batch's position (:meth:`reseed`), so the maps do not
    depend on which worker ran which batch.
    """

    reseed_per_batch = True
    options = (
        Option("size", int, 7, "random map cells per side", flag="random-size"),
        Option("seed", int, 0, "seed of the random-map floor", flag="random-seed"),
    )

    def setup(self) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.rand(images.shape[0], self.size, self.size, generator=self.generator).to(images.device)
