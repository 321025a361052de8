"""What ``lcam eval`` evaluates: the config, the method rows and the backbone they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from lcam.cam_methods.base import method_class, method_names
from lcam.cam_methods.lcam_method import LCAMMethod

from ..configs import EvalConfig
from ..errors import UserError


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: how to build the method (anywhere: driver, Ray actor)."""

    id: str
    kind: str  # "lcam" or a registered CAM method's name (lcam.cam_methods)
    label: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None  # evaluate on the images of rank < limit only
    attention_state: Mapping[str, Any] | None = None  # lcam: the trained 1x1 convolution
    info: Mapping[str, Any] = field(default_factory=dict)  # for results.json (checkpoint URL, epoch, ...)


def split_checkpoint_arg(arg: str) -> tuple[str | None, str]:
    """``NAME=URL`` or a bare URL (an '=' inside a URL path is not a name)."""
    head, sep, tail = arg.partition("=")
    if sep and head and not any(c in head for c in "/:."):
        return head, tail
    return None, arg


def resolve_backbone(cfg: EvalConfig) -> tuple[Any, list[tuple[str | None, str, dict[str, Any]]]]:
    """The backbone (from ``cfg`` or the first checkpoint) and the loaded checkpoints, all checked against it."""
    from lcam import build_backbone
    from lcam.backbones.base import WeightsUnavailable

    from ..train.checkpoints import check_backbone, checkpoint_file, load_checkpoint

    loaded = []
    for arg in cfg.checkpoints:
        name, url = split_checkpoint_arg(arg)
        url = checkpoint_file(url, cfg.checkpoint_storage_options)  # a run folder: its checkpoint.pt
        loaded.append((name, url, load_checkpoint(url, cfg.checkpoint_storage_options)))
    first = loaded[0][2]["backbone"] if loaded else {}
    name = cfg.backbone or first.get("backbone") or "efficientnet_lite0"
    weights = cfg.weights or (first.get("weights") if first.get("backbone") == name else None) or "default"
    try:
        backbone = build_backbone(name, weights)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    except WeightsUnavailable as exc:
        raise UserError(f"backbone {name}: {exc}") from None
    ident = backbone.describe()
    for _, url, ckpt in loaded:
        check_backbone(ckpt, ident, f"the evaluation backbone ({url} vs --backbone {name} --weights {weights})")
    return backbone, loaded


def method_kwargs(name: str, cfg: EvalConfig) -> dict[str, Any]:
    """Every option of method ``name``: the configured value, else the method's default."""
    cls = method_class(name)
    given = dict(cfg.method_options.get(name, {}))
    unknown = sorted(set(given) - {o.name for o in cls.options})
    if unknown:
        raise UserError(
            f"method {name}: unknown option(s) {', '.join(unknown)}; options: {', '.join(o.name for o in cls.options) or 'none'}"
        )
    out = {}
    for o in cls.options:
        try:
            out[o.name] = o.type(given[o.name]) if o.name in given else o.default
        except (TypeError, ValueError) as exc:
            raise UserError(f"--{o.cli_flag(name)}: {exc}") from None
    return out


COSTLY = ("channels", "masks")  # cost classes of the registry that take minutes per image on a CPU


def methods_for_machine(cfg: EvalConfig, on_cpu: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(methods to run, methods left out): on a CPU the default list's costly methods are
    left out unless ``cfg.costly_on_cpu``; a list the user gave runs as given."""
    from lcam.cam_methods.base import default_methods, method_names

    methods = tuple(cfg.methods)
    if not on_cpu or cfg.costly_on_cpu or methods != default_methods():
        return methods, ()
    left_out = tuple(m for m in methods if m in method_names() and method_class(m).cost in COSTLY)
    return tuple(m for m in methods if m not in left_out), left_out


def method_specs(cfg: EvalConfig, loaded: Sequence[tuple[str | None, str, dict[str, Any]]]) -> list[MethodSpec]:
    """L-CAM rows from the checkpoints, then the registered methods, with their subset limits."""
    specs: list[MethodSpec] = []
    used: set[str] = set()
    for name, url, ckpt in loaded:
        method = str(ckpt.get("method", ""))
        if method not in LCAMMethod.LABELS:
            raise UserError(f"checkpoint {url}: unknown L-CAM method {method!r} (expected fm or img)")
        mid = name or f"lcam-{method}"
        if mid in used:  # two checkpoints of one method: tell them apart by file name
            stem = url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
            mid = f"lcam-{method}:{stem}"
            k = 2
            while mid in used:
                mid, k = f"lcam-{method}:{stem}-{k}", k + 1
        used.add(mid)
        lcam_label = LCAMMethod.LABELS[method]
        label = lcam_label if mid == f"lcam-{method}" else (f"{lcam_label} ({mid})" if name is None else mid)
        info = {
            "checkpoint": url,
            "method": method,
            "epoch": ckpt.get("epoch"),
            "step": ckpt.get("step"),
            "cache_fingerprint": ckpt.get("cache_fingerprint") or None,
            "train_config": ckpt.get("config", {}),
            "coverage": ckpt["coverage"].tolist() if ckpt.get("coverage") is not None else None,
        }  # the report marks untrained rows
        specs.append(MethodSpec(mid, "lcam", label, {}, None, dict(ckpt["attention"]), info))
    for name in cfg.methods:
        if name not in method_names():
            raise UserError(
                lambda flag: (
                    f"{flag('methods')}: unknown method {name!r}; methods: {', '.join(method_names())} (L-CAM rows come from {flag('checkpoints')})"
                )
            )
        if name in used:
            raise UserError(f"method {name!r} is listed twice")
        used.add(name)
        specs.append(MethodSpec(name, name, method_class(name).label, method_kwargs(name, cfg)))
    if not specs:
        raise UserError("nothing to evaluate: give --checkpoint and/or --methods")
    unknown = sorted(set(cfg.method_limits) - used)
    if unknown:
        raise UserError(
            f"--method-limit names {', '.join(unknown)}, which is not evaluated; methods: {', '.join(s.id for s in specs)}"
        )
    out = []
    for s in specs:
        limit = cfg.method_limits.get(s.id)
        if limit is not None and limit < 1:
            raise UserError(f"--method-limit {s.id}={limit}: give at least 1 image")
        out.append(MethodSpec(s.id, s.kind, s.label, s.kwargs, limit, s.attention_state, s.info))
    return out
