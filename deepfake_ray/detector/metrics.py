"""Classification metrics (scikit-learn) and the decision threshold chosen on validation."""
from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal

import numpy as np
from sklearn import metrics as skm

from deepfake_ray import storage

CALIBRATION_BINS = 10  # equal-width p_fake bins of the expected calibration error (ECE)
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: two-sided 95% intervals
# evaluate's conditions, clean first: its table and the report's rows come in this order
# (robustness.json's keys are sorted, as every JSON file of ours)
CONDITIONS = ["clean", "jpeg_q95", "jpeg_q75", "jpeg_q50", "downscale_0.5", "blur_1.0"]
# said beside every held-out figure: a ROC-AUC near 1.0 is usual, and read alone it claims
# more than was measured
SCOPE = ("these measure fakes of this run's own DCGAN only, not other generators' (README: "
         "Before you rely on it)")
# per condition, in this order: evaluate's table, robustness.json, the report's columns
REPORTED = ["accuracy", "precision", "recall", "false_positive_rate", "f1", "roc_auc", "average_precision",
            "brier", "ece"]


def roc_auc(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """ROC-AUC, or NaN when only one class is present (it is undefined then)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(labels, p_fake))


NEAR_CHANCE_AUC = 0.55  # a ROC-AUC this low: the scores barely tell fakes from reals


def diverged(epoch: dict) -> bool:
    """Whether a history entry's training loss is not a number: the loop stops there (AdamW
    keeps NaN weights NaN). An entry without one (an older history) did not."""
    return not storage.finite(epoch.get("train_loss", 0.0))  # null: history.json's NaN


def near_chance(command: str, what: str, auc: float) -> str | None:
    """A warning line for a detector whose ROC-AUC is at or near chance (0.5), below it
    (its scores inverted), or not a number, else None: a sweep published one of 0.50, a
    constant output, with status ok and nothing said."""
    if storage.finite(auc) and auc > NEAR_CHANCE_AUC:
        return None
    how = "not a number" if not storage.finite(auc) else f"{auc:.4f}, " + (
        "below chance (0.5): its scores are inverted" if auc < 0.45 else "near chance (0.5)")
    return (f"{command}: warning: {what} ROC-AUC {how}; the detector does not tell fakes from reals: "
            "train longer, with another detector.lr (or tune.lr_min..lr_max), or on more images")


def choose_threshold(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """The p_fake cut maximizing Youden's J (balanced accuracy) on validation images.

    Placed halfway between the two neighbouring scores it separates, so it does not
    sit exactly on a validation score; 0.5 when only one class is present or no cut beats
    chance (the cut above every score: 1.0 when the top scores saturate, on them).
    """
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(labels, p_fake, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if tpr[best] - fpr[best] <= 0:
        return 0.5
    upper = min(float(thresholds[best]), 1.0)
    lower = float(thresholds[best + 1]) if best + 1 < len(thresholds) else 0.0
    return float(np.clip((upper + lower) / 2, 0.0, 1.0))


FALSE_POSITIVE_BUDGETS = (0.05, 0.01, 0.001)  # shares of reals flagged: evaluate's thresholds.json


def budget_threshold(labels: np.ndarray, p_fake: np.ndarray, budget: float) -> float | str:
    """The lowest p_fake cut that flags at most `budget` of these (validation) reals: the
    shortest decimal above the highest real it leaves below, up to the next score (so that
    it is copied as printed); else why there is none."""
    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64)
    reals = np.sort(p_fake[labels == 0])[::-1]
    if len(reals) * budget < 1:
        return f"needs {math.ceil(1 / budget):,} validation reals or more"
    below = reals[int(math.floor(len(reals) * budget + 1e-9))]  # the reals above it are the budget's
    if below >= 1.0:
        return "no threshold up to 1 keeps it: more of the validation reals than that score 1"
    higher = p_fake[p_fake > below]
    top = min(float(higher.min()), 1.0) if len(higher) else 1.0
    for digits in range(1, 18):  # in decimal: 0.99991 * 1e5 is 99990.99999999999 in floats
        step = Decimal(1).scaleb(-digits)
        if below < (cut := float(Decimal(repr(float(below))).quantize(step, rounding=ROUND_FLOOR) + step)) <= top:
            return cut
    return top


def budget_thresholds(val_labels: np.ndarray, val_p: np.ndarray, test_labels: np.ndarray,
                      test_p: np.ndarray) -> list[dict]:
    """For each false-positive budget: the threshold validation gives it, and what that
    threshold does on validation and on the held-out test split (95% Wilson intervals).
    Every row has every key (null where a budget has no threshold, or no note), for tools
    that read thresholds.json as a table."""
    rows = []
    n_real = int((np.asarray(val_labels) == 0).sum())
    for budget in FALSE_POSITIVE_BUDGETS:
        threshold = budget_threshold(val_labels, val_p, budget)
        row = {"false_positive_budget": budget, "threshold": threshold, "validation_reals": n_real}
        if isinstance(threshold, str):
            rows.append({**row, "threshold": None, "note": threshold})
            continue
        val, test = flagged(val_labels, val_p, threshold), flagged(test_labels, test_p, threshold)
        rows.append({**row, "validation_false_positive_rate": val["false_positive_rate"],
                     "validation_recall": val["recall"], **{f"test_{k}": v for k, v in test.items()}})
    keys = dict.fromkeys(["note", *(k for row in rows for k in row)])
    return [{**keys, **row} for row in rows]


def flagged(labels: np.ndarray, p_fake: np.ndarray, threshold: float) -> dict:
    """The shares of reals (false-positive rate) and of fakes (recall) at or above `threshold`."""
    labels, hit = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64) >= threshold
    fp, n_real = int(hit[labels == 0].sum()), int((labels == 0).sum())
    tp, n_fake = int(hit[labels == 1].sum()), int((labels == 1).sum())
    return {"false_positive_rate": fp / n_real if n_real else float("nan"),
            "false_positive_rate_ci95": wilson(fp, n_real),
            "recall": tp / n_fake if n_fake else float("nan"), "recall_ci95": wilson(tp, n_fake)}


def classification(labels: np.ndarray, p_fake: np.ndarray, threshold: float) -> dict:
    """Every held-out metric the evaluation reports; 1 = fake is the positive class.
    `ci95`: 95% intervals, so that 1.0000 on a few hundred images is not read as perfect."""
    labels = np.asarray(labels).astype(int)
    p_fake = np.asarray(p_fake, dtype=np.float64)
    pred = (p_fake >= threshold).astype(int)
    matrix = skm.confusion_matrix(labels, pred, labels=[0, 1])
    (tn, fp), (fn, tp) = matrix.tolist()
    return {
        "n": int(len(labels)), "n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum()),
        # precision, average precision and calibration hold at this share of fakes only
        "fake_share": float((labels == 1).mean()) if len(labels) else float("nan"),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        # none flagged (a harsh robustness condition): no precision, not a precision of 0
        "precision": float(skm.precision_score(labels, pred, zero_division=np.nan)),
        "recall": float(skm.recall_score(labels, pred, zero_division=0)),
        # reals flagged fake: what a false-positive budget is set on
        "false_positive_rate": fp / (tn + fp) if tn + fp else float("nan"),
        "f1": float(skm.f1_score(labels, pred, zero_division=0)),
        "roc_auc": roc_auc(labels, p_fake),
        "average_precision": (float(skm.average_precision_score(labels, p_fake))
                              if len(np.unique(labels)) > 1 else float("nan")),
        "ci95": {"accuracy": wilson(tn + tp, tn + fp + fn + tp), "precision": wilson(tp, tp + fp),
                 "recall": wilson(tp, tp + fn), "false_positive_rate": wilson(fp, tn + fp),
                 "roc_auc": roc_auc_interval(labels, p_fake)},
        # rows: actual real, actual fake; columns: predicted real, predicted fake
        "confusion_matrix": matrix.tolist(),
        **calibration(labels, p_fake),
    }


def wilson(successes: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval of a proportion (sound at 0 and at n successes, where
    the normal approximation gives a width of 0); None for n = 0."""
    if n == 0:
        return None
    p, z2 = successes / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def roc_auc_interval(labels: np.ndarray, p_fake: np.ndarray) -> list[float] | None:
    """A 95% interval of ROC-AUC from DeLong's variance (the midrank form of Sun and Xu,
    2014: no resampling); None with fewer than two images of a class, scores that are
    not finite, or one score for all. Scores that separate the classes perfectly have no
    spread to measure: the interval is then [1, 1], and the recall and false-positive-rate
    intervals say more."""
    from scipy.stats import rankdata

    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64)
    fakes, reals = p_fake[labels == 1], p_fake[labels == 0]
    m, n = len(fakes), len(reals)
    if m < 2 or n < 2 or not np.isfinite(p_fake).all():
        return None
    ranks = rankdata(np.concatenate([fakes, reals]))
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    # per fake: the share of reals it outscores; per real: the share of fakes above it
    of_fakes = (ranks[:m] - rankdata(fakes)) / n
    of_reals = 1.0 - (ranks[m:] - rankdata(reals)) / m
    se = math.sqrt(of_fakes.var(ddof=1) / m + of_reals.var(ddof=1) / n)
    if se == 0 and 0 < auc < 1:  # one score for every image (a collapsed model): no spread, no certainty
        return None
    return [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)]


def reliability(labels: np.ndarray, p_fake: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width p_fake bin holding images: its mean p_fake, the fraction of its
    images that are fake, and its image count (a reliability diagram's points)."""
    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64)
    index = np.clip((p_fake * bins).astype(int), 0, bins - 1)
    return [{"bin": b, "mean_p_fake": float(p_fake[index == b].mean()),
             "fraction_fake": float(labels[index == b].mean()), "n": int((index == b).sum())}
            for b in range(bins) if (index == b).any()]


def calibration(labels: np.ndarray, p_fake: np.ndarray) -> dict:
    """How far p_fake is from a probability that an image is fake. Brier score: the mean
    squared gap to the 0/1 label (0 is perfect). ECE: the image-weighted mean gap between a
    bin's mean p_fake and its fraction of fakes. ROC-AUC ignores both; a
    trust-and-safety rule that reads p_fake as a probability ("act above 0.9") needs them,
    and holds at the measured split's share of fakes only (`fake_share`)."""
    labels, p_fake = np.asarray(labels).astype(int), np.asarray(p_fake, dtype=np.float64)
    if not len(labels) or not np.isfinite(p_fake).all():
        return {"brier": float("nan"), "ece": float("nan")}
    gaps = sum(r["n"] * abs(r["mean_p_fake"] - r["fraction_fake"]) for r in reliability(labels, p_fake))
    return {"brier": float(np.mean((p_fake - labels) ** 2)), "ece": float(gaps / len(labels))}


def epoch_validation(labels: np.ndarray, p_fake: np.ndarray, loss_sum: float) -> dict:
    """Per-epoch validation figures: loss, accuracy at 0.5 (argmax), ROC-AUC, tuned threshold.
    A diverged model (scores not finite: a learning rate too high) gets NaN figures, which
    rank it last, instead of the metrics' ValueError failing the run and its retries."""
    n, p_fake = max(len(labels), 1), np.asarray(p_fake, dtype=np.float64)  # as classification() compares
    if not np.isfinite(p_fake).all():
        return {"val_loss": float("nan"), "val_acc": 0.0, "val_auc": float("nan"), "val_threshold": 0.5,
                "val_acc_at_threshold": 0.0, "val_n": int(len(labels))}
    threshold = choose_threshold(labels, p_fake)
    return {"val_loss": loss_sum / n,
            "val_acc": float(((p_fake >= 0.5).astype(int) == labels).mean()) if len(labels) else 0.0,
            "val_auc": roc_auc(labels, p_fake),
            "val_threshold": threshold,
            "val_acc_at_threshold": float(((p_fake >= threshold).astype(int) == labels).mean())
            if len(labels) else 0.0,
            "val_n": int(len(labels))}
