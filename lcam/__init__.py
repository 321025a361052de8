"""L-CAM: learned class activation maps for frozen image classifiers (pure PyTorch).

See SPEC.md of the project's shared folder for the method; this package knows
nothing of Ray or file formats.
"""

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
