"""Where stages run: L-CAM-Fm training and CAMs from a cache as Ray tasks/actors on a worker
node of a cluster whose head has no GPU (the same results as in-process); Ray Train's
storage under the run's own URL (moto's S3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from lcam import build_backbone
from lcam.training import init_attention
from pipeline.cams.from_cache import CacheCamActor
from pipeline.cams.run import generate_cams
from pipeline.classes import ClassSelection
from pipeline.configs import CamsConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.extract.run import cache_identity
from pipeline.placement import resolve_where
from pipeline.shards.pack import pack_folder
from pipeline.store.cam_store import CamStore
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import load_checkpoint, save_checkpoint
from pipeline.train.img import ray_train_storage, train_img
from pipeline.train.setup import check_config

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests.custom_backbones:tiny,size=32"  # (16, 8, 8) features, 10 classes: milliseconds a batch
SHARDS, PER_SHARD = 4, 6


def tiny_images(root: Path, n: int = 8) -> Path:
    """Small deterministic JPEGs (smooth colour ramps plus noise) in two class folders."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 48)[None, :, None]
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.clip(ramp * (i % 3 + 1) / 3 + rng.normal(0, 40, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.jpg", quality=90)
    return root


def write_tiny_cache(url: str, spec: str = TINY) -> FeatureCache:
    """A feature cache of the tiny backbone (``spec``) over random inputs, written without Ray:
    the sources are names only (training and CAMs from a cache never open a shard)."""
    backbone = build_backbone(spec, "random")
    cache = FeatureCache.create_or_open(
        url,
        cache_identity(backbone, ("center",), "float16"),
        feature_shape=backbone.feature_shape,
        views=("center",),
        dtype="float16",
        num_classes=backbone.num_classes,
    )
    gen = torch.Generator().manual_seed(0)
    entries = []
    for s in range(SHARDS):
        x = torch.rand(PER_SHARD, 3, 32, 32, generator=gen)
        with torch.no_grad():
            f, logits = backbone.extract(x)
        p5, c5 = logits.softmax(1).topk(5)
        keys = [f"s{s}-{i}" for i in range(PER_SHARD)]
        entries.append(
            cache.write_shard(f"/data/shard-{s}.tar", keys, [i % 2 for i in range(PER_SHARD)], f[:, None], c5, p5)
        )
    cache.mark_done(entries)
    return FeatureCache.open(url)


def write_tiny_checkpoint(path: str, spec: str = TINY) -> str:
    """An L-CAM-Fm checkpoint of the tiny backbone (``spec``) with a seeded random attention."""
    backbone = build_backbone(spec, "random")
    attention = init_attention(backbone, 3)
    with torch.no_grad():  # away from the all-equal start: maps with structure
        attention.conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_checkpoint(path, attention_state=attention.state_dict(), method="fm", backbone=backbone.describe())
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    cache = write_tiny_cache(str(root / "cache"))
    return {"root": root, "cache": cache.url, "ckpt": write_tiny_checkpoint(str(root / "ckpt.pt"))}


def losses(run: Path) -> list[tuple]:
    return [
        (r["kind"], r["step"], r["loss"], r["ce"], r["area"], r["tv"])
        for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    ]


def assert_same_cam_stores(first: Path, second: Path) -> None:
    """Two CAM stores of the tiny cache hold the same shards with exactly the same arrays."""
    a, b = CamStore.open(str(first)), CamStore.open(str(second))
    assert a.fingerprint == b.fingerprint and a.shard_ids() == b.shard_ids() and len(a.shard_ids()) == SHARDS
    for sid in a.shard_ids():
        x, y = a.read_shard(sid, normalized=False), b.read_shard(sid, normalized=False)
        assert x.keys() == y.keys() and x["keys"] == y["keys"]
        for name in x:
            if name != "keys":
                assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), (sid, name)


def test_model_stages_leave_the_head_and_give_the_same_results(tiny, tmp_path):
    """One cluster (ray.cluster_utils.Cluster): a head with a CPU but no GPU, a worker node with
    two (fake) GPUs. `where` auto leaves the driver; Ray's runtime context of the training task
    and of both CAM actors names the worker node; the task's progress lines reach the driver;
    and the files equal those of the in-process path exactly (the same losses, the same
    checkpoint, the same CAM arrays)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scenario_placement.py"), tiny["cache"], tiny["ckpt"], str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((t for t in out.stdout.splitlines() if t.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(line[len("RESULT ") :])
    assert result["error"] is None, result
    head, worker = result["head"], result["worker"]
    assert head != worker
    assert result["train"] == {"local": [None, 12], "auto": [worker, 12]}
    assert result["cams"] == {
        "local": [[], SHARDS * PER_SHARD],
        "auto": [[worker, worker], SHARDS * PER_SHARD],
        "again": 0,
    }
    assert "no feature cache" in result["user_error"] and "Traceback" not in result["user_error"], result["user_error"]
    relayed = result["relayed"]  # through the relay, not Ray's log forwarding (off)
    assert any(m.startswith("L-CAM-Fm: 24 cached samples") for m in relayed) and any(
        m.startswith("epoch 2: loss") for m in relayed
    ), relayed

    assert losses(tmp_path / "fm-local") == losses(tmp_path / "fm-auto")
    a, b = (
        load_checkpoint(str(tmp_path / "fm-local" / "checkpoint.pt")),
        load_checkpoint(str(tmp_path / "fm-auto" / "checkpoint.pt")),
    )
    for k in a["attention"]:
        assert torch.equal(a["attention"][k], b["attention"][k]), k
    assert_same_cam_stores(tmp_path / "cams-local", tmp_path / "cams-auto")


def test_where_auto_is_local_without_a_cluster_and_ray_with_one(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():  # a local Ray of this test session: one node, no reason to leave the process
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert resolve_where("auto") == "local" and resolve_where("ray") == "ray" and resolve_where("local") == "local"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # what Ray sets for a job's driver (every `lcam submit`)
    assert resolve_where("auto") == "ray" and resolve_where("local") == "local"
    with pytest.raises(UserError, match="--where must be auto, local or ray, got 'gpu'"):
        check_config(TrainConfig(method="fm", cache="c", where="gpu"))


def test_a_re_executed_cam_group_write_leaves_the_store_exact(tiny, tmp_path):
    """What a model actor does for one shard, run twice (as Ray does after a lost actor), the
    first time cut short: the group is rewritten whole, and equals a single clean write."""
    cache = FeatureCache.open(tiny["cache"])
    entry = cache.manifest["shards"][sorted(cache.done_sources())[0]]
    args = (
        cache,
        entry,
        0,
        ClassSelection.parse("top-k", 2),
        True,
        ["features", "labels", "top5_classes", "top5_probs"],
    )

    generate_cams(
        CamsConfig(
            checkpoint=tiny["ckpt"],
            out=str(tmp_path / "ref"),
            cache=tiny["cache"],
            classes="top-k",
            top_k=2,
            where="local",
            progress=False,
        )
    )
    identity = CamStore.open(str(tmp_path / "ref")).identity
    actor = CacheCamActor(
        tiny["ckpt"], None, None, identity["checkpoint"]["fingerprint"], "cpu", 1
    )  # the class itself, in this process
    twice = CamStore.create_or_open(str(tmp_path / "twice"), identity)
    actor.write_group(args[0], twice, *args[1:])
    shutil.rmtree(tmp_path / "twice" / "shards" / entry["shard_id"] / "raw")  # the first attempt died mid-write
    twice.mark_done([actor.write_group(args[0], twice, *args[1:])])
    got, want = (
        CamStore.open(str(tmp_path / "twice")).read_shard(entry["shard_id"]),
        CamStore.open(str(tmp_path / "ref")).read_shard(entry["shard_id"]),
    )
    assert got["keys"] == want["keys"] and got.keys() == want.keys()
    for name in want:
        if name != "keys":
            assert np.array_equal(got[name], want[name]), name


def test_cams_on_ray_build_the_model_in_the_actors_only(ray_local, tmp_path):
    """`lcam cams --cache ... --where ray`: the driver reads the checkpoint's dict and never
    builds the backbone (on a cluster it is the CPU-only head); the actors' store equals the
    in-process one, whose driver build the probe does see."""
    from tests import custom_backbones

    spec = "tests.custom_backbones:counted_tiny,size=32"
    cache = write_tiny_cache(str(tmp_path / "cache"), spec)
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt.pt"), spec)
    custom_backbones.BUILT_IN.clear()  # the cache and checkpoint above were made here on purpose

    def cams(where: str):
        return generate_cams(
            CamsConfig(
                checkpoint=ckpt,
                out=str(tmp_path / f"cams-{where}"),
                cache=cache.url,
                classes="top-k",
                top_k=2,
                where=where,
                progress=False,
            )
        )

    on_ray = cams("ray")
    assert custom_backbones.BUILT_IN == [] and on_ray.samples == SHARDS * PER_SHARD and len(on_ray.ran_on) == 1
    here = cams("local")
    assert (
        custom_backbones.BUILT_IN == [os.getpid()] and here.samples == SHARDS * PER_SHARD
    )  # the probe sees a driver build
    assert_same_cam_stores(tmp_path / "cams-ray", tmp_path / "cams-local")


def test_ray_train_storage_defaults_to_the_run_url_with_its_options(s3, tmp_path, monkeypatch):
    """What `lcam train --method img` and `lcam pipeline` (run folder WORKDIR/lcam-img) give Ray Train."""
    bucket, options = s3
    path, fs = ray_train_storage(TrainConfig(method="img", out=f"{bucket}/work/lcam-img", storage_options=options))
    assert path == f"{bucket[len('s3://') :]}/work/lcam-img/ray-train"
    with fs.open_output_stream(f"{path}/probe") as f:  # through the run's endpoint (moto), not AWS
        f.write(b"here")
    assert fsspec.filesystem("s3", **options).cat_file(f"{bucket}/work/lcam-img/ray-train/probe") == b"here"
    monkeypatch.chdir(tmp_path)
    assert ray_train_storage(TrainConfig(method="img", out="runs/img")) == (
        str(tmp_path / "runs" / "img" / "ray-train"),
        None,
    )
    assert ray_train_storage(TrainConfig(method="img", out="runs/img", ray_storage="/shared/rt")) == (
        "/shared/rt",
        None,
    )


def test_img_ray_train_storage_goes_under_the_run_url_on_s3(ray_local, s3, tmp_path):
    bucket, options = s3
    secret = "SECRET-" + os.urandom(8).hex()
    options = dict(options, secret=secret)  # moto accepts any secret: it must be written nowhere
    tiny_images(tmp_path / "images")
    pack_folder(tmp_path / "images", f"{bucket}/shards", samples_per_shard=4, storage_options=options, progress=False)
    run = f"{bucket}/run"
    summary = train_img(
        TrainConfig(
            method="img",
            out=run,
            shards=f"{bucket}/shards",
            backbone=TINY,
            weights="random",
            augment="center",
            epochs=1,
            batch_size=4,
            workers=1,
            cpus_per_worker=0.5,
            data_cpus=0.5,
            progress=False,
            storage_options=options,
            shard_storage_options=options,
        )
    )
    assert summary.epochs_done == 1 and summary.steps == 2
    fs = fsspec.filesystem("s3", **options)
    under = [p for p in fs.find(f"{run}/ray-train") if p.endswith("/checkpoint.pt")]
    assert len(under) == 1, fs.find(run)  # Ray Train's latest checkpoint (one kept), under the run's URL
    ours = load_checkpoint(f"{run}/checkpoint.pt", options)
    with fs.open(under[0], "rb") as f:
        theirs = torch.load(f, weights_only=False)
    assert theirs["step"] == ours["step"] == 2
    for k in ours["attention"]:
        assert torch.equal(ours["attention"][k], theirs["attention"][k])
    assert [p for p in fs.find(bucket) if secret.encode() in fs.cat_file(p)] == []


def _crash_once(marker: str, tag: str, log_queue) -> str:
    """A Ray task lost with its worker on its first run (the process dies), done on the next."""
    runs = Path(marker)
    runs.write_text(runs.read_text() + tag + "\n" if runs.exists() else tag + "\n")
    if tag == "first":
        os._exit(1)  # the worker process dies: what a lost node or an OOM kill looks like to Ray
    return f"done on {tag}"


def _fail(marker: str, log_queue) -> None:
    Path(marker).write_text((Path(marker).read_text() if Path(marker).exists() else "") + "ran\n")
    raise ValueError("the task's own failure")


def test_a_lost_task_runs_again_with_the_retry_arguments_and_an_own_failure_does_not(ray_local, tmp_path):
    """run_task (the L-CAM-Fm training task's runner) reruns a task lost with its worker,
    handing the next attempt what retry_args gives (train_fm_placed: --resume from the lost
    attempt's checkpoint); a failure of the task's own code is not retried."""
    import ray.cloudpickle

    from pipeline.placement import run_task

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    marker = tmp_path / "runs.txt"
    result = run_task(
        _crash_once,
        str(marker),
        "first",
        resources={"num_cpus": 1},
        progress=False,
        attempts=3,
        retry_args=lambda: (str(marker), "second"),
    )
    assert result == "done on second"
    assert marker.read_text().split() == ["first", "second"]

    once = tmp_path / "once.txt"
    with pytest.raises(ValueError, match="the task's own failure"):
        run_task(_fail, str(once), resources={"num_cpus": 1}, progress=False, attempts=3)
    assert once.read_text().split() == ["ran"]

    lost = tmp_path / "lost.txt"
    with pytest.raises(Exception) as err:
        run_task(_crash_once, str(lost), "first", resources={"num_cpus": 1}, progress=False, attempts=2)
    assert type(err.value).__name__ == "WorkerCrashedError"
    assert lost.read_text().split() == ["first", "first"]
