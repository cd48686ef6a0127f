"""Detector throughput at 128 px: plain torch training and inference images/s, and what Ray
Train costs: a one-worker Ray Train loop versus plain torch on the same batches, in one run.

Both training sides run the same Inception-ResNet-v2 (same seed) through the same
`detector.train_step` on the same uint8 batches with the same number of torch
threads; the Ray side streams them from a Ray Data shard as torch batches through the
local shuffle buffer deepfake_ray.detector.loop uses, and reports once per epoch, as it does. The two sides take epochs in turns (a shared
machine's load drifts), run at the same niceness (Ray nices its workers to 15, which
on a busy machine alone costs them CPU) and each side's first epoch is warm-up.
Inference is measured after, at that niceness too. Goal: ratio >= 0.9.

    python benchmarks/detector.py [--size 128] [--batch 8] [--batches 24] [--epochs 6] [--threads 2]
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

from deepfake_ray.data.sample import face  # noqa: E402
from deepfake_ray.models import detector  # noqa: E402
from deepfake_ray.training import SHUFFLE_BATCHES  # noqa: E402


def batches(n: int, size: int, resolution: int) -> list[dict]:
    faces = np.stack([face(0, i, resolution) for i in range(n * size)])
    labels = np.arange(n * size) % 2
    return [{"pixels": faces[i * size:(i + 1) * size], "label": labels[i * size:(i + 1) * size]}
            for i in range(n)]


def model_and_optimizer(threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = detector.create()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model, opt, pixels, labels, size: int) -> None:
    x = detector.to_input(torch.as_tensor(pixels), size, [0.5] * 3, [0.5] * 3)
    detector.train_step(model, opt, x, torch.as_tensor(labels, dtype=torch.int64))


def plain_epoch(model, opt, data: list[dict], args) -> tuple[int, float]:
    started = time.perf_counter()
    for b in data:
        step(model, opt, b["pixels"], b["label"], args.size)
    return sum(len(b["label"]) for b in data), time.perf_counter() - started


def inference(data: list[dict], args) -> float:
    model, _ = model_and_optimizer(args.threads)
    model.eval()
    pixels = np.concatenate([b["pixels"] for b in data])
    x = detector.to_input(torch.as_tensor(pixels[:args.batch]), args.size, [0.5] * 3, [0.5] * 3)
    detector.predict(model, x)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(pixels), args.batch):
        x = detector.to_input(torch.as_tensor(pixels[i:i + args.batch]), args.size, [0.5] * 3, [0.5] * 3)
        detector.predict(model, x)
    return len(pixels) / (time.perf_counter() - started)


def ray_loop(config: dict) -> None:
    """The Ray side: waits for its turn each epoch, trains on its shard, hands back (n, s)."""
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    model, opt = model_and_optimizer(args.threads)
    model = ray.train.torch.prepare_model(model)
    model.train()
    shard = ray.train.get_dataset_shard("train")
    args.to_driver.put(os.nice(0))  # Ray runs workers niced (RAY_worker_niceness, 15)
    for epoch in range(args.epochs):
        args.to_ray.get()
        started, n = time.perf_counter(), 0
        # as detector.loop.batches("train", ...) draws them
        for b in shard.iter_torch_batches(batch_size=args.batch, local_shuffle_buffer_size=SHUFFLE_BATCHES * args.batch,
                                          local_shuffle_seed=epoch):
            step(model, opt, b["pixels"], b["label"], args.size)
            n += len(b["label"])
        ray.train.report({"epoch": epoch, "images": n})
        args.to_driver.put((n, time.perf_counter() - started))


def compare(data: list[dict], args) -> tuple[float, float, float]:
    """(plain images/s, Ray images/s, Ray fit wall seconds); the sides take epochs in turns
    so a shared machine's drifting load hits both alike; each side's first epoch is warm-up."""
    import ray.data

    from deepfake_ray import config, runtime, training
    from turns import Turns

    runtime.init()
    ds = ray.data.from_items([{"pixels": p, "label": int(y)} for b in data
                              for p, y in zip(b["pixels"], b["label"])]).materialize()
    cfg = config.build("demo", None, ["resources.workers=1", f"resources.cpus_per_worker={args.threads}"])
    turns, started = Turns(), time.time()
    with tempfile.TemporaryDirectory(prefix="detector-bench-") as storage:
        turns.start(lambda: training.fit(ray_loop, turns.loop_config(args), cfg, storage, "bench",
                                         datasets=lambda: {"train": ds}))
        worker_nice = turns.receive()  # the Ray loop's first message
        # the same niceness on both sides: on a shared machine a niced process gets less CPU
        os.nice(max(0, worker_nice - os.nice(0)))
        print(f"both sides at niceness {os.nice(0)} (Ray's worker niceness)")
        model, opt = model_and_optimizer(args.threads)
        model.train()
        base, ray_ips = turns.compare(args.epochs, lambda: plain_epoch(model, opt, data, args))
    args.ratios = turns.ratios
    return base, ray_ips, time.time() - started


def main() -> None:
    from turns import ratio_line

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="detector input px")
    p.add_argument("--resolution", type=int, default=64, help="image px before resizing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=24, help="batches per epoch")
    p.add_argument("--epochs", type=int, default=6, help="the first one is warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    args = p.parse_args()
    data = batches(args.batches, args.batch, args.resolution)
    print(f"Inception-ResNet-v2 at {args.size} px, batch {args.batch}, {args.batches} batches x "
          f"{args.epochs} epochs, {args.threads} torch thread(s)")
    # inference after: torch's threads, made at its first use, keep the niceness they were
    # made at (os.nice is the calling thread's), and compare gives both sides Ray's
    base, ray_ips, wall = compare(data, args)
    infer = inference(data, args)
    print(f"plain torch inference:       {infer:8.2f} images/s")
    print(f"plain torch train_step:      {base:8.2f} images/s")
    print(f"Ray Train loop, 1 worker:    {ray_ips:8.2f} images/s  (fit wall time {wall:.0f}s incl. start-up)")
    print(ratio_line(ray_ips / base, args.ratios))


if __name__ == "__main__":
    main()
