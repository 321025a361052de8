"""What a sharded store records about itself: its identity, the fingerprint of that
identity, how two identities differ, the name of each source shard's group and the empty
manifest a new store starts from.

Pure functions over strings and JSON-able values (no filesystem, no Zarr):
:class:`pipeline.store.layer.ShardedStore` compares what a URL holds against what a run asks for
with them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import re
from typing import Any, Mapping

from ..fs import local_path


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


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any], holder: str) -> list[str]:
    """Human-readable list of dotted fields that differ between two identities, as
    ``<field>: <holder> has <old>, requested <new>`` (``holder``: what holds ``old``)."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))

    def short(v: Any) -> str:
        s = json.dumps(v) if v is not None else "(absent)"
        return s if len(s) <= 60 else s[:57] + "..."

    return [
        f"{k}: {holder} has {short(a.get(k))}, requested {short(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def shard_id_for(source_url: str) -> str:
    """The name of a source shard's group: readable, path-safe, deterministic,
    ``<basename without .tar>-<8 hex of the full URL>``.

    The hash keeps ``a/shard-000000.tar`` and ``b/shard-000000.tar`` apart.
    """
    url = local_path(source_url)
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:80] or "shard"
    return f"{base}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Package versions from metadata (importing torch only for its version costs seconds)."""
    import importlib.metadata

    out = {}
    for name in ("torch", "zarr", "lcam"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def new_manifest(fingerprint: str, fmt: str) -> dict[str, Any]:
    """An empty manifest of a store of format ``fmt``."""
    now = utc_now()
    return {
        "format": fmt,
        "fingerprint": fingerprint,
        "shards": {},
        "expected_counts": {},
        "versions": dict(package_versions()),
        "created": now,
        "updated": now,
    }
