"""Backbone specs: one string that names a classifier in any process.

Grammar: ``SOURCE[,layer=NAME][,size=N]`` where SOURCE is

* a registered name: ``efficientnet_lite0``, ``vgg16``, ``vgg16_7x7``, ``resnet50``, ``resnet18``;
* ``timm:<model>``: any ``timm.create_model`` name, pretrained tag included
  (``timm:resnet50.a1_in1k``, ``timm:convnext_tiny``, ``timm:vit_tiny_patch16_224``);
* ``torchvision:<builder>``: any torchvision classification model (``torchvision:resnet101``);
* ``module.path:factory``: your own code, importable where it runs (``lcam submit`` ships
  the working directory). ``factory(weights)`` (or ``factory(weights=...)`` for ``def f(**kw)``, or ``factory()`` when it takes no
  argument) returns a :class:`~lcam.backbones.registry.Backbone` (used as it is) or a plain
  ``nn.Module`` classifier (split at ``layer=``, or automatically when it is a timm or
  torchvision model; ``weights`` that are a path/URL are loaded into it).

Options: ``layer=NAME`` splits after that module (``named_modules`` name, as
pytorch-grad-cam's target layers); ``size=N`` sets the input crop (the resize keeps the
model's crop percentage; a ViT is built for that size). The canonical spec (options
sorted) is the backbone's ``name``: caches and checkpoints record it, Ray workers rebuild
from it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import (
    Backbone,
    BackboneSpecError,
    Preprocessing,
    WeightsUnavailable,
    is_weights_path,
    load_weights,
    read_state_dict,
)
from .split import ForwardFeatures, ForwardHead, default_layer, split_at_layer, verify_split

OPTIONS = ("layer", "size")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_SPEC = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


@dataclass(frozen=True)
class BackboneSpec:
    source: str  # "registry", "timm", "torchvision" or "module"
    name: str  # registry name, model name, builder, or "module.path:factory"
    options: dict[str, str] = field(default_factory=dict)

    @property
    def layer(self) -> str | None:
        return self.options.get("layer")

    @property
    def size(self) -> int | None:
        return int(self.options["size"]) if "size" in self.options else None

    @property
    def canonical(self) -> str:
        prefix = {"timm": "timm:", "torchvision": "torchvision:"}.get(self.source, "")
        return prefix + self.name + "".join(f",{k}={self.options[k]}" for k in sorted(self.options))


def parse_spec(spec: str, layer: str | None = None) -> BackboneSpec:
    """Parse (and validate the form of) a spec; ``layer`` adds/overrides ``,layer=``."""
    if not isinstance(spec, str) or not spec.strip():
        raise BackboneSpecError(f"backbone spec must be a non-empty string, got {spec!r}")
    head, *opts = [part.strip() for part in spec.strip().split(",")]
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in OPTIONS or not value:
            raise BackboneSpecError(
                f"backbone spec {spec!r}: option {opt!r} must be one of {', '.join(o + '=...' for o in OPTIONS)}"
            )
        options[key] = value
    if layer:
        options["layer"] = layer
    if "size" in options and (not options["size"].isdigit() or int(options["size"]) < 16):
        raise BackboneSpecError(f"backbone spec {spec!r}: size must be a whole number of pixels >= 16")
    for prefix in ("timm", "torchvision"):
        if head.startswith(prefix + ":"):
            name = head[len(prefix) + 1 :]
            if not name:
                raise BackboneSpecError(f"backbone spec {spec!r}: name the model after '{prefix}:'")
            return BackboneSpec(prefix, name, options)
    if ":" in head:
        if not _MODULE_SPEC.match(head):
            raise BackboneSpecError(
                f"backbone spec {spec!r}: expected module.path:factory (importable Python names), "
                "timm:<model> or torchvision:<builder>"
            )
        return BackboneSpec("module", head, options)
    return BackboneSpec("registry", head, options)


def build_from_spec(spec: BackboneSpec, weights: str) -> Backbone:
    """Build a non-registry spec (see :func:`lcam.backbones.registry.build_backbone`, which seeds the RNG)."""
    if spec.source == "timm":
        return _build_timm(spec, weights)
    if spec.source == "torchvision":
        return _build_torchvision(spec, weights)
    return _build_module(spec, weights)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- timm
def timm_preprocessing(model: nn.Module, size: int | None) -> Preprocessing:
    """The preprocessing timm's data config gives ``model`` (its crop, crop_pct, mean/std,
    interpolation), at ``size`` pixels when given (CNNs take any size)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = size or int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bilinear")
    return Preprocessing.from_crop_pct(
        crop,
        float(cfg.get("crop_pct") or 0.875),
        cfg["mean"],
        cfg["std"],
        interp if interp in ("nearest", "bilinear", "bicubic", "lanczos") else "bilinear",
    )


def _create_timm(name: str, pretrained: bool, size: int | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {}
    # transformers (fixed_input_size in timm's metadata) are built for one input size; CNNs take any
    if size and getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False):
        kwargs["img_size"] = size
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _build_timm(spec: BackboneSpec, weights: str) -> Backbone:
    try:
        import timm
    except ImportError:
        raise BackboneSpecError(f"backbone {spec.canonical!r} needs timm: pip install timm") from None
    pretrained = weights == "default"
    if weights not in ("default", "random") and not is_weights_path(weights):
        raise WeightsUnavailable(
            f"weights {weights!r} for {spec.canonical}: use 'default' (timm's pretrained weights of the "
            "tag in the name), a state-dict path or fsspec URL, or 'random'"
        )
    if not timm.is_model(spec.name):
        close = timm.list_models(f"*{spec.name.split('.')[0][:12]}*")[:6]
        raise BackboneSpecError(
            f"timm has no model {spec.name!r}"
            + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()")
        )
    try:
        model = _create_timm(spec.name, pretrained, spec.size)
    except Exception as exc:  # network, missing file, hub errors come in many types
        if not pretrained:
            raise
        raise WeightsUnavailable(
            f"could not fetch timm's pretrained weights for {spec.name} ({_first_line(exc)}). Without internet: pass a local "
            "path or fsspec URL to a state dict (--weights /path/to/model.pth or s3://...), copy the Hugging Face cache "
            "(HF_HOME) from a machine that has it, or use --weights random for tests"
        ) from None
    if is_weights_path(weights):
        model.load_state_dict(read_state_dict(weights))
    model.eval()
    return split_timm(spec, model, timm_preprocessing(model, spec.size), weights)


def _is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "pretrained_cfg")


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer  # ViT, DeiT (distilled too), ...

    return isinstance(model, VisionTransformer)


def split_timm(spec: BackboneSpec, model: nn.Module, prep: Preprocessing, weights: str) -> Backbone:
    """Split an already built timm ``model`` into a checked ``Backbone`` recorded as ``spec``:
    at ``spec.layer`` when named, before a ViT's last block, else forward_features/forward_head."""
    what = f"backbone {spec.canonical}"
    target, reshape, patch_channels = None, None, None
    if spec.layer:
        features, head = split_at_layer(model, spec.layer)
        what += f" split at {spec.layer!r}"
    elif _is_timm_vit(model):
        from .vit import split_timm_vit

        features, head, target, reshape, patch_channels = split_timm_vit(model)
    else:
        nhwc = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        features, head = ForwardFeatures(model, nhwc), ForwardHead(model, nhwc)
    shape = verify_split(model, features, head, prep.crop, what)
    return Backbone(
        spec.canonical,
        features,
        head,
        shape,
        prep,
        num_classes=int(model.num_classes),
        weights=weights,
        target_layer=target,
        reshape_transform=reshape,
        patch_channels=patch_channels,
    )


# --------------------------------------------------------------------------- torchvision
def _build_torchvision(spec: BackboneSpec, weights: str) -> Backbone:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec.name not in names:
        close = [n for n in names if spec.name[:4].lower() in n][:6]
        raise BackboneSpecError(
            f"torchvision has no classification model {spec.name!r}"
            + (f"; similar: {', '.join(close)}" if close else "; see torchvision.models.list_models()")
        )
    enum = torchvision.models.get_model_weights(spec.name)
    model = torchvision.models.get_model(spec.name, weights=None)
    load_weights(model, weights, enum, default_name=enum.DEFAULT.name)
    model.eval()
    named = weights if weights in enum.__members__ else enum.DEFAULT.name
    t = enum[named].transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    prep = Preprocessing.from_crop_pct(spec.size or crop, crop / resize, t.mean, t.std, t.interpolation.value)
    if not spec.size:
        prep = Preprocessing(resize, crop, prep.mean, prep.std, prep.interpolation)  # exactly the weights' numbers
    return _split_module(spec, model, prep, weights, num_classes=len(enum.DEFAULT.meta.get("categories", [])) or None)


def _split_module(
    spec: BackboneSpec, model: nn.Module, prep: Preprocessing, weights: str, num_classes: int | None = None
) -> Backbone:
    layer = spec.layer or default_layer(model)
    if layer is None:
        raise BackboneSpecError(
            f"backbone {spec.canonical}: no known split for {type(model).__name__}; name the layer whose "
            "output is the last feature map with --layer NAME (spec option ,layer=NAME)"
        )
    if type(model).__name__ == "VisionTransformer" and not spec.layer:
        raise BackboneSpecError(
            f"backbone {spec.canonical}: torchvision's ViT is not split automatically; use timm's "
            "(e.g. timm:vit_base_patch16_224), which splits before the last block"
        )
    features, head = split_at_layer(model, layer)
    shape = verify_split(model, features, head, prep.crop, f"backbone {spec.canonical} split at {layer!r}")
    if num_classes is None:
        with_head = head(features(torch.zeros(1, 3, prep.crop, prep.crop)))
        num_classes = int(with_head.shape[1])
    return Backbone(spec.canonical, features, head, shape, prep, num_classes=num_classes, weights=weights)


# --------------------------------------------------------------------------- a model object
def backbone_from_module(model: nn.Module | Backbone, layer: str | None = None, size: int | None = None) -> Backbone:
    """A classifier object from Python (timm, torchvision, your own) split into ``features``
    and ``head`` as a spec's model is (``layer``: a ``named_modules`` name, else the automatic
    split; ``size``: the input crop), checked the same way. Its name records the class only: a
    Ray job or a cache cannot rebuild it from that, so use a spec string (``module.path:factory``)
    for those. The model itself is used (put in eval mode, not copied); a Backbone passes through."""
    if isinstance(model, Backbone):
        return model
    if not isinstance(model, nn.Module):
        raise BackboneSpecError(
            f"expected a backbone spec string or an nn.Module classifier, got {type(model).__name__}"
        )
    options = {k: str(v) for k, v in (("layer", layer), ("size", size)) if v}
    spec = BackboneSpec("module", f"object:{type(model).__module__}.{type(model).__qualname__}", options)
    model.eval()
    if _is_timm_model(model):
        return split_timm(spec, model, timm_preprocessing(model, spec.size), "object")
    prep = Preprocessing.from_crop_pct(spec.size, 0.875) if spec.size else Preprocessing()
    return _split_module(spec, model, prep, "object")


# --------------------------------------------------------------------------- module.path:factory
def _build_module(spec: BackboneSpec, weights: str) -> Backbone:
    module_name, _, attr = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneSpecError(
            f"backbone {spec.canonical}: cannot import {module_name!r} ({_first_line(exc)}); it must be "
            "importable where the job runs (on PYTHONPATH, installed, or in the submitted working directory)"
        ) from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise BackboneSpecError(f"backbone {spec.canonical}: {module_name} has no callable {attr!r}")
    call = factory_call(factory)
    takes_weights = call != "none"
    made = factory(weights) if call == "positional" else factory(weights=weights) if call == "keyword" else factory()
    if isinstance(made, Backbone):
        if spec.options:
            raise BackboneSpecError(
                f"backbone {spec.canonical}: the factory returns a Backbone (already split); layer= and size= "
                "apply only to factories that return a plain nn.Module"
            )
        made.name = spec.canonical  # what caches and checkpoints record: the spec that rebuilds it
        return made
    if not isinstance(made, nn.Module):
        raise BackboneSpecError(
            f"backbone {spec.canonical}: the factory returned {type(made).__name__}, not an nn.Module or lcam Backbone"
        )
    if not takes_weights and weights not in ("default", "random"):
        if not is_weights_path(weights):
            raise WeightsUnavailable(
                f"weights {weights!r}: {spec.canonical} takes a state-dict path/URL, 'default' or 'random'"
            )
        made.load_state_dict(read_state_dict(weights))
    made.eval()
    if _is_timm_model(made):
        return split_timm(spec, made, timm_preprocessing(made, spec.size), weights)
    prep = Preprocessing.from_crop_pct(spec.size, 0.875) if spec.size else Preprocessing()
    return _split_module(spec, made, prep, weights)


def factory_call(factory: Any) -> str:
    """How a ``module.path:factory`` takes the weights: ``positional`` (``def build(weights)``,
    ``*args``), ``keyword`` (``def build(*, weights)``, ``def build(**kw)``) or ``none``
    (``def build()``: a weights path is then loaded into what it returns)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: the documented form
        return "positional"
    kinds = {p.kind for p in params}
    if kinds & {
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    }:
        return "positional"
    if inspect.Parameter.VAR_KEYWORD in kinds or any(p.name == "weights" for p in params):
        return "keyword"
    return "none"
