"""fsspec plumbing shared by every stage: URLs, atomic writes, shard patterns."""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

from .errors import UserError

StorageOptions = Mapping[str, Any] | None


def get_fs(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URL; an unknown protocol,
    a missing filesystem package or options it does not take are a :class:`UserError`."""
    try:
        return url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:  # e.g. gs:// without gcsfs: fsspec says which package to install
        raise UserError(
            f"{url}: this storage needs a package that is not installed ({exc}); pip install it, or use another URL"
        ) from None
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        proto = url.split("://", 1)[0]
        raise UserError(
            f"{url}: unknown storage protocol {proto!r}; use a local path or s3://, gs://, or another fsspec protocol"
        ) from None
    except TypeError as exc:  # an option the filesystem does not take (a typo in --storage-option)
        raise UserError(
            f"{url}: storage options {sorted(dict(storage_options or {}))} are not accepted by this storage ({exc})"
        ) from None


# Errors of the object-store clients the user fixes with settings, not code. Matched by class
# name: botocore, aiohttp and google-auth are optional here, so nothing is imported for it.
_NO_CREDENTIALS = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "CredentialRetrievalError",
)
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectorDNSError",
    "ProxyConnectionError",
    "InvalidEndpointError",
    "ReadTimeoutError",
)


def storage_error_message(exc: BaseException) -> str | None:
    """One line saying what to fix for a storage error caused by settings (no or wrong
    credentials, an endpoint that does not answer, access denied); None for other errors."""
    names = {c.__name__ for c in type(exc).__mro__}
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if names & set(_NO_CREDENTIALS):
        return (
            f"no credentials for the object store ({type(exc).__name__}: {first}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS), give the machine a role, "
            "or pass --...storage-option anon=true for a public bucket"
        )
    if names & set(_UNREACHABLE):
        return (
            f"cannot reach the object store ({type(exc).__name__}: {first}): check the endpoint "
            "(--...storage-option client_kwargs.endpoint_url=...), the network and the service"
        )
    full = _disk_full(exc)
    if full is not None:
        return (
            f"no space left on the device writing {full.filename or 'the output'} ({full.strerror or 'disk full'}): "
            "free space or give a location with room; what was finished is kept (nothing half-written counts as done) and a re-run resumes"
        )
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        what = exc.filename or first
        return f"permission denied: {what} ({exc.strerror or first}); choose a location you may write to, or fix its permissions or credentials"
    return None


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The disk-full or quota error in ``exc``'s chain (Ray wraps a task's error as its cause), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc, seen = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__, seen + 1
    return None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers, Ray Train's trial folders, run elsewhere); URLs as given."""
    return url if "://" in url else os.path.abspath(url)


def local_path(url: str) -> str:
    """A ``file://`` URL as the plain path it names; other URLs and paths unchanged."""
    return url[len("file://") :] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def write_bytes_atomic(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write so that readers see the old object or the whole new one, never a part.

    Local: a temporary name in the same folder, then ``os.replace``. Object stores
    (S3, GCS): a single PUT is already all-or-nothing.
    """
    fs, path = get_fs(url, storage_options)
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # disk full, quota: name the file being written, not the temporary
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise type(exc)(exc.errno, exc.strerror, path) from None
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(url: str, obj: Any, storage_options: StorageOptions = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: StorageOptions = None, default: Any = None) -> Any:
    fs, path = get_fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return default


def read_json_fs(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """:func:`read_json` on an already made client (``path`` inside ``fs``); None when absent."""
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$|^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")


def _brace_alternatives(body: str) -> list[str] | None:
    """What one ``{body}`` stands for: comma alternatives (split at top-level commas,
    nested braces left for later), a numeric range ``a..b[..step]`` (zero padding kept
    when either end has it) or a letter range; None when it is no expansion (``{x}``)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    if parts:
        return parts + [body[start:]]
    m = _RANGE.match(body)
    if not m:
        return None
    if m.group(1) is not None:
        lo_s, hi_s, step_s = m.group(1), m.group(2), m.group(3)
        lo, hi = int(lo_s), int(hi_s)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo_s, hi_s))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        step = abs(int(step_s or 1)) or 1
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [(f"-{str(-v).zfill(width - 1)}" if v < 0 else str(v).zfill(width)) for v in values]
    a, b, step = ord(m.group(4)), ord(m.group(5)), abs(int(m.group(6) or 1)) or 1
    return [chr(v) for v in (range(a, b + 1, step) if a <= b else range(a, b - 1, -step))]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, in order: ``{train,val}-{000..002}.tar`` -> six names.

    Comma lists, numeric ranges (``{000..009}`` keeps the zero padding, ``{0..10..5}``
    steps, descending ranges count down), letter ranges (``{a..c}``), nesting
    (``{a,b{1..2}}``) and several groups (a cartesian product, left group slowest). A
    brace group that expands to nothing (``{x}``, an unmatched ``{``) stays literal text.
    """
    depth_start: list[int] = []
    for i, c in enumerate(pattern):
        if c == "{":
            depth_start.append(i)
        elif c == "}" and depth_start:
            start = depth_start.pop()
            if depth_start:
                continue  # inner group: its outer group expands it (or it is expanded on its own later)
            alternatives = _brace_alternatives(pattern[start + 1 : i])
            if alternatives is None:
                # not an expansion: keep "{...}" literal, but still expand groups inside it
                inner = expand_braces(pattern[start + 1 : i])
                return [
                    pattern[:start] + "{" + x + "}" + rest for x in inner for rest in expand_braces(pattern[i + 1 :])
                ]
            prefix, suffixes = pattern[:start], expand_braces(pattern[i + 1 :])
            return [prefix + x + rest for alt in alternatives for x in expand_braces(alt) for rest in suffixes]
    return [pattern]


def expand_urls(patterns: str | list[str], storage_options: StorageOptions = None) -> list[str]:
    """Brace ranges and globs (``*``, ``?``, ``[..]``) to concrete URLs, in sorted order.

    A comma-free list or a single pattern; a glob that matches nothing is an error
    naming it, never an empty dataset.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            if any(c in name for c in "*?["):
                fs, path = get_fs(name, storage_options)
                found = sorted(fs.glob(path))
                if not found:
                    raise FileNotFoundError(f"no file matches {name!r}")
                proto = name.split("://", 1)[0] + "://" if "://" in name else ""
                urls.extend(proto + p if proto and not p.startswith(proto) else p for p in found)
            else:
                urls.append(name)
    return urls
