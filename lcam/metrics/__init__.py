"""Faithfulness metrics: AD/IC (SPEC section 5, :mod:`.adic`), ROAD (:mod:`.road`) and
insertion/deletion AUC (:mod:`.insertion_deletion`); localisation against bounding boxes
(:mod:`.localisation`: pointing game, energy-based pointing game, box IoU). The
dataset-scale evaluation wraps each as a plug-in (``pipeline/evaluation/metrics``)."""

from .adic import (
    AD_FORMULA,
    DEFAULT_RATIOS,
    IC_FORMULA,
    TIE_RULE,
    ADICAccumulator,
    ADICResult,
    ConfidenceScores,
    ProtocolInfo,
    average_drop,
    confidence_scores,
    increase_in_confidence,
    keep_mask,
    keep_top,
    kept_count,
    masked_images,
    per_image_drop,
    pixel_ranks,
    prepare_cams,
)
from .insertion_deletion import InsertionDeletion, area_under_curve, insertion_deletion
from .localisation import box_iou, box_masks, energy_pointing_game, pointing_game

__all__ = [
    "ADICAccumulator",
    "ADICResult",
    "AD_FORMULA",
    "ConfidenceScores",
    "DEFAULT_RATIOS",
    "IC_FORMULA",
    "InsertionDeletion",
    "ProtocolInfo",
    "TIE_RULE",
    "area_under_curve",
    "average_drop",
    "box_iou",
    "box_masks",
    "confidence_scores",
    "energy_pointing_game",
    "increase_in_confidence",
    "insertion_deletion",
    "keep_mask",
    "keep_top",
    "kept_count",
    "masked_images",
    "per_image_drop",
    "pixel_ranks",
    "pointing_game",
    "prepare_cams",
]
