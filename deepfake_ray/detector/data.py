"""The detector's labelled data: reals (WORKDIR/data, label 0) and fakes (WORKDIR/fakes, label 1).

The driver picks, per split, a balanced set of content hashes from the two manifests
(`select`), after the leakage guards: no image in two splits, no image both real and
fake, reals and fakes encoded the same way (size, JPEG tables, chroma subsampling).
Ray Data then reads, labels and decodes them (`dataset`); `training_views` holds train
and val for the training (decoded once, or as JPEGs where that would not fit) and
augments the training split's pixels.

The image transforms used for training augmentation and for the robustness
evaluation live here too, so both apply exactly the same operations.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import ray.data
from ray.data.expressions import col, random as random_column
from PIL import Image, ImageFilter

from deepfake_ray import checkpoint, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.data import datasets
from deepfake_ray.data.decode import decode_jpeg, encode_jpeg
from deepfake_ray.errors import UsageError, warn

REAL, FAKE = 0, 1


@dataclass
class Selection:
    """Content hashes chosen per split and class, and fingerprints of the manifests."""
    hashes: dict[str, dict[int, list[str]]]
    fingerprints: dict[str, str]
    resolution: int
    jpeg_quality: int  # the reals were stored at (and the fakes encoded as they were)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        self.counts = {s: {"real": len(c[REAL]), "fake": len(c[FAKE])} for s, c in self.hashes.items()}


def select(cfg: Config, splits=datasets.SPLITS, trained: bool = True) -> Selection:
    """Balanced hashes for `splits`, or UsageError (missing stages, leakage, too few images).
    `trained`: Ray Train splits them over resources.workers (evaluate only scores them)."""
    real_dir, fake_dir = datasets.data_dir(cfg.workdir), datasets.fakes_dir(cfg.workdir)
    # the two columns used: at 10M rows the whole manifests were ~10 GB on the driver
    reals = datasets.require_manifest(real_dir, "prepare", ["sha1", "split"]).to_pandas()
    fakes = datasets.require_manifest(fake_dir, "generate", ["sha1", "split"]).to_pandas()
    check_leakage(reals, fakes)
    resolution = check_encoding(real_dir, fake_dir, cfg.data.resolution)
    hashes = {}
    for split in splits:
        real = sorted(reals.loc[reals["split"] == split, "sha1"])
        fake = sorted(fakes.loc[fakes["split"] == split, "sha1"])
        n = min(len(real), len(fake))
        if split == "train" and cfg.detector.max_train_per_class > 0:
            n = min(n, cfg.detector.max_train_per_class)
        if n == 0:
            more = ("more reals: prepare a larger source" if not real else
                    f"more fakes: `deepfake-ray generate --force --num N` with N above the {len(fakes):,} "
                    "made (they are split as the reals are)")
            raise UsageError(f"the {datasets.split_name(split)} split holds {len(real)} real and {len(fake)} fake images; "
                             f"both are needed: {more}")
        capped = split == "train" and 0 < cfg.detector.max_train_per_class < min(len(real), len(fake))
        if trained:
            check_per_worker(split, 2 * n, cfg.resources.workers, capped)
        if split == "train" and (share := 2 * n // cfg.resources.workers) < cfg.detector.batch_size:
            warn(f"warning: detector.batch_size={cfg.detector.batch_size} is more than the {share:,} training "
                 f"images each of resources.workers={cfg.resources.workers} gets: an epoch is one step")
        rng = np.random.default_rng(cfg.seed)  # a seeded, class-independent subsample
        # (indices permuted: the same draw as permuting the hashes, without a copy of them)
        hashes[split] = {label: sorted(chosen[i] for i in rng.permutation(len(chosen))[:n])
                         for label, chosen in ((REAL, real), (FAKE, fake))}
    fingerprints = {"real_manifest_sha1": file_sha1(datasets.manifest_uri(real_dir)),
                    "fake_manifest_sha1": file_sha1(datasets.manifest_uri(fake_dir))}
    stored = (storage.completed(real_dir) or {}).get("settings", {}).get("data.jpeg_quality")
    return Selection(hashes, fingerprints, resolution, int(stored or cfg.data.jpeg_quality))


def check_per_worker(split: str, images: int, workers: int, capped: bool = False) -> None:
    """Ray Train splits a split equally. A validation share may be one image; a training
    share must be two, as a batch of one is skipped (batch norm cannot train on it), so
    workers with one image each would train nothing and publish an untrained model.
    `capped`: detector.max_train_per_class is what holds the split so small."""
    least = {"train": 2, "val": 1}.get(split, 0)
    if images < least * workers:
        more = " (or raise detector.max_train_per_class)" if capped else ""
        raise UsageError(f"the {datasets.split_name(split)} split selects {images} images, fewer than {least} for each of "
                         f"resources.workers={workers}, so some workers would get too few to "
                         f"{'train' if split == 'train' else 'validate'}: use fewer workers or "
                         f"prepare more images{more}")


def file_sha1(uri: str) -> str:
    return hashlib.sha1(storage.read_bytes(uri)).hexdigest()


def check_leakage(reals, fakes) -> None:
    """UsageError when one image is in two splits, or is labelled both real and fake."""
    for name, frame in (("real", reals), ("fake", fakes)):
        per_hash = frame.groupby("sha1")["split"].nunique()
        leaked = per_hash[per_hash > 1]
        if len(leaked):
            raise UsageError(f"{len(leaked)} {name} image(s) sit in two splits (e.g. sha1 "
                             f"{leaked.index[0]}): the test split would leak into training; "
                             f"rerun `deepfake-ray {'prepare' if name == 'real' else 'generate'} --force`")
    both = set(reals["sha1"]) & set(fakes["sha1"])
    if both:
        raise UsageError(f"{len(both)} image(s) are in both the real and the fake manifest (e.g. sha1 "
                         f"{sorted(both)[0]}): regenerate the fakes with `deepfake-ray generate --force`")


def jpeg_signature(jpeg: bytes) -> dict:
    """What a detector could learn instead of the content: size, format, tables, subsampling."""
    from PIL import JpegImagePlugin

    img = Image.open(io.BytesIO(jpeg))
    tables = getattr(img, "quantization", None) or {}
    return {"format": img.format, "size": list(img.size),
            "subsampling": JpegImagePlugin.get_sampling(img) if img.format == "JPEG" else None,
            "tables": hashlib.sha1(repr(sorted((k, list(v)) for k, v in tables.items())).encode()
                                   ).hexdigest()[:12]}


def check_encoding(real_dir: str, fake_dir: str, resolution: int) -> int:
    """Reals and fakes must be encoded identically; returns their common resolution."""
    real, fake = jpeg_signature(datasets.first_image(real_dir)), jpeg_signature(datasets.first_image(fake_dir))
    if real != fake:
        raise UsageError(f"reals ({real}) and fakes ({fake}) are encoded differently, so a detector "
                         "could learn the encoding instead of the faces: rerun `deepfake-ray generate "
                         "--force` with the same data.resolution and data.jpeg_quality as prepare")
    if real["size"] != [resolution, resolution]:
        raise UsageError(f"the prepared images are {real['size'][0]} px but data.resolution="
                         f"{resolution}: use --set data.resolution={real['size'][0]} or rerun "
                         "prepare and generate with --force")
    return resolution


# --- Ray Data ------------------------------------------------------------------------

def dataset(cfg: Config, selection: Selection, splits: str | tuple[str, ...],
            decoded: bool = True) -> ray.data.Dataset:
    """Columns sha1, split, label (0 real, 1 fake), pixels (uint8 NHWC) of the selected
    images; `decoded` False: image (the stored JPEG's bytes) instead of pixels.

    Both stages are read by one read_parquet, and selecting, labelling and decoding are
    one map fused into the read tasks: few tasks, even for tiny sets.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    fs, real = storage.resolve(datasets.images_uri(datasets.data_dir(cfg.workdir)))
    _, fake = storage.resolve(datasets.images_uri(datasets.fakes_dir(cfg.workdir)))
    ds = ray.data.read_parquet([real, fake], filesystem=fs).select_columns(["sha1", "image"])
    return runtime.map_on_tasks(ds, decode_labelled, fn_kwargs={"wanted": Wanted.of(selection, splits),
                                                              "decoded": decoded},
                                batch_format="numpy", batch_size=cfg.data.decode_batch_size,
                                num_cpus=cfg.resources.data_cpus)


class Wanted(NamedTuple):
    """The selected hashes, sorted, with each one's split and label (the manifests' splits,
    which the parts do not hold). Arrays, not a dict: every read task unpickles its
    arguments, and a dict of 1.8M hashes (1M reals) was ~350 MB and ~0.7 s in each; arrays
    arrive as they are, from the object store."""
    sha1: np.ndarray  # bytes, sorted
    split: np.ndarray  # index into splits
    label: np.ndarray
    splits: tuple[str, ...]

    @classmethod
    def of(cls, selection: Selection, splits: tuple[str, ...]) -> Wanted:
        groups = [(np.array(hashes, dtype="S"), i, label) for i, split in enumerate(splits)
                  for label, hashes in selection.hashes[split].items()]
        sha1 = np.concatenate([hashes for hashes, _, _ in groups])
        split, label = (np.concatenate([np.full(len(hashes), group[k], np.int8) for hashes, *group in groups])
                        for k in (0, 1))
        order = np.argsort(sha1)
        return cls(sha1[order], split[order], label[order], splits)

    def find(self, sha1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions in `sha1` (text) of selected hashes, and theirs in this table."""
        keys = np.asarray(sha1).astype(self.sha1.dtype)
        at = np.searchsorted(self.sha1, keys).clip(max=len(self.sha1) - 1)
        rows = np.flatnonzero(self.sha1[at] == keys)
        return rows, at[rows]


# deterministic=true: a column of uniform draws (ray.data.expressions.random) that seeds its
# batch's augmentation: the same on a rerun, wherever Ray runs the batch, and new each epoch
DRAW = "augmentation_draw"


def training_views(cfg: Config, selection: Selection, command: str = "train-detector") -> dict[str, ray.data.Dataset]:
    """train and val for Ray Train, read once (materialized), columns pixels and label:
    decoded once where they fit the object store (`keeps_decoded`), else kept as the
    stored JPEGs and decoded as each epoch reads them.

    One read for both splits (a Parquet read has a fixed start-up cost), then each split
    is cut from the read blocks in memory; train's rows are shuffled once. Each epoch
    only reorders train's blocks (the trainer's local shuffle buffer mixes rows; horizontal
    flips happen on the worker's tensors) and, when configured, re-draws JPEG/blur
    augmentations in Ray Data. With deterministic=true the blocks keep their order and the
    seed draws each epoch's block order and augmentations: a rerun trains on the same batches.
    """
    d = cfg.detector
    decoded = keeps_decoded(cfg, selection, command)
    column = "pixels" if decoded else "image"
    with datasets.in_order(cfg.deterministic):
        both = dataset(cfg, selection, ("train", "val"), decoded=decoded).materialize()
        views = {split: both.filter(expr=col("split") == split).select_columns([column, "label"])
                 for split in ("train", "val")}
        # An images part holds one class, and decoded it is one block of up to thousands of
        # rows, more than the trainer's shuffle buffer (16 batches): blocks of 600 and that
        # buffer made 38% of batches over 80% one class, which batch norm learns from. Rows
        # shuffled once mix them as drawing at random would (blocks of a batch's rows still
        # left 3-9% of batches so, against ~2% by chance).
        views["train"] = views["train"].random_shuffle(seed=cfg.seed)
        views = {split: view.materialize() for split, view in views.items()}
    train = views["train"].randomize_block_order(seed=datasets.block_order_seed(cfg.deterministic, cfg.seed))
    val = views["val"]
    augments = d.jpeg_aug_prob > 0 or d.blur_aug_prob > 0
    if augments:  # one map: decoded (if kept as JPEGs), then augmented
        if cfg.deterministic:  # each row's draws from the seed, another each epoch
            train = train.with_column(DRAW, random_column(seed=cfg.seed, reseed_after_execution=True))
        train = runtime.map_on_tasks(
            train, augment_batch, fn_kwargs=dict(jpeg_prob=d.jpeg_aug_prob, jpeg_quality=d.jpeg_aug_quality,
                                                 blur_prob=d.blur_aug_prob, blur_sigma=d.blur_aug_sigma,
                                                 stored_quality=selection.jpeg_quality),
            batch_format="numpy", batch_size=cfg.data.decode_batch_size, num_cpus=cfg.resources.data_cpus)
    elif not decoded:  # decoded alone: no pass over the pixels that changes none
        train = runtime.map_on_tasks(train, decoded_batch, batch_format="numpy",
                                     batch_size=cfg.data.decode_batch_size, num_cpus=cfg.resources.data_cpus)
    if not decoded:
        val = runtime.map_on_tasks(val, decoded_batch, batch_format="numpy", batch_size=cfg.data.decode_batch_size,
                                   num_cpus=cfg.resources.data_cpus)
    return {"train": train, "val": val}


def keeps_decoded(cfg: Config, selection: Selection, command: str) -> bool:
    """Whether train and val, decoded, fit the object store (datasets.decoded_fits; twice
    over: as read, then as the views cut from it); else said, and kept as JPEGs."""
    images = sum(selection.counts[s]["real"] + selection.counts[s]["fake"] for s in ("train", "val"))
    if datasets.decoded_fits(images, cfg.data.resolution, copies=2):
        return True
    print(f"{command}: {images:,} images decoded would take "
          f"{datasets.decoded_bytes(images, cfg.data.resolution) / 1e9:.1f} GB of the cluster's "
          f"{datasets.object_store_bytes() / 1e9:.1f} GB object store: kept as the stored JPEGs, decoded as "
          "each epoch reads them", flush=True)
    return False


def decoded_batch(batch: dict) -> dict:
    """A batch of stored JPEGs (`image`) as pixels."""
    return {"label": batch["label"], "pixels": np.stack([decode_jpeg(b) for b in batch["image"]])}


def decode_labelled(batch: dict, wanted: Wanted, decoded: bool = True) -> Iterator[dict]:
    """The batch's selected rows, decoded (or their JPEGs); nothing for a batch with none,
    because Ray Data cannot type an empty image column and falls back to pickling it,
    with a warning."""
    keep, at = wanted.find(batch["sha1"])
    if not len(keep):
        return
    images = ({"pixels": np.stack([decode_jpeg(batch["image"][i]) for i in keep])} if decoded
              else {"image": np.asarray(batch["image"], dtype=object)[keep]})
    yield {"sha1": np.asarray(batch["sha1"], dtype=object)[keep],
           "split": np.asarray(wanted.splits, dtype=object)[wanted.split[at]],
           "label": wanted.label[at].astype(np.int64), **images}


def augment_batch(batch: dict, jpeg_prob: float, jpeg_quality, blur_prob: float, blur_sigma,
                  stored_quality: int | None = None) -> dict:
    """Wang et al. 2020: random Gaussian blur, then random JPEG re-compression, per image.
    An image so degraded is then encoded as the stored images are (`stored_quality`), as
    the service and `score` encode any upload not stored so: trained on what it is shown.
    A batch of stored JPEGs (`image`, see training_views) is decoded first."""
    # deterministic=true: seeded by the rows' draws (training_views), all of them, as the
    # integers a seed takes; else at random
    draws = batch.pop(DRAW, None)
    if "image" in batch:
        batch = decoded_batch(batch)
    rng = np.random.default_rng(None if draws is None else (np.asarray(draws) * 2**32).astype(np.uint64))
    out = []
    for img in batch["pixels"]:
        degraded = img
        if blur_prob > 0 and rng.random() < blur_prob:
            degraded = blur(degraded, rng.uniform(*blur_sigma))
        if jpeg_prob > 0 and rng.random() < jpeg_prob:
            degraded = jpeg(degraded, int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
        if degraded is not img and stored_quality is not None:
            degraded = decode_jpeg(encode_jpeg(degraded, stored_quality))
        out.append(degraded)
    return {**batch, "pixels": np.stack(out) if out else batch["pixels"]}


# --- image transforms (augmentation and robustness) ----------------------------------

def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return decode_jpeg(buf.getvalue())


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(sigma))))


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Down by `factor` and back to the original size (a social network's resize)."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                        Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def transform(img: np.ndarray, name: str) -> np.ndarray:
    """A robustness condition by name: clean, jpeg_q95, jpeg_q75, jpeg_q50, downscale_0.5, blur_1.0."""
    kind, _, arg = name.partition("_")
    if kind == "clean":
        return img
    if kind == "jpeg":
        return jpeg(img, int(arg.lstrip("q")))
    if kind == "downscale":
        return rescale(img, float(arg))
    if kind == "blur":
        return blur(img, float(arg))
    raise ValueError(f"unknown robustness condition {name!r}")


class Scorer:
    """`evaluate`'s Ray Data actor: loads the exported model once, scores each condition
    (`transform`) of a batch's test images, and its validation images clean. Here rather
    than in evaluate.py, whose figures and Ray Train imports would cost every actor process
    seconds of start-up for nothing."""

    def __init__(self, model_uri: str, conditions: list[str]):
        import torch

        from deepfake_ray.models import detector, detector_autocast

        state, self.meta = checkpoint.load_model(model_uri)
        self.device = torch.device(runtime.assigned_device())
        self.model = detector.from_meta(self.meta, state).to(self.device)
        self.conditions, self.quality = conditions, checkpoint.stored_quality(self.meta)
        self.amp = detector_autocast(self.meta, self.device)
        runtime.freeze_startup_objects()  # as the scoring actor's (serving/score.py)

    def __call__(self, batch: dict) -> dict:
        import torch

        from deepfake_ray.models import detector

        split = batch["split"]
        out = {"sha1": batch["sha1"], "split": split, "label": batch["label"]}
        held_out = split == "test"  # validation images are scored clean only: thresholds are chosen on them
        for name in self.conditions:
            rows = np.arange(len(held_out)) if name == "clean" else np.flatnonzero(held_out)
            out[f"p_{name}"] = np.full(len(held_out), np.nan)
            if len(rows):
                pixels = np.stack([self.as_served(transform(batch["pixels"][i], name), name) for i in rows])
                x = detector.meta_input(torch.as_tensor(pixels).to(self.device), self.meta)
                out[f"p_{name}"][rows] = detector.p_fake(detector.predict(self.model, x, self.amp))
        return out

    def as_served(self, pixels: np.ndarray, condition: str) -> np.ndarray:
        """A degraded image as the service and `score` would score it: re-encoded in the
        stored encoding first, as every image not already stored so is (a clean test image
        is). The figures then say what the deployed detector would answer."""
        if condition == "clean" or self.quality is None:
            return pixels
        return decode_jpeg(encode_jpeg(pixels, self.quality))
