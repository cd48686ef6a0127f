import os
import signal
import socket
import sys
import time

import pytest

from deepfake_ray import runtime
from deepfake_ray.errors import UsageError

SETTINGS = ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_task_oom_retries")


def settings_in_a_task(ray):
    @ray.remote(num_cpus=1)
    def settings():
        return {name: os.environ.get(name) for name in SETTINGS}
    return ray.get(settings.remote())


def test_in_process_ray_passes_its_settings_to_its_processes_only(ray_session):
    """Workers learn where the dashboard's state API is (pointed at a stale cluster, Ray
    Train stalled 12 s per run), that nothing can be preempted and that Train's controller
    may poll its local workers often; this process, and whatever it starts later (a
    `ray start` cluster, a job), keeps its own environment."""
    seen = settings_in_a_task(ray_session)
    assert (seen["RAY_API_SERVER_ADDRESS"] or "").startswith("http://127.0.0.1:"), seen
    assert seen["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert seen["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert seen["RAY_task_oom_retries"] == str(runtime.WORKER_RETRIES)  # a Train run's data tasks too
    assert not any(name in os.environ for name in SETTINGS)


def test_free_ports_are_ones_the_os_never_hands_out_by_itself():
    """Two services on one machine pick their HAProxy ports; a port from the kernel's
    ephemeral range could be given to a Ray worker before HAProxy binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = {runtime.free_port() for _ in range(20)}
    assert len(ports) > 1 and all(10000 < p < ephemeral_low for p in ports)
    with socket.socket() as s:
        s.bind(("0.0.0.0", ports.pop()))  # free indeed


def test_no_port_is_handed_out_twice_in_a_process(monkeypatch):
    """A head node's seven listeners drawn one at a time once got one port twice, and
    `ray start` refused to start; a port picked for a listener not yet bound is as free as
    any other. Handed out once, a port is not handed out again by this process, even when
    the draw, as here, offers each call the same ports in the same order."""
    monkeypatch.setattr(runtime.random, "sample", lambda population, k: list(population)[:k])
    first, second = runtime.free_port(), runtime.free_port()
    ports = runtime.free_ports(7)
    assert len({first, second, *ports}) == 9


@pytest.mark.parametrize("setting, terminal, bars", [(None, True, True), (None, False, False),
                                                     ("1", False, True), ("0", True, False)])
def test_ray_data_draws_progress_bars_only_in_a_terminal_unless_told(monkeypatch, setting, terminal, bars):
    """In a log, Ray's tqdm bars of the processes feeding Ray Train were redrawn as
    hundreds of lines; without it Ray Data's workers log their progress as its driver does.
    (Our own progress lines, every 10 s in a log: tests/test_prepare.py.)"""
    import io

    import ray.data

    class Stdout(io.StringIO):
        def isatty(self):
            return terminal

    monkeypatch.setattr("sys.stdout", Stdout())
    monkeypatch.delenv("DEEPFAKE_RAY_PROGRESS", raising=False)
    if setting is not None:
        monkeypatch.setenv("DEEPFAKE_RAY_PROGRESS", setting)
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "use_ray_tqdm", context.use_ray_tqdm)  # put back afterwards
    monkeypatch.setattr(context, "enable_progress_bars", context.enable_progress_bars)
    monkeypatch.setattr(context, "print_on_execution_start", context.print_on_execution_start)
    runtime.configure_data()
    assert context.use_ray_tqdm is bars
    assert context.enable_progress_bars is context.print_on_execution_start is (setting != "0")


def test_rays_misleading_and_per_epoch_lines_are_left_out_beside_a_users_own_pattern():
    """The pattern the CLI gives Ray (RAY_DEDUP_LOGS_SKIP_REGEX) for the lines of its
    processes a command's output leaves out; a user's own pattern, inline flags and all,
    is kept (wrapped, a leading `(?i)` no longer compiled, and Ray's import failed)."""
    import re

    from deepfake_ray import progress

    ray_lines = ["Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
                 "/x/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
                 "  self.exclude_resources = exclude_resources"]
    finished = "\u2714\ufe0f  Dataset train_035AfDMHhZYEGz3LugrPYd_0 execution finished in 0.05 seconds"
    ours = ["train-gan: epoch 1/2  G loss 0.777  D loss 1.321", "prepared 96 images (0 rejected) in 2s -> w/data"]
    for quiet in (False, True):
        pattern = re.compile(progress.noise_pattern(None, quiet))
        assert all(pattern.search(line) for line in ray_lines) and not any(map(pattern.search, ours))
        assert bool(pattern.search(finished)) is quiet  # Ray Data's INFO line: off with DEEPFAKE_RAY_PROGRESS=0
    theirs = re.compile(progress.noise_pattern("(?i)HEARTBEAT", False))
    assert theirs.search("heartbeat 3") and theirs.search(ray_lines[0]) and not any(map(theirs.search, ours))
    assert progress.noise_pattern("(unclosed", False) == "(unclosed"  # theirs alone, as Ray takes it


def test_a_ray_address_that_cannot_work_exits_2_before_anything_runs(monkeypatch, tmp_path, capsys):
    from deepfake_ray import cli
    from tests.cli_output import error_lines

    # as Ray's job docs have users export it for `ray job submit`
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "http://head:8265 is a dashboard URL" in err[0]
    assert "ray job submit --address http://head:8265 -- deepfake-ray" in err[0]
    assert err[0].endswith("(the address is RAY_ADDRESS's: unset it to run in-process, or set it to HEAD:6379)")
    assert not (tmp_path / "w").exists()  # no config.yaml written
    # a head's name without its port: Ray's own check raised a ValueError (exit 1, a traceback)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                     "--address", "headnode"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "Ray address headnode names no port: pass HEAD:6379" in err[0]
    assert not (tmp_path / "w").exists()
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                     "--address", "127.0.0.1:99999"]) == 2  # was "Connection refused"
    assert error_lines(capsys) == ["deepfake-ray prepare: error: Ray address 127.0.0.1:99999: port 99999 "
                                   "is out of range (1-65535): pass HEAD:6379, the head node's GCS port"]
    # nothing listens there: Ray itself retried it for minutes, printing warnings (asked as
    # from a process with no Ray yet: under -n 0 the session's runs here already)
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                     "--address", "127.0.0.1:1"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)" in err[0]
    assert not (tmp_path / "w").exists()


def test_a_second_command_in_one_process_asking_for_another_ray_is_refused(ray_session, tmp_path, capsys):
    """In a notebook, a command with --address after one on the in-process Ray (or the
    reverse) ran on the Ray the first had started, silently: the laptop's, not the cluster."""
    from deepfake_ray import cli
    from tests.cli_output import error_lines

    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                     "--address", "10.255.255.1:6379"]) == 2  # refused before any connection is tried
    assert error_lines(capsys) == [
        "deepfake-ray prepare: error: this Python process already runs Ray (in-process), so it cannot "
        "also use 10.255.255.1:6379: run the command in a new process, or call ray.shutdown() first"]
    assert not (tmp_path / "w" / "config.yaml").exists()


def test_a_path_that_is_not_utf8_exits_2_with_the_fix_before_anything_runs(monkeypatch, tmp_path, capsys):
    """Ray hands the command line and the current folder to its core as UTF-8: an old
    Latin-1 folder name failed there with a traceback, after config.yaml was written."""
    from deepfake_ray import cli
    from tests.cli_output import error_lines
    from tests.images import encode, rgb

    latin1 = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    os.mkdir(latin1)
    with open(os.path.join(latin1, "face.jpg"), "wb") as f:
        f.write(encode(rgb(), "JPEG"))
    assert cli.main(["prepare", "--preset", "tiny", "--source", latin1, "--workdir", str(tmp_path / "w")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "caf\\xe9 is not valid UTF-8, which Ray cannot take: if it names a file or folder, rename it" in err[0]
    monkeypatch.chdir(latin1)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "the current folder" in err[0] and "run from a folder whose path is valid UTF-8" in err[0]
    assert not (tmp_path / "w").exists()  # no config.yaml, no lock
    # as the work directory, or score's --out: a traceback from the checks that list or
    # write there before Ray starts
    for argv in (["prepare", "--preset", "tiny", "--workdir", os.path.join(latin1, "w")],
                 ["score", "--model", str(tmp_path / "m"), "--input", str(tmp_path), "--out",
                  os.path.join(latin1, "scores.csv")]):
        assert cli.main(argv) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and "caf\\xe9" in err[0] and "is not valid UTF-8" in err[0], err
    assert os.listdir(latin1) == ["face.jpg"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_a_command_as_ctrl_c_does_with_one_line_and_its_exit_code(tmp_path, sig):
    """`ray job stop`, `timeout` and a container's stop send SIGTERM: Ray's own handler
    printed a stack dump, or a SystemExit traceback, and no line of ours. An ssh session
    that drops sends SIGHUP, which ended the command at once, its config.yaml and S3
    lease left behind."""
    import subprocess
    import sys

    from tests.processes import killed_at_end, stop, subprocess_env, wait_for_line

    log = tmp_path / "prepare.log"
    with open(log, "w") as out, killed_at_end() as tracked:
        proc = tracked(subprocess.Popen([sys.executable, "-m", "deepfake_ray.cli", "prepare", "--preset", "tiny",
                                         "--source", "sample:200000", "--workdir", str(tmp_path / "w")],
                                        stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(),
                                        start_new_session=True))
        wait_for_line(log, "prepare: reading 200,000 images", proc, 120)  # minutes of work: stopped early
        assert stop(proc, sig) == 128 + sig, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    cpus = max(4, runtime.machine_cores())  # Train's workers and Ray Data's tasks side by side
    assert f"ray: in-process, {cpus} CPUs; dashboard at http://127.0.0.1:" in log.read_text()
    said = [line for line in log.read_text().splitlines() if line.startswith("deepfake-ray prepare: ")]
    assert said == [f"deepfake-ray prepare: stopped ({sig.name}); run the same command again: finished stages "
                    "are skipped and a training resumes from its last checkpoint"]
    assert not (tmp_path / "w" / "config.yaml").exists()  # a first run's settings, put back: none


@pytest.mark.slow
def test_a_full_disk_stops_a_training_with_one_line_keeping_the_checkpoint_that_fitted(tmp_path):
    """The work directory on a disk too small for the GAN's second checkpoint (a 700 KB
    tmpfs): one line saying the disk is full and how to go on, exit 2, and the first
    checkpoint intact for the rerun to resume from (a run whose record the full disk left
    empty resumes too: test_a_run_resumes_from_intact_checkpoint_folders_ray_does_not_list).
    Mounting needs root: skipped without it."""
    import subprocess

    from deepfake_ray import checkpoint
    from deepfake_ray.data import datasets, sample
    from tests.detector_stages import SPLIT_OF, write_stage
    from tests.processes import run_cli, subprocess_env

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        # the tiny preset's reals, written as prepare stores them (a `prepare` command: ~20 s more)
        write_stage(datasets.data_dir(str(disk / "w")), [(sample.face(0, i, 32), SPLIT_OF[i % 10]) for i in range(96)])
        full = run_cli(["train-gan", "--preset", "tiny", "--workdir", str(disk / "w"),
                        "--set", "gan.max_failures=0"],  # each retry would fail the same way
                       subprocess_env(), timeout=600)
        said = [line for line in full.stderr.splitlines() if line.startswith("deepfake-ray train-gan: ")]
        assert full.returncode == 2 and said == [
            "deepfake-ray train-gan: error: no space left on device: free space on the disk it writes "
            "to (and on the temp dir's, where Ray and each training checkpoint write first; Ray's old "
            "sessions in /tmp/ray may go), then run the "
            "same command again: finished stages are skipped and a training resumes from its last "
            "checkpoint"], full.stderr[-3000:]
        assert full.stderr.rstrip().splitlines()[-1] == said[0]  # not followed by Ray's tracebacks
        assert checkpoint.state_intact(str(disk / "w" / "gan" / "epoch_0000"))
    finally:
        subprocess.run(["umount", "--lazy", str(disk)])  # its Ray's processes may still be ending


@pytest.mark.slow
def test_tasks_ray_keeps_stopping_for_want_of_memory_end_the_command_with_one_line(tmp_path):
    """Ray's memory monitor stops workers on a node short of RAM (here every one it sees:
    a threshold of 1% of the machine's memory), and Ray Data started its tasks again
    without end, so `prepare` waited forever. Now they are tried again a few times, then
    the command stops with one line naming what to do, exit 2, and writes nothing (a task or
    pool actor that dies another way: test_a_stage_whose_workers_keep_dying_ends)."""
    from tests.processes import run_cli, subprocess_env

    env = {**subprocess_env(), "RAY_memory_usage_threshold": "0.01",
           "RAY_task_oom_retry_delay_base_ms": "100"}  # Ray waits longer before each try: from 1 s by default
    workdir = tmp_path / "w"
    prepared = run_cli(["prepare", "--preset", "tiny", "--source", "sample:8", "--workdir", str(workdir)],
                       env, timeout=300)
    said = [line for line in prepared.stderr.splitlines() if line.startswith("deepfake-ray prepare: ")]
    assert prepared.returncode == 2 and said == [
        "deepfake-ray prepare: error: Ray stopped a worker for want of memory on its node: run it on "
        "machines with more memory; then run the same command again: finished stages are skipped "
        "and a training resumes from its last checkpoint"], prepared.stderr[-3000:]
    assert not (workdir / "data" / "manifest.parquet").exists()


def test_what_a_stop_cut_off_half_built_prints_no_traceback_as_it_is_freed(tmp_path):
    """A SIGTERM inside a Ray Data dataset's __init__ left it without the attribute its
    __del__ reads: "Exception ignored in ... Traceback" after the stop's one line. Here an
    object of that kind, held by the stop's traceback as the dataset was, in the console
    script's process."""
    import subprocess
    import sys

    from tests.processes import subprocess_env

    script = """
import sys
from deepfake_ray import cli
from deepfake_ray.errors import Terminated

class HalfBuilt:
    def __init__(self):
        raise Terminated  # stopped before its fields were set

    def __del__(self):
        self.executor.shutdown()

def execute(args):
    HalfBuilt()

cli.execute = execute
sys.argv = ["deepfake-ray", "prepare", "--preset", "tiny", "--workdir", sys.argv[1]]
sys.exit(cli.main())
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.splitlines() == ["deepfake-ray prepare: stopped (SIGTERM); run the same command "
                                        "again: finished stages are skipped and a training resumes "
                                        "from its last checkpoint"], done.stderr


def test_sigterm_while_ray_starts_is_a_stop_too(tmp_path):
    """Ray's start puts in its own SIGTERM handler first thing: a command stopped then
    (seconds, here) exited 15 with no line."""
    import subprocess
    import sys

    from tests.processes import has_child, killed_at_end, stop, subprocess_env

    log = tmp_path / "prepare.log"
    with open(log, "w") as out, killed_at_end() as tracked:
        proc = tracked(subprocess.Popen([sys.executable, "-m", "deepfake_ray.cli", "prepare", "--preset", "tiny",
                                         "--source", "sample:2000", "--workdir", str(tmp_path / "w")],
                                        stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(),
                                        start_new_session=True))
        deadline = time.time() + 120
        while not has_child(proc.pid, "gcs_server"):  # Ray's first process: its start is under way
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert stop(proc, signal.SIGTERM) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "ray: in-process" not in text  # stopped while Ray started, as meant
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if line.startswith("deepfake-ray prepare: ")] == [
        "deepfake-ray prepare: stopped (SIGTERM); run the same command again: finished stages "
        "are skipped and a training resumes from its last checkpoint"]


def test_a_force_run_stopped_before_it_replaced_anything_says_to_keep_force(ray_session, tmp_path):
    """Its advice was to run it again without --force, which kept the old data/ as it was.
    A second Ctrl-C, while Ray shuts down, ends it at once (it was a traceback from Ray's
    shutdown, or a segfault)."""
    import subprocess
    import sys

    from deepfake_ray import config, storage
    from deepfake_ray.data import datasets, prepare
    from tests.processes import ctrl_c_for_children, killed_at_end, stop, subprocess_env, wait_for_line

    workdir = tmp_path / "w"
    prepare.run(config.build("tiny", None, ["data.source=sample:20"], workdir=str(workdir)))
    log = tmp_path / "prepare.log"
    with open(log, "w") as out, ctrl_c_for_children(), killed_at_end() as tracked:
        proc = tracked(subprocess.Popen([sys.executable, "-m", "deepfake_ray.cli", "prepare", "--preset", "tiny",
                                         "--force", "--source", "sample:200000", "--workdir", str(workdir)],
                                        stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(),
                                        start_new_session=True))
        wait_for_line(log, "prepare: reading 200,000 images", proc, 120)
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while "before anything was replaced" not in log.read_text():  # said: Ray shuts down next
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        assert stop(proc, signal.SIGINT) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert [line for line in text.splitlines() if line.startswith("deepfake-ray prepare: ")] == [
        "deepfake-ray prepare: interrupted before anything was replaced; run the same command again"]
    assert storage.completed(datasets.data_dir(str(workdir)))["source"] == "sample:20"  # as it said


def test_ctrl_c_during_a_training_run_is_an_interrupt_and_a_later_one_too(ray_session, tmp_path):
    """Ray Train's own Ctrl-C handler aborts the run and calls sys.exit(0), so a command
    ended in silence with exit 0 (a `train-gan && generate` went on). It arrives as a
    KeyboardInterrupt (the CLI: exit 130, how to resume), and a Ctrl-C after the run (in
    the pipeline's next stage) is one too, not an abort of the finished run."""
    from deepfake_ray import config, training

    from tests.processes import signal_driver_once

    driver, press_ctrl_c = os.getpid(), signal_driver_once(signal.SIGINT, str(tmp_path / "pressed"))

    cfg = config.build("tiny", None, [], workdir=str(tmp_path))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            training.fit(press_ctrl_c, {}, cfg, str(tmp_path / "runs"), "interrupted")
        with pytest.raises(KeyboardInterrupt):
            os.kill(driver, signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_resumes_from_intact_checkpoint_folders_ray_does_not_list(ray_session, tmp_path, capsys):
    """Ray's record of a run empty (its write cut short by a full disk or a kill), which
    Ray cannot read, or deleted after that error: the run started over from epoch 1, over
    what it made. The folders Ray lists damaged beside a newer intact one (a stop between
    an upload and its registration): the workers were retried until the run failed. Both
    resume from the newest intact folder."""
    import shutil

    from deepfake_ray import config, storage, training

    runs, found = str(tmp_path / "runs"), str(tmp_path / "found.json")

    def three_epochs(_):
        for epoch in range(3):
            training.report_epoch(epoch, {"score": epoch}, {"epoch": epoch})

    def restored(_):
        state = training.restore_state()
        storage.write_json(found, state and state["epoch"])

    cfg = config.build("tiny", None, [], workdir=str(tmp_path))
    training.fit(three_epochs, {}, cfg, runs, "damaged", keep=3)
    run = os.path.join(runs, "damaged")
    # its copy with Ray's record empty (one run fewer: each costs ~12 s of Ray's start-up here)
    shutil.copytree(run, os.path.join(runs, "unrecorded"))
    open(os.path.join(runs, "unrecorded", "checkpoint_manager_snapshot.json"), "w").close()
    training.fit(restored, {}, cfg, runs, "unrecorded")
    assert storage.read_json(found) == 2
    assert f"note: Ray's record of the run in {os.path.join(runs, 'unrecorded')} was empty" in capsys.readouterr().out

    shutil.copytree(os.path.join(run, "epoch_0001"), os.path.join(run, "epoch_0005"))  # never registered
    for epoch in range(3):
        with open(os.path.join(run, f"epoch_{epoch:04d}", "state.pt"), "r+b") as f:
            f.write(b"cut short")
    training.fit(restored, {}, cfg, runs, "damaged", max_failures=0)
    assert storage.read_json(found) == 1  # the copy's state: epoch 1's


@pytest.mark.parametrize("workers", ["tasks", "actors"])
def test_a_stage_whose_workers_keep_dying_ends(ray_session, tmp_path, workers):
    """Ray Data starts a task or a pool's actor again without end after its worker died,
    so `prepare` or `score` waited forever on an image whose decoding crashed the worker or
    was killed for its memory, and so did `generate`, `evaluate` and `score` on a model
    actor the memory monitor kept stopping (that monitor itself, with tasks:
    test_tasks_ray_keeps_stopping_for_want_of_memory_...). Here each try dies at once."""
    import threading

    import ray.data

    def die(batch):
        (tmp_path / f"try-{os.getpid()}").touch()
        os.kill(os.getpid(), signal.SIGKILL)

    class DiesOnEachBatch:  # defined here, so that Ray ships it by value to the pool's workers
        def __call__(self, batch):
            die(batch)

    outcome = []

    def run_stage():
        ds = ray.data.range(4, override_num_blocks=1)
        try:
            if workers == "tasks":
                runtime.map_on_tasks(ds, die).materialize()
            else:
                runtime.map_on_actor_pool(ds, DiesOnEachBatch, 1).materialize()
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - what a stage would raise
            outcome.append(e)

    stage = threading.Thread(target=run_stage, daemon=True)
    stage.start()
    stage.join(timeout=240)
    assert outcome, "the stage still waits on its workers after 4 minutes"
    died = ray.exceptions.WorkerCrashedError if workers == "tasks" else ray.exceptions.ActorDiedError
    assert isinstance(outcome[0], died), outcome[0]
    assert len(list(tmp_path.glob("try-*"))) == 1 + runtime.WORKER_RETRIES  # the first start, then each retry


def test_a_run_keeps_its_best_checkpoint_and_a_resumed_one_reads_it_by_epoch(ray_session, tmp_path):
    """Checkpoints ranked by a reported score, as the detector's val_score: with keep=1 the
    run keeps its best one and its newest, and a resumed run reads the best one's state by
    its epoch (how the detector puts best/ back after an export no checkpoint backs). Of
    the folders a stop left unregistered, a finished run deletes what Ray would have
    pruned (a lower score, one cut short) and keeps a better one: they stayed for good."""
    from deepfake_ray import checkpoint, config, storage, training

    runs, found = str(tmp_path / "runs"), str(tmp_path / "found.json")
    run = os.path.join(runs, "scored")

    def three_epochs(_):
        for epoch, score in enumerate([0.9, 0.5, 0.7]):
            training.report_epoch(epoch, {"val_score": score}, {"epoch": epoch, "score": score})

    def read_back_then_one_more(_):
        states = {epoch: training.state_at_epoch(epoch) for epoch in range(5)}  # 3, 4: unregistered
        storage.write_json(found, {e: s and s["score"] for e, s in states.items()})
        training.report_epoch(6, {"val_score": 0.2}, {"epoch": 6, "score": 0.2})

    cfg = config.build("tiny", None, [], workdir=str(tmp_path))
    training.fit(three_epochs, {}, cfg, runs, "scored", keep=1, keep_best_by="val_score")
    kept = {name for name in os.listdir(run) if name.startswith("epoch_")}
    assert kept == {"epoch_0000", "epoch_0002"}  # epoch 1 is neither the best nor the newest
    for epoch, score in ((3, 0.95), (4, 0.1)):  # written whole after a stop, never registered
        os.makedirs(os.path.join(run, f"epoch_{epoch:04d}"))
        checkpoint.write_state(os.path.join(run, f"epoch_{epoch:04d}"), {"epoch": epoch, "score": score},
                               {"val_score": score})
    os.makedirs(os.path.join(run, "epoch_0005"))  # cut short: no state.json
    training.fit(read_back_then_one_more, {}, cfg, runs, "scored", keep=1, keep_best_by="val_score")
    assert storage.read_json(found) == {"0": 0.9, "1": None, "2": 0.7, "3": 0.95, "4": 0.1}
    kept = {name for name in os.listdir(run) if name.startswith("epoch_")}
    assert kept == {"epoch_0000", "epoch_0003", "epoch_0006"}  # Ray's best and newest; the better stray


def test_bad_input_ray_train_holds_is_the_one_line_the_cli_prints():
    """Ray Train holds its workers' errors by rank, and its controller's, not as a cause: a
    UsageError raised there must still be the CLI's one line (exit 2), not a traceback
    (exit 1). Ray Train's own error types, as `fit` raises them (a run: ~8 s more)."""
    from ray.train import ControllerError, WorkerGroupError

    from deepfake_ray import cli
    from deepfake_ray.errors import UsageError

    fix = "data.resolution=48 is not supported: use 32, 64 or 128"
    in_worker = WorkerGroupError("Training failed due to worker errors", {1: UsageError(fix)})
    assert cli.usage_line(in_worker) == fix
    assert cli.usage_line(ControllerError(UsageError(fix))) == fix
    assert cli.usage_line(WorkerGroupError("Training failed", {0: RuntimeError("a bug")})) is None


def test_a_full_disk_or_quota_is_one_line_naming_the_file_where_it_is_known():
    """As Python raises it (with the file), as a worker's error reaches the driver inside Ray
    Train's (text only), and a quota: the CLI's one line. Other OS errors are not it."""
    import errno

    from ray.train import WorkerGroupError

    from deepfake_ray import cli

    fix = (": free space on the disk it writes to (and on the temp dir's, where Ray and each training "
           "checkpoint write first; Ray's old sessions in /tmp/ray may go), then run the same command again")
    assert cli.usage_line(OSError(errno.ENOSPC, "No space left on device", "/runs/w/gan/history.json")) \
        .startswith("no space left on device writing /runs/w/gan/history.json" + fix)
    in_worker = WorkerGroupError("Training failed", {0: RuntimeError("OSError: [Errno 28] No space left on device")})
    assert cli.usage_line(in_worker).startswith("no space left on device" + fix)
    assert cli.usage_line(OSError(errno.EDQUOT, "Disk quota exceeded")).startswith("disk quota exceeded" + fix)
    assert cli.usage_line(OSError(errno.EIO, "Input/output error", "/runs/w/gan/history.json")) is None
    assert cli.usage_line(OSError(errno.EACCES, "Permission denied", "/runs/w/gan")).startswith(
        "Permission denied: /runs/w/gan: give this user read and write permission there")


def test_workers_out_of_memory_are_one_line_naming_the_batch_setting_to_lower():
    """torch's error on a GPU, and Ray's as its memory monitor kills a worker (its text as
    Ray 2.60 gave it here, an actor killed under RAY_memory_usage_threshold=0.02), each held
    by Ray Train's errors: the command's batch setting to lower, exit 2, not a traceback."""
    import torch
    from ray.exceptions import OutOfMemoryError
    from ray.train import ControllerError, WorkerGroupError

    from deepfake_ray import cli

    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                 "capacity of 22.05 GiB of which 1.31 GiB is free.")
    node = OutOfMemoryError(
        "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
        "192.0.2.2, ID: 82422b43) was 1.12GB used / 23.59GB limit (0.047392)\nOOM kill reason: Memory "
        "usage 1200209920B exceeded threshold of 506499072B (2.0% of 25324953600B limit)")
    # a training's batch size is a setting its unfinished run resumes with only: lowered, it starts over
    assert cli.out_of_memory_line("train-detector", WorkerGroupError("Training failed", {1: gpu})) == (
        "a worker ran out of GPU memory: lower detector.batch_size and start the stage over (--force --set "
        "detector.batch_size=N), or run the same command again on machines with more memory: a training "
        "resumes from its last checkpoint")
    assert cli.out_of_memory_line("train-gan", WorkerGroupError("Training failed", {0: node})).startswith(
        "Ray stopped a worker for want of memory on its node: lower gan.batch_size and start the stage over "
        "(--force --set gan.batch_size=N)")
    assert cli.out_of_memory_line("score", ControllerError(gpu)) == (
        "a worker ran out of GPU memory: lower serve.score_batch_size (--set serve.score_batch_size=N), or "
        "run it on machines with more memory; then run the same command again")
    assert "(gan.batch_size, gan.generate_batch_size, detector.batch_size, serve.score_batch_size)" in \
        cli.out_of_memory_line("pipeline", node)
    # the pipeline names its failed stage: its setting, and that stage started over alone (--force on
    # the pipeline would redo every stage; a plain rerun with a lower batch refuses the unfinished run)
    failed = WorkerGroupError("Training failed", {1: gpu})
    failed.pipeline_stage = "train-detector"
    assert cli.out_of_memory_line("pipeline", failed) == (
        "a worker ran out of GPU memory: lower detector.batch_size and start that stage over alone "
        "(deepfake-ray train-detector --config WORKDIR/config.yaml --workdir WORKDIR --force --set "
        "detector.batch_size=N), then the pipeline with --set detector.batch_size=N and without --force, or run "
        "the same command "
        "again on machines with more memory: a training resumes from its last checkpoint")
    failed = ControllerError(gpu)
    failed.pipeline_stage = "evaluate"
    assert cli.out_of_memory_line("pipeline", failed).startswith(
        "a worker ran out of GPU memory: lower serve.score_batch_size (--set serve.score_batch_size=N)")
    # a worker that died for another reason, naming the kernel's OOM killer among possible causes
    died = RuntimeError("The actor died unexpectedly. Some common causes include: (1) the process was "
                        "killed by the OOM killer due to high memory usage, (2) ray stop --force was called")
    assert cli.out_of_memory_line("train-gan", WorkerGroupError("Training failed", {0: died})) is None


def test_a_checkpoint_that_cannot_be_read_now_is_not_called_damaged(tmp_path, monkeypatch):
    """A throttled or cut-off S3 read while checking a run's checkpoints must surface as
    what it is: called "none intact: --force starts over", it would have a user delete
    the run's training. Only a missing or mismatched state is damage."""
    from deepfake_ray import checkpoint, s3, storage, training
    from deepfake_ray.errors import UsageError

    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "epoch_0001"))
    checkpoint.write_state(os.path.join(run, "epoch_0001"), {"epoch": 1})
    training.check_resumable(run)  # intact: no complaint

    def throttled(uri, algorithm):
        raise s3.StoreError(uri, f"{uri}: SlowDown: please reduce your request rate")

    with monkeypatch.context() as store:
        store.setattr(storage, "file_digest", throttled)
        with pytest.raises(s3.StoreError, match="SlowDown"):
            training.check_resumable(run)
    with open(os.path.join(run, "epoch_0001", "state.pt"), "r+b") as f:
        f.write(b"cut short")  # damaged: refused, with the way to start over
    with pytest.raises(UsageError, match="none of the 1 checkpoints .* is intact"):
        training.check_resumable(run)


def test_a_notebooks_objects_are_not_exempted_from_garbage_collection(monkeypatch):
    """The first command in a notebook froze everything alive then (the user's frames,
    models, DataFrames) out of the collector's reach: garbage in a cycle among them was
    never freed. Processes of ours (a driver run as a command, workers, replicas) still are."""
    import gc

    before = gc.get_freeze_count()
    held = [[i] for i in range(1000)]  # new objects, tracked
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    runtime.freeze_startup_objects.__wrapped__()
    assert gc.get_freeze_count() == before
    monkeypatch.delattr(sys, "ps1")
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    runtime.freeze_startup_objects.__wrapped__()
    assert gc.get_freeze_count() >= before + len(held)


def test_haproxys_folder_is_made_for_its_user_alone_or_refused(tmp_path, monkeypatch):
    """Once HAProxy ran, its folder's name was in `ps`: a second service in the process
    must not take one another user made meanwhile."""
    folder = tmp_path / "haproxy-0123456789"
    monkeypatch.setattr(runtime, "_worker_env", {"RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock")})
    runtime.make_haproxy_folder()
    assert os.stat(folder).st_mode & 0o777 == 0o700
    runtime.make_haproxy_folder()  # made already, by this user, for this user: taken
    os.chmod(folder, 0o755)  # as another user's would be: open to all
    with pytest.raises(UsageError, match="is not a folder of this user's alone"):
        runtime.make_haproxy_folder()
    runtime.remove_haproxy_folder()
    assert not folder.exists()
