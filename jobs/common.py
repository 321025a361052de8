"""Argument helpers shared by the job entry points (wiring only, no logic)."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

from pipeline.errors import FlagNamer, UserError, flag_namer

T = TypeVar("T")

# one meaning of --precision auto everywhere (pipeline/device.py)
PRECISION_HELP = "auto: bf16 autocast on a GPU (fp16 on a GPU without bf16), fp32 on a CPU"


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option key=value`` (repeatable; values parsed as JSON when they parse).

    Credentials belong in the environment or the cloud role, not here: these options
    are never written to caches, checkpoints or logs.
    """
    from pipeline.errors import UserError

    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            raise UserError(f"storage option {pair!r} must look like key=value (dots nest: client_kwargs.endpoint_url=http://...)")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        cursor = out
        *parents, leaf = parts  # client_kwargs.endpoint_url=... nests
        for p in parents:
            cursor = cursor.setdefault(p, {})
            if not isinstance(cursor, dict):
                raise UserError(f"storage option {pair!r}: {p!r} was already given a value, it cannot also hold {leaf!r}")
        cursor[leaf] = parsed
    return out


LAYER_HELP = "split the backbone after this layer (a named_modules name, as Grad-CAM target layers); the same as the spec option ,layer=NAME"
BACKBONE_HELP = ("a built-in name (efficientnet_lite0, vgg16, resnet50, ...), timm:<model>, torchvision:<builder> or "
                 "module.path:factory; options ,layer=NAME ,size=N")


def backbone_spec(backbone: str | None, layer: str | None) -> str | None:
    """``--backbone`` with ``--layer`` folded into the spec string (which is what travels)."""
    if not layer:
        return backbone
    if not backbone:
        from pipeline.errors import UserError

        raise UserError("--layer needs --backbone: name the model to split")
    from lcam.specs import parse_spec

    return parse_spec(backbone, layer).canonical


def add_storage_options(parser: argparse.ArgumentParser, flag: str = "--storage-option", dest: str = "storage_option", what: str = "") -> None:
    parser.add_argument(
        flag, dest=dest, action="append", metavar="KEY=VALUE",
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
