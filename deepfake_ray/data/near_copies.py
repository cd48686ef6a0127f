"""Near copies: one picture saved more than once with other bytes (recompressed,
resized, relabelled, lightly retouched). UTKFace's first 5,000 crops hold ~50 such
pairs beside their 36 exact copies, the same photo filed under two ages. Each copy is
a usable image and is kept, but all copies of a picture go to one split: across two,
the test split would score a picture the model trained on.

Two images are near copies when their 16x16 grayscale thumbnails correlate at
>= SIMILAR (mean and contrast removed). Measured on those 5,000 crops: every pair at
>= 0.97 is one picture, the next highest pair, 0.955, is two people, and a copy
recompressed at quality 30, downscaled to 48 px, or blurred (sigma 1.5) stays at
>= 0.996. Not caught: a crop of the picture, a large brightness change, a watermark
(one such pair, at 0.95).

Comparing every pair is quadratic (~50 s for 100,000 images on 2 cores, extrapolated from
0.12 s for 5,000), so candidates
come from locality-sensitive hashing: random hyperplanes, BANDS bands of BAND_BITS bits,
over the thumbnails less the dataset's mean face (aligned faces all look alike to the
raw hash); images sharing a band's key are candidates, each checked exactly. By the
hash's odds, a pair right at the threshold shares no band with a chance of a few
percent, copies alike at >= 0.99 well under 0.1%. Measured: it found every pair a full
comparison finds among UTKFace's 5,000 crops (48) and among 450 blends of faces
spanning the threshold; 30 ms for 3,000 images.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

THUMB = 16  # thumbnail side
SIMILAR = 0.97
BANDS, BAND_BITS = 32, 24
FLAT = 1e-3  # a thumbnail this close to one grey (a blank image) is like no other
CHECK_PAIRS = 1 << 18  # candidate pairs checked at once: bounds the memory


def thumbnail(img: Image.Image) -> bytes:
    """THUMB x THUMB grayscale box average of a square image (~30 us at 128 px, where the
    JPEG encoding beside it takes ~85). Grayscale: a third of the bytes to the driver."""
    side = img.size[0]
    small = img.reduce(side // THUMB) if side % THUMB == 0 else img.resize((THUMB, THUMB), Image.Resampling.BOX)
    return small.convert("L").tobytes()


def unit_vectors(thumbs: list[bytes]) -> np.ndarray:
    """Thumbnails as vectors, each centred and scaled to length 1 (0 for a blank one)."""
    grey = np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB * THUMB).astype(np.float32)
    grey -= grey.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(grey, axis=1, keepdims=True)
    return np.where(norm > FLAT * 255 * THUMB, grey / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def band_keys(units: np.ndarray) -> np.ndarray:
    """(images, BANDS) hash keys: images with equal keys in any band are candidates."""
    shown = units - units[units.any(axis=1)].mean(axis=0)  # the mean face, as said above
    planes = np.random.default_rng(0).standard_normal((units.shape[1], BANDS * BAND_BITS), np.float32)
    packed = np.packbits(shown @ planes > 0, axis=1).reshape(len(units), BANDS, BAND_BITS // 8)
    return packed.astype(np.int64) @ (256 ** np.arange(BAND_BITS // 8, dtype=np.int64))


def candidate_pairs(keys: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """(pairs, 2) indices, first < second, of usable images sharing a key in some band."""
    index = np.flatnonzero(usable)
    found = []
    for band in keys[index].T:
        order = np.argsort(band, kind="stable")
        ranked, who = band[order], index[order]
        for gap in range(1, len(ranked)):  # a run of k equal keys pairs at every gap < k
            same = ranked[:-gap] == ranked[gap:]
            if not same.any():
                break
            found.append(np.stack([who[:-gap][same], who[gap:][same]], axis=1))
    if not found:
        return np.empty((0, 2), np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    n = len(keys)  # one number per pair: a 1-D unique is ~10x faster than unique(axis=0)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def similar_pairs(thumbs: list[bytes]) -> np.ndarray:
    """(pairs, 2) indices of every two thumbnails that are near copies."""
    units = unit_vectors(thumbs)
    usable = units.any(axis=1)
    if usable.sum() < 2:
        return np.empty((0, 2), np.int64)
    pairs = candidate_pairs(band_keys(units), usable)
    kept = [chunk[(units[chunk[:, 0]] * units[chunk[:, 1]]).sum(axis=1) >= SIMILAR]
            for chunk in np.split(pairs, range(CHECK_PAIRS, len(pairs), CHECK_PAIRS))]
    return np.concatenate(kept) if kept else pairs


def groups(thumbs: list[bytes]) -> list[list[int]]:
    """Indices of the images in each group of two or more near copies (linked through
    any chain of pairs), each group in ascending order."""
    parent = list(range(len(thumbs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in similar_pairs(thumbs).tolist():
        low, high = sorted((root(a), root(b)))
        parent[high] = low
    members: dict[int, list[int]] = {}
    for i in range(len(thumbs)):
        members.setdefault(root(i), []).append(i)
    return [m for m in members.values() if len(m) > 1]
