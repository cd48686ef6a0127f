"""`deepfake-ray pipeline`: every stage in order, each skipped while its output is current.

prepare -> train-gan -> generate -> train-detector (or tune) -> evaluate -> score -> report

A stage is complete when its folder holds the marker it writes last, so a rerun
after a crash skips finished stages and the interrupted training resumes from its
last checkpoint. A complete stage is redone when a stage it reads was redone, and a
rerun with other settings for a complete stage is refused (see lineage.py).
Per-stage timings go to WORKDIR/pipeline.json.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable

from deepfake_ray import lineage, progress, s3, storage
from deepfake_ray.config import Config
from deepfake_ray.errors import UsageError, stdout_reader_gone, warn


SCORE = lineage.Stage("score", "score", ("data", "fakes", "detector"), describe=lambda d: d["scores"])


def no_check(cfg: Config) -> None:
    return None


@dataclass(frozen=True)
class Step:
    stage: lineage.Stage
    run: Callable[..., object]  # run(cfg, force=...)
    always: bool = False  # redone on every pipeline run
    check: Callable[[Config], None] = no_check  # its settings, checked before Ray starts


def detector_module(cfg: Config):
    """The stage that makes the detector: a sweep, or one fine-tune."""
    from deepfake_ray.detector import train, tune

    return tune if cfg.tune.enabled else train


def steps(cfg: Config) -> list[Step]:
    from deepfake_ray.data import prepare
    from deepfake_ray.detector import evaluate
    from deepfake_ray.gan import generate, train as gan_train

    detector = detector_module(cfg)
    return [*(Step(m.STAGE, m.run, check=getattr(m, "check_settings", no_check))
              for m in (prepare, gan_train, generate, detector, evaluate)),
            Step(SCORE, score_test_split),
            Step(lineage.Stage("report", "report"), write_report, always=True)]


def preflight(cfg: Config, force: bool = False, **_) -> None:
    """Before Ray starts (and config.yaml is rewritten): every stage's settings are valid
    (a mistake in the detector's must not wait for hours of GAN training), prepare's source
    is there when it has to run, and every complete stage was made with the settings this
    run asks for."""
    from deepfake_ray.data import datasets, prepare
    from deepfake_ray.detector import train as detector_train

    for step in steps(cfg):
        step.check(cfg)
        storage.check_folder(lineage.uri(cfg, step.stage), step.stage.command)
    if force or lineage.current(cfg, prepare.STAGE) is None:
        prepare.check_data_source(cfg)
        storage.check_not_held(datasets.data_dir(cfg.workdir), "prepare")
    remade: set[str] = set()  # the stage folders this run makes (again)
    for step in steps(cfg):
        if force or remade & set(step.stage.inputs):  # made anew from a redone stage: any settings
            remade.add(step.stage.folder)
        elif lineage.current(cfg, step.stage) is None:  # raises on other settings
            remade.add(step.stage.folder)
    if detector_module(cfg).STAGE.folder in remade:  # a mistyped weights file, before the GAN trains
        detector_train.check_pretrained_file(cfg)


def resume_hint(cfg: Config, command: str, force: bool, replaced: bool) -> str:
    """What to run after a stage failed. `replaced`: a stage's output changed in this run
    (a --force run that has replaced nothing yet is still needed, and config.yaml, put
    back when nothing changed, would name another run's settings)."""
    again = "it again without --force" if force and replaced else "the same command again"
    alone = ("" if command in ("score", "report") or not replaced else  # these take other arguments
             f", or this stage alone with the settings of this run: `{lineage.command_line(cfg.workdir, command)}`")
    return (f"\npipeline stopped at stage '{command}'. Fix the cause above, then run {again} "
            f"(finished stages are skipped){alone}")


def run(cfg: Config, force: bool = False, **_) -> dict:
    preflight(cfg, force)
    timings_uri = storage.join(cfg.workdir, "pipeline.json")
    made_in = times_to_make(timings_uri)
    record, changes = {"workdir": cfg.workdir, "stages": []}, storage.marker_changes
    for step in steps(cfg):
        command = step.stage.command
        # current: complete, with these settings, from the inputs there now (which the
        # stages before may just have redone)
        done = None if force or step.always else lineage.current(cfg, step.stage)
        skipped = done is not None
        print(f"\n=== {command} ===" + (" (complete, skipped)" if skipped else ""))
        if skipped:
            lineage.say_missing(cfg, step.stage, done)
        started = time.monotonic()  # durations: a clock NTP does not step
        entry = {"name": command, "status": "skipped" if skipped else "done"}
        if skipped and (seconds := made_in.get((command, done.get("completed")))) is not None:
            entry["made_in"] = seconds  # what an earlier run spent making what this one reuses
        try:
            made = done if skipped else step.run(cfg, force=force)  # its marker's summary (report: None)
        except BaseException as e:
            # Ctrl-C or SIGTERM, or the reader of the output gone (`| head`): no cause to fix
            stopped = isinstance(e, KeyboardInterrupt) or (isinstance(e, BrokenPipeError) and stdout_reader_gone())
            entry.update(status="interrupted" if stopped else "failed", seconds=round(time.monotonic() - started, 1))
            if not stopped:  # kept where a job's logs are not (a cluster deleted after the job)
                entry["error"] = error_summary(e)
            record["stages"].append(entry)
            record_beside(timings_uri, record)
            if stopped:  # the command's own line says how to resume
                raise
            print(resume_hint(cfg, command, force, replaced=storage.marker_changes != changes),
                  file=sys.stderr, flush=True)
            with contextlib.suppress(AttributeError):  # the command's last line names it too
                e.pipeline_stage = command
            raise
        entry["seconds"] = round(time.monotonic() - started, 1)
        if isinstance(made, dict) and isinstance(made.get("completed"), str):  # which output the times are of
            entry["completed"] = made["completed"]
        record["stages"].append(entry)
        storage.write_json(timings_uri, record)
        if command == "prepare":
            check_every_split_holds_images(cfg, made)
    closing_lines(cfg, record["stages"])
    return record


def error_summary(e: BaseException) -> str:
    """A failed stage's error in pipeline.json: its type and first line, no password."""
    first = (str(e).strip().splitlines() or [""])[0]
    return s3.redacted(f"{type(e).__name__}: {first}")[:500]


def record_beside(uri: str, record: dict) -> None:
    """A failed or stopped run's record, where it can be written: the failure to show is
    the stage's (a full disk, a lost store would fail this write too)."""
    try:
        storage.write_json(uri, record)
    except Exception as e:
        warn(f"warning: could not record the run in {storage.shown(uri)} ({type(e).__name__})")


def check_every_split_holds_images(cfg: Config, prepared: dict) -> None:
    """UsageError before the GAN trains for a split data/ holds no image in: the detector
    would stop there (val), or evaluate after both trainings (test)."""
    from deepfake_ray.data import datasets

    if empty := datasets.empty_splits(prepared):
        split = empty[0]
        raise UsageError(f"{datasets.data_dir(cfg.workdir)} holds no {datasets.split_name(split)} image: "
                         f"{datasets.SPLIT_USES[split]}; add images to the source, or give it a larger "
                         "data.splits fraction, then run the pipeline again with --force")


def times_to_make(timings_uri: str) -> dict[tuple[str, str], float]:
    """(stage, its output's completion time) -> the seconds the run that made it took, from
    the last run's pipeline.json: a rerun that skips every stage still reports them."""
    try:
        earlier = storage.read_json(timings_uri)
    except (OSError, ValueError):  # none yet, or damaged: only the report's times are lost
        return {}
    entries = earlier.get("stages") if isinstance(earlier, dict) else None
    made = {}
    for entry in entries if isinstance(entries, list) else []:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("completed"), str)):
            continue  # hand-edited, or from before the times were kept
        if (seconds := lineage.seconds_to_make(entry)) is not None:
            made[(entry["name"], entry["completed"])] = seconds
    return made


def write_report(cfg: Config, **_) -> None:
    """Always rebuilt (it is cheap), --force or not."""
    from deepfake_ray import report

    report.run(cfg)
    storage.mark_complete(storage.join(cfg.workdir, "report"), {"report": "report.html"})


def score_test_split(cfg: Config, force: bool = False) -> dict:
    """Batch-score the held-out reals and fakes through the same path users run: the
    test images are written out as files (score/test_images/{real,fake}/) and scored."""
    import pyarrow.compute as pc

    from deepfake_ray.data import datasets
    from deepfake_ray.serving import score

    plan = lineage.plan(cfg, SCORE, force)
    if plan.done:
        return plan.done
    lineage.unmark(cfg, SCORE)
    folder = lineage.uri(cfg, SCORE)
    images = storage.join(folder, "test_images")
    storage.delete_dir(images)  # another test split's images, when the data were redone
    files = {}
    for label, stage in (("real", datasets.data_dir(cfg.workdir)), ("fake", datasets.fakes_dir(cfg.workdir))):
        # the test split's rows only: the whole stage would be every image in memory (Celeb
        # 100k's reals alone: the process at 1.4 GB against 0.7)
        test = pc.field("sha1").isin(datasets.split_hashes(stage, "test"))
        for row in storage.read_parquet(datasets.images_uri(stage), ["sha1", "image"], test).to_pylist():
            files[storage.join(images, label, f"{row['sha1']}.jpg")] = row["image"]
    storage.write_many(files)  # the study's test split: 20,000 files, on S3 each a request
    out = storage.join(folder, "test_scores.parquet")
    score.run(cfg, force=True, model=storage.join(cfg.workdir, "detector", "model"),
              input=images, out=out)
    return lineage.complete(cfg, SCORE, {"scores": out}, plan.made)


SHOWN = {"roc_auc": "ROC-AUC", "average_precision": "average precision", "accuracy": "accuracy", "f1": "F1"}


def closing_lines(cfg: Config, stages: list[dict] = ()) -> None:
    try:
        metrics = storage.read_json(storage.join(cfg.workdir, "eval", "metrics.json"))
    except FileNotFoundError:
        metrics = {}
    print("\n=== done ===")
    if ran := [s for s in stages if "seconds" in s]:  # each stage's time, as pipeline.json keeps it
        print("stages: " + ", ".join(f"{s['name']} {s['seconds']:.0f}s" + (" (skipped)" if s["status"] == "skipped"
                                                                          else "") for s in ran)
              + f"; {sum(s['seconds'] for s in ran):.0f}s in all")
    if metrics:
        from deepfake_ray.detector.metrics import SCOPE

        print("held-out test: " + ", ".join(
            f"{name} {metrics[k]:.4f}" for k, name in SHOWN.items() if storage.finite(metrics.get(k)))
            + f"; {SCOPE}")
    fakes = storage.completed(storage.join(cfg.workdir, "fakes")) or {}
    if blank := fakes.get("blank_fakes"):  # said by generate, maybe in an earlier run: said again here
        print(f"warning: {blank:,} of {fakes.get('images', blank):,} fakes are nearly one grey, no face drawn: "
              "the metrics above measure telling those from faces; train the GAN longer "
              "(README: generate's checks on the fakes)")
    print(f"report: {storage.join(cfg.workdir, 'report.html')}")
    model = storage.join(cfg.workdir, "detector", "model")
    made = storage.completed(storage.join(cfg.workdir, "detector")) or {}
    # what a cluster's serve config pins (jobs/serve.yaml's args.model_id): the model there
    # now, as serve names it (its threshold edited by hand since, it is another)
    try:
        model_id = lineage.exported_model(cfg) or made.get("model_id")
    except OSError:  # a store failing now does not fail a finished pipeline
        model_id = made.get("model_id")
    if model_id:
        auc, lr = made.get("val_auc"), made.get("lr")
        print(f"model: {model_id} (validation ROC-AUC "
              f"{progress.figure(auc)}"
              f"{f', swept lr {lr:.2e}' if made.get('tuned') and isinstance(lr, float) else ''})")
    print(f"serve it: deepfake-ray serve --model {shlex.quote(model)}  (on a cluster: jobs/serve.yaml with "
          f"args.model {model} and args.model_id {model_id or 'as printed above'})")
