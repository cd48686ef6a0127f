"""`deepfake-ray evaluate`: the exported detector on the held-out test split, and only there.

    WORKDIR/eval/metrics.json      accuracy, precision, recall, F1, ROC-AUC, AP, confusion matrix,
                                   calibration (Brier score, ECE and the reliability bins)
    WORKDIR/eval/robustness.json   the same after JPEG q95/75/50, downscale by half, Gaussian blur,
                                   each then scored as the service would: in the stored encoding
    WORKDIR/eval/confusion.png, roc.png, reliability.png, curves.png (train/val accuracy and
                                   loss per epoch)
    WORKDIR/eval/_COMPLETE.json    written last

The decision threshold is the one chosen on validation (model.json); nothing here
feeds back into the model. Inference runs on Ray Data with an actor pool, each actor
loading the model once and scoring every condition of a batch.
"""
from __future__ import annotations

import time

import numpy as np

from deepfake_ray import checkpoint, lineage, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.data import datasets
from deepfake_ray.detector import data, figures, metrics
from deepfake_ray.detector.train import lower_rate, model_dir, stage_dir
from deepfake_ray.errors import UsageError, warn

CONDITIONS = metrics.CONDITIONS


# nothing in the config changes the evaluation; the model and the test split do
STAGE = lineage.Stage("evaluate", "eval", ("data", "fakes", "detector"),
                      describe=lambda d: f"test ROC-AUC {d.get('roc_auc', float('nan')):.4f}")


def eval_dir(workdir: str) -> str:
    return storage.join(workdir, "eval")


def check_settings(cfg: Config) -> None:
    """Before Ray starts (and, in the pipeline, before hours of training): a test split."""
    datasets.require_share(cfg.data.splits, "test")


def run(cfg: Config, force: bool = False, **_) -> dict:
    out = eval_dir(cfg.workdir)
    plan = lineage.plan(cfg, STAGE, force)
    if plan.done:
        return plan.done
    model_uri = model_dir(cfg.workdir)
    meta = checkpoint.load_detector_meta(model_uri)  # its threshold checked: maybe edited by hand
    selection = data.select(cfg, splits=("test",))
    check_same_data(meta, selection)
    lineage.unmark(cfg, STAGE)
    started = time.time()
    images = sum(selection.counts["test"].values())
    print(f"evaluate: scoring {images:,} held-out test images, clean and under {len(CONDITIONS) - 1} "
          f"degradations, with model {checkpoint.model_id(meta)}", flush=True)
    frame = score(cfg, selection, model_uri)
    labels = frame["label"].to_numpy().astype(int)
    scores = {c: frame[f"p_{c}"].to_numpy() for c in CONDITIONS}
    check_finite(scores, meta)
    robustness = {c: metrics.classification(labels, scores[c], meta["threshold"]) for c in CONDITIONS}
    result = {**robustness["clean"], "split": "test", "model": checkpoint.model_id(meta),
              "model_uri": model_uri, "class_names": meta["class_names"],
              "confusion_matrix_layout": "rows: actual [real, fake]; columns: predicted [real, fake]",
              "reliability": metrics.reliability(labels, scores["clean"]),
              "validation": meta.get("metrics", {}), "seconds": round(time.time() - started, 1)}
    write_outputs(cfg, out, result, robustness, labels, scores)
    print(table(robustness))
    summary = {k: result[k] for k in ("n", "accuracy", "f1", "roc_auc", "average_precision", "model")}
    summary = lineage.complete(cfg, STAGE, summary, plan.made)
    print(f"evaluate: held-out test ROC-AUC {with_interval(result, 'roc_auc')}, accuracy "
          f"{with_interval(result, 'accuracy')}, false-positive rate {with_interval(result, 'false_positive_rate')} "
          f"on {result['n']:,} images, {result['fake_share']:.0%} of them fakes (threshold "
          f"{meta['threshold']:.3f} from validation; 95% intervals) -> {out}")
    print(f"evaluate: {metrics.SCOPE}", flush=True)
    if warning := metrics.near_chance("evaluate", "the held-out", result["roc_auc"]):
        warn(warning)
    return summary


def with_interval(m: dict, key: str) -> str:
    """0.9812 (0.9733-0.9871): a metric and its 95% interval, where it has one."""
    interval = m["ci95"].get(key)
    return f"{m[key]:.4f}" + (f" ({interval[0]:.4f}-{interval[1]:.4f})" if interval else "")


def check_same_data(meta: dict, selection: data.Selection) -> None:
    """The test split is only held out if the manifests are the ones the model was trained on."""
    trained_on = meta.get("fingerprints", {})
    if trained_on and trained_on != selection.fingerprints:
        raise UsageError("the real or fake manifest changed since the detector was trained, so the "
                         "test split may overlap its training images: rerun `deepfake-ray "
                         "train-detector --force` (or `tune --force`) before evaluating")


def check_finite(scores: dict, meta: dict) -> None:
    """A model giving NaN on test images is broken: say so, rather than fail in the metrics."""
    for condition, p in scores.items():
        if (bad := int((~np.isfinite(p)).sum())):
            raise UsageError(f"the detector's output is not a number for {bad} of {len(p)} test images "
                             f"({condition}): it is broken (did its training diverge?); {lower_rate(meta)}")


def score(cfg: Config, selection: data.Selection, model_uri: str):
    """A pandas frame: sha1, label, p_<condition> for every test image."""
    r = cfg.resources
    ds = data.dataset(cfg, selection, "test")
    scored = runtime.map_on_actor_pool(
        ds, data.Scorer, max(1, r.workers), fn_constructor_kwargs={"model_uri": model_uri, "conditions": CONDITIONS},
        batch_size=cfg.serve.score_batch_size, num_cpus=r.cpus_per_worker,
        num_gpus=1 if runtime.use_gpus(r.use_gpu) else 0, batch_format="numpy")
    frame = scored.to_pandas()
    if frame.empty:
        raise UsageError("the test split selected no images: check data.splits and the fakes manifest")
    return frame


def write_outputs(cfg: Config, out: str, result: dict, robustness: dict, labels, scores) -> None:
    storage.write_json(storage.join(out, "metrics.json"), storage.json_safe(result))
    storage.write_json(storage.join(out, "robustness.json"), storage.json_safe(
        {c: {k: m[k] for k in (*metrics.REPORTED, "n", "fake_share", "threshold", "confusion_matrix", "ci95")}
         for c, m in robustness.items()}))
    storage.write_bytes(storage.join(out, "confusion.png"),
                        figures.confusion(result["confusion_matrix"], result["class_names"]))
    storage.write_bytes(storage.join(out, "roc.png"),
                        figures.roc(labels, scores, {c: m["roc_auc"] for c, m in robustness.items()},
                                    {c: (m["false_positive_rate"], m["recall"]) for c, m in robustness.items()}))
    storage.write_bytes(storage.join(out, "reliability.png"),
                        figures.reliability(result["reliability"], result["ece"]))
    history_uri = storage.join(stage_dir(cfg.workdir), "history.json")
    if storage.exists(history_uri):
        storage.write_bytes(storage.join(out, "curves.png"), figures.curves(storage.read_json(history_uri)))


def table(robustness: dict) -> str:
    """The robustness table printed at the end of `evaluate`."""
    short = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "false_positive_rate": "FPR",
             "f1": "F1", "roc_auc": "ROC-AUC", "average_precision": "AP", "brier": "Brier", "ece": "ECE"}
    head = f"{'condition':<15}" + "".join(f"{short[k]:>10}" for k in metrics.REPORTED)
    lines = ["held-out test split (threshold from validation):", head, "-" * len(head)]
    for name, m in robustness.items():
        lines.append(f"{name:<15}" + "".join(f"{m[k]:>10.4f}" for k in metrics.REPORTED))
    return "\n".join(lines)
