"""The ``lcam`` command: one sub-command per stage, each a thin module in ``jobs/``.

Every ``jobs.<name>`` module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``lcam --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "shards": ("jobs.shards", "pack an image folder into WebDataset shards with an index"),
    "extract": ("jobs.extract", "run the frozen backbone over shards into a Zarr feature cache (Ray)"),
    "cache": ("jobs.cache", "inspect (info) or check (verify) a feature cache"),
    "train": ("jobs.train", "train L-CAM-Fm from a cache or L-CAM-Img from shards"),
    "cams": ("jobs.cams", "generate CAMs in bulk into a CAM store; overlays and a gallery"),
    "eval": ("jobs.eval", "Average Drop / Increase in Confidence against the baselines"),
    "pipeline": ("jobs.pipeline", "extract -> train -> cams -> eval -> report in one job"),
    "submit": ("jobs.submit", "submit a job to a Ray cluster and follow its logs"),
    "jobs": ("jobs.submit", "list, show logs of, or stop Ray jobs"),
    "demo": ("jobs.demo", "the whole method on a few photos: overlays and a report"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcam", description="L-CAM explanations at dataset scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
    return parser


def run_job(name: str, argv: list[str]) -> int:
    """Run one job from its command line or ``--config FILE [key=value ...]``; user errors
    print one clear line (no traceback) and exit 2."""
    from jobs.config import build_namespace
    from lcam.backbones import BackboneSpecError, WeightsUnavailable
    from pipeline.errors import UserError

    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lcam {name}", description=COMMANDS[name][1])
    own_config = getattr(module, "OWN_CONFIG", False)  # submit: --config is the job's, not its own
    if not own_config:
        parser.add_argument("--config", metavar="FILE", help="YAML file with this job's fields; key=value overrides may follow")
    if hasattr(module, "add_command_arguments"):
        module.add_command_arguments(parser, name)
    else:
        module.add_arguments(parser)
    try:
        args = parser.parse_args(argv) if own_config else build_namespace(parser, argv)
        args.command = name
        return int(module.run(args) or 0)
    except (UserError, WeightsUnavailable, BackboneSpecError, FileNotFoundError) as exc:
        # problems the user can fix: one line naming the thing, no traceback
        print(f"lcam {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcam {name}: interrupted; finished work is kept and a re-run resumes", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in _available():
        parser.print_usage(sys.stderr)
        print(f"lcam: unknown command {argv[0]!r}; choose from: {', '.join(_available())}", file=sys.stderr)
        return 2
    return run_job(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
