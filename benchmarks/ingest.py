"""Ingest throughput: `prepare` on Ray Data vs a torch DataLoader doing the same decode.

Baselines (same run, same files): torch.utils.data.DataLoader with 2 worker processes
running (a) the very same per-file work as `prepare` (`decode.inspect`: sha1, header
checks, decode, centre crop, resize, JPEG re-encode, thumbnail), the headline, and (b)
the issue's baseline as written, the same PIL decode and resize only (`decode.decode`).
All are timed from the folder's name, so all list it; only `prepare` also dedupes, finds
near copies and writes Parquet. Ray is started before timing. The DataLoaders run in a
process of their own, as a user's would: forked from the process that times `prepare`,
their workers leave its memory copy-on-write, and the next `prepare`'s grouping on the
driver pays a page fault for each page it writes (the likely cause of a 16-core grouping
of 0.95 s instead of 0.3-0.4 in the scaling step, right after the DataLoaders of many workers).

    python benchmarks/ingest.py [--images 3000] [--source DIR] [--rounds 7]

The machine's speed drifts within a run, so each round times all three back to back
(who goes first rotates) and each figure is the median of the rounds' ratios.
Then it times `prepare` and (a) on 1, 2, 4, ... of this machine's cores (`prepare` with
one decode task per core, via resources.data_cpus; the DataLoader with as many workers)
and prints how each scales with cores. It also times (a)'s and (b)'s work per photo on
one core in-process, to show how much less work (b) does.

Defaults to the UTKFace photos in ../shared/data when present (200x200 JPEGs), else
writes sample faces (128x128 JPEGs) to a temporary folder.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import shutil
import tempfile
import time
from statistics import median_low

import ray.data
import torch

from deepfake_ray import config, runtime
from deepfake_ray.data import decode, prepare, sample
from deepfake_ray.data.sources import find_images

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "utkface_crop_part1_5k")


def all_of_prepares_work(data: bytes, size: int, quality: int):
    """What `prepare` does per file: sha1, header checks, decode, crop, resize, JPEG."""
    row = decode.inspect(data, size, quality)
    return row["sha1"], row["reason"]


def decode_and_resize(data: bytes, size: int, quality: int):
    """The issue's baseline as written: the same PIL decode and resize, nothing else."""
    try:
        return decode.decode(data, size).shape
    except decode.DecodeError:
        return None


BASELINES = {"torch": (all_of_prepares_work, "doing all of prepare's per-file work"),
             "torch-decode": (decode_and_resize, "doing the same decode and resize only (the issue's baseline)")}


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, size, quality, work):
        self.paths, self.size, self.quality, self.work = paths, size, quality, work

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return self.work(f.read(), self.size, self.quality)


BASELINE_PROCESS: concurrent.futures.Executor | None = None  # where the DataLoaders run, see above


def in_baseline_process(fn, *args, **kwargs):
    return BASELINE_PROCESS.submit(fn, *args, **kwargs).result()


def dataloader_rate(folder, n, size, quality, workers: int = 2, work=all_of_prepares_work) -> float:
    """Timed like `prepare`, from the folder's name: finding the files is part of the job."""
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(Files(find_images(folder), size, quality, work), batch_size=64,
                                         num_workers=workers, collate_fn=lambda rows: rows,
                                         multiprocessing_context="fork")  # as on Linux by default, said outright
    assert sum(len(batch) for batch in loader) == n
    return n / (time.perf_counter() - started)


PHASES: dict[str, list[dict]] = {}  # each run's summary["phases"], by what was timed


def ray_rate(folder, n, size, workdir, overrides=(), label="all cores") -> float:
    cfg = config.build("demo", None, [f"data.source={folder}", f"data.resolution={size}",
                                      *overrides], workdir=workdir)
    started = time.perf_counter()
    summary = prepare.run(cfg, force=True)
    assert summary["images"] + summary["rejected"] == n
    PHASES.setdefault(label, []).append(summary["phases"])
    return n / (time.perf_counter() - started)


def phases_line(label: str) -> str:
    """Seconds of each phase of `prepare` (ingest on every core, then the driver) in the
    median run, and in the slowest: medians taken phase by phase could mix runs."""
    runs = sorted(PHASES[label], key=lambda r: sum(r.values()))
    median, slowest = runs[(len(runs) - 1) // 2], runs[-1]
    return (", ".join(f"{name} {v:.2f}" for name, v in median.items())
            + " (slowest run: " + ", ".join(f"{v:.2f}" for v in slowest.values()) + ")")


def core_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to and including all of this machine's cores."""
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return counts + [cores] if cores > 1 else counts


def scaling(folder, n, size, workdir, runs: int = 3) -> dict[int, tuple[float, float]]:
    """Median images/s on k cores, for each k: `prepare` with one decode task per core (a
    task takes cores/k CPUs of the in-process Ray, which runs one task per core), and the
    DataLoader with k workers."""
    cores = os.cpu_count() or 1
    rates = {}
    for k in core_counts(cores):
        pairs = [(ray_rate(folder, n, size, os.path.join(workdir, f"cores{k}-{i}"),
                           [f"resources.data_cpus={cores / k}"], label=f"{k} cores"),
                  in_baseline_process(dataloader_rate, folder, n, size, 95, workers=k)) for i in range(runs)]
        rates[k] = (median_low(r for r, _ in pairs), median_low(t for _, t in pairs))
    return rates


def per_photo_us(paths: list[str], size: int, work, photos: int = 300, runs: int = 3) -> float:
    """Microseconds of one core per photo for `work`, in this process (best of `runs`)."""
    datas = []
    for p in paths[:photos]:
        with open(p, "rb") as f:
            datas.append(f.read())
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for data in datas:
            work(data, size, 95)
        best = min(best, (time.perf_counter() - started) / len(datas))
    return best * 1e6


def noop(batch: dict) -> dict:
    return batch


def ray_data_floor(tasks: int = 2, runs: int = 5) -> float:
    """Seconds Ray Data itself takes to run a map that does nothing over `tasks` blocks
    (planning, the executor's start, dispatch, handing back the result): the fixed cost
    every `prepare` pays on top of its decoding."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        ds = ray.data.from_items([{"x": i} for i in range(tasks)], override_num_blocks=tasks)
        prepare.collect_rows(ds.map_batches(noop, batch_size=None), expected=tasks)  # as prepare does
        times.append(time.perf_counter() - started)
    return median_low(times)


def write_faces(folder: str, indices: range) -> None:
    for i in indices:
        with open(os.path.join(folder, f"face_{i:05d}.jpg"), "wb") as f:
            f.write(sample.face_jpeg(1, i))


def source_folder(n: int, tmp: str) -> str:
    if os.path.isdir(SHARED):
        return os.path.abspath(SHARED)
    faces = os.path.join(tmp, "faces")  # apart from the runs' work directories, also in tmp
    os.makedirs(faces)
    cores = os.cpu_count() or 1  # ~3 ms a face: 16,000 on one core would take a minute
    with concurrent.futures.ProcessPoolExecutor(cores) as pool:
        list(pool.map(functools.partial(write_faces, faces), [range(k, n, cores) for k in range(cores)]))
    return faces


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--source", help="folder of images (default: shared UTKFace or sample faces)")
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds (median ratio)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for prepare, e.g. resources.data_cpus=2")
    args = ap.parse_args()
    os.environ.setdefault("DEEPFAKE_RAY_PROGRESS", "0")
    global BASELINE_PROCESS
    spawn = multiprocessing.get_context("spawn")  # not a fork of this process: its memory stays its own
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as BASELINE_PROCESS:
        folder = args.source or source_folder(args.images, tmp)
        paths = list(find_images(folder))[: args.images]
        if len(paths) < len(find_images(folder)):  # use exactly --images files
            folder = os.path.join(tmp, "subset")
            os.makedirs(folder)
            for p in paths:  # real files, as a user's folder holds: symlinks cost a stat each
                link_or_copy(p, os.path.join(folder, os.path.basename(p)))
        runtime.init()
        ray_rate(folder, len(paths), args.size, os.path.join(tmp, "warmup"), args.overrides, label="warm-up")
        in_baseline_process(dataloader_rate, folder, len(paths), args.size, 95)  # its imports, its warm-up
        rounds = []
        for i in range(args.rounds):  # who goes first rotates: drift favours none
            timers = {"ray": lambda: ray_rate(folder, len(paths), args.size,
                                              os.path.join(tmp, f"work{i}"), args.overrides),
                      **{name: functools.partial(in_baseline_process, dataloader_rate, folder, len(paths),
                                                 args.size, 95, work=work) for name, (work, _) in BASELINES.items()}}
            order = list(timers)[i % len(timers):] + list(timers)[:i % len(timers)]
            rounds.append({name: timers[name]() for name in order})
        floor = ray_data_floor()
        work_us = {name: per_photo_us(paths, args.size, work) for name, (work, _) in BASELINES.items()}
        by_cores = scaling(folder, len(paths), args.size, tmp)
    print(f"images: {len(paths)} from {folder} -> {args.size}px, {os.cpu_count()} cores")
    print("rounds, Ray Data prepare vs torch DataLoader (2 workers), images/s: "
          + "; ".join(f"{r['ray']:.0f} vs {r['torch']:.0f}" for r in rounds))
    median_of = {name: median_low(r[name] for r in rounds) for name in rounds[0]}
    print(f"baseline torch DataLoader (2 workers): {median_of['torch']:8.1f} images/s (median)")
    print(f"deepfake-ray prepare (Ray Data):       {median_of['ray']:8.1f} images/s (median)")
    print(f"Ray Data's own cost per run (a map that does nothing, 2 blocks): {floor * 1000:.0f} ms, "
          f"{floor * median_of['ray'] / len(paths):.0%} of a prepare here")
    for name, (_, what) in BASELINES.items():
        ratios = sorted(r["ray"] / r[name] for r in rounds)
        print(f"ratio Ray / DataLoader {what}: {median_low(ratios):.2f}x (median of {len(ratios)} "
              f"rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f}; goal >= 1.0)")
    full, decode_only = work_us["torch"], work_us["torch-decode"]
    print(f"per photo on one core, in this process: prepare's per-file work {full:.0f} us, decode and "
          f"resize only {decode_only:.0f} us ({decode_only / full:.2f} of it): what (b) leaves out")
    print("by cores used, images/s (median of 3), prepare vs DataLoader with as many workers: "
          + "; ".join(f"{k}: {r:.0f} vs {t:.0f}" for k, (r, t) in by_cores.items()))
    print("phases of prepare, seconds in the median run: ingest (listing, then every core), then the driver's near_copies and rest: "
          + "; ".join(f"{label}: {phases_line(label)}" for label in PHASES if label != "warm-up"))
    (ray_1, torch_1), (ray_all, torch_all) = by_cores[1], by_cores[max(by_cores)]
    print(f"scaling from 1 to {max(by_cores)} cores: prepare {ray_all / ray_1:.2f}x, "
          f"DataLoader {torch_all / torch_1:.2f}x")


if __name__ == "__main__":
    main()
