"""`score` keeping parts against scoring in one: what resumability costs a run.

    python benchmarks/score_parts.py [--images 1200] [--parts 6] [--rounds 3] [--model DIR]

A stopped `score` resumes from the parts it finished, so it keeps one every
serve.score_part_files files (100,000). Here the same folder is scored with parts of
images/parts files and as one part; the baseline is the one-part run, timed in the same
run, rounds alternating who goes first; the ratio is its time over the parted run's (1.0:
parts cost nothing). Until 2026-12-07 each part was a Ray Data run of its own, starting
an actor pool for each: a process importing torch and timm and loading the model, and
each part's last batches leaving the pool idle. Without --model it exports a randomly
initialised Inception-ResNet-v2 (the demo's 64 px images, 80 px input).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from statistics import median_low

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DEEPFAKE_RAY_PROGRESS", "0")

from ingest import source_folder  # noqa: E402
from score import subset  # noqa: E402
from serve import export_random_model  # noqa: E402

from deepfake_ray import config, runtime  # noqa: E402
from deepfake_ray.data.sources import find_images  # noqa: E402
from deepfake_ray.serving import score  # noqa: E402


def score_seconds(model: str, folder: str, out: str, n: int, part_files: int) -> float:
    cfg = config.build("demo", None, [f"serve.score_part_files={part_files}"], workdir=os.path.dirname(out))
    started = time.perf_counter()
    summary = score.run(cfg, force=True, model=model, input=folder, out=out)
    assert summary["scored"] == n, summary
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="an exported detector folder (default: a random one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or export_random_model(os.path.join(tmp, "model"), 64, 80)
        os.makedirs(made := os.path.join(tmp, "made"))
        paths = list(find_images(source_folder(args.images, made)))[: args.images]
        folder = subset(paths, os.path.join(tmp, "in"))
        n = len(paths)
        part_files = {"parts": -(-n // args.parts), "one part": n}
        runtime.init()
        out = os.path.join(tmp, "scores.parquet")
        score_seconds(model, folder, out, n, n)  # warm-up: imports, caches
        rounds = []
        for i in range(args.rounds):
            order = list(part_files) if i % 2 == 0 else list(reversed(part_files))
            rounds.append({k: score_seconds(model, folder, out, n, part_files[k]) for k in order})
    ratios = sorted(r["one part"] / r["parts"] for r in rounds)
    print(f"images: {n}, {os.cpu_count()} cores; parts of {part_files['parts']} files ({args.parts}) against one")
    for k in part_files:
        print(f"{k:9s} {n / median_low(r[k] for r in rounds):6.1f} images/s (median of {args.rounds})")
    print(f"ratio one part / {args.parts} parts: {median_low(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}; "
          "1.0: parts cost nothing)")


if __name__ == "__main__":
    main()
