"""The detector's figures, returned as PNG bytes for storage.write_bytes. Figures are made
without pyplot: it would switch a notebook's backend for good, and keep a figure whose
drawing failed in its registry."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def subplots(*grid: int, figsize: tuple[float, float]):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def confusion(matrix, class_names=("real", "fake"), title: str = "test split") -> bytes:
    """Rows: actual class; columns: predicted class; counts and row percentages."""
    m = np.asarray(matrix)
    fig, ax = subplots(figsize=(4.2, 3.8))
    ax.imshow(m, cmap="Blues")
    totals = m.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            dark = m[i, j] > m.max() / 2
            ax.text(j, i, f"{m[i, j]:,}\n{100 * m[i, j] / totals[i, 0]:.1f}%", ha="center",
                    va="center", color="white" if dark else "black", fontsize=11)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"confusion matrix ({title})")
    return png(fig)


def roc(labels, scores: dict[str, np.ndarray], aucs: dict[str, float],
        at_threshold: dict[str, tuple[float, float]] | None = None) -> bytes:
    """ROC curves, one per condition (clean first), each with a dot where the validation
    threshold puts it (`at_threshold`: its false-positive rate and recall)."""
    fig, ax = subplots(figsize=(4.6, 4.2))
    for name, p in scores.items():
        fpr, tpr, _ = roc_curve(labels, p)
        line, = ax.plot(fpr, tpr, lw=2.2 if name == "clean" else 1.0,
                        label=f"{name} (AUC {aucs[name]:.4f})")
        if at_threshold and name in at_threshold:
            ax.plot(*at_threshold[name], "o", color=line.get_color(), ms=5)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate (reals called fake)")
    ax.set_ylabel("true positive rate (fakes caught)")
    ax.set_title("ROC, test split (dots: the threshold in use)" if at_threshold else "ROC, test split")
    ax.legend(fontsize=7, loc="lower right")
    return png(fig)


def reliability(bins: list[dict], ece: float) -> bytes:
    """Mean p_fake against the fraction of fakes per bin (metrics.reliability): on the
    diagonal, p_fake reads as a probability; below it, p_fake overstates how likely a fake is."""
    fig, ax = subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="calibrated")
    ax.plot([b["mean_p_fake"] for b in bins], [b["fraction_fake"] for b in bins], "o-",
            label=f"detector (ECE {ece:.3f})")
    for b in bins:
        ax.annotate(f"{b['n']:,}", (b["mean_p_fake"], b["fraction_fake"]), fontsize=6,
                    textcoords="offset points", xytext=(3, -9))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean p_fake in the bin (images per bin beside each point)")
    ax.set_ylabel("fraction of the bin's images that are fake")
    ax.set_title("reliability, test split (clean)")
    ax.legend(fontsize=8, loc="upper left")
    return png(fig)


def curves(history: list[dict]) -> bytes:
    """Training and validation accuracy and loss per epoch (the study's Fig. 9)."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (acc, loss) = subplots(1, 2, figsize=(9, 3.6))
    # accuracy at p_fake 0.5 (the training loop's), not at the threshold the model serves with
    for ax, key, title in ((acc, "acc", "accuracy (at p = 0.5)"), (loss, "loss", "loss")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=f"training {title}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label=f"validation {title}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_xticks(epochs)
        ax.legend(fontsize=8)
    return png(fig)


def lr_sweep(lrs, aucs, best_lr: float | None = None, lr_range: tuple | None = None) -> bytes:
    """Learning rate vs best validation ROC-AUC of each Tune trial (x: the swept range)."""
    from matplotlib.ticker import NullFormatter

    fig, ax = subplots(figsize=(4.8, 3.6))
    ax.scatter(lrs, aucs, s=36)
    if best_lr is not None:
        ax.axvline(best_lr, color="tab:red", ls="--", lw=1, label=f"best lr {best_lr:.2e}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only; minor ones collide
    if lr_range:
        ax.set_xlim(lr_range[0] / 1.5, lr_range[1] * 1.5)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation ROC-AUC")
    ax.set_title("Ray Tune learning-rate sweep")
    return png(fig)
