"""`deepfake-ray evaluate`: the exported detector on the held-out test split, and only there.

    WORKDIR/eval/metrics.json      accuracy, precision, recall, F1, ROC-AUC, AP, confusion matrix,
                                   calibration (Brier score, ECE and the reliability bins)
    WORKDIR/eval/robustness.json   the same after JPEG q95/75/50, downscale by half, Gaussian blur,
                                   each then scored as the service would: in the stored encoding
    WORKDIR/eval/thresholds.json   a threshold per false-positive budget (5%, 1%, 0.1% of reals
                                   flagged), chosen on the validation split, and what each does
                                   on the test split
    WORKDIR/eval/scores.parquet    every image's p_fake: test (each condition) and validation (clean)
    WORKDIR/eval/confusion.png, roc.png, reliability.png, curves.png (train/val accuracy and
                                   loss per epoch)
    WORKDIR/eval/_COMPLETE.json    written last

The decision threshold is model.json's (chosen on validation unless edited there);
nothing here feeds back into the model. Inference runs on Ray Data with an actor pool, each
actor loading the model once and scoring a batch's test images under every condition, its
validation images clean.
"""
from __future__ import annotations

import time

import numpy as np

from deepfake_ray import checkpoint, lineage, progress, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.data import datasets
from deepfake_ray.detector import data, figures, metrics
from deepfake_ray.detector.train import lower_rate, model_dir, stage_dir
from deepfake_ray.errors import UsageError, warn

CONDITIONS = metrics.CONDITIONS


# nothing in the config changes the evaluation; the model and the test split do
STAGE = lineage.Stage("evaluate", "eval", ("data", "fakes", "detector"),
                      describe=lambda d: f"test ROC-AUC {progress.figure(d.get('roc_auc'))}",
                      added=(("budget_thresholds", "before thresholds per false-positive budget: --force "
                              "evaluates again, writing eval/thresholds.json and eval/scores.parquet"),
                             ("scores_columns", "before eval/scores.parquet's column names lost their dots "
                              "(p_fake_blur_1.0 is p_fake_blur_1_0 now): --force evaluates again, writing "
                              "them anew")))


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
    selection = data.select(cfg, splits=("val", "test"), trained=False)
    check_same_data(meta, selection)
    lineage.unmark(cfg, STAGE)
    started = time.time()
    images, val_images = (sum(selection.counts[split].values()) for split in ("test", "val"))
    print(f"evaluate: scoring {images:,} held-out test images, clean and under {len(CONDITIONS) - 1} "
          f"degradations, and {val_images:,} validation images (clean: thresholds are chosen on "
          f"them), with model {checkpoint.model_id(meta)}", flush=True)
    frame = score(cfg, selection, model_uri)
    test, val = frame[frame["split"] == "test"], frame[frame["split"] == "val"]
    labels = test["label"].to_numpy().astype(int)
    scores = {c: test[f"p_{c}"].to_numpy() for c in CONDITIONS}
    check_finite(scores, meta)
    check_finite({"clean": val["p_clean"].to_numpy()}, meta, "validation")
    robustness = {c: metrics.classification(labels, scores[c], meta["threshold"]) for c in CONDITIONS}
    result = {**robustness["clean"], "split": "test", "model": checkpoint.model_id(meta),
              "model_uri": model_uri, "class_names": meta["class_names"],
              "confusion_matrix_layout": "rows: actual [real, fake]; columns: predicted [real, fake]",
              "reliability": metrics.reliability(labels, scores["clean"]),
              "validation": meta.get("metrics", {}), "seconds": round(time.time() - started, 1)}
    budgets = metrics.budget_thresholds(val["label"].to_numpy(), val["p_clean"].to_numpy(), labels, scores["clean"])
    write_outputs(cfg, out, result, robustness, labels, scores)
    # each row names its model, as metrics.json and the score tables do: a budget's threshold
    # holds for the model it was chosen for only (every row has every key: budget_thresholds)
    storage.write_json(storage.join(out, "thresholds.json"),
                       [{**b, "model": checkpoint.model_id(meta)} for b in budgets])
    columns = write_scores(out, frame, meta)
    print(table(robustness, meta))
    print(budget_table(budgets, model_uri))
    summary = {**{k: result[k] for k in ("n", "accuracy", "f1", "roc_auc", "average_precision", "model")},
               "budget_thresholds": {f"{b['false_positive_budget']:g}": b["threshold"] for b in budgets},
               "scores_columns": columns}
    summary = lineage.complete(cfg, STAGE, summary, plan.made)
    print(f"evaluate: held-out test ROC-AUC {with_interval(result, 'roc_auc')}, accuracy "
          f"{with_interval(result, 'accuracy')}, false-positive rate {with_interval(result, 'false_positive_rate')} "
          f"on {result['n']:,} images, {result['fake_share']:.0%} of them fakes (threshold "
          f"{threshold_source(meta)}; 95% intervals) -> {out}")
    print(f"evaluate: {metrics.SCOPE}", flush=True)
    if warning := metrics.near_chance("evaluate", "the held-out", result["roc_auc"]):
        warn(warning)
    return summary


def threshold_source(meta: dict) -> str:
    """model.json's threshold and where it came from: validation's choice, or an edit;
    whole, as thresholds are printed everywhere (a rounded one copied flags other images)."""
    if checkpoint.threshold_set_by_hand(meta) is None:
        return f"{meta['threshold']!r} from validation"
    return f"{meta['threshold']!r} set in model.json; validation chose {meta['metrics']['val_threshold']!r}"


def budget_table(budgets: list[dict], model_uri: str) -> str:
    """thresholds.json as evaluate prints it, each threshold whole (a short decimal, as
    metrics.budget_threshold picks it: copied as printed, it flags what was measured)."""
    reals = f"the validation split's {budgets[0]['validation_reals']:,} reals"
    if all(b["threshold"] is None for b in budgets):  # one line: nothing to set
        return (f"thresholds for a false-positive budget: none chosen on {reals} ("
                + "; ".join(f"{b['false_positive_budget']:.1%}: {b['note']}" for b in budgets) + ")")
    lines = [f"thresholds for a false-positive budget, chosen on {reals} (to use one, set \"threshold\" in "
             f"{storage.shown(storage.join(model_uri, checkpoint.META))}):"]
    for b in budgets:
        if b["threshold"] is None:
            lines.append(f"  {b['false_positive_budget']:>5.1%} of reals flagged: {b['note']}")
            continue
        lines.append(f"  {b['false_positive_budget']:>5.1%} of reals flagged: threshold {b['threshold']!r}"
                     f" -> held-out false-positive rate {with_interval(b, 'test_false_positive_rate')}, "
                     f"recall {with_interval(b, 'test_recall')}")
    return "\n".join(lines)


def write_scores(out: str, frame, meta: dict) -> list[str]:
    """eval/scores.parquet: every image's p_fake, for thresholds and analyses of one's own
    (join on sha1 with data/ and fakes/ manifests for the files); returns its column names."""
    import pyarrow as pa

    def scores(column: str) -> pa.Array:  # no score (validation's degraded ones): null, as score's table has
        values = frame[column].to_numpy(dtype=np.float64)
        return pa.array(values, mask=np.isnan(values))

    # sha1 and split typed as the manifests' (large_string): pyarrow joins only like with like
    table = pa.table({"sha1": pa.array(frame["sha1"].to_numpy(), pa.large_string()),
                      "split": pa.array(frame["split"].to_numpy(), pa.large_string()),
                      "truth": np.where(frame["label"].to_numpy() == 1, "fake", "real"),
                      "p_fake": scores("p_clean"),
                      **{score_column(c): scores(f"p_{c}") for c in CONDITIONS if c != "clean"}})
    table = table.replace_schema_metadata({"deepfake_ray.model": checkpoint.model_id(meta)})
    storage.write_parquet(storage.join(out, "scores.parquet"), table)
    return table.column_names


def score_column(condition: str) -> str:
    """p_fake_blur_1_0: a name SQL engines, Spark and BigQuery take as it is (a dot in
    p_fake_blur_1.0 reads as a nested field there, or is refused)."""
    return "p_fake_" + condition.replace(".", "_")


def with_interval(m: dict, key: str) -> str:
    """0.9812 (0.9733-0.9871): a metric and its 95% interval, where it has one (in
    m["ci95"][key], or m[key + "_ci95"])."""
    interval = m["ci95"].get(key) if "ci95" in m else m.get(f"{key}_ci95")
    return f"{m[key]:.4f}" + (f" ({interval[0]:.4f}-{interval[1]:.4f})" if interval else "")


def check_same_data(meta: dict, selection: data.Selection) -> None:
    """The test split is only held out if the manifests are the ones the model was trained on."""
    trained_on = meta.get("fingerprints", {})
    if trained_on and trained_on != selection.fingerprints:
        raise UsageError("the real or fake manifest changed since the detector was trained, so the "
                         "test split may overlap its training images: rerun `deepfake-ray "
                         "train-detector --force` (or `tune --force`) before evaluating")


def check_finite(scores: dict, meta: dict, split: str = "test") -> None:
    """A model giving NaN on test images is broken: say so, rather than fail in the metrics."""
    for condition, p in scores.items():
        if (bad := int((~np.isfinite(p)).sum())):
            raise UsageError(f"the detector's output is not a number for {bad} of {len(p)} {split} images "
                             f"({condition}): it is broken (did its training diverge?); {lower_rate(meta)}")


def score(cfg: Config, selection: data.Selection, model_uri: str):
    """A pandas frame: sha1, split, label, p_<condition> for every test image, and p_clean
    (the others NaN) for every validation image."""
    r = cfg.resources
    ds = data.dataset(cfg, selection, ("val", "test"))
    scored = runtime.map_on_actor_pool(
        ds, data.Scorer, max(1, r.workers), fn_constructor_kwargs={"model_uri": model_uri, "conditions": CONDITIONS},
        batch_size=cfg.serve.score_batch_size, cpus=r.cpus_per_worker,
        gpus=1 if runtime.use_gpus(r.use_gpu) else 0, batch_format="numpy")
    frame = scored.to_pandas()
    if frame.empty:
        raise UsageError("the validation and test splits selected no images: check data.splits and the "
                         "fakes manifest")
    # in the order Ray Data's tasks finished, which varies: scores.parquet in a fixed one
    return frame.sort_values(["split", "sha1"], kind="stable", ignore_index=True)


def write_outputs(cfg: Config, out: str, result: dict, robustness: dict, labels, scores) -> None:
    storage.write_json(storage.join(out, "metrics.json"), result)
    storage.write_json(storage.join(out, "robustness.json"), {
        c: {k: m[k] for k in (*metrics.REPORTED, "n", "fake_share", "threshold", "confusion_matrix", "ci95")}
        for c, m in robustness.items()})
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


def table(robustness: dict, meta: dict) -> str:
    """The robustness table printed at the end of `evaluate`."""
    short = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "false_positive_rate": "FPR",
             "f1": "F1", "roc_auc": "ROC-AUC", "average_precision": "AP", "brier": "Brier", "ece": "ECE"}
    head = f"{'condition':<15}" + "".join(f"{short[k]:>10}" for k in metrics.REPORTED)
    lines = [f"held-out test split (threshold {threshold_source(meta)}):", head, "-" * len(head)]
    for name, m in robustness.items():
        lines.append(f"{name:<15}" + "".join(f"{m[k]:>10.4f}" for k in metrics.REPORTED))
    return "\n".join(lines)
