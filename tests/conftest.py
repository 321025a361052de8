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
        "s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing-secret", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}", options


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, started (and shut down) by this test session only."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        yield ray
        ray.shutdown()
    else:
        yield ray
