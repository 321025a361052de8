"""The cluster path: cluster.yaml validity, a lost worker node, secrets never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline.configs import ExtractConfig
from pipeline.extract.run import extract
from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards
from pipeline.store.feature_cache import FeatureCache
from tests.test_extract import make_folder

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does before any cloud call
    validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # head schedules no work
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "IamInstanceProfile" in gpu["node_config"]  # S3 through the role, no keys
    assert any("pip install" in c and "lcam" in c for c in config["setup_commands"])


def test_example_configs_are_valid_pipeline_configs():
    from jobs.config import namespace_from_config

    try:
        import jobs.pipeline as pipeline_job
    except ImportError:
        pytest.skip("jobs.pipeline not available")
    import argparse

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        parser = argparse.ArgumentParser()
        pipeline_job.add_arguments(parser)
        ns = namespace_from_config(parser, yaml.safe_load(path.read_text()), str(path))
        assert ns.backbone in ("vgg16", "resnet50") and ns.train_shards.startswith("s3://")


def test_worker_node_lost_mid_extraction_still_gives_every_sample_once(tmp_path):
    make_folder(tmp_path / "images", n_per_class=6, corrupt=False)
    pack_folder(tmp_path / "images", str(tmp_path / "shards"), samples_per_shard=1, progress=False)
    cache_url = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scenario_cluster.py"), "node-loss", str(tmp_path / "shards"), cache_url],
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
    assert result["nodes_before"] == 3 and 1 <= result["removed_after_shards"] < 12
    assert result["failed_shards"] == [] and result["images"] == 12
    cache = FeatureCache.open(cache_url)
    report = cache.verify(expected={s.url: s.count for s in list_shards(str(tmp_path / "shards"))})
    assert report.ok, report.problems  # every sample exactly once
    assert len(cache) == 12


def all_written_bytes(paths, s3fs=None, buckets=()):
    """Every file under the local paths and every object in the buckets."""
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                if os.path.isfile(p):
                    yield p, Path(p).read_bytes()
    for bucket in buckets:
        for key in s3fs.find(bucket):
            yield key, s3fs.cat_file(key)


def test_secret_in_storage_options_is_written_nowhere(ray_local, s3, tmp_path):
    bucket, options = s3
    secret = "SECRET-" + os.urandom(8).hex()
    options = dict(options, secret=secret)  # moto accepts any secret
    make_folder(tmp_path / "images", n_per_class=2, corrupt=False)
    pack_folder(tmp_path / "images", f"{bucket}/shards", samples_per_shard=2, storage_options=options, progress=False)
    summary = extract(
        ExtractConfig(
            shards=f"{bucket}/shards",
            cache=f"{bucket}/cache",
            batch_size=4,
            progress=False,
            shard_storage_options=options,
            cache_storage_options=options,
        )
    )
    assert summary.images == 4
    fs = fsspec.filesystem("s3", **options)
    session_logs = os.path.join(os.environ["RAY_TMPDIR"])
    found = [
        name for name, data in all_written_bytes([tmp_path, session_logs], fs, [bucket]) if secret.encode() in data
    ]
    assert found == []
