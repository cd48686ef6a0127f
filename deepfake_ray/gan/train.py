"""`deepfake-ray train-gan`: the DCGAN on Ray Train, resumable and fault tolerant.

The Ray Train run lives in WORKDIR/gan (RunConfig(storage_path=WORKDIR, name="gan")):
checkpoints epoch_NNNN/ every gan.checkpoint_every epochs (the newest
gan.keep_checkpoints kept), samples/epoch_NNN.png, losses.png and history.json as it
goes, model/ (the final generator) at the end, then _COMPLETE.json. Running the same
command again resumes from the newest intact checkpoint; a complete run is skipped.
"""
from __future__ import annotations

import math
import time


from deepfake_ray import config, lineage, progress, runtime, storage, training
from deepfake_ray.config import Config
from deepfake_ray.data import datasets
from deepfake_ray.data.decode import decode_jpeg
from deepfake_ray.errors import UsageError, warn
from deepfake_ray.gan import loop
from deepfake_ray.gan.loop import discriminator_won
from deepfake_ray.models import dcgan

RUN_NAME = "gan"


def settings(cfg: Config) -> dict:
    """What decides the generator (resources and retries do not: a resubmission may differ)."""
    g = cfg.gan
    return {"seed": cfg.seed, **{f"gan.{k}": getattr(g, k) for k in
                                 ("epochs", "batch_size", "lr", "beta1", "latent_dim", "g_width", "d_width")}}


STAGE = lineage.Stage("train-gan", RUN_NAME, ("data",), settings, lambda d: f"{d['epochs']} epochs",
                      grows=("gan.epochs",))


def gan_dir(workdir: str) -> str:
    return storage.join(workdir, RUN_NAME)


def model_uri(workdir: str) -> str:
    return storage.join(gan_dir(workdir), "model")


def check_settings(cfg: Config) -> None:
    """What config.check_limits cannot check alone (run before Ray starts)."""
    try:
        dcgan.check_resolution(cfg.data.resolution)
    except ValueError as e:
        raise UsageError(str(e))


def check_data(cfg: Config) -> int:
    """The prepared reals suit this run: returns the number of training images."""
    data = datasets.data_dir(cfg.workdir)
    manifest = datasets.require_manifest(data, "prepare")
    train = sum(1 for s in manifest.column("split").to_pylist() if s == "train")
    workers = cfg.resources.workers
    per_worker = train // workers
    fewer = " or use fewer workers" if workers > 1 else ""
    if per_worker < 2:  # batch norm needs a batch of two: no gan.batch_size would do
        raise UsageError(f"the train split holds {train} image(s), {per_worker} for each of resources.workers="
                         f"{workers}; the DCGAN needs 2 or more each: prepare more images{fewer}")
    if per_worker < cfg.gan.batch_size:
        raise UsageError(
            f"{train} training images give {per_worker} per worker, fewer than gan.batch_size="
            f"{cfg.gan.batch_size}: set gan.batch_size={per_worker} or lower{fewer}, or prepare more images")
    size = int(decode_jpeg(datasets.first_image(data)).shape[0])
    if size != cfg.data.resolution:
        raise UsageError(f"{data} holds {size} px images but data.resolution is "
                         f"{cfg.data.resolution}: set data.resolution={size}, or run "
                         "`deepfake-ray prepare --force` at the new resolution")
    return train


def train_dataset(cfg: Config, train_images: int):
    """The real training split, decoded by Ray Data tasks beside the train workers.

    Shuffled across the whole split first (once per run: Ray Data's blocks may arrive in
    another order, so a resumed run may see another order, which training does not mind):
    `prepare` stores images in the order of their paths, and the workers' local shuffle
    buffers mix only a few batches, so a folder sorted by age or person (UTKFace's names
    begin with the age) gave batches of near-identical faces, the same each epoch. The
    JPEG bytes are shuffled, a fifth of the decoded pixels' size. Each epoch, its blocks come
    in another order (with deterministic=true, the shuffle and these orders are a rerun's too).

    When the decoded split fits in a quarter of the object store it is decoded once and
    kept there; each epoch then only re-splits it (a re-read costs seconds per epoch on
    a busy small machine). Larger splits stream from Parquet every epoch.
    """
    # Many blocks, whose order can change: a small split is one or two Parquet blocks (CI
    # once drew the same order three epochs running). A split of 64+ batches gets 64+ blocks
    # of up to a decode batch; a smaller one, blocks of a training batch (roughly: a decode
    # task's output is one block, its batches merged).
    block_rows = min(cfg.data.decode_batch_size, max(cfg.gan.batch_size, math.ceil(train_images / 64)))
    order = datasets.block_order_seed(cfg.deterministic, cfg.seed)

    def decoded(ds):
        return runtime.map_on_tasks(ds, datasets.decode_batch, batch_size=block_rows,
                                    num_cpus=cfg.resources.data_cpus)

    with datasets.in_order(cfg.deterministic):
        shuffled = (datasets.read_split(datasets.data_dir(cfg.workdir), "train")
                    .select_columns(["image"])
                    .random_shuffle(seed=cfg.seed)
                    .repartition(target_num_rows_per_block=block_rows))
        # Each epoch draws the blocks in another order: the shuffle above is the same every
        # epoch, so the same images would meet in each epoch's k-th batch.
        if datasets.decoded_fits(train_images, cfg.data.resolution):
            return decoded(shuffled).materialize().randomize_block_order(seed=order)
        return decoded(shuffled.randomize_block_order(seed=order))  # its JPEGs: the decoded split would wait whole


def check_converged(cfg: Config, last: dict) -> None:
    """UsageError when the loop stopped at a diverged epoch (it exports no generator): its
    NaN weights drew black squares, which generate then blamed on a collapse."""
    if loop.diverged(last):
        loss = {k: "not finite" if last[k] is None else last[k] for k in ("g_loss", "d_loss")}  # NaN: null
        raise UsageError(f"train-gan diverged at epoch {last['epoch'] + 1} (G loss {loss['g_loss']}, D loss "
                         f"{loss['d_loss']}) at gan.lr={cfg.gan.lr:g}: no generator was exported; train anew with a "
                         f"lower rate: {lineage.command_line(cfg.workdir, 'train-gan')} "
                         f"--force --set gan.lr={cfg.gan.lr / 10:g}")


def run(cfg: Config, force: bool = False, **_) -> dict:
    stage = gan_dir(cfg.workdir)
    check_settings(cfg)  # before plan: with --force, a typo must not unmark a complete stage
    plan = lineage.plan(cfg, STAGE, force)
    if plan.done:
        return plan.done
    train_images = check_data(cfg)
    training.check_fits(cfg)
    if plan.redo:
        lineage.clear(stage)
    lineage.start(cfg, STAGE, plan)
    g, r = cfg.gan, cfg.resources
    print(f"train-gan: {train_images:,} training images at {cfg.data.resolution} px, "
          f"{progress.count(g.epochs, 'epoch')}, {progress.count(r.workers, 'worker')} x batch {g.batch_size} "
          f"({r.workers * g.batch_size} a step)"
          f"{' on GPU' if runtime.use_gpus(r.use_gpu) else ''}{', deterministic' if cfg.deterministic else ''}"
          f" -> {stage}", flush=True)
    started = time.time()
    # whole: Ray Train's workers run in folders of their own (the API takes a relative workdir)
    training.fit(loop.train_loop, {"cfg": config.to_dict(cfg), "stage": storage.normalize(stage)}, cfg,
                 cfg.workdir, RUN_NAME, datasets=lambda: {"train": train_dataset(cfg, train_images)},
                 keep=g.keep_checkpoints, max_failures=g.max_failures)
    history = storage.read_json(storage.join(stage, "history.json"))
    check_converged(cfg, history[-1])
    meta = storage.read_json(storage.join(model_uri(cfg.workdir), "model.json"))
    won = discriminator_won(history[-1])
    summary = {"epochs": len(history), "final": history[-1], "model": model_uri(cfg.workdir),
               "model_sha256": meta["weights_sha256"], "train_images": train_images,
               "restored": any(h["restored"] for h in history), "discriminator_won": won is not None,
               "seconds": round(time.time() - started, 1)}
    summary = lineage.complete(cfg, STAGE, summary, plan.made)
    print(f"train-gan: done in {summary['seconds']:.0f}s; generator -> {summary['model']}")
    if won:
        warn(won)
    return summary

