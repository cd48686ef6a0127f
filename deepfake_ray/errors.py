"""The one exception type that means "the user asked for something we cannot do", and
how to find one (or an S3 failure, a full disk or workers out of memory: what the user
can fix) behind the errors Ray wraps it in; and how a stop signal stops a command."""
import contextlib
import errno
import os
import signal
import stat
import sys
import time


def warn(line: str) -> None:
    """A warning, on stderr with the errors: `2>warnings.log` gets them all, and a log
    gets each at once, in order with the errors."""
    print(line, file=sys.stderr, flush=True)


class UsageError(Exception):
    """Bad usage or bad input. The CLI prints the message as one line and exits 2.

    The message must say what is wrong and how to fix it.
    """


class LockHeld(UsageError):
    """Another live run holds the lock of what this one would write; `holder` says which
    ("prepare (pid 12 on host)"), for a caller that names the folder its own way."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class Terminated(KeyboardInterrupt):
    """A stop signal, stopping a command as Ctrl-C does: SIGTERM (`ray job stop`, `timeout`,
    a container's stop), SIGHUP (the terminal or ssh session closed), SIGUSR1 (Slurm's
    `--signal` before a time limit)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
SIGTERMS: list[float] = []  # when each stop signal of the running command arrived
STOPPED_BY: list[int] = []  # the first one's number


def raise_terminated(signum: int = signal.SIGTERM, _frame=None) -> None:
    """The stop signals' handler. One within a second of the one before is the same stop:
    `timeout` signals the command, then its whole process group, and that second signal
    cut the first one's cleanup short (during Ray's start: exit 15 and no line)."""
    if signum == signal.SIGHUP:
        detach_from_terminal()
    if not note_sigterm(signum):
        raise Terminated


def note_sigterm(signum: int = signal.SIGTERM) -> bool:
    """Records a stop signal; whether it came within a second of the one before (so a
    steady stream of them, each within a second of the last, is one stop)."""
    now = time.monotonic()
    repeated = bool(SIGTERMS) and now - SIGTERMS[-1] < 1.0
    SIGTERMS.append(now)
    if not STOPPED_BY:
        STOPPED_BY.append(signum)
    return repeated


def detach_from_terminal() -> None:
    """After SIGHUP the terminal is gone, and a line written to it fails (EIO), replacing
    the stop with that error: what would go there goes nowhere (a log file stays)."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal, not a file or a pipe
                to_devnull(fd)


def to_devnull(fd: int) -> None:
    """Point `fd` at /dev/null: what is written there goes nowhere, without an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`| head`): a BrokenPipeError
    may also be a socket's (S3, Ray), which must not pass for that quiet end."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (a notebook's stdout has no fd)
        return False


def stop_signal(stop: KeyboardInterrupt) -> int | None:
    """The signal that stopped the command; None for Ctrl-C. Ray's wait on a task or a
    training run answers the Terminated raised inside it with a KeyboardInterrupt of its
    own (such a stop was told "interrupted", exit 130)."""
    if isinstance(stop, Terminated) or SIGTERMS:
        return STOPPED_BY[0] if STOPPED_BY else signal.SIGTERM
    return None


def find_usage_error(e: BaseException) -> UsageError | str | None:
    """A UsageError, or an S3 failure the user can fix, behind `e`: raised inside a Ray
    task, it arrives wrapped."""
    from deepfake_ray import s3

    return find_error(e, lambda f: f if isinstance(f, UsageError)
                      else s3.explain(f) or disk_full(f) or not_permitted(f))


def disk_full(e: BaseException) -> str | None:
    """One line for a local disk (or quota) that is full. Ray passes a worker's error on as
    text inside its own, so the text is read too."""
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.EDQUOT or "Disk quota exceeded" in text:
        what = "disk quota exceeded"
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in text:
        what = "no space left on device"
    else:
        return None
    where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    return (f"{what}{where}: free space on the disk it writes to (and on the temp dir's, where "
            "Ray and each training checkpoint write first; Ray's old sessions in /tmp/ray may go), "
            "then run the same command again: "
            "finished stages are skipped and a training resumes from its last checkpoint")


def not_permitted(e: BaseException) -> str | None:
    """One line for a file or folder this user may not write (or read): a stage folder left
    by a run as another user, a read-only mount. The workdir's top is checked before Ray
    starts (cli.unwritable); this names what is below it."""
    if not (isinstance(e, OSError) and e.filename and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
        return None
    from deepfake_ray import storage

    return (f"{e.strerror or 'permission denied'}: {storage.shown(str(e.filename))}: give this user "
            "read and write permission there (ls -ld shows its owner), or name another place for it")


def out_of_memory_cause(e: BaseException) -> str | None:
    """What ran out, when `e` is a worker that ran out of memory: torch's error on a GPU, or
    Ray's memory monitor stopping a worker on a node short of RAM. Ray passes a worker's
    error on as text inside its own, so the text is read too."""
    text = f"{type(e).__name__}: {e}"
    if any(said in text for said in ("CUDA out of memory", "MPS backend out of memory", "CUDA error: out of memory",
                                     "CUBLAS_STATUS_ALLOC_FAILED")):  # the latter two: CUDA's own allocations
        return "a worker ran out of GPU memory"
    if "running low on memory" in text:  # Ray's memory monitor, as it kills a worker
        return "Ray stopped a worker for want of memory on its node"
    return None


def explained(e: BaseException) -> bool:
    """Whether the CLI prints `e` as one line that says what to fix (exit 2), so its
    traceback is noise: bad input or settings, an S3 failure or full disk the user can fix,
    workers out of memory."""
    return find_usage_error(e) is not None or find_error(e, out_of_memory_cause) is not None


def find_error(e: BaseException, match):
    """The first truthy `match(f)` over `e` and the errors behind it, as Ray wraps them."""
    seen, pending = set(), [e]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if found := match(e):
            return found
        cause = getattr(e, "cause", None)
        pending.append(cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__))
        # Ray Train's errors hold the workers' (by rank) or its controller's, not as a cause
        pending += [f for f in (getattr(e, "worker_failures", None) or {}).values()
                    if isinstance(f, BaseException)]
        pending.append(getattr(e, "controller_failure", None))
    return None
