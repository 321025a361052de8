"""The clients a sharded store talks through: one fsspec filesystem and one Zarr store per
process and (URL, options).

Stores ship to Ray tasks as URL + options and reopen lazily (:class:`pipeline.store.layer.ShardedStore`);
every unpickled store in a Ray worker (one per task) would otherwise build a new S3 client,
~1 s of CPU each.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

from ..fs import StorageOptions, get_fs, local_path

_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(kind: str, url: str, storage_options: StorageOptions, extra: Any, make: Callable[[], Any]) -> Any:
    """``make()``'s client, made once per process and (kind, url, options, extra)."""
    key = (os.getpid(), kind, url, json.dumps(storage_options or {}, sort_keys=True, default=str), extra)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


def connect_fs(url: str, storage_options: StorageOptions) -> tuple[Any, str]:
    """(filesystem, root path without a trailing slash) of the store at ``url``."""
    fs, path = _shared("fs", url, storage_options, None, lambda: get_fs(url, storage_options))
    return fs, path.rstrip("/")


def make_zarr_store(url: str, storage_options: StorageOptions, read_only: bool) -> Any:
    """The Zarr store at ``url``: a ``LocalStore`` for a path, a shared ``FsspecStore`` otherwise."""
    from zarr.storage import FsspecStore, LocalStore

    if "://" not in url or url.startswith("file://"):
        return LocalStore(local_path(url), read_only=read_only)
    return _shared(
        "zarr",
        url,
        storage_options,
        read_only,
        lambda: FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only),
    )
