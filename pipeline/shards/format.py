"""The shards' format: index names, sample records, the errors a reader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError

INDEX_FORMAT = "lcam-webdataset-shards/1"
INDEX_NAME = "index.json"
READ_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # order of preference when reading
JSON_LABEL_KEYS = ("label", "cls", "class", "class_index")


# --------------------------------------------------------------------------- errors


class ShardError(UserError):
    """A shard that cannot be read as the index describes it."""


class ShardReadError(ShardError):
    """The tar itself is damaged (e.g. cut in the middle of a member)."""


class ShardCountMismatch(ShardError):
    """The tar holds a different number of samples than ``index.json`` says."""

    def __init__(self, message: str, shard: str = "", expected: int | None = None, actual: int | None = None) -> None:
        super().__init__(message)
        self.shard, self.expected, self.actual = shard, expected, actual

    def __reduce__(self):  # keep the fields when Ray pickles the exception across processes
        return (type(self), (str(self), self.shard, self.expected, self.actual))


class ShardChecksumMismatch(ShardError):
    """The shard's bytes do not hash to the sha256 recorded in the index."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ShardInfo:
    url: str
    name: str
    count: int | None = None
    sha256: str | None = None
    labels_scheme: str | None = (
        None  # from the index: imagenet, labels-file, folders (0..N-1: not the classifier's classes)
    )
    boxes: int | None = None  # from the index: samples carrying bounding boxes (pipeline.shards.boxes)


@dataclass
class Sample:
    key: str
    image: bytes  # original encoded bytes; b"" when the sample has no image member
    ext: str  # member extension the image came from ("jpg", "jpeg", "png", "webp"), "" if none
    label: int  # -1 when the sample carries no label
    meta: dict = field(default_factory=dict)  # the sample's json member, parsed


def as_int(s: Any) -> int | None:
    """``int(s)``, or None for text that is not an integer (labels files, json labels)."""
    try:
        return int(s)
    except (TypeError, ValueError):
        return None
