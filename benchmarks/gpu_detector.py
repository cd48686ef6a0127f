"""Detector fine-tune throughput on one GPU at the study's size (Inception-ResNet-v2, 128 px,
2-way head): fp32 versus bf16 autocast with channels_last, and that plus torch.compile,
extrapolated to one epoch of 59,000 images (29,500 real + 29,500 fake). The study's
Colab T4 took 2.45 minutes per epoch (about 400 images/s); the goal on one H200 is an
epoch in under 15 seconds (about 3,900 images/s).

Measures the same `detector.train_step` (and `detector.to_input` on uint8 pixels of
--resolution px, resized on the GPU to --size where they differ, as the Ray Train loop
does) on batches already on the GPU,
so the figure is the model's ceiling; a Ray Train run adds data loading, which
benchmarks/detector.py shows costs little.

    python benchmarks/gpu_detector.py [--batch 16 256] [--steps 30] [--no-compile]

Batch 16 is the celeb100k preset's per worker (launch-bound on an H200); 256 the
model's ceiling.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from deepfake_ray.config import DetectorConfig
from deepfake_ray.detector.loop import make_optimizer
from deepfake_ray.models import detector
from gpu_gan import has_bf16  # this script's folder is on sys.path when it is run

EPOCH_IMAGES = 59_000
T4_IMAGES_PER_S = EPOCH_IMAGES / (2.45 * 60)
GOAL_SECONDS = 15.0


def measure(batch: int, steps: int, amp: bool, compile_model: bool, size: int, resolution: int) -> float:
    """Images/s of train_step over `steps` steps after a warm-up."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    fmt = torch.channels_last  # as the training loop lays out every CUDA batch, fp32 or bf16
    model = detector.create().to(device, memory_format=fmt)
    pre = detector.preprocessing(model)
    opt = make_optimizer(model, "adamw", 1e-4, DetectorConfig().weight_decay)  # as the loop builds it
    net = torch.compile(model) if compile_model else model
    pixels = torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    dtype = torch.bfloat16 if amp else None

    def one_step():
        x = detector.to_input(pixels, size, pre["mean"], pre["std"]).contiguous(memory_format=fmt)
        detector.train_step(net, opt, x, labels, dtype)

    for _ in range(8 if compile_model else 5):  # warm-up: compilation, cuDNN autotuning, allocator
        one_step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def report(batch: int, name: str, ips: float) -> None:
    epoch = EPOCH_IMAGES / ips
    print(f"batch {batch:4d}  {name:34s} {ips:8.0f} images/s  epoch of {EPOCH_IMAGES:,}: "
          f"{epoch:6.1f}s  ({ips / T4_IMAGES_PER_S:4.1f}x the study's T4)"
          f"{'  goal met' if epoch < GOAL_SECONDS else ''}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=128, help="detector input px (the study: 128)")
    p.add_argument("--resolution", type=int, default=128, help="stored image px before resizing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_detector.py: no CUDA GPU visible (torch.cuda.is_available() is False): run it on "
              "a GPU machine, e.g. a Ray cluster's GPU worker", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Inception-ResNet-v2 "
          f"{args.size} px, 2-way head; study's T4: {T4_IMAGES_PER_S:.0f} images/s, 2.45 min/epoch; "
          f"goal: an epoch under {GOAL_SECONDS:.0f}s")
    bf16 = has_bf16()
    for batch in args.batch:
        fp32 = measure(batch, args.steps, False, False, args.size, args.resolution)
        report(batch, "fp32 (tf32 matmuls) + channels_last", fp32)
        if not bf16:
            continue
        amp = measure(batch, args.steps, True, False, args.size, args.resolution)
        report(batch, "bf16 autocast + channels_last", amp)
        if not args.no_compile:
            try:
                compiled = measure(batch, args.steps, True, True, args.size, args.resolution)
                report(batch, "bf16 + channels_last + compile", compiled)
            except Exception as e:  # noqa: BLE001 - compile support varies by image; report it
                print(f"batch {batch:4d}  torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
        print(f"batch {batch:4d}  bf16 speed-up over fp32: {amp / fp32:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
