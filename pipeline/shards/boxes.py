"""Bounding boxes given with the labels, kept in the shards for localisation metrics.

Two forms of a labels file carry boxes:

* columns ``x0 y0 x1 y1`` (or ``xmin ymin xmax ymax``) in a headed table, one box per row
  (Tiny ImageNet's ``labels.tsv``); a file listed on several rows gets all its boxes;
* ImageNet's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with
  ``"wnid x0 y0 x1 y1 wnid x0 y0 x1 y1 ..."``, several boxes per image.

Boxes are pixel indices of the ORIGINAL image, inclusive, as those files give them; each
sample keeps its own in its json member (``"boxes": [[x0, y0, x1, y1], ...]``) and the
index counts them. Readers map them through the model's resize and crop
(``pipeline.images.boxes_in_crop``).
"""

from __future__ import annotations

from typing import Sequence

from pipeline.errors import UserError

from .format import as_int

_CORNERS = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"))
_PREDICTION = "predictionstring"


def box_columns(header: Sequence[str]) -> tuple[int, ...] | None:
    """Positions of the box columns in a lower-cased header, or None; PredictionString: one position."""
    for names in _CORNERS:
        if all(n in header for n in names):
            return tuple(header.index(n) for n in names)
    if _PREDICTION in header:
        return (header.index(_PREDICTION),)
    return None


def row_boxes(row: Sequence[str], columns: tuple[int, ...], where: str) -> list[list[int]]:
    """The boxes of one labels row (``columns`` from :func:`box_columns`); bad numbers are a UserError."""
    if len(columns) == 1:  # "wnid x0 y0 x1 y1 wnid x0 y0 x1 y1 ..."
        tokens = row[columns[0]].split()
        if len(tokens) % 5:
            raise UserError(f"{where}: PredictionString {row[columns[0]]!r} is not groups of 'wnid x0 y0 x1 y1'")
        groups = [tokens[i + 1 : i + 5] for i in range(0, len(tokens), 5)]
    else:
        if len(row) <= max(columns):
            raise UserError(f"{where}: expected box columns x0 y0 x1 y1, got {list(row)}")
        groups = [[row[c] for c in columns]]
    out = []
    for g in groups:
        box = [as_int(v) for v in g]
        if any(v is None for v in box):
            raise UserError(f"{where}: box {g} must be four integer pixel indices x0 y0 x1 y1")
        x0, y0, x1, y1 = box  # type: ignore[misc]
        if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
            raise UserError(f"{where}: box {g} must have 0 <= x0 <= x1 and 0 <= y0 <= y1 (inclusive pixel indices)")
        out.append([x0, y0, x1, y1])
    return out
