"""A sharded store's manifest (which source shards are done): where it lives, reading it
with one clear line when damaged, and writing it whole.

The manifest is a Zarr group of its own, ``manifest/zarr.json``, its attributes the
manifest, the document written whole by the driver (one object, one writer, replaced
atomically, as ``manifest.json`` was), rather than the root group's attributes: the root
document holds the identity every open checks, and zarr writes attributes in place, not
atomically; a manifest of its own may be damaged (repair rebuilds it from the shard
groups) without making the store unrecognizable.
"""

from __future__ import annotations

import json
from typing import Any

from ..fs import StorageOptions, is_local, join, write_json_atomic
from .integrity import ManifestDamaged
from .leases import GROUP_DOC

MANIFEST = "manifest/zarr.json"
# Where stores made before kept the manifest. Still read when MANIFEST is absent, so that
# those stores keep working (their done shards are not extracted again); the driver's
# next manifest write (a commit, or `lcam cache repair`) moves it to MANIFEST.
LEGACY_MANIFEST = "manifest.json"


def read_manifest(fs: Any, root: str, url: str, kind: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest, the object it was read from): :data:`MANIFEST`, else a store's of
    before, :data:`LEGACY_MANIFEST`; (None, None) when neither exists. A damaged one is
    :class:`ManifestDamaged`, one line naming the object (``kind``: "feature cache", ...)."""
    for at in (MANIFEST, LEGACY_MANIFEST):
        try:
            data = fs.cat_file(f"{root}/{at}")
        except FileNotFoundError:
            continue
        return parse_manifest(data, at, url, kind), at
    return None, None


def parse_manifest(data: bytes, at: str, url: str, kind: str) -> dict[str, Any]:
    """The manifest in the bytes of the object ``at``; :class:`ManifestDamaged` when it is none."""
    why = ""
    try:
        doc = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        doc, why = (
            None,
            "empty (0 bytes)" if not data else f"not valid JSON, {len(data)} bytes ({str(exc).splitlines()[0][:80]})",
        )
    manifest = doc.get("attributes") if at == MANIFEST and isinstance(doc, dict) else doc
    if not why and not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), dict)):
        why = "not a manifest (no 'shards' object" + (" in its attributes)" if at == MANIFEST else ")")
    if why:
        raise ManifestDamaged(
            f"{kind} {url}: {at} is damaged: {why}. The data is intact; "
            f"rebuild the manifest from the shard groups present with `lcam cache repair {url}`"
        )
    return manifest


def write_manifest(
    fs: Any, root: str, url: str, manifest: dict[str, Any], storage_options: StorageOptions, replaces: str | None
) -> None:
    """Write ``manifest`` whole to :data:`MANIFEST`; ``replaces``: where it was read from (a
    store of before, or None when damaged or lost): its old object is removed after."""
    doc = {**GROUP_DOC, "attributes": manifest}  # a Zarr group document
    if is_local(fs):
        write_json_atomic(join(url, MANIFEST), doc, storage_options)
    else:  # one PUT is atomic on object stores (as in write_bytes_atomic), on the cached client
        fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(doc, indent=1, sort_keys=True).encode())
    # the old object goes after the new one is written: a crash between leaves both, MANIFEST read first
    if replaces != MANIFEST:
        try:
            fs.rm_file(f"{root}/{LEGACY_MANIFEST}")
        except FileNotFoundError:
            pass
