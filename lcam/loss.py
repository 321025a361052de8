"""The L-CAM loss (SPEC section 2) on the B selected maps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from torch import nn


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.5
    area: float = 2.0
    area_exponent: float = 0.3
    area_eps: float = 0.0005
    tv: float = 0.01
    tv_border: float = 0.3

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class LossTerms(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor  # unweighted cross-entropy
    area: torch.Tensor  # unweighted mean((m + eps) ** exponent)
    tv: torch.Tensor  # unweighted total variation


def area_term(maps: torch.Tensor, exponent: float = 0.3, eps: float = 0.0005) -> torch.Tensor:
    return ((maps + eps) ** exponent).mean()


def total_variation(maps: torch.Tensor, border: float = 0.3) -> torch.Tensor:
    """Squared differences of neighbours plus a border penalty, over 2B (SPEC section 2)."""
    b = maps.shape[0]
    dh = (maps[..., 1:, :] - maps[..., :-1, :]).pow(2).sum()
    dw = (maps[..., :, 1:] - maps[..., :, :-1]).pow(2).sum()
    edges = (
        maps[..., 0, :].pow(2).sum()
        + maps[..., -1, :].pow(2).sum()
        + maps[..., :, 0].pow(2).sum()
        + maps[..., :, -1].pow(2).sum()
    )
    return (dh + dw + border * edges) / (2 * b)


class LCAMLoss(nn.Module):
    """``ce * CE(logits', t) + area * mean((m + eps)^p) + tv * TV(m)``."""

    def __init__(self, weights: LossWeights = LossWeights()) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, masked_logits: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor) -> LossTerms:
        w = self.weights
        ce = nnf.cross_entropy(masked_logits.float(), targets)
        maps = maps.float()
        area = area_term(maps, w.area_exponent, w.area_eps)
        tv = total_variation(maps, w.tv_border)
        total = w.ce * ce + w.area * area + w.tv * tv
        return LossTerms(total, ce, area, tv)
