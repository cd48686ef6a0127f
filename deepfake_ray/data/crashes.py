"""Which file killed the worker decoding it, so that the file is set aside, not fatal.

A crafted file that crashes the image library (or a decode that runs the machine out of
memory) ends the worker, and Ray tries its task again (runtime.WORKER_RETRIES): every
try died on the same file, and the stage failed. Ray counts a task's tries; a retry
decodes a file at a time, noting each as it starts, and the try after one that died on
a noted file skips that file: 1 + 3 tries set aside up to two per task. A first try
writes nothing. The notes are kept in Ray's own key-value store (its GCS), which every
try reaches wherever Ray runs it, on any node of a cluster, with no folder to share:
~0.35 ms a note here (a retry's two a file, against a decode's ~1-3 ms); a local file
took 21 us, but a cluster's work directory on S3 took a PUT each, and a node's own disk
was out of a retry's reach on another node. A stage removes its run's notes when it
ends; a driver killed first leaves a few bytes there until the cluster stops.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from deepfake_ray import storage
from deepfake_ray.errors import UsageError

REASON = "killed its decoder"  # a file set aside, as prepare and score count it
DETAIL = ("a worker died decoding it (a crash in the image library, or out of memory) after "
          "an earlier try of its task had died: set aside")
NOTES = ("decoding", "crashed")  # the file a retry is decoding; those set aside
NAMESPACE = "deepfake-ray-crash-notes"  # in Ray's key-value store


def running_task() -> str | None:
    """The ID of the Ray task running this, which its tries share; None outside one
    (asking Ray then would start one)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return ray.get_runtime_context().get_task_id()


def task_attempt() -> int:
    """How many tries of the Ray task running this came before it (0 outside one). Ray
    2.60 has no public call for it; its core worker's is asked, and without it every try
    counts as a first (the stage then fails as it did before these notes)."""
    import ray

    if running_task() is None:
        return 0
    count = getattr(ray._private.worker.global_worker.core_worker, "get_current_task_attempt_number", None)
    return count() if count else 0


class CrashWatch:
    """The notes of one task of a run, `key` ("RUN/TASK"), on its try `attempt`; used as
    a context around each batch the task decodes. The list of files set aside outlives the
    context: Ray Data calls a task's function once per batch (score's blocks hold many
    once a part has over 6,400 files), and a retry's later batch must still skip the file
    an earlier try died on. The run's end removes the notes (`named_if_fatal`)."""

    def __init__(self, key: str | None, attempt: int):
        self.note, self.list = (f"{key}.{n}" for n in NOTES)
        self.retried = key is not None and attempt > 0
        self.crashed: set[str] = set()
        if self.retried:
            crashed = get(self.list)
            if last := get(self.note):  # the lost try died decoding it
                crashed += last + b"\0"
                put(self.list, crashed)
                put(self.note, b"")
            self.crashed = {os.fsdecode(p) for p in crashed.split(b"\0") if p}

    def __enter__(self) -> CrashWatch:
        return self

    def __exit__(self, *_) -> None:
        if self.retried:  # the batch ended as Python ends: no file of it is being decoded
            delete(self.note)

    @contextlib.contextmanager
    def decoding(self, path: str) -> Iterator[None]:
        if not self.retried:  # nothing to find: no write
            yield
            return
        put(self.note, os.fsencode(path))
        try:
            yield
        finally:  # decoded, or failed as Python fails: not the file, should this try die later
            put(self.note, b"")


def watch(run: str) -> CrashWatch:
    """The CrashWatch of the Ray task running this, in a run of a stage."""
    task = running_task()
    return CrashWatch(f"{run}/{task}" if task else None, task_attempt())


def kv():
    """Ray's key-value store, as this process (a driver or a worker) reaches it: Ray's
    own libraries keep their state there; its calls are underscored, but stable."""
    from ray.experimental import internal_kv

    return internal_kv


def put(key: str, data: bytes) -> None:
    kv()._internal_kv_put(key, data, namespace=NAMESPACE)


def get(key: str) -> bytes:
    return kv()._internal_kv_get(key, namespace=NAMESPACE) or b""


def delete(key: str, by_prefix: bool = False) -> None:
    kv()._internal_kv_del(key, del_by_prefix=by_prefix, namespace=NAMESPACE)


def files_noted(run: str) -> list[str]:
    """Every file a worker of the run died decoding, as its tasks noted them."""
    keys = kv()._internal_kv_list(f"{run}/", namespace=NAMESPACE)
    return sorted({os.fsdecode(p) for key in keys for p in get(key.decode()).split(b"\0") if p})


@contextlib.contextmanager
def named_if_fatal(run: str, source: str) -> Iterator[None]:
    """Around a stage's tasks: workers that died on every try end it with one line naming
    the files they died on, as the run's tasks noted them, and not with Ray's traceback;
    the run's notes are removed."""
    import ray

    from deepfake_ray import runtime

    try:
        with runtime.explaining(ray.exceptions.WorkerCrashedError):
            yield
    except ray.exceptions.WorkerCrashedError as e:
        raise kept_dying(files_noted(run), source) from e
    finally:
        if ray.is_initialized():
            delete(f"{run}/", by_prefix=True)


def kept_dying(files: list[str], source: str) -> UsageError:
    """A task whose workers died on every try: more files that crash the image library
    than its tries can set aside, or a machine whose kernel kills them for want of memory."""
    why = "the workers decoding the images died on every try of their task (a crash in the image library"
    if not files:
        return UsageError(f"{why}, or the kernel killing them for want of memory): the dead workers' "
                          "logs (python-core-worker-*.log in Ray's session folder) name the file "
                          f"being decoded; take it out of {source}, then run the same command again")
    named = ", ".join(storage.printable(f) for f in files[:5])
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    return UsageError(f"{why} on a malformed file?); they died decoding {named}{more}: take "
                      f"{'it' if len(files) == 1 else 'them'} out of {source}, then run the same command again")
