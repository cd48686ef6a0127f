"""Grouping near copies at Celeb 100k's scale: `near_copies.groups`, which `prepare` runs
on the driver over every image's thumbnail and `generate` over the reals and each
round's candidate fakes, while the cluster's cores wait.

Baseline, in the same run: the same grouping with every hash candidate checked in full
(256 numbers a thumbnail), as before 2026-12-04. `groups` now drops the candidates too
far apart along the thumbnails' 16 principal directions first. Rounds alternate; both
must give the same groups, and the median ratio is printed.

    python benchmarks/near_copies.py [--images 100000] [--rounds 3]

The thumbnails are the built-in `sample` faces' (made here, on all cores: ~2 min for
100,000 on 2), which are more alike than photos, so they make more candidates.
"""
from __future__ import annotations

import argparse
import os
import time
from multiprocessing import Pool
from statistics import median

import numpy as np
from PIL import Image

from deepfake_ray.data import near_copies, sample


def face_thumbnail(index: int) -> bytes:
    return near_copies.thumbnail(Image.fromarray(sample.face(2026, index)))


def full_check(units: np.ndarray, near: np.ndarray, pairs: np.ndarray,
               check_pairs: int = near_copies.CHECK_PAIRS) -> np.ndarray:
    """The baseline: every candidate pair's full correlation."""
    return np.concatenate([np.empty((0, 2), np.int64)] + [
        chunk[(units[chunk[:, 0]] * units[chunk[:, 1]]).sum(axis=1) >= near_copies.SIMILAR]
        for chunk in np.split(pairs, range(check_pairs, len(pairs), check_pairs))])


def timed_groups(thumbs: list[bytes], check) -> tuple[float, list[list[int]]]:
    kept, near_copies.alike = near_copies.alike, check
    try:
        started = time.perf_counter()
        found = near_copies.groups(thumbs)
        return time.perf_counter() - started, sorted(found)
    finally:
        near_copies.alike = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    started = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        thumbs = pool.map(face_thumbnail, range(args.images), chunksize=500)
    print(f"{args.images:,} sample-face thumbnails made in {time.perf_counter() - started:.0f} s")
    seconds: dict[str, list[float]] = {"baseline": [], "groups": []}
    for r in range(args.rounds):
        order = [("baseline", full_check), ("groups", near_copies.alike)]
        for name, check in order if r % 2 == 0 else order[::-1]:
            took, found = timed_groups(thumbs, check)
            seconds[name].append(took)
            if name == "baseline":
                expected = found
            else:
                answer = found
        assert answer == expected, "the prefiltered check changed the groups"
    ratios = [b / g for b, g in zip(seconds["baseline"], seconds["groups"])]
    print(f"  {len(expected):,} groups, {sum(map(len, expected)):,} images in them (both sides)")
    print(f"  baseline, every candidate in full: {median(seconds['baseline']):5.1f} s")
    print(f"  groups, principal directions first: {median(seconds['groups']):5.1f} s")
    print(f"  ratio {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
