"""The detector's Ray Train worker loop: one call per worker, shared by train-detector and tune.

Per epoch: train on this worker's shard, validate on the val shard (predictions
gathered from every worker, so ROC-AUC is over the split; Ray Train's equal split
leaves out its remainder, at most workers - 1 images an epoch), rank 0 exports the
epoch's model to OUT/best/ when it beats the best so far (by val ROC-AUC, then val
loss) and rewrites OUT/history.json; then every worker reports (checkpoint: model,
optimizer, history and the pretrained weights' SHA-256), so a restarted or
resubmitted run resumes there.

best/ is always the best epoch of history.json: an export whose epoch's checkpoint never
got written whole (the driver or a worker lost in between) is replaced on resume from the
checkpoint of the best epoch the run did keep (Ray Train keeps checkpoints by val_score;
one written whole but never registered counts too), and history.json goes back to the
restored epochs.
"""
from __future__ import annotations

import collections
import json
import math
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from deepfake_ray import checkpoint, config, runtime, storage, training
from deepfake_ray.detector import metrics
from deepfake_ray.errors import UsageError
from deepfake_ray.models import autocast_dtype, detector


def train_loop(loop: dict) -> None:
    cfg = config.from_dict(loop["cfg"])
    training.setup_worker(cfg)
    d = cfg.detector
    device = training.device()
    amp = autocast_dtype(device, d.mixed_precision)
    model, optimizer, state = setup(loop, cfg, device)
    loop = began_from(loop, state)
    runtime.freeze_startup_objects()  # imports and models: long-lived from here on
    history = list(state["history"]) if state else []
    start, restored = (state["epoch"] + 1, True) if state else (0, False)
    del state  # the restored weights and Adam moments: ~0.65 GB of host memory, all run long
    pre = detector.preprocessing(model)
    label = loop.get("label", "train-detector")  # a sweep's trial names itself and its rate
    loop = {**loop, "parameters": detector.count_parameters(model)}  # for model.json
    best = restore_best(loop, cfg, model, history, pre) if training.rank() == 0 else None
    wrapped, frozen_now, session_started = None, None, time.monotonic()
    for epoch in range(start, d.epochs):
        frozen = epoch < d.freeze_backbone_epochs
        if frozen != frozen_now:  # DDP must be rebuilt when the set of trained parameters changes
            detector.set_backbone_frozen(model, frozen)
            wrapped, frozen_now = ray.train.torch.prepare_model(model), frozen
        started = time.monotonic()
        training.seed_epoch(cfg.seed, epoch)  # the flips: a resumed epoch draws a straight run's
        entry = {"epoch": epoch, "lr": loop["lr"], "frozen_backbone": frozen,
                 "restored": restored and epoch == start, **training.how_trained(device, amp)}
        entry.update(train_epoch(wrapped, optimizer, d, pre, device, amp, frozen,
                                 f"{label}: epoch {epoch + 1}/{d.epochs}", cfg.seed + epoch))
        entry.update(metrics.epoch_validation(*validate(wrapped, d, pre, device, amp)))
        entry["seconds"] = round(time.monotonic() - started, 2)
        history.append(entry)
        if training.rank() == 0:
            if better(entry, best):
                export(loop["out_dir"], model.state_dict(), entry, cfg, loop, pre)
                best = entry
            storage.write_json(storage.join(loop["out_dir"], "history.json"), history)
            left = training.time_left(time.monotonic() - session_started, epoch - start + 1, d.epochs - epoch - 1)
            training.say(progress_line(entry, d.epochs, left, label))
        if epoch == d.fail_at_epoch:  # TEST ONLY fault, once rank 0's export is done: best/
            barrier()                 # may hold this epoch, and no checkpoint does
            training.inject_failure(loop["out_dir"], epoch, d.fail_at_epoch)
        stop = metrics.diverged(entry)  # each epoch left would be wasted
        state = None if stop else {  # a diverged epoch is not one to resume from
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "history": history, "pretrained_sha256": loop.get("pretrained_sha256")}
        training.report_epoch(epoch, {**entry, "epochs_done": epoch + 1, "val_score": score(entry)}, state)
        if stop:
            if training.rank() == 0:  # the loss is summed over workers: each stops here
                training.say(f"{label}: diverged at epoch {epoch + 1} (train loss {entry['train_loss']}): "
                             "stopping; best/ keeps the best epoch before it")
            break


def began_from(loop: dict, state: dict | None) -> dict:
    """`loop` with the SHA-256 of the pretrained weights the run began from, as its
    checkpoint recorded it: a resume loads none, and the file named may have changed since."""
    if not state or state.get("pretrained_sha256") is None:
        return loop
    if state["pretrained_sha256"] != loop.get("pretrained_sha256") and training.rank() == 0:
        named = loop["cfg"]["detector"]["pretrained"]
        training.say(f"[deepfake-ray] detector: note: detector.pretrained={named} changed since this run "
                     "began; it goes on from its checkpoints, begun from the earlier file (sha256 "
                     f"{state['pretrained_sha256'][:12]}), which model.json records")
    return {**loop, "pretrained_sha256": state["pretrained_sha256"]}


def setup(loop: dict, cfg, device: torch.device):
    """(model on device, optimizer, restored state or None): resumed state wins over weights."""
    d = cfg.detector
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object over NCCL uses the current device
    training.seed_worker(cfg.seed)  # DDP hands rank 0's initial weights to the others
    state = training.restore_state()
    model = detector.create(d.arch, 2, "none" if state else loop["pretrained"], d.hub_name)
    if state:
        model.load_state_dict(state["model"])
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = make_optimizer(model, d.optimizer, loop["lr"], d.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        training.say(f"[deepfake-ray] detector: resuming after epoch {state['epoch'] + 1}")
    return model, optimizer, state


def progress_line(entry: dict, epochs: int, left: str, label: str = "train-detector") -> str:
    """`left`: training.time_left of the epochs to go."""
    return (f"{label}: epoch {entry['epoch'] + 1}/{epochs}  " + "  ".join(
        f"{k} {entry[k]:.4f}" for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc"))
        + f"  {entry['train_images_per_s']:.1f} images/s  {entry['seconds']:.0f} s, {left} left")


def make_optimizer(model, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def batches(split: str, batch_size: int, seed: int | None = None):
    """`seed`: train's shuffle buffer draws from it (the run's seed and the epoch, as the GAN's)."""
    shard = ray.train.get_dataset_shard(split)
    # train: blocks arrive in a random order (one class per block is common); the buffer mixes them
    buffer = training.SHUFFLE_BATCHES * batch_size if split == "train" else None
    return shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=buffer,
                                    local_shuffle_seed=seed if buffer else None)


# an epoch of the demo takes minutes on 2 cores: a silent one read as a hang
PROGRESS_EVERY_S = 30.0


def train_epoch(model, optimizer, d, pre: dict, device, amp, frozen: bool, label: str, shuffle_seed: int) -> dict:
    """One epoch's training; rank 0 says how far it has come every PROGRESS_EVERY_S."""
    detector.train_mode(model, frozen)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    n, started = 0, time.monotonic()
    said, each = (started, " on each worker" if ray.train.get_context().get_world_size() > 1 else "") \
        if training.rank() == 0 else (None, "")
    recent, recent_n = collections.deque(), 0  # the epoch's last inputs, for batch norm
    for batch in batches("train", d.batch_size, shuffle_seed):
        y = batch["label"].to(device)
        if len(y) < 2:  # batch norm over a 1x1 feature map cannot train on one image
            continue
        x = inputs(batch["pixels"], d.input_size, pre, device)
        if d.hflip:
            x = detector.random_hflip(x)
        batch_loss, batch_correct = detector.train_step(model, optimizer, x, y, amp)
        loss_sum, correct, n = loss_sum + batch_loss, correct + batch_correct, n + len(y)
        if said is not None and time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            training.say(f"{label}: {n:,} images so far{each}, {n / (said - started):.1f} images/s")
        if d.bn_recalibration_images > 0:
            recent.append(x.detach())
            recent_n += len(x)
            while recent_n - len(recent[0]) >= d.bn_recalibration_images:
                recent_n -= len(recent.popleft())
    loss_sum, correct = float(loss_sum), float(correct)  # one device sync per epoch
    seconds = time.monotonic() - started
    if recent:  # on each worker's own inputs: no collective calls
        detector.recalibrate_batchnorm(getattr(model, "module", model), list(recent), amp)
    loss_sum, correct, n = all_sum([loss_sum, correct, n])
    if n == 0:  # data.select refuses such a split; an untrained model must not be published
        raise UsageError(f"{label}: no training step ran (every batch held one image): use fewer "
                         "workers or prepare more images")
    return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
            "train_n": int(n), "train_images_per_s": round(n / max(seconds, 1e-9), 2)}


def validate(model, d, pre: dict, device, amp) -> tuple[np.ndarray, np.ndarray, float]:
    model.eval()
    labels, probs, loss_sum = [], [], 0.0
    for batch in batches("val", d.batch_size):
        y = batch["label"].to(device)
        batch_loss, p = detector.eval_step(model, inputs(batch["pixels"], d.input_size, pre, device), y, amp)
        loss_sum += batch_loss
        labels.append(y.cpu().numpy())
        probs.append(p)
    labels, probs, losses = gather([np.concatenate(labels or [np.zeros(0, int)]),
                                    np.concatenate(probs or [np.zeros(0)]), np.array([loss_sum])])
    return labels.astype(int), probs, float(losses.sum())


def inputs(pixels: torch.Tensor, input_size: int, pre: dict, device) -> torch.Tensor:
    x = detector.to_input(pixels.to(device, non_blocking=True), input_size, pre["mean"], pre["std"],
                          pre["interpolation"])
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def gather(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate each array over all workers (in rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    return [float(v.sum()) for v in gather([np.array([v], dtype=np.float64) for v in values])]


# --- the best epoch ----------------------------------------------------------------

def score(entry: dict) -> float:
    """Higher is better: val ROC-AUC (-1 for a diverged epoch), ties broken by the lower val
    loss. One number: Ray Train keeps checkpoints, and Tune ranks trials, by it (val_score).
    (AUCs closer than 1e-9, possible beyond ~30k images a class, may then go by loss.)"""
    auc, loss = entry.get("val_auc", math.nan), entry.get("val_loss", math.inf)
    auc = -1.0 if auc is None or math.isnan(auc) else auc
    tie = loss / (1.0 + loss) if loss is not None and math.isfinite(loss) and loss >= 0 else 1.0
    return auc - 1e-9 * tie


def better(entry: dict, best: dict | None) -> bool:
    """A later epoch wins a tie, as in Ray Train's ranking: the checkpoint kept is its."""
    return best is None or score(entry) >= score(best)


def best_of(history: list[dict]) -> dict:
    return max(reversed(history), key=score)  # the latest of equals, as better() picks


def vouched(entry: dict) -> dict:
    """An epoch's validation figures, as model.json records them."""
    return {k: v for k, v in entry.items() if k.startswith("val_") or k == "epoch"}


def best_so_far(out_dir: str) -> dict | None:
    """The exported best epoch's metrics, or None when nothing (or a partial export) is there."""
    try:
        return checkpoint.load_meta(storage.join(out_dir, "best"))["metrics"]
    except (UsageError, ValueError, KeyError):  # nothing exported yet, or a partial export
        return None
    # an OSError (S3 throttled, a network hiccup) fails the worker, which Ray Train retries:
    # taken for "no best yet", the next epoch would overwrite a better model with a worse one


def restore_best(loop: dict, cfg, model, history: list[dict], pre: dict) -> dict | None:
    """The best epoch of the restored `history`, exported to OUT/best/ again unless it is
    there. What else best/ holds was exported by an epoch no checkpoint vouches for (it is
    trained again now), or was cut short; a fresh start (no history) overwrites it anyway."""
    if not history:
        return None
    # history.json too may list the epoch being trained again, until that epoch ends
    storage.write_json(storage.join(loop["out_dir"], "history.json"), history)
    want = best_of(history)
    found = best_so_far(loop["out_dir"])
    if json.dumps(found, sort_keys=True) == json.dumps(storage.json_safe(vouched(want)), sort_keys=True):
        return want  # (as written: a NaN is null there)
    if want is history[-1]:
        weights = model.state_dict()  # the epoch just restored
    else:
        state = training.state_at_epoch(want["epoch"])
        if state is None:  # Ray Train keeps it (ranked by val_score) unless it was damaged
            training.say(f"[deepfake-ray] detector: no intact checkpoint of best epoch {want['epoch'] + 1}; "
                         "best/ keeps what it holds")
            return found
        weights = state["model"]
    held = f"epoch {found['epoch'] + 1}, which no checkpoint vouches for" if found else "no complete model"
    training.say(f"[deepfake-ray] detector: best/ held {held}; exported the best checkpointed "
                 f"epoch, {want['epoch'] + 1}, again")
    export(loop["out_dir"], weights, want, cfg, loop, pre)
    return want


def export(out_dir: str, weights: dict, entry: dict, cfg, loop: dict, pre: dict) -> None:
    """OUT/best/: weights + model.json in the project's model format."""
    d = cfg.detector
    meta = {"arch": d.arch, "num_classes": 2, "class_names": detector.CLASS_NAMES,
            "resolution": loop["resolution"], "jpeg_quality": loop.get("jpeg_quality", cfg.data.jpeg_quality),
            "input_size": d.input_size, "preprocessing": pre,
            "threshold": entry["val_threshold"], "epoch": entry["epoch"],
            "metrics": vouched(entry),
            "config": config.to_dict(cfg), "lr": loop["lr"], "fingerprints": loop["fingerprints"],
            "data": loop["counts"], "parameters": loop["parameters"],
            "pretrained": {"weights": d.pretrained, **({"hub_name": d.hub_name} if d.pretrained == "hub" else {}),
                           "sha256": loop.get("pretrained_sha256")}}
    checkpoint.save_model(storage.join(out_dir, "best"), weights, meta)
