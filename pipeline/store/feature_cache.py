"""Feature cache: last-conv feature maps F of a frozen backbone in a Zarr v3 store.

A :class:`~pipeline.store.layer.ShardedStore` (the layout, the manifest and why they are so are
described there). Layout at URL (local path, s3://, gs://, any fsspec URL)::

    zarr.json           root group; attrs {"format", "identity", "fingerprint"}
    manifest/zarr.json  a group whose attributes are the manifest: written by the driver only, atomically
    shards/<id>/        one group per source shard, written by ONE task; attrs {"source", "keys", "count"}
        features     (n, V, C, h, w)  float16 | float32 | bfloat16 (stored as uint16 bits)
        labels       (n,) int32, -1 = no label
        top5_classes (n, 5) int32;  top5_probs (n, 5) float32
        logits       (n, K) float16, only with store_logits
    leases/<id>/        one group per running writer, its attributes the lease
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr

from ..errors import UserError
from ..fs import StorageOptions
from .dtypes import DTYPES, bf16_to_f32, finite_rows, to_storage
from .identity import canonical, shard_id_for, utc_now
from .integrity import VerifyReport
from .layer import ShardedStore
from .manifest import MANIFEST

FORMAT = "lcam-feature-cache/1"
DEFAULT_CHUNK_ROWS = 64  # 64 x 1280x7x7 float16 = 8 MB raw per view, ~1 MB compressed: a good object size
TOP_K = 5


class CacheMismatch(UserError):
    """A cache exists at the URL but was made for other features (another fingerprint)."""


class CacheNotFound(UserError):
    """No feature cache at the URL."""


class NonFiniteFeatures(UserError):
    """Features hold NaN/Inf after casting to the cache dtype (e.g. float16 overflow)."""


class FeatureCache(ShardedStore):
    """One feature cache. Picklable (ships to Ray tasks as URL + options; handles reopen lazily)."""

    FORMAT = FORMAT
    KIND = "feature cache"
    A_KIND = "an L-CAM feature cache"
    HOLDER = "cache"
    IDENTITY_OF = "features"
    MISMATCH = CacheMismatch
    NOT_FOUND = CacheNotFound
    DIMENSIONS = {
        "features": ("sample", "view", "channel", "y", "x"),
        "labels": ("sample",),
        "top5_classes": ("sample", "rank"),
        "top5_probs": ("sample", "rank"),
        "logits": ("sample", "class"),
    }

    def read_layout(self) -> None:
        layout = self.identity["cache"]
        self.dtype: str = layout["dtype"]
        self.views: tuple[str, ...] = tuple(layout["views"])
        self.feature_shape: tuple[int, int, int] = tuple(layout["feature_shape"])
        self.chunk_rows: int = int(layout["chunk_rows"])
        self.store_logits: bool = bool(layout["store_logits"])
        self.num_classes: int = int(layout["num_classes"])

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
            raise ValueError(
                f"identity says feature_shape {identity['feature_shape']}, caller passed {list(feature_shape)}"
            )
        full = canonical(dict(identity))
        full["cache"] = {
            "dtype": dtype,
            "views": list(views),
            "feature_shape": [int(s) for s in feature_shape],
            "chunk_rows": int(chunk_rows),
            "store_logits": bool(store_logits),
            "num_classes": int(num_classes),
        }
        return cls._create_or_open(url, full, storage_options)

    @classmethod
    def mismatch_advice(cls, url: str) -> str:
        return f"Use another cache URL for these features, or delete the existing cache ({url}) to rebuild it."

    @classmethod
    def make_hint(cls, url: str) -> str:
        return "build one with the extraction step first"

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
        feats = to_storage(features, self.dtype)
        if feats.ndim == 4 and V == 1:
            feats = feats[:, None]
        if feats.shape != (n, V, C, h, w):
            raise ValueError(
                f"features of {source_url} have shape {feats.shape}, expected {(n, V, C, h, w)} (rows, views {list(self.views)}, C, h, w)"
            )
        bad = ~finite_rows(feats, self.dtype)
        if bad.any():
            bad_keys = [keys[i] for i in np.flatnonzero(bad)[:5]]
            raise NonFiniteFeatures(
                f"{int(bad.sum())} rows of {source_url} have NaN/Inf features after casting to {self.dtype} (e.g. {bad_keys}); "
                + (
                    "values beyond float16's range (65504) overflow: use dtype bfloat16 or float32"
                    if self.dtype == "float16"
                    else "check the backbone and the images"
                )
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
        self.write_group(
            sid,
            {k: (data, fill, self.chunk_rows) for k, (data, fill) in arrays.items()},
            {"source": source_url, "keys": keys, "count": n},
        )
        with self._lock:
            self._handles.pop(sid, None)
        return {
            "url": source_url,
            "shard_id": sid,
            "count": n,
            "skipped": [],
            "seconds": round(time.perf_counter() - t0, 3),
            "finished_at": utc_now(),
        }

    def record_counts(self, counts: Mapping[str, int]) -> None:
        """Remember how many samples each source shard holds (for shards without an index)."""
        manifest = self.refresh()
        manifest.setdefault("expected_counts", {}).update({k: int(v) for k, v in counts.items()})
        self._save_manifest(manifest)

    # ---- reading
    def num_rows(self, shard_id: str) -> int:
        try:
            return int(self._index()[1][shard_id]["count"])
        except KeyError:
            raise KeyError(f"shard {shard_id!r} is not in the manifest of {self.url}") from None

    def folder_labelled_shards(self) -> list[str]:
        """Done shards whose labels are class-folder indices 0..N-1 (not the classifier's classes)."""
        return [e["url"] for e in self.entries() if e.get("labels_scheme") == "folders"]

    def num_chunks(self, shard_id: str) -> int:
        return math.ceil(self.num_rows(shard_id) / self.chunk_rows)

    def stored_arrays(self) -> list[str]:
        return ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if self.store_logits else [])

    def lazy_array(self, name: str, data: Any) -> Any:
        """bfloat16 features are stored as their uint16 bits: decoded to float32 as :meth:`read_chunk` does."""
        if name == "features" and self.dtype == "bfloat16":
            return data.map_blocks(bf16_to_f32, dtype=np.float32)
        return data

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
        group, checked = self.open_checked_group(entry, self.stored_arrays())
        handle = _ShardHandle(checked["attrs"], group, entry)
        handle.arrays.update(checked["arrays"])
        with self._lock:
            self._handles[sid] = handle
            while len(self._handles) > 256:  # bounded: each holds that shard's keys
                self._handles.popitem(last=False)
        return handle

    def read_chunk(
        self, shard_id: str, chunk_index: int, *, fields: Sequence[str] | None = None, raw: bool = False
    ) -> dict[str, Any]:
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
            raise IndexError(
                f"chunk {chunk_index} out of range for shard {shard_id} ({n} rows, chunk_rows {self.chunk_rows})"
            )
        hi = min(lo + self.chunk_rows, n)
        names = ["features", "labels", "top5_classes", "top5_probs"] + (["logits"] if self.store_logits else [])
        out: dict[str, Any] = {"keys": list(attrs["keys"][lo:hi])}
        for name in names if fields is None else [f for f in fields if f != "keys"]:
            data = self.read_array(handle.entry, name, handle.array(name), slice(lo, hi))
            if name == "features":
                self._check_finite(handle.entry, data, lo, out["keys"])
            if name == "features" and self.dtype == "bfloat16" and not raw:
                data = bf16_to_f32(data)
            out[name] = data
        return out

    def _check_finite(self, entry: Mapping[str, Any], stored: np.ndarray, lo: int, keys: Sequence[str]) -> None:
        """NaN/Inf is never written (:meth:`write_shard` refuses it): read back, it is damage."""
        bad = np.flatnonzero(~finite_rows(stored, self.dtype))
        if len(bad):
            raise self.damaged(
                entry,
                f"{len(bad)} rows from row {lo} read back as NaN/Inf features (e.g. {keys[bad[0]]!r}), "
                "which extraction never writes: the stored data changed",
            )

    def iter_rows(
        self, batch_size: int = 64, *, shard_ids: Sequence[str] | None = None, view: int | None = None
    ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
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

    def lost_chunks(self, entry: Mapping[str, Any], present: set[str]) -> list[str]:
        return self._lost_chunks(entry, present)

    def _lost_chunks(self, entry: Mapping[str, Any], present: set[str]) -> list[str]:
        """Chunk objects of a done shard absent from ``present`` (keys below shards/), from the
        layout alone: chunks of ``chunk_rows`` rows, whole along every other axis."""
        sid, n = entry["shard_id"], int(entry["count"])
        ndims = {"features": 5, "labels": 1, "top5_classes": 2, "top5_probs": 2, "logits": 2}
        lost = []
        for name in self.stored_arrays():
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
        entries = self.entries()
        samples = sum(int(e["count"]) for e in entries)
        fs, path = self._fs()
        try:  # one listing gives the size on disk and the chunk objects present
            objects = fs.find(path, detail=True)
        except FileNotFoundError:
            objects = {}
        on_disk = sum(int(o.get("size") or 0) for o in objects.values())
        raw = samples * self.raw_bytes_per_row()
        prefix = f"{path}/shards/"
        present = {p[len(prefix) :] for p in objects if p.startswith(prefix)}
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
            "chunk_checksum": self.root_attrs.get("chunk_checksum"),
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
        entries = self.entries()
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
                    report.problems.append(
                        f"count mismatch for {src}: cache has {have} rows + {skipped} skipped, expected {expected[src]} samples"
                    )
            for src in sorted(set(done) - set(expected)):
                report.problems.append(f"unexpected shard {src}: in the cache but not among the expected shards")
        for url, f in sorted(self.failed().items()):
            report.problems.append(
                f"failed shard {url}: {f.get('reason')} (at {f.get('at')}); re-run the extraction to retry it"
            )
        orphans = self._orphan_groups({e["shard_id"] for e in entries})
        if not self.manifest_found and orphans:
            report.problems.append(
                f"the manifest ({MANIFEST}) is missing but {len(orphans)} shard groups exist: the cache lost its record of finished shards; "
                "re-run the extraction to rebuild it (every shard is extracted again)"
            )
        else:
            for sid in orphans:
                report.notes.append(
                    f"group shards/{sid} is not in the manifest (left by an interrupted or running extraction; ignored by readers)"
                )
        if report.damaged:
            report.notes.append(
                f"damaged shards: `lcam cache repair {self.url}` forgets them, then re-run the extraction to re-make them"
            )
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
            problems.append(
                f"shard {src}: group shards/{sid} is incomplete (no keys attribute; its write did not finish)"
            )
        elif len(keys) != count or attrs.get("count") != count:
            problems.append(
                f"shard {src}: manifest says {count} rows, group has count={attrs.get('count')} and {len(keys)} keys"
            )
        if len(set(keys)) != len(keys):
            problems.append(f"shard {src}: {len(keys) - len(set(keys))} keys repeated within the shard")
        if attrs.get("source") not in (None, src):
            problems.append(f"shard {src}: group shards/{sid} was written for another source {attrs.get('source')}")
        V, (C, h, w) = len(self.views), self.feature_shape
        shapes = {
            "features": (count, V, C, h, w),
            "labels": (count,),
            "top5_classes": (count, TOP_K),
            "top5_probs": (count, TOP_K),
        }
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
                problems.append(
                    f"shard {src}: {name} has {arrays[name].nchunks - arrays[name].nchunks_initialized} of {arrays[name].nchunks} chunk objects missing"
                )
        chunks = 0
        if problems:
            return problems, keys, chunks
        nonfinite: list[int] = []
        try:
            for lo in range(0, count, self.chunk_rows):
                data = arrays["features"][lo : lo + self.chunk_rows]
                chunks += 1
                nonfinite.extend(lo + i for i in np.flatnonzero(~finite_rows(data, self.dtype)))
                del data
            small = {name: arrays[name][:] for name in arrays if name != "features"}  # decodes every chunk object
        except Exception as exc:  # a truncated or corrupt chunk object
            return [f"shard {src}: a chunk object is unreadable ({type(exc).__name__}: {str(exc)[:120]})"], keys, chunks
        if nonfinite:
            problems.append(
                f"shard {src}: {len(nonfinite)} rows have NaN/Inf features (e.g. {[keys[i] for i in nonfinite[:5]]})"
            )
        lab = small["labels"]
        if ((lab < -1) | (lab >= self.num_classes)).any():
            problems.append(f"shard {src}: labels outside [-1, {self.num_classes})")
        return problems, keys, chunks

    def repair(self, *, workers: int = 4) -> tuple[VerifyReport, list[str]]:
        """Rebuild a missing or damaged manifest from the groups present, verify, then forget
        the damaged shards so the next extraction re-makes them."""
        rebuilt = VerifyReport()
        self.rebuild_manifest(rebuilt)
        report = self.verify(workers=workers)
        report.notes[:0] = rebuilt.notes
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
