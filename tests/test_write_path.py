"""The extraction's write path: workers write their shard's group, the driver gets metadata only.

Real components: tiny JPEG shards, the local Ray of the session, a real Zarr cache; a cheap
backbone (resnet18 with random weights at 32 px) keeps the model's cost out of the way.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from lcam import build_backbone
from pipeline.configs import ExtractConfig
from pipeline.extract.run import BackboneRunner, ExtractWorker, extract, open_cache_for
from pipeline.raykit import ShardWorker
from pipeline.shard_tasks import decode_part, read_parts
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards
from pipeline.store.feature_cache import FeatureCache
from pipeline.store.identity import shard_id_for

BACKBONE, WEIGHTS = "torchvision:resnet18,size=64", "random"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 small JPEGs in 3 shards (3, 3, 2)."""
    root = tmp_path_factory.mktemp("writepath")
    rng = np.random.default_rng(1)
    for i in range(8):
        d = root / "images" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((48, 48)).save(
            d / f"im{i}.jpg", quality=90
        )
    pack_folder(root / "images", str(root / "shards"), samples_per_shard=3, progress=False)
    return root / "shards"


def group_digest(cache_url: str, sid: str) -> dict[str, str]:
    """Every object of one shard group, by relative path -> sha256 of its bytes."""
    top = os.path.join(cache_url, "shards", sid)
    out = {}
    for dirpath, _, files in os.walk(top):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, top)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_driver_receives_metadata_only_and_the_cache_is_exact(ray_local, shards, tmp_path):
    cache_url = str(tmp_path / "cache")
    summary = extract(
        ExtractConfig(
            shards=str(shards), cache=cache_url, backbone=BACKBONE, weights=WEIGHTS, batch_size=2, progress=False
        )
    )
    assert summary.failed_shards == [] and summary.shards_extracted == 3 and summary.images == 8
    stage = summary.stage
    # What came back to the driver: 3 manifest entries, no array at all.
    assert stage.shards_done == 3 and stage.array_bytes == 0
    cache = FeatureCache.open(cache_url)
    feature_bytes = 8 * int(np.prod(cache.feature_shape)) * 2  # float16: 32 KiB here
    assert 0 < stage.result_bytes < 3 * 1024 < feature_bytes  # a few hundred bytes per shard: entries, not features
    assert stage.actor_nodes == [ray_local.get_runtime_context().get_node_id()]  # Ray's record of where it ran
    report = cache.verify(expected={s.url: s.count for s in list_shards(str(shards))})
    assert report.ok and report.rows == 8, report.problems


def test_a_reexecuted_write_leaves_the_group_identical(shards, tmp_path):
    """What Ray does on a retry (a lost node, a lost reply): the same shard is processed and
    written again, possibly over a half-written group. The group must come out byte-identical
    and the cache exact. Runs the worker in this process: the write path, without Ray."""
    backbone = build_backbone(BACKBONE, WEIGHTS)
    cfg = ExtractConfig(shards=str(shards), cache=str(tmp_path / "cache"), backbone=BACKBONE, weights=WEIGHTS)
    cache = open_cache_for(backbone, cfg)
    info = list_shards(str(shards))[0]
    item = {"url": info.url, "name": info.name, "count": info.count}
    parts = [decode_part(p, backbone.preprocessing, cfg.views) for p in read_parts(item, None, 2)]
    assert [len(p["key"]) for p in parts] == [2, 1]  # two decode parts, joined in order by the worker
    worker = ExtractWorker(cache, BACKBONE, WEIGHTS, "auto", False, "float16", 1, 2)

    first = worker.process(item, *parts)
    sid = shard_id_for(info.url)
    clean = group_digest(cache.url, sid)
    assert first["count"] == 3 and len(clean) > 5

    # a first attempt died mid-write: one chunk object cut short, another lost, no keys yet
    group = os.path.join(cache.url, "shards", sid)
    chunk = os.path.join(group, "features", "c", "0", "0", "0", "0", "0")
    with open(chunk, "r+b") as f:
        f.truncate(7)
    os.remove(os.path.join(group, "labels", "c", "0"))
    again = worker.process(item, *parts)
    assert group_digest(cache.url, sid) == clean
    assert {k: again[k] for k in ("url", "shard_id", "count", "skipped", "expected_count")} == {
        k: first[k] for k in ("url", "shard_id", "count", "skipped", "expected_count")
    }

    # and a third time after the commit: the cache stays exact (each sample once)
    cache.mark_done([again])
    worker.process(item, *parts)
    assert group_digest(cache.url, sid) == clean
    report = FeatureCache.open(cache.url).verify(expected={info.url: info.count})
    assert report.ok and report.rows == 3, report.problems


def test_parts_streamed_as_refs_meet_the_model_in_the_joined_shards_slices(ray_local, shards):
    """run_shard_stage hands a worker its parts as refs in a list, fetched one at a time (the
    model starts on the first decoded part). However the shard was cut into parts, the rows
    must reach the model in the slices of the joined shard, so the features are bit-identical."""
    backbone = build_backbone(BACKBONE, WEIGHTS)
    info = list_shards(str(shards))[0]  # 3 images
    item = {"url": info.url, "name": info.name, "count": info.count}
    runner = BackboneRunner(BACKBONE, WEIGHTS, "auto", False, "float16", 1)
    runs, slices = {}, {}
    for cut in (1, 2, 3):
        raw = read_parts(item, None, cut)
        parts = [
            decode_part(p, backbone.preprocessing, ("center",)) for p in ([raw] if cut == 1 else raw)
        ]  # one part: one Ray return
        assert len(parts) == cut
        seen: list[list[str]] = []

        def model(batch, seen=seen):
            seen.append([str(k) for k in batch["key"]])
            return runner(batch)

        runs[cut] = ShardWorker().run_parts([[ray_local.put(p) for p in parts]], model, 2)
        slices[cut] = seen
    keys = [str(k) for k in runs[1].columns["key"]]
    assert len(keys) == 3 and runs[1].rows == 3
    for cut in (2, 3):
        assert slices[cut] == slices[1] == [keys[:2], keys[2:]]
        assert [str(k) for k in runs[cut].columns["key"]] == keys
        for name, value in runs[1].outputs.items():
            assert np.array_equal(runs[cut].outputs[name], value), name
    assert runs[1].outputs["features"].shape[0] == 3 and runs[1].failed is None


@pytest.mark.parametrize(
    "counts, min_rows, expected",
    [
        ([2] * 6, 0, 2),  # shards only: 2 per actor
        ([2] * 6, 8, 4),  # small shards: as many as hold 8 rows
        ([2, -1, 2, 2, 2], 8, 2),  # a shard of unknown size counts as 8 rows
        ([100] * 4, 8, 2),  # big shards: the shard window alone
    ],
)
def test_small_shards_widen_the_window_up_to_the_rows_asked(ray_local, counts, min_rows, expected):
    """run_shard_stage submits shards (their read/decode tasks) until 2 per actor AND, with
    min_rows_in_flight, that many rows per actor are in flight: counted at the first result."""
    from pipeline.raykit import run_shard_stage

    class EchoWorker(ShardWorker):  # defined here: Ray ships it by value (the test module is not importable in workers)
        """Runs no model: each shard's entry is its url."""

        def process(self, item, *parts):
            return {"url": item["url"]}

    prepared, seen_at_first = [], []
    items = [{"url": f"s{i}", "count": c} for i, c in enumerate(counts)]

    def on_result(entry):
        if not seen_at_first:
            seen_at_first.append(len(prepared))

    stats = run_shard_stage(
        items,
        lambda item: prepared.append(item["url"]) or [],
        EchoWorker,
        (),
        actors=1,
        gpus=0,
        on_result=on_result,
        on_failure=lambda url, reason: pytest.fail(reason),
        min_rows_in_flight=min_rows,
    )
    assert stats.shards_done == len(items) and prepared == [it["url"] for it in items]
    assert seen_at_first == [expected]


def test_the_runner_rounds_features_and_logits_to_float16_as_numpy_does():
    """The runner casts to float16 with torch (on the model's device); the cache's bytes must be
    numpy's rounding of the same float32 outputs, bit for bit, edge values included (overflow to
    inf, the largest finite, halfway ties, subnormals, signed zero, NaN)."""
    import torch

    edges = np.array(
        [65504, 65519.99, 65520, 1e6, -1e6, 1 + 2**-11, 1 + 3 * 2**-11, 6e-8, 2.9e-8, 1e-9, -0.0, np.inf, np.nan],
        dtype=np.float32,
    )
    rng = np.random.default_rng(0)
    values = np.concatenate([edges, (rng.standard_normal(4096) * 10.0 ** rng.integers(-9, 6, 4096)).astype(np.float32)])
    assert np.array_equal(
        torch.from_numpy(values).half().numpy().view(np.uint16), values.astype(np.float16).view(np.uint16)
    )

    runner = BackboneRunner(BACKBONE, WEIGHTS, "auto", True, "float16", 1)
    pixels = rng.integers(0, 256, (3, 1, 3, 64, 64), dtype=np.uint8)
    out = runner({"pixels": pixels, "error": ["", "", ""]})
    x = torch.from_numpy(pixels[:, 0]).float().div_(255.0).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        f, logits = runner.model.extract(x)
    assert out["features"].dtype == np.float16 and out["logits"].dtype == np.float16
    assert np.array_equal(out["features"][:, 0].view(np.uint16), f.float().numpy().astype(np.float16).view(np.uint16))
    assert np.array_equal(out["logits"].view(np.uint16), logits.float().numpy().astype(np.float16).view(np.uint16))
