"""Shared fixtures: one Ray per test session, a real S3 endpoint on loopback, tiny configs.

The S3 endpoint's address goes into the environment before Ray starts, so Ray's
workers (which inherit the driver's environment) reach the same moto server.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

os.environ.update(  # before Ray and torch are imported
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    DEEPFAKE_RAY_PROGRESS="0",
    RAY_TRAIN_V2_ENABLED="1",
    OMP_NUM_THREADS="1",
)

from deepfake_ray.runtime import free_port  # noqa: E402

# Picked now, bound only when a test first needs S3: below the kernel's ephemeral range,
# so no outgoing connection of Ray's can be given it meanwhile
S3_PORT = free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"


def pytest_collection_modifyitems(items):
    """Slow tests that start Ray processes of their own (a `ray start` cluster, `serve run`)
    go first, before this session's in-process Ray exists: its idle daemons and workers
    keep ~0.15 of a core busy, which these minutes-long tests would otherwise share."""
    items.sort(key=lambda i: not (i.get_closest_marker("slow") and "ray_session" not in i.fixturenames))


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (in-process, 4 logical CPUs)."""
    import ray

    from deepfake_ray import runtime

    runtime.init()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on loopback; yields a factory for fresh buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    deadline = time.time() + 60  # the server thread binds asynchronously
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline:  # here, not as S3 errors in whichever test comes next
                pytest.fail(f"moto's S3 server did not listen on port {S3_PORT} within 60 s")
            time.sleep(0.1)
    client = boto3.client("s3")
    created = []

    def bucket(name: str) -> str:
        if name not in created:
            client.create_bucket(Bucket=name)
            created.append(name)
        return f"s3://{name}"

    yield bucket
    server.stop()


@pytest.fixture
def tiny_cfg(tmp_path):
    """The `tiny` preset with its work directory in the test's own temporary folder."""
    from deepfake_ray import config

    def make(*overrides: str, workdir: str | None = None):
        return config.build("tiny", None, list(overrides), workdir=workdir or str(tmp_path / "work"))

    return make
