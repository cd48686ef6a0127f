"""`deepfake-ray generate`: fakes from the trained generator, with Ray Data.

Fake number i of seed s comes from the latent vector N(0, 1) drawn by
numpy's generator seeded with [s, i], through the generator in eval mode, given the
JPEG history of a real drawn by [s, i, 1] (the encoding a photo's source left in its
pixels, `decode.jpeg_history`; none for most), then encoded as JPEG at
data.jpeg_quality and data.resolution exactly like the reals, so the detector cannot
tell the classes apart by file format or by how often they were compressed. The
output is the same layout as WORKDIR/data (see data/datasets.py):
fakes/manifest.parquet (path "fake:<seed>:<index>"), fakes/images/*.parquet,
fakes/preview.png, _COMPLETE.json.

Splits follow the reals' content-hash rule (`prepare.assign_split` on the sha1 of
the encoded bytes). Each split gets as many fakes as the reals hold in it (or
gan.num_fakes shared in the reals' proportions): candidates are made in rounds and
the first ones of each split, in index order, are kept, so the result depends only
on the seed and the generator (on a GPU, on the kind of GPU too: their arithmetic differs).
A candidate that is a near copy of a chosen one is left out: a generator that repeats
itself would otherwise put one face in train and test alike. So is one that is a near
copy of a real photo (a generator reproducing its training images): labelled fake, it
would teach the detector that a real photo is fake.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
import pyarrow as pa
import ray.data
from ray.data.expressions import col
import torch

import deepfake_ray
from deepfake_ray import checkpoint, lineage, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.data import datasets, decode, near_copies
from deepfake_ray.data.prepare import MANIFEST_COLUMNS, assign_split
from deepfake_ray.errors import UsageError, warn
from deepfake_ray.gan import figures
from deepfake_ray.gan.train import model_uri
from deepfake_ray.models import dcgan

PREVIEW = 64
MAX_ROUNDS = 8


STAGE = lineage.Stage("generate", "fakes", ("data", "gan"),
                      lambda cfg: {"seed": cfg.seed, "gan.num_fakes": cfg.gan.num_fakes},
                      lambda d: f"{d['images']:,} fakes",
                      added=(("repeats_left_out", "before repeated faces were left out: a face the "
                              "generator drew twice may be in two splits; --force makes the fakes "
                              "again, each face once"),
                             ("copies_of_reals_left_out", "before fakes copying a real photo were left "
                              "out: a real photo may be among the fakes too; --force makes the fakes "
                              "again without such copies"),
                             ("flipped_copies_left_out", "before flipped copies counted: a fake may be "
                              "another's mirror image, or a real photo's; --force makes the fakes again "
                              "without them"),
                             ("histories", "before fakes were given the photos' own JPEG encodings: a "
                              "detector may tell them by their encoding; --force makes the fakes again "
                              "with them (where data/ lacks them too, `prepare --force` first, then the "
                              "pipeline remakes the GAN and every stage after it)")))


class FakeMaker:
    """Ray Data actor: latent indices -> encoded fake images."""

    def __init__(self, model: str, seed: int, quality: int, use_gpu: bool,
                 histories: tuple[tuple[str, float], ...] = ()):
        state, meta = checkpoint.load_model(model)
        self.G = dcgan.generator_from_meta(meta)
        self.G.load_state_dict(state)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.G.to(self.device).eval()
        if self.device.type == "cuda":  # a fake's bytes, hence its split, must not vary by run:
            # no TF32 rounding, and cuDNN's fixed algorithms instead of the fastest it times
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.seed, self.quality, self.latent = seed, quality, int(meta["latent_dim"])
        self.histories = histories

    def __call__(self, batch: dict, start: int) -> dict:
        index = batch["id"].astype(np.int64) + start
        z = np.stack([latent(self.seed, int(i), self.latent) for i in index])
        with torch.no_grad():
            pixels = dcgan.to_uint8(self.G(torch.from_numpy(z).to(self.device))).numpy()
        histories = [drawn_history(self.seed, int(i), self.histories) for i in index]
        drawn = [Image.fromarray(p) for p in pixels]
        images = [decode.jpeg_bytes(decode.with_history(picture, h), self.quality)
                  for picture, h in zip(drawn, histories)]
        return {"index": index, "history": np.array(histories, dtype=object),
                "sha1": np.array([decode.sha1(b) for b in images]),
                "bytes": np.array([len(b) for b in images], dtype=np.int64),
                "image": np.array(images, dtype=object),
                # of what the generator drew: which fakes are near copies does not hang on
                # the history each was given
                "thumb": np.array([near_copies.thumbnail(p) for p in drawn], dtype=object)}


def latent(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).standard_normal(size).astype(np.float32)


def histories_of(reals: pa.Table) -> tuple[tuple[str, float], ...]:
    """The reals' JPEG histories (decode.jpeg_history) with the cumulative share of each,
    which fakes draw theirs from: as many fakes as reals carry each. None from a data/
    prepared before they were recorded."""
    if "history" not in reals.column_names:
        return ()
    counts = Counter(reals.column("history").to_pylist())
    if set(counts) <= {""}:
        return ()
    names = sorted(counts)
    shares = np.cumsum([counts[n] for n in names]) / reals.num_rows
    return tuple(zip(names, shares.tolist()))


def drawn_history(seed: int, index: int, histories: tuple[tuple[str, float], ...]) -> str:
    """Fake `index`'s history, drawn from `histories` by its own seed: the same every run."""
    if not histories:
        return ""
    u = np.random.default_rng([seed, index, 1]).random()
    return next((name for name, edge in histories if u < edge), histories[-1][0])


def quotas(reals: pa.Table, num: int) -> dict[str, int]:
    """Fakes per split: the reals' counts, or `num` shared in the reals' proportions."""
    splits = reals.column("split").to_pylist()
    counts = {s: splits.count(s) for s in datasets.SPLITS}
    if num <= 0:
        return counts
    exact = {s: num * c / len(splits) for s, c in counts.items()}
    out = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: exact[s] - out[s], reverse=True)[:num - sum(out.values())]:
        out[s] += 1  # largest remainders
    return out


def candidates_needed(still_wanted: dict[str, int], splits) -> int:
    """Enough candidates that every split very likely fills in one round: a split of
    probability p needs about n/p of them, plus three standard deviations."""
    total = sum(splits)
    need = [(n + 3 * n ** 0.5) / (p / total)
            for n, p in zip((still_wanted[s] for s in datasets.SPLITS), splits) if n > 0 and p > 0]
    return int(max(need, default=0)) + 16


def too_few_new_faces(candidates: int, distinct: int, total: int, repeats: int, copies: int) -> UsageError:
    if copies > repeats:
        return UsageError(f"after {candidates:,} candidates only {distinct:,} of {total:,} fakes are new "
                          f"faces ({copies:,} more were near copies of real photos): the generator "
                          "reproduces the photos it trained on; train it anew (`deepfake-ray train-gan "
                          "--force`) on more photos or for fewer epochs")
    return UsageError(f"after {candidates:,} candidates only {distinct:,} of {total:,} fakes are distinct "
                      f"({repeats:,} more were copies or near copies of those): the generator has "
                      "collapsed to a few faces; train it anew (`deepfake-ray train-gan --force`), "
                      "with more epochs or another gan.lr")


def make(cfg: Config, start: int, count: int, pool: int, use_gpu: bool,
         histories: tuple[tuple[str, float], ...]) -> ray.data.Dataset:
    """Candidates start..start+count-1, made by a pool of generator actors."""
    # one block per batch: range()'s default of ~200 blocks made every later pass over
    # the candidates (selection, writing) run hundreds of tiny tasks
    blocks = -(-count // cfg.gan.generate_batch_size)
    return runtime.map_on_actor_pool(
        ray.data.range(count, override_num_blocks=blocks), FakeMaker, pool,
        fn_kwargs={"start": start}, batch_size=cfg.gan.generate_batch_size,
        fn_constructor_kwargs={"model": model_uri(cfg.workdir), "seed": cfg.seed,
                               "quality": cfg.data.jpeg_quality, "use_gpu": use_gpu,
                               "histories": histories},
        cpus=cfg.resources.cpus_per_worker, gpus=1 if use_gpu else 0).materialize()


class Selection(NamedTuple):
    chosen: dict[int, str]  # index -> split of the chosen candidates
    repeats: int  # left out: copies or near copies of a chosen candidate
    copies_of_reals: int  # left out: near copies of a real photo
    blank: int  # chosen, but nearly one grey (`near_copies.blank`): no face drawn yet


def select(rounds: list, want: dict[str, int], splits, reals: Sequence[bytes] = ()) -> Selection:
    """The first candidates of each split, in index order, but for two kinds of near copy
    (`near_copies`), given the reals' thumbnails. A generator that repeats itself (mode
    collapse) makes near copies of its fakes: in two splits, the test split would score
    fakes the detector trained on, so each picture is chosen once. One that reproduces its
    training photos makes near copies of reals: none is chosen. A group links near copies
    through any chain of them: a long chain of faces each like the next counts once, which
    only a generator that barely varies makes; a candidate linked to a real through other
    candidates counts as a copy of it."""
    meta = [ds.select_columns(["index", "sha1", "thumb"]).to_pandas() for ds in rounds]
    candidates = sorted(zip(*(np.concatenate([m[c] for m in meta]).tolist() for c in ("index", "sha1", "thumb"))))
    group, real_groups = {}, set()
    for g, members in enumerate(near_copies.groups(list(reals) + [c[2] for c in candidates])):
        for i in members:  # reals first: i < len(reals) is a real photo
            if i < len(reals):
                real_groups.add(g)
            else:
                group[i - len(reals)] = g
    chosen, seen, pictures, have = {}, set(), set(), dict.fromkeys(want, 0)
    repeats = copies = 0
    kept = []  # the chosen ones' thumbnails, counted blank at once
    for i, (index, sha1, thumb) in enumerate(candidates):
        split = assign_split(sha1, splits)
        if group.get(i) in real_groups:
            copies += 1
            continue
        if sha1 in seen or group.get(i) in pictures:  # the same bytes, or a near copy
            repeats += 1
            continue
        if have[split] >= want[split]:
            continue
        seen.add(sha1)
        if i in group:
            pictures.add(group[i])
        chosen[index] = split
        have[split] += 1
        kept.append(thumb)
    return Selection(chosen, repeats, copies, near_copies.blanks(kept))


def draw_rounds(cfg: Config, want: dict[str, int], make_round, select_from) -> tuple[list, Selection, int]:
    """Rounds of candidates (`make_round(start, count)`) until `select_from(rounds)` fills
    every split: (the rounds, the last Selection, candidates made). UsageError when the
    generator repeats itself too much to fill them."""
    total, rounds, start, chosen, kept = sum(want.values()), [], 0, {}, 1.0
    for _ in range(MAX_ROUNDS):
        have = {s: sum(1 for v in chosen.values() if v == s) for s in want}
        # as many more as are left out as repeats: sized for the gap alone, each round
        # closed part of it, and a generator that would fill the splits ran out of rounds
        count = int(candidates_needed({s: want[s] - have[s] for s in want}, cfg.data.splits) / kept)
        print(f"generate: making {count:,} candidates from index {start:,}", flush=True)
        rounds.append(make_round(start, count))
        start += count
        before = len(chosen)
        picked = select_from(rounds)
        chosen, left_out = picked.chosen, picked.repeats + picked.copies_of_reals
        if len(chosen) == total:
            return rounds, picked, start
        kept = max(0.1, 1 - left_out / start)  # below a tenth, the checks below refuse
        # nine in ten left out, or a round of nothing new: more rounds (on a cluster, GPU
        # hours) would draw the same faces again
        mostly_left_out = left_out > 0 and left_out >= 9 * len(chosen)
        stuck = left_out > len(chosen) and (len(chosen) == before or len(rounds) == MAX_ROUNDS)
        if mostly_left_out or stuck:
            raise too_few_new_faces(start, len(chosen), total, picked.repeats, picked.copies_of_reals)
    if left_out:  # repeats kept the splits from filling, not the splits
        raise too_few_new_faces(start, len(chosen), total, picked.repeats, picked.copies_of_reals)
    raise UsageError(f"after {start:,} candidates only {len(chosen):,} of {total:,} fakes "
                     f"fill the splits {want}: check data.splits against the reals' splits")


def generate(cfg: Config, want: dict[str, int], histories: tuple[tuple[str, float], ...] = ()
             ) -> tuple[ray.data.Dataset, Selection]:
    """The chosen fakes, and the `Selection` that chose them."""
    use_gpu = runtime.use_gpus(cfg.resources.use_gpu)
    pool = max(1, cfg.resources.workers)
    if use_gpu:  # one actor per GPU up, or as many as the training used: the autoscaler adds them
        pool = max(pool, runtime.cluster_gpus())
    reals = list(datasets.thumbnails(datasets.data_dir(cfg.workdir)).values())
    rounds, picked, start = draw_rounds(cfg, want, lambda start, count: make(cfg, start, count, pool, use_gpu, histories),
                                        lambda rounds: select(rounds, want, cfg.data.splits, reals))
    total, chosen = sum(want.values()), picked.chosen
    if picked.repeats:
        print(f"generate: left out {picked.repeats:,} copies or near copies of chosen fakes (of {start:,} "
              "candidates): the generator repeats itself that often", flush=True)
    if picked.copies_of_reals:
        print(f"generate: left out {picked.copies_of_reals:,} near copies of real photos (of {start:,} "
              "candidates): the generator reproduces real photos that often", flush=True)
    if picked.blank:
        warn(f"generate: warning: {picked.blank:,} of {total:,} fakes are nearly one grey, no face: the "
             "generator has not learned to draw yet, and a detector would tell them by that alone; "
             "train it longer (`deepfake-ray train-gan --set gan.epochs=N`, N above its epochs, goes on "
             "from its last checkpoint)")
    ds = rounds[0] if len(rounds) == 1 else rounds[0].union(*rounds[1:])
    return runtime.map_on_tasks(ds, datasets.keep_chosen, fn_kwargs={"chosen": chosen}, batch_format="numpy"), picked


def write(cfg: Config, out: str, ds: ray.data.Dataset) -> pa.Table:
    """images/*.parquet and manifest.parquet in the reals' layout; returns the manifest."""
    images = datasets.images_uri(out)
    storage.delete_dir(images)
    fs, path = storage.resolve(images)
    ds.select_columns(datasets.IMAGES_COLUMNS).write_parquet(path, filesystem=fs, **datasets.IMAGES_PARQUET)
    meta = ds.select_columns(["index", "sha1", "bytes", "split", "history"]).to_pandas()
    meta = meta.sort_values("index", kind="stable")
    r = cfg.data.resolution
    text = lambda values: pa.array(list(values), pa.large_string())  # noqa: E731 - as the reals
    manifest = pa.table({"path": text(f"fake:{cfg.seed}:{int(i):07d}" for i in meta["index"]),
                         "width": pa.array([r] * len(meta), pa.int64()),
                         "height": pa.array([r] * len(meta), pa.int64()),
                         "format": text(["JPEG"] * len(meta)), "sha1": text(meta["sha1"]),
                         "bytes": pa.array(meta["bytes"].tolist(), pa.int64()),
                         "split": text(meta["split"]),
                         "near_copy_of": text([""] * len(meta)),
                         "history": text(meta["history"])}).select(MANIFEST_COLUMNS)
    storage.write_parquet(datasets.manifest_uri(out), manifest)
    return manifest


def preview(out: str, ds: ray.data.Dataset, chosen: dict[int, str]) -> None:
    first = sorted(chosen)[:PREVIEW]
    rows = ds.filter(expr=col("index").is_in(first)).take_all()
    rows.sort(key=lambda row: int(row["index"]))
    pixels = np.stack([decode.decode_jpeg(row["image"]) for row in rows])
    storage.write_bytes(storage.join(out, "preview.png"), figures.grid_png(pixels))


def check_encoding(cfg: Config) -> None:
    """Fakes are encoded as the reals were stored: at another JPEG quality the detector
    would learn the encoding instead of the faces. (Run alone, generate takes the reals'
    quality before it starts, `lineage.as_made_upstream`, or refuses another one asked for;
    this is `pipeline`'s check, which may be about to store the reals anew.)"""
    reals = storage.completed(datasets.data_dir(cfg.workdir)) or {}
    stored, asked = reals.get("settings", {}).get("data.jpeg_quality"), cfg.data.jpeg_quality
    if stored is not None and stored != asked:
        raise UsageError(f"the reals were stored at data.jpeg_quality={stored}, and fakes must be "
                         f"encoded as they are: set data.jpeg_quality={stored}, or store the reals "
                         f"anew with `deepfake-ray prepare --force --set data.jpeg_quality={asked}`")


def check(cfg: Config, read: dict) -> tuple[pa.Table, dict]:
    lineage.check_inputs(cfg, STAGE, read)
    reals = datasets.require_manifest(datasets.data_dir(cfg.workdir), "prepare")
    check_encoding(cfg)
    meta = checkpoint.load_meta(model_uri(cfg.workdir))
    if int(meta["resolution"]) != cfg.data.resolution:
        raise UsageError(f"the generator makes {meta['resolution']} px images but data.resolution "
                         f"is {cfg.data.resolution}: set data.resolution={meta['resolution']}")
    if cfg.gan.num_fakes < 0:
        raise UsageError(f"gan.num_fakes={cfg.gan.num_fakes}: give a count, or 0 for as many as the reals")
    return reals, meta


def run(cfg: Config, force: bool = False, **_) -> dict:
    out = datasets.fakes_dir(cfg.workdir)
    read: dict = {}  # the input markers, read once for both checks
    reals, meta = check(cfg, read)  # before plan: with --force, a mistake must not unmark complete fakes
    plan = lineage.plan(cfg, STAGE, force, read)
    if plan.done:
        return plan.done
    storage.delete_dir(out)  # a forced or interrupted earlier run, its marker with it
    want = quotas(reals, cfg.gan.num_fakes)
    started = time.time()
    histories = histories_of(reals)
    ds, picked = generate(cfg, want, histories)
    ds = ds.materialize()
    manifest = write(cfg, out, ds)
    preview(out, ds, picked.chosen)
    splits = manifest.column("split").to_pylist()
    summary = {"images": manifest.num_rows, "splits": {s: splits.count(s) for s in datasets.SPLITS},
               "seed": cfg.seed, "resolution": cfg.data.resolution,
               "jpeg_quality": cfg.data.jpeg_quality, "model": checkpoint.model_id(meta),
               "repeats_left_out": picked.repeats, "copies_of_reals_left_out": picked.copies_of_reals,
               "blank_fakes": picked.blank, "flipped_copies_left_out": True,  # see STAGE.added
               "histories": dict(Counter(h for h in manifest.column("history").to_pylist() if h)),
               # a fake's bytes, hence its split, are those of this software on this kind of device
               "software": deepfake_ray.versions(), "device": "gpu" if runtime.use_gpus(cfg.resources.use_gpu) else "cpu",
               "seconds": round(time.time() - started, 1), "output": out}
    summary = lineage.complete(cfg, STAGE, summary, plan.made)
    print(f"generate: {summary['images']:,} fakes ({' / '.join(f'{n:,} {s}' for s, n in summary['splits'].items())}) "
          f"in {summary['seconds']:.0f}s -> {out}")
    return summary
