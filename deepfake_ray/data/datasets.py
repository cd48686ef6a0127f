"""Ray Data views of the prepared images, shared by the GAN and the detector.

`prepare` (reals) and `generate` (fakes) write the same layout:

    STAGE/manifest.parquet      one row per image: path, width, height, format, sha1, split, ...
    STAGE/images/*.parquet      sha1, image (square JPEG at data.resolution, data.jpeg_quality):
                                reals and fakes are encoded identically; thumb
                                (`near_copies.thumbnail`, absent before 2026-12-03)
    STAGE/_COMPLETE.json        written last

The manifest alone says each image's split. `prepare` writes the parts while the ingest
runs and decides the splits after it (a near copy takes its picture's), so a split kept in
the parts as well meant rewriting most of them (parts made before 2026-12-04 hold one:
readers ignore it).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
import ray.data

from deepfake_ray import runtime, storage
from deepfake_ray.data import near_copies
from deepfake_ray.data.decode import decode_jpeg
from deepfake_ray.errors import UsageError

if TYPE_CHECKING:  # annotations only: Ray Data's workers import this module without torch
    import pyarrow
    import torch

SPLITS = ("train", "val", "test")
# How images parts are written (pyarrow.parquet.write_table's options). Dictionaries and
# min/max statistics of unique hashes and JPEG blobs cost every write and help no read
# (a part of 1,500 images: 4.5 -> 2.9 ms); snappy stays, as each JPEG repeats its headers (-12%).
IMAGES_PARQUET = dict(use_dictionary=False, write_statistics=False)
IMAGES_COLUMNS = ["sha1", "image", "thumb"]


def write_images_part(uri: str, table: pyarrow.Table) -> None:
    """One images part (IMAGES_COLUMNS), written as every images part is."""
    storage.write_parquet(uri, table, **IMAGES_PARQUET)


# what the stages after prepare do with each split
SPLIT_USES = {"train": "the GAN and the detector train there",
              "val": "the detector's best epoch and threshold are chosen there",
              "test": "evaluate measures the detector there, on images it never saw"}


def split_name(split: str) -> str:
    """A split as messages and the README name it: `val` is the validation split."""
    return "validation" if split == "val" else split


def require_share(splits: tuple[float, ...], split: str) -> None:
    """UsageError when data.splits gives `split` ("val", "test") nothing; prepare takes
    that, so the stages that need the split check it before anything runs."""
    if len(splits) == 3 and not splits[SPLITS.index(split)] > 0:  # else prepare's check says what
        raise UsageError(f"data.splits={list(splits)} leaves the {split_name(split)} split empty: {SPLIT_USES[split]}; "
                         "give it a share, e.g. --set 'data.splits=[0.8,0.1,0.1]'")


def empty_splits(prepared: dict) -> list[str]:
    """The splits that a prepare's summary (its marker) counts no image in: a small folder's
    hashes can leave one empty whatever its share (20 photos at 0.8/0.1/0.1: ~1 in 4)."""
    counts = prepared.get("splits")
    return [split for split in SPLITS if not counts.get(split)] if isinstance(counts, dict) else []


def first_image(stage_uri: str) -> bytes:
    """The first stored image of a stage's images parts (a part can be empty: `prepare`
    rewrites one without the copies kept in another), read a row group at a time."""
    import pyarrow.parquet as pq

    for uri in (f for f in storage.list_files(images_uri(stage_uri)) if f.endswith(".parquet")):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            part = pq.ParquetFile(f)
            for group in range(part.num_row_groups):
                if part.metadata.row_group(group).num_rows:
                    return part.read_row_group(group, columns=["image"]).column("image")[0].as_py()
    raise UsageError(f"{images_uri(stage_uri)} holds no images: rerun the stage that makes "
                     f"{stage_uri} with --force")


def data_dir(workdir: str) -> str:
    return storage.join(workdir, "data")


def fakes_dir(workdir: str) -> str:
    return storage.join(workdir, "fakes")


def manifest_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, "manifest.parquet")


def images_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, "images")


def require_manifest(stage_uri: str, made_by: str, columns: list[str] | None = None) -> pyarrow.Table:
    """The manifest of a complete stage (`columns` of it), or UsageError saying which
    command makes it."""
    uri = manifest_uri(stage_uri)
    if not storage.completed(stage_uri) or not storage.exists(uri):
        raise UsageError(f"{uri} is missing or incomplete: run `deepfake-ray {made_by}` "
                         "with this --workdir first")
    table = storage.read_parquet(uri, columns)
    if table.num_rows == 0:
        raise UsageError(f"{uri} lists no images: `deepfake-ray {made_by}` found nothing usable; "
                         "check its source and rejected.parquet")
    return table


def split_hashes(stage_uri: str, split: str) -> pyarrow.Array:
    """The sha1 of every image the stage's manifest puts in `split`."""
    import pyarrow.compute as pc

    manifest = storage.read_parquet(manifest_uri(stage_uri), columns=["sha1", "split"])
    return manifest.filter(pc.equal(manifest["split"], split))["sha1"].combine_chunks()


def read_split(stage_uri: str, split: str) -> ray.data.Dataset:
    """Columns sha1, image (JPEG bytes) of one split, as the manifest draws it."""
    fs, path = storage.resolve(images_uri(stage_uri))
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["sha1", "image"])
    # the hashes ride in the map's arguments, which Ray Data puts in the object store once
    return runtime.map_on_tasks(ds, rows_among, fn_kwargs={"hashes": split_hashes(stage_uri, split)},
                                batch_format="pyarrow", batch_size=None)


def rows_among(batch: pyarrow.Table, hashes: pyarrow.Array) -> pyarrow.Table:
    """The rows of `batch` whose sha1 is one of `hashes`."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch["sha1"], value_set=hashes.cast(batch.schema.field("sha1").type)))


def thumbnails(stage_uri: str) -> dict[str, bytes]:
    """sha1 -> `near_copies.thumbnail` of every stored image: read (256 bytes an image),
    or, where images were stored before their thumbnails were, made from them."""
    import pyarrow.dataset

    fs, path = storage.resolve(images_uri(stage_uri))
    stored = pyarrow.dataset.dataset(path, filesystem=fs, format="parquet")
    if "thumb" in stored.schema.names:  # the first part's schema: absent from another, it reads as nulls
        table = stored.to_table(columns=["sha1", "thumb"])
        if table.column("thumb").null_count == 0:
            return dict(zip(table.column("sha1").to_pylist(), table.column("thumb").to_pylist()))
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["sha1", "image"])
    made = runtime.map_on_tasks(ds, thumbnail_batch, batch_format="numpy").to_pandas()
    return dict(zip(made["sha1"], made["thumb"]))


def thumbnail_batch(batch: dict) -> dict:
    return {"sha1": batch["sha1"], "thumb": np.array(
        [near_copies.thumbnail(Image.fromarray(decode_jpeg(b))) for b in batch["image"]], dtype=object)}


# A training's images are held in the object store for the whole training, decoded when
# that takes at most this share of it: decoded, 128 px faces are ~49 KB each (1M reals and
# their fakes: ~88 GB), their JPEGs ~5x less, and decoding them again each epoch costs
# ~0.3 ms of CPU an image, beside a GPU's forward and backward pass.
DECODED_SHARE = 0.25


# --- training's order (deterministic=true) ----------------------------------------------

@contextlib.contextmanager
def in_order(deterministic: bool):
    """With `deterministic`, the datasets made meanwhile hand their blocks on in order
    (preserve_order: a dataset copies Ray Data's context when it is made, and what is made
    from it keeps that copy, run when it may), so reads, the shuffle and the blocks' order
    are the same on a rerun, however Ray's tasks finish; this process's context is left as
    it was."""
    options = ray.data.DataContext.get_current().execution_options
    kept = options.preserve_order
    options.preserve_order = kept or deterministic
    try:
        yield
    finally:
        options.preserve_order = kept


def block_order_seed(deterministic: bool, seed: int) -> ray.data.RandomSeedConfig | None:
    """randomize_block_order's seed: each epoch (each run of the dataset) another order,
    drawn from the seed with `deterministic`, else at random."""
    return ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True) if deterministic else None


def decoded_bytes(images: int, resolution: int) -> int:
    return images * resolution ** 2 * 3


def object_store_bytes() -> float:
    return ray.cluster_resources().get("object_store_memory", 0)


def decoded_fits(images: int, resolution: int, copies: int = 1) -> bool:
    """Whether `images` decoded, `copies` of them at once, take at most DECODED_SHARE of
    the cluster's object store (as its size is when the training starts)."""
    return copies * decoded_bytes(images, resolution) <= DECODED_SHARE * object_store_bytes()


def decode_batch(batch: dict) -> dict:
    """JPEG bytes -> uint8 NHWC `pixels`; other columns pass through."""
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = np.stack([decode_jpeg(b) for b in batch["image"]])
    return out


def keep_chosen(batch: dict, chosen: dict[int, str]) -> pyarrow.Table:
    """Ray Data task of `generate`: the chosen candidates with their split, typed like the
    reals' tables. Here, not in generate.py, so its workers never import torch."""
    import pyarrow as pa

    keep = np.array([int(i) in chosen for i in batch["index"]], dtype=bool)
    index = batch["index"][keep]
    return pa.table({"index": pa.array(index, pa.int64()),
                     "sha1": pa.array(batch["sha1"][keep].tolist(), pa.large_string()),
                     "bytes": pa.array(batch["bytes"][keep], pa.int64()),
                     "image": pa.array(batch["image"][keep].tolist(), pa.binary()),
                     "thumb": pa.array(batch["thumb"][keep].tolist(), pa.binary()),
                     "split": pa.array([chosen[int(i)] for i in index], pa.large_string()),
                     "history": pa.array(batch["history"][keep].tolist(), pa.large_string())})


def to_unit_range(pixels) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> float NCHW in [-1, 1], the scale both models train on."""
    import torch

    x = torch.as_tensor(pixels)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
