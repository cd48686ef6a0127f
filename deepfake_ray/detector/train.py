"""`deepfake-ray train-detector`: fine-tune Inception-ResNet-v2 on reals vs fakes with Ray Train.

    WORKDIR/detector/run/epoch_NNNN/   Ray Train checkpoints (resume on resubmission)
    WORKDIR/detector/best/             the best epoch so far (val ROC-AUC), model format
    WORKDIR/detector/history.json      per-epoch train/val loss, accuracy, ROC-AUC
    WORKDIR/detector/model/            the exported model (copied from best/ at the end)
    WORKDIR/detector/_COMPLETE.json    written last

Only the train and val splits are read here: the threshold and the best epoch are
chosen on validation; the test split is left for `deepfake-ray evaluate`.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import time

from safetensors.torch import save as st_save

from deepfake_ray import checkpoint, config, lineage, progress, runtime, storage, training
from deepfake_ray.config import Config
from deepfake_ray.data import datasets
from deepfake_ray.detector import data, metrics
from deepfake_ray.errors import UsageError, warn

MIN_INPUT = 75  # Inception-ResNet-v2's stem and reductions need at least 75 px


# detector values that do not change the model: checkpoint retention, retries, the test hook
OPERATIONAL = {"keep_checkpoints", "max_failures", "fail_at_epoch"}


def settings(cfg: Config, leave_out: tuple[str, ...] = ()) -> dict:
    values = config.to_dict(cfg)["detector"]
    return {"seed": cfg.seed, **{f"detector.{k}": v for k, v in values.items()
                                 if k not in OPERATIONAL and k not in leave_out}}


def made_by_tune(done: dict) -> tuple[str, str] | None:
    """A detector `tune` chose: its run lies with the sweep's trials."""
    if not done.get("tuned"):
        return None
    lr = f"{done.get('lr', 0):.2e}"
    return (f"the best trial of `deepfake-ray tune` (lr {lr}; the pipeline keeps it with --set "
            f"tune.enabled=true)", f"--force --set detector.lr={lr}")


STAGE = lineage.Stage("train-detector", "detector", ("data", "fakes"), settings,
                      lambda d: f"model {d.get('model_id')}", grows=("detector.epochs",),
                      made_elsewhere=made_by_tune, chosen_elsewhere=("detector.lr", "detector.epochs"))


def stage_dir(workdir: str) -> str:
    return storage.join(workdir, "detector")


def model_dir(workdir: str) -> str:
    return storage.join(stage_dir(workdir), "model")


def run(cfg: Config, force: bool = False, **_) -> dict:
    stage = stage_dir(cfg.workdir)
    check_settings(cfg)  # before plan: with --force, a typo must not unmark a complete stage
    plan = lineage.plan(cfg, STAGE, force)
    if plan.done:
        return plan.done
    selection = data.select(cfg, splits=("train", "val"))
    pretrained = resolve_pretrained(cfg)
    training.check_fits(cfg)
    from deepfake_ray.detector import tune  # (it imports this module)

    lineage.unmark(cfg, tune.STAGE)  # its product, the model in detector/, is being replaced
    if plan.redo:  # the model in use stays until publish replaces it (a service may load it)
        lineage.clear(stage, keep=("pretrained", "model"))
    lineage.start(cfg, STAGE, plan)
    started = time.time()
    workers, batch = cfg.resources.workers, cfg.detector.batch_size
    print(f"train-detector: {describe(selection)}; {progress.count(cfg.detector.epochs, 'epoch')}, "
          f"{progress.count(workers, 'worker')} x batch {batch} ({workers * batch} a step), "
          f"input {cfg.detector.input_size} px, pretrained={cfg.detector.pretrained}"
          f"{', deterministic' if cfg.deterministic else ''}")
    fine_tune(cfg, selection, pretrained, stage, pretrained_sha256=weights_sha256(pretrained))
    summary = publish(cfg, stage, time.time() - started, plan.made)
    return summary


def check_settings(cfg: Config, epochs_key: str = "detector.epochs") -> None:
    """What config.check_limits cannot check alone (run before Ray starts). `epochs_key`:
    the setting that counts the run's epochs (a sweep's trials run tune.epochs)."""
    import timm

    d = cfg.detector
    epochs = config.value_of(cfg, epochs_key)
    if d.pretrained == "none" and d.freeze_backbone_epochs >= epochs:
        raise UsageError(f"detector.freeze_backbone_epochs={d.freeze_backbone_epochs} freezes the backbone for "
                         f"all {epochs} epochs ({epochs_key}), and with detector.pretrained=none its weights are "
                         "random: only the head would learn; use fewer, or detector.pretrained=hub")
    datasets.require_share(cfg.data.splits, "val")
    if not timm.is_model(d.arch):
        raise UsageError(f"detector.arch={d.arch!r} is not a timm model: use inception_resnet_v2 "
                         f"(the study) or another name from timm.list_models()")
    if d.input_size < MIN_INPUT:
        raise UsageError(f"detector.input_size={d.input_size} is too small for {d.arch}: "
                         f"use {MIN_INPUT} or more (128 as the study)")
    check_hub_name(d)
    try:  # the weights' own config (create takes it), else the architecture's default one
        fixed = timm.models.get_pretrained_cfg(d.hub_name if d.hub_name.partition(".")[0] == d.arch else d.arch)
    except RuntimeError:  # a tag timm does not know, unused without pretrained=hub
        fixed = timm.models.get_pretrained_cfg(d.arch)
    if fixed and fixed.fixed_input_size and fixed.input_size[-1] != d.input_size:  # a ViT's position table
        raise UsageError(f"detector.arch={d.arch} takes {fixed.input_size[-1]} px inputs only, not "
                         f"detector.input_size={d.input_size}: set detector.input_size={fixed.input_size[-1]}")
    if d.optimizer not in ("adam", "adamw"):
        raise UsageError(f"detector.optimizer={d.optimizer!r}: choose adam or adamw")
    low, high = d.jpeg_aug_quality
    if not 1 <= low <= high <= 100:
        raise UsageError(f"detector.jpeg_aug_quality={list(d.jpeg_aug_quality)} must be two "
                         "qualities within 1..100, lowest first, e.g. [30, 100]")
    low, high = d.blur_aug_sigma
    if not 0 <= low <= high:
        raise UsageError(f"detector.blur_aug_sigma={list(d.blur_aug_sigma)} must be two sigmas "
                         ">= 0, lowest first, e.g. [0.0, 3.0]")


def check_hub_name(d) -> None:
    """With pretrained=hub, weights timm can name for this architecture: a mistyped tag
    failed as the stage began, after the stages before it (hours with Celeb 100k)."""
    import timm

    if d.pretrained != "hub":
        return
    arch, _, tag = d.hub_name.partition(".")
    tags = timm.list_pretrained(f"{d.arch}.*")
    if arch != d.arch or (tag and d.hub_name not in tags):
        raise UsageError(f"detector.hub_name={d.hub_name!r} names no weights of detector.arch={d.arch} "
                         f"that timm knows: use one of {', '.join(tags) or 'none (pass a weights file)'}")


def describe(selection: data.Selection) -> str:
    return "; ".join(f"{s}: {c['real']:,} real + {c['fake']:,} fake" for s, c in selection.counts.items())


def check_pretrained_file(cfg: Config) -> None:
    spec = cfg.detector.pretrained
    if spec in ("none", "", "hub"):
        return
    if not storage.exists(spec):
        raise UsageError(f"detector.pretrained={spec}: no such file; pass hub, none, or an "
                         "existing local or s3:// weights file (safetensors or state dict)")
    if storage.is_dir(spec):
        raise UsageError(f"detector.pretrained={spec} is a folder: pass a weights file (safetensors "
                         f"or state dict); of a model folder, {storage.join(spec, checkpoint.WEIGHTS)}")
    if not storage.is_s3(spec):  # read only once the detector stage starts, hours into a pipeline
        check_readable_file(spec)


def check_readable_file(spec: str) -> None:
    path = storage.normalize(spec)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang the read
            raise UsageError(f"detector.pretrained={spec} is not a regular file: pass a weights file")
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"detector.pretrained={spec}: cannot read it ({e.strerror}): give this user "
                         "read permission (ls -l shows the owner), or copy it somewhere readable") from None


def resolve_pretrained(cfg: Config) -> str:
    """What workers load: `none`, or a weights file every node can read.

    `hub` is fetched here, in the driver, once (failing fast with the fix when the hub
    is unreachable), and kept as WORKDIR/detector/pretrained/HUB_NAME.safetensors. On a
    cluster, a file on the driver's disk, which the workers on other machines cannot read,
    is copied there first (into S3, or a local work directory every node shares), as a
    Kaggle download is.
    """
    from deepfake_ray.models import detector

    spec = cfg.detector.pretrained
    if spec in ("none", ""):
        return "none"
    if spec != "hub":
        check_pretrained_file(cfg)
        detector.check_weights(spec, cfg.detector.arch)
        if storage.is_s3(spec) or not runtime.on_cluster() or within(spec, cfg.workdir):
            return storage.normalize(spec)  # `~` expanded: workers open it as it is
        # named by content: weights of one architecture are all one size, so a copy found
        # by name and size could be another file's or an older version's
        stem, ext = os.path.splitext(os.path.basename(spec))
        digest = storage.file_digest(spec, "sha256")[:16]
        uri = storage.join(stage_dir(cfg.workdir), "pretrained", f"{stem}-{digest}{ext}")
        if not storage.exists(uri):
            print(f"train-detector: copying {spec} to {uri}, where the workers on every node can read it")
            storage.upload_file(spec, uri)
        return uri
    uri = storage.join(stage_dir(cfg.workdir), "pretrained", f"{cfg.detector.hub_name}.safetensors")
    if not storage.exists(uri):
        print(f"train-detector: fetching {cfg.detector.hub_name} from the model hub")
        state = detector.hub_state_dict(cfg.detector.hub_name)
        storage.write_bytes(uri, st_save({k: v.contiguous() for k, v in state.items()}))
    return uri


def within(path: str, workdir: str) -> bool:
    """Whether local `path` lies in local `workdir`, which every node of a cluster shares."""
    folder = storage.normalize(workdir)
    return not storage.is_s3(workdir) and storage.normalize(path).startswith(folder.rstrip(os.sep) + os.sep)


def weights_sha256(pretrained: str) -> str | None:
    """What a fine-tune begins from, for model.json (the hub's weights change): hashed once
    in the driver, not in each of a sweep's trials (on S3, a download each)."""
    return None if pretrained in ("none", "") else storage.file_digest(pretrained, "sha256")


def fine_tune(cfg: Config, selection: data.Selection, pretrained: str, out_dir: str,
              lr: float | None = None, callbacks: list | None = None, views: dict | None = None,
              label: str = "train-detector", pretrained_sha256: str | None = None):
    """One Ray Train fine-tune into `out_dir` (best/, history.json, and Ray Train's run
    folder run/; resumed when that holds an unfinished run). `label` begins its progress
    lines (a sweep's trials print side by side); `pretrained_sha256`: weights_sha256 of
    `pretrained`, for model.json."""
    d = cfg.detector
    if lr is not None:
        cfg = dataclasses.replace(cfg, detector=dataclasses.replace(d, lr=float(lr)))
    loop_config = {"cfg": config.to_dict(cfg), "lr": cfg.detector.lr, "pretrained": pretrained,
                   "out_dir": storage.normalize(out_dir),
                   "label": label,
                   "pretrained_sha256": pretrained_sha256,
                   "resolution": selection.resolution, "jpeg_quality": selection.jpeg_quality,
                   "fingerprints": selection.fingerprints,
                   "counts": {s: c for s, c in selection.counts.items() if s != "test"}}
    return training.fit(worker_loop, loop_config, cfg, out_dir, "run",
                        datasets=lambda: views or data.training_views(cfg, selection),
                        keep=d.keep_checkpoints, max_failures=d.max_failures, callbacks=callbacks,
                        keep_best_by="val_score")  # best/ is re-exported from the best one on resume


def worker_loop(loop_config: dict) -> None:
    """Each Train worker's loop, imported there: a Tune trial that only drives a Train run
    then never loads timm, torchvision and scikit-learn (~6 CPU-seconds a trial)."""
    from deepfake_ray.detector import loop

    loop.train_loop(loop_config)


def threshold_set_by_hand(model_uri: str) -> float | None:
    """checkpoint.threshold_set_by_hand of the model at `model_uri`; None where there is none."""
    try:
        return checkpoint.threshold_set_by_hand(checkpoint.load_meta(model_uri))
    except (UsageError, ValueError, OSError):
        return None


def publish(cfg: Config, source_dir: str, seconds: float, made: dict, extra: dict | None = None,
            set_by_hand: float | None = None) -> dict:
    """Copy SOURCE/best -> WORKDIR/detector/model (+ history.json), then mark the stage done
    as `made` from what lineage.plan said (train-detector's or tune's). `set_by_hand`: the
    threshold set in the model replaced, where the caller removed it first (tune)."""
    stage = stage_dir(cfg.workdir)
    best = storage.join(source_dir, "best")
    weights, meta = checkpoint.read_model(best)  # verified against their hash, read once
    check_converged(meta, storage.join(source_dir, "history.json"))
    target = model_dir(cfg.workdir)
    set_by_hand = threshold_set_by_hand(target) if set_by_hand is None else set_by_hand
    checkpoint.write_model(target, weights, meta)
    if set_by_hand is not None:
        print(f"train-detector: note: the new model's threshold is {meta['threshold']!r}, chosen on validation; "
              f"the one set by hand in the model it replaced, {set_by_hand!r}, is gone: pick again from "
              "eval/thresholds.json once `deepfake-ray evaluate` has run", flush=True)
    history_uri = storage.join(source_dir, "history.json")
    if storage.normalize(source_dir) != storage.normalize(stage):
        storage.write_bytes(storage.join(stage, "history.json"), storage.read_bytes(history_uri))
    m = meta["metrics"]
    summary = {"model": target, "model_id": checkpoint.model_id(meta), "epoch": meta["epoch"],
               "val_auc": m["val_auc"], "val_loss": m["val_loss"], "val_acc": m["val_acc"],
               "threshold": meta["threshold"], "lr": meta.get("lr"), "epochs": cfg.detector.epochs,
               "seconds": round(seconds, 1), **(extra or {})}
    summary = lineage.complete(cfg, STAGE, summary, made)
    print(f"train-detector: best epoch {meta['epoch'] + 1} (val ROC-AUC {progress.figure(m['val_auc'])}, "
          f"loss {progress.figure(m['val_loss'])}, threshold {meta['threshold']!r}) -> {target} "
          f"(model {summary['model_id']})")
    if warning := metrics.near_chance("train-detector", "the best epoch's validation", m["val_auc"]):
        warn(warning)
    if warning := diverged_late(storage.read_json(history_uri), meta, tuned=bool((extra or {}).get("tuned"))):
        warn(warning)
    return summary


def diverged_late(history: list[dict], meta: dict, tuned: bool = False) -> str | None:
    """A warning when training stopped at a diverged epoch (the loop's own stop) after
    finite ones: the model published is the best before it, not the last asked for.
    `tuned`: it is a sweep's best trial, whose rate the sweep drew."""
    last = history[-1] if history else {}
    if not metrics.diverged(last):
        return None
    lr = float(meta.get("lr") or 0)
    fix = (f"sweep lower rates: deepfake-ray tune --force --set tune.lr_min={lr / 1000:g} "
           f"--set tune.lr_max={lr / 10:g}" if tuned else lower_rate(meta))
    return (f"{'tune' if tuned else 'train-detector'}: warning: training diverged at epoch {last['epoch'] + 1} "
            f"and stopped there; the model is epoch {meta['epoch'] + 1}'s, the best before it; to do better, {fix}")


def check_converged(meta: dict, history_uri: str) -> None:
    """UsageError when even the best epoch's validation loss was not finite: such a model
    gives NaN scores, which score and serve would otherwise report as "real"."""
    if not storage.finite(meta["metrics"].get("val_loss")):  # null: model.json's NaN
        raise UsageError(f"training diverged at detector.lr={float(meta.get('lr') or 0):g}: no epoch had "
                         f"a finite validation loss ({history_uri}); {lower_rate(meta)}")


def lower_rate(meta: dict) -> str:
    """The advice for a model that diverged: its rate / 10."""
    lr = float(meta.get("lr") or 0)
    return f"train anew with a lower rate: deepfake-ray train-detector --force --set detector.lr={lr / 10:g}"


