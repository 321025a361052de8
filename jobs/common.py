"""Argument helpers shared by the job entry points (wiring only, no logic)."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

from pipeline.errors import FlagNamer, UserError, flag_namer

# declared with the config fields (pipeline/options.py); re-exported for the jobs
from pipeline.options import LAYER_HELP, parse_storage_options

__all__ = [
    "LAYER_HELP",
    "add_storage_options",
    "announce",
    "backbone_spec",
    "parse_storage_options",
    "run_stage",
    "speaking_flags",
]

T = TypeVar("T")


def backbone_spec(backbone: str | None, layer: str | None) -> str | None:
    """``--backbone`` with ``--layer`` folded into the spec string (which is what travels)."""
    if not layer:
        return backbone
    if not backbone:
        from pipeline.errors import UserError

        raise UserError("--layer needs --backbone: name the model to split")
    from lcam.backbones.specs import parse_spec

    return parse_spec(backbone, layer).canonical


def add_storage_options(
    parser: argparse.ArgumentParser, flag: str = "--storage-option", dest: str = "storage_option", what: str = ""
) -> None:
    parser.add_argument(
        flag,
        dest=dest,
        action="append",
        metavar="KEY=VALUE",
        help=f"fsspec storage option{what} (repeatable; dots nest: client_kwargs.endpoint_url=http://...)",
    )


@contextmanager
def speaking_flags(names: Mapping[str, str]) -> Iterator[FlagNamer]:
    """Run a stage inside a bigger job (``lcam pipeline``) so that its user errors name the
    options as that job spells them: ``names`` maps the stage's config fields to the job's
    flags (``{"augment": "--img-augment"}``); fields not listed keep their ``--field`` form.
    Yields the namer, for the stage's console lines (``summary.lines(flag)``)."""
    namer = flag_namer(names)
    try:
        yield namer
    except UserError as exc:
        raise exc.spoken_as(namer) from None


def run_stage(names: Mapping[str, str], stage: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``stage(*args, **kwargs)`` under :func:`speaking_flags` (``names``: field -> this job's flag)."""
    with speaking_flags(names):
        return stage(*args, **kwargs)


_ANNOUNCED: list[bool] = [False]


def announce(text: str) -> None:
    """The job's first line, printed on a terminal as soon as its options are checked (before
    torch and Ray load, which take seconds): the user sees at once that the command runs. In a
    log (not a terminal) the stage's own progress lines say it; a refusal that follows on a
    terminal replaces this line (:func:`retract_announcement`), so it stays one line."""
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)
        _ANNOUNCED[0] = True


def retract_announcement() -> None:
    """Erase the announcement line on the terminal (cursor up one line, clear it) before an error line."""
    if _ANNOUNCED[0]:
        print("\033[F\033[K", end="", file=sys.stderr, flush=True)
        _ANNOUNCED[0] = False
