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
        raise UserError(f"{url}: this storage needs a package that is not installed ({exc}); pip install it, or use another URL") from None
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        proto = url.split("://", 1)[0]
        raise UserError(f"{url}: unknown storage protocol {proto!r}; use a local path or s3://, gs://, or another fsspec protocol") from None
    except TypeError as exc:  # an option the filesystem does not take (a typo in --storage-option)
        raise UserError(f"{url}: storage options {sorted(dict(storage_options or {}))} are not accepted by this storage ({exc})") from None


# Errors of the object-store clients the user fixes with settings, not code. Matched by class
# name: botocore, aiohttp and google-auth are optional here, so nothing is imported for it.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ClientConnectorDNSError", "ProxyConnectionError", "InvalidEndpointError", "ReadTimeoutError")


def storage_error_message(exc: BaseException) -> str | None:
    """One line saying what to fix for a storage error caused by settings (no or wrong
    credentials, an endpoint that does not answer, access denied); None for other errors."""
    names = {c.__name__ for c in type(exc).__mro__}
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if names & set(_NO_CREDENTIALS):
        return (f"no credentials for the object store ({type(exc).__name__}: {first}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS), give the machine a role, "
                "or pass --...storage-option anon=true for a public bucket")
    if names & set(_UNREACHABLE):
        return (f"cannot reach the object store ({type(exc).__name__}: {first}): check the endpoint "
                "(--...storage-option client_kwargs.endpoint_url=...), the network and the service")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        what = exc.filename or first
        return f"permission denied: {what} ({exc.strerror or first}); choose a location you may write to, or fix its permissions or credentials"
    return None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers, Ray Train's trial folders, run elsewhere); URLs as given."""
    return url if "://" in url else os.path.abspath(url)


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


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``train-{000..002}.tar`` -> three names (zero padding kept); several ranges multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
    return out


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
