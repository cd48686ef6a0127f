"""DCGAN training throughput on one GPU at the study's size (128 px, latent 100, widths 64),
fp32 versus bfloat16 mixed precision with channels_last, extrapolated to one epoch
of 100,000 images. The study's Colab T4 took 47 minutes per epoch (about 35 images/s);
the goal on one H200 is an epoch in under a minute (about 1,700 images/s).

Measures the same `dcgan.gan_step` the Ray Train loop calls, on in-memory batches
already on the GPU, so the figure is the model's ceiling; a Ray Train run adds data
loading, which benchmarks/gan_step.py shows costs little.

    python benchmarks/gpu_gan.py [--batch 16 256] [--steps 50]  (16: the celeb100k preset's per worker)
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from deepfake_ray.models import autocast_dtype, dcgan

T4_IMAGES_PER_S = 100_000 / (47 * 60)  # the study: 47 minutes per 100k-image epoch
EPOCH_IMAGES = 100_000


def measure(batch: int, steps: int, amp: bool, resolution: int) -> float:
    """Images/s of gan_step over `steps` steps after a warm-up."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    G, D = dcgan.build(resolution, 100, 64, 64)
    fmt = torch.channels_last if amp else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)
    opt_g, opt_d = dcgan.optimizers(G, D)
    real = (torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1)
    real = real.contiguous(memory_format=fmt)
    dtype = torch.bfloat16 if amp else None
    for _ in range(5):  # warm-up: cuDNN autotuning, allocator
        dcgan.gan_step(G, D, opt_g, opt_d, real, torch.randn(batch, 100, device=device), dtype)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        dcgan.gan_step(G, D, opt_g, opt_d, real, torch.randn(batch, 100, device=device), dtype)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def has_bf16() -> bool:
    """Whether training here runs in bf16 (models.autocast_dtype): a GPU before compute
    capability 8.0 (the study's T4) has no bf16 convolutions, so it trains in fp32."""
    if autocast_dtype(torch.device("cuda")) is None:
        print(f"{torch.cuda.get_device_name()} has no bf16 convolutions: deepfake-ray trains in "
              "fp32 here, so only fp32 is timed")
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_gan.py: no CUDA GPU visible (torch.cuda.is_available() is False): run it on a "
              "GPU machine, e.g. a Ray cluster's GPU worker", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, DCGAN {args.resolution} px, "
          f"widths 64, latent 100; study's T4: {T4_IMAGES_PER_S:.0f} images/s, 47 min/epoch")
    bf16 = has_bf16()
    for batch in args.batch:
        fp32 = measure(batch, args.steps, amp=False, resolution=args.resolution)
        amp = measure(batch, args.steps, amp=True, resolution=args.resolution) if bf16 else None
        for name, ips in (("fp32", fp32), ("bf16 + channels_last", amp)):
            if ips is None:
                continue
            print(f"batch {batch:4d}  {name:22s} {ips:9.0f} images/s  "
                  f"epoch of {EPOCH_IMAGES:,}: {EPOCH_IMAGES / ips:6.1f}s  "
                  f"({ips / T4_IMAGES_PER_S:5.0f}x the study's T4)")
        if amp:
            print(f"batch {batch:4d}  mixed precision speed-up: {amp / fp32:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
