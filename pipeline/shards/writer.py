"""Writing WebDataset tar shards for :func:`pipeline.shards.pack.pack_folder`: one shard at a
time, hashed while it is written (its sha256 goes into ``index.json``), visible under its final
name only once complete (a local rename, or one whole upload to an object store)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import uuid
from typing import BinaryIO

import fsspec

from pipeline.fs import is_local


class HashingWriter:
    """File wrapper that hashes and counts what tarfile writes (no second read pass)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


TAR_TAIL = tarfile.RECORDSIZE + 2 * 512


class ShardWriter:
    """One shard at a time; visible under its final name only once complete."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str, prefix: str) -> None:
        self.fs, self.base, self.prefix, self.local = fs, base, prefix, is_local(fs)
        self.tmpdir = base if self.local else tempfile.mkdtemp(prefix="lcam-pack-")
        self.tar: tarfile.TarFile | None = None
        self.index = 0
        self.count = 0
        self.bytes = 0
        self.boxed = 0  # samples with boxes in the open shard

    def _open(self) -> None:
        self.name = f"{self.prefix}-{self.index:06d}.tar"
        self.tmp = os.path.join(self.tmpdir, f".{self.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.file = open(self.tmp, "wb")
        self.hw = HashingWriter(self.file)
        self.tar = tarfile.open(fileobj=self.hw, mode="w", format=tarfile.PAX_FORMAT)
        self.count = self.bytes = self.boxed = 0

    def add(
        self, key: str, members: list[tuple[str, bytes]], limit_samples: int, limit_bytes: int, boxed: bool = False
    ) -> dict | None:
        """Add one sample; returns the finished shard's entry when this sample started a new one."""
        size = sum(512 + -(-len(b) // 512) * 512 for _, b in members)  # headers + padded data
        done = None
        # tarfile.close() adds end-of-archive blocks padded to a 10 KiB record: reserve them.
        if self.tar is not None and (self.count >= limit_samples or self.bytes + size + TAR_TAIL > limit_bytes):
            done = self.finish()
        if self.tar is None:
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: same input, same sha256
            self.tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self.count += 1
        self.boxed += int(boxed)
        self.bytes += size
        return done

    def finish(self) -> dict | None:
        if self.tar is None:
            return None
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        entry = {"name": self.name, "count": self.count, "bytes": self.hw.n, "sha256": self.hw.h.hexdigest()}
        if self.boxed:  # how many of its samples carry boxes (their json member holds them)
            entry["boxes"] = self.boxed
        final = self.base.rstrip("/") + "/" + self.name
        if self.local:
            os.replace(self.tmp, final)
        else:
            self.fs.put_file(self.tmp, final)  # one whole upload: all or nothing
            os.remove(self.tmp)
        self.tar = None
        self.index += 1
        return entry

    def abort(self) -> None:
        if self.tar is not None:
            try:
                self.file.close()
            finally:
                self.tar = None
        if getattr(self, "tmp", None) and os.path.exists(self.tmp):
            os.remove(self.tmp)
        if not self.local:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def close(self) -> None:
        pass
