"""Shared fixtures: one Ray per test session, a real S3 endpoint on loopback, tiny configs.

The S3 endpoint's address goes into the environment before Ray starts, so Ray's
workers (which inherit the driver's environment) reach the same moto server.
"""
from __future__ import annotations

import os
import socket
import sys
import threading

import pytest

os.environ.update(  # before Ray and torch are imported
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    DEEPFAKE_RAY_PROGRESS="0",
    RAY_TRAIN_V2_ENABLED="1",
    OMP_NUM_THREADS="1",
    RAY_SCHEDULER_EVENTS="0",  # no "(autoscaler +Ns)" lines among a command's own
)

from deepfake_ray.runtime import free_port  # noqa: E402


def listening_socket() -> socket.socket:
    """A loopback socket listening on a port below the kernel's ephemeral range, held from
    now on: the S3 server answers on it once a test needs S3, and meanwhile neither the
    other xdist process's picks nor an outgoing connection of Ray's can be given the port.
    (Were the port only picked, and taken before the server bound it, moto's server thread
    would exit and its start wait forever: seen, on a port held on purpose.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))  # free_port saw it bindable microseconds ago
    sock.listen(128)
    return sock


S3_SOCKET = listening_socket()
S3_PORT = S3_SOCKET.getsockname()[1]
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"


def shares_session_ray(node) -> bool:
    """Whether a test (its item, or its request in a fixture) uses the session's in-process Ray."""
    return "ray_session" in node.fixturenames


def own_ray(item) -> bool:
    """A slow test that starts Ray processes of its own (a `ray start` cluster, `serve run`)."""
    return bool(item.get_closest_marker("slow")) and not shares_session_ray(item)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the markers
def pytest_collection_modifyitems(items):
    """With pytest-xdist (the default, see pyproject.toml), the tests that use the session's
    in-process Ray run in one worker process and all others in the other. Both spend much
    of their time starting processes one after another (a job's driver, Ray Train's
    controller, then its workers), each on one core, so either fills the core the other
    leaves idle; one in-process Ray, not two side by side. In one process (`-n 0`), the
    tests with a Ray of their own go first, before the session's in-process Ray exists: its
    idle daemons keep ~0.15 of a core busy."""
    items.sort(key=lambda i: not own_ray(i))
    for item in items:
        item.add_marker(pytest.mark.xdist_group("session-ray" if shares_session_ray(item) else "no-session-ray"))


@pytest.fixture(autouse=True)
def no_stray_in_process_ray(request):
    """A test that starts an in-process Ray without the ray_session fixture would put a
    second one beside the session's, in the other worker process."""
    ray = sys.modules.get("ray")
    up_before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not shares_session_ray(request) and not up_before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started an in-process Ray: give it the ray_session fixture", pytrace=False)


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
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    # moto's ThreadedMotoServer, on the socket held since import instead of binding its own
    server = make_server("127.0.0.1", S3_PORT, DomainDispatcherApplication(create_backend_app),
                         threaded=True, request_handler=MotoRequestHandler, fd=S3_SOCKET.fileno())
    threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True).start()
    client = boto3.client("s3")
    created = []

    def bucket(name: str) -> str:
        if name not in created:
            client.create_bucket(Bucket=name)
            created.append(name)
        return f"s3://{name}"

    yield bucket
    server.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    """The `tiny` preset with its work directory in the test's own temporary folder."""
    from deepfake_ray import config

    def make(*overrides: str, workdir: str | None = None):
        return config.build("tiny", None, list(overrides), workdir=workdir or str(tmp_path / "work"))

    return make
