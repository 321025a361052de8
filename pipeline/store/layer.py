"""The sharded Zarr store that the feature cache and the CAM store share.

Layout at URL (local path, s3://, gs://, any fsspec URL)::

    zarr.json           root group; attrs {"format", "identity", "fingerprint", ...}
    manifest/zarr.json  a group whose attributes are the manifest (which source shards are done):
                        ONE object, written by the driver only, atomically
    shards/<id>/        one group per source shard, written by ONE task; attrs {"source", "keys", "count"}
    leases/<id>/        one group per running writer, its attributes the lease (two runs into
                        one store are reported; :mod:`pipeline.store.leases`)

Why this shape: every chunk object has exactly one writer (the task that owns the
shard), a re-run task rewrites its group identically, and the only shared mutable
object (the manifest) has a single writer (the driver). A shard counts as done only
once it is in the manifest; a group without a manifest entry is left-over work. Every
object is part of a Zarr node, so any Zarr or xarray reader lists the whole store without
a warning (zarr warns about each object under a group that is no node).

Stores made before the manifest and the leases became Zarr nodes kept ``manifest.json``
and ``leases/<id>.json`` at the root; they still open (see :mod:`pipeline.store.manifest`), so
the format string did not change.

:class:`ShardedStore` owns creating or opening a store (identity and fingerprint
checked), the manifest, group writes, the damage checks and the error messages (template
methods: a subclass names itself and its advice); what is stored in a group is the
subclass's (:class:`pipeline.store.feature_cache.FeatureCache`, :class:`pipeline.store.cam_store.CamStore`).
Beside it: :mod:`pipeline.store.identity` (fingerprints, identity diffs, group names, the
empty manifest), :mod:`pipeline.store.clients` (one client per process), :mod:`pipeline.store.manifest`
(where the manifest lives, reading and writing it) and
:mod:`pipeline.store.leases` (``leases/``, held through :attr:`ShardedStore.leases`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
import zarr.api.asynchronous as zarr_async
from zarr.core.sync import sync as zsync

from ..errors import UserError
from ..fs import StorageOptions, read_json_fs
from .clients import connect_fs, make_zarr_store
from .identity import canonical, fingerprint_of, identity_diff, new_manifest, package_versions, shard_id_for, utc_now
from .integrity import CHUNK_CHECKSUM, ManifestDamaged, StoreDamaged, VerifyReport, default_compressors
from .leases import WriterLeases
from .manifest import LEGACY_MANIFEST, MANIFEST, read_manifest, write_manifest


class ShardedStore:
    """What the feature cache and the CAM store share: a Zarr v3 root with one group per
    source shard (one writer each) and the manifest (:data:`MANIFEST`), which records the shards that are
    done and is written by the driver only. Picklable: ships to Ray tasks as URL + options,
    handles reopen lazily."""

    # What each subclass names (no defaults here: every store says what it is)
    FORMAT: str  # root attrs "format", e.g. "lcam-feature-cache/1"
    KIND: str  # in messages: "feature cache", "CAM store"
    A_KIND: str  # the same with its article, as a sentence names it: "an L-CAM feature cache"
    HOLDER: str  # in identity diffs: "<field>: <HOLDER> has ..., requested ..."
    IDENTITY_OF: str  # what the identity describes: "features", "settings"
    MISMATCH: type[UserError]  # raised when the URL holds a store of another identity
    NOT_FOUND: type[UserError]  # raised when opening a URL without a store
    # Dimension names of every array a group may hold: written into each array's zarr.json
    # (zarr v3 ``dimension_names``), so xarray and other Zarr readers label the axes.
    DIMENSIONS: dict[str, tuple[str, ...]]

    _TRANSIENT: tuple[str, ...] = ("_store", "_fs_path", "_sorted")  # sockets, event loops, derived
    manifest_found: bool = True  # False when opened without a manifest (lost, or none yet)
    manifest_at: str | None = None  # the object the manifest was read from: MANIFEST or LEGACY_MANIFEST

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
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.root_attrs: dict[str, Any] = dict(root_attrs)
        self.identity: dict[str, Any] = dict(root_attrs["identity"])
        self.fingerprint: str = root_attrs["fingerprint"]
        self.writable = writable
        self._manifest: dict[str, Any] = dict(manifest)
        self.manifest_found = bool(manifest)
        self._init_handles()
        self._fs_path = fs
        self.read_layout()

    def read_layout(self) -> None:
        """Set what the subclass keeps of its identity and root attrs (its arrays' shapes)."""
        raise NotImplementedError

    # ---- opening (driver); the messages are template methods over the names above
    @classmethod
    def _create_or_open(
        cls,
        url: str,
        identity: Mapping[str, Any],
        storage_options: StorageOptions,
        attrs: Mapping[str, Any] | None = None,
    ) -> "ShardedStore":
        """Open the store at ``url`` for writing, creating it with root ``attrs`` if absent.

        ``identity``: the full identity; a store made for another one is refused
        (:attr:`MISMATCH`), never mixed with. A non-empty location without a store is refused.
        """
        full = canonical(dict(identity))
        fp = fingerprint_of(full)
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        found = cls._read_root_attrs(fs, root, url)
        if found is not None:
            if found.get("fingerprint") != fp:
                raise cls.MISMATCH(cls.mismatch_message(url, found, full, fp))
            manifest, at = read_manifest(fs, root, url, cls.KIND)
            store = cls(
                url, found, manifest or new_manifest(fp, cls.FORMAT), storage_options, writable=True, fs=(fs, root)
            )
            store.manifest_at = at
            return store
        if fs.exists(root) and fs.ls(root):
            raise UserError(
                f"{url} exists and holds files but no {cls.KIND} (no zarr.json); pick an empty or new location"
            )
        # the checksum is recorded beside the identity, not in it: it changes no value, so no fingerprint
        root_attrs = {
            "format": cls.FORMAT,
            "identity": full,
            "fingerprint": fp,
            "chunk_checksum": CHUNK_CHECKSUM,
            **dict(attrs or {}),
        }
        zstore = make_zarr_store(url, storage_options, read_only=False)
        zarr.open_group(zstore, mode="w", attributes=root_attrs)
        zarr.open_group(zstore, path="shards", mode="w")
        store = cls(url, root_attrs, new_manifest(fp, cls.FORMAT), storage_options, writable=True, fs=(fs, root))
        store._save_manifest(store.manifest)
        return store

    @classmethod
    def open(cls, url: str, storage_options: StorageOptions = None, writable: bool = False) -> "ShardedStore":
        """Open read-only (readers, info, verify); ``writable`` for manifest edits (repair)."""
        url = url.rstrip("/")
        fs, root = connect_fs(url, storage_options)
        attrs = cls._read_root_attrs(fs, root, url)
        if attrs is None:
            raise cls.NOT_FOUND(f"no {cls.KIND} at {url} (no zarr.json with format {cls.FORMAT}); {cls.make_hint(url)}")
        manifest, at = read_manifest(fs, root, url, cls.KIND)  # None: lost (verify reports it)
        store = cls(
            url,
            attrs,
            manifest or new_manifest(attrs["fingerprint"], cls.FORMAT),
            storage_options,
            writable=writable,
            fs=(fs, root),
        ).with_manifest_found(bool(manifest))
        store.manifest_at = at
        return store

    @classmethod
    def open_for_repair(cls, url: str, storage_options: StorageOptions = None) -> "ShardedStore":
        """Open for :meth:`repair` even when the manifest is damaged (repair rebuilds it)."""
        try:
            return cls.open(url, storage_options, writable=True)
        except ManifestDamaged:
            url = url.rstrip("/")
            fs, root = connect_fs(url, storage_options)
            attrs = cls._read_root_attrs(fs, root, url) or {}
            store = cls(
                url,
                attrs,
                new_manifest(attrs["fingerprint"], cls.FORMAT),
                storage_options,
                writable=True,
                fs=(fs, root),
            )
            return store.with_manifest_found(False)

    @classmethod
    def _read_root_attrs(cls, fs: Any, root: str, url: str) -> dict[str, Any] | None:
        meta = read_json_fs(fs, f"{root}/zarr.json")
        if meta is None:
            return None
        attrs = meta.get("attributes", {})
        if attrs.get("format") != cls.FORMAT:
            raise UserError(
                f"{url} is a Zarr store but not {cls.A_KIND} (format {attrs.get('format')!r}, expected {cls.FORMAT!r}); pick another URL"
            )
        return attrs

    @classmethod
    def mismatch_message(cls, url: str, found: Mapping[str, Any], identity: Mapping[str, Any], fingerprint: str) -> str:
        diff = identity_diff(found.get("identity", {}), identity, cls.HOLDER)
        return (
            f"a {cls.KIND} already exists at {url} for other {cls.IDENTITY_OF} (fingerprint {found.get('fingerprint')}, requested {fingerprint}). "
            "Differing fields:\n  "
            + "\n  ".join(diff or ["(identities equal; fingerprint recipe changed)"])
            + f"\n{cls.mismatch_advice(url)}"
        )

    @classmethod
    def mismatch_advice(cls, url: str) -> str:
        """What to do when ``url`` holds a store of another identity (subclasses)."""
        raise NotImplementedError

    @classmethod
    def make_hint(cls, url: str) -> str:
        """How to make a store at ``url`` (subclasses), for the not-found message."""
        raise NotImplementedError

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

    def group_keys(self, sid: str) -> list[str]:
        """The keys a shard group records (empty while it is incomplete or absent)."""
        return [str(k) for k in (self._group_attrs(sid) or {}).get("keys", [])]

    # ---- damage: what readers must refuse
    def repair_hint(self, source_url: str) -> str:
        """The commands that rebuild one shard (subclasses name the re-run command)."""
        return f"`lcam cache repair {self.url}` (forgets damaged shards), then re-run the command that made this {self.KIND}"

    def damaged(self, entry: Mapping[str, Any], what: str) -> StoreDamaged:
        return StoreDamaged(
            f"{self.KIND} {self.url}: shard {entry['url']} (group shards/{entry['shard_id']}) is damaged: {what}. "
            f"Re-make that shard: {self.repair_hint(entry['url'])}"
        )

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
            raise self.damaged(
                entry,
                f"the manifest says {count} rows, the group has count={attrs.get('count')} and {len(attrs.get('keys', []))} keys",
            )
        fs, root = self._fs()
        prefix = f"{root}/shards/{sid}/"
        try:
            present = {p[len(prefix) :] for p in fs.find(prefix.rstrip("/")) if p.startswith(prefix)}
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
            lost = [
                c for c in np.ndindex(*arr.cdata_shape) if f"{name}/{arr.metadata.encode_chunk_key(c)}" not in present
            ]
            if lost:
                raise self.damaged(
                    entry,
                    f"{len(lost)} of {arr.nchunks} chunk objects of {name} are missing (first: chunk {lost[0][0]}, rows from {lost[0][0] * arr.chunks[0]})",
                )
            opened[name] = arr
        return group, {"attrs": attrs, "arrays": opened}

    def read_array(self, entry: Mapping[str, Any], name: str, arr: Any, rows: slice) -> np.ndarray:
        """``arr[rows]``, a truncated or corrupt chunk object raised as :class:`StoreDamaged`."""
        try:
            return arr[rows]
        except Exception as exc:  # zstd/codec errors, short reads: the object is damaged
            raise self.damaged(
                entry,
                f"array {name}, rows {rows.start}-{rows.stop}: a chunk object is unreadable ({type(exc).__name__}: {str(exc)[:120]})",
            ) from None

    def lost_chunks(self, entry: Mapping[str, Any], present: set[str]) -> list[str]:
        """Objects of a done shard's arrays absent from ``present`` (keys below ``shards/``),
        from the layout alone (subclasses: they know each array's chunking)."""
        raise NotImplementedError

    def damage_scan(self) -> dict[str, str]:
        """Done shards with lost objects (source URL -> what), from ONE listing of the store:
        cheap enough for ``info`` and for every run's start."""
        fs, path = self._fs()
        try:
            objects = fs.find(f"{path}/shards")
        except FileNotFoundError:
            objects = []
        prefix = f"{path}/shards/"
        present = {p[len(prefix) :] for p in objects if p.startswith(prefix)}
        damaged = {}
        for e in self.entries():
            lost = self.lost_chunks(e, present)
            if lost:
                damaged[e["url"]] = f"{len(lost)} chunk objects missing (e.g. shards/{e['shard_id']}/{lost[0]})"
        return damaged

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

    def check_done_shards(self, *, rebuild_manifest: bool = False) -> VerifyReport:
        """Read every done shard whole (``check_shard``); the damaged ones are the report's problems.
        ``rebuild_manifest`` (repair): a missing or damaged manifest is first rebuilt from the groups."""
        report = VerifyReport()
        if rebuild_manifest:
            self.rebuild_manifest(report)
        else:
            self.refresh()
        for e in self._index()[0]:
            report.shards += 1
            try:
                self.check_shard(e)
                report.rows += int(e.get("count", 0))
            except StoreDamaged as exc:
                report.problems.append(str(exc))
                report.damaged.append(e["url"])
        return report

    def repair(self, *, workers: int = 4) -> tuple[VerifyReport, list[str]]:
        """Check every done shard, forget the damaged ones so the next run re-makes them."""
        report = self.check_done_shards(rebuild_manifest=True)
        return report, self.forget(report.damaged) if report.damaged else []

    def rebuild_manifest(self, report: VerifyReport) -> None:
        """A missing or damaged manifest rebuilt from the complete groups present
        (a group with ``keys`` and ``source`` attrs was written whole); noted in ``report``.
        A readable manifest is kept as it is (one of before moved to :data:`MANIFEST`)."""
        try:
            self.refresh()
            if self.manifest_found:
                if self.manifest_at == LEGACY_MANIFEST:
                    self._save_manifest(self.manifest)
                    report.notes.append(f"{LEGACY_MANIFEST} moved to {MANIFEST} (the store's current layout)")
                return
        except ManifestDamaged:
            pass
        manifest = new_manifest(self.fingerprint, self.FORMAT)
        fs, root = self._fs()
        try:
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/shards", detail=False))
        except FileNotFoundError:
            names = []
        for sid in names:
            attrs = self._group_attrs(sid) if sid != "zarr.json" else None
            if not attrs or "keys" not in attrs or not attrs.get("source") or attrs.get("count") != len(attrs["keys"]):
                continue  # incomplete (an interrupted write): the next run re-makes it
            manifest["shards"][attrs["source"]] = {
                "url": attrs["source"],
                "shard_id": sid,
                "count": int(attrs["count"]),
                "skipped": list(attrs.get("skipped", [])),
                "seconds": 0.0,
                "finished_at": utc_now(),
                "rebuilt": True,
            }
        self._save_manifest(manifest)
        self.manifest_found = True
        report.notes.append(f"{MANIFEST} rebuilt from {len(manifest['shards'])} complete shard groups")

    @property
    def leases(self) -> WriterLeases:
        """The store's writer leases: say when two runs write into it (each still writes every shard correctly)."""
        return WriterLeases(*self._fs(), zarr_nodes=True)

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
        """Re-read the manifest (another process may have advanced it)."""
        found, self.manifest_at = read_manifest(*self._fs(), self.url, self.KIND)
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

        Driver only: read-modify-write of the manifest with an atomic replace. With
        ``check``, each group must be complete (attrs written, count agrees) first.
        """
        manifest = self.refresh()
        for e in entries:
            url, sid, count = e["url"], e.get("shard_id") or shard_id_for(e["url"]), int(e["count"])
            if check:
                attrs = self._group_attrs(sid)
                if attrs is None or attrs.get("count") != count or len(attrs.get("keys", [])) != count:
                    raise RuntimeError(
                        f"shard {url} ({sid}) is not completely written (group attrs {attrs and {k: attrs.get(k) for k in ('count', 'source')}}, entry count {count}); not marking it done"
                    )
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
        manifest["versions"] = dict(package_versions())
        fs, root = self._fs()
        write_manifest(fs, root, self.url, manifest, self.storage_options, replaces=self.manifest_at)
        self.manifest_at = MANIFEST
        self._manifest = manifest
        self._sorted = None

    def write_group(self, sid: str, arrays: Mapping[str, tuple[np.ndarray, Any, int]], attrs: dict[str, Any]) -> None:
        """Write one shard group whole: ``arrays`` name -> (data, fill value, chunk rows).

        The one writer of a group (one task per source shard). ``mode="w"`` deletes the old
        group first, so a re-run never leaves stale chunks behind; every chunk object is
        written even if all fill (verify can tell a lost object from data); the group's
        attributes come last: a group with ``keys`` is complete."""
        zsync(self._write_group(sid, arrays, attrs))

    async def _write_group(
        self, sid: str, arrays: Mapping[str, tuple[np.ndarray, Any, int]], attrs: dict[str, Any]
    ) -> None:
        group = await zarr_async.open_group(self._zstore(), path=f"shards/{sid}", mode="w")

        async def one(name: str, data: np.ndarray, fill: Any, chunk_rows: int) -> None:
            dims = self.DIMENSIONS.get(name)
            arr = await group.create_array(
                name,
                shape=data.shape,
                chunks=(chunk_rows, *data.shape[1:]),
                dtype=data.dtype,
                compressors=default_compressors(self.root_attrs.get("chunk_checksum")),
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

    def entries(self) -> list[dict[str, Any]]:
        """Done shards' manifest entries in deterministic order: sorted by source URL."""
        return self._index()[0]

    def __len__(self) -> int:
        return sum(int(e["count"]) for e in self.entries())

    # ---- the whole store as one dataset
    def stored_arrays(self) -> list[str]:
        """The arrays every group of this store holds (subclasses)."""
        raise NotImplementedError

    def lazy_array(self, name: str, data: Any) -> Any:
        """The dask array ``data`` of ``name`` as readers see it (a subclass decodes stored forms)."""
        return data

    def to_xarray(self, fields: Sequence[str] | None = None) -> Any:
        """All done shard groups as one lazy ``xarray.Dataset``: dask arrays over the Zarr
        chunks (nothing is read until computed), concatenated along ``sample`` in store order,
        with the shard id and the key of every sample as coordinates.

        Each group is checked whole first (:meth:`open_checked_group`): a lost chunk object
        is refused as :class:`StoreDamaged`, never read as fill values.
        """
        import dask.array as da  # here, not at the top: `lcam --help` stays fast
        import xarray as xr

        names = list(fields) if fields is not None else self.stored_arrays()
        columns: dict[str, list[Any]] = {n: [] for n in names}
        dims: dict[str, tuple[str, ...]] = {}
        shard_ids: list[str] = []
        keys: list[str] = []
        for e in self.entries():
            _, checked = self.open_checked_group(e, names)
            for name, arr in checked["arrays"].items():
                columns[name].append(da.from_array(arr, chunks=arr.chunks, asarray=True, fancy=False))
                dims.setdefault(
                    name,
                    tuple(arr.metadata.dimension_names or self.DIMENSIONS.get(name) or ())
                    or ("sample", *(f"{name}_{i}" for i in range(1, arr.ndim))),
                )
            shard_ids += [e["shard_id"]] * int(e["count"])
            keys += [str(k) for k in checked["attrs"]["keys"]]
        if not shard_ids:
            return xr.Dataset(attrs={"url": self.url, "format": self.FORMAT, "fingerprint": self.fingerprint})
        data = {
            name: (dims[name], self.lazy_array(name, da.concatenate(parts, axis=0))) for name, parts in columns.items()
        }
        coords = {"shard": ("sample", np.array(shard_ids)), "key": ("sample", np.array(keys))}
        return xr.Dataset(
            data, coords=coords, attrs={"url": self.url, "format": self.FORMAT, "fingerprint": self.fingerprint}
        )
