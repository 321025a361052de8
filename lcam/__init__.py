"""L-CAM: learned class activation maps for frozen image classifiers (pure PyTorch).

See SPEC.md of the project's shared folder for the method; this package knows
nothing of Ray or file formats.

For notebook users the dataset-scale pieces are reachable from here too:
``from lcam import Explainer, FeatureCache, CamStore, TrainConfig, train`` (see
:data:`_FROM_PIPELINE`).
"""

import importlib
from typing import Any

from .attention import AttentionMechanism
from .backbones import (
    Backbone,
    Preprocessing,
    WeightsUnavailable,
    available_backbones,
    build_backbone,
    register_backbone,
)
from .explain import Explanation, minmax_normalize, upsample
from .loss import LCAMLoss, LossTerms, LossWeights
from .model import LCAM
from .recipe import Recipe, default_recipe, make_optimizer, make_scheduler

# The one exception to "lcam/ does not import pipeline/": these names are re-exported
# lazily (PEP 562 module __getattr__), so that notebook users find the whole public API
# in one place, while importing lcam still does not import pipeline/ (nor Ray, Zarr,
# fsspec): the import happens on first attribute access, and only when pipeline/ is
# installed next to lcam/.
_FROM_PIPELINE = {
    "Explainer": "pipeline.cams",
    "CamStore": "pipeline.cams",
    "FeatureCache": "pipeline.cache",
    "TrainConfig": "pipeline.training",
    "train": "pipeline.training",
}


def __getattr__(name: str) -> Any:
    module = _FROM_PIPELINE.get(name)
    if module is None:
        raise AttributeError(f"module 'lcam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_PIPELINE))


__all__ = [
    "AttentionMechanism",
    "Backbone",
    "Explanation",
    "LCAM",
    "LCAMLoss",
    "LossTerms",
    "LossWeights",
    "Preprocessing",
    "Recipe",
    "WeightsUnavailable",
    "available_backbones",
    "build_backbone",
    "default_recipe",
    "make_optimizer",
    "make_scheduler",
    "minmax_normalize",
    "register_backbone",
    "upsample",
]
