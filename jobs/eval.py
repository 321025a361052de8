"""``lcam eval``: Average Drop / Increase in Confidence of L-CAM checkpoints and the baselines.

The method list, each method's options and the optional metrics come from the registries
(:mod:`lcam.cam_methods`, :mod:`pipeline.evaluation.metrics`): a method or metric added
there gets its flags here without an edit.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from jobs.common import BACKBONE_HELP, LAYER_HELP, add_storage_options, backbone_spec, parse_storage_options, run_stage


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratios must be comma-separated numbers like 1,0.5,0.15, got {text!r}") from None


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


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every registered CAM method and metric (no torch import:
    the registries are torch-free), and ``--NAME`` per optional metric."""
    from lcam.cam_methods import COST_CLASSES, default_methods, method_classes
    from pipeline.evaluation.metrics import metric_classes

    classes = method_classes()
    listing = "; ".join(f"{n} ({c.label}, cost: {c.cost})" for n, c in classes.items())
    parser.add_argument("--methods", default=",".join(default_methods()),
                        help=f"CAM methods next to the checkpoints, comma-separated, or 'none' (default {','.join(default_methods())}). "
                             f"Available: {listing}. Costs per image: " + "; ".join(f"{k}: {v}" for k, v in COST_CLASSES.items()))
    group = parser.add_argument_group("method options")
    for name, cls in classes.items():
        for o in cls.options:
            group.add_argument(f"--{o.cli_flag(name)}", type=_cli_type(o.type), default=o.default,
                               help=f"{o.help} (default {_show(o.default)})")
    metrics = parser.add_argument_group("metrics (AD/IC always)")
    for name, cls in metric_classes().items():
        if not cls.always:
            metrics.add_argument(f"--{name}", action="store_true", help=cls.help)
        for o in cls.options:
            metrics.add_argument(f"--{o.cli_flag(name)}", type=_cli_type(o.type), default=o.default,
                                 help=f"{o.help} (default {_show(o.default)})")


def registry_config(args: argparse.Namespace) -> dict[str, Any]:
    """EvalConfig's methods, method_options, metrics and metric_options from the flags above."""
    from lcam.cam_methods import method_classes
    from pipeline.evaluation.metrics import metric_classes

    def dest(flag: str) -> str:
        return flag.replace("-", "_")

    methods = () if args.methods.strip().lower() in ("", "none") else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    method_options = {n: {o.name: getattr(args, dest(o.cli_flag(n))) for o in c.options} for n, c in method_classes().items() if c.options}
    metric_cls = metric_classes()
    metrics = tuple(n for n, c in metric_cls.items() if not c.always and getattr(args, dest(n)))
    metric_options = {n: {o.name: getattr(args, dest(o.cli_flag(n))) for o in c.options} for n, c in metric_cls.items() if c.options}
    return {"methods": methods, "method_options": method_options, "metrics": metrics, "metric_options": metric_options}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="evaluation shards: a pattern (val-{000000..000049}.tar, *.tar) or a folder with index.json")
    parser.add_argument("out", help="output folder URL: results.md, results.json, adic.png, per_image.csv")
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", type=str, default=None, metavar="[NAME=]URL",
                        help="an L-CAM checkpoint (repeatable): its method (fm/img) names the row unless NAME= is given")
    parser.add_argument("--backbone", default=None, help="default: the checkpoints' backbone, else efficientnet_lite0; " + BACKBONE_HELP)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--weights", default=None, help="default: the checkpoints' weights, else 'default'")
    parser.add_argument("--ratios", type=_ratios, default=(1.0, 0.5, 0.15), help="keep ratios (default 1,0.5,0.15)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images (the papers: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the method-subset ranking")
    parser.add_argument("--method-limit", dest="method_limits", action="append", type=str, default=None, metavar="METHOD=N",
                        help="evaluate METHOD on N of the images only (repeatable; e.g. scorecam=32 for a costly method)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch and per forward (default 16: fastest on CPU; raise it on a GPU)")
    parser.add_argument("--save-maps", type=int, default=0, metavar="N",
                        help="keep every method's map of the first N images (by rank) in maps.npz, for the report's gallery")
    parser.add_argument("--engine", default="auto", choices=["auto", "local", "ray"],
                        help="local: one process; ray: Ray Data with an actor pool; auto: ray when connected to a cluster")
    parser.add_argument("--actors", type=int, default=None, help="ray: actors (default: one per GPU, else 1)")
    parser.add_argument("--decode-workers", type=int, default=4, help="local: decoding threads")
    parser.add_argument("--torch-threads", type=int, default=None, help="ray CPU actors: torch threads (default: the node's cores)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="local engine's device")
    parser.add_argument("--no-fold-batchnorm", dest="fold_batchnorm", action="store_false",
                        help="run the backbone as built (default: BatchNorm folded into the convolutions, same function, faster)")
    parser.add_argument("--index", default=None, help="shard index URL (default: index.json beside the shards)")
    parser.add_argument("--split-coverage", action="store_true",
                        help="also the table on images whose class row L-CAM trained (coverage > 0) and on the others")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options(parser, "--shard-storage-option", "shard_storage_option", " for the shards")
    add_storage_options(parser, what=" for the output folder")
    add_storage_options(parser, "--checkpoint-storage-option", "checkpoint_storage_option", " for the checkpoints")
    add_registry_options(parser)


def _method_limits(pairs: list[str] | None) -> dict[str, int]:
    from pipeline.errors import UserError

    out: dict[str, int] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise UserError(f"--method-limit {pair!r} must look like METHOD=N, e.g. scorecam=32") from None
        if not sep:
            raise UserError(f"--method-limit {pair!r} must look like METHOD=N, e.g. scorecam=32")
    return out


def config_from_args(args: argparse.Namespace):
    from pipeline.evaluate import EvalConfig

    return EvalConfig(
        shards=args.shards, out=args.out, checkpoints=list(args.checkpoints or []), **registry_config(args), backbone=backbone_spec(args.backbone, args.layer),
        weights=args.weights, ratios=tuple(args.ratios), limit=args.limit, seed=args.seed, method_limits=_method_limits(args.method_limits),
        batch_size=args.batch_size, save_maps=args.save_maps, split_coverage=args.split_coverage, engine=args.engine, actors=args.actors,
        decode_workers=args.decode_workers, torch_threads=args.torch_threads, device=args.device, fold_batchnorm=args.fold_batchnorm, index=args.index,
        shard_storage_options=parse_storage_options(args.shard_storage_option), out_storage_options=parse_storage_options(args.storage_option),
        checkpoint_storage_options=parse_storage_options(args.checkpoint_storage_option), progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate

    summary = run_stage({"checkpoints": "--checkpoint"}, evaluate, config_from_args(args))  # its one field spelt otherwise
    print(json.dumps(summary.to_dict(), indent=1, default=str) if args.json else "\n".join(summary.lines()))
    return 0


if __name__ == "__main__":  # `lcam submit eval` runs `python -m jobs.eval --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("eval", sys.argv[1:]))
