"""``lcam audit CAMS --out DIR``: the classifier audited over a CAM store, ``DIR/audit.html``.

Errors explained (maps of the predicted and the true class side by side), classes ranked by
where their evidence lies, and, with ``--compare EVAL_DIR``, agreement with Grad-CAM.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import add_storage_options, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cams", help="CAM store URL (made by `lcam cams`; --classes predicted,label gives the errors both maps)")
    parser.add_argument("--out", required=True, help="output folder: audit.html, per_class.csv, confusions.csv, per_sample.parquet")
    parser.add_argument("--compare", default=None, metavar="EVAL_DIR", help="an `lcam eval --save-maps N` output folder: rank correlation with its maps")
    parser.add_argument("--compare-method", default="gradcam", help="which of the evaluation's methods to compare with (default gradcam)")
    parser.add_argument("--max-thumbnails", type=int, default=300, help="pictures in the page, all sections together (default 300)")
    parser.add_argument("--class-names", default=None, help="class names file (default ImageNet)")
    parser.add_argument("--band", type=float, default=0.1, help="border band width, a share of the image side (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    add_storage_options(parser, what=" for the CAM store, its source shards and --compare")
    add_storage_options(parser, "--out-storage-option", "out_storage_option", " for the output folder")


def config_from_args(args: argparse.Namespace):
    from pipeline.audit import AuditConfig

    return AuditConfig(
        cams=args.cams, out=args.out.rstrip("/"), compare=args.compare, compare_method=args.compare_method,
        max_thumbnails=args.max_thumbnails, class_names=args.class_names, band=args.band,
        storage_options=parse_storage_options(args.storage_option), out_storage_options=parse_storage_options(args.out_storage_option),
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pipeline.audit import run_audit

    summary = run_audit(config_from_args(args))
    if args.quiet:
        return 0
    print(json.dumps(asdict(summary), indent=1) if args.json else "\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("audit", sys.argv[1:]))
