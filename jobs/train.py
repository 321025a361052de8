"""``lcam train``: L-CAM-Fm from a feature cache, or L-CAM-Img from shards on Ray Train."""

from __future__ import annotations

import argparse
import json

from jobs.common import LAYER_HELP, announce, backbone_spec, speaking_flags
from jobs.options import add_options
from jobs.options import config_from_args as build_config
from pipeline.configs import TrainConfig
from pipeline.options import flag_names

RESUMES = "`lcam train --resume` continues it"  # what Ctrl-C leaves (jobs/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainConfig)  # every option is a TrainConfig field's declaration (pipeline/configs.py)
    parser.add_argument("--layer", default=None, help=LAYER_HELP)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_config(TrainConfig, args, backbone=backbone_spec(args.backbone, args.layer))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # mistakes in the options answer before the stage (torch, Ray) is imported
    if cfg.progress:
        announce(f"lcam train: run folder {cfg.out}; loading torch ...")
    from pipeline.train.run import train

    with speaking_flags(
        flag_names(TrainConfig)
    ) as flag:  # fields this command spells its own way (recipe_rule: --recipe)
        summary = train(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines(flag)))
    return 0


if __name__ == "__main__":  # `lcam submit train` runs `python -m jobs.train --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("train", sys.argv[1:]))
