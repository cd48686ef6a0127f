"""Grouping near copies at Celeb 100k's scale: `near_copies.groups`, which `prepare` runs
on the driver over every image's thumbnail and `generate` over the reals and each
round's candidate fakes, while the cluster's cores wait.

Baseline, in the same run: the same grouping with every hash candidate checked in full
(256 numbers a thumbnail), as before 2026-12-04. `groups` now drops the candidates too
far apart along the thumbnails' 16 principal directions first. A third side checks every
candidate in full with today's gathers (np.take, einsum), to tell the prefilter's share
of the ratio from theirs. Who goes first rotates; all must give the same groups, and the
median ratios are printed.

    python benchmarks/near_copies.py [--images 100000] [--rounds 3]
    python benchmarks/near_copies.py --images 12000 --threads 1,2,4,8,16

`--threads` times `groups` alone with each number of bands checked at once instead (the
baseline there is one thread), to see how the driver's grouping scales with cores, and
where one run's time went; then the same bands checked by as many Ray tasks (processes)
on the in-process Ray, which must find the same groups.

The thumbnails are the built-in `sample` faces' (made here, on all cores: ~2 min for
100,000 on 2), which are more alike than photos, so they make more candidates.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from multiprocessing import Pool
from statistics import median

import numpy as np
import ray
from PIL import Image

from deepfake_ray import runtime
from deepfake_ray.data import near_copies, sample


def face_thumbnail(index: int) -> bytes:
    return near_copies.thumbnail(Image.fromarray(sample.face(2026, index)))


def full_check(units: np.ndarray, near: np.ndarray, pairs: np.ndarray,
               check_pairs: int = near_copies.CHECK_PAIRS) -> np.ndarray:
    """The baseline: every candidate pair's full correlation."""
    return np.concatenate([np.empty((0, 2), np.int64)] + [
        chunk[(units[chunk[:, 0]] * units[chunk[:, 1]]).sum(axis=1) >= near_copies.SIMILAR]
        for chunk in np.split(pairs, range(check_pairs, len(pairs), check_pairs))])


def gathers_only(units: np.ndarray, near: np.ndarray, pairs: np.ndarray,
                 check_pairs: int = near_copies.CHECK_PAIRS) -> np.ndarray:
    """`alike`'s gathers (np.take, einsum) without its principal-direction prefilter: how
    much of the ratio is the prefilter's, and how much the faster gathers'."""
    take, similar = near_copies.take_rows, near_copies.SIMILAR
    return np.concatenate([np.empty((0, 2), np.int64)] + [
        np.compress(np.einsum("ij,ij->i", take(units, chunk[:, 0]), take(units, chunk[:, 1])) >= similar,
                    chunk, axis=0)
        for chunk in np.split(pairs, range(check_pairs, len(pairs), check_pairs))])


def timed_groups(thumbs: list[bytes], check) -> tuple[float, list[list[int]]]:
    kept, near_copies.alike = near_copies.alike, check
    try:
        started = time.perf_counter()
        found = near_copies.groups(thumbs)
        return time.perf_counter() - started, sorted(found)
    finally:
        near_copies.alike = kept


def breakdown(thumbs: list[bytes]) -> str:
    """Seconds of one `groups` in each of its serial steps, timed by wrapping them; the
    rest is mostly the bands, checked on the threads (cProfile cannot follow threads), and
    the little serial work between the steps (ranks, labels, the groups' lists)."""
    steps = ["mirrored", "unit_vectors", "joined", "principal", "band_keys"]
    seconds = dict.fromkeys(steps, 0.0)
    kept = {name: getattr(near_copies, name) for name in steps}

    def timed(name, *args, **kwargs):
        started = time.perf_counter()
        try:
            return kept[name](*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started

    for name in steps:
        setattr(near_copies, name, functools.partial(timed, name))
    try:
        started = time.perf_counter()
        near_copies.groups(thumbs)
        total = time.perf_counter() - started
    finally:
        for name, fn in kept.items():
            setattr(near_copies, name, fn)
    return (", ".join(f"{name} {v:.3f}" for name, v in seconds.items())
            + f", the rest (mostly the bands) {total - sum(seconds.values()):.3f} of {total:.3f} s")


@ray.remote
def check_share(h: near_copies.Hashed, share: np.ndarray, check_pairs: int) -> np.ndarray:
    """One task's bands, in turn, each checked `check_pairs` at a time as on a thread."""
    return np.concatenate([np.empty((0, 2), np.int64)] + [
        near_copies.band_links(h, band, h.label, check_pairs) for band in share])


def on_ray(thumbs: list[bytes], tasks: int) -> tuple[float, list[list[int]]]:
    """`groups` with the bands after the first checked by `tasks` Ray tasks, a share of the
    bands each, where threads check them in `groups`: processes share no GIL nor address
    space, and on a cluster they could run on every node. The inputs go to the object
    store once; tasks on this node read them in place."""
    started = time.perf_counter()
    h = near_copies.hashed(thumbs)
    first = near_copies.in_waves(dataclasses.replace(h, bands=h.bands[:1]), 1)
    ref = ray.put(dataclasses.replace(h, label=first))
    # a task a core of the in-process Ray, which declares more CPUs than the machine's cores
    per_core = ray.cluster_resources()["CPU"] / runtime.machine_cores() if runtime.in_process() else 1
    found = ray.get([check_share.options(num_cpus=per_core).remote(ref, share, near_copies.CHECK_PAIRS // tasks)
                     for share in np.array_split(h.bands[1:], tasks) if len(share)])
    label = near_copies.joined(first, np.concatenate(found))
    return time.perf_counter() - started, sorted(near_copies.members(label, h.n))


def by_threads(thumbs: list[bytes], counts: list[int], rounds: int) -> None:
    """Each count of threads twice: BLAS (the hashing's product) on every core as in
    `prepare`, then on one, in case its idle threads' spinning slows the bands' threads;
    then, once Ray is up (timed after the threads, which ran without it), as Ray tasks."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    kept = near_copies.threads
    try:
        expected = sorted(near_copies.groups(thumbs))  # untimed: the first run's fresh memory
        seconds = {}
        for k in counts:
            near_copies.threads = lambda k=k: k
            for blas in ("all", "1"):
                with threadpool_limits(1, "blas") if blas == "1" else nullcontext():
                    seconds[k, blas] = median(timed_groups(thumbs, near_copies.alike)[0] for _ in range(rounds))
            print(f"  {k:2d} threads: {seconds[k, 'all']:.3f} s, {seconds[counts[0], 'all'] / seconds[k, 'all']:.2f}x "
                  f"of {counts[0]}; BLAS on one thread {seconds[k, '1']:.3f} s; {breakdown(thumbs)}", flush=True)
    finally:
        near_copies.threads = kept
    runtime.init()
    on_ray(thumbs, max(counts))  # untimed: every worker's imports
    for k in counts:
        tasks = [on_ray(thumbs, k) for _ in range(rounds)]
        assert all(found == expected for _, found in tasks), "the tasks changed the groups"
        print(f"  {k:2d} Ray tasks: {median(t for t, _ in tasks):.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", help="comma-separated numbers of threads to time groups() with")
    args = ap.parse_args()
    started = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        thumbs = pool.map(face_thumbnail, range(args.images), chunksize=500)
    print(f"{args.images:,} sample-face thumbnails made in {time.perf_counter() - started:.0f} s")
    if args.threads:
        return by_threads(thumbs, [int(k) for k in args.threads.split(",")], args.rounds)
    ways = {"baseline": full_check, "gathers": gathers_only, "groups": near_copies.alike}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    found: dict[str, list] = {}
    for r in range(args.rounds):
        order = list(ways.items())
        for name, check in order[r % 3:] + order[:r % 3]:  # who goes first rotates
            took, found[name] = timed_groups(thumbs, check)
            seconds[name].append(took)
        assert found["groups"] == found["gathers"] == found["baseline"], "a check changed the groups"
    ratios = [b / g for b, g in zip(seconds["baseline"], seconds["groups"])]
    prefilter = [a / g for a, g in zip(seconds["gathers"], seconds["groups"])]
    expected = found["baseline"]
    print(f"  {len(expected):,} groups, {sum(map(len, expected)):,} images in them (all sides)")
    print(f"  baseline, every candidate in full: {median(seconds['baseline']):5.1f} s")
    print(f"  the same with alike's gathers (np.take, einsum): {median(seconds['gathers']):5.1f} s")
    print(f"  groups, principal directions first: {median(seconds['groups']):5.1f} s")
    print(f"  ratio {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}); the prefilter "
          f"alone {median(prefilter):.2f}x (rounds {min(prefilter):.2f}-{max(prefilter):.2f})")


if __name__ == "__main__":
    main()
