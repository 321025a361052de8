"""Splitting any classifier into ``features`` and ``head``, and checking the split.

:func:`split_at_layer` cuts a model's torch.fx graph at one named layer: ``features`` is
every operation the layer's output depends on, ``head`` everything after it, reading only
that output. A split that a skip connection crosses is refused. :func:`verify_split` runs
``model(x)`` and ``head(features(x))`` on one random input and refuses a split that does
not reproduce the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from .base import BackboneSpecError

# Families whose last spatial feature map is one named module (torchvision's class names).
TORCHVISION_LAYERS = {
    "ResNet": "layer4",  # ResNet, ResNeXt, Wide ResNet
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
    "SwinTransformer": "permute",  # after the final norm, back to (B, C, h, w)
    "MaxVit": "blocks",
}


def default_layer(model: nn.Module) -> str | None:
    """The layer that ends the last spatial feature map for known families; None if unknown."""
    name = TORCHVISION_LAYERS.get(type(model).__name__)
    if name is None and isinstance(getattr(model, "features", None), nn.Module):
        name = "features"  # VGG, AlexNet, DenseNet, EfficientNet, MobileNet, ConvNeXt, SqueezeNet
    return name


class _Tracer(fx.Tracer):
    """fx tracer that keeps ``leaf`` (and timm's untraceable layers) as single calls."""

    def __init__(self, leaf: str) -> None:
        leaf_types: tuple[type, ...] = ()
        autowrap: tuple[Callable[..., Any], ...] = ()
        try:  # timm marks the layers and functions fx cannot trace through
            from timm.layers import get_notrace_functions, get_notrace_modules

            leaf_types, autowrap = tuple(get_notrace_modules()), tuple(get_notrace_functions())
        except ImportError:
            pass
        super().__init__(autowrap_functions=autowrap)
        self.leaf, self.leaf_types = leaf, leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.leaf or isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _layer_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in model.named_children()]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def split_at_layer(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """(features, head) of ``model`` cut after the module named ``layer`` (as in ``named_modules``)."""
    if layer not in dict(model.named_modules()):
        raise BackboneSpecError(
            f"{type(model).__name__} has no layer {layer!r}; its top-level layers: {_layer_names(model)} "
            "(nested ones by dotted name, e.g. layer4.2)"
        )
    try:
        graph = _Tracer(layer).trace(model)
    except Exception as exc:  # data-dependent Python control flow and friends
        raise BackboneSpecError(
            f"cannot split {type(model).__name__} at {layer!r}: torch.fx cannot trace it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "return a lcam Backbone from a module.path:factory instead"
        ) from None
    cuts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(cuts) != 1:
        raise BackboneSpecError(
            f"layer {layer!r} of {type(model).__name__} runs {len(cuts)} times in forward; choose a layer that runs once"
        )
    cut = cuts[0]
    before = {cut}
    stack = [cut]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in before:
                before.add(a)
                stack.append(a)

    fg, env = fx.Graph(), {}
    for n in graph.nodes:
        if n in before:
            env[n] = fg.node_copy(n, lambda a: env[a])
    fg.output(env[cut])

    hg = fx.Graph()
    henv = {cut: hg.placeholder("feats")}
    for n in graph.nodes:
        if n in before and n.op != "get_attr" or n.op == "placeholder":
            continue
        if n.op == "output":
            hg.output(fx.node.map_arg(n.args[0], lambda a: henv[a]))
            break
        missing = [a for a in n.all_input_nodes if a not in henv]
        if missing:
            raise BackboneSpecError(
                f"cannot split {type(model).__name__} at {layer!r}: {n.name} after it also reads {missing[0].name}, computed "
                "before it (a skip connection crosses the split); choose a layer every path goes through"
            )
        henv[n] = hg.node_copy(n, lambda a: henv[a])
    return fx.GraphModule(model, fg, "Features"), fx.GraphModule(model, hg, "Head")


class ForwardFeatures(nn.Module):
    """timm's ``forward_features`` as a module; NHWC outputs (Swin & co.) become NCHW."""

    def __init__(self, model: nn.Module, nhwc: bool = False) -> None:
        super().__init__()
        self.model, self.nhwc = model, nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        return f.permute(0, 3, 1, 2) if self.nhwc else f


class ForwardHead(nn.Module):
    """timm's ``forward_head`` as a module (pooling, pre-logits, classifier).

    The model is the one :class:`ForwardFeatures` holds: kept as a plain attribute here so
    its weights are listed (and moved, and hashed) once, under ``features``.
    """

    def __init__(self, model: nn.Module, nhwc: bool = False) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.nhwc = nhwc

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(f.permute(0, 2, 3, 1) if self.nhwc else f)


def verify_split(model: nn.Module, features: nn.Module, head: nn.Module, crop: int, what: str) -> tuple[int, int, int]:
    """Refuse a split where ``head(features(x)) != model(x)`` on a random input; returns F's (C, h, w)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, crop, crop, generator=g)
    with torch.no_grad():
        ref = model(x)
        f = features(x)
        if f.dim() != 4:
            raise BackboneSpecError(
                f"{what}: the features are {tuple(f.shape)}, not a (B, C, h, w) map; "
                "choose the layer with --layer NAME (spec option ,layer=NAME)"
            )
        out = head(f)
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
        raise BackboneSpecError(
            f"{what}: the model returns {type(ref).__name__} {tuple(getattr(ref, 'shape', ()))}, not (B, classes) logits"
        )
    err = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
    if not err <= 1e-4 * max(1.0, ref.abs().max().item()):
        raise BackboneSpecError(
            f"{what}: head(features(x)) does not reproduce the model (max |difference| {err:.3g} on a random input); "
            "choose another layer with --layer NAME (spec option ,layer=NAME)"
        )
    return tuple(int(s) for s in f.shape[1:])
