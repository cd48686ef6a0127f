"""What the DCGAN and the detector share about Ray Train: building the trainer,
checkpointing every epoch, resuming, and test-only fault injection.

Resume contract: the same `RunConfig(storage_path, name)` makes Ray Train hand the
latest registered checkpoint to `ray.train.get_checkpoint()`. We resume from the run's
newest intact checkpoint folder, that one or a newer one Ray never registered (the
workers go on for an epoch or two after a stop), verified (`checkpoint.read_state`),
so a half-written checkpoint is never resumed from.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable

import pyarrow.fs as pafs
import ray.data
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from deepfake_ray import checkpoint, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.errors import UsageError, find_error

# batches a training's local shuffle buffer mixes (gan.loop, detector.loop, their benchmarks)
SHUFFLE_BATCHES = 16
# epoch_NNNN, or epoch_NNNN_<tag> when an epoch is trained again after a damaged
# checkpoint of that epoch was skipped (Ray must never register one folder twice).
EPOCH_DIR = re.compile(r"^epoch_(\d+)(?:_[0-9a-f]+)?$")
_skipped_names: set[str] = set()  # damaged checkpoints this worker passed over


def scaling(cfg: Config) -> ScalingConfig:
    return ScalingConfig(num_workers=cfg.resources.workers, use_gpu=runtime.use_gpus(cfg.resources.use_gpu),
                         resources_per_worker={"CPU": cfg.resources.cpus_per_worker})


def check_fits(cfg: Config) -> None:
    """UsageError where the in-process Ray cannot hold a run's workers: nothing can add a
    node there, and Ray Train would retry their start every minute without end; workers
    holding every CPU would also leave none for the Ray Data task that feeds them."""
    if not runtime.in_process():
        return
    r, have = cfg.resources, ray.cluster_resources()
    gpus, cpus = int(have.get("GPU", 0)), have.get("CPU", 0)
    if runtime.use_gpus(r.use_gpu) and r.workers > gpus:
        raise UsageError(f"resources.workers={r.workers} asks for {r.workers} GPUs and this machine has "
                         f"{gpus}: pass --set resources.workers={gpus}")
    if (wanted := r.workers * r.cpus_per_worker + r.data_cpus) > cpus:
        fit_cpus = math.floor((cpus - r.data_cpus) / r.workers * 1e4) / 1e4  # down: rounded up, it fits not
        raise UsageError(f"resources.workers={r.workers} x resources.cpus_per_worker={r.cpus_per_worker:g} "
                         f"+ resources.data_cpus={r.data_cpus:g} (a Ray Data task beside them) is {wanted:g} "
                         f"CPUs and the in-process Ray has {cpus:g}: lower them"
                         + (f", e.g. --set resources.cpus_per_worker={fit_cpus:g}" if fit_cpus > 0 else ""))


def fit(train_fn: Callable[[dict], None], loop_config: dict, cfg: Config, storage_uri: str,
        name: str, *, datasets: Callable[[], dict] | None = None, keep: int = 2, max_failures: int = 2,
        callbacks: list | None = None, keep_best_by: str | None = None):
    """Run (or resume) the Ray Train run `name` stored under `storage_uri`. It keeps the
    `keep` newest checkpoints, or with `keep_best_by` (a reported metric, higher is better)
    the `keep` best by it and the newest. `datasets` makes Ray Train's datasets once the run
    is found resumable: they are read up front (materialized; decoded too where they fit
    the object store), minutes at Celeb 100k's size, which a refused resume should not cost."""
    first = check_resumable(storage.join(storage_uri, name))
    fs, path = storage.resolve(storage_uri)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling(cfg),
        datasets=resumable(datasets() if datasets else {}, storage.join(storage_uri, name), cfg.deterministic, first),
        dataset_config=data_config(cfg),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=keep_best_by,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
    )
    on_main_thread = threading.current_thread() is threading.main_thread()  # not in a Tune trial
    before = signal.getsignal(signal.SIGINT) if on_main_thread else None
    try:
        result = trainer.fit()
        with contextlib.suppress(OSError):  # tidying: the training it follows is done
            prune_unlisted(storage.join(storage_uri, name), kept_checkpoints(result), keep, keep_best_by)
        return result
    except SystemExit:
        # Ray Train's own Ctrl-C handler aborts the run (its workers stopped, its checkpoints
        # kept) and then calls sys.exit(0): the command would end "successfully" in silence
        raise KeyboardInterrupt from None
    except Exception as e:
        if why := unreadable_run_record(e):
            run = storage.join(storage_uri, name)
            raise UsageError(f"Ray cannot resume the run in {run} from its record ({why}): "
                             f"{record_fix(run)}") from None
        raise
    finally:
        if on_main_thread:  # its handler outlives the run: a later Ctrl-C would abort a finished one
            signal.signal(signal.SIGINT, before)


def resumable(built: dict, run: str, deterministic: bool, first: int | None = None) -> dict:
    """Ray Train's datasets. With deterministic=true, each is handed over as a call Ray
    Train makes as it starts the run's workers (again after a lost one), which numbers the
    dataset's runs from the epoch they resume at: Ray Data draws each run's block order and
    augmentations from the seed and that number, counted from the dataset's making, so a
    resumed epoch would draw what the run's first epoch drew. `first`: the first start's
    epoch, where check_resumable has just found it (a checkpoint is not read twice)."""
    if not deterministic:
        return built
    return {name: functools.partial(from_first_epoch, ds, ds.context._execution_idx, run,
                                    [] if first is None else [first]) for name, ds in built.items()}


def from_first_epoch(ds: ray.data.Dataset, made_at: int, run: str, found: list[int]) -> ray.data.Dataset:
    """`ds` set to draw its next run as its run `first_epoch(run)` after its making
    (`made_at`, its count then: Ray Data 2.60's, private, which RandomSeedConfig and
    expressions.random read); `found`, that epoch for the next start only, when known."""
    ds.context._execution_idx = made_at + (found.pop() if found else first_epoch(run))
    return ds


def first_epoch(run: str) -> int:
    """The epoch the run's workers start at: the one after its newest intact checkpoint,
    as restore_state chooses it, or 0."""
    fs, path = storage.resolve(run)
    return after(newest_intact(run, epoch_folders(fs, path)))


def after(epoch: int | None) -> int:
    return 0 if epoch is None else epoch + 1


def data_config(cfg: Config) -> DataConfig | None:
    """Ray Train's ingest options (None: its default), in order with deterministic=true: a
    worker's blocks, and with several which worker gets which, are then the same on a rerun.
    Ray Train gives the datasets its own options, not those they were made with."""
    if not cfg.deterministic:
        return None
    # this process's options, as Ray Train's default takes them (a copy: its own
    # default_ingest_options() sets the deprecated exclude_resources, and Ray warns)
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)


def prune_unlisted(run: str, kept: list, keep: int, keep_best_by: str | None = None) -> None:
    """After a finished run, its checkpoint folders Ray never registered (a stop between
    their upload and their registration, resumed from since) older than the newest it
    keeps (`kept`, its (checkpoint, metrics) pairs): Ray prunes only what it registered,
    so each stop left one or two for good (the detector's: ~0.62 GB each). Ray's own are
    left to it (one deleted here would fail its next resume). In a run kept by a score,
    those Ray would have kept had it registered them stay: one may be the best epoch's,
    which the detector puts best/ back from."""
    names = {os.path.basename(c.path.rstrip("/")) for c, _ in kept}
    fs, path = storage.resolve(run)
    folders = epoch_folders(fs, path)
    newest = max((e for e, p in folders if os.path.basename(p) in names), default=-1)
    unlisted = [p for e, p in folders if e < newest and os.path.basename(p) not in names]
    if keep_best_by:
        unlisted = outranked(run, unlisted, kept, keep, keep_best_by)
    for p in unlisted:
        fs.delete_dir(p)


def kept_checkpoints(result) -> list:
    """(checkpoint, metrics) of those Ray keeps: its best (by score, or the newest) and,
    beside them in a run kept by a score, its newest."""
    kept = list(result.best_checkpoints or [])
    if result.checkpoint and all(c.path != result.checkpoint.path for c, _ in kept):
        kept.append((result.checkpoint, result.metrics or {}))
    return kept


def outranked(run: str, unlisted: list[str], kept: list, keep: int, by: str) -> list[str]:
    """Of the `unlisted` folders, those cut short (no state.json) and those whose reported
    `by` ranks below the `keep` best of the run's (Ray's rule); one written before its
    score was kept in state.json cannot be ranked and stays."""
    found = {p: checkpoint.state_metrics(storage.join(run, os.path.basename(p))) for p in unlisted}
    scores = [m[by] for _, m in kept if by in m] + [m[by] for m in found.values() if m and by in m]
    bar = sorted(scores, reverse=True)[keep - 1] if len(scores) >= keep else -math.inf
    return [p for p, m in found.items() if m is None or (by in m and m[by] < bar)]


def check_resumable(run: str) -> int:
    """Before the workers start: a run with checkpoint folders, none of them intact, is
    refused here. Raised in the workers (restore_state, which still checks what Ray
    hands them), Ray Train would retry it max_failures times, or without end. Returns
    the epoch the workers start at (first_epoch)."""
    fs, path = storage.resolve(run)
    folders = epoch_folders(fs, path)
    newest = newest_intact(run, folders)
    if folders and newest is None:
        raise UsageError(no_intact_checkpoint(len(folders), run))
    record = fs.get_file_info(f"{path}/{RECORD}")
    if record.type == pafs.FileType.File and record.size == 0:
        # Ray opens it, then writes it whole: empty, the write never landed (the disk was
        # full, the process was killed), and it holds nothing the run's folders do not
        storage.delete_file(storage.join(run, RECORD))
        print(f"note: Ray's record of the run in {run} was empty (its last write was cut short): "
              "resuming from the run's newest intact checkpoint", flush=True)
    return after(newest)


def newest_intact(run: str, folders: list[tuple[int, str]]) -> int | None:
    """The epoch of the newest of the run's checkpoint `folders` (newest first) whose state
    matches its hash, as restore_state chooses it, or None."""
    return next((e for e, p in folders if checkpoint.state_intact(storage.join(run, os.path.basename(p)))), None)


RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def record_fix(run: str) -> str:
    """What to do about a record Ray cannot read: without it, the workers resume from the
    run's newest intact checkpoint folder (restore_state), when it has one."""
    fs, path = storage.resolve(run)
    if newest_intact(run, epoch_folders(fs, path)) is not None:
        return (f"delete {storage.join(run, RECORD)} to resume from the run's newest intact checkpoint, "
                "or --force to start the stage over")
    return "--force starts the stage over"


def no_intact_checkpoint(count: int, run: str) -> str:
    return (f"none of the {count} checkpoints of the run in {run} is intact: going on would "
            "start it over from its first epoch over what it made; --force starts the stage over")


UNREADABLE_RECORD = "CheckpointManagerInitializationError: "


def unreadable_run_record(e: BaseException) -> str | None:
    """Why Ray Train could not read its record of a run, from the error `fit` got: one
    that names checkpoints deleted since (by hand, by a bucket's expiry rule), or another
    Ray's. Its controller fails as it starts, with advice the CLI cannot follow (a new
    RunConfig name), and an actor's failed start keeps only the text of its error."""
    def match(f: BaseException) -> str | None:
        text = f"{type(f).__name__}: {f}"
        if UNREADABLE_RECORD not in text:
            return None
        return text.split(UNREADABLE_RECORD, 1)[1].split(" You are running")[0].splitlines()[0][:300]
    return find_error(e, match)


# --- inside a training worker ----------------------------------------------------

def setup_worker(cfg: Config) -> None:
    """torch threads = the CPUs this worker reserved (resources.cpus_per_worker; a rerun
    with other threads sums in another order), PyTorch's deterministic algorithms with
    deterministic=true, and Ray Train's line per report left to its log file."""
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    # CPU kernels repeat already; on a GPU this picks deterministic kernels (cuBLAS's
    # workspace is fixed before it starts) and warns of any op with no deterministic form
    # rather than stopping the run (neither network's training has one: the suite checks)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    quiet_report_lines()


def quiet_report_lines() -> None:
    """Ray Train 2.60 logs every worker's every report at INFO, the whole metrics dict on
    one line, under a logger named by its file's path: outside `ray.train`, so its
    LoggingConfig misses it. The rank-0 progress line already says what it would."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: its own lines, whatever they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def rank() -> int:
    return ray.train.get_context().get_world_rank()


def device() -> torch.device:
    return ray.train.torch.get_device()


def how_trained(device: torch.device, amp: torch.dtype | None) -> dict:
    """What an epoch's history records of how it was computed: the workers, rank 0's device
    and the precision (a resume on other GPUs, or none that compute in bfloat16, changes
    them, and an audit must see where)."""
    return {"workers": ray.train.get_context().get_world_size(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "precision": str(amp).removeprefix("torch.") if amp else "float32"}


def all_checkpoints() -> list[Checkpoint]:
    """The run's checkpoints, newest first: the one Ray Train restores, and every other
    epoch_NNNN folder of the run, whether Ray lists it or not (of one epoch, Ray's first).
    A folder newer than Ray's newest was written whole by a worker that went on after a
    stop, before its registration: resumed from, its epochs are not trained again; every
    one counts when Ray's record of the run was removed (Ray then started it over from
    epoch 1, over what it made)."""
    latest = ray.train.get_checkpoint()
    store = ray.train.get_context().get_storage()
    fs, run = store.storage_filesystem, store.experiment_fs_path
    name = os.path.basename(latest.path.rstrip("/")) if latest else None
    folders = [Checkpoint(path=p, filesystem=fs) for _, p in epoch_folders(fs, run)
               if os.path.basename(p.rstrip("/")) != name]
    return sorted(([latest] if latest else []) + folders, key=lambda c: epoch_rank(c.path), reverse=True)


def restore_state() -> dict | None:
    """The newest intact training state of this run, or None for a fresh start: a run
    with checkpoints, none of them intact, is refused, not started over from its first
    epoch over what it made. Each folder's state is checked against its hash, so an
    upload cut short is never taken."""
    checkpoints = all_checkpoints()
    latest = ray.train.get_checkpoint()
    registered_up_to = epoch_of(latest.path) if latest else None
    for ckpt in checkpoints:
        with ckpt.as_directory() as d:
            state = checkpoint.read_state(d)
        if state is not None:
            return state
        if registered_up_to is not None and epoch_rank(ckpt.path) <= registered_up_to:
            # may be registered; a newer one is not, and its epoch's new checkpoint goes over it
            _skipped_names.add(os.path.basename(ckpt.path.rstrip("/")))
        say(f"[deepfake-ray] checkpoint {ckpt.path} is incomplete or corrupt; trying an older one")
    if checkpoints:  # none intact, though check_resumable found one
        run = os.path.dirname(checkpoints[0].path.rstrip("/"))
        raise UsageError(no_intact_checkpoint(len(checkpoints), run))
    return None


def state_at_epoch(epoch: int) -> dict | None:
    """The intact training state this run checkpointed at `epoch`, or None."""
    for ckpt in all_checkpoints():
        if epoch_of(ckpt.path) == epoch:
            with ckpt.as_directory() as d:
                if (state := checkpoint.read_state(d)) is not None:
                    return state
    return None


def epoch_of(path: str) -> int | None:
    m = EPOCH_DIR.match(os.path.basename(path.rstrip("/")))
    return int(m.group(1)) if m else None


def epoch_rank(path: str) -> int:
    """epoch_of, -1 for a folder named otherwise (oldest)."""
    epoch = epoch_of(path)
    return -1 if epoch is None else epoch


def epoch_folders(fs: pafs.FileSystem, parent: str) -> list[tuple[int, str]]:
    """(epoch, path) of the checkpoint folders in `parent`, newest first."""
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    return sorted(((e, i.path) for i in infos
                   if i.type == pafs.FileType.Directory and (e := epoch_of(i.path)) is not None),
                  reverse=True)


LOCAL_CHECKPOINT_PREFIX = "deepfake-ray-checkpoint-"


def report_epoch(epoch: int, metrics: dict[str, Any], state: dict | None) -> None:
    """Every worker calls this once per epoch (it is a barrier); rank 0 saves `state`."""
    if state is None or rank() != 0:
        ray.train.report(metrics)
        return
    name = f"epoch_{epoch:04d}"
    if name in _skipped_names:  # that folder is registered already (and damaged)
        name = f"{name}_{uuid.uuid4().hex[:8]}"
    # a worker killed during the report (a lost node, a killed driver) leaves its copy,
    # a whole model with its optimizer, which the next run's report removes
    d = runtime.own_temp_dir(LOCAL_CHECKPOINT_PREFIX)
    try:
        checkpoint.write_state(d, state, metrics)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def inject_failure(stage_uri: str, epoch: int, fail_at_epoch: int) -> None:
    """TEST ONLY: the last worker exits hard once, mid-run, at `fail_at_epoch`."""
    ctx = ray.train.get_context()
    if epoch != fail_at_epoch or ctx.get_world_rank() != ctx.get_world_size() - 1:
        return
    marker = storage.join(stage_uri, f"_fault_injected_epoch_{epoch}")
    if storage.exists(marker):
        return
    wait_until_registered(epoch - 1)
    storage.write_text(marker, "a worker was killed here on purpose (fail_at_epoch)\n")
    say(f"[deepfake-ray] fault injection: worker {ctx.get_world_rank()} exits at epoch {epoch}")
    os._exit(1)


def wait_until_registered(epoch: int, timeout_s: float = 120.0) -> None:
    """Until the controller lists epoch `epoch`'s checkpoint in its run snapshot.

    A report reaches the controller asynchronously; a worker dying right after it can
    beat the registration, and the retry then starts from the checkpoint before. The
    test wants a restore from the last reported epoch, so the fault waits for it.
    (Reads Ray's snapshot file: test-only code, may need updating with Ray.)
    """
    if epoch < 0:
        return
    store = ray.train.get_context().get_storage()
    fs, path = store.storage_filesystem, store.checkpoint_manager_snapshot_path
    wanted = f'"epoch_{epoch:04d}'
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with fs.open_input_stream(path) as f:
                if wanted in f.read().decode():
                    return
        except (FileNotFoundError, OSError):
            pass
        time.sleep(0.2)


def say(line: str, warning: bool = False) -> None:
    """One line to the driver's console. Ray Train patches print() in workers to log
    AND echo, which shows every line twice; writing to stdout shows it once. A warning
    goes to stderr, as the driver's own warnings do."""
    stream = sys.stderr if warning else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def time_left(elapsed: float, epochs_done: int, epochs_left: int) -> str:
    """`epochs_left` epochs at this session's pace (`epochs_done` in `elapsed` seconds of
    wall time, checkpoints and exports included; a resumed run's earlier epochs may have
    run on other machines), as h:mm:ss."""
    if epochs_done <= 0 or epochs_left <= 0:
        return "0:00:00"
    left = round(elapsed / epochs_done * epochs_left)
    return f"{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"


def seed_worker(seed: int) -> None:
    """torch's generators (CPU and every GPU) seeded from the run's seed and this worker's
    rank, for what a worker draws before its first epoch (a model's initial weights)."""
    torch.manual_seed(seed * 1_000_003 + rank())


def epoch_seed(seed: int, epoch: int) -> int:
    """This worker's seed for `epoch`: ranks draw different numbers (the detector's flips,
    which from the one default seed every GPU starts from would mirror the same positions
    on each), and an epoch draws the same ones whether the run resumed at it or not."""
    return (seed * 1_000_003 + epoch * 1_009 + rank()) % (2 ** 63)


def seed_epoch(seed: int, epoch: int) -> None:
    """torch's generators (CPU and every GPU) seeded for `epoch`: no random state to keep
    in checkpoints, and every rank's draws go on after a resume as in a run never stopped."""
    torch.manual_seed(epoch_seed(seed, epoch))
