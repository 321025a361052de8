"""Class names: ImageNet's 1,000 ship with the package; a user file can replace them."""

from __future__ import annotations

import csv
import importlib.util
import io
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError
from .fs import StorageOptions, get_fs


def _parse(text: str, source: str) -> list[str]:
    """TSV/CSV with a header naming ``name`` (and optionally ``class_index``), or one name per line."""
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    rows = [r for r in csv.reader(io.StringIO(text), dialect=dialect) if r]
    header = [c.strip().lower() for c in rows[0]]
    if "name" in header:
        col = header.index("name")
        idx = header.index("class_index") if "class_index" in header else None
        body = rows[1:]
        if idx is not None:
            body = sorted(body, key=lambda r: int(r[idx]))
            if [int(r[idx]) for r in body] != list(range(len(body))):
                raise UserError(f"class names file {source}: class_index must run 0..{len(body) - 1} without gaps")
        return [r[col].strip() for r in body]
    if len(header) == 1:
        return [r[0].strip() for r in rows]
    raise UserError(f"class names file {source}: expected a 'name' column or one name per line")


def _imagenet_text() -> str:
    # find_spec locates the package without running lcam/__init__ (which imports torch:
    # seconds that packing shards does not need); importlib.resources covers other loaders.
    spec = importlib.util.find_spec("lcam")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, "data", "imagenet_classes.tsv")
        if path.is_file():
            return path.read_text()
    return resources.files("lcam").joinpath("data/imagenet_classes.tsv").read_text()


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the standard index order (sorted WordNet ids)."""
    return tuple(_parse(_imagenet_text(), "lcam/data/imagenet_classes.tsv"))


@lru_cache(maxsize=1)
def imagenet_wnids() -> dict[str, int]:
    """WordNet id (``n01440764``) -> standard ImageNet class index."""
    rows = list(csv.DictReader(io.StringIO(_imagenet_text()), dialect="excel-tab"))
    return {r["wnid"]: int(r["class_index"]) for r in rows}


def load_class_names(url: str | None = None, storage_options: StorageOptions = None, num_classes: int = 1000) -> list[str]:
    """ImageNet's names, or a user's file (TSV/CSV with a ``name`` column, or a name a line);
    without a file, a classifier that has not 1,000 classes gets ``class 0``, ``class 1``, ..."""
    if url is None:
        names = list(imagenet_classes())
        if num_classes != len(names):  # not an ImageNet classifier (a user's backbone): number its classes
            return [f"class {i}" for i in range(num_classes)]
    else:
        fs, path = get_fs(url, storage_options)
        try:
            names = _parse(fs.cat_file(path).decode(), url)
        except FileNotFoundError:
            raise UserError(f"class names file {url!r} not found") from None
    if len(names) != num_classes:
        raise UserError(f"class names {url or 'ImageNet'}: {len(names)} names for a classifier with {num_classes} classes")
    return names


def class_names_options(url: str | None, storage_options: StorageOptions) -> StorageOptions:
    """A names file on the source's object store reads with its options; a local one with none."""
    return storage_options if url and "://" in url and not url.startswith("file://") else None


def describe_classes(identity: Mapping[str, Any]) -> str:
    """A store's class selection (its identity's ``classes``) in words."""
    mode = identity["mode"]
    if mode == "combined":
        return " + ".join(describe_classes(p) for p in identity["parts"])
    return {"predicted": "predicted class", "label": "ground-truth label", "top-k": f"top-{identity['k']} classes", "ids": f"classes {identity['ids']}"}.get(mode, mode)


def store_columns(identity: Mapping[str, Any]) -> list[str]:
    """What each column of a store holds (``predicted``, ``top-2``, ``label``, ``id:281``), from its identity."""
    if "columns" in identity:
        return list(identity["columns"])
    mode = identity["mode"]
    if mode == "top-k":
        return ["predicted"] + [f"top-{i + 1}" for i in range(1, int(identity["k"]))]
    if mode == "ids":
        return [f"id:{c}" for c in identity["ids"]]
    return [mode]
