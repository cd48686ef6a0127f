"""What every finished detector run must show: the exported model and the held-out
evaluation. Shared by the detector test and the whole-pipeline scenario."""
from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest

from deepfake_ray import checkpoint, storage
from deepfake_ray.data import sample
from deepfake_ray.detector import data, evaluate, train
from deepfake_ray.models import detector


def assert_exported_model(cfg, history: list[dict]) -> dict:
    """WORKDIR/detector/model: the best validation epoch of `history`, reloadable, chosen
    without the test split. Returns its metadata."""
    state, meta = checkpoint.load_model(train.model_dir(cfg.workdir))
    assert meta["arch"] == cfg.detector.arch and meta["class_names"] == ["real", "fake"]
    assert (meta["resolution"], meta["input_size"]) == (32, 75)
    assert 0.0 <= meta["threshold"] <= 1.0
    best = max(reversed(history), key=lambda h: (h["val_auc"], -h["val_loss"]))  # the latest of equals
    # every validation figure: an export from an epoch later trained again would differ
    assert meta["metrics"] == {k: v for k, v in best.items() if k.startswith("val_") or k == "epoch"}
    assert set(meta["data"]) == {"train", "val"}  # the test split chose nothing
    assert meta["fingerprints"] == data.select(cfg, ("val",)).fingerprints
    assert meta["software"]["torch"] == version("torch") and meta["software"]["timm"] == version("timm")
    model = detector.from_meta(meta, state)
    assert meta["preprocessing"] == detector.preprocessing(model)  # the network's own
    pixels = np.stack([sample.face(3, i, 32) for i in range(4)])
    p = detector.p_fake(detector.predict(model, detector.meta_input(pixels, meta)))
    assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    return meta


def assert_held_out_evaluation(cfg, min_roc_auc: float = 0.0) -> dict:
    """WORKDIR/eval: every metric on the test split alone, robustness and figures, and a
    detector that tells the test split's fakes from its reals at least `min_roc_auc` well."""
    out = evaluate.eval_dir(cfg.workdir)
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision",
                "confusion_matrix", "threshold", "n", "n_real", "n_fake", "brier", "ece"):
        assert key in metrics, key
    assert 0 <= metrics["brier"] <= 1 and 0 <= metrics["ece"] <= 1
    assert sum(b["n"] for b in metrics["reliability"]) == metrics["n"]
    test = data.select(cfg, ("test",)).counts["test"]
    assert metrics["split"] == "test" and metrics["n"] == test["real"] + test["fake"]
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]  # rows actual real, fake; columns predicted
    assert (tn + fp, fn + tp) == (metrics["n_real"], metrics["n_fake"]) and tn + fp + fn + tp == metrics["n"]
    assert metrics["accuracy"] == pytest.approx((tp + tn) / metrics["n"])
    assert metrics["recall"] == pytest.approx(tp / (tp + fn))
    # nothing flagged: precision is undefined, null in JSON
    assert metrics["precision"] == pytest.approx(tp / (tp + fp)) if tp + fp else metrics["precision"] is None
    assert metrics["threshold"] == checkpoint.load_meta(train.model_dir(cfg.workdir))["threshold"]
    assert metrics["false_positive_rate"] == pytest.approx(fp / (tn + fp))
    assert metrics["fake_share"] == pytest.approx(metrics["n_fake"] / metrics["n"])
    for key in ("accuracy", "recall", "false_positive_rate"):  # each point inside its interval
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high and high - low > 0, (key, metrics["ci95"])
    robustness = storage.read_json(storage.join(out, "robustness.json"))
    assert sorted(robustness) == sorted(evaluate.CONDITIONS)
    assert robustness["clean"]["roc_auc"] == pytest.approx(metrics["roc_auc"], nan_ok=True)
    assert metrics["roc_auc"] >= min_roc_auc, metrics
    for name in ("confusion.png", "roc.png", "reliability.png", "curves.png"):
        assert storage.read_bytes(storage.join(out, name))[:4] == b"\x89PNG"
    # a threshold per false-positive budget, chosen on validation's reals
    budgets = storage.read_json(storage.join(out, "thresholds.json"))
    assert [b["false_positive_budget"] for b in budgets] == list(evaluate.metrics.FALSE_POSITIVE_BUDGETS)
    assert {b["validation_reals"] for b in budgets} == {data.select(cfg, ("val",)).counts["val"]["real"]}
    return metrics
