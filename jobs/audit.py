"""``lcam audit CAMS --out DIR``: the classifier audited over a CAM store, ``DIR/audit.html``.

Errors explained (maps of the predicted and the true class side by side), classes ranked by
where their evidence lies, and, with ``--compare EVAL_DIR``, agreement with Grad-CAM.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import announce
from jobs.options import add_options
from jobs.options import config_from_args as build_config
from pipeline.configs import AuditConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, AuditConfig)  # AuditConfig's declarations (pipeline/configs.py)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    return build_config(AuditConfig, args)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    cfg = config_from_args(args)  # mistakes in the options answer before the stage (Ray) is imported
    if cfg.progress and not args.quiet:
        announce(f"lcam audit: {cfg.cams} -> {cfg.out}; starting Ray ...")
    from pipeline.audit.run import run_audit

    summary = run_audit(cfg)
    if args.quiet:
        return 0
    print(json.dumps(asdict(summary), indent=1) if args.json else "\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("audit", sys.argv[1:]))
