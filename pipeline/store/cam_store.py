"""The CAM store: a :class:`~pipeline.store.layer.ShardedStore` holding maps, one group per source shard.

Layout at URL (local path, s3://, gs://, any fsspec URL), mirroring the feature cache::

    zarr.json        root group; attrs {"format", "identity", "fingerprint", "checkpoint_url", "source_url"}
    manifest/        a group whose attributes are the manifest: written by the driver only, atomically
    shards/<id>/     one group per source shard (same <id> as the feature cache), ONE writer;
                     attrs {"source", "keys", "count"}: keys in source order
        class_ids      (n, T) int32    the explained classes
        probs          (n, T) float32  their softmax probabilities on the clean image
        raw            (n, T, h, w) float16   Z[b, t] before the sigmoid (maps = minmax(raw))
        upsampled      (n, T, H, W) uint8     round(255 * up(minmax(raw))), only with upsample
        labels         (n,) int32, -1 = no label
        predicted      (n,) int32;  predicted_prob (n,) float32   (the classifier's top-1)
        coverage       (n, T) int32    training samples of each explained class row (the checkpoint's
                                       coverage; 0 = an untrained row), when the checkpoint records it
    leases/<id>/     one group per running writer, its attributes the lease
    gallery/         overlays and index.html, when asked (pipeline.cams.gallery); no Zarr node

The fingerprint covers the checkpoint's weights, the source's features (the cache's
fingerprint, or the backbone and preprocessing for images), the class selection and
the stored arrays: a re-run with the same settings resumes (done shards are skipped),
one with other settings is refused rather than mixed.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from lcam.explain import minmax_normalize

from ..errors import UserError
from ..fs import StorageOptions, join
from .identity import shard_id_for, utc_now
from .layer import ShardedStore

FORMAT = "lcam-cam-store/1"
SMALL_CHUNK_ROWS = 1024  # class ids, probs, raw maps: ~100 bytes a row
UPSAMPLED_CHUNK_BYTES = 4 << 20  # uint8 maps at 224 x 224: ~80 rows a chunk


class CamStoreMismatch(UserError):
    """A CAM store exists at the URL but for another checkpoint, source or class selection."""


class CamStoreNotFound(UserError):
    """No CAM store at the URL."""


class CamStore(ShardedStore):
    """One CAM store: the feature cache's layout and manifest (:class:`ShardedStore`), maps inside."""

    FORMAT = FORMAT
    KIND = "CAM store"
    A_KIND = "a CAM store"
    HOLDER = "store"
    IDENTITY_OF = "settings"
    MISMATCH = CamStoreMismatch
    NOT_FOUND = CamStoreNotFound
    DIMENSIONS = {
        "labels": ("sample",),
        "predicted": ("sample",),
        "predicted_prob": ("sample",),
        "coverage": ("sample", "target"),
        "class_ids": ("sample", "target"),
        "probs": ("sample", "target"),
        "raw": ("sample", "target", "y", "x"),
        "upsampled": ("sample", "target", "Y", "X"),
    }

    def read_layout(self) -> None:
        layout = self.identity["maps"]
        self.width: int = int(layout["classes_per_sample"])
        self.map_size: tuple[int, int] = tuple(layout["map_size"])
        self.upsampled_size: int | None = layout.get("upsampled_size")
        # per class row, the samples that trained it (the checkpoint's); None: not recorded
        cov = self.root_attrs.get("class_coverage")
        self.class_coverage: np.ndarray | None = np.asarray(cov, dtype=np.int32) if cov is not None else None

    @classmethod
    def create_or_open(
        cls,
        url: str,
        identity: Mapping[str, Any],
        *,
        checkpoint_url: str = "",
        source_url: str = "",
        storage_options: StorageOptions = None,
        class_coverage: Sequence[int] | None = None,
    ) -> "CamStore":
        """Open for writing, creating if absent (driver only); another identity is refused.
        ``class_coverage``: the checkpoint's coverage per class row (kept in the root attrs)."""
        attrs: dict[str, Any] = {"checkpoint_url": checkpoint_url, "source_url": source_url}
        if class_coverage is not None:
            attrs["class_coverage"] = [int(c) for c in class_coverage]
        return cls._create_or_open(url, identity, storage_options, attrs)

    @classmethod
    def mismatch_advice(cls, url: str) -> str:
        return f"Write these CAMs to another URL, or delete {url} to rebuild it."

    @classmethod
    def make_hint(cls, url: str) -> str:
        return f"make one with `lcam cams CHECKPOINT {url} --cache ...|--shards ...`"

    # ---- writing (one task per source shard)
    def write_shard(
        self, source_url: str, rows: Mapping[str, Any], skipped: Sequence[Mapping[str, str]] = ()
    ) -> dict[str, Any]:
        """Write all rows of one source shard into its own group, replacing what was there.

        ``rows``: ``key`` (n,), ``label`` (n,), ``class_ids`` (n, T), ``probs`` (n, T),
        ``raw`` (n, T, h, w), ``predicted``/``predicted_prob`` (n,), and ``upsampled``
        (n, T, H, W) when the store keeps them. Data first, group attrs last, so a group
        with ``keys`` is complete. ``skipped``: the samples left out (recorded in the entry).
        Returns the manifest entry for :meth:`mark_done`.
        """
        if not self.writable:
            raise PermissionError("CAM store opened read-only; use CamStore.create_or_open to write")
        t0 = time.perf_counter()
        keys = [str(k) for k in rows["key"]]
        n, t, (h, w) = len(keys), self.width, self.map_size
        if len(set(keys)) != n:
            dup = [k for k, c in Counter(keys).items() if c > 1][:5]
            raise ValueError(f"duplicate keys within shard {source_url}: {dup}")
        spec: dict[str, tuple[tuple[int, ...], Any, Any, int]] = {  # name -> (shape, dtype, fill, chunk rows)
            "labels": ((n,), np.int32, -1, SMALL_CHUNK_ROWS),
            "class_ids": ((n, t), np.int32, -1, SMALL_CHUNK_ROWS),
            "probs": ((n, t), np.float32, 0.0, SMALL_CHUNK_ROWS),
            "raw": ((n, t, h, w), np.float16, 0.0, SMALL_CHUNK_ROWS),
            "predicted": ((n,), np.int32, -1, SMALL_CHUNK_ROWS),
            "predicted_prob": ((n,), np.float32, 0.0, SMALL_CHUNK_ROWS),
        }
        if self.upsampled_size:
            s = self.upsampled_size
            spec["upsampled"] = ((n, t, s, s), np.uint8, 0, self.chunk_rows("upsampled"))
        source_names = {"labels": "label"}
        arrays: dict[str, tuple[np.ndarray, Any, int]] = {}
        for name, (shape, dtype, fill, chunk) in spec.items():
            data = rows[source_names.get(name, name)] if n else np.zeros(shape, dtype)
            data = np.ascontiguousarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data, dtype=dtype)
            if data.shape != shape:
                raise ValueError(f"{name} of {source_url} has shape {data.shape}, expected {shape}")
            arrays[name] = (data, fill, chunk)
        if self.class_coverage is not None:
            ids = arrays["class_ids"][0]
            cov = np.where(ids >= 0, self.class_coverage[np.clip(ids, 0, len(self.class_coverage) - 1)], -1).astype(
                np.int32
            )
            arrays["coverage"] = (cov, -1, SMALL_CHUNK_ROWS)
        if not np.isfinite(arrays["raw"][0]).all():
            raise UserError(
                f"raw maps of {source_url} overflow float16 (|Z| > 65504): the checkpoint's attention weights are far out of range; check the checkpoint"
            )
        sid = shard_id_for(source_url)
        self.write_group(sid, arrays, {"source": source_url, "keys": keys, "count": n})
        return {
            "url": source_url,
            "shard_id": sid,
            "count": n,
            "skipped": [dict(s) for s in skipped],
            "seconds": round(time.perf_counter() - t0, 3),
            "finished_at": utc_now(),
        }

    # ---- reading
    def _entry(self, shard: str) -> dict[str, Any]:
        for e in self.entries():
            if shard in (e["shard_id"], e["url"]):
                return e
        raise KeyError(f"shard {shard!r} is not in the manifest of {self.url}")

    def read_shard(self, shard: str, fields: Sequence[str] | None = None, normalized: bool = True) -> dict[str, Any]:
        """All rows of one shard (by shard id or source URL): ``keys`` and numpy arrays.

        ``fields`` limits the arrays read; with ``normalized`` a ``maps`` field (min-max
        normalised raw maps, float32) is added whenever ``raw`` is read.
        """
        e = self._entry(shard)
        names = [n for n in fields if n != "maps"] if fields is not None else self.stored_arrays()
        # checked whole first: a lost chunk object would otherwise read as fill values (zeros)
        _, checked = self.open_checked_group(e, names)
        out: dict[str, Any] = {"keys": list(checked["attrs"]["keys"])}
        for name in names:
            out[name] = self.read_array(e, name, checked["arrays"][name], slice(0, int(e["count"])))
        if normalized and "raw" in out:
            out["maps"] = minmax_normalize(torch.from_numpy(out["raw"].astype(np.float32))).numpy()
        return out

    def stored_arrays(self) -> list[str]:
        names = [
            n
            for n in ("labels", "class_ids", "probs", "raw", "upsampled", "predicted", "predicted_prob")
            if n != "upsampled" or self.upsampled_size
        ]
        return names + (["coverage"] if self.class_coverage is not None else [])

    def lost_chunks(self, entry: Mapping[str, Any], present: set[str]) -> list[str]:
        sid, n = entry["shard_id"], int(entry["count"])
        ndims = {
            "labels": 1,
            "predicted": 1,
            "predicted_prob": 1,
            "class_ids": 2,
            "probs": 2,
            "coverage": 2,
            "raw": 4,
            "upsampled": 4,
        }
        lost = []
        for name in self.stored_arrays():
            if f"{sid}/{name}/zarr.json" not in present:
                lost.append(f"{name}/zarr.json")
                continue
            rows = self.chunk_rows(name)
            for i in range(-(-n // rows)):
                key = f"{name}/c/" + "/".join([str(i)] + ["0"] * (ndims[name] - 1))
                if f"{sid}/{key}" not in present:
                    lost.append(key)
        return lost

    def chunk_rows(self, name: str) -> int:
        """Rows per chunk of array ``name`` (as :meth:`write_shard` writes them)."""
        if name == "upsampled" and self.upsampled_size:
            return max(1, UPSAMPLED_CHUNK_BYTES // (self.width * self.upsampled_size**2))
        return SMALL_CHUNK_ROWS

    def repair_hint(self, source_url: str) -> str:
        return (
            f"`lcam cache repair {self.url}` (forgets damaged shards), then re-run the `lcam cams` that made this store"
        )

    def check_shard(self, entry: Mapping[str, Any]) -> None:
        self.read_shard(entry["shard_id"], normalized=False)

    def iter_shards(self, fields: Sequence[str] | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(manifest entry, :meth:`read_shard` data) for every done shard, in store order."""
        for e in self.entries():
            yield e, self.read_shard(e["shard_id"], fields)

    def keys(self) -> list[str]:
        """All keys in store order (source shards sorted by URL, rows in source order)."""
        out: list[str] = []
        for e in self.entries():
            out += self.read_shard(e["shard_id"], fields=[])["keys"]
        return out

    def info(self) -> dict[str, Any]:
        entries = self.entries()
        fs, path = self._fs()
        ident = self.identity
        return {
            "url": self.url,
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "checkpoint": {**ident["checkpoint"], "url": self.root_attrs.get("checkpoint_url", "")},
            "source": {**ident["source"], "url": self.root_attrs.get("source_url", "")},
            "classes": ident["classes"],
            "classes_per_sample": self.width,
            "map_size": list(self.map_size),
            "upsampled_size": self.upsampled_size,
            "samples": sum(int(e["count"]) for e in entries),
            "shards_done": len(entries),
            "skipped": sum(len(e.get("skipped", [])) for e in entries),
            "bytes_on_disk": int(fs.du(path, total=True)) if fs.exists(path) else 0,
            "gallery": join(self.url, "gallery", "index.html") if fs.exists(f"{path}/gallery/index.html") else None,
            "class_rows_trained": None if self.class_coverage is None else int((self.class_coverage > 0).sum()),
            "damaged": self.damage_scan(),
            "failed": self.failed(),
            "manifest_found": self.manifest_found,
            "chunk_checksum": self.root_attrs.get("chunk_checksum"),
            "versions": self._manifest.get("versions", {}),
            "created": self._manifest.get("created"),
            "updated": self._manifest.get("updated"),
        }
