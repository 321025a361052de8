"""List and read WebDataset shards.

Readers trust nothing but the index: a tar cut at a member boundary is a valid, shorter
tar to ``tarfile``, webdataset and Ray alike, so :func:`read_shard` compares the sample
count with ``index.json`` and fails loudly on a difference.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tarfile
from typing import Any, BinaryIO, Iterable, Iterator

import fsspec

from pipeline.errors import UserError
from pipeline.fs import StorageOptions, expand_urls, get_fs, join, read_json

from .format import (
    INDEX_FORMAT,
    INDEX_NAME,
    JSON_LABEL_KEYS,
    READ_IMAGE_EXTS,
    Sample,
    ShardChecksumMismatch,
    ShardCountMismatch,
    ShardInfo,
    ShardReadError,
    as_int,
)

# --------------------------------------------------------------------------- listing


def _has_pattern(s: str) -> bool:
    return any(c in s for c in "*?[{")


def _load_index(url: str, storage_options: StorageOptions) -> dict | None:
    index = read_json(url, storage_options)
    if index is None:
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise UserError(f"{url} is not a shard index of format {INDEX_FORMAT}")
    return index


def image_folder_hint(patterns: str | list[str]) -> str:
    """When a local folder of images was given where shards are expected: how to pack it."""
    import os

    folder = patterns if isinstance(patterns, str) else (patterns[0] if len(patterns) == 1 else "")
    if not folder or "://" in folder or not os.path.isdir(folder):
        return ""
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in (".jpg", ".jpeg", ".png", ".webp") for f in files):
            return f"; {folder} is a folder of images: pack it into shards first, `lcam shards {folder} SHARDS`, then give SHARDS"
    return ""


def require_shards(
    patterns: str | list[str],
    storage_options: StorageOptions = None,
    index_url: str | None = None,
) -> list[ShardInfo]:
    """:func:`list_shards` for a stage's input: a missing folder or a pattern matching
    nothing is a :class:`UserError` naming the pattern."""
    try:
        shards = list_shards(patterns, storage_options=storage_options, index_url=index_url)
    except FileNotFoundError as exc:
        raise UserError(f"shards {patterns!r}: {exc}" + image_folder_hint(patterns)) from None
    if not shards:
        raise UserError(
            f"no shards match {patterns!r}: check the pattern, or pack images with `lcam shards`"
            + image_folder_hint(patterns)
        )
    return shards


def list_shards(
    patterns: str | list[str],
    storage_options: StorageOptions = None,
    index_url: str | None = None,
) -> list[ShardInfo]:
    """Shard URLs from brace ranges, globs, single .tar URLs or folders holding ``index.json``.

    Counts and checksums come from ``index_url`` when given, else from an ``index.json``
    beside each shard; shards with no index entry (made elsewhere) get ``count=None``.
    A folder with no index yields its ``*.tar`` files.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for p in patterns:
        if _has_pattern(p) or p.endswith(".tar"):
            urls += expand_urls(p, storage_options)
            continue
        folder = p.rstrip("/")
        index = _load_index(join(folder, INDEX_NAME), storage_options)
        if index is not None:
            urls += [join(folder, e["name"]) for e in index["shards"]]
            continue
        fs, path = get_fs(folder, storage_options)
        if not fs.isdir(path):
            raise FileNotFoundError(f"{p}: no such shard folder (and not a .tar, brace or glob pattern)")
        found = expand_urls(join(folder, "*.tar"), storage_options)
        urls += found

    fixed: dict[str, dict] = {}
    if index_url is not None:
        index = _load_index(index_url, storage_options)
        if index is None:
            raise FileNotFoundError(f"index {index_url} does not exist")
        root = index_url.rsplit("/", 1)[0]
        scheme = (index.get("labels") or {}).get("scheme")
        fixed = {join(root, e["name"]): {**e, "labels_scheme": scheme} for e in index["shards"]}
        by_name = {e["name"]: {**e, "labels_scheme": scheme} for e in index["shards"]}

    beside: dict[str, dict[str, dict]] = {}
    out = []
    for url in urls:
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if index_url is not None:
            entry = fixed.get(url) or by_name.get(name)
        else:
            if folder not in beside:
                idx = _load_index(join(folder, INDEX_NAME), storage_options)
                scheme = (idx.get("labels") or {}).get("scheme") if idx else None
                beside[folder] = {e["name"]: {**e, "labels_scheme": scheme} for e in idx["shards"]} if idx else {}
            entry = beside[folder].get(name)
        out.append(
            ShardInfo(
                url,
                name,
                entry["count"] if entry else None,
                entry.get("sha256") if entry else None,
                entry.get("labels_scheme") if entry else None,
                entry.get("boxes") if entry else None,
            )
        )
    return out


# --------------------------------------------------------------------------- reading


def _label(d: dict, meta: dict) -> int:
    if "cls" in d:
        v = as_int(d["cls"].decode("utf-8", "replace").strip())
        if v is not None:
            return v
    for k in JSON_LABEL_KEYS:
        v = meta.get(k)
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            return v
        if isinstance(v, str) and as_int(v.strip()) is not None:
            return int(v.strip())
    return -1


def _to_sample(d: dict) -> Sample:
    ext = next((e for e in READ_IMAGE_EXTS if e in d), "")
    meta: dict = {}
    if "json" in d:
        try:
            parsed = json.loads(d["json"])
            meta = parsed if isinstance(parsed, dict) else {"json": parsed}
        except (ValueError, UnicodeDecodeError) as exn:
            meta = {"json_error": str(exn)}
    return Sample(key=d["__key__"], image=d[ext] if ext else b"", ext=ext, label=_label(d, meta), meta=meta)


def _samples_from_stream(stream: BinaryIO, url: str) -> Iterator[Sample]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander([{"url": url, "stream": stream}])
    try:
        for d in group_by_keys(files):
            yield _to_sample(d)
    except (tarfile.TarError, EOFError, ValueError) as exn:
        # webdataset appends " @ <stream repr>" to the message; keep the readable part.
        reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
        raise ShardReadError(
            f"shard {url} is damaged ({reason}): probably cut off during a copy or upload; re-download or re-pack it"
        ) from exn


def iter_samples(url: str, storage_options: StorageOptions = None) -> Iterator[Sample]:
    """Stream one tar shard (local or any fsspec URL) as samples grouped by key.

    Every sample is yielded, also one without an image (``image=b""``), so callers can
    report it instead of losing it silently.
    """
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        yield from _samples_from_stream(f, url)


_END_BYTES = 1024  # a tar ends with two 512-byte zero blocks


def _check_end_of_archive(tail: bytes, size: int, url: str) -> None:
    """A tar cut at a member boundary reads as a valid shorter tar; only its missing
    end-of-archive blocks tell. Compressed shards (.tar.gz) carry no such blocks outside
    the compression and are left to the decompressor's own checks."""
    if url.endswith((".gz", ".tgz")) or tail[:2] == b"\x1f\x8b":
        return
    if size < _END_BYTES or tail[-_END_BYTES:] != bytes(_END_BYTES):
        raise ShardReadError(
            f"shard {url} is damaged (it ends without the tar end-of-archive blocks after {size} bytes): probably cut off "
            "during a copy or upload, so samples may be missing; re-download or re-pack it"
        )


class _HashingReader:
    """A read-only stream that hashes (sha256) what passes through it and keeps the last
    bytes: one pass over a shard gives its samples, its digest and its tail."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size, self.tail = f, hashlib.sha256(), 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        self.tail = (self.tail + data)[-_END_BYTES:]
        return data

    def drain(self) -> None:
        """Read to the end (a tar reader stops at the end blocks, some bytes may follow)."""
        while self.read(1 << 20):
            pass


def read_shard(
    info: ShardInfo | str, storage_options: StorageOptions = None, verify_sha256: bool = True
) -> list[Sample]:
    """All samples of a shard, checked against the index: the count and (``verify_sha256``,
    the default) the sha256, hashed while the tar streams (no second read).

    Raises :class:`ShardCountMismatch` when the index says N but the tar holds another
    number: a tar cut at a member boundary reads without any error otherwise;
    :class:`ShardChecksumMismatch` when the bytes differ from what was packed.
    """
    if isinstance(info, str):
        info = ShardInfo(info, info.rsplit("/", 1)[-1])
    fs, path = get_fs(info.url, storage_options)
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        samples = list(_samples_from_stream(reader, info.url))  # type: ignore[arg-type]
        reader.drain()
    if info.count is not None and len(samples) != info.count:
        with_image = sum(1 for s in samples if s.image)
        raise ShardCountMismatch(
            f"shard {info.url}: the index says {info.count} samples but the tar holds {len(samples)} "
            f"({with_image} with an image); "
            f"the file is incomplete or not the one the index describes: re-download it, or re-pack the dataset "
            f"(lcam shards SRC OUT)",
            shard=info.url,
            expected=info.count,
            actual=len(samples),
        )
    if info.count is not None:  # our own packer wrote an image into every sample
        empty = [s.key for s in samples if not s.image]
        if empty:
            raise ShardReadError(
                f"shard {info.url}: sample {empty[0]!r} has no image member ({len(empty)} such): the shard is "
                "incomplete; re-download it or re-pack the dataset"
            )
    digest = reader.sha.hexdigest()
    if verify_sha256 and info.sha256 and digest != info.sha256:
        raise ShardChecksumMismatch(
            f"shard {info.url}: its bytes changed since packing (sha256 {digest[:16]}..., the index records {info.sha256[:16]}...); "
            "re-download or re-pack it"
        )
    _check_end_of_archive(
        reader.tail, reader.size, info.url
    )  # last: a known count or a lost image names the loss better
    return samples


# --------------------------------------------------------------------------- webdataset


def register_fsspec_opener(
    storage_options: StorageOptions = None, schemes: Iterable[str] = ("s3", "gs", "gcs")
) -> None:
    """Let ``webdataset.WebDataset("s3://...")`` open URLs through fsspec.

    webdataset has no s3:// opener of its own (and gs:// shells out to gsutil). The
    registration is per process: call it inside each Ray worker / DataLoader worker too.
    """
    opts = dict(storage_options or {})

    def _open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
        return fsspec.open(url, mode, **opts).open()

    table = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in schemes:
        table[scheme] = _open
