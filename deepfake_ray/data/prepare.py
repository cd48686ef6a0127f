"""`deepfake-ray prepare`: ingest a face dataset into WORKDIR/data with Ray Data.

One pass over the data: each Ray Data task reads a block of files (in parallel
over the cluster), checks and decodes them with our robust decoder, and writes the
usable ones, normalized once (square, data.resolution, JPEG at data.jpeg_quality),
to data/images/PART.parquet, which every later stage reads, so reals and fakes are
encoded alike. Only metadata returns to the driver, which deduplicates and writes
manifest.parquet (usable images with their split) and rejected.parquet (with the
reason): every file found lands in exactly one of the two.

On one machine (the in-process Ray) one task runs per core, and a task that ends early
takes over the tails of the blocks still running (`shared_chunks`); on a cluster the
blocks are static, two rounds per CPU. On one machine, too, a task leaves an image that
a task ending before it holds to that one's part (`leave_out_held`), so the driver has
no part to rewrite; on a cluster it removes copies across parts after the last task.
A file whose decoding kills its worker is set aside (`crashes`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

import deepfake_ray
from deepfake_ray import lineage, progress, runtime, storage
from deepfake_ray.config import Config, DataConfig
from deepfake_ray.data import crashes, datasets, decode, kaggle_source, near_copies, sample, sources
from deepfake_ray.data.sources import Source, check_source, resolve_source
from deepfake_ray.errors import UsageError, warn
from deepfake_ray.progress import Progress

MIN_FILES_PER_TASK, MAX_FILES_PER_TASK = 64, 2048
CHUNK_FILES = 32  # what one task can take over from another: ~30 ms of decoding
TEXT, COUNT = pa.large_string(), pa.int64()  # the types Ray Data writes for the fakes
# near_copy_of: the path of the picture whose split a near copy takes (`near_copies`), else "";
# history: the source's own JPEG encoding its stored pixels carry (decode.jpeg_history), a
# fake's: the one it was given, else ""
MANIFEST_SCHEMA = pa.schema([("path", TEXT), ("width", COUNT), ("height", COUNT), ("format", TEXT),
                             ("sha1", TEXT), ("bytes", COUNT), ("split", TEXT), ("near_copy_of", TEXT),
                             ("history", TEXT)])
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
REJECTED_SCHEMA = pa.schema([("path", TEXT), ("reason", TEXT), ("detail", TEXT), ("sha1", TEXT),
                             ("bytes", COUNT)])
# what each task returns to the driver: every file's row, the part holding its image and
# the image's thumbnail, which finds its near copies
ROW_SCHEMA = pa.schema([*MANIFEST_SCHEMA, ("reason", TEXT), ("detail", TEXT), ("part", TEXT),
                        ("thumb", pa.binary())])


def assign_split(sha1: str, splits: tuple[float, ...]) -> str:
    """Split from the stored image's hash: stable across reruns, one split per picture."""
    u = int(sha1[:12], 16) / float(16 ** 12)
    total, edge = sum(splits), 0.0
    for name, fraction in zip(datasets.SPLITS, splits):  # plain floats: once per image
        edge += fraction
        if u < edge / total:
            return name
    return datasets.SPLITS[len(splits) - 1]


# source kind -> (the data setting a bare `KIND` source reads, what `KIND:NAME` names instead)
OWN_SETTING = {"sample": ("sample_size", "count"), "kaggle": ("kaggle_dataset", "dataset")}


def check_settings(cfg: Config) -> None:
    """What config.check_limits cannot check alone (run before Ray starts)."""
    d = cfg.data
    if len(d.splits) != 3 or min(d.splits) < 0 or not 0 < sum(d.splits) < math.inf or d.splits[0] <= 0:
        raise UsageError(f"data.splits={list(d.splits)} must be three non-negative fractions "
                         "(train > 0), e.g. --set 'data.splits=[0.8,0.1,0.1]'")
    if abs(sum(d.splits) - 1) > 1e-3:  # [0.8,0.1,0.2] is a typo: as weights it shrinks train
        raise UsageError(f"data.splits={list(d.splits)} sums to {sum(d.splits):.6g}, not 1: give each "
                         "split's fraction of the images, e.g. --set 'data.splits=[0.8,0.1,0.1]'")
    source = sources.as_given(d.source)
    if not source:  # said before a complete data/ compares it with the source it was made from
        raise UsageError(f"no source given: pass --source (or data.source) as {sources.FORMS}")
    kind = sources.kind(source)
    if kind in OWN_SETTING and source.partition(":")[2]:  # a setting the source's name overrides
        key, what = OWN_SETTING[kind]
        value, default = getattr(d, key), getattr(DataConfig, key)
        if value != default and str(value) != source.partition(":")[2]:
            raise UsageError(f"data.{key}={value} (from the preset, --config or --set) is not "
                             f"used: data.source={source} names its own {what}; pass --set "
                             f"data.source={kind}:{value} instead, or data.source={kind}")


def candidates(src: Source, seed: int) -> list[str]:
    """Every file to ingest; `sample:SEED:I` names the I-th generated face."""
    if src.sample_count:
        return [f"sample:{seed}:{i:07d}" for i in range(src.sample_count)]
    return list(src.files)


def fetch(uri: str, max_bytes: int) -> bytes:
    if uri.startswith("sample:"):
        _, seed, index = uri.split(":")
        return sample.face_jpeg(int(seed), int(index))
    return storage.read_bytes(uri, max_bytes)


Fetched = bytes | OSError | storage.FileTooLarge


def fetch_all(paths: list[str], max_bytes: int) -> list[Fetched]:
    """Bytes per path, or the error for a file that vanished, cannot be read, or is larger
    than any image can be."""
    def one(uri: str):
        try:
            return fetch(uri, max_bytes)
        except storage.FileTooLarge as e:
            return e
        except OSError as e:  # that file's own: gone, no permission, not a regular file
            storage.raise_store_failure(uri, e)
            return e
    if paths and storage.is_s3(paths[0]):
        with ThreadPoolExecutor(16) as pool:  # S3 GETs are latency-bound: overlap them
            return list(pool.map(one, paths))
    return [one(p) for p in paths]


def part_name(paths) -> str:
    """Named by its files, so a retried task overwrites its own part instead of adding one."""
    return "part-" + decode.sha1(os.fsencode("\n".join(paths)))[:16] + ".parquet"


def inspect_fetched(data: Fetched, size: int, quality: int, max_pixels: int) -> dict:
    """decode.inspect's row for fetched bytes; a file not read is a rejected row too."""
    if isinstance(data, bytes):
        return decode.inspect(data, size, quality, max_pixels)
    unread = {**decode.inspect(b"", size, quality), "sha1": ""}  # no bytes read: none to hash
    if isinstance(data, storage.FileTooLarge):
        refused = decode.too_large(data)
        return {**unread, "bytes": data.size, "reason": refused.reason, "detail": str(refused)}
    said = str(data) if isinstance(data, sources.UnreadBefore) else f"{type(data).__name__}: {data}"
    detail = storage.printable(f"unreadable: {said[:200]}")  # it may name the file
    return {**unread, "reason": "unreadable", "detail": detail}


def file_row(path: str, data: Fetched, size: int, quality: int, max_pixels: int) -> dict:
    """One file's row, before its image has a part and a split."""
    return {**inspect_fetched(data, size, quality, max_pixels), "path": storage.printable(path),
            "part": "", "split": "", "near_copy_of": ""}


def chunks_of(paths: list[str]) -> list[list[str]]:
    return [paths[i:i + CHUNK_FILES] for i in range(0, len(paths), CHUNK_FILES)]


def claim(claims: str, block: int, chunk: int, task: int) -> bool:
    """Whether the task of block `task` ingests this chunk: the first task to create its
    claim does (a symlink: created atomically, and it names its task). A retried task
    redoes the chunks its lost attempt claimed."""
    link = os.path.join(claims, f"{block}.{chunk}")
    try:
        os.symlink(str(task), link)
        return True
    except FileExistsError:
        return os.readlink(link) == str(task)


def shared_chunks(block: int, blocks: list[list[str]], claims: str) -> Iterator[list[str]]:
    """The chunks one task ingests where tasks share one machine: its own block's from the
    front, then, from the back, those of blocks whose tasks are running, so no core idles
    while another task still has files. Split statically, two equal blocks ended up to
    0.3 s apart on 2 cores, and a folder sorted by name can put its big photos in one block.
    Blocks not started are left to their own task, which keeps every part bounded."""
    for i, chunk in enumerate(chunks_of(blocks[block])):
        if claim(claims, block, i, block):
            yield chunk
    for other in [*range(block + 1, len(blocks)), *range(block)]:
        if os.path.lexists(os.path.join(claims, f"{other}.0")):  # its task has started
            chunks = chunks_of(blocks[other])
            for i in reversed(range(len(chunks))):
                if claim(claims, other, i, block):
                    yield chunks[i]


def fetched_files(own: list[tuple[int, list[str]]], blocks: list[list[str]] | None,
                  claims: str | None, max_bytes: int) -> Iterator[tuple[str, Fetched]]:
    """(path, bytes or read error) of every file this task ingests, a chunk at a time: a
    whole block's bytes (up to MAX_FILES_PER_TASK photos) could fill a worker's memory."""
    for block, paths in own:
        for chunk in shared_chunks(block, blocks, claims) if claims else chunks_of(paths):
            yield from zip(chunk, fetch_all(chunk, max_bytes))


def file_rows(own: list[tuple[int, list[str]]], blocks: list[list[str]] | None, claims: str | None,
              run: str, size: int, quality: int, max_pixels: int) -> Iterator[dict]:
    """The row of every file a task ingests, a file that killed its worker set aside
    (`crashes`, the run's notes)."""
    with crashes.watch(run) as watch:
        for path, data in fetched_files(own, blocks, claims, decode.max_file_bytes(max_pixels)):
            if path in watch.crashed and isinstance(data, bytes):
                yield {**file_row(path, b"", size, quality, max_pixels), "sha1": decode.sha1(data),
                       "bytes": len(data), "reason": crashes.REASON, "detail": crashes.DETAIL}
                continue
            with watch.decoding(path):
                row = file_row(path, data, size, quality, max_pixels)
            yield row


def publish_held(claims: str, part: str, hashes: list[str]) -> None:
    """Tell the tasks that end later which images `part` holds (written next)."""
    tmp = os.path.join(claims, f".held-{part}")
    with open(tmp, "w") as f:
        f.write("\n".join(hashes))
    os.replace(tmp, os.path.join(claims, f"held-{part}"))  # readers see all of it or none


def published(claims: str) -> dict[str, list[str]]:
    """part -> the images it holds, of every task on this machine that got that far."""
    held = {}
    for name in os.listdir(claims):
        if name.startswith("held-"):
            with open(os.path.join(claims, name)) as f:
                held[name.removeprefix("held-")] = f.read().split()
    return held


def leave_out_held(rows: list[dict], usable: list[dict], part: str,
                   held: dict[str, list[str]]) -> list[dict]:
    """The usable rows whose image no other part holds; the rows of an image another part
    holds point at it. Copies across parts otherwise cost the driver a read and a rewrite
    of a part after the last task (15-35 ms of a 1.6 s prepare). Two tasks ending at once
    may both keep a copy: the driver still removes those.

    What a lost attempt of this task published, it keeps: others count on it."""
    ours = {row["sha1"] for row in usable} - set(held.pop(part, ()))
    elsewhere = {sha1: other for other, hashes in held.items() for sha1 in hashes if sha1 in ours}
    for row in rows:
        if row["part"] and row["sha1"] in elsewhere:
            row["part"] = elsewhere[row["sha1"]]
    return [row for row in usable if row["sha1"] not in elsewhere]


def ingest_block(batch: dict, images: str, size: int, quality: int, max_pixels: int,
                 splits: tuple[float, ...], blocks: list[list[str]] | None = None,
                 claims: str | None = None, run: str = "") -> pa.Table:
    """Read, check, decode and normalize one block of files in one task.

    `batch` holds the block's index and paths (one row, from `path_blocks`). With
    `claims` (a folder all tasks share), the task also takes over chunks of other blocks
    (`shared_chunks`). Usable images go straight to images/PART.parquet (one write, no
    second pass over the data); only the metadata returns to the driver.
    """
    runtime.freeze_startup_objects()  # of this worker process, at its first task
    own = [(int(b), [os.fsdecode(p) for p in paths]) for b, paths in zip(batch["block"], batch["paths"])]
    part = part_name([p for _, paths in own for p in paths])
    rows, usable, seen = [], [], set()
    for row in file_rows(own, blocks, claims, run, size, quality, max_pixels):
        if not row["reason"]:
            # by the stored image, as for the fakes: a picture re-saved with other metadata
            # is other bytes (kept as well) but must not sit in train while it sits in test
            row.update(part=part, split=assign_split(decode.sha1(row["image"]), splits))
            if row["sha1"] not in seen:  # each distinct image once per part: its first copy
                seen.add(row["sha1"])
                usable.append(row)
        rows.append(row)
    if claims:  # an image a task on this machine has already taken is left to it
        usable = leave_out_held(rows, usable, part, published(claims))
        publish_held(claims, part, [r["sha1"] for r in usable])
    if usable:  # no split: the driver decides some after the last task (share_splits)
        datasets.write_images_part(storage.join(images, part), pa.table({
            "sha1": pa.array([r["sha1"] for r in usable], TEXT),
            "image": pa.array([r["image"] for r in usable], pa.binary()),
            "thumb": pa.array([r["thumb"] for r in usable], pa.binary())}))
    # typed here: Ray Data has nothing to infer, and the driver nothing to convert
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def drop_copies(uri: str, drop: set[str]) -> None:
    """Rewrite one images part without the images `drop` names: copies kept in another part."""
    table = storage.read_parquet(uri)
    table = table.filter(pc.invert(pc.is_in(table["sha1"], pa.array(list(drop)))))
    if table.num_rows:
        datasets.write_images_part(uri, table)
    else:  # every image it held is kept in another part
        storage.delete_file(uri)


def write_outputs(out: str, images: str, manifest: list[dict], rejected: list[dict],
                  drops: dict[str, set[str]]) -> None:
    """manifest.parquet, rejected.parquet, and every part in `drops` rewritten. The files
    are independent, so they are written at once: on S3 each rewrite is a GET and a PUT,
    round trips that one after another add up (3,000 photos, 7 parts rewritten: 1.28x
    faster against moto on loopback, where the server's own CPU, not latency, is the limit)."""
    tables = {datasets.manifest_uri(out): pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA),
              storage.join(out, "rejected.parquet"): pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA)}
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(drop_copies, storage.join(images, part), drop) for part, drop in drops.items()]
        jobs += [pool.submit(storage.write_parquet, uri, table) for uri, table in tables.items()]
        for job in jobs:
            job.result()  # the first failure, if any, raised here


def split_blocks(paths: list[str], blocks: int) -> list[list[str]]:
    """Exactly `blocks` blocks (no more than the paths), sizes differing by at most one.
    Cut in runs of the sorted paths, not dealt out in turn: copies of a photo tend to sit
    near each other by name (in 3,000 UTKFace photos, 14 of 19 within 250 files), so they
    mostly share a part and need no rewrite (dealt out, a skewed folder on a 2-CPU
    cluster measured 0.85x of the DataLoader against 0.93x)."""
    blocks = max(1, min(blocks, len(paths)))
    return [paths[i * len(paths) // blocks:(i + 1) * len(paths) // blocks] for i in range(blocks)]


def path_blocks(blocks: list[list[str]]) -> ray.data.Dataset:
    """One row per block, holding its index and paths: ray.data.from_items builds blocks
    row by row (0.17 s of driver CPU for 3,000 paths, a tenth of a small prepare). The
    paths go as bytes: Arrow text cannot hold a file name that is not valid UTF-8."""
    return ray.data.from_items([{"block": i, "paths": [os.fsencode(p) for p in paths]}
                                for i, paths in enumerate(blocks)], override_num_blocks=len(blocks))


def block_count(files: int, slots: int, waves: int) -> int:
    """Blocks of paths: `waves` rounds of one task per slot, more rounds where a task would
    get over 2,048 files, and all of one size, so no slot waits alone on a last odd task;
    at least 64 files each, as fewer drown small images in per-task overhead.

    A task holds its part (2,048 normalized JPEGs are ~6-20 MB) until its one write, and
    a retried task redoes at most that many files. On the in-process Ray, one round:
    a slot that finishes a task idles its core until Ray Data's scheduling loop starts
    the next (~15-40 ms), and with one slot per core that cost showed (3,000 photos on
    2 cores: 0.91-0.95x of the DataLoader in one round, 0.78-0.90x in four).
    """
    rounds = max(waves, -(-files // (slots * MAX_FILES_PER_TASK)))
    return max(1, min(slots * rounds, -(-files // MIN_FILES_PER_TASK)))


def sort_rows(rows: list[dict]) -> tuple[list[dict], list[dict], dict[str, set[str]]]:
    """(manifest, rejected, drops), in path order: the first file of each distinct image
    is kept; decode failures and later copies are rejected. `drops` names, per images
    part, the images it holds a copy of but that are kept in another part.

    Plain Python over rows: a few ms for thousands of files (pandas took ~50 ms, a
    tenth of what the driver adds to a small prepare)."""
    kept, rejected, drops = {}, [], defaultdict(set)
    for row in sorted(rows, key=itemgetter("path")):
        if row["reason"]:
            rejected.append(row)
        elif (first := kept.setdefault(row["sha1"], row)) is not row:
            rejected.append({**row, "reason": "duplicate",
                             "detail": f"duplicate: same bytes as {first['path']}"})
            if row["part"] != first["part"]:
                drops[row["part"]].add(row["sha1"])
    return list(kept.values()), rejected, drops


def share_splits(manifest: list[dict]) -> None:
    """Put each group of near copies (`near_copies`) in one split: that of its member
    with the lowest sha1, so a rerun agrees, which the others name in `near_copy_of`.
    Only the manifest holds the splits, so no part changes."""
    for group in near_copies.groups([row["thumb"] for row in manifest]):
        rows = [manifest[i] for i in group]
        first = min(rows, key=itemgetter("sha1"))
        for row in rows:
            if row is not first:
                row["near_copy_of"] = first["path"]
                row["split"] = first["split"]


def source_files(src: Source, read: dict[str, int] | None = None) -> dict | None:
    """What a folder or prefix source held: its image files' count and a hash of their
    names (relative to it, as its copy for a cluster keeps them), and of their sizes,
    which catch a file rewritten in place (or locally, still being copied when it was
    read). `read`: the bytes each file (by its printable path) had as the ingest read it,
    else its size as listed (S3) or now (a local file). None for the sample and Kaggle
    sources, whose files a name fixes. A local source's copy on S3 for a cluster records
    no sizes: its listing is not the source's, which a rerun lists."""
    if sources.kind(src.name) != "path":
        return None
    names = sorted((storage.printable(f[len(src.root):].lstrip("/")), f) for f in src.files)
    listed = {"count": len(names), "sha1": decode.sha1("\n".join(n for n, _ in names).encode())}
    if not storage.is_s3(src.root) or src.sizes:
        read = read or {}
        listed["sizes"] = decode.sha1("\n".join(str(file_size(f, read, src.sizes)) for _, f in names).encode())
    return listed


def file_size(path: str, read: dict[str, int], sizes: dict[str, int]) -> int:
    """Its bytes as read (source_files), else its size as listed (Source.sizes) or now; -1
    when it is gone."""
    if (size := read.get(storage.printable(path))) is not None:
        return size
    if storage.is_s3(path):
        return sizes.get(path, -1)
    try:
        return os.stat(path).st_size
    except OSError:  # gone, or a link to nothing: its row says so
        return -1


def source_changed(cfg: Config, done: dict) -> str | None:
    """Files added to, removed from, renamed or resized in the source folder since `done`
    was made."""
    if not (then := done.get("source_files")):  # a sample or Kaggle source, or data/ made before
        return None
    try:
        now = source_files(outside_workdirs(resolve_source(cfg.data.source, cfg.data), cfg.workdir, quiet=True))
    except (UsageError, OSError):  # gone, empty, or the store cannot list it now:
        return None  # the complete data/ is still good, and needs none of it
    unread = storage.UNREADABLE_UNDER.get(storage.normalize(cfg.data.source))
    if unread and now["count"] < then["count"]:  # fewer: maybe only those now out of reach
        print(f"prepare: cannot tell whether the files in {cfg.data.source} changed ({unread} folder(s) "
              "could not be read): keeping the complete data/ (--force makes it again)", flush=True)
        return None
    if {key: now.get(key) for key in then} == then:  # what was recorded (sizes since 2026-12-05)
        return None
    how = ("" if now["count"] != then["count"] else ", other names" if now["sha1"] != then["sha1"]
           else ", other sizes: a file rewritten, or still being copied then")
    return f"the files in {cfg.data.source} changed ({then['count']:,} images then, {now['count']:,} now{how})"


def summarize(src: Source, listed: dict | None, manifest: list[dict], rejected: list[dict], out: str,
              seconds: float, phases: dict[str, float]) -> dict:
    """`listed`: source_files. `phases`: seconds of the parallel ingest (listing, reading,
    decoding) and of the driver's serial work after it, which bounds how far more cores
    speed a prepare up."""
    splits = Counter(row["split"] for row in manifest)
    return {"source": src.name, "images": len(manifest), "rejected": len(rejected),
            **({"source_files": listed} if listed else {}),
            "reasons": dict(Counter(row["reason"] for row in rejected)),
            "splits": {s: splits[s] for s in datasets.SPLITS},
            "near_copies": sum(bool(row["near_copy_of"]) for row in manifest),
            "flipped_copies_grouped": True,  # see STAGE.added
            "histories": dict(Counter(row["history"] for row in manifest if row["history"])),
            "seconds": round(seconds, 1), "phases": {k: round(v, 2) for k, v in phases.items()},
            "output": out, "software": deepfake_ray.versions()}  # the stored bytes, hence the splits, are theirs


UNLIKE_SHARE = 0.05  # of the images, from which their shapes are said: a few are any dataset's


def unlike_face_crops(manifest: list[dict], resolution: int) -> list[str]:
    """Warnings for images unlike the face crops a detector should learn from: prepare
    checks that files are images, not faces. Far from square ones lose their sides to the
    centre crop (an off-centre face with them), small ones are enlarged (softer than the
    fakes: a cue that is not fakeness), flat ones (a logo, a blank frame) show nothing."""
    n, lines = len(manifest), []
    wide = sum(max(r["width"], r["height"]) > 1.3 * min(r["width"], r["height"]) for r in manifest)
    small = sum(min(r["width"], r["height"]) < resolution for r in manifest)
    flat = near_copies.blanks([r["thumb"] for r in manifest])
    if wide >= UNLIKE_SHARE * n:
        lines.append(f"prepare: warning: {count_images(wide)} of {n:,} are far from square (over 1.3:1): each "
                     "keeps only its middle square, which can cut a face off; crop the faces first")
    if small >= UNLIKE_SHARE * n:
        lines.append(f"prepare: warning: {count_images(small)} of {n:,} are smaller than data.resolution="
                     f"{resolution} px and are enlarged, softer than the fakes will be (a cue that is not "
                     "fakeness): use larger crops, or a lower data.resolution")
    if flat:
        lines.append(f"prepare: warning: {count_images(flat)} of {n:,} are flat, one colour or nearly (a blank "
                     "frame, a logo): no face to learn from; remove them from the source")
    return lines


def count_images(n: int) -> str:
    return f"{n:,} image" + ("" if n == 1 else "s")


def summary_line(s: dict) -> str:
    reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(s["reasons"].items(), key=lambda x: -x[1]))
    rejected = f"{s['rejected']:,} rejected" + (f": {reasons}" if reasons else "")
    splits = " / ".join(f"{s['splits'][k]:,} {k}" for k in datasets.SPLITS)
    if near := s.get("near_copies"):  # absent from a data/ made before they were found
        splits += f"; {near:,} near " + ("copy in its" if near == 1 else "copies in their") + " picture's split"
    return (f"prepared {count_images(s['images'])} ({rejected}; {splits}) in {s['seconds']:.0f}s "
            f"-> {s['output']}")


def ingest(blocks: list[list[str]], cpus_per_task: float, slots: int | None,
           fn_kwargs: dict) -> list[dict]:
    """Every file's row, from one Ray Data task per block (`ingest_block`)."""
    files = path_blocks(blocks)
    # One operator, nothing to starve: without this, Ray Data reserves part of the
    # CPUs for other operators and runs one task at a time for the first second.
    files.context.op_resource_reservation_enabled = False
    meta = runtime.map_on_tasks(
        files, ingest_block, batch_size=None, num_cpus=cpus_per_task, fn_kwargs=fn_kwargs,
        # no more than the blocks: Ray Data warns of a limit it cannot reach
        compute=ray.data.TaskPoolStrategy(size=min(slots, len(blocks))) if slots else None,
    )
    rows, claims = [], fn_kwargs.get("claims")
    # files in the blocks that are back, or, on one machine, in the chunks tasks have taken
    count = lambda: max(len(rows), files_claimed(claims, blocks) if claims else 0)  # noqa: E731
    with Progress("prepare", sum(map(len, blocks)), "files", count):
        return collect_rows(meta, expected=sum(map(len, blocks)), rows=rows)


def files_claimed(claims: str, blocks: list[list[str]]) -> int:
    """Files in the chunks ingest tasks have claimed so far (`claim`)."""
    total = 0
    for name in os.listdir(claims):
        block, dot, chunk = name.partition(".")
        if dot and block.isdigit():
            total += min(CHUNK_FILES, len(blocks[int(block)]) - int(chunk) * CHUNK_FILES)
    return total


def collect_rows(ds: ray.data.Dataset, expected: int, rows: list | None = None) -> list[dict]:
    """The rows of `ds`, converted as each block arrives (the first overlaps the tasks
    still running), returned once `expected` rows are in: Ray Data's executor shutdown
    (~20 ms) then runs in the background. Streaming the blocks also skips what
    to_arrow_refs adds to every execution (~15 ms: the cluster's memory stats over gRPC,
    a stats summary), none of which a prepare uses. `rows`: the list to fill (a progress
    counter reads it meanwhile)."""
    bundles, rows = ds.iter_internal_ref_bundles(), [] if rows is None else rows
    for bundle in bundles:  # a failed task raises here, before the count is reached
        for ref in bundle.block_refs:  # what to_arrow_refs hands back
            rows += ray.get(ref).to_pylist()
        if len(rows) >= expected:
            break
    threading.Thread(target=run_to_end, args=(bundles,), daemon=True).start()
    if len(rows) != expected:  # each file yields one row: the count is what ends the wait
        raise RuntimeError(f"ingest returned {len(rows):,} rows for {expected:,} files")
    return rows


def run_to_end(bundles: Iterator) -> None:
    """Run a finished execution to its end, which shuts its executor down."""
    with contextlib.suppress(Exception):  # nothing is left to lose: every row is in
        collections.deque(bundles, maxlen=0)


CLAIMS_PREFIX = "deepfake-ray-claims-"
CLAIMS_STALE_S = 600  # a running ingest claims a chunk every ~30 ms: its folder changes as often


def claims_dir() -> str:
    """A fresh folder for the claims of this run's tasks, in memory where the OS offers
    it: a symlink there takes ~11 us against ~260 us on this machine's ext4 /tmp, and
    a task makes ~50 of them (~12 ms of its time). Named by this process, so that the
    next run removes what a killed one left (memory, in /dev/shm)."""
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    return runtime.own_temp_dir(CLAIMS_PREFIX, parent, CLAIMS_STALE_S)


def settings(cfg: Config) -> dict:
    """What decides prepare's output: a complete data/ made with others is not this run's."""
    d = cfg.data
    made = {"data.source": sources.canonical(d.source), "data.resolution": d.resolution,
            "data.jpeg_quality": d.jpeg_quality, "data.splits": list(d.splits),
            "data.max_pixels": d.max_pixels}
    if sources.kind(made["data.source"]) == "sample":  # the generator's faces depend on the seed
        made["seed"] = cfg.seed
    kind, _, name = made["data.source"].partition(":")
    if kind in OWN_SETTING and not name:  # a bare `sample` or `kaggle` reads its setting
        key = OWN_SETTING[kind][0]
        made[f"data.{key}"] = getattr(d, key)
    return made


def settings_now(recorded: dict) -> dict:
    """Settings as they name the data, to be compared: a bare `sample` or `kaggle` (recorded
    beside its own setting) as the named source it stands for (`sample` with
    data.sample_size=40 is `sample:40`, the same faces), and a source as this version
    spells it (earlier ones recorded `sample:040` as typed)."""
    if not isinstance(source := recorded.get("data.source"), str):
        return recorded
    settings = dict(recorded)
    source = sources.canonical(source)
    own = {kind: settings.pop(f"data.{key}", None) for kind, (key, _) in OWN_SETTING.items()}
    if (kind := sources.kind(source)) in OWN_SETTING and ":" not in source and own[kind] is not None:
        source = sources.canonical(f"{kind}:{own[kind]}")
    return {**settings, "data.source": source}


def hint(settings: dict) -> dict:
    """A named source with its own setting beside it: a rerun hint's `--set data.source=sample:40`
    appended to a command that sets data.sample_size=41 would be refused (check_settings)."""
    source = settings.get("data.source")
    if not (isinstance(source, str) and (kind := sources.kind(source)) in OWN_SETTING and ":" in source):
        return settings
    name = source.partition(":")[2]
    if kind == "sample" and not name.isdigit():  # not a count this version would record
        return settings
    return {**settings, f"data.{OWN_SETTING[kind][0]}": int(name) if kind == "sample" else name}


STAGE = lineage.Stage("prepare", "data", settings=settings, describe=lambda d: count_images(d["images"]),
                      source_changed=source_changed, settings_now=settings_now, hint=hint,
                      added=(("near_copies", "before near copies were grouped: one photo stored twice "
                              "(recompressed, resized) may be in two splits; --force prepares it again "
                              "with each picture's copies in one split"),
                             ("flipped_copies_grouped", "before flipped copies counted as near copies: a "
                              "photo and its mirror image may be in two splits, which training's flips "
                              "make one picture; --force prepares it again with them in one split"),
                             ("histories", "before the photos' own JPEG encodings were recorded: fakes "
                              "are stored without them, a cue a detector may learn instead of the faces; "
                              "--force prepares it again, and the pipeline then makes the GAN and every "
                              "stage after it anew")))


def preflight(cfg: Config, force: bool = False, **_) -> dict | None:
    """Everything that needs no Ray, so that a mistake fails in a second: the summary
    if prepare is already complete with these settings, else None once the config and
    the source have checked out, and no other prepare writes there. Changes nothing: a
    --force run with a mistyped source leaves the complete data/ as it was, and a refused
    one the running one's config.yaml."""
    check_settings(cfg)
    if done := lineage.preflight(cfg, STAGE, force):
        return done
    check_data_source(cfg)
    storage.check_not_held(datasets.data_dir(cfg.workdir), "prepare")  # another prepare writes there
    return None


def run(cfg: Config, force: bool = False, **_) -> dict:
    check_settings(cfg)
    # one prepare at a time per work directory (an S3 one through its lease): two would mix their parts
    with storage.exclusive(datasets.data_dir(cfg.workdir), "prepare"):
        # planned under the lock: a run just ended may have completed it, and --force
        # unmarks the complete data/ only once this run holds the work directory
        if done := lineage.plan(cfg, STAGE, force).done:
            return done
        return ingest_into_workdir(cfg)  # resolve_source checks the source


def copy_dir(cfg: Config) -> str:
    """Where the source's copy lies in the work directory (WORKDIR/sources/NAME)."""
    return storage.join(cfg.workdir, "sources", sources.copy_name(cfg.data.source, cfg.data))


def kaggle_copy(cfg: Config) -> str | None:
    """copy_dir of a Kaggle source, else None: where a run on a cluster copies the download
    (in its driver's own cache) for the tasks on other nodes, into the S3 work directory
    or a local one (a shared mount there)."""
    return copy_dir(cfg) if sources.kind(cfg.data.source) == "kaggle" else None


def check_data_source(cfg: Config) -> None:
    """check_source; a complete copy of a Kaggle dataset in the work directory stands for
    its download, so a resubmitted job on a new head needs no Kaggle credentials."""
    copy = kaggle_copy(cfg)
    check_source(cfg.data.source, cfg.data, copied=bool(copy and storage.completed(copy)))
    if sources.kind(source := sources.as_given(cfg.data.source)) == "path" and not storage.is_s3(source):
        sources.check_outside_workdirs(source, source, cfg.workdir)  # on S3: once listed, after Ray's start
        sources.check_has_images(source)


def readable_source(cfg: Config) -> Source:
    """The source, its files where every ingest task can read them. On a cluster the tasks
    run on other machines than this driver (the head has no CPUs for them), so files on
    its disk, a local folder or the Kaggle download, are first copied into the S3 work
    directory, WORKDIR/sources/ (the Kaggle download into a local one too: a shared
    mount). A resubmitted job, maybe on a new head, finds a Kaggle dataset's copy there
    and downloads nothing."""
    d = cfg.data
    copy = kaggle_copy(cfg)
    copying = sources.kind(d.source) != "sample" and not storage.is_s3(d.source) and (
        runtime.driver_files_need_copying(cfg.workdir) or (copy is not None and not runtime.in_process()))
    # a dataset's files do not change: its copy stands for the download (in-process, a
    # complete download in this machine's cache is read instead, from its disk)
    if copy and (copying or not kaggle_source.kaggle_cached(d.source, d)) and (done := storage.completed(copy)):
        print(f"prepare: using the copy of {d.source} in {copy} ({done['files']:,} files)", flush=True)
        return Source(d.source, files=sources.find_images(copy), root=copy,
                      unread=sources.unread_from(done.get("unread", {}), copy))
    src = outside_workdirs(resolve_source(d.source, d), cfg.workdir)
    note_others(src)
    if not copying:
        return src
    src = sources.copy_to(src, copy_dir(cfg), "prepare", decode.max_file_bytes(d.max_pixels))
    if copy:
        storage.mark_complete(copy, {"source": d.source, "files": len(src.files),
                                     "unread": sources.recorded_unread(src.unread, copy)}, is_stage=False)
    return src


def outside_workdirs(src: Source, workdir: str, quiet: bool = False) -> Source:
    """A source folder that holds work directories (`--source .` beside runs/) would take
    their sample grids, figures and another run's fakes for real faces: what lies in this
    run's work directory, or in any other (sources.workdirs_in), is left out. A source
    inside another run's work directory is refused."""
    if not src.files:
        return src
    # the listing tells whether the root is one: no request to S3 for it, each time asked
    sources.check_outside_workdirs(src.name, src.root, workdir, root_is_one=src.root in src.workdirs)
    inside = set(src.workdirs)
    if own := own_workdir_in(src, workdir):
        inside.add(own)
    inside = sorted(inside)

    def outside(files: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f for f in files if not any(f.startswith(w + "/") for w in inside))

    kept = outside(src.files)
    src = dataclasses.replace(src, others=outside(src.others))  # a run's own files are no one's photos
    if len(kept) == len(src.files):
        return src
    named = ", ".join(inside)
    if not kept:
        raise UsageError(f"every image under {src.name} lies inside a work directory ({named}): "
                         "pass the folder of face images as --source, or a --workdir outside it")
    left = len(src.files) - len(kept)
    if not quiet:
        print(f"prepare: leaving out {progress.count(left, 'file')} inside the work "
              f"director{'ies' if len(inside) > 1 else 'y'} {named}")
    return dataclasses.replace(src, files=kept)


def note_others(src: Source) -> None:
    """The source's files left out for their names, said in one line: a folder with .bmp
    files (or .jfif, before they were read) was prepared smaller than it is, with no word."""
    if not src.others:
        return
    n, first = len(src.others), storage.shown(src.others[0][len(src.root):].lstrip("/"))
    print(f"prepare: note: left out {progress.count(n, 'file')} not named {'/'.join(sources.image_suffixes())} "
          f"(first: {first}): convert any images among them to one of these to ingest them", flush=True)


def own_workdir_in(src: Source, workdir: str) -> str | None:
    """This run's work directory as the source's listing names it (links and all), when
    it lies inside the source folder."""
    if storage.is_s3(src.root) != storage.is_s3(workdir):
        return None
    workdir = storage.normalize(workdir)
    if storage.is_s3(workdir):
        return workdir
    # the source that is the workdir itself is refused before (check_outside_workdirs)
    where = os.path.relpath(sources.location(workdir), sources.location(src.root))
    if where.split(os.sep)[0] == "..":
        return None
    return os.path.join(src.root, where)


def read_all_files(cfg: Config, src, staged: str) -> list[dict]:
    """A row per file of `src` (usable or why not), its image written to a part in `staged`,
    by Ray tasks sized to the CPUs there are."""
    d = cfg.data
    paths = [p for p in candidates(src, cfg.seed) if p not in src.unread]
    if not paths:
        return []
    cpus_per_task = cfg.resources.data_cpus
    slots = runtime.cpu_bound_slots(cpus_per_task)  # None on a cluster: its CPUs decide
    tasks_at_once = slots or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    # two rounds on a cluster, so one slow node's last task is not the whole tail
    blocks = split_blocks(paths, block_count(len(paths), tasks_at_once, waves=1 if slots else 2))
    # tasks on one machine share their work (`shared_chunks`) and which images their parts
    # hold (`leave_out_held`) through one folder
    claims = claims_dir() if slots and len(blocks) > 1 else None
    run_id = uuid.uuid4().hex  # names its tasks' notes of crashes (`crashes`)
    try:
        with crashes.named_if_fatal(run_id, src.name):
            return ingest(blocks, cpus_per_task, slots, fn_kwargs=dict(
                images=staged, size=d.resolution, quality=d.jpeg_quality, max_pixels=d.max_pixels,
                splits=tuple(d.splits), blocks=blocks if claims else None, claims=claims, run=run_id))
    finally:
        if claims:
            shutil.rmtree(claims, ignore_errors=True)


def nothing_usable(src, rows: list[dict], rejected: list[dict]) -> UsageError:
    """Which file and why (S3's refusal, a format), and where to look: no rejected.parquet
    is written, so that a --force run loses nothing of the complete data/ before it."""
    reasons = Counter(row["reason"] for row in rejected)
    on_this_disk = not runtime.in_process() and set(reasons) == {"unreadable"} and not storage.is_s3(src.root)
    first = f"; the first: {rejected[0]['path'][:300]} ({rejected[0]['detail'][:300]})" if rejected else ""
    return UsageError(f"none of the {len(rows):,} files from {src.name} is a usable image ({dict(reasons)}{first}): "
                      + ("they are on this machine's disk, which the cluster's other nodes cannot read: use an "
                         "s3:// source, or an s3:// --workdir to copy them there" if on_this_disk else "check the source"))


def ingest_into_workdir(cfg: Config) -> dict:
    """Read, decode and write every file of the source into WORKDIR/data (images/ parts,
    manifest.parquet, rejected.parquet), replacing what was there only once the new data
    is good; the summary, as the stage's marker records it."""
    out = datasets.data_dir(cfg.workdir)
    started = time.monotonic()
    src = readable_source(cfg)
    print(f"prepare: reading {count_images(src.sample_count or len(src.files))} from {src.name}")
    d = cfg.data
    # parts go beside the previous run's images, which stay complete until these are good:
    # a --force whose source turns out to hold nothing usable loses nothing
    images, staged = datasets.images_uri(out), storage.join(out, ".images-new")
    storage.delete_dir(staged)  # parts of an interrupted earlier run
    rows = read_all_files(cfg, src, staged)
    phases = {"ingest": time.monotonic() - started}
    # files the driver could not read (to copy them where the tasks read) are rejected rows
    rows += [file_row(uri, error, d.resolution, d.jpeg_quality, d.max_pixels)
             for uri, error in src.unread.items()]
    manifest, rejected, drops = sort_rows(rows)
    if not manifest:
        storage.delete_dir(staged)
        raise nothing_usable(src, rows, rejected)
    grouping = time.monotonic()
    share_splits(manifest)
    phases["near_copies"] = time.monotonic() - grouping
    lineage.unmark(cfg, STAGE)  # from here on data/ changes
    storage.replace_dir(images, staged)
    write_outputs(out, images, manifest, rejected, drops)
    seconds = time.monotonic() - started
    phases["rest"] = seconds - phases["ingest"] - phases["near_copies"]
    # the sizes read, for the source's fingerprint; an unreadable file's is looked up now
    read = {row["path"]: row["bytes"] for row in rows if row["reason"] != "unreadable"}
    summary = summarize(src, source_files(src, read), manifest, rejected, out, seconds, phases)
    summary = lineage.complete(cfg, STAGE, summary, lineage.made(cfg, STAGE))
    print(summary_line(summary))
    for line in unlike_face_crops(manifest, d.resolution):
        warn(line)
    for split in datasets.empty_splits(summary):  # not an error here: more data may be on its way
        warn(f"prepare: warning: the {datasets.split_name(split)} split is empty ({count_images(len(manifest))} in all): "
             f"{datasets.SPLIT_USES[split]}; add images, or give it a larger data.splits fraction")
    return summary
