"""``lcam extract``: shards -> frozen backbone on Ray -> Zarr feature cache."""

from __future__ import annotations

import argparse
import json

from jobs.common import BACKBONE_HELP, PRECISION_HELP, LAYER_HELP, add_storage_options, backbone_spec, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard URLs: a pattern (train-{000000..000146}.tar, *.tar) or a folder/prefix with index.json")
    parser.add_argument("cache", help="feature cache URL (local path, s3://, gs://)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help=BACKBONE_HELP)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--weights", default="default", help="'default' (pretrained), a torchvision weight name, a checkpoint path/URL, or 'random'")
    parser.add_argument("--views", default="center", help="comma-separated: center, hflip (default center)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=None, help="backbone actors (default: one per GPU, else 1)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help=PRECISION_HELP)
    parser.add_argument("--logits", action="store_true", help="also store the full logits")
    parser.add_argument("--index", default=None, help="shard index URL (default: index.json beside the shards)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options(parser, "--shard-storage-option", "shard_storage_option", " for the shards")
    add_storage_options(parser, "--cache-storage-option", "cache_storage_option", " for the cache")


def config_from_args(args: argparse.Namespace):
    from pipeline.extract import ExtractConfig

    return ExtractConfig(
        shards=args.shards,
        cache=args.cache,
        backbone=backbone_spec(args.backbone, args.layer),
        weights=args.weights,
        views=tuple(v.strip() for v in args.views.split(",") if v.strip()),
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_actors=args.actors,
        precision=args.precision,
        store_logits=args.logits,
        index=args.index,
        shard_storage_options=parse_storage_options(args.shard_storage_option),
        cache_storage_options=parse_storage_options(args.cache_storage_option),
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.extract import extract

    summary = extract(config_from_args(args))
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines()))
    return 1 if summary.failed_shards else 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("extract", sys.argv[1:]))
