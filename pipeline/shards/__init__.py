"""WebDataset shards: pack an image folder into tar shards (:mod:`.pack`), list them and
read them back (:mod:`.read`); the index and record formats and the readers' errors
live in :mod:`.format`. Everything public is importable from ``pipeline.shards``.
"""

from .format import (
    INDEX_FORMAT,
    INDEX_NAME,
    JSON_LABEL_KEYS,
    READ_IMAGE_EXTS,
    Sample,
    ShardChecksumMismatch,
    ShardCountMismatch,
    ShardError,
    ShardInfo,
    ShardReadError,
    as_int,
)
from .pack import CROP, FOLDER_LABELS_WARNING, FORMAT_EXTS, IMAGE_EXTS, LAYOUTS, REPORT_NAME, PackReport, pack_folder
from .read import iter_samples, list_shards, read_shard, register_fsspec_opener, require_shards

__all__ = [
    "CROP", "FOLDER_LABELS_WARNING", "FORMAT_EXTS", "IMAGE_EXTS", "INDEX_FORMAT", "INDEX_NAME", "JSON_LABEL_KEYS", "LAYOUTS",
    "READ_IMAGE_EXTS", "REPORT_NAME", "PackReport", "Sample", "ShardChecksumMismatch", "ShardCountMismatch", "ShardError",
    "ShardInfo", "ShardReadError", "as_int", "iter_samples", "list_shards", "pack_folder", "read_shard",
    "register_fsspec_opener", "require_shards",
]
