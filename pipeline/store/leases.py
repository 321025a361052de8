"""Writer leases: one object per running writer, so that a second run into the same store
(or training run folder) is told about the first.

Two layouts, one per kind of folder:

* a sharded Zarr store (``zarr_nodes=True``): ``leases/`` is a Zarr group (``leases/zarr.json``)
  and each lease a group ``leases/<id>/zarr.json`` whose attributes are the lease, so
  that any Zarr reader lists the store without a warning (zarr warns about every object
  under a group that is no Zarr node);
* a training run folder (no Zarr there): ``leases/<id>.json``, the lease itself.

Leases of the plain form are still read in a store too: stores made before leases became
Zarr nodes, and writers of an older version still running, keep them there.

A lease only informs: two writers still write every shard correctly (one writer per group,
the manifest committed by each driver), they merely do the same work twice. A lease left by a
process that died on this host is removed when seen; one from another host stays until
that writer's run removes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from typing import Any, Mapping

from ..fs import is_local, read_json_fs, write_bytes_atomic
from ..processes import process_alive
from .identity import utc_now

log = logging.getLogger(__name__)


# What makes a folder a Zarr v3 group (attributes aside); every writer writes the same bytes.
GROUP_DOC = {"zarr_format": 3, "node_type": "group", "attributes": {}}


class WriterLeases:
    """The ``leases/`` folder under ``root`` on the filesystem ``fs``; ``zarr_nodes``: the
    layout of a Zarr store (the module's docstring says both)."""

    def __init__(self, fs: Any, root: str, *, zarr_nodes: bool = False) -> None:
        self.fs, self.folder, self.zarr_nodes = fs, f"{root}/leases", zarr_nodes

    def _path(self, lease: str) -> str:
        return f"{self.folder}/{lease}/zarr.json" if self.zarr_nodes else f"{self.folder}/{lease}.json"

    def _put(self, path: str, doc: Mapping[str, Any]) -> None:
        """One whole object: a reader never sees a part (``others`` may read it at any time)."""
        data = json.dumps(doc).encode()
        if is_local(self.fs):
            write_bytes_atomic(path, data)  # makes the folders too
        else:  # one PUT is atomic on object stores
            self.fs.pipe_file(path, data)

    def take(self, info: Mapping[str, Any]) -> str:
        """Announce a running writer (``info`` is recorded with host, pid and start time);
        :meth:`drop` the returned lease when done."""
        lease = uuid.uuid4().hex[:12]
        body = {"host": socket.gethostname(), "pid": os.getpid(), "started": utc_now(), **dict(info)}
        if not self.zarr_nodes:
            if is_local(self.fs):
                self.fs.makedirs(self.folder, exist_ok=True)
            self._put(self._path(lease), body)
            return lease
        if not self.fs.exists(f"{self.folder}/zarr.json"):  # a store made before leases were Zarr nodes
            self._put(f"{self.folder}/zarr.json", GROUP_DOC)  # identical bytes from every writer: no race
        self._put(self._path(lease), {**GROUP_DOC, "attributes": body})
        return lease

    def drop(self, lease: str) -> None:
        self._remove(self._path(lease))

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        folder = path.rsplit("/", 1)[0]
        # a lease group's folder, left empty on a local disk, would be a non-Zarr object to Zarr readers
        if folder != self.folder and is_local(self.fs):
            try:
                os.rmdir(folder)
            except OSError:  # gone already, or not empty
                pass

    def _read(self, path: str) -> dict[str, Any] | None:
        """The lease at ``path``, either layout; None for what is no lease (the group's own
        zarr.json, a temporary file, an unreadable object)."""
        if path == f"{self.folder}/zarr.json" or not path.endswith(".json"):
            return None
        try:
            doc = read_json_fs(self.fs, path)
        except ValueError:  # not JSON: no lease of ours (leases are written whole)
            log.warning("ignoring %s: not a lease (not JSON)", path)
            return None
        if path.endswith("/zarr.json"):  # a lease group: the lease is its attributes
            doc = doc.get("attributes") if isinstance(doc, dict) else None
        return doc if isinstance(doc, dict) else None

    def others(self) -> list[dict[str, Any]]:
        """Leases of other writers; those of dead processes on this host are removed."""
        try:
            paths = self.fs.find(self.folder)
        except FileNotFoundError:
            return []
        out = []
        for path in sorted(paths):
            info = self._read(path)
            if info is None:
                continue
            if (
                info.get("host") == socket.gethostname()
                and isinstance(info.get("pid"), int)
                and not process_alive(info["pid"])
            ):
                self._remove(path)  # killed on this machine: its lease means nothing any more
                continue
            out.append(info)
        return out


def announce_writers(leases: WriterLeases, what: str, url: str) -> list[str]:
    """Warn about every other live writer of ``url`` (its host, pid, start and kind); the
    notices, one line each, for the run's summary. Take this run's own lease after."""
    notices = []
    for other in leases.others():
        notice = (
            f"another writer ({other.get('what', 'a run')}) into {url} is running or was killed on another host: "
            f"host {other.get('host')}, pid {other.get('pid')}, started {other.get('started')}; both write correct results, "
            "the work is done twice: stop one to save it"
        )
        log.warning(notice)
        notices.append(notice)
    return notices
