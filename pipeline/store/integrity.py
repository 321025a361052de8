"""A store's integrity: the chunk checksum (Zarr v3's crc32c codec after zstd), the damage
errors every reader raises instead of returning values it cannot trust, the verify/repair
report, and :class:`KeyOwners`, which keeps keys unique across a store's shards.
Used by :mod:`pipeline.store.layer` and its subclasses."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import UserError
from .identity import shard_id_for

CHUNK_CHECKSUM = "crc32c"  # root attrs "chunk_checksum" of stores made since checksums were added


def default_compressors(checksum: str | None = CHUNK_CHECKSUM) -> list:
    """zstd level 1: best ratio and fastest decode on real features (benchmarks/RESULTS.md);
    then a crc32c of the compressed bytes, so a changed bit is a read error, never a value."""
    return [ZstdCodec(level=1)] + ([Crc32cCodec()] if checksum == "crc32c" else [])


class StoreDamaged(UserError):
    """A done shard's group lost objects (a chunk, an array, the group) or holds unreadable ones.

    Zarr reads a missing chunk as its fill value; readers must never see those zeros,
    so every group is checked against its chunk set when first opened, and decode errors
    are turned into this. The message names the shard and the commands that repair it.
    """


class ManifestDamaged(UserError):
    """``manifest.json`` exists but cannot be read (empty, truncated, not a manifest).

    The manifest can be derived from the store (every complete group names its source and
    count), so the message names ``lcam cache repair``, which rebuilds it.
    """


@dataclass
class VerifyReport:
    """Outcome of a store's verify or repair; ``problems`` empty means ok."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0
    chunks_read: int = 0
    damaged: list[str] = field(default_factory=list)  # source URLs of done shards with problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "shards": self.shards,
            "rows": self.rows,
            "chunks_read": self.chunks_read,
            "damaged": self.damaged,
        }


def _key_hashes(keys: Sequence[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys], dtype=np.uint64
    )


class KeyOwners:
    """Which done shard holds each key, to refuse a shard that repeats another's key when it
    is committed (not later, in verify). 12 bytes a key (a 64-bit hash and a shard number,
    sorted numpy arrays): 15 MB for ImageNet's 1.28M; a hash hit is confirmed on the keys."""

    def __init__(self, store: Any) -> None:  # a pipeline.store.layer.ShardedStore
        self.store, self.urls = store, []  # type: list[str]
        self.hashes, self.owner = np.zeros(0, np.uint64), np.zeros(0, np.int32)
        entries = store.entries()
        with ThreadPoolExecutor(16) as pool:  # one small read per done shard, once per run
            for e, keys in zip(entries, pool.map(lambda e: store.group_keys(e["shard_id"]), entries)):
                self._add(e["url"], keys)

    def _add(self, url: str, keys: Sequence[str]) -> None:
        self.urls.append(url)
        hashes = np.concatenate([self.hashes, _key_hashes(keys)])
        owner = np.concatenate([self.owner, np.full(len(keys), len(self.urls) - 1, np.int32)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.owner = hashes[order], owner[order]

    def clash(self, url: str, keys: Sequence[str]) -> str | None:
        """Why shard ``url`` may not be added (a key another shard holds), or None (then it is added)."""
        new = _key_hashes(keys)
        at = np.searchsorted(self.hashes, new)
        for i in np.flatnonzero(at < len(self.hashes)):
            if self.hashes[at[i]] == new[i] and self.urls[self.owner[at[i]]] != url:
                other = self.urls[self.owner[at[i]]]
                sid = self.store.manifest["shards"].get(other, {}).get("shard_id") or shard_id_for(other)
                if keys[i] in self.store.group_keys(sid):
                    return f"duplicate key {keys[i]!r}: shard {other} already holds it; keys must be unique across the dataset (rename or drop one)"
        self._add(url, keys)
        return None
