"""The ``lcam`` command: one sub-command per stage, each a thin module in ``jobs/``.

Every ``jobs.<name>`` module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``lcam --help`` is instant, and no
job module imports torch or Ray before its arguments are parsed, so ``lcam <cmd> --help``
is too (tests/test_cli.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "shards": ("jobs.shards", "pack an image folder into WebDataset shards with an index"),
    "extract": ("jobs.extract", "run the frozen backbone over shards into a Zarr feature cache (Ray)"),
    "cache": ("jobs.cache", "inspect (info), check (verify) or repair a feature cache or a CAM store"),
    "train": ("jobs.train", "train L-CAM-Fm from a cache or L-CAM-Img from shards"),
    "cams": ("jobs.cams", "generate CAMs in bulk into a CAM store; overlays and a gallery"),
    "eval": ("jobs.eval", "Average Drop / Increase in Confidence against the baselines"),
    "audit": ("jobs.audit", "audit a classifier over a CAM store: errors explained, evidence per class (audit.html)"),
    "report": ("jobs.report", "report.html from stages run by hand: metrics, training curves, galleries, audit"),
    "pipeline": ("jobs.pipeline", "extract -> train -> cams -> eval -> report in one job"),
    "submit": ("jobs.submit", "submit a job to a Ray cluster and follow its logs"),
    "jobs": ("jobs.submit", "list, show logs of, or stop Ray jobs"),
    "demo": ("jobs.demo", "the whole method on a few photos: overlays and a report"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def version() -> str:
    """The installed distribution's version (no torch import: this is read from metadata)."""
    from importlib import metadata

    try:
        return metadata.version("lcam")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcam", description="L-CAM explanations at dataset scale.")
    parser.add_argument("--version", action="version", version=f"lcam {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``lcam NAME`` exactly as :func:`run_job` uses it (the README test parses with it)."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lcam {name}", description=COMMANDS[name][1])
    if not getattr(module, "OWN_CONFIG", False):  # submit: --config is the job's, not its own
        parser.add_argument(
            "--config", metavar="FILE", help="YAML file with this job's fields; key=value overrides may follow"
        )
    if hasattr(module, "add_command_arguments"):
        module.add_command_arguments(parser, name)
    else:
        module.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own log lines (hidden by default)")
    show_defaults(parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in ``--help`` (unless its help already states it), subcommands too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS) or default == []:
            continue
        if action.help == argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def user_error_message(exc: BaseException) -> str | None:
    """The one line for an exception the user can fix, or None for a bug (shown with its traceback).

    Imports happen when an error is being handled, not before parsing: lcam.backbones imports
    torch, which would make `lcam <cmd> --help` take seconds."""
    from pipeline.errors import UserError

    if isinstance(exc, (UserError, FileNotFoundError)):  # the common case answers without importing torch
        return str(exc)
    from lcam.backbones.base import BackboneSpecError, WeightsUnavailable
    from pipeline.fs import storage_error_message

    if isinstance(exc, (WeightsUnavailable, BackboneSpecError)):
        return str(exc)
    if isinstance(exc, KeyError) and str(exc.args[0] if exc.args else "").startswith("unknown backbone"):
        return str(exc.args[0])  # the backbone registry's "unknown backbone 'x'; available: ..."
    return storage_error_message(exc)  # credentials, endpoints, permissions: settings, not bugs


def run_job(name: str, argv: list[str]) -> int:
    """Run one job from its command line or ``--config FILE [key=value ...]``; user errors
    print one clear line (no traceback) and exit 2."""
    from jobs.config import build_namespace
    from jobs.options import check_ranges
    from pipeline.raykit import set_local_ray_env  # torch- and Ray-free at import

    set_local_ray_env()  # before any stage imports Ray: the Makefile's RAY_AUTH_MODE / RAY_USAGE_STATS_ENABLED, for every path
    module = importlib.import_module(COMMANDS[name][0])
    parser = command_parser(name)
    own_config = getattr(module, "OWN_CONFIG", False)
    try:
        args = parser.parse_args(argv) if own_config else build_namespace(parser, argv)
        check_ranges(parser, args)  # the declared ranges (jobs/options.py), as one line naming the flag
        args.command = name
        if getattr(args, "verbose", False):
            import os

            os.environ["LCAM_VERBOSE"] = "1"  # pipeline.raykit.VERBOSE_ENV: Ray's log lines stay on
        return int(module.run(args) or 0)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        # problems the user can fix: one line naming the thing, no traceback
        from jobs.common import retract_announcement

        retract_announcement()  # a terminal's "starting ..." line gives way to the refusal
        print(f"lcam {name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcam {name}: {interrupted_message(module, locals().get('args'))}", file=sys.stderr)
        if "ray" in sys.modules:  # a local Ray this run started: no process of it outlives the command
            from pipeline.raykit import stop_local_ray

            stop_local_ray()
        return 130


def interrupted_message(module: object, args: argparse.Namespace | None) -> str:
    """What Ctrl-C left: a re-run resumes only where the job resumes and its output exists."""
    out = getattr(args, getattr(module, "OUTPUT", "out"), None) if args is not None else None
    try:
        from pipeline.fs import exists

        made = bool(out) and isinstance(out, str) and exists(out)
    except Exception:  # an unreachable store: say nothing about it
        made = False
    if not made:
        return "interrupted before any output was written"
    resumes = getattr(module, "RESUMES", "")
    return f"interrupted; the finished part of {out} is kept" + (f" and {resumes}" if resumes else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(f"lcam {version()}")
        return 0
    if argv[0] not in _available():
        parser.print_usage(sys.stderr)
        print(f"lcam: unknown command {argv[0]!r}; choose from: {', '.join(_available())}", file=sys.stderr)
        return 2
    return run_job(argv[0], argv[1:])


def console() -> None:
    """The ``lcam`` command: :func:`main`, then a quick exit. A stage that loaded torch, Ray and
    a model spent 8-13 s in the interpreter's teardown after its summary (measured on 2 cores:
    ``lcam extract`` of 24 images, 1.4 s of it ``ray.shutdown()``); everything is written and
    flushed by then, so the process ends at once after stopping the local Ray it started.
    ``main`` itself returns normally (tests and scripts call it in-process)."""
    import logging
    import os

    rc = main()
    if "ray" in sys.modules:  # a local Ray this command started (never a cluster it joined)
        from pipeline.raykit import stop_local_ray

        stop_local_ray(quick=True)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (lcam ... | head): nothing left to say
            pass
    os._exit(rc)


if __name__ == "__main__":
    console()
