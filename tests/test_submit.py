"""Job submission end to end: a real Ray head on 127.0.0.1, `lcam submit`, stop, resubmit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.shards.pack import pack_folder
from pipeline.shards.read import list_shards
from pipeline.store.feature_cache import FeatureCache
from pipeline.train.checkpoints import load_lcam
from tests.helpers import manifest_of
from tests.test_extract import make_folder

ROOT = Path(__file__).resolve().parent.parent


def lcam(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_submit_stop_and_resubmit_resumes(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from jobs.cli import main

    make_folder(tmp_path / "images", n_per_class=6, corrupt=False)
    pack_folder(tmp_path / "images", str(tmp_path / "shards"), samples_per_shard=1, progress=False)
    workdir = tmp_path / "work"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train_shards": str(tmp_path / "shards"),
                "workdir": str(workdir),
                "stages": "extract,train",
                "method": "fm",
                "views": "center",
                "extract_batch_size": 1,
                "batch_size": 4,
                "epochs": 1,
                "lr": 0.01,
            }
        )
    )
    env = ray_head["env"]
    address = ray_head["address"]

    # the first submission and the stop run in-process: a new interpreter per call is too slow to stop mid-run
    assert (
        main(
            [
                "submit",
                "pipeline",
                "--address",
                address,
                "--config",
                str(config),
                "--no-wait",
                "--submission-id",
                "lcam-test-1",
            ]
        )
        == 0
    )
    job_id = "lcam-test-1"
    client = JobSubmissionClient(address)
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(manifest_of(f"{workdir}/cache").get("shards", {})) >= 1:
            break
        assert str(client.get_job_status(job_id)).split(".")[-1] not in ("FAILED", "SUCCEEDED"), client.get_job_logs(
            job_id
        )[-3000:]
        time.sleep(0.05)
    assert main(["jobs", "stop", job_id, "--address", address]) == 0
    while str(client.get_job_status(job_id)).split(".")[-1] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(0.2)
    done_before = len(manifest_of(f"{workdir}/cache")["shards"])
    assert 1 <= done_before < 12, "the stop should land mid-extraction"
    assert not (workdir / "lcam-fm" / "checkpoint.pt").exists()

    second = lcam(["submit", "pipeline", "--address", address, "--config", str(config)], env, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert f"{done_before} already cached, {12 - done_before} extracted now" in second.stdout
    cache = FeatureCache.open(str(workdir / "cache"))
    assert cache.verify(expected={s.url: s.count for s in list_shards(str(tmp_path / "shards"))}).ok
    model, ckpt = load_lcam(str(workdir / "lcam-fm" / "checkpoint.pt"))
    assert ckpt["method"] == "fm" and ckpt["cache_fingerprint"] == cache.fingerprint
    listed = lcam(["jobs", "list", "--address", address], env)
    assert job_id in listed.stdout and "STOPPED" in listed.stdout and "SUCCEEDED" in listed.stdout


def test_submit_refuses_credentials_in_config(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump({"train_shards": "s3://b/x", "workdir": "s3://b/w", "storage_option": {"secret": "hunter2"}})
    )
    out = lcam(["submit", "pipeline", "--address", "http://127.0.0.1:9", "--config", str(config)], dict(os.environ))
    assert out.returncode == 2
    assert "credential" in out.stderr and "hunter2" not in out.stderr + out.stdout


def test_submit_checks_entrypoint_resources_and_job_fields_before_submitting(tmp_path, capsys):
    from jobs.cli import main

    config = tmp_path / "job.yaml"
    base = {"checkpoint": "info", "out": str(tmp_path / "none")}
    for extra, message in [
        ({"entrypoint_num_gpus": -1}, "'entrypoint_num_gpus' must be a number >= 0, got -1"),
        ({"entrypoint_num_cpus": "two"}, "'entrypoint_num_cpus' must be a number >= 0, got 'two'"),
        ({"entrypoint_num_gpus": 1.5}, "above 1 must be a whole number"),
        (
            {"entrypoint_resources": {"GPU": 1}},
            "GPU cannot be given here; use entrypoint_num_cpus / entrypoint_num_gpus",
        ),
        ({"entrypoint_resources": 3}, "must map custom resource names to amounts"),
        ({"batch_sise": 3}, "unknown field 'batch_sise'"),  # the job's own fields, checked here
    ]:
        config.write_text(yaml.safe_dump({**base, **extra}))
        # an address nothing listens on: a refusal must come before any connection
        assert main(["submit", "cams", "--address", "http://127.0.0.1:9", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_submit_passes_entrypoint_resources_to_ray(ray_head, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    from jobs.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "checkpoint": "info",
                "out": str(tmp_path / "none"),
                "entrypoint_num_cpus": 0.5,
                "entrypoint_resources": {"node:127.0.0.1": 0.01},
            }
        )
    )  # every node has its node:<ip> resource
    assert (
        main(
            [
                "submit",
                "cams",
                "--address",
                ray_head["address"],
                "--config",
                str(config),
                "--no-wait",
                "--submission-id",
                "lcam-res",
            ]
        )
        == 0
    )
    assert "its driver reserves num_cpus 0.5, resources {'node:127.0.0.1': 0.01}" in capsys.readouterr().out
    from ray.util.state import list_actors

    # Ray's own record: the job's supervisor actor (it runs the entrypoint) holds the reservation
    [supervisor] = [
        a
        for a in list_actors(
            address=ray_head["address"], filters=[("class_name", "=", "JobSupervisor")], detail=True, limit=1000
        )
        if a.name.endswith("lcam-res")
    ]
    assert supervisor.required_resources["CPU"] == 0.5 and supervisor.required_resources["node:127.0.0.1"] == 0.01
    info = JobSubmissionClient(ray_head["address"]).get_job_info("lcam-res")
    shipped = yaml.safe_load(info.runtime_env["env_vars"]["LCAM_JOB_CONFIG"])
    assert shipped == {"checkpoint": "info", "out": str(tmp_path / "none")}  # the job's config: only the job's fields
