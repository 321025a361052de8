"""Feature cache: last-conv feature maps F of a frozen backbone in a Zarr v3 store.

Layout at URL (local path, s3://, gs://, any fsspec URL)::

    zarr.json        root group; attrs {"format", "identity", "fingerprint"}
    manifest.json    written by the driver only, atomically (which shards are done)
    shards/<id>/     one group per source shard, written by ONE task; attrs {"source", "keys", "count"}
        features     (n, V, C, h, w)  float16 | float32 | bfloat16 (stored as uint16 bits)
        labels       (n,) int32, -1 = no label
        top5_classes (n, 5) int32;  top5_probs (n, 5) float32
        logits       (n, K) float16, only with store_logits

Why this shape: every chunk object has exactly one writer (the task that owns the
shard), a re-run task rewrites its group identically, and the only shared mutable
object (manifest.json) has a single writer (the driver). A shard counts as done only
once it is in the manifest; a group without a manifest entry is left-over work.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zsync

from .errors import UserError
from .fs import StorageOptions, get_fs, is_local, join, write_json_atomic

FORMAT = "lcam-feature-cache/1"
DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}  # name -> stored numpy dtype
DEFAULT_CHUNK_ROWS = 64  # 64 x 1280x7x7 float16 = 8 MB raw per view, ~1 MB compressed: a good object size
TOP_K = 5


def default_compressors() -> list:
    """zstd level 1: best ratio and fastest decode on real features (benchmarks/RESULTS.md)."""
    return [ZstdCodec(level=1)]


class CacheMismatch(UserError):
    """A cache exists at the URL but was made for other features (another fingerprint)."""


class CacheNotFound(UserError):
    """No feature cache at the URL."""


class StoreDamaged(UserError):
    """A done shard's group lost objects (a chunk, an array, the group) or holds unreadable ones.

    Zarr reads a missing chunk as its fill value; readers must never see those zeros,
    so every group is checked against its chunk set when first opened, and decode errors
    are turned into this. The message names the shard and the commands that repair it.
    """


class NonFiniteFeatures(UserError):
    """Features hold NaN/Inf after casting to the cache dtype (e.g. float16 overflow)."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def canonical(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so a stored identity equals a recomputed one."""
    return json.loads(json.dumps(obj, sort_keys=True))


def fingerprint_of(identity: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the canonical JSON; same recipe as lcam's backbone_fingerprint."""
    return hashlib.sha256(json.dumps(canonical(identity), sort_keys=True).encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable list of dotted fields that differ between two identities."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))

    def short(v: Any) -> str:
        s = json.dumps(v) if v is not None else "(absent)"
        return s if len(s) <= 60 else s[:57] + "..."

    return [f"{k}: cache has {short(a.get(k))}, requested {short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _normalize_source(source_url: str) -> str:
    return source_url[len("file://") :] if source_url.startswith("file://") else source_url


def shard_id_for(source_url: str) -> str:
    """Readable, path-safe, deterministic: ``<basename without .tar>-<8 hex of the full URL>``.

    The hash keeps ``a/shard-000000.tar`` and ``b/shard-000000.tar`` apart.
    """
    url = _normalize_source(source_url)
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:80] or "shard"
    return f"{base}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_storage(features: Any, dtype: str) -> np.ndarray:
    """Cast to the stored numpy dtype; bfloat16 goes through torch (round to nearest even)."""
    if dtype == "bfloat16":
        import torch

        t = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return t.detach().cpu().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if hasattr(features, "detach"):  # torch tensor (possibly bf16, which numpy lacks)
        features = features.detach().cpu().float().numpy()
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported by the caller with advice
        return np.ascontiguousarray(features, dtype=DTYPES[dtype])


def _finite_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row bool: all values finite. Works on the stored representation."""
    flat = stored.reshape(len(stored), int(np.prod(stored.shape[1:])))
    if dtype == "bfloat16":
        return ~((flat & 0x7F80) == 0x7F80).any(axis=1)  # exponent all ones = Inf/NaN
    return np.isfinite(flat).all(axis=1)


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(kind: str, url: str, storage_options: StorageOptions, extra: Any, make: Any) -> Any:
    """One client per process and (url, options): every unpickled cache in a Ray worker
    (one per task) would otherwise build a new S3 client, ~1 s of CPU each."""
    key = (os.getpid(), kind, url, json.dumps(storage_options or {}, sort_keys=True, default=str), extra)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


def make_zarr_store(url: str, storage_options: StorageOptions, read_only: bool) -> Any:
    from zarr.storage import FsspecStore, LocalStore

    if "://" not in url or url.startswith("file://"):
        return LocalStore(_normalize_source(url), read_only=read_only)
    return _shared("zarr", url, storage_options, read_only, lambda: FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only))


@dataclass
class VerifyReport:
    """Outcome of :meth:`FeatureCache.verify`; ``problems`` empty means ok."""

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
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "shards": self.shards, "rows": self.rows, "chunks_read": self.chunks_read, "damaged": self.damaged}


class ShardedStore:
    """What the feature cache and the CAM store share: a Zarr v3 root with one group per
    source shard (one writer each) and ``manifest.json``, which records the shards that are
    done and is written by the driver only. Picklable: ships to Ray tasks as URL + options,
    handles reopen lazily."""

    FORMAT = FORMAT
    KIND = "feature cache"
    _TRANSIENT: tuple[str, ...] = ("_store", "_fs_path", "_sorted")  # sockets, event loops, derived
    manifest_found: bool = True  # False when opened without a manifest.json (lost, or none yet)

    url: str
    storage_options: dict[str, Any]
    fingerprint: str
    writable: bool
    _manifest: dict[str, Any]

    def _init_handles(self) -> None:
        self._store: Any = None
        self._fs_path: tuple[Any, str] | None = None
        self._sorted: tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def _fs(self) -> tuple[Any, str]:
        """(filesystem, root path), made once: a new S3 client per metadata read is slow."""
        if self._fs_path is None:
            self._fs_path = connect_fs(self.url, self.storage_options)
        return self._fs_path

    def _read_json(self, *parts: str) -> Any:
        fs, root = self._fs()
        return read_json_fs(fs, "/".join([root, *parts]))

    def _zstore(self) -> Any:
        if self._store is None:
            self._store = make_zarr_store(self.url, self.storage_options, read_only=not self.writable)
        return self._store

    def _group_attrs(self, sid: str) -> dict[str, Any] | None:
        return (self._read_json("shards", sid, "zarr.json") or {}).get("attributes")

    # ---- damage: what readers must refuse
    def repair_hint(self, source_url: str) -> str:
        """The commands that rebuild one shard (subclasses name the re-run command)."""
        return f"`lcam cache repair {self.url}` (forgets damaged shards), then re-run the command that made this {self.KIND}"

    def damaged(self, entry: Mapping[str, Any], what: str) -> StoreDamaged:
        return StoreDamaged(f"{self.KIND} {self.url}: shard {entry['url']} (group shards/{entry['shard_id']}) is damaged: {what}. "
                            f"Re-make that shard: {self.repair_hint(entry['url'])}")

    def open_checked_group(self, entry: Mapping[str, Any], arrays: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        """Open a done shard's group and check it whole before any read: attrs agree with the
        manifest, each array in ``arrays`` exists with ``count`` rows and every chunk object
        is present. One listing of the group's objects (not one per chunk or sample)."""
        sid, count = entry["shard_id"], int(entry["count"])
        try:
            group = zarr.open_group(self._zstore(), path=f"shards/{sid}", mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:  # FileNotFoundError / GroupNotFoundError depending on the store
            raise self.damaged(entry, f"its group is missing or unreadable ({type(exc).__name__})") from None
        if attrs.get("count") != count or len(attrs.get("keys", [])) != count:
            raise self.damaged(entry, f"the manifest says {count} rows, the group has count={attrs.get('count')} and {len(attrs.get('keys', []))} keys")
        fs, root = self._fs()
        prefix = f"{root}/shards/{sid}/"
        try:
            present = {p[len(prefix):] for p in fs.find(prefix.rstrip("/")) if p.startswith(prefix)}
        except FileNotFoundError:
            present = set()
        opened: dict[str, Any] = {}
        for name in arrays:
            try:
                arr = group[name]
            except KeyError:
                raise self.damaged(entry, f"array {name} is missing") from None
            if arr.shape[:1] != (count,):
                raise self.damaged(entry, f"array {name} has shape {arr.shape}, expected {count} rows")
            lost = [c for c in np.ndindex(*arr.cdata_shape) if f"{name}/{arr.metadata.encode_chunk_key(c)}" not in present]
            if lost:
                raise self.damaged(entry, f"{len(lost)} of {arr.nchunks} chunk objects of {name} are missing (first: chunk {lost[0][0]}, rows from {lost[0][0] * arr.chunks[0]})")
            opened[name] = arr
        return group, {"attrs": attrs, "arrays": opened}

    def read_array(self, entry: Mapping[str, Any], name: str, arr: Any, rows: slice) -> np.ndarray:
        """``arr[rows]``, a truncated or corrupt chunk object raised as :class:`StoreDamaged`."""
        try:
            return arr[rows]
        except Exception as exc:  # zstd/codec errors, short reads: the object is damaged
            raise self.damaged(entry, f"array {name}, rows {rows.start}-{rows.stop}: a chunk object is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None

    def failed(self) -> dict[str, dict[str, Any]]:
        """Shards whose last attempt failed (url -> {reason, at}); a later run retries them."""
        return dict(self._manifest.get("failed", {}))

    def mark_failed(self, failures: Mapping[str, str]) -> None:
        """Record shards that failed (url -> reason), driver only: `verify` and `info` list them."""
        if not failures:
            return
        manifest = self.refresh()
        for url, reason in failures.items():
            manifest.setdefault("failed", {})[url] = {"reason": str(reason), "at": utc_now()}
        self._save_manifest(manifest)

    def check_shard(self, entry: Mapping[str, Any]) -> None:
        """Read one done shard whole; raise :class:`StoreDamaged` if it cannot be (subclasses)."""
        raise NotImplementedError

    def repair(self, *, workers: int = 4) -> tuple[VerifyReport, list[str]]:
        """Check every done shard, forget the damaged ones so the next run re-makes them."""
        self.refresh()
        report = VerifyReport()
        for e in self._index()[0]:
            report.shards += 1
            try:
                self.check_shard(e)
            except StoreDamaged as exc:
                report.problems.append(str(exc))
                report.damaged.append(e["url"])
        return report, self.forget(report.damaged) if report.damaged else []

    # ---- leases: say when two runs write into one store (each still writes every shard correctly)
    def take_lease(self, info: Mapping[str, Any]) -> str:
        """Announce a running writer (``leases/<id>.json``); :meth:`drop_lease` when done."""
        import socket
        import uuid

        lease = uuid.uuid4().hex[:12]
        fs, root = self._fs()
        body = {"host": socket.gethostname(), "pid": os.getpid(), "started": utc_now(), **dict(info)}
        if is_local(fs):
            fs.makedirs(f"{root}/leases", exist_ok=True)
        fs.pipe_file(f"{root}/leases/{lease}.json", json.dumps(body).encode())
        return lease

    def drop_lease(self, lease: str) -> None:
        fs, root = self._fs()
        try:
            fs.rm_file(f"{root}/leases/{lease}.json")
        except FileNotFoundError:
            pass

    def other_leases(self) -> list[dict[str, Any]]:
        """Leases of other writers; those of dead processes on this host are removed."""
        import socket

        fs, root = self._fs()
        try:
            paths = fs.find(f"{root}/leases")
        except FileNotFoundError:
            return []
        out = []
        for path in sorted(paths):
            info = read_json_fs(fs, path) or {}
            if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
                try:  # killed on this machine: its lease means nothing any more
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass
                continue
            out.append(info)
        return out

    def forget(self, urls: Sequence[str]) -> list[str]:
        """Drop shards from the manifest (readers stop seeing them; the next run remakes them)."""
        manifest = self.refresh()
        dropped = [u for u in urls if manifest["shards"].pop(u, None) is not None]
        self._save_manifest(manifest)
        return dropped

    # ---- manifest (driver only)
    def with_manifest_found(self, found: bool) -> "ShardedStore":
        self.manifest_found = found
        return self

    def refresh(self) -> dict[str, Any]:
        """Re-read manifest.json (another process may have advanced it)."""
        found = self._read_json("manifest.json")
        self.manifest_found = bool(found)
        self._manifest = found or new_manifest(self.fingerprint, self.FORMAT)
        self._sorted = None
        return self._manifest

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def done_sources(self) -> set[str]:
        return set(self._manifest.get("shards", {}))

    def mark_done(self, entries: Sequence[Mapping[str, Any]], *, check: bool = True) -> None:
        """Record finished shards (entries from ``write_shard``, plus ``skipped``).

        Driver only: read-modify-write of manifest.json with an atomic replace. With
        ``check``, each group must be complete (attrs written, count agrees) first.
        """
        manifest = self.refresh()
        for e in entries:
            url, sid, count = e["url"], e.get("shard_id") or shard_id_for(e["url"]), int(e["count"])
            if check:
                attrs = self._group_attrs(sid)
                if attrs is None or attrs.get("count") != count or len(attrs.get("keys", [])) != count:
                    raise RuntimeError(f"shard {url} ({sid}) is not completely written (group attrs {attrs and {k: attrs.get(k) for k in ('count', 'source')}}, entry count {count}); not marking it done")
            manifest["shards"][url] = {
                "url": url,
                "shard_id": sid,
                "count": count,
                "skipped": [{"key": str(s.get("key")), "reason": str(s.get("reason"))} for s in e.get("skipped", [])],
                "seconds": float(e.get("seconds", 0.0)),
                "finished_at": e.get("finished_at") or utc_now(),
                **({"labels_scheme": e["labels_scheme"]} if e.get("labels_scheme") else {}),
            }
            manifest.get("failed", {}).pop(url, None)
            if e.get("expected_count") is not None:  # recorded with the commit: verify is right after any interruption
                manifest.setdefault("expected_counts", {})[url] = int(e["expected_count"])
        self._save_manifest(manifest)

    def _save_manifest(self, manifest: dict[str, Any]) -> None:
        if not self.writable:
            raise PermissionError(f"{self.KIND} opened read-only")
        manifest["updated"] = utc_now()
        manifest["versions"] = dict(_versions())
        fs, root = self._fs()
        if is_local(fs):
            write_json_atomic(join(self.url, "manifest.json"), manifest, self.storage_options)
        else:  # one PUT is atomic on object stores (as in write_bytes_atomic), on the cached client
            fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._manifest = manifest
        self._sorted = None

    # Dimension names of every array a group may hold: written into each array's zarr.json
    # (zarr v3 ``dimension_names``), so xarray and other Zarr readers label the axes.
    DIMENSIONS: dict[str, tuple[str, ...]] = {}

    def write_group(self, sid: str, arrays: Mapping[str, tuple[np.ndarray, Any, int]], attrs: dict[str, Any]) -> None:
        """Write one shard group whole: ``arrays`` name -> (data, fill value, chunk rows).

        The one writer of a group (one task per source shard). ``mode="w"`` deletes the old
        group first, so a re-run never leaves stale chunks behind; every chunk object is
        written even if all fill (verify can tell a lost object from data); the group's
        attributes come last: a group with ``keys`` is complete."""
        zsync(self._write_group(sid, arrays, attrs))

    async def _write_group(self, sid: str, arrays: Mapping[str, tuple[np.ndarray, Any, int]], attrs: dict[str, Any]) -> None:
        group = await zarr_async.open_group(self._zstore(), path=f"shards/{sid}", mode="w")

        async def one(name: str, data: np.ndarray, fill: Any, chunk_rows: int) -> None:
            dims = self.DIMENSIONS.get(name)
            arr = await group.create_array(
                name,
                shape=data.shape,
                chunks=(chunk_rows, *data.shape[1:]),
                dtype=data.dtype,
                compressors=default_compressors(),
                fill_value=fill,
                dimension_names=dims if dims is not None and len(dims) == data.ndim else None,
                config={"write_empty_chunks": True},
            )
            if len(data):
                await arr.setitem(slice(None), data)

        # Arrays concurrently: on object stores each is a few round trips.
        await asyncio.gather(*(one(name, *spec) for name, spec in arrays.items()))
        await group.update_attributes(attrs)  # last: a group with keys is complete

    def _index(self) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Done shards sorted by source URL (the deterministic order), and by shard id."""
        if self._sorted is None:  # cached: readers ask per shard, stores hold thousands
            shards = self._manifest.get("shards", {})
            entries = [shards[u] for u in sorted(shards)]
            self._sorted = (entries, {e["shard_id"]: e for e in entries})
        return self._sorted

    def shard_ids(self) -> list[str]:
        return [e["shard_id"] for e in self._index()[0]]


class FeatureCache(ShardedStore):
    """One feature cache. Picklable (ships to Ray tasks as URL + options; handles reopen lazily)."""

    DIMENSIONS = {
        "features": ("sample", "view", "channel", "y", "x"), "labels": ("sample",),
        "top5_classes": ("sample", "rank"), "top5_probs": ("sample", "rank"), "logits": ("sample", "class"),
    }

    def __init__(
        self,
        url: str,
        root_attrs: Mapping[str, Any],
        manifest: Mapping[str, Any],
        storage_options: StorageOptions = None,
        writable: bool = False,
        fs: tuple[Any, str] | None = None,
    ) -> None:
        """Use :meth:`create_or_open` or :meth:`open`; ``fs`` reuses an already made client."""
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.identity: dict[str, Any] = dict(root_attrs["identity"])
        self.fingerprint: str = root_attrs["fingerprint"]
        layout = self.identity["cache"]
        self.dtype: str = layout["dtype"]
        self.views: tuple[str, ...] = tuple(layout["views"])
        self.feature_shape: tuple[int, int, int] = tuple(layout["feature_shape"])
        self.chunk_rows: int = int(layout["chunk_rows"])
        self.store_logits: bool = bool(layout["store_logits"])
        self.num_classes: int = int(layout["num_classes"])
        self.writable = writable
        self._manifest: dict[str, Any] = dict(manifest)
        self.manifest_found = bool(manifest)
        self._init_handles()
        self._fs_path = fs

    # ---- pickling: drop stores and open handles, they hold event loops and sockets
    _TRANSIENT = ShardedStore._TRANSIENT + ("_handles", "_lock")

    def _init_handles(self) -> None:
        super()._init_handles()
        self._handles: OrderedDict[str, _ShardHandle] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeatureCache({self.url!r}, fingerprint={self.fingerprint}, shards={len(self._manifest.get('shards', {}))})"

    # ---- opening
    @classmethod
    def create_or_open(
        cls,
        url: str,
        identity: Mapping[str, Any],
        *,
        feature_shape: Sequence[int],
        views: Sequence[str] = ("center",),
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        store_logits: bool = False,
        num_classes: int = 1000,
        storage_options: StorageOptions = None,
    ) -> "FeatureCache":
        """Open the cache at ``url`` for writing, creating it if absent (driver only).

        Refuses (:class:`CacheMismatch`) a cache made for other features: never mixes them.
        """
        if dtype not in DTYPES:
            raise UserError(f"cache dtype {dtype!r} not supported; choose one of {', '.join(DTYPES)}")
        if len(tuple(feature_shape)) != 3:
            raise ValueError(f"feature_shape must be (C, h, w), got {tuple(feature_shape)}")
        if not views or len(set(views)) != len(views):
            raise ValueError(f"views must be distinct names, got {list(views)}")
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if "feature_shape" in identity and list(identity["feature_shape"]) != list(feature_shape):
            raise ValueError(f"identity says feature_shape {identity['feature_shape']}, caller passed {list(feature_shape)}")
        full = canonical(dict(identity))
        full["cache"] = {
            "dtype": dtype,
            "views": list(views),
            "feature_shape": [int(s) for s in feature_shape],
            "chunk_rows": int(chunk_rows),
            "store_logits": bool(store_logits),
            "num_classes": int(num_classes),
        }
        fp = fingerprint_of(full)
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        attrs = _read_root_attrs(fs, root, url)
        if attrs is not None:
            if attrs.get("fingerprint") != fp:
                diff = identity_diff(attrs.get("identity", {}), full)
                raise CacheMismatch(
                    f"a feature cache already exists at {url} for other features (fingerprint {attrs.get('fingerprint')}, "
                    f"requested {fp}). Differing fields:\n  " + "\n  ".join(diff or ["(identities equal; fingerprint recipe changed)"])
                    + f"\nUse another cache URL for these features, or delete the existing cache ({url}) to rebuild it."
                )
            manifest = read_json_fs(fs, f"{root}/manifest.json") or new_manifest(fp)
            return cls(url, attrs, manifest, storage_options, writable=True, fs=(fs, root))

        if fs.exists(root) and fs.ls(root):
            raise UserError(f"{url} exists and holds files but no feature cache (no zarr.json); pick an empty or new location")
        attrs = {"format": FORMAT, "identity": full, "fingerprint": fp}
        store = make_zarr_store(url, storage_options, read_only=False)
        zarr.open_group(store, mode="w", attributes=attrs)
        zarr.open_group(store, path="shards", mode="w")
        cache = cls(url, attrs, new_manifest(fp), storage_options, writable=True, fs=(fs, root))
        cache._save_manifest(cache.manifest)
        return cache

    @classmethod
    def open(cls, url: str, storage_options: StorageOptions = None, writable: bool = False) -> "FeatureCache":
        """Open read-only (training, CAMs, info, verify); ``writable`` for manifest edits (repair)."""
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        attrs = _read_root_attrs(fs, root, url)
        if attrs is None:
            raise CacheNotFound(f"no feature cache at {url} (no zarr.json with format {FORMAT}); build one with the extraction step first")
        manifest = read_json_fs(fs, f"{root}/manifest.json") or {}  # {}: lost (verify reports it)
        return cls(url, attrs, manifest or new_manifest(attrs["fingerprint"]), storage_options, writable=writable, fs=(fs, root)).with_manifest_found(bool(manifest))

    # ---- writing (one task per source shard)
    def write_shard(
        self,
        source_url: str,
        keys: Sequence[str],
        labels: Any,
        features: Any,
        top5_classes: Any,
        top5_probs: Any,
        logits: Any = None,
    ) -> dict[str, Any]:
        """Write all rows of one source shard into its own group, replacing whatever was there.

        Deterministic: re-running after a crash produces identical objects. Data arrays
        first, group attrs (keys, count) last, so a group with ``keys`` is complete.
        Returns the manifest entry for :meth:`mark_done`.
        """
        if not self.writable:
            raise PermissionError("cache opened read-only; use FeatureCache.create_or_open to write")
        t0 = time.perf_counter()
        keys = [str(k) for k in keys]
        n = len(keys)
        if len(set(keys)) != n:
            dup = [k for k, c in Counter(keys).items() if c > 1][:5]
            raise ValueError(f"duplicate keys within shard {source_url}: {dup}")
        V, (C, h, w) = len(self.views), self.feature_shape
        feats = _to_storage(features, self.dtype)
        if feats.ndim == 4 and V == 1:
            feats = feats[:, None]
        if feats.shape != (n, V, C, h, w):
            raise ValueError(f"features of {source_url} have shape {feats.shape}, expected {(n, V, C, h, w)} (rows, views {list(self.views)}, C, h, w)")
        bad = ~_finite_rows(feats, self.dtype)
        if bad.any():
            bad_keys = [keys[i] for i in np.flatnonzero(bad)[:5]]
            raise NonFiniteFeatures(
                f"{int(bad.sum())} rows of {source_url} have NaN/Inf features after casting to {self.dtype} (e.g. {bad_keys}); "
                + ("values beyond float16's range (65504) overflow: use dtype bfloat16 or float32" if self.dtype == "float16" else "check the backbone and the images")
            )
        arrays: dict[str, tuple[np.ndarray, int | float]] = {
            "features": (feats, 0),
            "labels": (_rows(labels, (n,), np.int32, "labels"), -1),
            "top5_classes": (_rows(top5_classes, (n, TOP_K), np.int32, "top5_classes"), -1),
            "top5_probs": (_rows(top5_probs, (n, TOP_K), np.float32, "top5_probs"), 0.0),
        }
        if self.store_logits:
            if logits is None:
                raise ValueError("this cache stores logits (store_logits=True); pass logits")
            arrays["logits"] = (_rows(logits, (n, self.num_classes), np.float16, "logits"), 0.0)

        sid = shard_id_for(source_url)
        self.write_group(sid, {k: (data, fill, self.chunk_rows) for k, (data, fill) in arrays.items()},
                         {"source": source_url, "keys": keys, "count": n})
        with self._lock:
            self._handles.pop(sid, None)
        return {"url": source_url, "shard_id": sid, "count": n, "skipped": [], "seconds": round(time.perf_counter() - t0, 3), "finished_at": utc_now()}

    def record_counts(self, counts: Mapping[str, int]) -> None:
        """Remember how many samples each source shard holds (for shards without an index)."""
        manifest = self.refresh()
        manifest.setdefault("expected_counts", {}).update({k: int(v) for k, v in counts.items()})
        self._save_manifest(manifest)

    # ---- reading
    def _entries(self) -> list[dict[str, Any]]:
        """Done shards in deterministic order: sorted by source URL."""
        return self._index()[0]

    def num_rows(self, shard_id: str) -> int:
        try:
            return int(self._index()[1][shard_id]["count"])
        except KeyError:
            raise KeyError(f"shard {shard_id!r} is not in the manifest of {self.url}") from None

    def folder_labelled_shards(self) -> list[str]:
        """Done shards whose labels are class-folder indices 0..N-1 (not the classifier's classes)."""
        return [e["url"] for e in self._entries() if e.get("labels_scheme") == "folders"]

    def num_chunks(self, shard_id: str) -> int:
        return math.ceil(self.num_rows(shard_id) / self.chunk_rows)

    def __len__(self) -> int:
        return sum(int(e["count"]) for e in self._entries())

    def _array_names(self) -> list[str]:
        return ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if self.store_logits else [])

    def repair_hint(self, source_url: str) -> str:
        ident = self.identity
        extract = f"lcam extract {source_url} {self.url} --backbone {ident.get('backbone')} --weights {ident.get('weights')} --views {','.join(self.views)} --dtype {self.dtype}"
        return f"`lcam cache repair {self.url}` (forgets damaged shards), then `{extract}{' --logits' if self.store_logits else ''}`"

    def _handle(self, sid: str) -> "_ShardHandle":
        """Open shard group and arrays, LRU-cached: each open costs metadata GETs on S3.

        Opening checks the group whole (:meth:`open_checked_group`): a lost chunk object
        would otherwise read as zeros."""
        with self._lock:
            if sid in self._handles:
                self._handles.move_to_end(sid)
                return self._handles[sid]
        try:
            entry = self._index()[1][sid]
        except KeyError:
            raise KeyError(f"shard {sid!r} is not in the manifest of {self.url}") from None
        group, checked = self.open_checked_group(entry, self._array_names())
        handle = _ShardHandle(checked["attrs"], group, entry)
        handle.arrays.update(checked["arrays"])
        with self._lock:
            self._handles[sid] = handle
            while len(self._handles) > 256:  # bounded: each holds that shard's keys
                self._handles.popitem(last=False)
        return handle

    def read_chunk(self, shard_id: str, chunk_index: int, *, fields: Sequence[str] | None = None, raw: bool = False) -> dict[str, Any]:
        """Whole chunk ``chunk_index`` of a shard: ``keys`` (list) and numpy arrays.

        ``features`` (rows, V, C, h, w) in the stored dtype (float16/float32); bfloat16
        is decoded to float32 unless ``raw`` (then its uint16 bits). ``fields`` limits
        which arrays are read.
        """
        handle = self._handle(shard_id)
        attrs = handle.attrs
        n = int(attrs["count"])
        lo = chunk_index * self.chunk_rows
        if not 0 <= lo < n:
            raise IndexError(f"chunk {chunk_index} out of range for shard {shard_id} ({n} rows, chunk_rows {self.chunk_rows})")
        hi = min(lo + self.chunk_rows, n)
        names = ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if self.store_logits else [])
        out: dict[str, Any] = {"keys": list(attrs["keys"][lo:hi])}
        for name in names if fields is None else [f for f in fields if f != "keys"]:
            data = self.read_array(handle.entry, name, handle.array(name), slice(lo, hi))
            if name == "features" and self.dtype == "bfloat16" and not raw:
                data = bf16_to_f32(data)
            out[name] = data
        return out

    def iter_rows(self, batch_size: int = 64, *, shard_ids: Sequence[str] | None = None, view: int | None = None) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
        """Batches ``(keys, features float32, labels int64, top1 int64)`` in shard order, row order.

        Batches run across shard boundaries; the last may be short. features are
        (B, V, C, h, w), or (B, C, h, w) when ``view`` picks one view.
        """
        pend: list[dict[str, Any]] = []
        pending = 0
        for sid in self.shard_ids() if shard_ids is None else shard_ids:
            for ci in range(self.num_chunks(sid)):
                pend.append(self.read_chunk(sid, ci, fields=["features", "labels", "top5_classes"]))
                pending += len(pend[-1]["keys"])
                while pending >= batch_size:
                    batch, pend, pending = _take(pend, batch_size)
                    yield _finish_batch(batch, view)
        if pending:
            batch, pend, pending = _take(pend, pending)
            yield _finish_batch(batch, view)

    # ---- reporting
    def raw_bytes_per_row(self) -> int:
        V, (C, h, w) = len(self.views), self.feature_shape
        item = 4 if self.dtype == "float32" else 2
        return V * C * h * w * item + 4 + TOP_K * 4 * 2 + (self.num_classes * 2 if self.store_logits else 0)

    def _lost_chunks(self, entry: Mapping[str, Any], present: set[str]) -> list[str]:
        """Chunk objects of a done shard absent from ``present`` (keys below shards/), from the
        layout alone: chunks of ``chunk_rows`` rows, whole along every other axis."""
        sid, n = entry["shard_id"], int(entry["count"])
        ndims = {"features": 5, "labels": 1, "top5_classes": 2, "top5_probs": 2, "logits": 2}
        lost = []
        for name in self._array_names():
            if f"{sid}/{name}/zarr.json" not in present:
                lost.append(f"{name}/zarr.json")
                continue
            for i in range(math.ceil(n / self.chunk_rows)):
                key = f"{name}/c/" + "/".join([str(i)] + ["0"] * (ndims[name] - 1))
                if f"{sid}/{key}" not in present:
                    lost.append(key)
        return lost

    def info(self, expected_sources: Sequence[str] | None = None) -> dict[str, Any]:
        """Identity, sizes and progress. ``expected_sources``: list shards not done yet."""
        entries = self._entries()
        samples = sum(int(e["count"]) for e in entries)
        fs, path = self._fs()
        try:  # one listing gives the size on disk and the chunk objects present
            objects = fs.find(path, detail=True)
        except FileNotFoundError:
            objects = {}
        on_disk = sum(int(o.get("size") or 0) for o in objects.values())
        raw = samples * self.raw_bytes_per_row()
        prefix = f"{path}/shards/"
        present = {p[len(prefix):] for p in objects if p.startswith(prefix)}
        damaged = {}
        for e in entries:
            lost = self._lost_chunks(e, present)
            if lost:
                damaged[e["url"]] = f"{len(lost)} chunk objects missing (e.g. shards/{e['shard_id']}/{lost[0]})"
        out: dict[str, Any] = {
            "url": self.url,
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "backbone": self.identity.get("backbone"),
            "identity": self.identity,
            "views": list(self.views),
            "dtype": self.dtype,
            "feature_shape": list(self.feature_shape),
            "chunk_rows": self.chunk_rows,
            "samples": samples,
            "shards_done": len(entries),
            "skipped": sum(len(e.get("skipped", [])) for e in entries),
            "failed": self.failed(),
            "damaged": damaged,
            "manifest_found": self.manifest_found,
            "bytes_on_disk": on_disk,
            "raw_bytes": raw,
            "compression_ratio": round(raw / on_disk, 3) if on_disk else 0.0,
            "versions": self._manifest.get("versions", {}),
            "created": self._manifest.get("created"),
            "updated": self._manifest.get("updated"),
        }
        if expected_sources is not None:
            done = self.done_sources()
            out["shards_expected"] = len(expected_sources)
            out["shards_missing"] = [s for s in expected_sources if s not in done]
        return out

    def verify(self, expected: Mapping[str, int] | None = None, *, workers: int = 4) -> VerifyReport:
        """Check the cache against its manifest and (optionally) the expected counts.

        ``expected``: source URL -> number of samples in that source shard (an index);
        defaults to the counts recorded with :meth:`record_counts`. Features are read
        chunk by chunk (memory: ``workers`` chunks), never whole.
        """
        self.refresh()
        report = VerifyReport()
        entries = self._entries()
        if expected is None and self._manifest.get("expected_counts"):
            expected = self._manifest["expected_counts"]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(pool.map(self._verify_shard, entries))
        first: dict[str, str] = {}  # key -> first shard holding it (one str per key, not a list)
        dups: dict[str, list[str]] = {}
        for e, (problems, keys, chunks) in zip(entries, results):
            report.problems.extend(problems)
            if problems:
                report.damaged.append(e["url"])
            report.chunks_read += chunks
            report.shards += 1
            report.rows += len(keys)
            for k in keys:
                sid = first.setdefault(k, e["shard_id"])
                if sid != e["shard_id"]:
                    dups.setdefault(k, [sid]).append(e["shard_id"])
        for k in sorted(dups)[:20]:
            report.problems.append(f"duplicate key {k!r}: appears {len(dups[k])} times (shards {', '.join(dups[k])})")
        if len(dups) > 20:
            report.problems.append(f"... and {len(dups) - 20} more duplicated keys")
        if expected is not None:
            done = {e["url"]: e for e in entries}
            for src in sorted(expected):
                if src not in done:
                    report.problems.append(f"missing shard {src}: not in the cache (expected {expected[src]} samples)")
                    continue
                e = done[src]
                have, skipped = int(e["count"]), len(e.get("skipped", []))
                if have + skipped != int(expected[src]):
                    report.problems.append(f"count mismatch for {src}: cache has {have} rows + {skipped} skipped, expected {expected[src]} samples")
            for src in sorted(set(done) - set(expected)):
                report.problems.append(f"unexpected shard {src}: in the cache but not among the expected shards")
        for url, f in sorted(self.failed().items()):
            report.problems.append(f"failed shard {url}: {f.get('reason')} (at {f.get('at')}); re-run the extraction to retry it")
        orphans = self._orphan_groups({e["shard_id"] for e in entries})
        if not self.manifest_found and orphans:
            report.problems.append(f"manifest.json is missing but {len(orphans)} shard groups exist: the cache lost its record of finished shards; "
                                   "re-run the extraction to rebuild it (every shard is extracted again)")
        else:
            for sid in orphans:
                report.notes.append(f"group shards/{sid} is not in the manifest (left by an interrupted or running extraction; ignored by readers)")
        if report.damaged:
            report.notes.append(f"damaged shards: `lcam cache repair {self.url}` forgets them, then re-run the extraction to re-make them")
        return report

    def _verify_shard(self, e: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
        src, sid, count = e["url"], e["shard_id"], int(e["count"])
        try:
            group = zarr.open_group(self._zstore(), path=f"shards/{sid}", mode="r")
        except Exception as exc:  # FileNotFoundError / GroupNotFoundError depending on the store
            return [f"shard {src}: group shards/{sid} missing or unreadable ({type(exc).__name__})"], [], 0
        attrs = dict(group.attrs)
        problems: list[str] = []
        keys = list(attrs.get("keys", []))
        if "keys" not in attrs:
            problems.append(f"shard {src}: group shards/{sid} is incomplete (no keys attribute; its write did not finish)")
        elif len(keys) != count or attrs.get("count") != count:
            problems.append(f"shard {src}: manifest says {count} rows, group has count={attrs.get('count')} and {len(keys)} keys")
        if len(set(keys)) != len(keys):
            problems.append(f"shard {src}: {len(keys) - len(set(keys))} keys repeated within the shard")
        if attrs.get("source") not in (None, src):
            problems.append(f"shard {src}: group shards/{sid} was written for another source {attrs.get('source')}")
        V, (C, h, w) = len(self.views), self.feature_shape
        shapes = {"features": (count, V, C, h, w), "labels": (count,), "top5_classes": (count, TOP_K), "top5_probs": (count, TOP_K)}
        if self.store_logits:
            shapes["logits"] = (count, self.num_classes)
        arrays = {}
        for name, shape in shapes.items():
            try:
                arrays[name] = group[name]
            except KeyError:
                problems.append(f"shard {src}: array {name} missing")
                continue
            if arrays[name].shape != shape:
                problems.append(f"shard {src}: {name} has shape {arrays[name].shape}, expected {shape}")
            elif arrays[name].nchunks_initialized != arrays[name].nchunks:
                problems.append(f"shard {src}: {name} has {arrays[name].nchunks - arrays[name].nchunks_initialized} of {arrays[name].nchunks} chunk objects missing")
        chunks = 0
        if problems:
            return problems, keys, chunks
        nonfinite: list[int] = []
        try:
            for lo in range(0, count, self.chunk_rows):
                data = arrays["features"][lo : lo + self.chunk_rows]
                chunks += 1
                nonfinite.extend(lo + i for i in np.flatnonzero(~_finite_rows(data, self.dtype)))
                del data
            small = {name: arrays[name][:] for name in arrays if name != "features"}  # decodes every chunk object
        except Exception as exc:  # a truncated or corrupt chunk object
            return [f"shard {src}: a chunk object is unreadable ({type(exc).__name__}: {str(exc)[:120]})"], keys, chunks
        if nonfinite:
            problems.append(f"shard {src}: {len(nonfinite)} rows have NaN/Inf features (e.g. {[keys[i] for i in nonfinite[:5]]})")
        lab = small["labels"]
        if ((lab < -1) | (lab >= self.num_classes)).any():
            problems.append(f"shard {src}: labels outside [-1, {self.num_classes})")
        return problems, keys, chunks

    def repair(self, *, workers: int = 4) -> tuple[VerifyReport, list[str]]:
        """Verify, then forget the damaged shards so the next extraction re-makes them."""
        report = self.verify(workers=workers)
        return report, self.forget(report.damaged) if report.damaged else []

    def _orphan_groups(self, known: set[str]) -> list[str]:
        fs, root = self._fs()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards", detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n != "zarr.json" and n not in known)


# ---- helpers
class _ShardHandle:
    """A shard group's attrs and its arrays, opened once (zarr re-reads metadata per lookup)."""

    def __init__(self, attrs: dict[str, Any], group: Any, entry: Mapping[str, Any]) -> None:
        self.attrs = attrs
        self.group = group
        self.entry = entry
        self.arrays: dict[str, Any] = {}

    def array(self, name: str) -> Any:
        if name not in self.arrays:  # a race opens it twice, harmlessly
            self.arrays[name] = self.group[name]
        return self.arrays[name]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def connect_fs(url: str, storage_options: StorageOptions) -> tuple[Any, str]:
    fs, path = _shared("fs", url, storage_options, None, lambda: get_fs(url, storage_options))
    return fs, path.rstrip("/")


def _read_root_attrs(fs: Any, root: str, url: str) -> dict[str, Any] | None:
    meta = read_json_fs(fs, f"{root}/zarr.json")
    if meta is None:
        return None
    attrs = meta.get("attributes", {})
    if attrs.get("format") != FORMAT:
        raise UserError(f"{url} is a Zarr store but not an L-CAM feature cache (format {attrs.get('format')!r}, expected {FORMAT!r})")
    return attrs


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """Package versions from metadata (importing torch only for its version costs seconds)."""
    import importlib.metadata

    out = {}
    for name in ("torch", "zarr", "lcam"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def read_json_fs(fs: Any, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def new_manifest(fingerprint: str, fmt: str = FORMAT) -> dict[str, Any]:
    now = utc_now()
    return {"format": fmt, "fingerprint": fingerprint, "shards": {}, "expected_counts": {}, "versions": dict(_versions()), "created": now, "updated": now}


def _rows(x: Any, shape: tuple[int, ...], dtype: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=dtype)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _take(pend: list[dict[str, Any]], k: int) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """First k rows of a list of chunk dicts -> (batch dict, remaining chunks, remaining rows)."""
    parts: list[dict[str, Any]] = []
    need = k
    while need:
        c = pend[0]
        m = len(c["keys"])
        if m <= need:
            parts.append(pend.pop(0))
            need -= m
        else:
            parts.append({name: v[:need] for name, v in c.items()})
            pend[0] = {name: v[need:] for name, v in c.items()}
            need = 0
    batch = {"keys": [k for p in parts for k in p["keys"]]}
    for name in ("features", "labels", "top5_classes"):
        batch[name] = np.concatenate([p[name] for p in parts])
    return batch, pend, sum(len(c["keys"]) for c in pend)


def _finish_batch(b: dict[str, Any], view: int | None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    feats = b["features"] if view is None else b["features"][:, view]
    return b["keys"], feats.astype(np.float32), b["labels"].astype(np.int64), b["top5_classes"][:, 0].astype(np.int64)
