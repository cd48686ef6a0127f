"""Batch scoring throughput: `deepfake-ray score` on Ray Data vs a plain PyTorch script.

    python benchmarks/score.py [--images 1000] [--rounds 3] [--model DIR]

Both score the same folder with the same detector, decoder and batch size
(serve.score_batch_size). `score` reads and decodes in Ray Data tasks, scores in an actor
pool and writes a Parquet table. The baseline is the script a user would write by hand,
run in a process of its own: a torch DataLoader with 2 worker processes decoding
(`predictor.decode_image`), the model in the main process with as many torch threads as
`score`'s actors get (resources.cpus_per_worker), timed from loading the model.

Each run pays a fixed cost (`score`: an actor process importing torch and timm and
loading the model; the script: loading the model and forking its workers) and then a
cost per image. Each round times both on the whole folder and on a quarter of it, so
the difference gives each side's rate once running, and what is left its fixed cost.
Rounds alternate who goes first; figures are medians. Without --model it exports a
randomly initialised Inception-ResNet-v2 (the demo's 64 px images, 80 px input): speed
does not depend on the weights. Images: the UTKFace photos in ../shared/data when
present, else sample faces.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time
from statistics import median_low

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DEEPFAKE_RAY_PROGRESS", "0")

from ingest import link_or_copy, source_folder  # noqa: E402
from serve import export_random_model  # noqa: E402

from deepfake_ray import config, runtime  # noqa: E402
from deepfake_ray.data.sources import find_images  # noqa: E402
from deepfake_ray.serving import score  # noqa: E402


class Files:
    """The baseline's dataset: a path -> the pixels `score` would give the model."""

    def __init__(self, paths: list[str], resolution: int, quality: int | None):
        self.paths, self.resolution, self.quality = paths, resolution, quality

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from deepfake_ray.serving.predictor import decode_image

        with open(self.paths[i], "rb") as f:
            return decode_image(f.read(), self.resolution, quality=self.quality)


def plain_script_seconds(model: str, paths: list[str], batch: int, threads: int) -> float:
    """The hand-written script, from loading the model to the last score."""
    import numpy as np
    import torch

    from deepfake_ray.serving.predictor import Predictor

    started = time.perf_counter()
    predictor = Predictor(model, threads=threads, frozen=False)
    loader = torch.utils.data.DataLoader(Files(paths, predictor.resolution, predictor.quality),
                                         batch_size=batch, num_workers=2, collate_fn=np.stack,
                                         multiprocessing_context="fork")  # as on Linux by default
    scored = sum(len(predictor.predict_pixels(pixels)) for pixels in loader)
    assert scored == len(paths)
    return time.perf_counter() - started


def score_seconds(cfg, model: str, folder: str, out: str, n: int) -> float:
    started = time.perf_counter()
    summary = score.run(cfg, force=True, model=model, input=folder, out=out)
    assert summary["scored"] == n, summary
    return time.perf_counter() - started


def subset(paths: list[str], folder: str) -> str:
    os.makedirs(folder)
    for p in paths:
        link_or_copy(p, os.path.join(folder, os.path.basename(p)))
    return folder


def rate_and_fixed(small: int, large: int, t_small: float, t_large: float) -> tuple[float, float]:
    """Images/s once running, and the seconds a run pays whatever its size."""
    rate = (large - small) / (t_large - t_small)
    return rate, t_large - large / rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="an exported detector folder (default: a random one)")
    args = ap.parse_args()
    spawn = multiprocessing.get_context("spawn")  # the script's process: its own memory and threads
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as script:
        model = args.model or export_random_model(os.path.join(tmp, "model"), 64, 80)
        os.makedirs(made := os.path.join(tmp, "made"))
        paths = list(find_images(source_folder(args.images, made)))[: args.images]
        sizes = {"small": len(paths) // 4, "large": len(paths)}
        folders = {k: subset(paths[:n], os.path.join(tmp, k)) for k, n in sizes.items()}
        runtime.init()
        cfg = config.build("demo", None, [], workdir=os.path.join(tmp, "work"))
        actors = score.pool(cfg)
        threads, batch = actors.threads, cfg.serve.score_batch_size
        out = os.path.join(tmp, "scores.parquet")
        timers = {
            "score": lambda k: score_seconds(cfg, model, folders[k], out, sizes[k]),
            "script": lambda k: script.submit(plain_script_seconds, model, paths[:sizes[k]], batch, threads).result()}
        for timer in timers.values():  # warm-up: imports, caches
            timer("small")
        rounds = []
        for i in range(args.rounds):
            order = list(timers) if i % 2 == 0 else list(reversed(timers))
            rounds.append({(name, k): timers[name](k) for name in order for k in sizes})
    print(f"images: {len(paths)} and {sizes['small']}, {os.cpu_count()} cores; score: {actors.actors} actor(s) "
          f"of {actors.cpus:g} CPUs; the script: 2 DataLoader workers, {threads} torch threads; batch {batch}")
    fits = {name: [rate_and_fixed(sizes["small"], sizes["large"], r[name, "small"], r[name, "large"])
                   for r in rounds] for name in timers}
    for name, what in (("script", "plain PyTorch script"), ("score", "deepfake-ray score (Ray Data)")):
        whole = [r[name, "large"] for r in rounds]
        print(f"{what:30s} {len(paths) / median_low(whole):6.1f} images/s whole run; once running "
              f"{median_low(f[0] for f in fits[name]):6.1f} images/s, fixed {median_low(f[1] for f in fits[name]):5.1f} s")
    whole = sorted(r["script", "large"] / r["score", "large"] for r in rounds)
    running = sorted(s[0] / b[0] for s, b in zip(fits["score"], fits["script"]))
    print(f"ratio score / script, whole run of {len(paths)}: {median_low(whole):.2f}x (range "
          f"{whole[0]:.2f}-{whole[-1]:.2f}); once running: {median_low(running):.2f}x (range "
          f"{running[0]:.2f}-{running[-1]:.2f}; goal >= 0.9)")


if __name__ == "__main__":
    main()
