"""``lcam extract``: shards -> frozen backbone on Ray -> Zarr feature cache.

The options are ExtractConfig's declarations (pipeline/configs.py); only ``--layer``
(folded into the backbone spec) and ``--json`` (how to print) are this job's own.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import LAYER_HELP, announce, backbone_spec
from jobs.options import add_options
from jobs.options import config_from_args as build_config
from pipeline.configs import ExtractConfig

OUTPUT, RESUMES = "cache", "a re-run resumes"  # what Ctrl-C leaves (jobs/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ExtractConfig)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    return build_config(ExtractConfig, args, backbone=backbone_spec(args.backbone, args.layer))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # mistakes in the options answer before the stage (torch, Ray) is imported
    from pipeline.shards.read import require_shards

    require_shards(
        cfg.shards, storage_options=cfg.shard_storage_options, index_url=cfg.index
    )  # an image folder: says `lcam shards`
    if cfg.progress:
        announce(f"lcam extract: {cfg.shards} -> {cfg.cache}; loading the backbone and starting Ray ...")
    from pipeline.extract.run import extract

    summary = extract(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines()))
    return 1 if summary.failed_shards else 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("extract", sys.argv[1:]))
