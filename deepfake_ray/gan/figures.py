"""PNG figures of the GAN stage, returned as bytes so they can go to any storage URI."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def grid_png(images: np.ndarray, pad: int = 2) -> bytes:
    """uint8 NHWC images -> one PNG grid, as square as possible (the study's Fig. 5/8)."""
    images = np.asarray(images, dtype=np.uint8)
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def losses_png(g_losses: list[float], d_losses: list[float], epoch_starts: list[int]) -> bytes:
    """Per-batch G and D loss over training (the study's Figs. 6-7), epochs marked."""
    from matplotlib.figure import Figure  # not pyplot: see detector/figures.py

    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.add_subplot()
    steps = np.arange(len(g_losses))
    ax.plot(steps, g_losses, label="G loss", linewidth=0.8)
    ax.plot(steps, d_losses, label="D loss", linewidth=0.8)
    for start in epoch_starts[1:]:
        ax.axvline(start, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("batch (dotted lines: epoch starts)")
    ax.set_ylabel("sigmoid cross-entropy")
    ax.set_title("DCGAN training losses")
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
