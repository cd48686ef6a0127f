"""Near copies: one picture saved more than once with other bytes (recompressed,
resized, relabelled, lightly retouched). UTKFace's first 5,000 crops hold ~50 such
pairs beside their 36 exact copies, the same photo filed under two ages. Each copy is
a usable image and is kept, but all copies of a picture go to one split: across two,
the test split would score a picture the model trained on.

Two images are near copies when their 16x16 grayscale thumbnails correlate at
>= SIMILAR (mean and contrast removed). Measured on those 5,000 crops: every pair at
>= 0.97 is one picture, the next highest pair, 0.955, is two people, and a copy
recompressed at quality 30, downscaled to 48 px, or blurred (sigma 1.5) stays at
>= 0.996. A picture flipped left to right is a near copy too (each image is compared
as it is and flipped: training flips images, so a flipped copy in test is one it trained
on); those crops hold two, flipped and recoloured, at 0.98. Not caught: a crop of the
picture, a large brightness change, a watermark (one such pair, at 0.95).

Comparing every pair is quadratic (~50 s for 100,000 images on 2 cores, extrapolated from
0.12 s for 5,000), so candidates come from locality-sensitive hashing: random hyperplanes,
BANDS bands of BAND_BITS bits over the thumbnails less the dataset's mean face (aligned
faces all look alike to the raw hash), and RAW_BANDS over the thumbnails as they are (for
a dataset that is mostly one face); images sharing a band's key are candidates, each
checked exactly, a few bands at a time (one a core, see band_links), so pairs already
linked are not checked again. By the hash's odds, a pair right at the threshold shares
no band with a chance of a few percent, copies alike at >= 0.99 well under 0.1%.
Measured: the groups equal those of a full comparison among UTKFace's 5,000 crops and
among 450 blends of faces spanning the threshold; 50-60 ms for 3,000 photos (on 2 cores,
the hashing's matrix product and the bands ~20 ms each); 20,000 noisy copies of one face
(and 5,000 exact ones) make one group in 1.1-1.2 s.
At Celeb 100k's scale, the candidates are many (19 million among 100,000 face-like
thumbnails), so each is first compared along the thumbnails' principal directions (see
alike): 100,000 took ~4-5 s, ~4.3x faster than checking every candidate in full
(benchmarks/near_copies.py); compared flipped too, they take ~10 s (2.9x faster than in
full; both one band at a time, before the threads below), as twice the thumbnails make
more candidates. The process peaks at ~0.6 GB (1.5 GB before the hashing and the checks
went a slice at a time).
Bands checked two at a time on 2 cores, against the serial form before: 1.13x faster for
12,000 sample faces, 1.5x for 40,000, 1.7x for 25,000 draws of one face (for 40,000, the
same peak memory with 2 threads as with 1, +120 MB with 8). Since, each band's pairs are
made in a few large numpy calls and the hash's offset taken once (band_pairs, band_keys):
100,000 faces in 3.8-4.7 s instead of 5.1-6.0, 40,000 in 1.3-1.5 s instead of 1.8-1.9 (2
cores), the same groups, peak memory +7% at most (25,000 draws of one face); with rows
gathered by np.take and np.compress (see take_rows), 100,000 in 2.7-3.1 s. This
grouping is the serial part that limits how `prepare` scales with cores: on 16 cores,
12,000 faces still took ~0.3 s with 2 to 16 threads, against 0.43 s with 1
(docs/performance.md, "On 16 cores"), likely as the bands' row indexing ran on one thread
at a time (see take_rows; measured on 2 cores only, where the bands of 50,000 faces now
gain 1.69x from a second thread, not 1.41x).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
from PIL import Image

THUMB = 16  # thumbnail side
SIMILAR = 0.97
BANDS, RAW_BANDS, BAND_BITS = 32, 4, 24
FLAT = 1e-3  # a thumbnail this close to one grey (a blank image) is like no other
CHECK_PAIRS = 1 << 16  # candidate pairs checked at once, by all threads: bounds the memory
PRINCIPAL = 16  # directions in which candidates are compared first, see alike
KEY_ROWS = 8192  # thumbnails hashed at once: likewise
MAX_GAP = 32  # see band_pairs
PAIRS_AT_ONCE = 1 << 18  # a band's candidate pairs made at once (band_pairs): bounds the memory
MAX_THREADS = 8  # bands checked at once (in_waves), sharing CHECK_PAIRS' memory bound
# a thumbnail whose grey levels vary less than this (standard deviation) shows no face:
# an untrained generator's grey, faint noise on it too (at 1.0, a collapse to grey with
# noise of 1.5 passed as faces). Faces measure >= 3 (the demo's fakes), >= 11 (its reals)
BLANK = 2.0


def thumbnail(img: Image.Image) -> bytes:
    """THUMB x THUMB grayscale box average of a square image (~30 us at 128 px, where the
    JPEG encoding beside it takes ~85). Grayscale: a third of the bytes to the driver."""
    side = img.size[0]
    small = img.reduce(side // THUMB) if side % THUMB == 0 else img.resize((THUMB, THUMB), Image.Resampling.BOX)
    return small.convert("L").tobytes()


def blank(thumb: bytes) -> bool:
    return blanks([thumb]) == 1


def blanks(thumbs: list[bytes]) -> int:
    """How many of `thumbs` are blank, at once: ~50 ms for 100,000 where one at a time took ~0.6 s."""
    grey = np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB * THUMB)
    return int((grey.std(axis=1, dtype=np.float32) < BLANK).sum())


def unit_vectors(thumbs: list[bytes]) -> np.ndarray:
    """Thumbnails as vectors, each centred and scaled to length 1 (0 for a blank one)."""
    grey = np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB * THUMB).astype(np.float32)
    grey -= grey.mean(axis=1, keepdims=True)
    # a slice at a time: norm squares a copy first. In place: the quotient, the choice and a
    # cast were three more copies (2M thumbnails: 2 GB each). The same numbers, bit for bit.
    norm = np.concatenate([np.linalg.norm(grey[i:i + KEY_ROWS], axis=1) for i in range(0, len(grey), KEY_ROWS)]
                          or [np.zeros(0, np.float32)])[:, None]
    grey /= np.maximum(norm, 1e-12)
    grey[norm[:, 0] <= FLAT * 255 * THUMB] = 0.0
    return grey


def band_keys(units: np.ndarray) -> np.ndarray:
    """(images, BANDS + RAW_BANDS) hash keys: images with equal keys in any band are
    candidates. BANDS hash the thumbnails less the dataset's mean face; RAW_BANDS hash
    them as they are, for a dataset that is mostly one face (a collapsed generator's),
    whose mean face is that face, leaving only noise to hash. KEY_ROWS images at a time:
    all at once, the projections of 160,000 thumbnails took 1.2 GB."""
    mean = np.compress(units.any(axis=1), units, axis=0).mean(axis=0)  # the mean face, as said above
    planes = hyperplanes(units.shape[1])
    # (x - mean) @ planes > 0 as x @ planes > mean @ planes: no copy of the thumbnails less
    # their mean, no second product to join (at 12,000 faces 3x faster the first time,
    # when its arrays are fresh memory, as in every `prepare`). Equal in exact arithmetic,
    # not bit for bit: a projection within rounding of the offset may flip its bit (2 keys
    # of 720,000 in a test), an equally valid hash; the groups measured the same.
    offset = np.concatenate([mean @ planes[:, :BANDS * BAND_BITS], np.zeros(RAW_BANDS * BAND_BITS, np.float32)])
    keys = np.zeros((len(units), BANDS + RAW_BANDS, 8), np.uint8)  # a band's bytes, read as one int64
    for start in range(0, len(units), KEY_ROWS):
        chunk = units[start:start + KEY_ROWS]
        packed = np.packbits(chunk @ planes > offset, axis=1)
        keys[start:start + KEY_ROWS, :, :BAND_BITS // 8] = packed.reshape(len(chunk), BANDS + RAW_BANDS, -1)
    return keys.view("<i8")[:, :, 0]  # b0 + 256 b1 + 65536 b2 on any machine: below 2**24


@cache
def hyperplanes(dims: int) -> np.ndarray:
    """The hash's random hyperplanes, one a bit: the same in every run (drawing them took
    ~2 ms, ~4% of grouping 3,000 photos)."""
    planes = np.random.default_rng(0).standard_normal((dims, (BANDS + RAW_BANDS) * BAND_BITS), np.float32)
    planes.flags.writeable = False  # shared by every later call
    return planes


def band_pairs(band: np.ndarray, index: np.ndarray, rank: np.ndarray,
               wanted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(pairs, 2) of the images in `index` sharing their key in this band, each with at
    most the MAX_GAP next ones of its run of equal keys. Runs are short (at most 17 of
    3,000 faces), but a generator drawing one face thousands of times makes one run of
    them in every band: all its pairs would be k^2 (10,000 copies: 25 GB), while links to
    the next few already chain the run into one group. Within a run, images are in the
    order of `rank` (each image's rank along the principal direction), so that another
    face's copies in that run sit side by side, not thousands of images apart.
    Only the pairs (a, b) for which `wanted(a, b)` is true are kept, as they are found (a
    mask over arrays of a and b): one face drawn 20,000 times makes ~630,000 pairs in
    every band, each thread's to hold, most of them already linked.

    One sort of key and rank packed into one number (keys have BAND_BITS bits), not a
    sort by two: 2.9x faster. Then every image's partners at once, PAIRS_AT_ONCE pairs at
    a time, in ~15 numpy calls: a loop over the gaps made ~300 small ones a band, each
    holding the GIL a while, which the other threads checking bands waited for."""
    keys = band[index]
    order = np.argsort((keys << 32) | rank[index])
    ranked, who = keys[order], index[order]
    run_start = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]]))
    run_length = np.diff(np.append(run_start, len(ranked)))
    left_in_run = np.repeat(run_start + run_length, run_length) - np.arange(len(ranked)) - 1
    partners = np.minimum(left_in_run, MAX_GAP)
    ends = np.cumsum(partners)  # image i's pairs end there, in all of the band's
    cuts = np.searchsorted(ends, np.arange(PAIRS_AT_ONCE, ends[-1] if len(ends) else 0, PAIRS_AT_ONCE),
                           side="right")
    found = [np.empty((0, 2), np.int64)]
    for lo, hi in zip([0, *cuts], [*cuts, len(ranked)]):
        count = partners[lo:hi]
        a = np.repeat(np.arange(lo, hi), count)
        b = a + 1 + np.arange(len(a)) - np.repeat(np.cumsum(count) - count, count)
        a, b = who.take(a), who.take(b)
        if wanted is not None:  # take and compress: see take_rows
            keep = wanted(a, b)
            a, b = a.compress(keep), b.compress(keep)
        found.append(np.stack([a, b], axis=1))
    return np.concatenate(found)


def ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among them (0 for the smallest)."""
    rank = np.empty(len(values), np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(len(values))
    return rank


def principal(units: np.ndarray) -> np.ndarray:
    """The thumbnails along the PRINCIPAL directions in which they differ most."""
    mean = units.mean(axis=0)
    spread = units.T @ units - len(units) * np.outer(mean, mean)
    return units @ np.linalg.eigh(spread)[1][:, -PRINCIPAL:]


# Rows picked by np.take and np.compress, not by indexing (x[i], x[mask]): on numpy 2.4,
# 65,536 rows of 16 floats gathered in 0.37 ms against 1.57, kept by a mask 6-10x faster,
# and x[i] on rows gained nothing from a second thread (0.99x on 2 cores; np.take 1.74x).
take_rows = partial(np.take, axis=0)


def alike(units: np.ndarray, near: np.ndarray, pairs: np.ndarray,
          check_pairs: int = CHECK_PAIRS) -> np.ndarray:
    """The pairs whose thumbnails correlate at >= SIMILAR, checked `check_pairs` at a time.
    First in `near` (principal()), 16 numbers an image in place of 256: a projection never
    lengthens a distance, and unit vectors correlating at >= SIMILAR lie within
    sqrt(2 - 2 * SIMILAR) of each other, so a pair farther apart there is no near copy.
    Faces are alike, so most candidates are dropped there (17 of 19 million among 100,000
    face-like images, a seventh of the full check's time); the rest are checked in full."""
    reach = 2 - 2 * SIMILAR + 1e-4  # float32 rounding must not drop a pair at the threshold
    found = [np.empty((0, 2), np.int64)]
    for chunk in np.split(pairs, range(check_pairs, len(pairs), check_pairs)):
        gap = take_rows(near, chunk[:, 0])
        gap -= take_rows(near, chunk[:, 1])
        chunk = np.compress(np.einsum("ij,ij->i", gap, gap) <= reach, chunk, axis=0)
        correlated = np.einsum("ij,ij->i", take_rows(units, chunk[:, 0]), take_rows(units, chunk[:, 1])) >= SIMILAR
        found.append(np.compress(correlated, chunk, axis=0))
    return np.concatenate(found)


def band_links(h: Hashed, band: np.ndarray, linked: np.ndarray, check_pairs: int = CHECK_PAIRS) -> np.ndarray:
    """(pairs, 2) of rows: the near copies among one band's candidates that say something
    new (`new_ways`) and are not yet in one group of `linked`."""
    def wanted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return new_ways(a, b, h.n) & (linked.take(a) != linked.take(b))

    return alike(h.units, h.near, band_pairs(band, h.index, h.rank, wanted), check_pairs)


@cache
def threads() -> int:
    """Bands checked at once: the cores this process may use (a container's share, its
    CPU affinity where the OS has one), at most MAX_THREADS."""
    from deepfake_ray import runtime  # here: worker processes import this module for thumbnail()

    cores = runtime.machine_cores()
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, min(cores, MAX_THREADS))


def joined(label: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """`label` (each image's group, named by its lowest index) with `pairs` linked too."""
    # here, not at the top: every process reading images imports this module (through
    # decode) for thumbnail(), and scipy.sparse would add ~0.3 s to its start
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(label)
    edges = coo_matrix((np.ones(n + len(pairs), np.int8),
                        (np.concatenate([np.arange(n), pairs[:, 0]]), np.concatenate([label, pairs[:, 1]]))),
                       shape=(n, n))
    component = connected_components(edges, directed=False)[1]
    lowest = np.full(component.max() + 1, n)
    np.minimum.at(lowest, component, np.arange(n))
    return lowest[component]


def flipped(rows: np.ndarray) -> np.ndarray:
    """Thumbnails as rows of THUMB * THUMB values (grey levels, unit vectors), each
    flipped left to right."""
    return rows.reshape(-1, THUMB, THUMB)[:, :, ::-1].reshape(len(rows), -1)


def mirrored(thumbs: list[bytes]) -> list[bytes]:
    """The thumbnails of the images flipped left to right (at once: one call a thumbnail
    took ~4 us, 0.15 s of 40,000 on the driver)."""
    rows = np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB * THUMB)
    return [row.tobytes() for row in flipped(rows)]


def new_ways(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Which pairs (a, b) say something new, among images 0..n-1 and their flips n..2n-1:
    two flips correlate as the two images do, and image a with b flipped as b with a
    flipped, so of these only (a, b) and (a, flipped b) for a < b are new (candidates come
    in every way: four times the pairs of the images alone, 3.5x the time at 100,000)."""
    low, high = np.minimum(a, b), np.maximum(a, b)
    return (low < n) & ((high < n) | (low < high - n))


@dataclass(frozen=True, eq=False)  # arrays: no == nor hash
class Hashed:
    """The images as every band's check reads them: image i is row i, and row n + i is
    image i flipped."""
    n: int
    units: np.ndarray  # unit_vectors, then the same flipped
    label: np.ndarray  # each row's group so far: identical thumbnails, each image with its flip
    index: np.ndarray  # the rows to hash: not blank, the first of identical thumbnails
    near: np.ndarray  # the rows along their principal directions (principal)
    rank: np.ndarray  # each row's rank along the last of them (band_pairs)
    bands: np.ndarray  # band_keys, a band a row


def hashed(thumbs: list[bytes]) -> Hashed:
    """The grouping's first step, on the driver: flips, unit vectors, hash keys."""
    n = len(thumbs)
    every = [*thumbs, *mirrored(thumbs)]
    first = {}  # identical thumbnails (one picture stored twice, one face drawn again) group at once
    label = np.array([first.setdefault(t, i) for i, t in enumerate(every)], np.int64)
    units = unit_vectors(thumbs)
    units = np.concatenate([units, flipped(units)])  # flipped: the same numbers in another order
    index = np.flatnonzero(units.any(axis=1) & (label == np.arange(len(every))))
    label = joined(label, np.stack([np.arange(n), np.arange(n, 2 * n)], axis=1))  # each is its flip
    near = principal(units)
    return Hashed(n, units, label, index, near, ranks(near[:, -1]),
                  np.ascontiguousarray(band_keys(units).T) if len(index) >= 2 else np.empty((0, 2 * n), np.int64))


def in_waves(h: Hashed, at_once: int) -> np.ndarray:
    """Each row's group once every band is checked, `at_once` bands at a time on threads
    (numpy's sorts, takes and sums release the GIL, and on the driver the cluster's ingest
    is over and the cores idle). The first band goes alone: where one face is drawn again
    and again, it links most of them, and the waves after it check little."""
    if not len(h.bands):  # fewer than two images to hash
        return h.label
    found, label = [], h.label
    waves = [h.bands[:1], *(h.bands[i:i + at_once] for i in range(1, len(h.bands), at_once))]
    with ThreadPoolExecutor(at_once) as pool:
        for wave in waves:  # pairs linked by earlier waves not checked again
            each = CHECK_PAIRS // len(wave)  # the wave's bands share the memory bound
            found += pool.map(partial(band_links, h, linked=label, check_pairs=each), wave)
            if sum(map(len, found)) > len(label):  # many links (one face drawn again and again):
                label, found = joined(label, np.concatenate(found)), []  # join them before the next wave
    pairs = np.concatenate([np.empty((0, 2), np.int64), *found])
    return joined(label, pairs) if len(pairs) else label


def groups(thumbs: list[bytes]) -> list[list[int]]:
    """Indices of the images in each group of two or more near copies (linked through
    any chain of pairs), each group in ascending order. Each image takes part as it is
    and flipped (its mirror image, linked to it from the start), which doubles the work."""
    if len(thumbs) < 2:
        return []
    h = hashed(thumbs)
    return members(in_waves(h, max(1, min(len(h.bands), threads()))), h.n)


def members(label: np.ndarray, n: int) -> list[list[int]]:
    """The groups of two or more among images 0..n-1, by their `label`."""
    found: dict[int, list[int]] = {}
    for i, group in enumerate(label[:n].tolist()):
        found.setdefault(group, []).append(i)
    return [m for m in found.values() if len(m) > 1]
