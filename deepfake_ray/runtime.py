"""Connecting to Ray: a running cluster when an address is given, else in-process."""
from __future__ import annotations

import logging
import os
import socket

import ray


def init(address: str | None = None) -> None:
    """`--address` > `RAY_ADDRESS` > an in-process Ray sized for this machine.

    In-process Ray gets at least 4 logical CPUs: Train workers take fractional CPUs
    and Ray Data tasks need free slots beside them, even on a 2-core machine.
    `address="local"`: a bare `ray.init()` would join whatever `ray start` cluster
    this machine last ran (even a dead one), which is never what the embedded default means.
    Ray's own state API has the same habit inside workers: Ray Train asks it whether a run's
    controller lives, and pointed at a stale cluster every run stalled 12 s at its end. So
    the dashboard (which serves that API) runs on a port chosen here and workers are told it.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        port = free_port()
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True,
                 dashboard_port=port, runtime_env={"env_vars": {
                     "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                     # one machine: nothing to preempt, so no watcher process per training run
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}, **kwargs)
        print(f"ray: in-process, {int(ray.cluster_resources().get('CPU', 0))} CPUs; "
              f"dashboard at http://127.0.0.1:{port}")
    configure_data(quiet=os.environ.get("DEEPFAKE_RAY_PROGRESS", "1") == "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_data(quiet: bool) -> None:
    """Ray Data settings for the datasets this driver builds.

    Progress bars in a terminal and INFO lines in logs, unless `quiet` (tests want neither).
    Ray Data 2.60's default Parquet reader (datasource V2) starts a pool of
    footer-reading actors, new processes, for every read_parquet. Our stages read a few
    large Parquet parts, where that start-up cost 5-8 s per read on 2 cores; the V1 reader
    lists footers in its read tasks (measured 1-2 s for the same read).
    """
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    context.enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
