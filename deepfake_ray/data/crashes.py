"""Which file killed the worker decoding it, so that the file is set aside, not fatal.

A crafted file that crashes the image library (or a decode that runs the machine out of
memory) ends the worker, and Ray tries its task again (runtime.WORKER_RETRIES): every
try died on the same file, and the stage failed. With a `CrashWatch`, a task notes that
it started; a retry decodes a file at a time, noting each as it starts (~20 us a file,
on retries only), and the try after one that died on a noted file skips that file: 1 + 3
tries set aside up to two per task. The notes are files on the node's own disk (in
memory where it can: /dev/shm), so a retry that Ray runs on another node of a cluster
finds none of them, and dies as before; the driver's one line then names what its own
node noted, if anything.
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
NOTES = ("started", "decoding", "crashed")  # a try began; the file a retry decodes; those set aside
STALE_S = 24 * 3600


def notes_dir() -> str:
    """This node's folder for the notes of tasks that are not given one; notes older than
    a day, of tasks whose every try died here, are removed (the driver removes its run's
    on its own machine, not on a cluster's other nodes)."""
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    folder = os.path.join(parent, "deepfake-ray-crash-notes")
    os.makedirs(folder, exist_ok=True)
    for note in notes_of(folder):  # those of running tasks: a few
        with contextlib.suppress(FileNotFoundError):  # removed by its task meanwhile
            if time.time() - os.stat(note).st_mtime > STALE_S:
                os.remove(note)
    return folder


def task_key(run: str) -> str | None:
    """A name for the Ray task running this (Ray keeps a task's ID across its tries) within
    one run of a stage; None outside one (asking Ray then would start one)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return f"{run}-{ray.get_runtime_context().get_task_id()}"


class CrashWatch:
    """The notes of one task, `key`, in `folder`; used as a context, whose end (the task's,
    done or failed as Python fails) removes them: only a worker's death leaves them. With
    no key (not in a Ray task) it notes nothing."""

    def __init__(self, folder: str, key: str | None):
        self.started, self.note, self.list = (os.path.join(folder, f"{key}.{n}") for n in NOTES)
        self.watching = key is not None
        self.retried = self.watching and os.path.exists(self.started)
        if self.watching and not self.retried:
            open(self.started, "wb").close()
        elif self.retried and (last := read_if_there(self.note)):  # the lost try died decoding it
            with open(self.list, "ab") as f:
                f.write(last + b"\0")
            open(self.note, "wb").close()  # moved to the list
        self.crashed = set(noted_in(self.list)) if self.retried else set()

    def __enter__(self) -> CrashWatch:
        return self

    def __exit__(self, *_) -> None:
        for note in (self.started, self.note, self.list) if self.watching else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(note)

    @contextlib.contextmanager
    def decoding(self, path: str) -> Iterator[None]:
        if not self.retried:  # nothing to find: no write
            yield
            return
        with open(self.note, "wb") as f:
            f.write(os.fsencode(path))
        try:
            yield
        finally:  # decoded, or failed as Python fails: not the file, should this try die later
            open(self.note, "wb").close()


def read_if_there(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def notes_of(folder: str, run: str = "") -> list[str]:
    """The notes in `folder` of a run's tasks (of all, without `run`)."""
    return [os.path.join(folder, name) for name in os.listdir(folder)
            if name.startswith(f"{run}-" if run else "") and name.endswith(tuple(f".{n}" for n in NOTES))]


def noted_in(note: str) -> list[str]:
    return [os.fsdecode(p) for p in read_if_there(note).split(b"\0") if p]


def files_noted(folder: str, run: str = "") -> list[str]:
    """Every file a worker of the run died decoding, as its tasks noted them on this node."""
    return sorted({p for note in notes_of(folder, run) if not note.endswith(".started") for p in noted_in(note)})


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
            with contextlib.suppress(FileNotFoundError):
                os.remove(note)


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
