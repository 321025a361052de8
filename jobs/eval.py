"""``lcam eval``: Average Drop / Increase in Confidence of L-CAM checkpoints and the baselines.

The method list, each method's options and the optional metrics come from the registries
(:mod:`lcam.cam_methods`, :mod:`pipeline.evaluation.metrics`): a method or metric added
there gets its flags here without an edit.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from jobs.common import LAYER_HELP, announce, backbone_spec, run_stage
from jobs.options import add_options
from jobs.options import config_from_args as build_config
from pipeline.configs import EvalConfig
from pipeline.options import flag_names


def _cli_type(convert: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An option's converter as an argparse type: its ValueError becomes argparse's message."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def add_registry_options(parser: argparse.ArgumentParser, methods_flag: str | None = "--methods") -> None:
    """One flag per option of every registered CAM method and metric (no torch import:
    the registries are torch-free), and ``--NAME`` per optional metric. ``methods_flag``:
    the method list's flag (None: the command declares its own, as ``lcam pipeline``'s ``--eval-methods``)."""
    from lcam.cam_methods.base import COST_CLASSES, default_methods, method_classes
    from pipeline.evaluation.metrics.base import metric_classes

    classes = method_classes()
    listing = "; ".join(f"{n} ({c.label}, cost: {c.cost})" for n, c in classes.items())
    if methods_flag:
        parser.add_argument(
            methods_flag,
            default=",".join(default_methods()),
            help=f"CAM methods next to the checkpoints, comma-separated, or 'none' (default {','.join(default_methods())}; "
            "on a CPU without --costly-on-cpu the costly ones are left out). "
            f"Available: {listing}. Costs per image: " + "; ".join(f"{k}: {v}" for k, v in COST_CLASSES.items()),
        )
    group = parser.add_argument_group("method options")
    for name, cls in classes.items():
        for o in cls.options:
            group.add_argument(
                f"--{o.cli_flag(name)}",
                type=_cli_type(o.type),
                default=o.default,
                help=f"{o.help} (default {_show(o.default)})",
            )
    metrics = parser.add_argument_group("metrics (AD/IC always)")
    for name, cls in metric_classes().items():
        if not cls.always:
            metrics.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=cls.help)
        for o in cls.options:
            metrics.add_argument(
                f"--{o.cli_flag(name)}",
                type=_cli_type(o.type),
                default=o.default,
                help=f"{o.help} (default {_show(o.default)})",
            )


def registry_config(args: argparse.Namespace) -> dict[str, Any]:
    """EvalConfig's methods, method_options, metrics and metric_options from the flags above
    (``methods`` only when the command has ``--methods``)."""
    from lcam.cam_methods.base import method_classes
    from pipeline.evaluation.metrics.base import metric_classes

    def dest(flag: str) -> str:
        return flag.replace("-", "_")

    text = getattr(args, "methods", None)
    methods = (
        None
        if text is None
        else ()
        if text.strip().lower() in ("", "none")
        else tuple(m.strip() for m in text.split(",") if m.strip())
    )
    method_options = {
        n: {o.name: getattr(args, dest(o.cli_flag(n))) for o in c.options}
        for n, c in method_classes().items()
        if c.options
    }
    metric_cls = metric_classes()
    metrics = tuple(n for n, c in metric_cls.items() if not c.always and getattr(args, dest(n)))
    metric_options = {
        n: {o.name: getattr(args, dest(o.cli_flag(n))) for o in c.options} for n, c in metric_cls.items() if c.options
    }
    out = {"method_options": method_options, "metrics": metrics, "metric_options": metric_options}
    return out if methods is None else {"methods": methods, **out}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalConfig)  # EvalConfig's declarations (pipeline/configs.py); the registries' below
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_registry_options(parser)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return build_config(EvalConfig, args, **registry_config(args), backbone=backbone_spec(args.backbone, args.layer))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # mistakes in the options answer before the stage (torch, Ray) is imported
    if cfg.progress:
        announce(f"lcam eval: {cfg.shards} -> {cfg.out}; loading torch and the backbone ...")
    from pipeline.evaluation.run import evaluate

    summary = run_stage(flag_names(EvalConfig), evaluate, cfg)  # fields spelt otherwise (checkpoints: --checkpoint)
    print(json.dumps(summary.to_dict(), indent=1, default=str) if args.json else "\n".join(summary.lines()))
    return 0


if __name__ == "__main__":  # `lcam submit eval` runs `python -m jobs.eval --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("eval", sys.argv[1:]))
