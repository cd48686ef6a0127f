"""Which file killed the worker decoding it, so that the file is set aside, not fatal.

A crafted file that crashes the image library (or a decode that runs the machine out of
memory) ends the worker, and Ray tries its task again (runtime.WORKER_RETRIES): every
try died on the same file, and the stage failed. Ray counts a task's tries; a retry
decodes a file at a time, noting each as it starts (~21 us a file on a local disk, a PUT
on S3), and the try after one that died on a noted file skips that file: 1 + 3 tries set
aside up to two per task. A first try writes nothing. The notes go where every try of
the task can read them: `prepare`'s in its claims folder on one machine and in the work
directory on a cluster; `score`'s on the node's own disk (/dev/shm), so that on a
cluster a retry that Ray runs on another node finds none of them, and dies as before.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

from deepfake_ray import storage
from deepfake_ray.errors import UsageError

REASON = "killed its decoder"  # a file set aside, as prepare and score count it
DETAIL = ("a worker died decoding it (a crash in the image library, or out of memory) after "
          "an earlier try of its task had died: set aside")
NOTES = ("decoding", "crashed")  # the file a retry is decoding; those set aside
STALE_S = 24 * 3600


def notes_dir() -> str:
    """This node's folder for the notes of tasks that have no shared one; notes older than
    a day, of tasks whose every try died here, are removed (the driver removes its run's
    on its own machine, not on a cluster's other nodes)."""
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    folder = os.path.join(parent, "deepfake-ray-crash-notes")
    os.makedirs(folder, exist_ok=True)
    for note in notes_of(folder):  # those of retried tasks: a few
        with contextlib.suppress(FileNotFoundError):  # removed by its task meanwhile
            if time.time() - os.stat(note).st_mtime > STALE_S:
                os.remove(note)
    return folder


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
    """The notes of one task, `key`, in `folder` (local or s3://), on its try `attempt`;
    used as a context, whose end (the task's, done or failed as Python fails) removes
    them: only a worker's death leaves them."""

    def __init__(self, folder: str, key: str | None, attempt: int):
        self.note, self.list = (storage.join(folder, f"{key}.{n}") for n in NOTES)
        self.retried = key is not None and attempt > 0
        self.crashed: set[str] = set()
        if self.retried:
            crashed = read_if_there(self.list)
            if last := read_if_there(self.note):  # the lost try died decoding it
                crashed += last + b"\0"
                put(self.list, crashed)
                put(self.note, b"")
            self.crashed = {os.fsdecode(p) for p in crashed.split(b"\0") if p}

    def __enter__(self) -> CrashWatch:
        return self

    def __exit__(self, *_) -> None:
        for note in (self.note, self.list) if self.retried else ():
            remove(note)

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


def watch(folder: str, run: str) -> CrashWatch:
    """The CrashWatch of the Ray task running this, in a run of a stage."""
    task = running_task()
    return CrashWatch(folder, f"{run}-{task}" if task else None, task_attempt())


def put(uri: str, data: bytes) -> None:
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    with open(uri, "wb") as f:  # no fsync, as storage's: a note outlives a worker, not the machine
        f.write(data)


def read_if_there(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return b""


def remove(uri: str) -> None:
    if storage.is_s3(uri):
        storage.delete_file(uri)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)


def notes_of(folder: str, run: str = "") -> list[str]:
    """The notes in `folder` of a run's tasks (of all, without `run`)."""
    names = storage.list_files(folder) if storage.is_s3(folder) else \
        os.listdir(folder) if os.path.isdir(folder) else []
    return [storage.join(folder, os.path.basename(name)) for name in names
            if os.path.basename(name).startswith(f"{run}-" if run else "")
            and name.endswith(tuple(f".{n}" for n in NOTES))]


def files_noted(folder: str, run: str = "") -> list[str]:
    """Every file a worker of the run died decoding, as its tasks noted them in `folder`."""
    return sorted({os.fsdecode(p) for note in notes_of(folder, run)
                   for p in read_if_there(note).split(b"\0") if p})


@contextlib.contextmanager
def named_if_fatal(folder: str, run: str, source: str) -> Iterator[None]:
    """Around a stage's tasks: workers that died on every try end it with one line naming
    the files they died on, as noted in `folder` on this machine (a cluster's other nodes
    keep their tasks' notes), and not with Ray's traceback; the run's notes there are
    removed."""
    import ray

    from deepfake_ray import runtime

    try:
        with runtime.explaining(ray.exceptions.WorkerCrashedError):
            yield
    except ray.exceptions.WorkerCrashedError as e:
        raise kept_dying(files_noted(folder, run), source) from e
    finally:
        for note in notes_of(folder, run):
            remove(note)


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
