"""L-CAM: a frozen backbone plus the trainable attention mechanism."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import nn

from .attention import AttentionMechanism, check_targets
from .backbones.base import Backbone
from .explain import Explanation, explain_from_features

Method = Literal["fm", "img"]


class LCAM(nn.Module):
    """Backbone (frozen) + :class:`AttentionMechanism` (the only trainable part).

    ``fm_forward`` and ``img_forward`` are the two training forwards of SPEC
    section 1; :meth:`explain` is SPEC section 4 from images in [0, 1].
    """

    def __init__(self, backbone: Backbone | nn.Module, attention: AttentionMechanism | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):  # a classifier object (timm, torchvision, your own): split it
            from .backbones.specs import backbone_from_module

            backbone = backbone_from_module(backbone)
        self.backbone = backbone
        channels = backbone.feature_shape[0]
        self.attention = attention or AttentionMechanism(channels, backbone.num_classes)
        if self.attention.in_channels != channels or self.attention.num_classes != backbone.num_classes:
            raise ValueError(
                f"attention {self.attention.in_channels}->{self.attention.num_classes} does not fit "
                f"{backbone.name} ({channels} channels, {backbone.num_classes} classes)"
            )

    def selected_map(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """a_t = sigmoid(Z[b, t_b]), (B, 1, h, w), from the gathered weight rows only."""
        return torch.sigmoid(self.attention.selected(feats, targets))

    def fm_forward(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L-CAM-Fm: ``head(a_t * F)``; returns (masked logits, a_t). The mask multiplies F's
        patch channels (``Backbone.mask_features``: all of them for CNNs)."""
        m = self.selected_map(feats, targets)
        return self.backbone.head(self.backbone.mask_features(feats, m)), m

    def img_forward(
        self, images: torch.Tensor, targets: torch.Tensor, feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L-CAM-Img: ``head(features(normalize(up(a_t) * x)))`` for x in [0, 1].

        ``feats``: F of the clean images when already known (e.g. from a cache).
        """
        if feats is None:
            feats = self.backbone.features(self.backbone.normalize(images))
        m = self.selected_map(feats, targets)
        up = nnf.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.backbone(up * images), m

    def training_forward(
        self,
        method: Method,
        targets: torch.Tensor,
        feats: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "fm":
            if feats is None:
                feats = self.backbone.features(self.backbone.normalize(images))
            return self.fm_forward(feats, targets)
        if method == "img":
            if images is None:
                raise ValueError("L-CAM-Img needs the images for its second pass")
            return self.img_forward(images, targets, feats)
        raise ValueError(f"unknown method {method!r}: use 'fm' or 'img'")

    @torch.no_grad()
    def explain(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | list[int] | None = None,
        top_k: int | None = None,
        upsample: bool | int = False,
        all_classes: bool = False,
    ) -> Explanation:
        """One forward pass: CAMs for the predicted class (or ``targets`` / ``top_k``);
        ``upsample`` adds maps at the input's size (True) or at ``upsample`` x ``upsample``."""
        feats, logits = self.backbone.extract(images)
        return explain_from_features(
            self.attention, feats, logits, targets, top_k, upsample_size(upsample, images.shape[-2:]), all_classes
        )

    @torch.no_grad()
    def explain_features(
        self,
        feats: torch.Tensor,
        targets: torch.Tensor | list[int] | None = None,
        top_k: int | None = None,
        upsample: bool | int = False,
        logits: torch.Tensor | None = None,
    ) -> Explanation:
        """Explain from cached F (no image); the logits are recomputed with the head if absent.
        ``upsample`` as in :meth:`explain`; True is the backbone's input crop."""
        if logits is None:
            logits = self.backbone.head(feats.to(next(self.attention.parameters()).dtype))
        crop = self.backbone.preprocessing.crop
        return explain_from_features(
            self.attention, feats.to(logits.dtype), logits, targets, top_k, upsample_size(upsample, (crop, crop))
        )


def upsample_size(upsample: bool | int, input_size: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """The one convention of ``upsample``: False none, True the input's size, an int that square size."""
    if upsample is True:
        return (int(input_size[0]), int(input_size[1]))
    if not upsample:
        return None
    return (int(upsample), int(upsample))


__all__ = ["LCAM", "Method", "check_targets", "upsample_size"]
