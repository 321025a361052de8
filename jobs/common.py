"""Argument helpers shared by the job entry points (wiring only, no logic)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option key=value`` (repeatable; values parsed as JSON when they parse).

    Credentials belong in the environment or the cloud role, not here: these options
    are never written to caches, checkpoints or logs.
    """
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise argparse.ArgumentTypeError(f"storage option {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        cursor = out
        *parents, leaf = key.split(".")  # client_kwargs.endpoint_url=... nests
        for p in parents:
            cursor = cursor.setdefault(p, {})
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
