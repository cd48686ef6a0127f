"""What Ray Train costs the DCGAN: training images/s of a one-worker Ray Train loop versus
the same plain-torch `gan_step` calls on the same in-memory batches, in one run.

Both sides train the same models (same seed) on the same uint8 batches with the same
number of torch threads at the same niceness (Ray nices its workers to 15); the Ray
side streams them from a Ray Data dataset shard with the local shuffle buffer
deepfake_ray.gan.loop uses, wraps the models with `prepare_model` and reports once per
epoch, as that loop does. The two sides take turns, one epoch each (the other
waits idle), so a shared machine's drifting load hits both alike. Throughput is
measured inside each loop, excludes the first (warm-up) epoch, and includes the Ray
side's per-epoch report; Ray's start-up time is printed separately. Goal: ratio >= 0.9.

    python benchmarks/gan_step.py [--resolution 64] [--width 32] [--batch 64] [--batches 32] [--epochs 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("DEEPFAKE_RAY_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepfake_ray.data.datasets import to_unit_range  # noqa: E402
from deepfake_ray.data.sample import face  # noqa: E402
from deepfake_ray.models import dcgan  # noqa: E402
from deepfake_ray.training import SHUFFLE_BATCHES  # noqa: E402


def batches(n: int, size: int, resolution: int) -> list[np.ndarray]:
    faces = np.stack([face(0, i, resolution) for i in range(n * size)])
    return [faces[i * size:(i + 1) * size] for i in range(n)]


def models(args):
    torch.manual_seed(0)
    G, D = dcgan.build(args.resolution, 100, args.width, args.width)
    return (G, D, *dcgan.optimizers(G, D))


def plain_epoch(state, data: list[np.ndarray]) -> tuple[int, float]:
    """One epoch of bare torch over the in-memory batches: (images, seconds)."""
    G, D, opt_g, opt_d, gen = state
    started = time.perf_counter()
    for pixels in data:
        z = torch.randn(len(pixels), 100, generator=gen)
        dcgan.gan_step(G, D, opt_g, opt_d, to_unit_range(pixels), z)
    return sum(map(len, data)), time.perf_counter() - started


def ray_loop(config: dict) -> None:
    """The Ray Train side; waits for its turn before each epoch, hands the turn back after."""
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    torch.set_num_threads(args.threads)
    G, D, opt_g, opt_d = models(args)
    G, D = ray.train.torch.prepare_model(G), ray.train.torch.prepare_model(D)
    shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(0)
    args.to_driver.put(os.nice(0))  # Ray runs workers niced (RAY_worker_niceness, 15)
    for epoch in range(args.epochs):
        args.to_ray.get()
        started, n = time.perf_counter(), 0
        for batch in shard.iter_batches(batch_size=args.batch, batch_format="numpy", drop_last=True,
                                        prefetch_batches=2, local_shuffle_buffer_size=SHUFFLE_BATCHES * args.batch,
                                        local_shuffle_seed=epoch):  # as gan.loop.train_epoch
            z = torch.randn(len(batch["data"]), 100, generator=gen)
            dcgan.gan_step(G, D, opt_g, opt_d, to_unit_range(batch["data"]), z)
            n += len(batch["data"])
        ray.train.report({"epoch": epoch, "images": n})
        args.to_driver.put((n, time.perf_counter() - started))


def compare(data: list[np.ndarray], args) -> tuple[float, float, float]:
    """(plain images/s, Ray images/s, Ray fit wall seconds), epochs taken in turns."""
    import ray.data

    from deepfake_ray import config, runtime, training
    from turns import Turns

    runtime.init()
    torch.set_num_threads(args.threads)
    ds = ray.data.from_numpy(np.concatenate(data)).materialize()
    cfg = config.build("demo", None, ["resources.workers=1",
                                      f"resources.cpus_per_worker={args.threads}"])
    turns, started = Turns(), time.time()
    with tempfile.TemporaryDirectory(prefix="gan-step-bench-") as storage:
        turns.start(lambda: training.fit(ray_loop, turns.loop_config(args), cfg, storage, "bench",
                                         datasets=lambda: {"train": ds}))
        worker_nice = turns.receive()  # the Ray loop's first message
        os.nice(max(0, worker_nice - os.nice(0)))  # on a shared machine a niced process gets less CPU
        plain_state = (*models(args), torch.Generator().manual_seed(0))
        base, ray_ips = turns.compare(args.epochs, lambda: plain_epoch(plain_state, data))
    args.ratios = turns.ratios
    return base, ray_ips, time.time() - started


def main() -> None:
    from turns import ratio_line

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="g_width = d_width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=32, help="batches per epoch")
    p.add_argument("--epochs", type=int, default=5, help="the first one is warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    args = p.parse_args()
    data = batches(args.batches, args.batch, args.resolution)
    print(f"DCGAN {args.resolution} px, widths {args.width}, batch {args.batch}, "
          f"{args.batches} batches x {args.epochs} epochs per side, {args.threads} torch thread(s)")
    base, ray_ips, wall = compare(data, args)
    print(f"plain torch gan_step:        {base:8.1f} images/s")
    print(f"Ray Train loop, 1 worker:    {ray_ips:8.1f} images/s  (fit wall time {wall:.0f}s "
          "incl. start-up)")
    print(ratio_line(ray_ips / base, args.ratios))


if __name__ == "__main__":
    main()
