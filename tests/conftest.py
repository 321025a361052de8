"""Shared fixtures: a real S3 API (moto's HTTP server on 127.0.0.1) and a real local Ray."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

# Ray keeps its sockets and logs here; a short path keeps unix socket names legal.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# On a loaded machine Ray's node can take longer than its default to register its agent;
# a generous bound keeps start-up slow rather than failed (Ray reads RAY_<config name>).
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded server: a real S3 HTTP API on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, request):
    """A fresh bucket; yields (bucket URL prefix, storage_options for fsspec/s3fs)."""
    import boto3

    bucket = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    options = {
        "key": "testing",
        "secret": "testing-secret",
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}", options


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, started (and shut down) by this test session only."""
    import ray

    # Configured as pipeline.raykit.ensure_ray configures a local Ray: beyond num_cpus idle
    # workers Ray kills the spare ones after 1 s, and every later task or actor then starts
    # a fresh worker that imports torch again (seconds of CPU each, many times per test run).
    # Ray's metrics off, as there (its log monitor's slower scan is ensure_ray's environment).
    kwargs = dict(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"num_workers_soft_limit": 8, "enable_metrics_collection": False},
    )
    if not ray.is_initialized():
        try:
            ray.init(**kwargs)
        except Exception:  # "node timed out during startup": Ray's fixed 30 s, hit on a loaded machine
            ray.shutdown()
            ray.init(**kwargs)
        yield ray
        ray.shutdown()
    else:
        yield ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with its own temp dir and ports, for job submission.

    Started in its own process group with the project's interpreter first on PATH (jobs
    run ``python -m jobs.<name>``); stopped by killing only that group and whatever still
    names its temp dir. Never ``ray stop``: that kills every Ray process on the machine.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard",
            "client",
            "agent_listen",
            "agent_grpc",
            "runtime_env",
            "metrics",
            "node_manager",
            "object_manager",
        )
    }
    # workers get ports of their own, chosen like the others (a range could overlap them)
    taken = set(ports.values())
    worker_ports: list[int] = []
    while len(worker_ports) < 64:
        p = free_port()
        if p not in taken:
            taken.add(p)
            worker_ports.append(p)
    bin_dir = os.path.dirname(sys.executable)
    env = dict(
        os.environ,
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
        RAY_AUTH_MODE=os.environ["RAY_AUTH_MODE"],
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    cmd = [
        os.path.join(bin_dir, "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['port']}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        "--worker-port-list=" + ",".join(map(str, worker_ports)),
        f"--temp-dir={temp}",
    ]
    log = open(os.path.join(temp, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    else:
        proc.kill()
    if proc.poll() is not None:
        log.close()
        pytest.fail("ray head did not start:\n" + open(os.path.join(temp, "head.log")).read()[-3000:])
    try:
        yield {"address": address, "env": env, "temp": temp, "gcs": f"127.0.0.1:{ports['port']}"}
    finally:
        from tests.helpers import stop_ray_head

        stop_ray_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
