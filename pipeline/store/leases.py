"""Writer leases of a sharded store: ``leases/<id>.json``, one per running writer, so that a
second run into the same store is told about the first.

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

from ..fs import is_local, read_json_fs
from .identity import utc_now

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WriterLeases:
    """The ``leases/`` folder under a store's root ``root`` on the filesystem ``fs``."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.folder = fs, f"{root}/leases"

    def take(self, info: Mapping[str, Any]) -> str:
        """Announce a running writer (``info`` is recorded with host, pid and start time);
        :meth:`drop` the returned lease when done."""
        lease = uuid.uuid4().hex[:12]
        body = {"host": socket.gethostname(), "pid": os.getpid(), "started": utc_now(), **dict(info)}
        if is_local(self.fs):
            self.fs.makedirs(self.folder, exist_ok=True)
        self.fs.pipe_file(f"{self.folder}/{lease}.json", json.dumps(body).encode())
        return lease

    def drop(self, lease: str) -> None:
        try:
            self.fs.rm_file(f"{self.folder}/{lease}.json")
        except FileNotFoundError:
            pass

    def others(self) -> list[dict[str, Any]]:
        """Leases of other writers; those of dead processes on this host are removed."""
        try:
            paths = self.fs.find(self.folder)
        except FileNotFoundError:
            return []
        out = []
        for path in sorted(paths):
            info = read_json_fs(self.fs, path) or {}
            if (
                info.get("host") == socket.gethostname()
                and isinstance(info.get("pid"), int)
                and not _alive(info["pid"])
            ):
                try:  # killed on this machine: its lease means nothing any more
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
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
