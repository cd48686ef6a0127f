"""Commands run as a user runs them: in a process of their own, with a Ray of their own."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="local", PYTHONUNBUFFERED="1",  # its own Ray, never ours
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return env


CRASHING_LIBRARY = """
import os, signal
from PIL import ImageFile

decode_pixels = ImageFile.ImageFile.load

def load(image):  # what a bug in an image library does to the process decoding a crafted file
    if image.info.get("comment") == %r:
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_pixels(image)

ImageFile.ImageFile.load = load
"""


def crashing_image_library(folder) -> dict:
    """subprocess_env() in which Pillow, in every Python process (Ray's workers too), crashes
    as a buggy decoder does on a crafted file, here tests.images.crashing_jpeg's."""
    from tests.images import CRASHING

    os.makedirs(folder)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(CRASHING_LIBRARY % CRASHING)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    return env


@contextlib.contextmanager
def killed_at_end():
    """A function that returns the process it is given, and kills its session when the
    block ends, also by a failed assertion: a `prepare` of 200,000 images left running
    took both cores from the tests after it, which then timed out too."""
    started = []
    try:
        yield lambda proc: started.append(proc) or proc
    finally:
        for proc in started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def first_line(proc: subprocess.Popen, seconds: float = 120) -> str:
    """The first line `proc` prints; a process that says nothing for `seconds` (a Ray that
    never comes) is killed, so the test fails ("") instead of hanging CI's run."""
    import threading

    hung = threading.Timer(seconds, proc.kill)
    hung.start()
    try:
        return proc.stdout.readline()
    finally:
        hung.cancel()


def run_cli(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`deepfake-ray ARGS` in a session of its own; past `timeout`, the whole session is
    killed (its Ray too) and TimeoutExpired raised."""
    proc = subprocess.Popen([sys.executable, "-m", "deepfake_ray.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stop(proc: subprocess.Popen, sig: int) -> int:
    """Signal a process started in a session of its own; if it has not ended within a
    minute, kill its whole session, so that a Ray it started is not left running."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def wait_for_line(log_path, text: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while text not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(1)


@contextlib.contextmanager
def ctrl_c_for_children():
    """SIGINT as a terminal delivers it, to the processes started inside: a suite started
    in the background by a script (`pytest &`) ignores SIGINT, a child inherits that (an
    ignored signal stays ignored across exec; a handled one becomes the default), and
    Python then never raises KeyboardInterrupt in it. Not preexec_fn: that runs Python in
    the forked child, which is unsafe beside this process's threads (moto's server)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def process_stat(pid: int | str) -> tuple[str, int]:
    """(name, parent pid) of a running process (Linux's /proc); OSError once it has ended."""
    with open(f"/proc/{pid}/stat") as f:
        command, rest = f.read().rsplit(")", 1)  # the name may hold spaces
    return command.split("(", 1)[1], int(rest.split()[1])


def children(pid: int) -> list[int]:
    """The pids of process `pid`'s children."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # not a process, or ended meanwhile
            if process_stat(entry)[1] == pid:
                found.append(int(entry))
    return found


def command_line(pid: int) -> bytes:
    """Process `pid`'s command line, NUL-separated; OSError once it has ended."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def has_child(pid: int, name: str) -> bool:
    """Whether process `pid` has a child process called `name`."""
    for child in children(pid):
        with contextlib.suppress(OSError, IndexError):
            if process_stat(child)[0] == name:
                return True
    return False


def signal_driver_once(sig: int, marker: str):
    """For a training worker or a Tune trial: the user's Ctrl-C or a stop, sent to this
    (the driver's) process, then a wait the stop ends. Once only, by creating `marker`: a
    retried worker sending it again would stop later tests."""
    driver = os.getpid()

    def send(*_, **__):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(driver, sig)
        time.sleep(120)  # the stop ends this worker long before

    return send


def ended_pid() -> int:
    """The pid of a process that has ended, as a killed one's files name it."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def helper_pid_or_death(data: bytes) -> int:
    """In place of a decode helper's decode: the helper's pid, a moment later (so that
    the uploads queued behind it are still queued when another dies), or the death of
    the helper for b"crash", as a crafted file ends it."""
    import time

    if data == b"crash":
        os._exit(1)
    time.sleep(0.05)
    return os.getpid()
