"""`deepfake-ray prepare`: ingest a face dataset into WORKDIR/data with Ray Data.

Bytes are read in parallel over the cluster and decoded by our robust decoder.
Every file found lands in exactly one of manifest.parquet (usable, deduplicated,
with its split) or rejected.parquet (with the reason). Usable images are also
normalized once (square, data.resolution, JPEG at data.jpeg_quality) into
data/images/, which every later stage reads, so reals and fakes are encoded alike.
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data

from deepfake_ray import storage
from deepfake_ray.config import Config
from deepfake_ray.data import datasets, decode, sample
from deepfake_ray.data.sources import Source, resolve_source
from deepfake_ray.errors import UsageError

MANIFEST_COLUMNS = ["path", "width", "height", "format", "sha1", "bytes", "split"]
REJECTED_COLUMNS = ["path", "reason", "detail", "sha1", "bytes"]


def assign_split(sha1: str, splits: tuple[float, ...]) -> str:
    """Split from the content hash: stable across reruns, one split per distinct image."""
    u = int(sha1[:12], 16) / float(16 ** 12)
    edges = np.cumsum(splits) / sum(splits)
    return datasets.SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(splits) - 1)]


def validate(cfg: Config) -> None:
    d = cfg.data
    if not 16 <= d.resolution <= 1024:
        raise UsageError(f"data.resolution={d.resolution} is out of range: use 16..1024 (64 or 128 for the DCGAN)")
    if len(d.splits) != 3 or min(d.splits) < 0 or sum(d.splits) <= 0 or d.splits[0] <= 0:
        raise UsageError(f"data.splits={list(d.splits)} must be three non-negative fractions "
                         "(train > 0), e.g. data.splits=[0.8,0.1,0.1]")
    if not 1 <= d.jpeg_quality <= 100:
        raise UsageError(f"data.jpeg_quality={d.jpeg_quality} must be within 1..100")


def read_source(src: Source, cfg: Config) -> ray.data.Dataset:
    """A dataset of raw files: columns path, bytes."""
    if src.sample_count:
        seed = cfg.seed
        blocks = int(np.clip(src.sample_count // 256, 1, 4 * ray.cluster_resources().get("CPU", 1)))
        return ray.data.range(src.sample_count, override_num_blocks=blocks).map_batches(
            lambda b: {"path": np.array([f"sample:{seed}:{i:07d}" for i in b["id"]]),
                       "bytes": np.array([sample.face_jpeg(seed, int(i)) for i in b["id"]], dtype=object)},
            batch_size=cfg.data.decode_batch_size)
    fs, _ = storage.resolve(src.files[0])
    paths = [storage.resolve(f)[1] for f in src.files]
    # A few hundred files per read task: one task per file drowns small images in overhead.
    blocks = int(np.clip(len(paths) // 256, 1, 4 * ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, override_num_blocks=blocks)
    if storage.is_s3(src.files[0]):
        ds = ds.map_batches(lambda b: {**b, "path": np.array([f"s3://{p}" for p in b["path"]])})
    return ds


def inspect_batch(batch: dict, size: int, quality: int, max_pixels: int) -> dict:
    rows = [decode.inspect(bytes(b), size, quality, max_pixels) for b in batch["bytes"]]
    out = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out["path"] = np.asarray(batch["path"])
    return out


def keep_batch(batch: dict, kept: dict) -> pd.DataFrame:
    """Rows of usable, first-seen images with their split, ready for data/images/."""
    frame = pd.DataFrame({"path": batch["path"], "sha1": batch["sha1"], "image": batch["image"]})
    frame = frame[frame["path"].isin(kept)]
    frame["split"] = frame["path"].map(kept)
    return frame[["sha1", "split", "image"]]


def sort_rows(meta: pd.DataFrame, splits) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, rejected): decode failures and duplicates rejected, the rest split."""
    meta = meta.astype({"width": "int64", "height": "int64", "bytes": "int64", "path": str,
                        "sha1": str, "format": str, "reason": str, "detail": str})
    meta = meta.sort_values("path", kind="stable").reset_index(drop=True)
    bad = meta["reason"] != ""
    good = meta[~bad]
    first = good.drop_duplicates("sha1", keep="first")
    dups = good[~good.index.isin(first.index)].copy()
    original = dict(zip(first["sha1"], first["path"]))
    dups["reason"] = "duplicate"
    dups["detail"] = [f"duplicate: same bytes as {original[s]}" for s in dups["sha1"]]
    manifest = first.copy()
    manifest["split"] = [assign_split(s, splits) for s in manifest["sha1"]]
    rejected = pd.concat([meta[bad], dups])
    return manifest[MANIFEST_COLUMNS], rejected[REJECTED_COLUMNS].sort_values("path")


def summarize(src: Source, manifest: pd.DataFrame, rejected: pd.DataFrame, out: str,
              seconds: float) -> dict:
    return {"source": src.name, "images": int(len(manifest)), "rejected": int(len(rejected)),
            "reasons": dict(Counter(rejected["reason"])),
            "splits": {s: int((manifest["split"] == s).sum()) for s in datasets.SPLITS},
            "seconds": round(seconds, 1), "output": out}


def summary_line(s: dict) -> str:
    reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(s["reasons"].items(), key=lambda x: -x[1]))
    rejected = f"{s['rejected']:,} rejected" + (f": {reasons}" if reasons else "")
    splits = " / ".join(f"{s['splits'][k]:,} {k}" for k in datasets.SPLITS)
    return (f"prepared {s['images']:,} images ({rejected}; {splits}) in {s['seconds']:.0f}s "
            f"-> {s['output']}")


def run(cfg: Config, force: bool = False, **_) -> dict:
    out = datasets.data_dir(cfg.workdir)
    done = storage.completed(out)
    if done and not force:
        print(f"prepare: {out} is already complete ({done['images']:,} images); --force redoes it")
        return done
    validate(cfg)
    started = time.time()
    src = resolve_source(cfg.data.source, cfg.data)
    print(f"prepare: reading {src.sample_count or len(src.files):,} images from {src.name}")
    d = cfg.data
    rows = read_source(src, cfg).map_batches(
        inspect_batch, batch_size=d.decode_batch_size, num_cpus=cfg.resources.data_cpus,
        fn_kwargs=dict(size=d.resolution, quality=d.jpeg_quality, max_pixels=d.max_pixels),
    ).materialize()
    meta = rows.drop_columns(["image"]).to_pandas()
    manifest, rejected = sort_rows(meta, d.splits)
    if manifest.empty:
        raise UsageError(f"none of the {len(meta):,} files from {src.name} is a usable image "
                         f"({dict(Counter(rejected['reason']))}): check the source")
    images = datasets.images_uri(out)
    storage.delete_dir(images)
    fs, path = storage.resolve(images)
    kept = dict(zip(manifest["path"], manifest["split"]))
    rows.map_batches(keep_batch, fn_kwargs={"kept": kept}, batch_format="numpy").write_parquet(
        path, filesystem=fs)
    storage.write_parquet(datasets.manifest_uri(out), pa.Table.from_pandas(manifest, preserve_index=False))
    storage.write_parquet(storage.join(out, "rejected.parquet"),
                          pa.Table.from_pandas(rejected, preserve_index=False))
    summary = summarize(src, manifest, rejected, out, time.time() - started)
    storage.mark_complete(out, summary)
    print(summary_line(summary))
    return summary
