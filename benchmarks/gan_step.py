"""What Ray Train costs the DCGAN: training images/s of a one-worker Ray Train loop versus
the same plain-torch `gan_step` calls on the same in-memory batches, in one run.

Both sides train the same models (same seed) on the same uint8 batches for the same
number of epochs with the same number of torch threads; the Ray side streams them
from a Ray Data dataset shard and reports once per epoch, as deepfake_ray.gan.loop does.
Throughput is measured inside each loop and excludes the first (warm-up) epoch; the
Ray side's start-up time is printed separately. The plain side runs before and
after the Ray side and is averaged, since a shared machine's load drifts. Goal: ratio >= 0.9.

    python benchmarks/gan_step.py [--resolution 64] [--width 32] [--batch 64] [--batches 8]
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


def batches(n: int, size: int, resolution: int) -> list[np.ndarray]:
    faces = np.stack([face(0, i, resolution) for i in range(n * size)])
    return [faces[i * size:(i + 1) * size] for i in range(n)]


def models(args):
    torch.manual_seed(0)
    G, D = dcgan.build(args.resolution, 100, args.width, args.width)
    return (G, D, *dcgan.optimizers(G, D))


def plain(data: list[np.ndarray], args) -> float:
    """Images/s of bare torch over the in-memory batches (epochs after the first)."""
    torch.set_num_threads(args.threads)
    G, D, opt_g, opt_d = models(args)
    gen = torch.Generator().manual_seed(0)
    images, seconds = 0, 0.0
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for pixels in data:
            z = torch.randn(len(pixels), 100, generator=gen)
            dcgan.gan_step(G, D, opt_g, opt_d, to_unit_range(pixels), z)
        if epoch:
            images, seconds = images + sum(map(len, data)), seconds + time.perf_counter() - started
    return images / seconds


def ray_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    torch.set_num_threads(args.threads)
    G, D, opt_g, opt_d = models(args)
    G, D = ray.train.torch.prepare_model(G), ray.train.torch.prepare_model(D)
    shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(0)
    images, seconds = 0, 0.0
    for epoch in range(args.epochs):
        started, n = time.perf_counter(), 0
        for batch in shard.iter_batches(batch_size=args.batch, batch_format="numpy",
                                        drop_last=True, prefetch_batches=2):
            z = torch.randn(len(batch["data"]), 100, generator=gen)
            dcgan.gan_step(G, D, opt_g, opt_d, to_unit_range(batch["data"]), z)
            n += len(batch["data"])
        if epoch:
            images, seconds = images + n, seconds + time.perf_counter() - started
        ray.train.report({"epoch": epoch, "images": images, "seconds": seconds})


def with_ray(data: list[np.ndarray], args) -> tuple[float, float]:
    """(images/s inside the Ray Train loop, wall seconds of the whole fit)."""
    import ray
    import ray.data

    from deepfake_ray import config, runtime, training

    runtime.init()
    ds = ray.data.from_numpy(np.concatenate(data)).materialize()
    cfg = config.build("demo", None, ["resources.workers=1",
                                      f"resources.cpus_per_worker={args.threads}"])
    started = time.time()
    with tempfile.TemporaryDirectory() as storage:
        result = training.fit(ray_loop, vars(args), cfg, storage, "bench", datasets={"train": ds})
    m = result.metrics
    return m["images"] / m["seconds"], time.time() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="g_width = d_width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches per epoch")
    p.add_argument("--epochs", type=int, default=3, help="the first one is warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    args = p.parse_args()
    data = batches(args.batches, args.batch, args.resolution)
    print(f"DCGAN {args.resolution} px, widths {args.width}, batch {args.batch}, "
          f"{args.batches} batches x {args.epochs} epochs, {args.threads} torch thread(s)")
    before = plain(data, args)
    ray_ips, wall = with_ray(data, args)
    after = plain(data, args)  # before and after: a shared machine's load drifts
    base = (before + after) / 2
    print(f"plain torch gan_step:        {base:8.1f} images/s  (before {before:.1f}, after {after:.1f})")
    print(f"Ray Train loop, 1 worker:    {ray_ips:8.1f} images/s  (fit wall time {wall:.0f}s "
          "incl. start-up)")
    print(f"ratio Ray / plain:           {ray_ips / base:8.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
