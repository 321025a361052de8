"""``lcam report OUT.html --eval DIR --run NAME=RUN ... --cams CAMS --audit DIR``: the report of
stages run by hand.

The page ``lcam pipeline`` writes last (the metrics table and chart of ``lcam eval``, the
training curves of each run folder, the method-by-method gallery of ``lcam eval
--save-maps``, links to the CAM store's gallery and the audit), built from whichever of
those outputs are given.
"""

from __future__ import annotations

import argparse
import os

from jobs.common import add_storage_options, parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", metavar="OUT", help="the report to write: an .html path (its pictures go beside it, in report_files/)"
    )
    parser.add_argument(
        "--eval",
        dest="eval_dir",
        default=None,
        metavar="DIR",
        help="an `lcam eval` output folder: metrics, chart, gallery",
    )
    parser.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="a training run folder (`lcam train --out`) and its name in the report; repeatable",
    )
    parser.add_argument(
        "--cams", default=None, metavar="CAMS", help="a CAM store made with `lcam cams --overlays N`: links its gallery"
    )
    parser.add_argument(
        "--audit",
        dest="audit_dir",
        default=None,
        metavar="DIR",
        help="an `lcam audit` output folder: links its audit.html",
    )
    parser.add_argument("--title", default="L-CAM report", help="the page's title")
    add_storage_options(parser, what=" for every URL")


def _link(target: str, page: str) -> str:
    """``target`` as the page links it: relative to the page's folder for local paths."""
    if "://" in target or "://" in page:
        return target
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(page)))


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import UserError
    from pipeline.fs import exists, join

    so = parse_storage_options(args.storage_option)
    out = args.out if args.out.endswith((".html", ".htm")) else join(args.out, "report.html")
    runs: dict[str, str] = {}
    for item in args.runs:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise UserError(f"--run takes NAME=RUN (e.g. --run fm=runs/fm), got {item!r}")
        if not exists(join(url, "metrics.jsonl"), so):
            raise UserError(f"--run {item}: {url} holds no metrics.jsonl; give a run folder made by `lcam train --out`")
        runs[name] = url
    if args.eval_dir and not exists(join(args.eval_dir, "results.json"), so):
        raise UserError(f"--eval {args.eval_dir} holds no results.json; give an `lcam eval` output folder")
    gallery = join(args.cams, "gallery", "index.html") if args.cams else None
    if gallery and not exists(gallery, so):
        raise UserError(f"--cams {args.cams} has no gallery; make the store with `lcam cams ... --overlays N`")
    audit = join(args.audit_dir, "audit.html") if args.audit_dir else None
    if audit and not exists(audit, so):
        raise UserError(f"--audit {args.audit_dir} holds no audit.html; give an `lcam audit` output folder")
    if not (args.eval_dir or runs or gallery or audit):
        raise UserError("nothing to report: give at least one of --eval DIR, --run NAME=RUN, --cams CAMS, --audit DIR")
    from pipeline.report.page import write_report

    url = write_report(
        out,
        title=args.title,
        eval_dir=args.eval_dir,
        train_runs=runs,
        cams_gallery=gallery and _link(gallery, out),
        audit_page=audit and _link(audit, out),
        storage_options=so,
    )
    print(f"report: {url}")
    return 0


if __name__ == "__main__":  # `lcam submit report` runs `python -m jobs.report --config ...` on the cluster
    import sys

    from jobs.cli import run_job

    sys.exit(run_job("report", sys.argv[1:]))
