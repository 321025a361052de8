"""Batches for training L-CAM-Fm from a feature cache, many epochs, bounded memory.

Reads whole chunks (per-row reads are ~10x slower), shuffles chunk order plus an
in-memory shuffle buffer of ``buffer_rows`` rows, and prefetches ``prefetch_chunks``
chunks in background threads. Memory holds at most the buffer (``max(buffer_rows,
batch_size) + chunk_rows`` rows of ONE view) plus the prefetched chunks, whatever
the size of the cache.

An epoch's order is planned up front on row ids only (no I/O) from (seed, epoch),
then executed on data. The plan makes the order a pure function of (seed, epoch),
independent of thread timing, and lets :meth:`CacheLoader.iter_from` resume
mid-epoch: it reloads only the rows that were still in the buffer at that batch.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..store.dtypes import bf16_to_f32
from ..store.feature_cache import FeatureCache

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
log = logging.getLogger(__name__)


@dataclass
class LoaderStats:
    """Instrumentation for tests and logs (per iteration; reset by each ``iter_from``)."""

    chunks_read: int = 0
    rows_read: int = 0
    max_chunks_ahead: int = 0  # chunks submitted for reading but not yet copied into the buffer
    max_buffer_rows: int = 0  # rows held in the shuffle buffer
    buffer_capacity: int = 0
    ahead: int = 0


@dataclass
class _Plan:
    order: np.ndarray  # chunk indices in read order
    batches: list[np.ndarray]  # global row ids per batch
    need: np.ndarray  # need[b]: chunks of `order` that must be loaded before batch b
    views: np.ndarray  # view index per global row id


class CacheLoader:
    """Iterate ``(features float32 (B, C, h, w), targets int64 (B,), keys)`` over a cache.

    ``target``: ``"label"`` (ground truth; -1 is an error) or ``"predicted"`` (the
    backbone's top-1). ``view``: ``"random"`` (one of the V cached views per sample,
    from the seeded generator), ``"first"``, or a view index.
    """

    def __init__(
        self,
        cache: FeatureCache,
        batch_size: int = 64,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_rows: int = 2048,
        prefetch_chunks: int = 4,
        num_threads: int = 2,
        target: str = "label",
        view: str | int = "random",
        drop_last: bool = False,
        shard_ids: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if target not in ("label", "predicted"):
            raise UserError(f"target must be 'label' or 'predicted', got {target!r}")
        n_views = len(cache.views)
        if isinstance(view, str):
            if view not in ("random", "first"):
                raise UserError(f"view must be 'random', 'first' or an index, got {view!r}")
        elif not 0 <= int(view) < n_views:
            raise UserError(f"view {view} out of range: the cache holds {n_views} views {list(cache.views)}")
        if target == "label":
            folder_labelled = cache.folder_labelled_shards()
            if folder_labelled:
                log.warning(
                    "training on labels that are not the classifier's classes: %d shard(s) of %s (e.g. %s) were packed from class "
                    "folders that are not ImageNet WordNet ids, so label 0 is the first folder, which the classifier calls class 0 "
                    "(tench for ImageNet). Use --target predicted, or re-pack with --labels FILE mapping images to the classifier's classes.",
                    len(folder_labelled),
                    cache.url,
                    folder_labelled[0],
                )
        self.cache = cache
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.buffer_rows = max(0, int(buffer_rows))
        self.prefetch_chunks = max(1, int(prefetch_chunks))
        self.num_threads = max(1, int(num_threads))
        self.target = target
        self.view = view
        self.drop_last = drop_last
        self.epoch = 0
        self.stats = LoaderStats()
        # Natural order: shards in cache order, chunks in row order; global row id = offset + row.
        self._chunks: list[tuple[str, int, int, int]] = []  # (shard_id, chunk_index, rows, first row id)
        start = 0
        for sid in cache.shard_ids() if shard_ids is None else shard_ids:
            n = cache.num_rows(sid)
            for ci in range(math.ceil(n / cache.chunk_rows)):
                rows = min(cache.chunk_rows, n - ci * cache.chunk_rows)
                self._chunks.append((sid, ci, rows, start))
                start += rows
        self.num_rows = start
        self._threshold = max(self.buffer_rows, self.batch_size)
        self.capacity = self._threshold + cache.chunk_rows if shuffle else self.batch_size + cache.chunk_rows

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) order the next iteration follows."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows // self.batch_size if self.drop_last else math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    # ---- planning: row ids only, no I/O
    def _plan(self) -> _Plan:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_chunks, B = len(self._chunks), self.batch_size
        rows = np.array([c[2] for c in self._chunks], dtype=np.int64)
        starts = np.array([c[3] for c in self._chunks], dtype=np.int64)
        batches: list[np.ndarray] = []
        need: list[int] = []
        if not self.shuffle:
            order = np.arange(n_chunks)
            ends = np.cumsum(rows)
            for lo in range(0, self.num_rows, B):
                hi = min(lo + B, self.num_rows)
                batches.append(np.arange(lo, hi))
                need.append(int(np.searchsorted(ends, hi)) + 1 if hi < self.num_rows else n_chunks)
        else:
            order = rng.permutation(n_chunks)
            buf: list[int] = []  # row ids in the shuffle buffer (a list: swaps are per element)
            for pos, c in enumerate(order):
                buf.extend(range(int(starts[c]), int(starts[c] + rows[c])))
                while len(buf) >= self._threshold:
                    # Partial Fisher-Yates: a uniform random B-subset, in random order, moved
                    # to the end of the buffer and cut off. O(B) per batch.
                    fill = len(buf)
                    for i, j in enumerate(rng.integers(0, np.arange(fill, fill - B, -1)).tolist()):
                        last = fill - 1 - i
                        buf[j], buf[last] = buf[last], buf[j]
                    batches.append(np.array(buf[fill - B :], dtype=np.int64))
                    del buf[fill - B :]
                    need.append(pos + 1)
            rest = np.array(buf, dtype=np.int64)[rng.permutation(len(buf))]
            for lo in range(0, len(rest), B):
                batches.append(rest[lo : lo + B])
                need.append(n_chunks)
        if self.drop_last and batches and len(batches[-1]) < B:
            batches.pop()
            need.pop()
        n_views = len(self.cache.views)
        if self.view == "random":
            views = np.random.default_rng([self.seed, self.epoch, 1]).integers(n_views, size=self.num_rows)
        else:
            views = np.full(self.num_rows, 0 if self.view == "first" else int(self.view), dtype=np.int64)
        return _Plan(order, batches, np.asarray(need, dtype=np.int64), views)

    # ---- execution
    def iter_from(self, batch_index: int) -> Iterator[Batch]:
        """This epoch's batches from ``batch_index`` on: equal to the tail of a full epoch."""
        plan = self._plan()
        k = max(0, int(batch_index))
        if k >= len(plan.batches):
            return
        # Reads: rows still buffered at batch k (resume), then the chunks not yet read.
        base = int(plan.need[k]) if k > 0 else 0  # chunks of `order` whose rows were read before batch k
        reads: list[tuple[int, np.ndarray | None]] = []
        if base:
            pending = np.zeros(self.num_rows, dtype=bool)
            for c in plan.order[:base]:
                _, _, rows, start = self._chunks[c]
                pending[start : start + rows] = True
            for b in plan.batches[:k]:
                pending[b] = False
            for c in plan.order[:base]:
                _, _, rows, start = self._chunks[c]
                mask = pending[start : start + rows]
                if mask.any():
                    reads.append((int(c), mask.copy()))
        n_recover = len(reads)
        reads.extend((int(c), None) for c in plan.order[base:])
        need = [n_recover + int(plan.need[b]) - base for b in range(len(plan.batches))]
        yield from self._execute(plan, reads, need, k)

    def _load(
        self, item: tuple[int, np.ndarray | None], views: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Worker thread: read one chunk and keep only what the buffer needs (one view, target)."""
        c, mask = item
        sid, ci, rows, start = self._chunks[c]
        field = "labels" if self.target == "label" else "top5_classes"
        d = self.cache.read_chunk(sid, ci, fields=["features", field], raw=True)
        sel = np.arange(rows) if mask is None else np.flatnonzero(mask)
        gids = start + sel
        feats = d["features"][sel, views[gids]]  # fancy indexing copies: the full chunk is freed here
        tgt = d[field][sel] if self.target == "label" else d[field][sel, 0]
        keys = [d["keys"][i] for i in sel]
        if self.target == "label" and (tgt < 0).any():
            bad = [keys[i] for i in np.flatnonzero(tgt < 0)[:3]]
            raise UserError(
                f"sample {bad[0]!r} (shard {sid}) has no label (-1){' and others ' + str(bad[1:]) if len(bad) > 1 else ''}; "
                "train with target='predicted' (the backbone's top-1 class) or give the data labels"
            )
        if self.target == "label" and (tgt >= self.cache.num_classes).any():
            i = int(np.flatnonzero(tgt >= self.cache.num_classes)[0])
            raise UserError(
                f"sample {keys[i]!r} (shard {sid}) has class {int(tgt[i])}, outside the classifier's classes 0..{self.cache.num_classes - 1}: "
                "its shard's labels are not this classifier's; fix them (re-pack with a labels file) or train with target='predicted'"
            )
        return gids, feats, tgt.astype(np.int64), keys

    def _top_up(self, pool: ThreadPoolExecutor, inflight: deque, reads: list, next_read: int, views: np.ndarray) -> int:
        """Submit reads until ``prefetch_chunks`` are in flight; returns the next read index."""
        while next_read < len(reads) and len(inflight) < self.prefetch_chunks:
            inflight.append(pool.submit(self._load, reads[next_read], views))
            next_read += 1
            self.stats.ahead += 1
            self.stats.max_chunks_ahead = max(self.stats.max_chunks_ahead, self.stats.ahead)
        return next_read

    def _execute(
        self, plan: _Plan, reads: list[tuple[int, np.ndarray | None]], need: list[int], k: int
    ) -> Iterator[Batch]:
        self.stats = stats = LoaderStats(buffer_capacity=self.capacity)
        C, h, w = self.cache.feature_shape
        cap = self.capacity
        feat_buf: np.ndarray | None = None  # allocated on the first chunk (stored dtype known then)
        tgt_buf = np.empty(cap, dtype=np.int64)
        key_buf = np.empty(cap, dtype=object)
        slot_of = np.full(self.num_rows, -1, dtype=np.int64)
        free = np.arange(cap)[::-1].copy()
        top = cap  # free[:top] are free slots
        held = 0
        inflight: deque[Future] = deque()
        next_read = 0
        loaded = 0
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cache-loader")
        try:
            for b in range(k, len(plan.batches)):
                while loaded < need[b]:
                    next_read = self._top_up(pool, inflight, reads, next_read, plan.views)
                    gids, feats, tgt, keys = inflight.popleft().result()
                    m = len(gids)
                    if feat_buf is None:
                        feat_buf = np.empty((cap, C, h, w), dtype=feats.dtype)
                    slots = free[top - m : top]
                    top -= m
                    feat_buf[slots] = feats
                    tgt_buf[slots] = tgt
                    key_buf[slots] = keys
                    slot_of[gids] = slots
                    del feats, tgt, keys
                    loaded += 1
                    held += m
                    stats.ahead -= 1
                    stats.chunks_read += 1
                    stats.rows_read += m
                    stats.max_buffer_rows = max(stats.max_buffer_rows, held)
                    # Keep the read-ahead window full while the consumer trains.
                    next_read = self._top_up(pool, inflight, reads, next_read, plan.views)
                ids = plan.batches[b]
                slots = slot_of[ids]
                assert feat_buf is not None and (slots >= 0).all(), "loader plan and buffer out of step"
                feats = feat_buf[slots]
                feats_t = torch.from_numpy(
                    bf16_to_f32(feats) if self.cache.dtype == "bfloat16" else feats.astype(np.float32, copy=False)
                )
                targets = torch.from_numpy(tgt_buf[slots].copy())
                keys = key_buf[slots].tolist()
                free[top : top + len(slots)] = slots
                top += len(slots)
                held -= len(slots)
                slot_of[ids] = -1
                yield feats_t, targets, keys
        finally:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
