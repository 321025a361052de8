"""The shard tasks of the stage kit: read a WebDataset shard and decode/preprocess its images
on CPU tasks, for every stage that runs on shards (extraction, CAMs from shards, training
from images). :func:`shard_parts` submits one shard's read task and its decode tasks and
returns the refs of the decoded parts, which :func:`pipeline.raykit.run_shard_stage` hands
to the stage's actors. A damaged shard or image becomes an error row, never a crash.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .configs import DECODE_PART_ROWS
from .decoders import Decoder
from .fs import StorageOptions

DEFAULT = Decoder()  # pil: today's exact path


def read_shard_rows(row: dict[str, Any], storage_options: StorageOptions = None) -> list[dict[str, Any]]:
    """One source shard -> one row per sample; a damaged shard -> one error row (never a crash)."""
    from .shards.format import ShardInfo
    from .shards.read import read_shard

    info = ShardInfo(
        url=row["url"],
        name=row["name"],
        count=row["count"] if row["count"] >= 0 else None,
        sha256=row.get("sha256") or None,
    )
    try:
        samples = read_shard(info, storage_options=storage_options)
    except Exception as exc:  # count mismatch, cut tar, unreadable object: report the shard
        return [_error_row(row["url"], f"{type(exc).__name__}: {exc}")]
    n = len(samples)
    return [
        {
            "shard": row["url"],
            "index": i,
            "shard_count": n,
            "key": s.key,
            "label": int(s.label),
            "image": s.image,
            "shard_error": "",
        }
        for i, s in enumerate(samples)
    ]


def _error_row(url: str, reason: str) -> dict[str, Any]:
    return {"shard": url, "index": -1, "shard_count": -1, "key": "", "label": -1, "image": b"", "shard_error": reason}


def decode_preprocess(
    batch: dict[str, np.ndarray], preprocessing: Any, views: Sequence[str], decoder: Decoder = DEFAULT
) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> RGB -> resize/crop per view -> uint8 pixels (lossless: ToTensor is k/255);
    no torch in the process for the PIL decoders.

    ``decoder``: resolved by the stage (:func:`pipeline.decoders.resolve_decoder`), so the
    cache's identity names what these tasks run; it decodes the part's images as one batch."""
    from .images import error_text

    n = len(batch["key"])
    crop = preprocessing.crop
    pixels = np.zeros((n, len(views), 3, crop, crop), dtype=np.uint8)
    errors = np.array(batch["shard_error"], dtype=object)
    todo = [i for i in range(n) if not errors[i]]
    centres = decoder.pixels([batch["image"][i] for i in todo], preprocessing)
    for i, centre in zip(todo, centres):
        if isinstance(centre, Exception):  # DecodeError and anything PIL raises on odd files
            errors[i] = f"decode: {error_text(centre)}"
            continue
        for v, name in enumerate(views):
            pixels[i, v] = centre if name == "center" else centre[..., ::-1]
    out = {k: batch[k] for k in ("shard", "index", "shard_count", "key", "label")}
    out["pixels"] = pixels
    out["error"] = errors.astype(str)
    return out


def read_parts(item: dict[str, Any], storage_options: StorageOptions, parts: int) -> Any:
    """CPU task: one shard's rows in ``parts`` lists (one Ray return each); a damaged shard's
    error row goes in the first."""
    rows = read_shard_rows(item, storage_options)
    if parts == 1:
        return rows
    if rows and int(rows[0]["index"]) < 0:
        return [rows] + [[] for _ in range(parts - 1)]
    size = math.ceil(len(rows) / parts)
    return [rows[i * size : (i + 1) * size] for i in range(parts)]


def decode_part(
    rows: list[dict[str, Any]], preprocessing: Any, views: Sequence[str], decoder: Decoder = DEFAULT
) -> dict[str, Any]:
    """CPU task: one part's rows -> the columns a worker needs (pixels), or ``shard_error``."""
    if rows and int(rows[0]["index"]) < 0:
        return {"shard_error": rows[0]["shard_error"]}
    if not rows:  # a shard of fewer samples than parts
        crop = preprocessing.crop
        return {
            "key": np.zeros(0, dtype=str),
            "label": np.zeros(0, np.int64),
            "error": np.zeros(0, dtype=str),
            "pixels": np.zeros((0, len(views), 3, crop, crop), np.uint8),
        }
    text = ("shard", "key", "image", "shard_error")
    batch = {
        k: np.array([r[k] for r in rows], dtype=object if k in text else np.int64)
        for k in (*text, "index", "shard_count", "label")
    }
    out = decode_preprocess(batch, preprocessing, views, decoder)
    return {
        "key": out["key"].astype(str),
        "label": out["label"].astype(np.int64),
        "error": out["error"],
        "pixels": out["pixels"],
    }


@dataclass(frozen=True)
class RawPart:
    """A part of a shard read but not decoded: the model's actor decodes it itself
    (``--decode-on actor``: on its GPU, nvJPEG), :meth:`pipeline.raykit.ShardWorker.run_parts`."""

    rows: Any  # the ObjectRef of :func:`read_parts`' rows for this part (stays a ref: nested)
    preprocessing: Any
    views: tuple[str, ...]
    decoder: Decoder

    def decode(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return decode_part(rows, self.preprocessing, self.views, self.decoder)


@functools.lru_cache(maxsize=None)
def _remote(fn: Any) -> Any:
    """One remote function per task function and process: Ray exports each once, not per shard."""
    import ray

    # Half a CPU each: two decode tasks per core overlap their I/O waits and the actor's forward.
    return ray.remote(num_cpus=0.5)(fn)


def shard_parts(
    item: dict[str, Any],
    *,
    storage_options: StorageOptions,
    preprocessing: Any,
    views: Sequence[str],
    part_rows: int = DECODE_PART_ROWS,
    decoder: Decoder = DEFAULT,
    in_actor: bool = False,
) -> list[Any]:
    """Submit the read and decode tasks of one shard; the refs of its decoded parts (driver
    side), or with ``in_actor`` the read tasks only and their parts as :class:`RawPart`."""
    count = int(item["count"])
    parts = max(1, math.ceil(count / part_rows)) if count > 0 else 1  # index-less: one part
    refs = _remote(read_parts).options(num_returns=parts).remote(item, storage_options, parts)
    refs = [refs] if parts == 1 else refs
    if in_actor:
        return [RawPart(r, preprocessing, tuple(views), decoder) for r in refs]
    return [_remote(decode_part).remote(r, preprocessing, tuple(views), decoder) for r in refs]
