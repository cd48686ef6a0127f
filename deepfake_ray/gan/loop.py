"""The DCGAN training loop that runs in every Ray Train worker.

It gets its shard of the real images, wraps G and D for data parallelism, calls
the plain-torch `dcgan.gan_step` per batch, and once per epoch reduces metrics over
workers, reports them and (on rank 0) checkpoints and writes the figures.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from deepfake_ray import checkpoint, runtime, storage, training
from deepfake_ray.config import Config, from_dict, to_dict
from deepfake_ray.data.datasets import to_unit_range
from deepfake_ray.gan import figures
from deepfake_ray.models import autocast_dtype, dcgan

METRICS = ("g_loss", "d_loss", "d_real", "d_fake")


@dataclass
class Run:
    cfg: Config
    stage: str  # WORKDIR/gan
    G: torch.nn.Module
    D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    fixed_noise: torch.Tensor
    history: list
    batch_losses: torch.Tensor  # (steps, 2): G and D loss of every batch so far
    epoch_starts: list
    global_step: int = 0


def fixed_noise(cfg: Config) -> torch.Tensor:
    """The same latent vectors every epoch, so sample grids are comparable."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(cfg.gan.sample_grid, cfg.gan.latent_dim, generator=gen)


def noise_generator(cfg: Config, device: torch.device, epoch: int) -> torch.Generator:
    """A per-(seed, rank, epoch) stream: a resumed epoch draws the same noise."""
    return torch.Generator(device=device).manual_seed(training.epoch_seed(cfg.seed, epoch))


def setup(cfg: Config, stage: str) -> tuple[Run, int | None]:
    """Models and optimisers, restored from the newest intact checkpoint if any."""
    g = cfg.gan
    torch.manual_seed(cfg.seed)
    device = training.device()
    G, D = dcgan.build(cfg.data.resolution, g.latent_dim, g.g_width, g.d_width)
    on_gpu = device.type == "cuda" and g.mixed_precision
    if on_gpu:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = dcgan.optimizers(G, D, g.lr, g.beta1)
    run = Run(cfg, stage, G, D, opt_g, opt_d, device, autocast_dtype(device) if on_gpu else None, on_gpu,
              fixed_noise(cfg), [], torch.zeros(0, 2), [])
    state = training.restore_state()
    resumed_from = None
    if state is not None:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        resumed_from = int(state["epoch"])
        # fixed_noise is not restored: drawn from the seed, it is the same vectors, and a
        # continued run asked for a bigger gan.sample_grid gets its bigger grid
        run.global_step = int(state["global_step"])
        run.history = [h for h in state["history"] if h["epoch"] <= resumed_from]
        run.batch_losses, run.epoch_starts = state["batch_losses"], list(state["epoch_starts"])
    # D is called three times per step; buffers need no broadcast (BN stats stay local).
    ddp = {"broadcast_buffers": False}
    run.G = ray.train.torch.prepare_model(G, parallel_strategy_kwargs=ddp)
    run.D = ray.train.torch.prepare_model(D, parallel_strategy_kwargs=ddp)
    return run, resumed_from


def train_epoch(run: Run, shard, epoch: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(metric sums over batches, per-batch [G, D] losses, images, seconds) of this worker."""
    g = run.cfg.gan
    gen = noise_generator(run.cfg, run.device, epoch)
    run.G.train(), run.D.train()
    outs, images, started = [], 0, time.perf_counter()
    # 16 batches mixed (~12 MB at 128 px, batch 16), as the detector's: the split's blocks
    # are fixed after its one shuffle, so a buffer of 4 (a block or two) drew each batch
    # from the same ~64 images every epoch, normalised together by D's batch norm
    batches = shard.iter_batches(batch_size=g.batch_size, batch_format="numpy", drop_last=True,
                                 prefetch_batches=2, local_shuffle_buffer_size=training.SHUFFLE_BATCHES * g.batch_size,
                                 local_shuffle_seed=run.cfg.seed + epoch)
    for i, batch in enumerate(batches):
        # uint8 to the device first: a quarter of the bytes of float pixels
        real = to_unit_range(torch.from_numpy(batch["pixels"]).to(run.device, non_blocking=True))
        if run.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(real.shape[0], g.latent_dim, generator=gen, device=run.device)
        out = dcgan.gan_step(run.G, run.D, run.opt_g, run.opt_d, real, z, run.amp_dtype)
        outs.append(torch.stack([out[k] for k in METRICS]))
        images += real.shape[0]
        if i == 0:
            training.inject_failure(run.stage, epoch, g.fail_at_epoch)
    per_batch = torch.stack(outs).float().cpu() if outs else torch.zeros(0, len(METRICS))
    return per_batch.sum(0), per_batch[:, :2], images, time.perf_counter() - started


def reduce(run: Run, sums: torch.Tensor, per_batch: torch.Tensor, images: int, seconds: float):
    """Averages over every worker's batches; per-batch losses averaged over workers."""
    world = ray.train.get_context().get_world_size()
    totals = torch.cat([sums, torch.tensor([float(len(per_batch)), float(images), seconds])])
    if world > 1 and dist.is_initialized():
        # on the device: NCCL (GPU workers) reduces only device tensors
        totals, per_batch = totals.to(run.device), per_batch.contiguous().to(run.device)
        dist.all_reduce(totals)
        dist.all_reduce(per_batch)  # equal shards + drop_last: same batch count everywhere
        totals, per_batch = totals.cpu(), per_batch.cpu() / world
    batches = max(totals[len(METRICS)].item(), 1.0)
    means = {k: round(totals[i].item() / batches, 5) for i, k in enumerate(METRICS)}
    images, seconds = int(totals[-2].item()), totals[-1].item() / world
    return means, per_batch, images, seconds


def write_figures(run: Run, epoch: int) -> None:
    """Rank 0: the fixed-noise grid of this epoch, the loss curves, the history."""
    G = getattr(run.G, "module", run.G)
    G.eval()
    with torch.no_grad():
        images = dcgan.to_uint8(G(run.fixed_noise.to(run.device)))
    G.train()
    storage.write_bytes(storage.join(run.stage, "samples", f"epoch_{epoch:03d}.png"),
                        figures.grid_png(images.numpy()))
    losses = run.batch_losses.tolist()
    storage.write_bytes(storage.join(run.stage, "losses.png"), figures.losses_png(
        [x[0] for x in losses], [x[1] for x in losses], run.epoch_starts))
    storage.write_json(storage.join(run.stage, "history.json"), run.history)


def state_of(run: Run, epoch: int) -> dict:
    unwrap = lambda m: getattr(m, "module", m)  # noqa: E731 - DDP keeps the model in .module
    return {"epoch": epoch, "global_step": run.global_step,
            "G": unwrap(run.G).state_dict(), "D": unwrap(run.D).state_dict(),
            "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(),
            "history": run.history, "batch_losses": run.batch_losses,
            "epoch_starts": run.epoch_starts, "config": json.dumps(to_dict(run.cfg))}


def progress_line(m: dict, epochs: int, left: str) -> str:
    """`left`: training.time_left of the epochs to go."""
    restored = f"  (resumed after epoch {m['resumed_from'] + 1})" if m["restored"] else ""  # 1-based, as printed
    return (f"train-gan: epoch {m['epoch'] + 1}/{epochs}  G loss {m['g_loss']:.3f}  "
            f"D loss {m['d_loss']:.3f}  D(x) {m['d_real']:.3f}  D(G(z)) {m['d_fake']:.3f}  "
            f"{m['images_per_s']:.1f} images/s  {m['seconds']:.0f} s, {left} left{restored}")


def epoch_lines(m: dict, epochs: int, left: str, warned: bool) -> tuple[list[str], bool]:
    """An epoch's line, then the warning that the discriminator has won, the first epoch
    it shows but the last (train-gan says it then): and whether it has been said."""
    lines = [progress_line(m, epochs, left)]
    if not warned and m["epoch"] < epochs - 1 and (won := discriminator_won(m, finished=False)):
        lines.append(won)
        warned = True
    return lines, warned


# A discriminator that has won: it calls every fake fake, and the generator's gradient has
# vanished. Seen at gan.lr=0.002: G loss 15-17 by epoch 8, grey noise for faces. A healthy
# DCGAN's last epochs sit near D(G(z)) 0.1-0.4 and G loss 1-5.
WON_D_FAKE, WON_G_LOSS = 0.01, 8.0


def discriminator_won(m: dict, finished: bool = True) -> str | None:
    """A warning line when an epoch's figures say the discriminator has won, else None: the
    fakes made from such a generator teach the detector noise, not faces. Said the first
    epoch it shows (a collapse shows by epoch 8 of 60: hours of GPUs to stop), and again
    at the end."""
    if not (m["d_fake"] < WON_D_FAKE and m["g_loss"] > WON_G_LOSS):
        return None
    fix = ("train again (--force)" if finished else
           "stop it (Ctrl-C, or `ray job stop`) and train again (`train-gan --force`)")
    return (f"train-gan: warning: the discriminator has won (epoch {m['epoch'] + 1}: D(G(z)) {m['d_fake']:.4f}, "
            f"G loss {m['g_loss']:.1f}): the generator learns nothing more and may draw noise, not "
            f"faces; look at gan/samples/, and {fix} with a lower gan.lr or another seed")


def train_loop(config: dict) -> None:
    """Ray Train entry point: `config` = {"cfg": to_dict(cfg), "stage": WORKDIR/gan}."""
    cfg, stage = from_dict(config["cfg"]), config["stage"]
    training.setup_worker(cfg)
    run, resumed_from = setup(cfg, stage)
    runtime.freeze_startup_objects()  # imports and models: long-lived from here on
    shard = ray.train.get_dataset_shard("train")
    first = resumed_from + 1 if resumed_from is not None else 0
    warned, session_started = False, time.monotonic()
    for epoch in range(first, cfg.gan.epochs):
        sums, per_batch, images, seconds = train_epoch(run, shard, epoch)
        means, per_batch, images, seconds = reduce(run, sums, per_batch, images, seconds)
        run.epoch_starts.append(len(run.batch_losses))
        run.batch_losses = torch.cat([run.batch_losses, per_batch])
        run.global_step += len(per_batch)
        restored = epoch == first and resumed_from is not None
        metrics = {"epoch": epoch, **means, "images": images, "seconds": round(seconds, 2),
                   "images_per_s": round(images / max(seconds, 1e-9), 2),
                   **training.how_trained(run.device, run.amp_dtype),
                   "restored": restored, "resumed_from": resumed_from if restored else None}
        run.history.append(metrics)
        last = epoch == cfg.gan.epochs - 1
        save = last or (epoch + 1) % max(1, cfg.gan.checkpoint_every) == 0
        if training.rank() == 0:
            write_figures(run, epoch)
            left = training.time_left(time.monotonic() - session_started, epoch - first + 1, cfg.gan.epochs - epoch - 1)
            lines, warned = epoch_lines(metrics, cfg.gan.epochs, left, warned)
            for line in lines:
                training.say(line, warning=": warning:" in line)
        stop = diverged(metrics)  # NaN weights stay NaN: the epochs left would draw black squares
        # a diverged epoch is not kept: a rerun resumed from it would export its NaN generator
        training.report_epoch(epoch, metrics, state_of(run, epoch) if save and not stop else None)
        if stop:
            if training.rank() == 0:  # the means are reduced over workers: each stops here
                training.say(f"train-gan: diverged at epoch {epoch + 1} (G loss {metrics['g_loss']}, "
                             f"D loss {metrics['d_loss']}): stopping; no generator is exported")
            return
    if training.rank() == 0:
        export(run)


def diverged(m: dict) -> bool:
    """Whether an epoch's losses are not finite (null, as history.json writes NaN)."""
    return not all(storage.finite(m[k]) for k in METRICS)


def export(run: Run) -> None:
    """The final generator, in the project's model format, at WORKDIR/gan/model."""
    cfg, G = run.cfg, getattr(run.G, "module", run.G)
    meta = {**dcgan.generator_meta(cfg.data.resolution, cfg.gan.latent_dim, cfg.gan.g_width),
            "epochs": len(run.history), "config": to_dict(cfg),
            "final_metrics": run.history[-1] if run.history else {}}
    checkpoint.save_model(storage.join(run.stage, "model"), G.state_dict(), meta)
