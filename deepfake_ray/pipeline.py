"""`deepfake-ray pipeline`: every stage in order, each skipped when its output is complete.

prepare -> train-gan -> generate -> train-detector (or tune) -> evaluate -> score -> report

A stage is complete when its folder holds the marker it writes last, so a rerun
after a crash skips finished stages and the interrupted training resumes from its
last checkpoint. Per-stage timings go to WORKDIR/pipeline.json.
"""
from __future__ import annotations

import importlib
import time

import pyarrow.compute as pc
from dataclasses import dataclass

from deepfake_ray import storage
from deepfake_ray.config import Config


@dataclass(frozen=True)
class Stage:
    command: str  # the CLI command that runs it alone
    module: str
    folder: str  # WORKDIR/<folder>/_COMPLETE.json marks it done


def stages(cfg: Config) -> list[Stage]:
    detector = (Stage("tune", "deepfake_ray.detector.tune", "detector") if cfg.tune.enabled
                else Stage("train-detector", "deepfake_ray.detector.train", "detector"))
    return [
        Stage("prepare", "deepfake_ray.data.prepare", "data"),
        Stage("train-gan", "deepfake_ray.gan.train", "gan"),
        Stage("generate", "deepfake_ray.gan.generate", "fakes"),
        detector,
        Stage("evaluate", "deepfake_ray.detector.evaluate", "eval"),
        Stage("score", "deepfake_ray.pipeline", "score"),
        Stage("report", "deepfake_ray.report", "report"),
    ]


def preflight(cfg: Config, force: bool = False) -> None:
    """Before Ray starts (and config.yaml is rewritten): prepare's settings are valid and,
    if its data/ is complete, the ones that made it; the stages after it build on it."""
    from deepfake_ray.data import datasets, prepare

    prepare.validate(cfg)
    if not force and (done := storage.completed(datasets.data_dir(cfg.workdir))):
        prepare.check_complete(cfg, done)


def run(cfg: Config, force: bool = False, **_) -> dict:
    preflight(cfg, force)
    timings_uri = storage.join(cfg.workdir, "pipeline.json")
    record = {"workdir": cfg.workdir, "stages": []}
    for stage in stages(cfg):
        skipped = bool(storage.completed(storage.join(cfg.workdir, stage.folder))) and not force
        print(f"\n=== {stage.command} ===" + (" (complete, skipped)" if skipped else ""))
        started = time.time()
        entry = {"name": stage.command, "status": "skipped" if skipped else "done"}
        try:
            if not skipped:
                run_stage(stage, cfg, force)
        except BaseException:
            entry.update(status="failed", seconds=round(time.time() - started, 1))
            record["stages"].append(entry)
            storage.write_json(timings_uri, record)
            print(f"\npipeline stopped at stage '{stage.command}'. Fix the cause above, then rerun "
                  f"`deepfake-ray pipeline --workdir {cfg.workdir}` (finished stages are skipped) "
                  f"or run `deepfake-ray {stage.command} --workdir {cfg.workdir}` alone.")
            raise
        entry["seconds"] = round(time.time() - started, 1)
        record["stages"].append(entry)
        storage.write_json(timings_uri, record)
    closing_lines(cfg)
    return record


def run_stage(stage: Stage, cfg: Config, force: bool) -> None:
    if stage.command == "score":
        score_test_split(cfg, force)
    elif stage.command == "report":
        importlib.import_module(stage.module).run(cfg, force=True)  # cheap; always current
        storage.mark_complete(storage.join(cfg.workdir, "report"), {"report": "report.html"})
    else:
        importlib.import_module(stage.module).run(cfg, force=force)


def score_test_split(cfg: Config, force: bool) -> None:
    """Batch-score the held-out reals and fakes through the same path users run: the
    test images are written out as files (score/test_images/{real,fake}/) and scored."""
    from deepfake_ray.data import datasets
    from deepfake_ray.serving import score

    folder = storage.join(cfg.workdir, "score")
    images = storage.join(folder, "test_images")
    for label, stage in (("real", datasets.data_dir(cfg.workdir)), ("fake", datasets.fakes_dir(cfg.workdir))):
        table = storage.read_parquet(datasets.images_uri(stage), columns=["sha1", "split", "image"])
        for row in table.filter(pc.equal(table["split"], "test")).to_pylist():
            storage.write_bytes(storage.join(images, label, f"{row['sha1']}.jpg"), row["image"])
    out = storage.join(folder, "test_scores.parquet")
    score.run(cfg, force=force, model=storage.join(cfg.workdir, "detector", "model"),
              input=images, out=out)
    storage.mark_complete(folder, {"scores": out})


def closing_lines(cfg: Config) -> None:
    try:
        metrics = storage.read_json(storage.join(cfg.workdir, "eval", "metrics.json"))
    except FileNotFoundError:
        metrics = {}
    print("\n=== done ===")
    if metrics:
        print("held-out test: " + ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("roc_auc", "average_precision", "accuracy", "f1")
            if isinstance(metrics.get(k), (int, float))))
    print(f"report: {storage.join(cfg.workdir, 'report.html')}")
    print(f"serve it: deepfake-ray serve --model {storage.join(cfg.workdir, 'detector', 'model')}")
