"""CacheLoader over real Zarr caches: exact epochs, determinism, resume, bounded memory."""

from __future__ import annotations

import threading
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.loader import CacheLoader

SHAPE = (8, 4, 4)
SIZES = {"/d/s0.tar": 37, "/d/s1.tar": 0, "/d/s2.tar": 50, "/d/s3.tar": 13}  # 100 rows, 13 chunks of <= 8
IDENTITY = {"backbone": "toy", "weights_digest": "0" * 64}


def make_cache(
    url: str,
    sizes: dict[str, int],
    storage_options=None,
    chunk_rows: int = 8,
    views=("center", "hflip"),
    unlabelled: int = 0,
) -> tuple[FeatureCache, dict]:
    cache = FeatureCache.create_or_open(
        url, IDENTITY, feature_shape=SHAPE, views=views, chunk_rows=chunk_rows, storage_options=storage_options
    )
    truth: dict[str, dict] = {}
    entries = []
    for i, (src, n) in enumerate(sizes.items()):
        rng = np.random.default_rng(i)
        keys = [f"s{i}/{j:04d}" for j in range(n)]
        feats = rng.standard_normal((n, len(views), *SHAPE), dtype=np.float32)
        labels = rng.integers(0, 1000, n)
        labels[:unlabelled] = -1
        top5 = rng.integers(0, 1000, (n, 5))
        entries.append(cache.write_shard(src, keys, labels, feats, top5, rng.random((n, 5))))
        f16 = feats.astype(np.float16).astype(np.float32)  # what the cache returns, exactly
        for j, k in enumerate(keys):
            truth[k] = {"features": f16[j], "label": int(labels[j]), "top1": int(top5[j, 0])}
    cache.mark_done(entries)
    return FeatureCache.open(url, storage_options), truth


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return make_cache(str(tmp_path_factory.mktemp("loader") / "cache"), SIZES)


def keys_of(batches) -> list[str]:
    return [k for _, _, keys in batches for k in keys]


def test_every_row_once_per_epoch_with_right_values(cached):
    cache, truth = cached
    loader = CacheLoader(cache, batch_size=16, buffer_rows=24, prefetch_chunks=3, target="predicted", view="first")
    assert len(loader) == 7
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [len(k) for _, _, k in batches] == [16] * 6 + [4]
        assert Counter(keys_of(batches)) == Counter(list(truth))  # exact multiset: each key once
        for feats, targets, keys in batches:
            assert feats.dtype == torch.float32 and feats.shape == (len(keys), *SHAPE)
            assert targets.dtype == torch.int64
            for f, t, k in zip(feats, targets, keys):
                np.testing.assert_array_equal(f.numpy(), truth[k]["features"][0])
                assert int(t) == truth[k]["top1"]
    dropped = CacheLoader(cache, batch_size=16, drop_last=True, target="predicted")
    batches = list(dropped)
    assert len(dropped) == len(batches) == 6 and all(len(k) == 16 for _, _, k in batches)
    assert len(set(keys_of(batches))) == 96


def test_order_is_a_function_of_seed_and_epoch(cached):
    cache, _ = cached
    kw = dict(batch_size=10, buffer_rows=20, target="predicted")

    def order(seed: int, epoch: int) -> list[str]:
        loader = CacheLoader(cache, seed=seed, **kw)
        loader.set_epoch(epoch)
        return keys_of(loader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 3) == order(0, 3)
    # Shuffled beyond chunk boundaries: consecutive output keys rarely come from the same chunk.
    o = order(0, 0)
    assert (
        sum(a.split("/")[0] == b.split("/")[0] and abs(int(a[-4:]) - int(b[-4:])) == 1 for a, b in zip(o, o[1:])) < 20
    )


def test_no_shuffle_equals_iter_rows(cached):
    cache, _ = cached
    loader = CacheLoader(cache, batch_size=12, shuffle=False, target="predicted", view="first")
    got = list(loader)
    want = list(cache.iter_rows(batch_size=12, view=0))
    assert len(got) == len(want) == len(loader)
    for (f, t, k), (wk, wf, wl, wt) in zip(got, want):
        assert k == wk
        np.testing.assert_array_equal(f.numpy(), wf)
        np.testing.assert_array_equal(t.numpy(), wt)
    assert keys_of(got) == [k for b in want for k in b[0]]


def test_targets_label_and_predicted(tmp_path):
    cache, truth = make_cache(str(tmp_path / "c"), {"/d/a.tar": 20}, unlabelled=3)
    for _, targets, keys in CacheLoader(cache, 8, target="predicted"):
        assert targets.tolist() == [truth[k]["top1"] for k in keys]
    with pytest.raises(UserError, match=r"sample 's0/000[0-2]'.*no label.*target='predicted'"):
        list(CacheLoader(cache, 8, target="label"))
    labelled, truth = make_cache(str(tmp_path / "l"), {"/d/a.tar": 20})
    for _, targets, keys in CacheLoader(labelled, 8, target="label"):
        assert targets.tolist() == [truth[k]["label"] for k in keys]
    with pytest.raises(UserError, match="target"):
        CacheLoader(cache, target="guess")


def test_view_choice(cached):
    cache, truth = cached

    def views_used(loader: CacheLoader) -> dict[str, int]:
        out = {}
        for feats, _, keys in loader:
            for f, k in zip(feats, keys):
                match = [v for v in range(2) if np.array_equal(f.numpy(), truth[k]["features"][v])]
                assert len(match) == 1
                out[k] = match[0]
        return out

    rand = views_used(CacheLoader(cache, 16, view="random", target="predicted", seed=5))
    assert 30 < sum(rand.values()) < 70  # both views, about half each
    assert views_used(CacheLoader(cache, 16, view="random", target="predicted", seed=5)) == rand
    assert set(views_used(CacheLoader(cache, 16, view=1, target="predicted")).values()) == {1}
    assert set(views_used(CacheLoader(cache, 16, view="first", target="predicted")).values()) == {0}
    with pytest.raises(UserError, match="out of range"):
        CacheLoader(cache, view=2)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_equals_tail_of_full_epoch(cached, shuffle):
    cache, _ = cached
    loader = CacheLoader(
        cache,
        batch_size=8,
        buffer_rows=20,
        prefetch_chunks=2,
        shuffle=shuffle,
        seed=3,
        view="random",
        target="predicted",
    )
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == 13
    for k in (1, 2, 5, 9, 12, 13):
        tail = list(loader.iter_from(k))
        assert [b[2] for b in tail] == [b[2] for b in full[k:]]
        for (f1, t1, _), (f2, t2, _) in zip(tail, full[k:]):
            assert torch.equal(f1, f2) and torch.equal(t1, t2)
        # A resume re-reads only the rows still buffered, never more than the buffer holds.
        assert loader.stats.rows_read <= 100 - 8 * k + loader.capacity


class CountingCache:
    """Wraps a cache: counts reads, concurrent reads and chunk arrays still alive."""

    def __init__(self, cache: FeatureCache) -> None:
        self._cache = cache
        self.lock = threading.Lock()
        self.reads = self.running = self.max_running = self.alive = self.max_alive = 0

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def _gone(self) -> None:
        with self.lock:
            self.alive -= 1

    def read_chunk(self, *args, **kwargs):
        with self.lock:
            self.reads += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            out = self._cache.read_chunk(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1
        with self.lock:
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(out["features"], self._gone)
        return out


def test_memory_is_bounded_by_buffer_and_prefetch(tmp_path):
    cache, truth = make_cache(
        str(tmp_path / "many"), {f"/d/s{i:02d}.tar": 40 for i in range(12)}, chunk_rows=4, views=("center",)
    )
    counting = CountingCache(cache)  # 120 chunks of 4 rows
    loader = CacheLoader(counting, batch_size=8, buffer_rows=16, prefetch_chunks=3, num_threads=2, target="predicted")
    assert loader.capacity == 16 + 4
    it = iter(loader)
    next(it)
    # The first batch needs 16 buffered rows = 4 chunks; at most 3 more are read ahead.
    assert counting.reads <= 4 + 3
    rest = list(it)
    assert len(rest) + 1 == len(loader) == 60
    assert counting.reads == 120  # every chunk read exactly once per epoch
    s = loader.stats
    assert s.chunks_read == 120 and s.rows_read == 480
    assert s.max_chunks_ahead <= 3
    assert s.max_buffer_rows <= loader.capacity
    assert counting.max_running <= 2
    assert counting.max_alive <= 3  # whole chunks are dropped once their rows are in the buffer


def test_loader_over_s3(s3):
    bucket, options = s3
    cache, truth = make_cache(f"{bucket}/cache", {"s3://src/a.tar": 21, "s3://src/b.tar": 11}, storage_options=options)
    loader = CacheLoader(cache, batch_size=8, buffer_rows=8, target="predicted", view="first")
    batches = list(loader)
    assert Counter(keys_of(batches)) == Counter(list(truth))
    for feats, targets, keys in batches:
        for f, t, k in zip(feats, targets, keys):
            np.testing.assert_array_equal(f.numpy(), truth[k]["features"][0])
            assert int(t) == truth[k]["top1"]
