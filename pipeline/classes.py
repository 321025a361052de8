"""Class names: ImageNet's 1,000 ship with the package; a user file can replace them."""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def load_class_names(
    url: str | None = None, storage_options: StorageOptions = None, num_classes: int = 1000
) -> list[str]:
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
        raise UserError(
            f"class names {url or 'ImageNet'}: {len(names)} names for a classifier with {num_classes} classes"
        )
    return names


def class_names_options(url: str | None, storage_options: StorageOptions) -> StorageOptions:
    """A names file on the source's object store reads with its options; a local one with none."""
    return storage_options if url and "://" in url and not url.startswith("file://") else None


def describe_classes(identity: Mapping[str, Any]) -> str:
    """A store's class selection (its identity's ``classes``) in words."""
    mode = identity["mode"]
    if mode == "combined":
        return " + ".join(describe_classes(p) for p in identity["parts"])
    return {
        "predicted": "predicted class",
        "label": "ground-truth label",
        "top-k": f"top-{identity['k']} classes",
        "ids": f"classes {identity['ids']}",
    }.get(mode, mode)


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


# ---------------------------------------------------------------- which classes per sample (lcam cams --classes)
MODES = ("predicted", "label", "top-k", "ids")


# ---------------------------------------------------------------- which classes
@dataclass(frozen=True)
class ClassSelection:
    """Which classes to explain per sample: ``predicted`` (top-1), ``label`` (ground truth),
    ``top-k`` (the k most probable) or ``ids`` (the same list of class ids for every sample);
    or ``combined``: several of those side by side (``--classes predicted,label``,
    ``top5,label``), ``parts`` in the order given, ``k`` the total columns.

    A combination de-duplicates nothing: a sample whose label equals its prediction stores
    that class (and its map) in both columns, so column t always means the same thing. In a
    combination, a sample without a label is kept (its other columns are useful) and its
    label column holds class id -1, probability 0 and an all-zero raw map.
    """

    mode: str = "predicted"
    k: int = 1
    ids: tuple[int, ...] = ()
    parts: tuple["ClassSelection", ...] = ()

    @classmethod
    def parse(
        cls, classes: str | None = None, top_k: int | None = None, class_ids: str | Sequence[int] | None = None
    ) -> "ClassSelection":
        """From command-line style settings; ``classes`` is inferred from ``top_k``/``class_ids`` when absent."""
        if isinstance(class_ids, str):
            try:
                class_ids = [int(c) for c in class_ids.replace(" ", "").split(",") if c]
            except ValueError:
                raise UserError(f"class ids {class_ids!r} must be integers separated by commas, e.g. 281,285") from None
        if classes and "," in classes:
            return cls._combined(classes, top_k, class_ids)
        mode = classes or ("ids" if class_ids else "top-k" if top_k is not None else "predicted")
        short = re.fullmatch(r"top-?(\d+)", mode)
        if short:  # top5 = top-k with k 5
            if top_k is not None and top_k != int(short.group(1)):
                raise UserError(f"classes {mode!r} and top-k {top_k} disagree; give one of them")
            mode, top_k = "top-k", int(short.group(1))
        if mode not in MODES:
            raise UserError(
                f"unknown class selection {mode!r}; choose from {', '.join(MODES)}, top5 (any k), or a combination such as predicted,label"
            )
        if mode == "ids":
            if not class_ids:
                raise UserError("classes 'ids' needs the class ids (e.g. --class-ids 281,285)")
            if top_k is not None:
                raise UserError("give either class ids or top-k, not both")
            return cls("ids", len(class_ids), tuple(int(c) for c in class_ids))
        if class_ids:
            raise UserError(f"class ids were given but the class selection is {mode!r}; use classes 'ids'")
        if mode == "top-k":
            k = 5 if top_k is None else int(top_k)
            if k < 1:
                raise UserError(f"top-k must be at least 1, got {k}")
            return cls("top-k", k)
        if top_k is not None and top_k != 1:
            raise UserError(f"top-k {top_k} was given but the class selection is {mode!r}; use classes 'top-k'")
        return cls(mode, 1)

    @classmethod
    def _combined(cls, classes: str, top_k: int | None, class_ids: Sequence[int] | None) -> "ClassSelection":
        names = [c.strip() for c in classes.split(",") if c.strip()]
        parts = []
        for name in names:  # --top-k goes to a 'top-k' part, --class-ids to an 'ids' part
            parts.append(cls.parse(name, top_k if name == "top-k" else None, class_ids if name == "ids" else None))
        if top_k is not None and not any(p.mode == "top-k" and n == "top-k" for p, n in zip(parts, names)):
            raise UserError(
                f"top-k {top_k} was given but the classes {classes!r} have no 'top-k' part; write e.g. top5,label"
            )
        if class_ids and not any(p.mode == "ids" for p in parts):
            raise UserError(
                f"class ids were given but the classes {classes!r} have no 'ids' part; write e.g. predicted,ids"
            )
        kinds = [p.mode for p in parts]
        dup = sorted({m for m in kinds if kinds.count(m) > 1})
        if dup:
            raise UserError(f"classes {classes!r} name {dup[0]!r} twice; give each kind once")
        if "predicted" in kinds and "top-k" in kinds:
            raise UserError(f"classes {classes!r}: top-k already starts with the predicted class; drop 'predicted'")
        return cls("combined", sum(p.width for p in parts), (), tuple(parts))

    @property
    def width(self) -> int:
        """T: classes explained per sample."""
        return self.k

    @property
    def needs_label(self) -> bool:
        """Whether a column holds the ground-truth label."""
        return self.mode == "label" or any(p.mode == "label" for p in self.parts)

    def columns(self) -> list[str]:
        """What each of the T columns holds: predicted, top-2, ..., label, id:281."""
        out: list[str] = []
        for p in self.parts or (self,):
            if p.mode == "top-k":
                out += ["predicted"] + [f"top-{i + 1}" for i in range(1, p.k)]
            elif p.mode == "ids":
                out += [f"id:{c}" for c in p.ids]
            else:
                out.append(p.mode)
        return out

    def validate(self, num_classes: int) -> None:
        for p in self.parts:
            p.validate(num_classes)
        if self.mode == "top-k" and not 1 <= self.k <= num_classes:
            raise UserError(f"top-k {self.k} must be between 1 and the number of classes ({num_classes})")
        bad = [c for c in self.ids if not 0 <= c < num_classes]
        if bad:
            raise UserError(
                f"class id {bad[0]} is out of range: the classifier has {num_classes} classes (0..{num_classes - 1})"
            )
        if len(set(self.ids)) != len(self.ids):
            raise UserError(f"class ids {list(self.ids)} repeat an id; give each class once")

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "k": self.k, "ids": list(self.ids)}
        if self.parts:  # only combinations carry it: single selections keep their old fingerprint
            out["parts"] = [p.identity() for p in self.parts]
            out["columns"] = self.columns()
        return out
