"""What deterministic=true costs the detector's training data: images/s of its train view,
read as the training loop reads it (torch batches through its seeded shuffle buffer),
with the setting against without it, in one run.

Both sides read the same work directory (sample faces as reals, their checkerboarded
copies as fakes, tests/detector_stages.py) through `detector.data.training_views`, with
the JPEG and blur augmentation on at the detector's defaults: the Ray Data work each
epoch repeats. deterministic=true keeps the blocks in order (a block waits for those
before it) and seeds each row's augmentation; the loop's own cost is not in it. The two
sides take epochs in turns, each one's first is warm-up; the median of the epoch pairs'
ratios is quoted.

    python benchmarks/deterministic.py [--images 3000] [--resolution 64] [--epochs 6]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ helpers

from deepfake_ray import config, runtime  # noqa: E402
from deepfake_ray.detector import data  # noqa: E402
from deepfake_ray.training import SHUFFLE_BATCHES  # noqa: E402
from tests.detector_stages import build  # noqa: E402


def epoch(view, batch_size: int, seed: int) -> tuple[int, float]:
    """(images, seconds) of one pass, as detector.loop.batches("train", ...) draws it."""
    started, n = time.perf_counter(), 0
    for batch in view.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
                                         local_shuffle_seed=seed):
        n += len(batch["label"])
    return n, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000, help="reals, and as many fakes")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6, help="the first one is warm-up")
    args = p.parse_args()
    runtime.init()
    with tempfile.TemporaryDirectory(prefix="deterministic-bench-") as workdir:
        build(workdir, args.images, args.resolution)
        sides = {}
        for deterministic in (False, True):
            cfg = config.build("demo", None, [f"deterministic={str(deterministic).lower()}",
                                              "detector.max_train_per_class=0"], workdir=workdir)
            sides[deterministic] = (data.training_views(cfg, data.select(cfg))["train"], cfg.detector.batch_size)
        ratios, totals = [], {False: [0, 0.0], True: [0, 0.0]}
        for e in range(args.epochs):
            timed = {d: epoch(view, size, e) for d, (view, size) in (sides.items() if e % 2 else reversed(sides.items()))}
            if e:
                for d, (n, s) in timed.items():
                    totals[d][0] += n
                    totals[d][1] += s
                ratios.append((timed[True][0] / timed[True][1]) / (timed[False][0] / timed[False][1]))
    rate = {d: n / s for d, (n, s) in totals.items()}
    print(f"{args.images:,} reals and as many fakes at {args.resolution} px, augmentation on, "
          f"{args.epochs - 1} timed epochs each")
    print(f"deterministic=false (baseline): {rate[False]:8.1f} images/s")
    print(f"deterministic=true:             {rate[True]:8.1f} images/s")
    print(f"ratio {statistics.median(ratios):.2f}x (epochs {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
