"""Builds WORKDIR/data and WORKDIR/fakes in the shared images layout for detector tests,
as it was before thumbnails were stored beside the images (no `thumb` column): the
detector must still read such a work directory.

Fakes here are the built-in sample faces with a strong upsampling (checkerboard)
artifact, the fingerprint transposed convolutions leave: a stand-in generator that is
visibly different from the reals, for tests that must not wait for a DCGAN.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from deepfake_ray import storage
from deepfake_ray.data import datasets, decode, sample

SPLIT_OF = ["train"] * 8 + ["val", "test"]


def checkerboard_face(seed: int, index: int, size: int) -> np.ndarray:
    """A face rendered at half size, nearest-upsampled, with a 2x2 checkerboard on top."""
    small = sample.face(seed, index, size // 2).astype(np.float32)
    big = small.repeat(2, axis=0).repeat(2, axis=1)
    yy, xx = np.mgrid[:size, :size]
    big += np.where((yy + xx) % 2 == 0, 14.0, -14.0)[..., None]
    return np.clip(big, 0, 255).astype(np.uint8)


def write_stage(stage_uri: str, images: list[tuple[np.ndarray, str]], quality: int = 95) -> list[str]:
    """manifest.parquet + images/part-0.parquet + _COMPLETE.json; returns the sha1s."""
    rows = []
    for i, (pixels, split) in enumerate(images):
        jpeg = decode.encode_jpeg(pixels, quality)
        rows.append({"path": f"test:{i:05d}", "width": pixels.shape[1], "height": pixels.shape[0],
                     "format": "JPEG", "sha1": decode.sha1(jpeg), "bytes": len(jpeg), "split": split,
                     "image": jpeg})
    manifest = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "image"} for r in rows])
    manifest = manifest.cast(pa.schema([(f.name, pa.large_string() if f.type == pa.string() else f.type)
                                        for f in manifest.schema]))  # text as prepare writes it
    images_table = pa.Table.from_pylist([{k: r[k] for k in ("sha1", "image")} for r in rows])
    storage.write_parquet(storage.join(datasets.images_uri(stage_uri), "part-0.parquet"), images_table)
    storage.write_parquet(datasets.manifest_uri(stage_uri), manifest)
    storage.mark_complete(stage_uri, {"images": len(rows), "settings": {"data.jpeg_quality": quality}})
    return [r["sha1"] for r in rows]


def build(workdir: str, n: int, size: int, reals: bool = True, fakes: bool = True,
          fake_quality: int | None = None, quality: int = 95) -> None:
    """`n` reals and `n` fakes, split 8:1:1 by index, stored at JPEG `quality`."""
    if reals:
        write_stage(datasets.data_dir(workdir),
                    [(sample.face(0, i, size), SPLIT_OF[i % 10]) for i in range(n)], quality=quality)
    if fakes:
        write_stage(datasets.fakes_dir(workdir),
                    [(checkerboard_face(1, i, size), SPLIT_OF[i % 10]) for i in range(n)],
                    quality=fake_quality or quality)
