"""A user's own classifiers, for ``module.path:factory`` specs (``tests.custom_backbones:tiny``).

Importable by Ray workers: they start in the repository root like the tests.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lcam.backbones.base import Backbone, Preprocessing


class TinyNet(nn.Module):
    """A plain classifier with a ``features`` block: split there automatically."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class NoFeatures(nn.Module):
    """No ``features`` attribute and a skip connection around ``body``: needs ``layer=``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.fc((self.body(s) + s).mean((2, 3)))


def tiny() -> nn.Module:
    """No argument: lcam loads a path/URL ``weights`` itself."""
    return TinyNet()


# The processes that built ``counted_tiny`` (each process's copy of this module sees only its
# own builds): a test asserts where a stage built its model.
BUILT_IN: list[int] = []


def counted_tiny() -> nn.Module:
    """:func:`tiny`, recording the building process's pid in :data:`BUILT_IN`."""
    BUILT_IN.append(os.getpid())
    return TinyNet()


def tiny_with_weights(weights: str) -> nn.Module:
    m = TinyNet()
    if weights not in ("default", "random"):
        m.load_state_dict(torch.load(weights, weights_only=True))
    return m


def no_features() -> nn.Module:
    return NoFeatures()


def split_backbone(weights: str) -> Backbone:
    """A factory that returns an lcam Backbone: used as it is (its own split, preprocessing)."""
    m = TinyNet()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier)
    return Backbone(
        "anything", m.features, head, (16, 8, 8), Preprocessing(resize=36, crop=32), num_classes=10, weights=weights
    )


not_callable = 3


# The factory contract (issue 29): factory(weights), factory() and factory(**kwargs) all work.
SEEN_KWARGS: list[dict] = []


def tiny_kwargs(**kwargs) -> nn.Module:
    """``def build(**kw)``: called with ``weights=...`` (recorded), never positionally."""
    SEEN_KWARGS.append(dict(kwargs))
    return TinyNet()


def tiny_keyword_only(*, weights: str = "default") -> nn.Module:
    SEEN_KWARGS.append({"weights": weights})
    return TinyNet()
