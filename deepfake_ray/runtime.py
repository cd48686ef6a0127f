"""Connecting to Ray: a running cluster when an address is given, else in-process."""
from __future__ import annotations

import logging
import os

import ray


def init(address: str | None = None) -> None:
    """`--address` > `RAY_ADDRESS` > an in-process Ray sized for this machine.

    In-process Ray gets at least 4 logical CPUs: Train workers take fractional CPUs
    and Ray Data tasks need free slots beside them, even on a 2-core machine.
    `address="local"`: a bare `ray.init()` would join whatever `ray start` cluster
    this machine last ran (even a dead one), which is never what the embedded default means.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 **kwargs)
    quiet_data_progress(os.environ.get("DEEPFAKE_RAY_PROGRESS", "1") == "0")


def quiet_data_progress(quiet: bool) -> None:
    """Ray Data shows progress bars in a terminal and INFO lines in logs; tests want neither."""
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
