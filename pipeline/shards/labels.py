"""Labels files for packing: a table (file name or stem -> class, with or without a header;
TSV, CSV or whitespace) or one class per line, classes as integer indices or ImageNet
WordNet ids; and finding the labels file beside the images."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from ..classes import imagenet_wnids
from ..errors import UserError
from ..fs import get_fs
from .boxes import box_columns, row_boxes
from .format import as_int

WNID = re.compile(r"^n\d{8}$")  # an ImageNet WordNet id
LABELS_SUFFIXES = (".tsv", ".csv", ".txt")


def _read_text(url: str) -> str:
    try:
        fs, path = get_fs(url)
        raw = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"labels file {url} does not exist") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"labels file {url} is not UTF-8 text") from None


def _rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    if "\t" in lines[0]:
        return [[c.strip() for c in ln.split("\t")] for ln in lines]
    if "," in lines[0]:
        return [[c.strip() for c in row] for row in csv.reader(lines)]
    return [ln.split() for ln in lines]


_FILE_COLS = ("file", "filename", "file_name", "path", "image", "img", "image_id", "imageid", "image_name", "id")
_CLASS_COLS = (
    "class_index",
    "class_idx",
    "label",
    "cls",
    "class",
    "target",
    "class_id",
    "label_index",
    "predictionstring",
)
_WNID_COLS = ("wnid", "synset")


def _class_value(value: str, where: str) -> int:
    """An int class index, or a WordNet id mapped to the standard ImageNet index."""
    token = value.split()[0] if value.split() else ""  # LOC_val_solution.csv: "n01751748 x y w h ..."
    idx = as_int(token)
    if idx is not None:
        return idx
    if WNID.match(token):
        if token not in imagenet_wnids():
            raise UserError(f"{where}: {token!r} is not one of the 1000 ImageNet classes")
        return imagenet_wnids()[token]
    raise UserError(f"{where}: class {value!r} is neither an integer class index nor an ImageNet WordNet id")


class LabelsTable(dict):
    """{file-name-or-stem: class} of a labels file, with the line of each row and the rows
    whose class is outside the classifier's range (skipped: name -> reason), and the boxes
    given with each row (:mod:`.boxes`: original pixels, x0 y0 x1 y1 inclusive)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[str, int] = {}
        self.out_of_range: dict[str, str] = {}
        self.boxes: dict[str, list[list[int]]] = {}


def parse_labels(
    url: str, num_classes: int | None = None, skip_out_of_range: bool = False
) -> tuple[str, dict[str, int] | list[int]]:
    """("table", {file-name-or-stem: class}) or ("per-line", [class of line 1, line 2, ...]).

    ``num_classes``: a class outside 0..num_classes-1 is refused with its line, or with
    ``skip_out_of_range`` left out of the table (in ``out_of_range``, with its reason)."""
    rows = _rows(_read_text(url))
    if not rows:
        raise UserError(f"labels file {url} is empty")
    if all(len(r) == 1 for r in rows):
        values = [as_int(r[0]) for r in rows]
        if any(v is None for v in values):
            bad = next(i for i, v in enumerate(values) if v is None)
            raise UserError(f"labels file {url}: line {bad + 1} ({rows[bad][0]!r}) is not an integer class index")
        return "per-line", values  # type: ignore[return-value]
    # A header names known columns; anything else is data (and errors name its line).
    header = [c.lower() for c in rows[0]]
    has_header = any(c in _FILE_COLS + _CLASS_COLS + _WNID_COLS for c in header)
    file_col, class_col, corners = 0, 1, None
    if has_header:
        corners = box_columns(header)  # x0 y0 x1 y1 columns or a PredictionString
        file_col = next((header.index(c) for c in _FILE_COLS if c in header), 0)
        class_col = next((header.index(c) for c in _CLASS_COLS if c in header), None)
        if class_col is None:
            class_col = next((header.index(c) for c in _WNID_COLS if c in header), None)
        if class_col is None:
            raise UserError(
                f"labels file {url}: header {rows[0]} has no class column (expected one of {', '.join(_CLASS_COLS + _WNID_COLS)})"
            )
        rows = rows[1:]
    table = LabelsTable()
    for n, row in enumerate(rows, start=2 if has_header else 1):
        where = f"labels file {url}, line {n}"
        if len(row) <= max(file_col, class_col):
            raise UserError(f"{where}: expected at least {max(file_col, class_col) + 1} columns, got {row}")
        if n == 1 and as_int(row[class_col]) is None and not WNID.match(row[class_col]):
            where += " (if this is a header, name the columns e.g. 'file' and 'class_index')"
        name, cls = row[file_col], _class_value(row[class_col], where)
        if table.get(name, cls) != cls:
            raise UserError(f"{where}: {name!r} is listed twice with different classes ({table[name]} and {cls})")
        if num_classes is not None and cls != -1 and not 0 <= cls < num_classes:  # -1: no label (as packed)
            why = f"class {cls} outside the classifier's 0..{num_classes - 1} ({os.path.basename(url)} line {n})"
            if not skip_out_of_range:
                raise UserError(
                    f"{where}: class {cls} is outside the classifier's classes 0..{num_classes - 1}; "
                    "fix the row, or pass --skip-bad-labels to leave such images out (listed in the report)"
                )
            table.out_of_range[name] = why
            continue
        table[name] = cls
        table.lines.setdefault(name, n)
        if corners is not None:
            table.boxes.setdefault(name, []).extend(row_boxes(row, corners, where))
    return "table", table


def find_labels_file(src: Path, top_files: list[str]) -> Path | None:
    cands = [n for n in top_files if n.lower().endswith(LABELS_SUFFIXES)]
    if len(cands) > 1:
        narrowed = [n for n in cands if re.search(r"label|ground_truth|solution|^val\.txt$", n, re.I)]
        cands = narrowed or cands
    if len(cands) > 1:
        raise UserError(f"{src}: several possible labels files {cands}; pass the right one with --labels")
    return src / cands[0] if cands else None
