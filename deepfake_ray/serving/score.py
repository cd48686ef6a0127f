"""Batch scoring with Ray Data: a folder, an s3:// prefix or a manifest into one table.

    deepfake-ray score --model WORKDIR/detector/model --input SRC --out FILE.parquet|FILE.csv

Files are read and decoded in parallel Ray Data tasks (with the same decoder and
settings as the HTTP service) and scored by the Predictor in an actor pool, one GPU
per actor when the cluster has GPUs. Every input file gets one row (path, p_fake,
label, error, threshold, model): an unreadable or non-image file is a row with its
reason, not a crash; threshold and model say what made the label, so tables of several
models' runs can be put together.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

import deepfake_ray
from deepfake_ray import checkpoint, config, runtime, s3, storage
from deepfake_ray.config import Config
from deepfake_ray.data import crashes, decode, sources
from deepfake_ray.data.decode import DecodeError
from deepfake_ray.errors import LockHeld, UsageError
from deepfake_ray.serving.predictor import NotScored, Predictor, decode_image, error_text

FORMATS = (".parquet", ".csv")


def check_args(model: str | None, src: str | None, out: str | None) -> tuple[str, str, str]:
    for flag, value in (("--model", model), ("--input", src), ("--out", out)):
        if not value:
            raise UsageError(f"score needs {flag}: deepfake-ray score --model WORKDIR/detector/model "
                             "--input DIR|s3://PREFIX|MANIFEST.parquet --out FILE.parquet")
    if not str(out).lower().endswith(FORMATS):
        raise UsageError(f"--out {out} must end in .parquet or .csv (the table's format)")
    return storage.normalize(model), storage.normalize(src), storage.normalize(out)


def is_manifest(src: str) -> bool:
    """A Parquet file, or a folder of Parquet parts as Spark and Ray Data write a table
    (not a folder of images that happens to be named *.parquet)."""
    if not src.lower().endswith(".parquet") or not storage.exists(src):
        return False
    return not storage.is_dir(src) or any(f.endswith(".parquet") for f in storage.list_files(src))


def check_input(src: str) -> None:
    """That --input is something list_inputs can list, without listing it all."""
    if not (storage.is_s3(src) or is_manifest(src) or storage.is_dir(src)):
        raise UsageError(f"--input {src} is not a folder, s3:// prefix or manifest .parquet: "
                         "check the path")


def list_inputs(src: str, out: str | None = None) -> list[str]:
    """Paths/URIs to score: every file under a folder or prefix but hidden ones (`.DS_Store`,
    `._face.jpg`, `.git/`) and the `out` table itself (scored again into the same folder),
    or a manifest's `path`s (as written: the table's rows keep them, to join on; see `located`)."""
    if is_manifest(src):
        try:
            table = storage.read_parquet(src)
        except pa.ArrowInvalid as e:
            raise UsageError(f"manifest {src} is not a readable Parquet table ({str(e)[:200]}): "
                             "give a Parquet file listing paths, or a folder of images") from None
        if "path" not in table.column_names:
            raise UsageError(f"manifest {src} has no 'path' column (columns: "
                             f"{', '.join(table.column_names)}): give a Parquet file listing paths")
        kind = table.schema.field("path").type
        if pa.types.is_dictionary(kind):  # pandas categoricals
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"manifest {src}'s 'path' column holds {table.schema.field('path').type}, "
                             "not text: give the paths as strings")
        paths = [p or "" for p in table.column("path").to_pylist()]  # an empty one: an error row
        if made := next((p for p in paths if p.startswith(("fake:", "sample:"))), None):
            raise UsageError(f"manifest {src} is a work directory's: its paths ({made}, ...) name images "
                             f"made inside the run, not files: {INSIDE_PARQUET}")
    else:
        check_input(src)
        # listed once a command: its checks before Ray starts list a local folder too
        paths = [p for p in sources.source_listing(src) if not same_file(p, out)]
        if paths and all(p.lower().endswith(".parquet") for p in paths):
            raise UsageError(f"--input {src} holds Parquet files only ({len(paths):,}), a table, not images: "
                             f"{INSIDE_PARQUET}")
    if not paths:
        raise UsageError(f"--input {src} holds no files to score: check the path")
    return paths


PARQUET_FIX = "pass --input a folder of images, or a manifest .parquet whose 'path' column lists them"
# a work directory's data/ and fakes/ hold their images inside Parquet parts, and the
# manifests name the generated ones by seed and index
INSIDE_PARQUET = (f"{PARQUET_FIX} (the pipeline writes its test split's images as files, to "
                  "WORKDIR/score/test_images/real and fake)")


URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def same_file(path: str, out: str | None) -> bool:
    """Whether a listed file is the table `out`, also through a linked folder (`--input
    link --out real/scores.csv`); the name first: one path resolved, not every file's."""
    if out is None:
        return False
    name = out.rsplit("/", 1)[-1]
    return path.rsplit("/", 1)[-1] == name and sources.location(path) == sources.location(out)


def located(path: str, manifest: str | None) -> str:
    """Where a path from --input is read: a manifest's relative paths are relative to the
    folder holding the manifest, wherever score runs (Ray's workers run in folders of their own)."""
    if not path:
        return path
    if scheme := URI_SCHEME.match(path):  # as Spark's input_file_name() writes them, too
        name = scheme.group(1).lower()
        if name in ("s3", "s3a", "s3n"):
            return storage.normalize("s3://" + path[scheme.end():])
        if name == "file":
            return storage.normalize(urllib.request.url2pathname(urllib.parse.urlsplit(path).path))
        return path  # read_all says what it reads
    if manifest is None or os.path.isabs(os.path.expanduser(path)):
        return storage.normalize(path)
    if storage.is_s3(manifest):  # ../ and ./ resolved here: S3 would take them as part of the key
        bucket, _, key = storage.normalize(manifest).removeprefix("s3://").partition("/")
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(posixpath.dirname(key), path)).lstrip("/")
    return storage.normalize(os.path.join(os.path.dirname(storage.normalize(manifest)), path))


NO_PATH = "no path: "


def read_and_decode(batch: dict, resolution: int, max_pixels: int, quality: int | None = None,
                    run: str = "") -> dict:
    """Ray Data task: paths -> pixels at the model's resolution, or an error reason; a file
    whose decoding killed the worker set aside on a retry (`crashes`)."""
    raws = [bytes(raw) for raw in batch["raw_path"]]
    pixels = np.zeros((len(raws), resolution, resolution, 3), dtype=np.uint8)
    with crashes.watch(run) as watch:
        errors = [decode_into(pixels, i, raw, read, watch, resolution, max_pixels, quality)
                  for i, (raw, read) in enumerate(zip(raws, read_all(raws, decode.max_file_bytes(max_pixels))))]
    return {"index": batch["index"], "path": batch["path"], "pixels": pixels,
            "error": np.array(errors, dtype=object)}


def read_all(raws: list[bytes], max_bytes: int) -> list[bytes | Exception | None]:
    """Each file's bytes, or the error reading it raised (None: no path). S3 GETs are
    latency-bound: a batch's are overlapped, as prepare's are; local files are read as
    they are decoded, one at a time."""
    def read(raw: bytes):
        if not raw:
            return None
        if (scheme := URI_SCHEME.match(os.fsdecode(raw))) and scheme.group(1) != "s3":
            return ValueError(f"{scheme.group(0)} is not a store score reads: give local paths, "
                              "file:// or s3:// URIs")
        try:
            return storage.read_bytes(os.fsdecode(raw), max_bytes)
        except (OSError, ValueError) as e:  # FileTooLarge too; a NUL in the name
            return e
    if any(storage.is_s3(os.fsdecode(raw)) for raw in raws):
        with ThreadPoolExecutor(16) as threads:
            return list(threads.map(read, raws))
    return map(read, raws)


def decode_into(pixels: np.ndarray, i: int, raw: bytes, read: bytes | Exception | None,
                watch: crashes.CrashWatch, resolution: int, max_pixels: int, quality: int | None) -> str:
    """Decodes one file's bytes (`read`, or its read's error) into pixels[i]; its error
    ("" for none)."""
    if not raw:
        return NO_PATH + "the manifest's row is empty"
    path = os.fsdecode(raw)
    if isinstance(read, storage.FileTooLarge):
        return error_text(decode.too_large(read))
    if isinstance(read, Exception):  # missing, unreadable, permission denied; a NUL in the name
        if isinstance(read, OSError):  # a table of "unreadable" rows would pass as scored
            storage.raise_store_failure(path, read)
        return f"unreadable: {type(read).__name__}: {read}"[:300]
    data = read
    if path in watch.crashed:
        return f"{crashes.REASON}: {crashes.DETAIL}"
    try:
        with watch.decoding(path):
            pixels[i] = decode_image(data, resolution, max_pixels, quality)
    except DecodeError as e:
        return error_text(e)
    return ""


class ScoreActor:
    """Ray Data actor: holds one Predictor; decoded pixels -> p_fake and label."""

    def __init__(self, model_uri: str, max_pixels: int, threads: int | None = None, model_id: str | None = None):
        # eager: only this thread runs Python here, so the frozen graph a replica needs
        # scores no faster (measured), and its tracing cost every run ~2.3 s before the first batch
        self.predictor = Predictor(model_uri, max_pixels=max_pixels, device=runtime.assigned_device(),
                                   threads=threads, frozen=False)
        # the model the run began with, or the run stops: one exported there since (by
        # train-detector, tune), which an actor started again after its process was lost
        # loads, would score the rest of the table. Raised on the first batch: an actor's
        # constructor error reaches the driver as text only
        self.changed = None if model_id in (None, self.predictor.model_id) else model_changed(
            model_uri, self.predictor.model_id, model_id)
        runtime.freeze_startup_objects()  # a full collection of ~500k objects took 470 ms

    def __call__(self, batch: dict) -> dict:
        if self.changed:
            raise self.changed
        errors = np.array(batch["error"], dtype=object)
        ok = errors == ""
        p_fake = np.full(len(ok), np.nan)
        labels = np.array([""] * len(ok), dtype=object)
        if ok.any():
            p_fake[ok] = self.predictor.predict_pixels(batch["pixels"][ok])
            for i in np.flatnonzero(ok):
                answer = self.predictor.describe(p_fake[i])
                if isinstance(answer, DecodeError):
                    errors[i] = error_text(answer)
                else:
                    labels[i] = answer["label"]
        # the actor's own: a model exported again to the same place mid-run shows in the rows
        return {"index": batch["index"], "path": batch["path"], "p_fake": p_fake,
                "label": labels, "error": errors, "threshold": np.full(len(ok), self.predictor.threshold),
                "model": np.array([self.predictor.model_id] * len(ok), dtype=object)}


class Pool(NamedTuple):
    actors: int
    cpus: float  # each actor's
    gpus: float

    @property
    def threads(self) -> int | None:
        """A CPU actor's torch threads: its CPUs (a GPU actor's are left to torch)."""
        return None if self.gpus else max(1, round(self.cpus))


def pool(cfg: Config) -> Pool:
    """One actor per GPU on a GPU cluster, counting those its autoscaler adds when
    resources.use_gpu (at least resources.workers of them). On CPUs, one actor per 4 CPUs,
    each taking resources.cpus_per_worker of them, as evaluate's do, and as many torch
    threads: with Ray Data's default of one CPU, the forward pass, nearly all of the work,
    ran on one core of the demo's two. The actors hold at most three quarters of the
    CPUs (the rest decode), and a whole one where none is up yet: on a cluster whose head
    starts with num-cpus 0 (cluster/kuberay), an actor taking none would run there."""
    import ray

    gpus = runtime.cluster_gpus()
    if gpus or runtime.use_gpus(cfg.resources.use_gpu):
        return Pool(cfg.serve.score_actors or max(gpus, cfg.resources.workers), 1.0, 1.0)
    total = ray.cluster_resources().get("CPU", 1)
    actors = cfg.serve.score_actors or max(1, int(total // 4))
    return Pool(actors, min(cfg.resources.cpus_per_worker, max(1.0, 0.75 * total / actors)), 0.0)


def score_table(cfg: Config, model: str, meta: dict, paths: list[str], source: str,
                manifest: str | None = None, parts: str | None = None) -> pa.Table:
    """path, p_fake (null when unreadable), label, error, threshold, model: one row per
    path, in input order; `path` as given, for joining back (a `manifest`'s relative ones
    are read from beside it). Kept serve.score_part_files files at a time as they are
    scored, each such part in the folder `parts` until the table is written, so that a
    stopped run resumes. `meta`: the model's, read once (an s3:// model's a request each
    time); the scoring actors load the same model or stop the run (ScoreActor)."""
    model_id = checkpoint.model_id(meta)
    shown = [storage.printable(p) for p in paths]
    done = parts_done(parts, shown, meta) if parts else None
    tables = [done] if done is not None and done.num_rows else []
    todo = np.setdiff1d(np.arange(len(paths)), done.column("index").to_numpy() if tables else [])
    if tables:
        print(f"score: resuming: {len(paths) - len(todo):,} of {len(paths):,} files scored already "
              f"(kept in {parts})", flush=True)

    def keep(part: pa.Table) -> None:
        if parts:
            storage.write_parquet(storage.join(parts, f"{part_prefix(model_id)}{uuid.uuid4().hex}.parquet"), part)
        tables.append(part)
        if len(todo) > cfg.serve.score_part_files:
            print(f"score: {sum(t.num_rows for t in tables):,} of {len(paths):,} files scored", flush=True)

    score_parts(cfg, model, meta, todo, shown, paths, source, manifest, keep)
    table = pa.concat_tables(tables).sort_by("index").drop_columns(["index"])
    p_fake = table.column("p_fake")
    table = table.set_column(table.schema.get_field_index("p_fake"), "p_fake",
                             pc.if_else(pc.is_nan(p_fake), pa.scalar(None, pa.float64()), p_fake))
    return table.select(["path", "p_fake", "label", "error", "threshold", "model"])


def model_changed(model_uri: str, now: str, began_with: str) -> UsageError:
    return UsageError(f"--model {model_uri} changed while score ran (model {now}, where it began with "
                      f"{began_with}): run score again once nothing writes there, and it scores with the "
                      "model then in place")


NAME_MAX = 255  # bytes in a file name on common local filesystems


def hidden_beside(out: str, suffix: str) -> str:
    """`.NAME.SUFFIX` beside `out`, hidden so that a folder scored into itself never lists
    it as an input; named by a hash of NAME where that would be too long (`out` fits)."""
    folder, name = out.rsplit("/", 1)
    hidden = f".{name}.{suffix}"
    if len(os.fsencode(hidden)) > NAME_MAX:
        hidden = f".{hashlib.sha1(os.fsencode(name)).hexdigest()[:16]}.{suffix}"
    return f"{folder}/{hidden}"


def parts_root(out: str) -> str:
    """Where runs into `out` keep their finished parts."""
    return hidden_beside(out, "parts")


def parts_folder(out: str, src: str) -> str:
    """A run's parts, by its --input: two manifests listing the same relative paths (of
    files beside each) must not take each other's rows."""
    return storage.join(parts_root(out), hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest()[:16])


def part_prefix(model_id: str) -> str:
    """A part's name says the model that scored it (its id's hash): a run finds its own
    without reading the others."""
    return f"part-{model_id.rsplit('@', 1)[-1]}-"


def parts_of(parts: str, meta: dict) -> list[str]:
    """The parts this model scored into `parts`, under any of its ids (model_ids: a run
    stopped before an upgrade named its parts by the weights alone)."""
    if not storage.is_dir(parts):
        return []
    prefixes = tuple(part_prefix(i) for i in checkpoint.model_ids(meta))
    return [f for f in storage.list_files(parts) if f.rsplit("/", 1)[-1].startswith(prefixes) and f.endswith(".parquet")]


def parts_done(parts: str, shown: list[str], meta: dict) -> pa.Table | None:
    """The rows a stopped run of this model kept for these inputs: a row counts where its
    index still holds its path (an input list changed since is scored where it changed),
    and its threshold is the model's (an earlier id covers the weights alone). A file that
    could not be read is read again: its cause (a folder not yet copied, a right not
    granted) may have been fixed since."""
    kept = []
    for part in parts_of(parts, meta):
        try:
            kept.append(storage.read_parquet(part))
        except (OSError, pa.ArrowInvalid) as e:  # not one of ours (writes are atomic): its files scored again
            print(f"score: note: left out {storage.shown(part)}, which cannot be read ({type(e).__name__})",
                  flush=True)
    if not kept:
        return None
    rows = pa.concat_tables(kept)
    index = rows.column("index").to_numpy()
    same = [bool(i < len(shown) and shown[i] == p) for i, p in zip(index, rows.column("path").to_pylist())]
    rows = rows.filter(pa.array(same, pa.bool_()))
    ours = pc.and_(pc.is_in(rows.column("model"), pa.array(sorted(checkpoint.model_ids(meta)))),
                   pc.equal(rows.column("threshold"), float(meta.get("threshold", 0.5))))
    rows = rows.filter(pc.and_(ours, pc.invert(pc.or_(pc.starts_with(rows.column("error"), UNREAD),
                                                      pc.starts_with(rows.column("error"), NO_PATH)))))
    _, first = np.unique(rows.column("index").to_numpy(), return_index=True)  # a part written twice
    rows = rows.take(pa.array(first, pa.int64()))
    model = rows.schema.get_field_index("model")  # one model's table names it one way
    return rows.set_column(model, "model", pa.array([checkpoint.model_id(meta)] * rows.num_rows, pa.string()))


BLOCK_FILES = 500  # at most, unless a batch is larger: a task that dies is tried again on its whole block


def score_parts(cfg: Config, model: str, meta: dict, indices: np.ndarray, shown: list[str], paths: list[str],
                source: str, manifest: str | None, keep: Callable[[pa.Table], None]) -> None:
    """Scores the inputs at `indices` in one Ray Data run, handing their rows, with their
    index, to `keep` serve.score_part_files at a time as they come (the last part fewer).
    One run, one actor pool: a run per part started a pool per part (each actor a process
    importing torch and timm, then loading the model) and left it idle over each part's
    last batches."""
    if not len(indices):
        return
    import ray

    run = uuid.uuid4().hex  # names the notes of its tasks (`crashes`)
    actors = pool(cfg)
    batch, size = cfg.serve.score_batch_size, cfg.serve.score_part_files
    # a block per batch, up to 200 blocks (1,000 files in 31 made batches of 32 and 1),
    # then BLOCK_FILES a block. A file name that is not UTF-8 travels as bytes (Arrow
    # strings must be UTF-8) and is written with \xNN escapes, as prepare's manifest does
    per_block = max(batch, min(-(-len(indices) // 200), BLOCK_FILES))
    chunks = (indices[start:start + per_block] for start in range(0, len(indices), per_block))
    ds = ray.data.from_arrow([pa.table({
        "index": pa.array(chunk, pa.int64()), "path": pa.array([shown[i] for i in chunk], pa.string()),
        "raw_path": pa.array([os.fsencode(located(paths[i], manifest)) for i in chunk], pa.binary())})
        for chunk in chunks])
    ds = runtime.map_on_tasks(ds, read_and_decode, batch_size=batch, batch_format="numpy",
                              fn_kwargs={"resolution": int(meta["resolution"]), "quality": checkpoint.stored_quality(meta),
                                         "max_pixels": cfg.data.max_pixels, "run": run})
    ds = runtime.map_on_actor_pool(ds, ScoreActor, actors.actors, batch_size=batch, batch_format="numpy",
                                   cpus=actors.cpus, gpus=actors.gpus, fn_constructor_kwargs={
                                       "model_uri": model, "max_pixels": cfg.data.max_pixels, "threads": actors.threads,
                                       "model_id": checkpoint.model_id(meta)})
    with crashes.named_if_fatal(run, source):
        rest = None
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # as each block is scored
            rows = block if rest is None else pa.concat_tables([rest, block])
            whole = rows.num_rows // size * size
            for start in range(0, whole, size):
                keep(rows.slice(start, size))
            rest = rows.slice(whole)
        if rest is not None and rest.num_rows:
            keep(rest)


def write_table(table: pa.Table, out: str, cfg: Config) -> None:
    """A Parquet table also carries the settings of the run that wrote it, as config.yaml
    holds them (data.max_pixels decides which files are set aside; a resumed run keeps an
    earlier one's rows) and the version, in its schema's metadata
    (`pq.read_schema(out).metadata[b"deepfake_ray.config"]`); a CSV file has nowhere to
    keep them."""
    if out.lower().endswith(".csv"):
        buf = io.BytesIO()
        pa_csv.write_csv(table, buf)
        storage.write_bytes(out, buf.getvalue())
    else:
        made_with = {b"deepfake_ray.config": config.to_yaml(cfg).encode(),
                     b"deepfake_ray.version": deepfake_ray.__version__.encode()}
        storage.write_parquet(out, table.replace_schema_metadata({**(table.schema.metadata or {}), **made_with}))


def summarize(table: pa.Table, meta: dict, out: str, seconds: float) -> dict:
    errors = [e for e in table.column("error").to_pylist() if e]
    scored = table.num_rows - len(errors)
    fakes = sum(1 for label in table.column("label").to_pylist()
                if label == meta.get("class_names", ["real", "fake"])[1])
    unscored = sum(1 for e in errors if e.startswith(NotScored.REASON))
    # each row's reason is its error up to the first colon (error_text's "reason: detail")
    reasons = Counter(e.split(":", 1)[0] for e in errors if not e.startswith(NotScored.REASON))
    return {"files": table.num_rows, "scored": scored, "errors": len(errors), "unscored": unscored,
            "unreadable": len(errors) - unscored,  # every other error (the key older runs recorded)
            "reasons": dict(reasons.most_common()), "fakes": fakes,
            "fake_share": fakes / scored if scored else None, "seconds": round(seconds, 2),
            "out": out, "model": checkpoint.model_id(meta), "threshold": float(meta.get("threshold", 0.5))}


UNREAD, MISSING = "unreadable: ", "unreadable: FileNotFoundError"
# no image's bytes at all (text, a web page saved as .jpg, an empty file); a truncated or
# corrupt file, or one of a pixel layout not decoded, is an image: its row says what is wrong
NOT_IMAGE = ("not an image: ", "html page", "empty file")


def share(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def check_some_read(table: pa.Table, src: str, manifest: bool) -> None:
    """Not one file read, or not one an image, is no batch of damaged files but a setup to
    fix (a manifest's relative paths read from the wrong folder; on a cluster, a folder on
    the driver's disk, which the scoring tasks on other nodes cannot see; credentials that
    may list a bucket but read none of it; a folder of Parquet parts, such as a work
    directory's images/): exit 2 with the cause and the first error, rather than 0 and a
    table of errors. No table is written, so the same command runs again once it is fixed."""
    errors = table.column("error").to_pylist()
    if not errors or not all(errors):  # some file scored
        return
    if all(e.startswith(NO_PATH) for e in errors):
        raise UsageError(f"none of the {len(errors):,} rows of --input {src} names a file (its 'path' "
                         "is empty): fill in the manifest's path column")
    if all(e.startswith(NOT_IMAGE) for e in errors):
        parquet = all(p.lower().endswith(".parquet") for p in table.column("path").to_pylist())
        cause = f"they are Parquet files, a table: {PARQUET_FIX}" if parquet else f"the first: {errors[0][:300]}"
        raise UsageError(f"none of the {len(errors):,} files from --input {src} is an image: {cause}")
    if not all(e.startswith(UNREAD) for e in errors):
        return
    if not all(e.startswith(MISSING) for e in errors):
        cause = f"the first: {errors[0].removeprefix(UNREAD)[:300]}"
    elif not runtime.in_process() and not storage.is_s3(src):
        cause = ("it lies on this machine's disk, which the cluster's other nodes cannot read: "
                 "use an s3:// --input, or a folder every node mounts")
    elif manifest:
        cause = (f"check the manifest's paths (relative ones are read from the folder holding it; "
                 f"the first: {errors[0].removeprefix(MISSING + ': ')[:200]})")
    else:
        cause = "none was found where listed: were they moved or deleted while score ran?"
    raise UsageError(f"none of the {len(errors):,} files from --input {src} could be read: {cause}")


def preflight(cfg: Config, force: bool = False, model: str | None = None, input: str | None = None,
              out: str | None = None, **_) -> dict | None:
    """What needs no Ray, so that a mistake fails in a second: the flags, the model, the
    input and where the table goes. A summary when there is nothing to do (it exists)."""
    model, src, out = check_args(model, input, out)
    meta = checkpoint.check_detector(model)  # its weights too: not a scoring actor's traceback
    # the input before the table: a missing one is no run that "already" made it
    check_input(src)
    if not (storage.is_s3(src) or is_manifest(src)):
        # a local folder's listing (milliseconds, kept for the run): an empty one is told
        # now, not after Ray's start. A prefix waits for Ray (100k keys take 100 requests),
        # a manifest is read once, by the run
        list_inputs(src, out)
    check_out(out)
    # a stopped run's parts: resumed, even over a table an earlier run wrote (a --force stopped)
    if storage.exists(out) and not force and not parts_of(parts_folder(out, src), meta):
        check_scored_by(out, meta)
        print(f"score: {out} already exists; pass --force to score again", flush=True)
        return {"out": out, "skipped": True}
    check_writable(out)
    return None


def check_scored_by(out: str, meta: dict) -> None:
    """An existing table is the answer of a rerun only when the same model made it: a
    scheduled job scoring with a retrained model would otherwise keep the old labels,
    exit 0. Tables written before the model column was kept are taken as they are."""
    import pyarrow.dataset as pa_ds

    fs, path = storage.resolve(out)
    try:
        found = pa_ds.dataset(path, filesystem=fs, format="csv" if out.lower().endswith(".csv") else "parquet")
        names = found.schema.names
    except ValueError:  # ArrowInvalid, UnicodeDecodeError
        names = []
    except PermissionError:
        raise UsageError(f"cannot read --out {out}, which exists (permission denied): give yourself "
                         "read and write permission on it, or pass another --out") from None
    if not {"path", "p_fake", "label", "error"} <= set(names):  # a manifest, a spreadsheet, another file
        raise UsageError(f"--out {out} exists and is not a table score wrote: pass --force to "
                         "replace it, or another --out")
    row = found.head(1, columns=[c for c in ("model", "threshold") if c in names]).to_pylist()
    first = [row[0]["model"]] if row and "model" in row[0] else []
    if first and first[0] != checkpoint.model_id(meta) and \
            row[0].get("threshold", float(meta.get("threshold", 0.5))) != float(meta.get("threshold", 0.5)):
        first = [f"{first[0]} (at another threshold)"]  # an earlier id covers the weights alone
    if first and first[0] not in checkpoint.model_ids(meta):
        raise UsageError(f"--out {out} holds the scores of model {first[0]}, and --model is now "
                         f"{checkpoint.model_id(meta)}: pass --force to score again with it, or another --out")


def check_out(out: str) -> None:
    """--out names the one file score writes. A folder there (a table Spark or Ray Data
    wrote as parts) read as a table "already exists", and with --force failed with
    IsADirectoryError once every file was scored."""
    if storage.is_dir(out):
        raise UsageError(f"--out {out} is a folder, and score writes one table file there: "
                         "pass another name, or remove the folder")


def file_above(path: str) -> str | None:
    """The nearest path above the local `path` that exists, when it is no folder."""
    above = os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    return None if os.path.isdir(above) else above


def check_writable(out: str) -> None:
    """A table that cannot be written is found now, not after every file is scored: a
    probe object written beside it and removed (S3: the bucket, the keys' rights), hidden
    so that a folder scored again never lists one a killed run left."""
    folder = out.rsplit("/", 1)[0]
    probe = f"{folder}/.write-check-{uuid.uuid4().hex[:8]}"  # short: `out`'s name may be 255 bytes
    try:
        storage.write_bytes(probe, b"")
        storage.delete_file(probe)
    except OSError as e:
        if not storage.is_s3(out) and (file := file_above(out)):  # the OS says only "File exists"
            raise UsageError(f"cannot write --out {out}: {file} is a file, not a folder: "
                             "pass a path in a folder") from None
        raise UsageError(s3.explain(e) or f"cannot write --out {out} "  # S3's own words, when no fix of ours
                         f"({e.strerror or str(e) or type(e).__name__}): pass a location you can write to") from None


def run(cfg: Config, force: bool = False, model: str | None = None, input: str | None = None,
        out: str | None = None, **_) -> dict:
    if done := preflight(cfg, force, model, input, out):
        return done
    model, src, out = check_args(model, input, out)
    with writing(out):
        return score_into(cfg, model, src, out)


@contextlib.contextmanager
def writing(out: str):
    """One score at a time into `out`: two (a cron job's and a hand-run one) each wrote the
    table, the last one's kept, and the first to end deleted the other's parts. A hidden
    lock folder beside it, gone once the table is written."""
    lock = hidden_beside(out, "lock")
    held = contextlib.ExitStack()
    try:
        held.enter_context(storage.exclusive(lock, "score"))
    except LockHeld as e:
        raise UsageError(f"another {e.holder} is writing --out {out}: wait for it to end, or pass "
                         "another --out") from None
    with held:
        yield
        # Gone while still held: deleted after, it freed a run that had just taken it (S3's
        # lease release already deleted the one key; a local lock file unlinked under
        # a run holding it lets a third make a new one, and both run).
        if not storage.is_s3(lock):
            with contextlib.suppress(OSError):
                storage.delete_dir(lock)


def score_into(cfg: Config, model: str, src: str, out: str) -> dict:
    meta = checkpoint.load_detector_meta(model)
    paths = list_inputs(src, out)
    started = time.monotonic()
    manifest = is_manifest(src)
    # kept by --force too: only this model's rows of these inputs are taken from them
    parts = parts_folder(out, src)
    table = score_table(cfg, model, meta, paths, src, manifest=src if manifest else None, parts=parts)
    try:
        check_some_read(table, src, manifest)  # before the table: a rerun once fixed must not find it "done"
    except UsageError:  # nor resume from rows of a setup that was wrong
        with contextlib.suppress(OSError):  # the error to show is the one above
            storage.delete_dir(parts)
        raise
    write_table(table, out, cfg)
    try:  # every input's: the table is written
        storage.delete_dir(parts_root(out))
    except OSError as e:
        print(f"score: note: could not remove {storage.shown(parts_root(out))} ({type(e).__name__}): "
              "remove it, or the next run into --out resumes from it", flush=True)
    s = summarize(table, meta, out, time.monotonic() - started)
    broken = f", {s['unscored']} the model gave no finite score for (it is broken)" if s["unscored"] else ""
    why = f" ({', '.join(f'{n} {reason}' for reason, n in s['reasons'].items())})" if s["reasons"] else ""
    print(f"score: {s['files']} files in {s['seconds']:.1f}s: {s['scored']} scored, "
          f"{s['unreadable']} set aside{why}{broken}; fake share {share(s['fake_share'])} "
          f"({s['fakes']}/{s['scored']}) by {s['model']} at threshold {s['threshold']!r} -> {out}",
          flush=True)
    return s
