"""Feature cache on real Zarr v3 stores: local folders and moto's S3 over HTTP."""

from __future__ import annotations

import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr

from pipeline.errors import UserError
from pipeline.fs import get_fs, join
from pipeline.store.clients import make_zarr_store
from pipeline.store.feature_cache import CacheMismatch, CacheNotFound, FeatureCache, NonFiniteFeatures
from pipeline.store.identity import shard_id_for

SHAPE = (16, 7, 7)
IDENTITY = {
    "backbone": "toy",
    "weights_digest": "a" * 64,
    "layer": "features",
    "preprocessing": {"resize": 256, "crop": 224},
}
# float16 keeps 11 significant bits: |x - f16(x)| <= 2**-11 |x| for normal values (atol for subnormals).
F16_RTOL, F16_ATOL = 2.0**-11, 1e-7
BF16_RTOL = 2.0**-8


def rows(n: int, seed: int, prefix: str, views: int = 1, scale: float = 4.0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "keys": [f"{prefix}/{i:05d}" for i in range(n)],
        "labels": rng.integers(-1, 1000, n),
        "features": (rng.random((n, views, *SHAPE), dtype=np.float32) * scale),
        "top5_classes": rng.integers(0, 1000, (n, 5)),
        "top5_probs": rng.random((n, 5), dtype=np.float32),
    }


def create(url: str, storage_options=None, **kw) -> FeatureCache:
    kw.setdefault("chunk_rows", 8)
    return FeatureCache.create_or_open(url, IDENTITY, feature_shape=SHAPE, storage_options=storage_options, **kw)


def write(cache: FeatureCache, source: str, r: dict) -> dict:
    return cache.write_shard(source, r["keys"], r["labels"], r["features"], r["top5_classes"], r["top5_probs"])


def files_under(url: str, storage_options=None) -> dict[str, bytes]:
    fs, path = get_fs(url, storage_options)
    return {p[len(path) :]: fs.cat_file(p) for p in fs.find(path)}


def check_round_trip(url: str, storage_options=None, dtype: str = "float16", views: tuple = ("center",)) -> None:
    cache = create(url, storage_options, dtype=dtype, views=views)
    data = {
        "/d/b/shard-000001.tar": rows(21, 1, "b", len(views)),
        "/d/a/shard-000000.tar": rows(10, 2, "a", len(views)),
    }
    entries = [write(cache, src, r) for src, r in data.items()]
    assert [e["count"] for e in entries] == [21, 10]
    cache.mark_done(entries)

    ro = FeatureCache.open(url, storage_options)
    # Deterministic order: sorted by source URL, rows in written order.
    assert ro.shard_ids() == [shard_id_for("/d/a/shard-000000.tar"), shard_id_for("/d/b/shard-000001.tar")]
    assert len(ro) == 31 and ro.num_rows(ro.shard_ids()[1]) == 21 and ro.num_chunks(ro.shard_ids()[1]) == 3
    for src in sorted(data):
        r, sid = data[src], shard_id_for(src)
        got = [ro.read_chunk(sid, ci) for ci in range(ro.num_chunks(sid))]
        assert [len(g["keys"]) for g in got] == [8] * (len(r["keys"]) // 8) + (
            [len(r["keys"]) % 8] if len(r["keys"]) % 8 else []
        )
        feats = np.concatenate([g["features"] for g in got])
        assert sum((g["keys"] for g in got), []) == r["keys"]
        if dtype == "float16":
            assert feats.dtype == np.float16
            np.testing.assert_array_equal(feats, r["features"].astype(np.float16))
            np.testing.assert_allclose(feats.astype(np.float32), r["features"], rtol=F16_RTOL, atol=F16_ATOL)
        elif dtype == "bfloat16":
            assert feats.dtype == np.float32  # decoded from the uint16 bits
            np.testing.assert_allclose(feats, r["features"], rtol=BF16_RTOL)
        else:
            np.testing.assert_array_equal(feats, r["features"])
        np.testing.assert_array_equal(np.concatenate([g["labels"] for g in got]), r["labels"])
        np.testing.assert_array_equal(np.concatenate([g["top5_classes"] for g in got]), r["top5_classes"])
        np.testing.assert_array_equal(np.concatenate([g["top5_probs"] for g in got]), r["top5_probs"])

    # iter_rows: batches across shard boundaries, in shard order then row order.
    batches = list(ro.iter_rows(batch_size=12, view=len(views) - 1))
    assert [len(b[0]) for b in batches] == [12, 12, 7]
    keys = sum((b[0] for b in batches), [])
    assert keys == data["/d/a/shard-000000.tar"]["keys"] + data["/d/b/shard-000001.tar"]["keys"]
    expect = np.concatenate([data[s]["features"][:, -1] for s in sorted(data)])
    np.testing.assert_allclose(
        np.concatenate([b[1] for b in batches]),
        expect,
        rtol=BF16_RTOL if dtype == "bfloat16" else F16_RTOL,
        atol=F16_ATOL,
    )
    np.testing.assert_array_equal(
        np.concatenate([b[3] for b in batches]), np.concatenate([data[s]["top5_classes"][:, 0] for s in sorted(data)])
    )

    info = ro.info(expected_sources=[*data, "/d/c/shard-000002.tar"])
    item = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    assert info["samples"] == 31 and info["shards_done"] == 2
    assert info["shards_missing"] == ["/d/c/shard-000002.tar"]
    assert info["raw_bytes"] == 31 * (len(views) * 16 * 49 * item + 4 + 40)
    assert info["bytes_on_disk"] > 0 and info["compression_ratio"] == pytest.approx(
        info["raw_bytes"] / info["bytes_on_disk"], rel=1e-3
    )
    assert info["identity"]["cache"]["views"] == list(views) and info["fingerprint"] == ro.fingerprint
    assert ro.verify({s: len(r["keys"]) for s, r in data.items()}).ok


@pytest.mark.parametrize(
    "dtype,views", [("float16", ("center",)), ("bfloat16", ("center", "hflip")), ("float32", ("center", "hflip"))]
)
def test_round_trip_local(tmp_path, dtype, views):
    check_round_trip(str(tmp_path / "cache"), dtype=dtype, views=views)


def test_round_trip_s3(s3):
    bucket, options = s3
    check_round_trip(f"{bucket}/caches/c1", options, views=("center", "hflip"))


def test_shard_id_is_readable_safe_and_distinct():
    a = shard_id_for("s3://bucket/train/shard-000000.tar")
    assert a == shard_id_for("s3://bucket/train/shard-000000.tar")
    assert a.startswith("shard-000000-") and re.fullmatch(r"[A-Za-z0-9._-]+", a)
    assert a != shard_id_for("s3://bucket/val/shard-000000.tar")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", shard_id_for("/x/we ird:name?.tar"))


def test_leases_report_other_writers_and_forget_the_dead_of_this_host(tmp_path):
    """leases/: a live writer's lease and another host's are reported; a lease of a process
    that died on this host is removed when seen (as a Zarr group, or a leases/<id>.json a
    writer of before left), and so is one of a writer that ended but is not yet reaped (a
    zombie: signal 0 still reaches it); a writer drops its own, and its group's folder with it."""
    import os
    import socket
    import subprocess
    import sys
    import time

    cache = create(str(tmp_path / "cache"))
    mine = cache.leases.take({"todo": 3})
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    folder = tmp_path / "cache" / "leases"
    assert json.loads((folder / mine / "zarr.json").read_text())["attributes"]["todo"] == 3
    (folder / "dead.json").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "todo": 1}))
    (folder / "away.json").write_text(json.dumps({"host": "another-host", "pid": int(dead.stdout), "todo": 2}))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited for until the end
    end = time.time() + 30
    while time.time() < end and open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    (folder / "zombie.json").write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid, "todo": 5}))
    (folder / "deadgroup").mkdir()
    (folder / "deadgroup" / "zarr.json").write_text(
        json.dumps(
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"host": socket.gethostname(), "pid": int(dead.stdout), "todo": 4},
            }
        )
    )
    others = FeatureCache.open(str(tmp_path / "cache")).leases.others()
    zombie.wait()
    assert sorted((o["host"], o["pid"], o["todo"]) for o in others) == sorted(
        [("another-host", int(dead.stdout), 2), (socket.gethostname(), os.getpid(), 3)]
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(["away.json", mine, "zarr.json"])
    cache.leases.drop(mine)
    cache.leases.drop(mine)  # twice: nothing left to remove is no error
    assert sorted(p.name for p in folder.iterdir()) == ["away.json", "zarr.json"]


def _members_without_warnings(url: str, storage_options=None) -> list[str]:
    """Every node of the store, listed the way any Zarr user would, with warnings as errors."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open(url, mode="r", storage_options=storage_options)
        if storage_options:  # s3fs caches listings per client: list as a new reader would, not
            group.store.fs.invalidate_cache()  # what this process's client listed before a drop
        return sorted(name for name, _ in group.members(max_depth=None))


def _check_lists_as_zarr(url: str, storage_options=None) -> None:
    cache = create(url, storage_options)
    cache.mark_done([write(cache, "/d/s0.tar", rows(5, 0, "s0")), write(cache, "/d/s1.tar", rows(9, 1, "s1"))])
    lease = cache.leases.take({"todo": 1})
    sids = [shard_id_for("/d/s0.tar"), shard_id_for("/d/s1.tar")]
    arrays = ["features", "labels", "top5_classes", "top5_probs"]
    assert _members_without_warnings(url, storage_options) == sorted(
        ["shards", "manifest", "leases", f"leases/{lease}", *(f"shards/{s}" for s in sids)]
        + [f"shards/{s}/{a}" for s in sids for a in arrays]
    )
    manifest = zarr.open_group(url, path="manifest", mode="r", storage_options=storage_options)
    assert set(manifest.attrs["shards"]) == {"/d/s0.tar", "/d/s1.tar"}  # the manifest, as a Zarr user reads it
    cache.leases.drop(lease)
    assert "leases" in _members_without_warnings(url, storage_options)  # the group stays, the lease's is gone
    assert not [m for m in _members_without_warnings(url, storage_options) if m.startswith("leases/")]


def test_store_lists_as_zarr_without_warnings(tmp_path):
    """Issue 29: every object of a store is part of a Zarr node (the manifest and the leases
    too), so zarr lists it all without a warning; xarray opens a shard group with its axes
    named, and to_xarray still joins the groups."""
    import xarray as xr

    url = str(tmp_path / "cache")
    _check_lists_as_zarr(url)
    sid = shard_id_for("/d/s1.tar")
    ds = xr.open_zarr(url, group=f"shards/{sid}", consolidated=False)
    assert ds["features"].dims == ("sample", "view", "channel", "y", "x") and ds.sizes["sample"] == 9
    assert ds.attrs["source"] == "/d/s1.tar"
    whole = FeatureCache.open(url).to_xarray()
    assert whole.sizes["sample"] == 14 and list(whole["key"].values[:1]) == ["s0/00000"]


def test_store_lists_as_zarr_without_warnings_s3(s3):
    bucket, options = s3
    _check_lists_as_zarr(f"{bucket}/cache", options)


def test_cam_store_lists_as_zarr_without_warnings(tmp_path):
    from pipeline.store.cam_store import CamStore

    url = str(tmp_path / "cams")
    store = CamStore.create_or_open(url, {"maps": {"classes_per_sample": 2, "map_size": [3, 3]}})
    rng = np.random.default_rng(0)
    n = 4
    maps = {
        "key": [f"k{i}" for i in range(n)],
        "label": np.arange(n),
        "class_ids": rng.integers(0, 10, (n, 2)),
        "probs": rng.random((n, 2)),
        "raw": rng.random((n, 2, 3, 3)),
        "predicted": np.arange(n),
        "predicted_prob": rng.random(n),
    }
    store.mark_done([store.write_shard("/d/s0.tar", maps)])
    lease = store.leases.take({"what": "CAM generation"})
    sid = shard_id_for("/d/s0.tar")
    names = _members_without_warnings(url)
    assert {"manifest", "leases", f"leases/{lease}", f"shards/{sid}", f"shards/{sid}/raw"} <= set(names)
    assert CamStore.open(url).to_xarray()["raw"].dims == ("sample", "target", "y", "x")


def test_store_of_the_old_layout_opens_reads_and_moves_its_manifest(tmp_path, capsys):
    """A store made before the manifest became a Zarr group (manifest.json at the root, a
    lease as leases/<id>.json) opens and reads the same rows; `lcam cache repair` and the
    next commit move its manifest to manifest/zarr.json."""
    import shutil

    from jobs.cli import main
    from pipeline.fs import write_json_atomic
    from pipeline.store.manifest import LEGACY_MANIFEST, MANIFEST

    def to_old_layout(url: str) -> None:
        doc = json.loads((tmp_path / url / MANIFEST).read_text())
        shutil.rmtree(tmp_path / url / "manifest")
        write_json_atomic(str(tmp_path / url / LEGACY_MANIFEST), doc["attributes"])  # as stores of before did

    url = str(tmp_path / "cache")
    cache = create(url)
    cache.mark_done([write(cache, "/d/s0.tar", rows(5, 0, "s0")), write(cache, "/d/s1.tar", rows(9, 1, "s1"))])
    want = FeatureCache.open(url).to_xarray().compute()
    to_old_layout("cache")
    (tmp_path / "cache" / "leases").mkdir()
    (tmp_path / "cache" / "leases" / "old.json").write_text(json.dumps({"host": "another-host", "pid": 1}))

    old = FeatureCache.open(url)
    assert old.manifest_found and old.manifest_at == LEGACY_MANIFEST and len(old) == 14
    got = old.to_xarray().compute()
    assert list(got["key"].values) == list(want["key"].values)
    np.testing.assert_array_equal(got["features"].values, want["features"].values)
    assert [o["host"] for o in old.leases.others()] == ["another-host"]  # an old writer's lease is still seen
    assert old.verify({"/d/s0.tar": 5, "/d/s1.tar": 9}).ok

    assert main(["cache", "repair", url]) == 0
    assert f"{LEGACY_MANIFEST} moved to {MANIFEST}" in capsys.readouterr().out
    assert (tmp_path / "cache" / MANIFEST).exists() and not (tmp_path / "cache" / LEGACY_MANIFEST).exists()
    assert FeatureCache.open(url).manifest_at == MANIFEST and len(FeatureCache.open(url)) == 14

    to_old_layout("cache")  # the next commit of a run moves it too, keeping what was done
    again = create(url)
    assert again.done_sources() == {"/d/s0.tar", "/d/s1.tar"}
    again.mark_done([write(again, "/d/s2.tar", rows(3, 2, "s2"))])
    assert not (tmp_path / "cache" / LEGACY_MANIFEST).exists()
    assert FeatureCache.open(url).done_sources() == {"/d/s0.tar", "/d/s1.tar", "/d/s2.tar"}


def test_fingerprint_mismatch_refused(tmp_path):
    url = str(tmp_path / "cache")
    cache = create(url)
    cache.mark_done([write(cache, "/d/s0.tar", rows(5, 0, "s0"))])
    other = dict(IDENTITY, weights_digest="b" * 64)
    with pytest.raises(CacheMismatch) as exc:
        FeatureCache.create_or_open(url, other, feature_shape=SHAPE, chunk_rows=8)
    msg = str(exc.value)
    assert isinstance(exc.value, UserError)
    assert "weights_digest" in msg and "aaaa" in msg and "bbbb" in msg
    assert "another cache URL" in msg and "delete" in msg
    with pytest.raises(CacheMismatch, match=r"cache\.dtype: cache has \"float16\", requested \"float32\""):
        create(url, dtype="float32")
    with pytest.raises(CacheMismatch, match=r"cache\.views"):
        create(url, views=("center", "hflip"))
    # Same identity: reopened with its manifest, never reset.
    again = create(url)
    assert again.fingerprint == cache.fingerprint and again.done_sources() == {"/d/s0.tar"}


def test_open_errors(tmp_path):
    with pytest.raises(CacheNotFound, match="no feature cache"):
        FeatureCache.open(str(tmp_path / "nothing"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(UserError, match="no feature cache"):
        create(str(tmp_path / "busy"))
    zarr.open_group(str(tmp_path / "otherzarr"), mode="w", attributes={"x": 1})
    with pytest.raises(UserError, match="not an L-CAM feature cache"):
        FeatureCache.open(str(tmp_path / "otherzarr"))
    create(str(tmp_path / "c"))
    ro = FeatureCache.open(str(tmp_path / "c"))
    with pytest.raises(PermissionError):
        write(ro, "/d/s.tar", rows(2, 0, "s"))


def test_write_refuses_bad_input(tmp_path):
    cache = create(str(tmp_path / "cache"))
    r = rows(4, 0, "s")
    r["features"][2, 0, 3, 1, 1] = np.nan
    with pytest.raises(NonFiniteFeatures, match="s/00002"):
        write(cache, "/d/s.tar", r)
    r = rows(4, 0, "s")
    r["features"][1] *= 1e6  # beyond float16's 65504
    with pytest.raises(NonFiniteFeatures, match="bfloat16"):
        write(cache, "/d/s.tar", r)
    r = rows(4, 0, "s")
    r["keys"][3] = r["keys"][0]
    with pytest.raises(ValueError, match="duplicate keys"):
        write(cache, "/d/s.tar", r)
    with pytest.raises(ValueError, match="shape"):
        cache.write_shard("/d/s.tar", ["a"], [0], np.zeros((1, 1, 8, 7, 7)), np.zeros((1, 5)), np.zeros((1, 5)))


def test_rewrite_is_idempotent(tmp_path):
    url = str(tmp_path / "cache")
    cache = create(url)
    src, r = "/d/s0.tar", rows(19, 3, "s0")
    sid = shard_id_for(src)
    e1 = write(cache, src, r)
    first = files_under(join(url, "shards", sid))
    # A crashed attempt that wrote more rows must leave nothing behind after the re-run.
    write(cache, src, rows(40, 9, "junk"))
    e2 = write(cache, src, r)
    assert files_under(join(url, "shards", sid)) == first
    cache.mark_done([e1])
    cache.mark_done([e2])
    ro = FeatureCache.open(url)
    assert list(ro.manifest["shards"]) == [src] and len(ro) == 19
    keys = sum((b[0] for b in ro.iter_rows(8)), [])
    assert keys == r["keys"]
    assert ro.verify({src: 19}).ok
    # every array names its axes (zarr v3 dimension_names: what xarray reads)
    group = zarr.open_group(join(url, "shards", sid), mode="r")
    assert {name: group[name].metadata.dimension_names for name in group.array_keys()} == {
        "features": ("sample", "view", "channel", "y", "x"),
        "labels": ("sample",),
        "top5_classes": ("sample", "rank"),
        "top5_probs": ("sample", "rank"),
    }


def test_mark_done_refuses_incomplete_group(tmp_path):
    cache = create(str(tmp_path / "cache"))
    entry = write(cache, "/d/s0.tar", rows(5, 0, "s0"))
    with pytest.raises(RuntimeError, match="not completely written"):
        cache.mark_done([dict(entry, count=6)])
    with pytest.raises(RuntimeError, match="not completely written"):
        cache.mark_done([{"url": "/d/never.tar", "count": 3}])
    assert cache.done_sources() == set()


def build_for_verify(url: str, storage_options=None) -> tuple[FeatureCache, dict[str, int]]:
    cache = create(url, storage_options)
    data = {f"/d/s{i}.tar": rows(n, i, f"s{i}") for i, n in enumerate([12, 9, 17])}
    entries = [write(cache, s, r) for s, r in data.items()]
    entries[1]["skipped"] = [{"key": "s1/bad", "reason": "undecodable image"}]
    cache.mark_done(entries)
    expected = {s: len(r["keys"]) for s, r in data.items()}
    expected["/d/s1.tar"] += 1  # the skipped sample still counts against the index
    return cache, expected


def check_verify(url: str, storage_options=None) -> None:
    cache, expected = build_for_verify(url, storage_options)
    report = cache.verify(expected)
    assert report.ok, report.problems
    assert (report.shards, report.rows, report.chunks_read) == (3, 38, 2 + 2 + 3)

    # 1. missing shard  2. count mismatch  3. unexpected shard
    exp = dict(expected, **{"/d/s9.tar": 4})
    exp["/d/s0.tar"] = 13
    del exp["/d/s2.tar"]
    problems = cache.verify(exp).problems
    assert any(p.startswith("missing shard /d/s9.tar") for p in problems), problems
    assert any("count mismatch for /d/s0.tar: cache has 12 rows + 0 skipped, expected 13" in p for p in problems), (
        problems
    )
    assert any(p.startswith("unexpected shard /d/s2.tar") for p in problems), problems
    assert len(problems) == 3

    # 4. a key duplicated across shards
    r = rows(3, 7, "s3")
    r["keys"][1] = "s0/00004"
    cache.mark_done([write(cache, "/d/s3.tar", r)])
    problems = cache.verify().problems
    assert problems == [
        "duplicate key 's0/00004': appears 2 times (shards "
        + f"{shard_id_for('/d/s0.tar')}, {shard_id_for('/d/s3.tar')})"
    ]

    # 5. NaN in stored features (corrupt a chunk behind the cache's back)
    store = make_zarr_store(url, storage_options, read_only=False)
    arr = zarr.open_array(store, path=f"shards/{shard_id_for('/d/s2.tar')}/features", mode="r+")
    block = arr[8:16]
    block[5, 0, 2, 3, 3] = np.nan
    arr[8:16] = block
    problems = cache.verify().problems
    assert any("/d/s2.tar: 1 rows have NaN/Inf features (e.g. ['s2/00013'])" in p for p in problems), problems

    # 6. a lost chunk object and 7. a lost group
    fs, path = get_fs(url, storage_options)
    fs.rm(f"{path}/shards/{shard_id_for('/d/s1.tar')}/labels/c/1")
    fs.rm(f"{path}/shards/{shard_id_for('/d/s0.tar')}", recursive=True)
    problems = cache.verify().problems
    assert any("/d/s1.tar: labels has 1 of 2 chunk objects missing" in p for p in problems), problems
    assert any(f"/d/s0.tar: group shards/{shard_id_for('/d/s0.tar')} missing" in p for p in problems), problems

    # recorded counts are the default expectation
    cache.record_counts({"/d/s7.tar": 5})
    assert any(
        p.startswith("missing shard /d/s7.tar") for p in FeatureCache.open(url, storage_options).verify().problems
    )


def test_verify_detects_problems_local(tmp_path):
    check_verify(str(tmp_path / "cache"))


def test_verify_detects_problems_s3(s3):
    bucket, options = s3
    check_verify(f"{bucket}/cache", options)


def test_orphan_group_is_a_note_not_a_problem(tmp_path):
    cache, expected = build_for_verify(str(tmp_path / "cache"))
    write(cache, "/d/unfinished.tar", rows(3, 5, "u"))  # written, never marked done
    report = cache.verify(expected)
    assert report.ok and len(report.notes) == 1 and shard_id_for("/d/unfinished.tar") in report.notes[0]
    assert "/d/unfinished.tar" not in cache.done_sources() and len(cache) == 38


def test_pickled_cache_writes_from_threads_s3(s3):
    """Ray ships the cache pickled to write tasks; several shards are written at once."""
    bucket, options = s3
    url = f"{bucket}/cache"
    driver = create(url, options)
    data = {f"s3://src/s{i}.tar": rows(10 + i, i, f"s{i}") for i in range(4)}

    def task(item):
        src, r = item
        worker = pickle.loads(pickle.dumps(driver))
        return write(worker, src, r)

    with ThreadPoolExecutor(4) as pool:
        entries = list(pool.map(task, data.items()))
    driver.mark_done(entries)
    ro = FeatureCache.open(url, options)
    assert len(ro) == sum(10 + i for i in range(4))
    assert ro.verify({s: len(r["keys"]) for s, r in data.items()}).ok
    manifest = json.loads(get_fs(url, options)[0].cat_file(f"{url[5:]}/manifest/zarr.json"))["attributes"]
    assert manifest["fingerprint"] == driver.fingerprint and set(manifest["versions"]) == {"torch", "zarr", "lcam"}


def test_cli_info_and_verify(tmp_path, capsys):
    from jobs.cli import main

    url = str(tmp_path / "cache")
    cache, expected = build_for_verify(url)
    index = {
        "format": "whatever",
        "shards": [{"name": f"s{i}.tar", "count": n} for i, n in enumerate(expected.values())],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    # The index lives in another folder than /d: matching falls back to unique file names.
    assert main(["cache", "verify", url, "--index", str(tmp_path / "index.json")]) == 0
    assert "OK (3 shards, 38 rows" in capsys.readouterr().out
    assert main(["cache", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 38 and info["compression_ratio"] > 0
    assert main(["cache", "info", url]) == 0
    assert "samples      38 in 3 shards (1 skipped" in capsys.readouterr().out

    index["shards"][0]["count"] = 99
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert main(["cache", "verify", url, "--index", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  count mismatch for /d/s0.tar: cache has 12 rows + 0 skipped, expected 99 samples" in out
    assert main(["cache", "verify", url, "--json", "--index", str(tmp_path)]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["cache", "info", str(tmp_path / "none")]) == 2
    assert "no feature cache" in capsys.readouterr().err


def test_to_xarray_is_a_lazy_view_equal_to_the_chunks(tmp_path):
    import dask.array as da

    url = str(tmp_path / "cache")
    cache = create(url, dtype="bfloat16", views=("center", "hflip"))  # bf16: stored as bits, decoded lazily
    data = {"/d/b.tar": rows(11, 1, "b", 2), "/d/a.tar": rows(9, 2, "a", 2)}
    cache.mark_done([write(cache, src, r) for src, r in data.items()])
    ro = FeatureCache.open(url)
    ds = ro.to_xarray()
    assert isinstance(ds["features"].data, da.Array)  # nothing read yet
    assert ds["features"].dims == ("sample", "view", "channel", "y", "x") and ds["top5_probs"].dims == (
        "sample",
        "rank",
    )
    # store order (sources sorted): /d/a.tar's 9 rows, then /d/b.tar's 11
    assert list(ds["shard"].values) == [shard_id_for("/d/a.tar")] * 9 + [shard_id_for("/d/b.tar")] * 11
    assert list(ds["key"].values) == data["/d/a.tar"]["keys"] + data["/d/b.tar"]["keys"]
    chunks = [ro.read_chunk(sid, ci) for sid in ro.shard_ids() for ci in range(ro.num_chunks(sid))]
    for name in ("features", "labels", "top5_classes", "top5_probs"):
        want = np.concatenate([c[name] for c in chunks])
        assert ds[name].dtype == want.dtype
        np.testing.assert_array_equal(ds[name].values, want)
    # a lost chunk object is refused when the view is made, never read as zeros
    fs, path = get_fs(url)
    fs.rm_file(f"{path}/shards/{shard_id_for('/d/b.tar')}/labels/c/1")
    with pytest.raises(UserError, match="chunk objects of labels are missing"):
        FeatureCache.open(url).to_xarray()
