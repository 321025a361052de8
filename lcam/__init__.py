"""L-CAM: learned class activation maps for frozen image classifiers (pure PyTorch).

See SPEC.md of the project's shared folder for the method; this package knows
nothing of Ray or file formats.

Every public name is re-exported lazily (PEP 562 module ``__getattr__``): ``import
lcam`` costs nothing, and the registries that need no torch (:mod:`lcam.cam_methods`'s
names, labels and options, read by ``lcam <cmd> --help``) can be imported without it.
``from lcam import LCAM`` imports :mod:`lcam.model` (and torch) at that moment.

For notebook users the dataset-scale pieces are reachable from here too:
``from lcam import Explainer, FeatureCache, CamStore, TrainConfig, train``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionMechanism": "lcam.attention",
    "Backbone": "lcam.backbones.base",
    "Preprocessing": "lcam.backbones.preprocessing",
    "WeightsUnavailable": "lcam.backbones.base",
    "available_backbones": "lcam.backbones.registry",
    "build_backbone": "lcam.backbones.registry",
    "register_backbone": "lcam.backbones.registry",
    "Explanation": "lcam.explain",
    "minmax_normalize": "lcam.explain",
    "upsample": "lcam.explain",
    "LCAMLoss": "lcam.loss",
    "LossTerms": "lcam.loss",
    "LossWeights": "lcam.loss",
    "LCAM": "lcam.model",
    "Recipe": "lcam.recipe",
    "default_recipe": "lcam.recipe",
    "make_optimizer": "lcam.recipe",
    "make_scheduler": "lcam.recipe",
}

# The one exception to "lcam/ does not import pipeline/": these names are re-exported so
# that notebook users find the whole public API in one place. The import happens on first
# attribute access only, so importing lcam still does not import pipeline/ (nor Ray,
# Zarr, fsspec), and lcam/ works without pipeline/ installed next to it.
_FROM_PIPELINE = {
    "Explainer": "pipeline.cams.explainer",
    "CamStore": "pipeline.store.cam_store",
    "FeatureCache": "pipeline.store.feature_cache",
    "TrainConfig": "pipeline.configs",
    "train": "pipeline.train.run",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _FROM_PIPELINE.get(name)
    if module is None:
        raise AttributeError(f"module 'lcam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_FROM_PIPELINE))


__all__ = sorted(_EXPORTS)
