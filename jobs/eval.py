"""``lcam eval``: Average Drop / Increase in Confidence of L-CAM checkpoints and the baselines."""

from __future__ import annotations

import argparse
import json

from jobs.common import BACKBONE_HELP, LAYER_HELP, add_storage_options, backbone_spec, parse_storage_options

BASELINES = "gradcam,gradcam++,scorecam,rise,gaussian,random"


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratios must be comma-separated numbers like 1,0.5,0.15, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="evaluation shards: a pattern (val-{000000..000049}.tar, *.tar) or a folder with index.json")
    parser.add_argument("out", help="output folder URL: results.md, results.json, adic.png, per_image.csv")
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", type=str, default=None, metavar="[NAME=]URL",
                        help="an L-CAM checkpoint (repeatable): its method (fm/img) names the row unless NAME= is given")
    parser.add_argument("--methods", default=BASELINES, help=f"baselines, comma-separated, or 'none' (default {BASELINES})")
    parser.add_argument("--backbone", default=None, help="default: the checkpoints' backbone, else efficientnet_lite0; " + BACKBONE_HELP)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--weights", default=None, help="default: the checkpoints' weights, else 'default'")
    parser.add_argument("--ratios", type=_ratios, default=(1.0, 0.5, 0.15), help="keep ratios (default 1,0.5,0.15)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images (the papers: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset and of the method-subset ranking")
    parser.add_argument("--method-limit", dest="method_limits", action="append", type=str, default=None, metavar="METHOD=N",
                        help="evaluate METHOD on N of the images only (repeatable; e.g. scorecam=32 for a costly method)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch and per forward (default 16: fastest on CPU; raise it on a GPU)")
    parser.add_argument("--rise-masks", type=int, default=4000, help="RISE masks per image (papers: 4000 VGG-16, 8000 ResNet-50)")
    parser.add_argument("--rise-grid", type=int, default=7)
    parser.add_argument("--rise-p", type=float, default=0.5)
    parser.add_argument("--rise-batch", type=int, default=32, help="RISE masked images per forward")
    parser.add_argument("--rise-seed", type=int, default=0)
    parser.add_argument("--scorecam-batch", type=int, default=32, help="Score-CAM masked images per forward")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random-map floor")
    parser.add_argument("--gaussian-sigma", type=float, default=0.25, help="centred Gaussian sigma, x the shorter image side")
    parser.add_argument("--save-maps", type=int, default=0, metavar="N",
                        help="keep every method's map of the first N images (by rank) in maps.npz, for the report's gallery")
    parser.add_argument("--road", action="store_true", help="also ROAD MoRF/LeRF via pytorch-grad-cam (costly: 2P+1 forwards and 2P sparse solves per image)")
    parser.add_argument("--road-percentiles", type=_ints, default=(10, 20, 30, 40, 50, 60, 70, 80, 90))
    parser.add_argument("--road-seed", type=int, default=0)
    parser.add_argument("--engine", default="auto", choices=["auto", "local", "ray"],
                        help="local: one process; ray: Ray Data with an actor pool; auto: ray when connected to a cluster")
    parser.add_argument("--actors", type=int, default=None, help="ray: actors (default: one per GPU, else 1)")
    parser.add_argument("--decode-workers", type=int, default=4, help="local: decoding threads")
    parser.add_argument("--torch-threads", type=int, default=None, help="ray CPU actors: torch threads (default: the node's cores)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="local engine's device")
    parser.add_argument("--no-fold-batchnorm", dest="fold_batchnorm", action="store_false",
                        help="run the backbone as built (default: BatchNorm folded into the convolutions, same function, faster)")
    parser.add_argument("--index", default=None, help="shard index URL (default: index.json beside the shards)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options(parser, "--shard-storage-option", "shard_storage_option", " for the shards")
    add_storage_options(parser, what=" for the output folder")
    add_storage_options(parser, "--checkpoint-storage-option", "checkpoint_storage_option", " for the checkpoints")


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

    methods = () if args.methods.strip().lower() in ("", "none") else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return EvalConfig(
        shards=args.shards, out=args.out, checkpoints=list(args.checkpoints or []), methods=methods, backbone=backbone_spec(args.backbone, args.layer),
        weights=args.weights, ratios=tuple(args.ratios), limit=args.limit, seed=args.seed, method_limits=_method_limits(args.method_limits),
        batch_size=args.batch_size, rise_masks=args.rise_masks, rise_grid=args.rise_grid, rise_p=args.rise_p, rise_batch=args.rise_batch,
        rise_seed=args.rise_seed, scorecam_batch=args.scorecam_batch, random_seed=args.random_seed, gaussian_sigma=args.gaussian_sigma, save_maps=args.save_maps,
        road=args.road, road_percentiles=tuple(args.road_percentiles), road_seed=args.road_seed, engine=args.engine, actors=args.actors,
        decode_workers=args.decode_workers, torch_threads=args.torch_threads, device=args.device, fold_batchnorm=args.fold_batchnorm, index=args.index,
        shard_storage_options=parse_storage_options(args.shard_storage_option), out_storage_options=parse_storage_options(args.storage_option),
        checkpoint_storage_options=parse_storage_options(args.checkpoint_storage_option), progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate

    summary = evaluate(config_from_args(args))
    print(json.dumps(summary.to_dict(), indent=1, default=str) if args.json else "\n".join(summary.lines()))
    return 0
