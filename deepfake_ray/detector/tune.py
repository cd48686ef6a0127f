"""`deepfake-ray tune`: a Ray Tune learning-rate sweep over the detector fine-tune.

Each trial is a Tune function that runs the same Ray Train fine-tune as
train-detector (Train V2: it builds the TorchTrainer with TuneReportCallback), at a
learning rate drawn log-uniformly from the run's seed; ASHA stops weak trials at its
rungs. An interrupted sweep resumes with Tuner.restore, and each unfinished trial's Train
run from its checkpoint.

    WORKDIR/tune/                      the Tune experiment (restorable)
    WORKDIR/tune/trials/ID/            each trial's Train run (its checkpoints deleted once
                                       the sweep is published), best/ and history.json
    WORKDIR/tune/results.csv, lr.png   learning rate vs validation ROC-AUC
    WORKDIR/detector/model/            the best trial's best epoch, as train-detector exports
"""
from __future__ import annotations

import contextlib
import io
import math
import signal
import threading
import time

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from deepfake_ray import checkpoint, config, lineage, progress, runtime, storage, training
from deepfake_ray.config import Config
from deepfake_ray.detector import data, metrics, train
from deepfake_ray.errors import UsageError

# A trial only drives its Train run: the workers hold the real resources. On the in-process
# Ray it takes no CPU (its tenth of one left the data tasks none where the workers and one
# task just fit, and the sweep waited forever). On a cluster a tenth of a CPU keeps it off
# the head, whose memory would not hold 8 trials' processes (each with its Train run's
# controller and data coordinators beside it, ~0.9 GB a trial); on a spot CPU node a
# reclaim ends the trials on it, so each may be tried again a few times (from its run's
# checkpoints).
IN_PROCESS_TRIAL = {"CPU": 0, "node:__internal_head__": 0.001}  # the only node: the head
CLUSTER_TRIAL = {"CPU": 0.1}
TRIAL_RETRIES = 3
# val ROC-AUC, but -1 for a diverged epoch: its NaN never falls below ASHA's cutoff, so a
# trial at a rate too high would train every epoch
METRIC, MODE = "val_score", "max"


def settings(cfg: Config) -> dict:
    """The detector's, less the learning rate it sweeps and the epochs its trials do not
    train (tune.epochs instead), and the sweep's own."""
    t = config.to_dict(cfg)["tune"]
    return {**train.settings(cfg, leave_out=("lr", "epochs")),
            **{f"tune.{k}": v for k, v in t.items() if k not in ("enabled", "max_concurrent_trials")}}


STAGE = lineage.Stage("tune", "tune", ("data", "fakes"), settings,
                      lambda d: f"best lr {d.get('lr', float('nan')):.2e}")


def tune_dir(workdir: str) -> str:
    return storage.join(workdir, "tune")


def run(cfg: Config, force: bool = False, **_) -> dict:
    out = tune_dir(cfg.workdir)
    check_settings(cfg)  # before plan: with --force, a typo must not unmark a complete stage
    plan = lineage.plan(cfg, STAGE, force)
    if plan.done:
        return plan.done
    selection = data.select(cfg, splits=("train", "val"))
    pretrained = train.resolve_pretrained(cfg)
    training.check_fits(cfg)  # one trial at least
    if plan.redo:
        lineage.clear(out)
    lineage.start(cfg, STAGE, plan)
    started = time.time()
    finished = storage.exists(storage.join(out, "results.csv"))  # only its best to publish
    # decoded once, shared by every trial (minutes at Celeb 100k's size: not to publish)
    if not finished:
        print(f"tune: reading the images once for every trial ({train.describe(selection)})", flush=True)
    views = {} if finished else data.training_views(cfg, selection, "tune")
    tuner = make_tuner(cfg, selection, pretrained, views, finished, train.weights_sha256(pretrained))
    grid = fit_to_the_end(tuner)
    rows = collect(cfg, grid)
    best = rows.iloc[0]
    # the detector is recorded as what its model was made with: the best rate, the trials' epochs
    made = {**plan.made, "settings": {**plan.made["settings"], "detector.lr": float(best["lr"]),
                                      "detector.epochs": cfg.tune.epochs}}
    # the detector in use stays until its successor is chosen: a sweep cut short (hours in)
    # leaves it in place, and what another run left in detector/ goes only now
    lineage.unmark(cfg, train.STAGE)
    set_by_hand = train.threshold_set_by_hand(train.model_dir(cfg.workdir))  # said once it is replaced
    lineage.clear(train.stage_dir(cfg.workdir), keep=("pretrained",))
    summary = train.publish(cfg, trial_dir(cfg.workdir, best["trial_id"]), time.time() - started,
                            made, extra={"tuned": True, "trials": int(len(rows)), "epochs": cfg.tune.epochs},
                            set_by_hand=set_by_hand)
    result = {"lr": float(best["lr"]), "trial_id": best["trial_id"], "val_auc": float(best["val_auc"]),
              "trials": int(len(rows)), "model": summary["model"]}
    result = lineage.complete(cfg, STAGE, result, plan.made)
    with contextlib.suppress(OSError):  # tidying: the sweep and its model are done
        if dropped := drop_trial_checkpoints(cfg.workdir):
            print(f"tune: deleted the trials' {dropped} checkpoint folders (each trial's best/ and "
                  "history.json stay): a tuned detector is never trained further")
    print(rows.to_string(index=False))
    print(f"tune: best lr {best['lr']:.2e} (trial {best['trial_id']}, val ROC-AUC "
          f"{progress.figure(best['val_auc'])}) -> {summary['model']}")
    return result


def check_settings(cfg: Config) -> None:
    """What config.check_limits cannot check alone (run before Ray starts)."""
    train.check_settings(cfg, "tune.epochs")
    t = cfg.tune
    if not 0 < t.lr_min < t.lr_max:
        raise UsageError(f"tune.lr_min ({t.lr_min:g}) and tune.lr_max ({t.lr_max:g}) must satisfy "
                         "0 < lr_min < lr_max, e.g. --set tune.lr_min=1e-5 --set tune.lr_max=1e-3")
    if t.grace_period > t.epochs:
        raise UsageError(f"tune.grace_period ({t.grace_period}) must not exceed tune.epochs "
                         f"({t.epochs}): a trial is stopped early only after grace_period epochs")


def fit_to_the_end(tuner: tune.Tuner) -> tune.ResultGrid:
    """tuner.fit(), SIGUSR1 left to the command. Tune 2.60 always installs a SIGUSR1 handler
    (Slurm's `--signal=USR1` before a time limit, `kill -USR1`) that ends the sweep early
    and returns as if it had finished, its half-trained trials marked done: a stop here, as
    SIGTERM is (a rerun resumes). It is put back as soon as Tune has installed its own."""
    import ray.tune.tune as tune_run

    setup = tune_run._setup_signal_catching

    def without_sigusr1():
        previous = signal.getsignal(signal.SIGUSR1)
        event = setup()
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, previous)
        return event

    tune_run._setup_signal_catching = without_sigusr1
    # Tune's own Ctrl-C handler ends the sweep early and returns as if it had finished (its
    # half-trained trials were published, the sweep marked complete), and it stays installed
    # after a sweep, swallowing a Ctrl-C in the pipeline's next stage. Without it Ctrl-C is an
    # interrupt (exit 130); a rerun resumes from the sweep's state, saved as it goes. Only for
    # this fit: a notebook's own Tuner.fit() later keeps Tune's handler
    try:
        with runtime.environment({"TUNE_DISABLE_SIGINT_HANDLER": "1"}):
            return tuner.fit()
    finally:
        tune_run._setup_signal_catching = setup


def trial_dir(workdir: str, trial_id: str) -> str:
    return storage.join(tune_dir(workdir), "trials", trial_id)


def concurrency(cfg: Config) -> int:
    """Trials at once: tune.max_concurrent_trials (else all) on a cluster, where pending ones
    make its autoscaler add nodes; on the in-process Ray no more than fit."""
    t, r = cfg.tune, cfg.resources
    wanted = min(t.max_concurrent_trials or t.samples, t.samples)
    if not runtime.in_process():
        return wanted
    # each trial: its workers and a Ray Data task beside them (the trial takes no CPU
    # here); trials holding GPUs but too many CPUs would leave their data tasks none, and
    # the sweep would wait forever with no error
    available = ray.cluster_resources()
    fits = available.get("CPU", 1) // (r.workers * r.cpus_per_worker + r.data_cpus)
    if runtime.use_gpus(r.use_gpu):
        fits = min(fits, available.get("GPU", 0) // max(r.workers, 1))
    fits = int(max(1, fits))  # check_fits: one fits
    if wanted > fits and t.max_concurrent_trials:
        print(f"tune: tune.max_concurrent_trials={t.max_concurrent_trials}, but only {fits} trial(s) "
              f"fit this machine at once (each: {progress.count(r.workers, 'worker')} x {r.cpus_per_worker:g} CPUs "
              f"+ {r.data_cpus:g} for its data): running {fits} at a time", flush=True)
    return min(wanted, fits)


def trial(params: dict, cfg_dict: dict, selection: data.Selection, pretrained: str,
          views: dict, pretrained_sha256: str | None = None) -> None:
    """One Tune trial: the train-detector fine-tune at params["lr"], reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config.from_dict(cfg_dict)
    trial_id = tune.get_context().get_trial_id()
    out = trial_dir(cfg.workdir, trial_id)
    train.fine_tune(cfg, selection, pretrained, out, lr=params["lr"],
                    callbacks=[TuneReportCallback()], views=views,
                    label=f"tune trial {trial_id} (lr {params['lr']:.2e})", pretrained_sha256=pretrained_sha256)


class SweepProgress(tune.Callback):
    """A line per trial epoch, and per trial ended, with the best so far, in place of Tune's
    own table: every 30 s, ~15 lines, ~1,900 an hour of a sweep in `ray job logs`, and
    without the validation ROC-AUC the sweep is judged on."""

    def __init__(self, epochs: int, folder: str):
        self.epochs, self.folder, self.best = epochs, folder, None

    def get_state(self) -> dict:  # saved with the sweep: a resumed one knows its best so far
        return {"best": self.best}

    def set_state(self, state: dict) -> None:
        self.best = state.get("best")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        auc = result.get("val_auc", float("nan"))
        if auc == auc and (self.best is None or auc > self.best[0]):
            self.best = (auc, trial.config["lr"])
        best = f"; best so far {self.best[0]:.4f} (lr {self.best[1]:.2e})" if self.best else ""
        print(f"tune: trial {trial.trial_id} (lr {trial.config['lr']:.2e}) epoch "
              f"{result.get('epochs_done', '?')}/{self.epochs}  val ROC-AUC {auc:.4f}{best}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = last.get("epochs_done", self.epochs)
        how = ("finished" if done >= self.epochs else f"diverged at epoch {done} and stopped"
               if metrics.diverged(last) else f"stopped early by ASHA after epoch {done}")
        # Tune marks it TERMINATED only after its callbacks
        ended = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
        print(f"tune: trial {trial.trial_id} (lr {trial.config['lr']:.2e}) {how}; {ended} of "
              f"{len(trials)} trials ended", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"tune: trial {trial.trial_id} (lr {trial.config['lr']:.2e}) failed after its retries "
              f"(its error in {storage.join(self.folder, trial.trial_id)})", flush=True)


def rates(cfg: Config) -> list[float]:
    """The sweep's learning rates: tune.samples drawn log-uniformly from [tune.lr_min,
    tune.lr_max] with the run's seed, so that the same settings sweep the same rates, and
    a trial Tune makes again on a resume (one it had not yet saved) gets its rate again,
    not another that would then resume the first one's checkpoint."""
    t = cfg.tune
    drawn = np.random.default_rng(cfg.seed).uniform(math.log(t.lr_min), math.log(t.lr_max), t.samples)
    return [math.exp(x) for x in drawn]


def rates_text(cfg: Config) -> str:
    return ", ".join(f"{lr:.3g}" for lr in rates(cfg))


def make_tuner(cfg: Config, selection: data.Selection, pretrained: str, views: dict,
               finished: bool = False, pretrained_sha256: str | None = None) -> tune.Tuner:
    """A new sweep, or the interrupted (or `finished`) one under WORKDIR/tune restored."""
    fs, root = storage.resolve(cfg.workdir)
    as_dict = config.to_dict(cfg)
    # GPUs as granted here: a trial's process cannot tell it runs on the in-process Ray
    trial_cfg = config.from_dict({**as_dict, "detector": {**as_dict["detector"], "epochs": cfg.tune.epochs},
                                  "resources": {**as_dict["resources"],
                                                "use_gpu": runtime.use_gpus(cfg.resources.use_gpu)}})
    trainable = tune.with_resources(
        tune.with_parameters(trial, cfg_dict=config.to_dict(trial_cfg), selection=selection,
                             pretrained=pretrained, views=views, pretrained_sha256=pretrained_sha256),
        IN_PROCESS_TRIAL if runtime.in_process() else CLUSTER_TRIAL)
    path = f"{root}/tune"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        # results.csv is written once the sweep ended: its failed trials stay failed (they
        # had their retries), not trained again for hours under "publishing"
        if finished:
            print(f"tune: the sweep in {tune_dir(cfg.workdir)} has finished: publishing its best trial "
                  "as detector/model (--force sweeps anew)")
        else:
            # Tune restores the sweep's search state, its trial limit with it
            print(f"tune: resuming the interrupted sweep in {tune_dir(cfg.workdir)}, as many trials "
                  "at once as when it began (tune.max_concurrent_trials counts for a new sweep: --force)")
        return tune.Tuner.restore(path, trainable, resume_unfinished=not finished,
                                  resume_errored=not finished, storage_filesystem=fs)
    t, at_once = cfg.tune, concurrency(cfg)
    print(f"tune: {t.samples} trials x {t.epochs} epochs, lr {rates_text(cfg)}, "
          f"{at_once} at a time; {train.describe(selection)}")
    return tune.Tuner(
        trainable,
        param_space={"lr": tune.grid_search(rates(cfg))},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=1, max_concurrent_trials=at_once,
            # rungs by epochs trained: Tune's own count of results starts over when it
            # retries a trial, which resumes at a later epoch
            scheduler=ASHAScheduler(time_attr="epochs_done", max_t=t.epochs, grace_period=t.grace_period),
            trial_dirname_creator=lambda tr: tr.trial_id),
        run_config=tune.RunConfig(name="tune", storage_path=root, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                  verbose=0, callbacks=[SweepProgress(t.epochs, tune_dir(cfg.workdir))]),
    )


def drop_trial_checkpoints(workdir: str) -> int:
    """The checkpoint folders of every trial's Train run, deleted once the sweep has
    published its model: up to detector.keep_checkpoints + 1 a trial, ~0.62 GB each with
    the study's net (celeb100k's 8 trials: 10-15 GB), which nothing reads again. A rerun
    publishes from the trials' best/, and a tuned detector cannot be trained further."""
    fs, root = storage.resolve(storage.join(tune_dir(workdir), "trials"))
    dropped = 0
    trials = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for trial in (t for t in trials if t.type == pafs.FileType.Directory):
        for _, folder in training.epoch_folders(fs, f"{trial.path}/run"):
            fs.delete_dir(folder)
            dropped += 1
    return dropped


COLUMNS = ["trial_id", "lr", "status", "epochs_run", "stopped_early", "diverged_at", "best_epoch", "val_auc",
           "val_loss", "val_acc", "threshold", "error"]


def collect(cfg: Config, grid) -> pd.DataFrame:
    """One row per trial from its exported best epoch, best first; results.csv and lr.png."""
    from deepfake_ray.detector import figures  # matplotlib: the driver's, not every trial's

    rows = [trial_row(cfg, result) for result in grid]
    # counts as whole numbers, also in a column with gaps (a failed trial's): "5", not "5.0"
    frame = pd.DataFrame(rows, columns=COLUMNS).astype(
        {"epochs_run": "Int64", "best_epoch": "Int64", "diverged_at": "Int64", "stopped_early": "boolean"})
    ok = frame[frame["val_auc"].notna()]
    if ok.empty and (frame["status"] == "diverged").any():
        raise UsageError(f"no tune trial gave finite scores at learning rates {frame['lr'].min():.2e}.."
                         f"{frame['lr'].max():.2e}: they diverged; sweep lower ones, e.g. `deepfake-ray tune "
                         f"--force{lower_rates(cfg)}`")
    if ok.empty:
        raise RuntimeError(f"every tune trial failed; first error: {frame['error'].iloc[0]}")
    # a trial that ended in an error wins only when none finished: its model stopped short
    frame["failed"] = frame["status"] != "ok"
    frame = frame.sort_values(["failed", "val_auc", "val_loss"], ascending=[True, False, True],
                              na_position="last")
    frame = frame.drop(columns="failed").reset_index(drop=True)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    storage.write_text(storage.join(tune_dir(cfg.workdir), "results.csv"), buf.getvalue())
    storage.write_bytes(storage.join(tune_dir(cfg.workdir), "lr.png"),
                        figures.lr_sweep(ok["lr"], ok["val_auc"], float(frame.iloc[0]["lr"]),
                                         (cfg.tune.lr_min, cfg.tune.lr_max)))
    return frame


def lower_rates(cfg: Config) -> str:
    """--set flags for a sweep a tenth as high: lr_min too where the new lr_max would reach it."""
    t = cfg.tune
    low = f" --set tune.lr_min={t.lr_min / 10:g}" if t.lr_min >= t.lr_max / 10 else ""
    return f"{low} --set tune.lr_max={t.lr_max / 10:g}"


def trial_row(cfg: Config, result) -> dict:
    trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
    error = str(result.error).splitlines()[0][:200] if result.error else ""
    out = trial_dir(cfg.workdir, trial_id)
    try:
        meta = checkpoint.load_meta(storage.join(out, "best"))
    except UsageError:  # the trial failed before its first epoch ended
        return {"trial_id": trial_id, "lr": result.config.get("lr"), "status": "error",
                "val_auc": math.nan, "error": error or "no epoch finished"}
    history = storage.read_json(storage.join(out, "history.json"))
    m = meta["metrics"]
    diverged = not storage.finite(m["val_auc"])  # NaN (null): even its best epoch's scores were not
    status = "error" if error else "diverged" if diverged else "ok"
    # the epoch (from 1) whose loss was not a number, where the trial stopped: its best
    # epoch came before it
    last = history[-1] if history else {}
    diverged_at = last["epoch"] + 1 if metrics.diverged(last) else None
    return {"trial_id": trial_id, "lr": meta["lr"], "status": status, "epochs_run": len(history),
            "stopped_early": not error and len(history) < cfg.tune.epochs and diverged_at is None,  # by ASHA
            "diverged_at": diverged_at,
            "best_epoch": meta["epoch"] + 1,  # 1-based, as train-detector prints it
            "val_auc": m["val_auc"], "val_loss": m["val_loss"],
            "val_acc": m["val_acc"], "threshold": meta["threshold"], "error": error}
