"""L-CAM itself as a CAM method (not registered: its rows come from checkpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import CAMMethod

if TYPE_CHECKING:
    import torch


class LCAMMethod(CAMMethod, name="lcam", label="L-CAM", cost="forward"):
    """Raw Z[b, t_b] (before the sigmoid) at feature resolution, from one forward pass.
    Raw Z can be negative: the only map here that is not non-negative; the protocol's
    min-max normalisation makes the offset moot."""

    LABELS: ClassVar[dict[str, str]] = {"fm": "L-CAM-Fm", "img": "L-CAM-Img"}  # by training method

    def __init__(self, lcam_model: torch.nn.Module) -> None:
        super().__init__(lcam_model.backbone)
        self.lcam = lcam_model

    def compute(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self.lcam.explain(images, targets=class_ids).raw[:, 0]

    def from_features(
        self, feats: torch.Tensor, class_ids: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The same maps from F already computed (e.g. by the evaluation's clean forward):
        no backbone pass at all, the arithmetic of :meth:`compute` after its ``extract``."""
        import torch

        from ..attention import check_targets

        ids = check_targets(torch.as_tensor(class_ids).cpu(), feats.shape[0], self.backbone.num_classes)
        return self.lcam.explain_features(feats, targets=ids.to(feats.device), logits=logits).raw[:, 0]
