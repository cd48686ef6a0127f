"""The built-in `sample` source: seeded, procedural, face-like images (not real people).

Each image is a function of (seed, index) only, so any worker can make any slice of
the set and a rerun makes the same bytes. Varied in skin, hair, eyes, mouth, pose,
lighting, background and noise, so a DCGAN has structure to learn.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SKIN = [(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 51, 23)]
HAIR = [(20, 15, 10), (60, 40, 20), (110, 70, 30), (200, 160, 90), (150, 150, 150), (120, 40, 20)]
IRIS = [(60, 40, 20), (40, 90, 140), (50, 110, 60), (90, 70, 40)]


def jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def backdrop(rng) -> tuple[int, int, int]:
    """A photo-like backdrop colour: a grey level with a faint tint.

    Saturated random backdrops gave the DCGAN's discriminator a cue it won on from the
    first epoch: in the demo's 320 steps the generator never got past grey noise, while
    with these it draws heads, hair and skin tones (as it does on real photos)."""
    rgb = rng.integers(30, 226, 3)
    grey = rgb.mean()
    return tuple(int(grey + 0.3 * (c - grey)) for c in rgb)


def face(seed: int, index: int, size: int = SIZE) -> np.ndarray:
    """One face-like image, HxWx3 uint8."""
    rng = np.random.default_rng([seed, index])
    s = SIZE
    top, bottom = backdrop(rng), backdrop(rng)
    ramp = np.linspace(0, 1, s)[:, None, None]
    bg = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp) * np.ones((s, s, 3))
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx = s / 2 + rng.normal(0, 6)
    cy = s / 2 + rng.normal(4, 4)
    hw, hh = rng.uniform(30, 40), rng.uniform(40, 50)  # head half-width, half-height
    skin, hair = jitter(rng, SKIN[rng.integers(len(SKIN))]), jitter(rng, HAIR[rng.integers(len(HAIR))])
    d.ellipse([cx - hw - 6, cy - hh - 10, cx + hw + 6, cy + hh * rng.uniform(0.1, 0.9)], fill=hair)
    d.rectangle([cx - hw * 0.45, cy + hh * 0.6, cx + hw * 0.45, s], fill=jitter(rng, skin, 8))
    d.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=skin)
    fringe = rng.uniform(0.2, 0.6)
    d.chord([cx - hw, cy - hh - 4, cx + hw, cy - hh + 2 * hh * fringe], 180, 360, fill=hair)
    yaw = rng.normal(0, 4)  # pose: features shift sideways
    ey, ex = cy - hh * rng.uniform(0.05, 0.2), hw * rng.uniform(0.35, 0.5)
    er = rng.uniform(4, 7)
    iris = jitter(rng, IRIS[rng.integers(len(IRIS))])
    for side in (-1, 1):
        x = cx + yaw + side * ex
        d.ellipse([x - er * 1.6, ey - er, x + er * 1.6, ey + er], fill=(245, 245, 240))
        d.ellipse([x - er * 0.8, ey - er * 0.8, x + er * 0.8, ey + er * 0.8], fill=iris)
        d.ellipse([x - er * 0.35, ey - er * 0.35, x + er * 0.35, ey + er * 0.35], fill=(10, 10, 10))
        d.line([x - er * 1.8, ey - er * 2, x + er * 1.8, ey - er * 2.3], fill=hair, width=3)
    d.line([cx + yaw, ey + 4, cx + yaw + rng.normal(0, 3), cy + hh * 0.3], fill=jitter(rng, skin, 40), width=3)
    my, mw = cy + hh * rng.uniform(0.45, 0.6), hw * rng.uniform(0.25, 0.45)
    lips = jitter(rng, (170, 70, 70), 30)
    d.chord([cx + yaw - mw, my - 6, cx + yaw + mw, my + rng.uniform(4, 12)], 0, 180, fill=lips)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(img).astype(np.float32)
    light = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.3), s)  # side lighting
    arr *= (light[None, :, None] if rng.random() < 0.5 else light[::-1][None, :, None])
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if size != s:
        out = out.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(out)


def face_jpeg(seed: int, index: int, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(face(seed, index)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


MAX_FACES = 1_000_000  # ~75 CPU-minutes of drawing; demos and tests need thousands


def parse(source: str, default_n: int) -> int:
    """`sample` or `sample:N` -> N."""
    from deepfake_ray.errors import UsageError

    _, _, n = source.partition(":")
    if not n:
        n = str(default_n)
    if not (n.isascii() and n.isdigit()) or int(n) < 1:  # isdigit alone takes "²", which int() refuses
        raise UsageError(f"source '{source}' needs a positive whole number of faces, e.g. sample:2000")
    if int(n) > MAX_FACES:
        raise UsageError(f"source '{source}' asks for {int(n):,} generated faces, more than "
                         f"{MAX_FACES:,}: the generator is for demos and tests; for more, use "
                         "a folder, s3:// prefix or Kaggle dataset of real photos")
    return int(n)
