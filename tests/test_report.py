"""The run report: one self-contained report.html (figures embedded) and report.md, built
from a work directory of real files (matplotlib PNGs, JSON, CSV) laid out as the stages
write them; local and on S3; rendered by headless Chromium when it is installed."""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from deepfake_ray import config, report, storage
from tests.cli_output import error_lines

EPOCHS = 12  # more than report.MAX_SAMPLE_GRIDS, so the report has to pick


def plot(title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5), dpi=40)
    fig.add_subplot().plot([0, 1, 2], [1, 0.5, 0.2])
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@functools.cache
def plots() -> dict[str, bytes]:
    return {rel: plot(rel) for rel in ["gan/losses.png", "eval/curves.png", "tune/lr.png",
                                        "eval/confusion.png", "eval/roc.png", "eval/reliability.png",
                                        "fakes/preview.png"]}


def grid(epoch: int) -> bytes:
    """A sample grid as the GAN stage writes it (PIL), one colour per epoch."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (34, 34), (20 * epoch % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


THRESHOLD = 0.43215  # the detector's, chosen on validation: evaluate flags test images at it
# a train-detector epoch's entry as detector/loop.py writes it (its metrics vary per epoch)
DETECTOR_EPOCH = {"lr": 0.0003, "frozen_backbone": False, "restored": False, "train_acc": 0.9, "train_n": 64,
                  "train_images_per_s": 12.5, "val_loss": 0.35, "val_acc": 0.89, "val_threshold": 0.5,
                  "val_acc_at_threshold": 0.89, "val_n": 18, "seconds": 9.5, "workers": 1, "device": "cpu",
                  "precision": "float32"}


@functools.cache
def held_out() -> tuple[dict, dict, list]:
    """eval/metrics.json (less "validation", model.json's), eval/robustness.json and
    eval/thresholds.json as `evaluate` makes them (evaluate.run, write_outputs): 20 test
    images, half fakes, the real scored 0.45 flagged; each condition in turn scores the
    fakes 0.1 lower; 40 validation images, their reals from 0 to 0.5."""
    import numpy as np

    from deepfake_ray.detector import metrics

    labels = np.repeat([0, 1], 10)
    clean = np.concatenate([np.linspace(0.05, 0.4, 9), [0.45], np.linspace(0.55, 0.95, 10)])
    robustness = {c: metrics.classification(labels, np.where(labels == 1, clean - 0.1 * i, clean), THRESHOLD)
                  for i, c in enumerate(metrics.CONDITIONS)}
    result = {**robustness["clean"], "split": "test", "model": "inception_resnet_v2@0123456789ab",
              "model_uri": "detector/model", "class_names": ["real", "fake"],
              "confusion_matrix_layout": "rows: actual [real, fake]; columns: predicted [real, fake]",
              "reliability": metrics.reliability(labels, clean), "seconds": 12.3}
    val_labels, val = np.repeat([0, 1], 20), np.concatenate([np.linspace(0, 0.5, 20), np.linspace(0.4, 1, 20)])
    return result, {c: {k: m[k] for k in (*metrics.REPORTED, "n", "fake_share", "threshold", "confusion_matrix",
                                          "ci95")} for c, m in robustness.items()}, \
        metrics.budget_thresholds(val_labels, val, labels, clean)


def write_workdir(w: str, epochs: int = EPOCHS) -> dict[str, bytes]:
    """A finished run's work directory; returns the figures it holds (path -> bytes)."""
    figures = dict(plots())
    figures.update({f"gan/samples/epoch_{e:03d}.png": grid(e) for e in range(epochs)})  # as the loop names them, from 0
    for rel, data in figures.items():
        storage.write_bytes(storage.join(w, rel), data)
    storage.write_json(storage.join(w, "data/_COMPLETE.json"), {
        "images": 96, "rejected": 4, "source": "/photos/a|b <script>alert(1)</script> [x](y) *best*",  # a folder may be named so
        "reasons": {"truncated": 3, "decompression-bomb": 1},
        "splits": {"train": 77, "val": 9, "test": 10}})
    storage.write_json(storage.join(w, "fakes/_COMPLETE.json"), {"images": 96, "seconds": 1.5})
    # the stages count epochs from 0 in their files; the keys are those the loops write
    storage.write_json(storage.join(w, "gan/history.json"), [
        {"epoch": e - 1, "g_loss": 2.0 / e, "d_loss": 0.5 + e / 100, "d_real": 0.7, "d_fake": 0.3, "images": 77,
         "seconds": 1.5, "images_per_s": 51.33, "workers": 1, "device": "cpu", "precision": "float32",
         "restored": False, "resumed_from": None}
        for e in range(1, epochs + 1)])
    detector_history = [DETECTOR_EPOCH | {"epoch": 0, "train_loss": 0.61, "val_auc": 0.74},
                        DETECTOR_EPOCH | {"epoch": 1, "train_loss": 0.32, "val_auc": 0.99996},
                        DETECTOR_EPOCH | {"epoch": 2, "train_loss": 0.21, "val_auc": 0.97, "val_threshold": THRESHOLD}]
    storage.write_json(storage.join(w, "detector/history.json"), detector_history)
    best = detector_history[2]
    storage.write_json(storage.join(w, "detector/model/model.json"),
                       {"arch": "inception_resnet_v2", "input_size": 75, "threshold": THRESHOLD, "epoch": best["epoch"],
                        "metrics": {k: v for k, v in best.items() if k.startswith("val_") or k == "epoch"},
                        "software": {"deepfake-ray": "0.1.0", "torch": "2.14.1"}})
    storage.write_text(storage.join(w, "tune/results.csv"),
                       "trial_id,lr,val_auc\nt0,1.2e-05,0.81\nt1,0.00031,0.97\n")
    result, robustness, budgets = held_out()
    storage.write_json(storage.join(w, "eval/metrics.json"), storage.json_safe(
        {**result, "validation": storage.read_json(storage.join(w, "detector/model/model.json"))["metrics"]}))
    storage.write_json(storage.join(w, "eval/robustness.json"), storage.json_safe(robustness))
    storage.write_json(storage.join(w, "eval/thresholds.json"), storage.json_safe(budgets))
    storage.write_json(storage.join(w, "pipeline.json"), {"stages": [
        {"name": "prepare", "status": "done", "seconds": 3.2},
        {"name": "train-gan", "status": "skipped", "seconds": 0.1, "made_in": 61.5},  # an earlier run's
        {"name": "evaluate", "status": "done", "seconds": 12345.6}]})
    storage.write_text(storage.join(w, "config.yaml"), "workdir: W\ndetector:\n  lr: 0.0003\n")
    for folder, inputs in STAGE_INPUTS.items():  # complete, each made from the ones there now
        mark_complete(w, folder, inputs)
    return figures


STAGE_INPUTS = {"gan": ["data"], "detector": ["data", "fakes"], "tune": ["data", "fakes"],
                "eval": ["data", "fakes", "detector"]}


def mark_complete(w: str, folder: str, inputs: list[str], when: str = "2026-12-02T10:00:00") -> None:
    """A stage's marker as lineage writes it: what it was made from, and when."""
    from deepfake_ray import lineage

    cfg = config.build("tiny", workdir=w)
    storage.write_json(storage.join(w, folder, "_COMPLETE.json"), {
        "inputs": {f: lineage.identity(cfg, f) for f in inputs}, "settings": {}, "completed": when})


class Structure(HTMLParser):
    """Well-formedness (every non-void tag closed in order) and what the page references."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.sections, self.urls = [], [], {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("data-path")] = a.get("src", "")
        if tag == "section":
            self.sections.append(a.get("id"))
        self.urls += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith(("data:", "#"))]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")


def parse(path: str) -> Structure:
    s = Structure()
    with open(path, encoding="utf-8") as f:
        s.feed(f.read())
    s.close()
    assert not s.errors and not s.stack, (s.errors, s.stack)
    return s


def expected_figures(figures: dict) -> set[str]:
    grids = sorted(k for k in figures if k.startswith("gan/samples/"))
    shown = {k for k in figures if not k.startswith("gan/samples/")}
    if len(grids) <= report.MAX_SAMPLE_GRIDS:
        return shown | set(grids)
    step = (len(grids) - 1) / (report.MAX_SAMPLE_GRIDS - 1)
    return shown | {grids[round(i * step)] for i in range(report.MAX_SAMPLE_GRIDS)}


def test_report_embeds_every_figure_and_section(tmp_path):
    w = str(tmp_path / "work")
    figures = write_workdir(w)
    result = report.run(config.build("tiny", workdir=w))
    assert result["missing"] == [] and result["stale"] == []
    html_path = os.path.join(w, "report.html")
    page = parse(html_path)
    assert page.urls == []  # self-contained: nothing fetched from anywhere
    assert set(page.sections) == {anchor for anchor, *_ in report.SECTIONS}
    want = expected_figures(figures)
    assert set(page.images) == want
    assert {"gan/samples/epoch_000.png", f"gan/samples/epoch_{EPOCHS - 1:03d}.png"} <= want
    for rel, src in page.images.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix) and base64.b64decode(src[len(prefix):]) == figures[rel]
    text = open(html_path, encoding="utf-8").read()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # escaped
    assert "Not produced yet" not in text
    for anchor, title, *_ in report.SECTIONS:  # the table of contents links every section
        assert f'<li><a href="#{anchor}">{title}</a></li>' in text, anchor
    for needle in ["decompression-bomb", "jpeg_q50", "downscale_0.5", "0.00031",
                   "train-gan", '<th scope="row">accuracy</th><td>0.95</td>', "lr: 0.0003", "8 of 12 epochs",
                   '<th scope="row">threshold</th><td>0.43215</td>',  # whole, to copy: not 0.4321
                   '<th scope="row">validation.val_threshold</th><td>0.43215</td>',
                   "12,346", "12,349",  # seconds, and their total, not 1.235e+04
                   "<td>train-gan</td><td>skipped</td><td>0.1</td><td>61.5</td>",  # made by a run before
                   "<td>total</td><td></td><td>12,349</td><td>12,410</td>",
                   '<th scope="row">validation.epoch</th><td>3</td>',  # a key/value row's key heads it  # counted from 1, as best epoch is
                   '<th scope="row">validation.val_auc</th><td>0.97</td>',  # model.json's figures of it
                   '<th scope="row">best epoch</th><td>3</td>',  # model.json's epoch 2, counted from 1
                   '<th scope="row">ece</th><td>0.2488</td>',
                   # its row in the history, counted alike
                   "<td>3</td><td>0.21</td><td>0.9</td><td>0.35</td><td>0.89</td><td>0.97</td>",
                   "detector/history.json, per epoch (counted from 1)",
                   "<td>0.99996</td>",  # not rounded to a perfect 1
                   '<th scope="row">average_precision</th><td>1</td>',  # but a sum's rounding error is
                   '<th scope="row">made with</th><td>deepfake-ray 0.1.0, torch 2.14.1</td>',
                   '<th scope="row">ci95.accuracy</th><td>0.7639-0.9911</td>',  # Wilson's, of 19 in 20
                   # evaluate's rows (actual real, fake) and columns (predicted) in words: one real flagged
                   '<th scope="row">confusion_matrix</th><td>reals: 9 right, 1 flagged fake; fakes: 10 '
                   'flagged, 0 missed</td>',
                   "the held-out test split, 50% of it fakes, and those fakes made by the same GAN",
                   # 5% of validation's 20 reals: one at most, the one at 0.5; the shortest decimal
                   # above the next real down (0.4737), up to the next score up (a fake's 0.4947)
                   "chosen on the validation split&#x27;s 20 reals",
                   "<td>0.05</td><td>0.48</td><td>0.05</td><td>0</td><td>0-0.2775</td><td>1</td><td>0.7225-1</td>",
                   "<td>0.01</td><td>n/a</td>", "needs 100 validation reals or more"]:
        assert needle in text, needle
    assert "mean_p_fake" not in text  # the reliability bins are a figure, not a table cell
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "## Held-out test metrics" in md and "| jpeg_q50 | 0.7 | 0.8333 | 0.5 | 0.1 |" in md
    assert "| downscale_0.5 | 0.6 |" in md  # evaluate's conditions (metrics.CONDITIONS)
    assert "| confusion_matrix | reals: 9 right, 1 flagged fake; fakes: 10 flagged, 0 missed |" in md
    assert "confusion_matrix_layout" not in md  # said in the matrix's own words
    assert "confusion_matrix" not in md.split("## Robustness")[1]  # per condition, left out: a figure shows it
    assert "](gan/losses.png)" in md and "](eval/roc.png)" in md
    # one cell, not two, its markup shown as text (a Markdown renderer passes raw HTML through)
    # a link or emphasis in a folder's name is shown as text, not made live in a pasted issue
    assert "| source | /photos/a&#124;b &lt;script&gt;alert(1)&lt;/script&gt; \\[x\\](y) \\*best\\* |" in md


def test_robustness_shows_every_metric_evaluate_prints_and_their_intervals_apart(tmp_path):
    """evaluate's robustness.json as it writes it: its intervals and the rest had crowded
    ROC-AUC, precision and recall out of the columns the report shows (12 at most)."""
    import numpy as np

    from deepfake_ray.detector import metrics

    w = str(tmp_path / "work")
    labels = np.repeat([0, 1], 50)
    p_fake = np.clip(np.random.default_rng(0).normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    written = {name: {k: m[k] for k in (*metrics.REPORTED, "n", "fake_share", "threshold", "confusion_matrix",
                                        "ci95")}
               for name, m in {"clean": metrics.classification(labels, p_fake, 0.5),
                               "blur_1.0": metrics.classification(labels, p_fake / 10, 0.5)}.items()}
    storage.write_json(storage.join(w, "eval/robustness.json"), storage.json_safe(written))
    storage.write_json(storage.join(w, "eval/metrics.json"), storage.json_safe(written["clean"]))
    storage.write_text(storage.join(w, "config.yaml"), "workdir: work\n")  # a run's
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    head = "| condition | " + " | ".join(metrics.REPORTED) + " | n | threshold |"
    assert head in md and "more columns" not in md, md
    low, high = written["clean"]["ci95"]["roc_auc"]  # the intervals' own table, in the same order
    assert "| condition | accuracy | precision | recall | false_positive_rate | roc_auc |" in md
    assert f"{report.short(low)}-{report.short(high)} |" in md
    assert "| blur_1.0 | 0.5 | n/a | 0 | 0 |" in md  # nothing flagged: no precision, not a blank
    # in evaluate's order, clean first, not the file's sorted keys
    assert md.index("| clean | ") < md.index("| blur_1.0 | ")


def test_a_work_directory_named_with_a_backtick_cannot_end_its_code_span(tmp_path):
    """report.md shows the work directory and commands as code: a backtick in the name
    ended the span, and the rest of the line rendered as Markdown."""
    w = str(tmp_path / "runs`*bold*")
    storage.write_text(storage.join(w, "config.yaml"), "workdir: x\n")
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert f"Work directory ``{w}``, generated" in md, md.splitlines()[2]
    assert "*Not produced yet: run ``deepfake-ray prepare --config " in md  # its commands name it too


def test_sections_whose_stage_was_redone_since_say_they_are_out_of_date(tmp_path):
    """After `train-detector --force` the old held-out metrics are still on disk; a report
    written before `evaluate` reruns must not pass them off as the new model's."""
    w = str(tmp_path / "work")
    write_workdir(w)
    mark_complete(w, "detector", ["data", "fakes"], when="2026-12-02T11:00:00")  # retrained
    storage.delete_file(storage.join(w, "gan", "_COMPLETE.json"))  # being redone
    result = report.run(config.build("tiny", workdir=w))
    assert result["stale"] == ["GAN training", "Held-out test metrics", "Robustness"]
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    parse(os.path.join(w, "report.html"))
    assert "Out of date: detector/ changed since eval/ was made" in text
    assert "Out of date: gan/ is not complete" in text
    # with the run's settings: a bare command would run the demo preset's
    assert f"<code>deepfake-ray evaluate --config {w}/config.yaml --workdir {w}</code>" in text
    assert '<th scope="row">accuracy</th><td>0.95</td>' in text  # still shown, labelled
    md = open(os.path.join(w, "report.md")).read()
    assert f"*Out of date: detector/ changed since eval/ was made. What follows may not describe the current model; run `deepfake-ray evaluate --config {w}/config.yaml --workdir {w}`.*" in md


def test_a_stage_finishing_while_the_report_reads_it_is_read_again(tmp_path, monkeypatch):
    """evaluate writing its metrics and then its marker between the report's read of the
    one and of the other: the last model's metrics were shown under the new marker, as current."""
    w = str(tmp_path / "work")
    write_workdir(w)
    metrics_uri, read_bytes = storage.join(w, "eval", "metrics.json"), storage.read_bytes
    new = {**storage.read_json(metrics_uri), "accuracy": 0.75}

    def evaluate_finishes_meanwhile(uri, *args, **kwargs):
        data = read_bytes(uri, *args, **kwargs)
        if uri == metrics_uri and b'"accuracy": 0.75' not in data:
            storage.write_json(metrics_uri, new)
            mark_complete(w, "eval", STAGE_INPUTS["eval"], when="2026-12-02T12:00:00")
        return data

    monkeypatch.setattr(storage, "read_bytes", evaluate_finishes_meanwhile)
    result = report.run(config.build("tiny", workdir=w))
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert '<th scope="row">accuracy</th><td>0.75</td>' in text and result["stale"] == []


def test_a_stage_made_from_an_out_of_date_one_is_out_of_date_too(tmp_path, capsys):
    """The GAN trained further after the fakes were made: they, and the detector and the
    metrics made from them, no longer follow from it, though each is complete from its
    own inputs. The report says so, and so does a stage run alone that finds itself complete."""
    from deepfake_ray import lineage
    from deepfake_ray.detector import train as detector_train

    w = str(tmp_path / "work")
    write_workdir(w)
    mark_complete(w, "fakes", ["gan"])  # from the GAN there then
    for folder in ("detector", "eval"):
        mark_complete(w, folder, STAGE_INPUTS[folder])
    mark_complete(w, "gan", STAGE_INPUTS["gan"], when="2026-12-02T12:00:00")  # trained further
    cfg = config.build("tiny", workdir=w)
    result = report.run(cfg)
    assert {"Detector training", "Held-out test metrics", "Robustness"} <= set(result["stale"])
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert "Out of date: fakes/, which detector/ was made from, is out of date: gan/ changed since fakes/ was made" in text
    capsys.readouterr()
    assert lineage.preflight(cfg, detector_train.STAGE, force=False)  # complete from its inputs
    out = capsys.readouterr().out
    assert "is already complete" in out
    assert f"train-detector: note: {w}/fakes, which it was made from, is out of date (gan/ changed " \
        "since): `deepfake-ray pipeline` with this --workdir remakes both" in out
    md = open(os.path.join(w, "report.md")).read()  # train-detector, run now, would refuse the fakes
    assert f"run `deepfake-ray generate --config {w}/config.yaml --workdir {w}`, then the stages after it" in md
    mark_complete(w, "fakes", ["gan"], when="2026-12-02T13:00:00")  # generated again
    report.run(cfg)
    md = open(os.path.join(w, "report.md")).read()
    assert f"run `deepfake-ray train-detector --config {w}/config.yaml --workdir {w}`." in md
    detector_marker = storage.join(w, "detector", "_COMPLETE.json")  # the sweep's best trial instead:
    storage.write_json(detector_marker, {**storage.read_json(detector_marker), "tuned": True})
    report.run(cfg)  # remade by sweeping again, not by training at the config's detector.lr
    md = open(os.path.join(w, "report.md")).read()
    assert f"run `deepfake-ray tune --config {w}/config.yaml --workdir {w}`" in md
    assert "deepfake-ray train-detector --config" not in md


def test_generated_fakes_say_when_they_are_out_of_date_or_missing(tmp_path, capsys):
    """`train-gan --set gan.epochs=9` after the fakes were made from the 8-epoch GAN: the
    fakes no longer follow from it (train-detector refuses them), and without fakes/ (the
    GAN interrupted) the report named no `generate`."""
    w = str(tmp_path / "work")
    write_workdir(w)
    mark_complete(w, "fakes", ["data", "gan"])
    mark_complete(w, "gan", STAGE_INPUTS["gan"], when="2026-12-02T12:00:00")  # trained further
    result = report.run(config.build("tiny", workdir=w))
    assert "Generated fakes" in result["stale"]
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert ("## Generated fakes\n\n*Out of date: gan/ changed since fakes/ was made. What follows may not "
            f"describe the current model; run `deepfake-ray generate --config {w}/config.yaml --workdir {w}`.*") in md
    storage.delete_dir(storage.join(w, "fakes"))
    capsys.readouterr()
    result = report.run(config.build("tiny", workdir=w))
    assert "Generated fakes" in result["missing"]
    assert "not produced yet: Generated fakes" in capsys.readouterr().out
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert f"## Generated fakes\n\n*Not produced yet: run `deepfake-ray generate --config {w}/config.yaml" in md


def test_stale_metrics_name_the_first_stage_to_rerun_not_one_that_would_refuse(tmp_path):
    """The fakes made again after the detector: the report said to run `evaluate`, which
    refuses the out-of-date detector and points to `train-detector`."""
    w = str(tmp_path / "work")
    write_workdir(w)
    mark_complete(w, "fakes", [], when="2026-12-02T11:00:00")  # generated again
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    held_out = md.split("## Held-out test metrics\n\n")[1]
    assert held_out.startswith(
        "*Out of date: detector/, which eval/ was made from, is out of date: fakes/ changed since detector/ "
        "was made. What follows may not describe the current model; run `deepfake-ray train-detector "
        f"--config {w}/config.yaml --workdir {w}`, then the stages after it.*"), held_out
    html = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert f"--config {w}/config.yaml --workdir {w}</code>, then the stages after it.</p>" in html


def test_a_sweep_whose_model_was_retrained_by_hand_says_so_not_interrupted(tmp_path):
    """tune published its best trial; train-detector then trained detector/model again
    (and unmarked the sweep). The sweep's section must not call itself interrupted, whose
    fix, rerunning tune, would replace the hand-trained model without a word."""
    w = str(tmp_path / "work")
    write_workdir(w)
    storage.delete_file(storage.join(w, "tune", "_COMPLETE.json"))
    result = report.run(config.build("tiny", workdir=w))
    assert "Learning-rate sweep (Ray Tune)" in result["stale"]
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert ("Out of date: train-detector has trained detector/model again since this sweep, whose "
            "best trial it no longer is (rerunning tune publishes that trial again over it; "
            "tune --force sweeps anew)") in text
    assert "tune/ is not complete" not in text
    storage.write_json(storage.join(w, "detector", "_COMPLETE.json"),  # the sweep's own model
                       {**storage.read_json(storage.join(w, "detector", "_COMPLETE.json")), "tuned": True})
    report.run(config.build("tiny", workdir=w))
    assert "Out of date: tune/ is not complete" in open(os.path.join(w, "report.html"), encoding="utf-8").read()


def test_histories_count_from_1_throughout_and_show_the_printed_metrics_first(tmp_path):
    """A GAN resumed after epoch 4 (the file's 3) showed `resumed_from` 3 in a table
    counted from 1, and the detector's 15 columns left out val_loss, not frozen_backbone."""
    w = str(tmp_path / "work")
    write_workdir(w, epochs=1)
    gan = {"d_fake": 0.3, "d_loss": 1.2, "d_real": 0.7, "g_loss": 0.9, "images": 77, "images_per_s": 50.0,
           "seconds": 1.5, "workers": 1}
    storage.write_json(storage.join(w, "gan/history.json"), [
        {**gan, "epoch": 3, "restored": False, "resumed_from": None},
        {**gan, "epoch": 4, "restored": True, "resumed_from": 3}])
    storage.write_json(storage.join(w, "detector/history.json"), [{  # as train-detector writes it
        "epoch": 0, "frozen_backbone": True, "lr": 0.0003, "restored": False, "seconds": 9.5,
        "train_acc": 0.8, "train_images_per_s": 12.5, "train_loss": 0.45, "train_n": 77, "val_acc": 0.75,
        "val_acc_at_threshold": 0.8, "val_auc": 0.875, "val_loss": 0.5125, "val_n": 9, "val_threshold": 0.5}])
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "| 5 | 0.9 | 1.2 | 0.7 | 0.3 | 77 | 50 | True | 4 | 1.5 | 1 |" in md, md
    assert ("| epoch | train_loss | train_acc | val_loss | val_acc | val_auc | frozen_backbone | lr | restored |"
            " seconds | train_images_per_s | train_n |") in md, md
    assert "| 1 | 0.45 | 0.8 | 0.5125 | 0.75 | 0.875 | True | 0.0003 | False | 9.5 | 12.5 | 77 |" in md


def test_a_history_whose_losses_overflowed_is_shown_not_a_traceback(tmp_path):
    """A diverged GAN's history held Infinity and NaN (JSON's extensions, as Python writes
    them, until 2026-12-07): rounding inf raised OverflowError and the report failed. Now
    written as null, which every JSON parser reads, and shown as n/a."""
    w = str(tmp_path / "work")
    write_workdir(w, epochs=1)
    diverged = [{"epoch": 0, "g_loss": float("inf"), "d_loss": float("nan"), "d_real": 1.0, "d_fake": 0.0}]
    with open(os.path.join(w, "gan", "history.json"), "w") as f:  # as an older run wrote it
        json.dump(diverged, f)
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "| 1 | inf | nan | 1 | 0 |" in md, md
    storage.write_json(storage.join(w, "gan/history.json"), diverged)
    assert json.loads(storage.read_text(storage.join(w, "gan/history.json")),
                      parse_constant=lambda c: pytest.fail(f"history.json holds {c}")) == [
        {**diverged[0], "g_loss": None, "d_loss": None}]
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "| 1 | n/a | n/a | 1 | 0 |" in md, md


def test_damaged_files_are_reported_not_fatal(tmp_path):
    w = str(tmp_path / "work")
    write_workdir(w)
    for rel in ("data/_COMPLETE.json", "pipeline.json"):
        with open(os.path.join(w, rel), "w") as f:
            f.write('{"images": 12')  # cut short
    result = report.run(config.build("tiny", workdir=w))
    assert "Data" in result["stale"]
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert "Out of date: data/ is not complete" in text
    assert "pipeline.json is not valid JSON" in text


def test_a_stage_no_run_on_record_made_shows_its_time_to_make_as_unknown(tmp_path):
    """Skipped by the last run, made by a command of its own (or before the times were kept)."""
    w = str(tmp_path / "work")
    write_workdir(w)
    for failed in ({"name": "train-gan", "status": "skipped", "seconds": 0.1},
                   {"name": "train-gan", "status": "failed", "seconds": 0.1},  # made nothing
                   {"name": "train-gan", "status": "skipped", "seconds": 0.1, "made_in": "n/a"}):  # edited
        storage.write_json(storage.join(w, "pipeline.json"), {"stages": [
            {"name": "prepare", "status": "done", "seconds": 3.2}, failed, "not a stage"]})
        report.run(config.build("tiny", workdir=w))
        md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
        assert f"| train-gan | {failed['status']} | 0.1 | ? |" in md and "| total |  | 3.3 | ? |" in md, md


def test_a_stage_made_by_its_own_command_shows_the_seconds_its_marker_recorded(tmp_path):
    """`prepare` and `train-gan` run alone, then a pipeline that skips them: pipeline.json
    has no run that made them, their markers have the seconds (the report showed `?`)."""
    w = str(tmp_path / "work")
    write_workdir(w)
    for folder, seconds in (("data", 4.0), ("gan", 18.8)):
        marker = storage.join(w, folder, "_COMPLETE.json")
        storage.write_json(marker, {**storage.read_json(marker), "seconds": seconds, "completed": f"{folder} at 10:00"})
    storage.write_json(storage.join(w, "pipeline.json"), {"stages": [
        {"name": "prepare", "status": "skipped", "seconds": 0.0, "completed": "data at 10:00"},
        {"name": "train-gan", "status": "skipped", "seconds": 0.0, "completed": "gan at 09:00"},  # not this one
        {"name": ["prepare"], "status": "skipped", "completed": {}},  # hand-edited
        {"name": "evaluate", "status": "done", "seconds": 12.0}]})
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "| prepare | skipped | 0 | 4 |" in md and "| train-gan | skipped | 0 | ? |" in md, md
    assert "the seconds its own command recorded in its \\_COMPLETE.json" in md  # no italics from its _
    html = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    assert "the seconds its own command recorded in its _COMPLETE.json" in html
    storage.write_json(storage.join(w, "pipeline.json"), {"stages": [
        {"name": "prepare", "status": "skipped", "seconds": 0.0, "completed": "data at 10:00"},
        {"name": "train-gan", "status": "skipped", "seconds": 0.0, "completed": "gan at 10:00"},
        {"name": "evaluate", "status": "done", "seconds": 12.0}]})
    report.run(config.build("tiny", workdir=w))
    md = open(os.path.join(w, "report.md"), encoding="utf-8").read()
    assert "| train-gan | skipped | 0 | 18.8 |" in md and "| total |  | 12 | 34.8 |" in md, md


def test_missing_sections_name_the_command(tmp_path):
    w = str(tmp_path / "empty run")
    storage.write_json(storage.join(w, "data/_COMPLETE.json"),
                       {"images": 5, "rejected": 0, "reasons": {}, "splits": {"train": 5}, "source": "x"})
    result = report.run(config.build("tiny", workdir=w))
    assert "Data" not in result["missing"] and "GAN training" in result["missing"]
    text = open(os.path.join(w, "report.html"), encoding="utf-8").read()
    parse(os.path.join(w, "report.html"))
    assert f"deepfake-ray train-gan --workdir &#x27;{w}&#x27;" in text
    assert f"deepfake-ray evaluate --workdir '{w}'" in open(os.path.join(w, "report.md")).read()


def test_a_sweep_is_missing_only_from_a_run_that_sweeps(tmp_path):
    """Without tune.enabled, a sweep run by hand would replace the detector this run serves
    (and the next pipeline would refuse it): the report does not ask for one."""
    w = str(tmp_path / "run")
    storage.write_json(storage.join(w, "data/_COMPLETE.json"),
                       {"images": 5, "rejected": 0, "reasons": {}, "splits": {"train": 5}, "source": "x"})
    result = report.run(config.build("tiny", None, ["tune.enabled=false"], workdir=w))
    assert "Learning-rate sweep (Ray Tune)" not in result["missing"]
    text = open(os.path.join(w, "report.md")).read()
    assert "Not part of this run" in text and "deepfake-ray tune" not in text
    assert f"deepfake-ray train-detector --workdir {w}" in text
    result = report.run(config.build("tiny", None, ["tune.enabled=true"], workdir=w))
    assert "Learning-rate sweep (Ray Tune)" in result["missing"]
    text = open(os.path.join(w, "report.md")).read()
    # the sweep makes the detector too: train-detector would train one at detector.lr
    assert f"deepfake-ray tune --workdir {w}" in text and "deepfake-ray train-detector" not in text
    # `report --workdir W` takes the demo preset's settings: the run's own config.yaml says
    storage.write_text(storage.join(w, "config.yaml"),
                       config.to_yaml(config.build("tiny", None, ["tune.enabled=true"], workdir=w)))
    assert "Learning-rate sweep (Ray Tune)" in report.run(config.build("demo", workdir=w))["missing"]


def test_a_report_of_a_folder_that_holds_no_run_exits_2_and_creates_nothing(tmp_path, capsys):
    from deepfake_ray import cli

    mistyped, a_file = tmp_path / "runs" / "dmeo", tmp_path / "notes.txt"
    a_file.write_text("not a run")
    for workdir in (mistyped, a_file):
        assert cli.main(["report", "--preset", "tiny", "--workdir", str(workdir)]) == 2
        err = error_lines(capsys)
        assert err == [f"deepfake-ray report: error: --workdir {workdir} holds no run (no config.yaml, "
                       "no finished stage): pass the work directory of a run, e.g. runs/demo"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("refusal", [PermissionError(13, "Permission denied"),
                                     OSError(30, "Read-only file system")], ids=["EACCES", "EROFS"])
def test_a_report_into_a_run_the_user_cannot_write_exits_2_naming_the_folder(tmp_path, monkeypatch, capsys, refusal):
    """A shared or read-only copy of a run: a traceback naming a temp file (a read-only
    mount's error is an OSError, not a PermissionError)."""
    import tempfile

    from deepfake_ray import cli, lineage
    from deepfake_ray.data import prepare

    w = str(tmp_path / "w")
    cfg = config.build("tiny", workdir=w)
    storage.write_text(storage.join(w, "config.yaml"), config.to_yaml(cfg))
    lineage.complete(cfg, prepare.STAGE, {"images": 3, "rejected": 0, "reasons": {}}, lineage.made(cfg, prepare.STAGE))
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # tests run as root, whom no mode stops
        if dir == w:
            raise type(refusal)(refusal.errno, refusal.strerror, dir)
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert cli.main(["report", "--preset", "tiny", "--workdir", w]) == 2
    assert error_lines(capsys) == [f"deepfake-ray report: error: cannot write the report into --workdir {w} "
                                   f"({refusal.strerror}): give yourself write permission there, or copy the "
                                   "run to a folder you can write"]


def test_a_full_disk_at_a_stages_start_is_said_as_one(tmp_path, monkeypatch, capsys):
    """Writing config.yaml on a full disk said "cannot write to --workdir ... pass a folder
    you can write to": the folder is writable, the disk is full."""
    import errno
    import tempfile

    from deepfake_ray import cli

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w")]) == 2
    err = error_lines(capsys)
    config_yaml = tmp_path / "w" / "config.yaml"  # the file it was writing, named
    assert len(err) == 1 and err[0].startswith(f"deepfake-ray prepare: error: no space left on device writing "
                                               f"{config_yaml}: free space on the disk it writes to"), err


def test_a_stopped_report_says_to_run_it_again_without_stages_or_trainings(tmp_path, capsys, monkeypatch):
    """score and report, stopped, were told that "finished stages are skipped and a
    training resumes from its last checkpoint": they have neither."""
    from deepfake_ray import cli

    w = str(tmp_path / "w")
    write_workdir(w, epochs=1)

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "collect", stopped)
    assert cli.main(["report", "--preset", "tiny", "--workdir", w]) == 130
    assert error_lines(capsys) == [
        "deepfake-ray report: interrupted; run the same command again"]


@pytest.mark.parametrize("refusal", [PermissionError(13, "Permission denied"),
                                     OSError(30, "Read-only file system")], ids=["EACCES", "EROFS"])
def test_a_file_below_the_workdir_this_user_may_not_touch_is_named_in_one_line(tmp_path, capsys, monkeypatch, refusal):
    """A stage folder left by a run as another user (or a read-only mount below the work
    directory) was a traceback: only the work directory's top is checked before a stage."""
    from deepfake_ray import cli

    w = str(tmp_path / "w")
    write_workdir(w, epochs=1)
    locked = os.path.join(w, "detector", "metrics.json")

    def refused(*_, **__):
        raise type(refusal)(refusal.errno, refusal.strerror, locked)

    monkeypatch.setattr(report, "collect", refused)
    assert cli.main(["report", "--preset", "tiny", "--workdir", w]) == 2
    assert error_lines(capsys) == [
        f"deepfake-ray report: error: {refusal.strerror}: {locked}: give this user read and write "
        "permission there (ls -ld shows its owner), or name another place for it"]


def test_a_command_interrupted_in_a_notebook_leaves_the_kernel_alone(tmp_path, capsys, monkeypatch):
    """`%run -m deepfake_ray.cli ...` (main() with sys.argv's command, IPython loaded), then
    Interrupt: the command set the process to end 15 s later and left handlers that end
    it at once, as it does where the process exits next: the notebook's kernel died."""
    import signal
    import threading
    import types

    from deepfake_ray import cli

    w = str(tmp_path / "w")
    write_workdir(w, epochs=1)

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "collect", stopped)
    monkeypatch.setattr("sys.argv", ["deepfake-ray", "report", "--preset", "tiny", "--workdir", w])
    monkeypatch.setitem(sys.modules, "IPython", sys.modules.get("IPython") or types.ModuleType("IPython"))
    ended = []
    monkeypatch.setattr(cli, "exit_within", lambda code, seconds=15.0: ended.append(code))  # this test's process
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        assert cli.main() == 130
        assert "deepfake-ray report: interrupted" in capsys.readouterr().err
        assert ended == [] and not any(t.name == "deepfake-ray-exit" for t in threading.enumerate())
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_damaged_marker_is_said_once_not_taken_silently_for_an_unfinished_stage(tmp_path, capsys):
    """A cut-short _COMPLETE.json counted as "not complete" without a word: the stage, and
    every stage after it, was made again, and nothing said why."""
    from deepfake_ray import cli

    w = str(tmp_path / "w")
    write_workdir(w, epochs=1)
    with open(os.path.join(w, "fakes", "_COMPLETE.json"), "r+b") as f:
        f.truncate(10)
    assert cli.main(["report", "--preset", "tiny", "--workdir", w]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert warned == [f"warning: {w}/fakes/_COMPLETE.json is damaged (not a JSON object): its stage "
                      "counts as not complete: a run makes it again"]


def test_markers_edited_into_other_shapes_are_reported_not_a_traceback(tmp_path, capsys):
    """Valid JSON that is not an object (`[1]`), and a marker naming itself among its
    inputs: an AttributeError, and a RecursionError, where the report says what it found."""
    from deepfake_ray import cli

    w = str(tmp_path / "w")
    write_workdir(w, epochs=1)
    with open(os.path.join(w, "data", "_COMPLETE.json"), "w") as f:
        f.write("[1]")
    detector = os.path.join(w, "detector", "_COMPLETE.json")
    with open(detector) as f:
        done = json.load(f)
    with open(detector, "w") as f:
        json.dump({**done, "inputs": {"detector": "itself", **done.get("inputs", {})}}, f)
    assert cli.main(["report", "--preset", "tiny", "--workdir", w]) == 0, capsys.readouterr().err
    md = open(os.path.join(w, "report.md")).read()
    assert "data/_COMPLETE.json is not a JSON object (damaged?); rerun the stage that writes it with --force" in md


def test_report_reads_and_writes_s3(tmp_path, s3_server):
    local = str(tmp_path / "local")
    figures = write_workdir(local, epochs=3)
    w = s3_server("report-bucket") + "/runs/r1"
    storage.upload_dir(local, w)
    result = report.run(config.build("tiny", workdir=w))
    assert result["html"] == w + "/report.html" and result["missing"] == []
    out = tmp_path / "report.html"
    out.write_bytes(storage.read_bytes(result["html"]))
    assert set(parse(str(out)).images) == expected_figures(figures)
    assert storage.exists(w + "/report.md")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    w = str(tmp_path / "work")
    figures = write_workdir(w)
    report.run(config.build("tiny", workdir=w))
    page = os.path.join(w, "report.html")
    base = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{page}"],
                   check=True, capture_output=True, timeout=180)
    with Image.open(shot) as img:
        darkest, brightest = img.convert("L").getextrema()
    assert shot.stat().st_size > 0 and brightest - darkest > 100  # not a blank page
    # The browser decoded every embedded figure: a probe copy of the page counts them.
    probe = tmp_path / "probe.html"
    probe.write_text(open(page, encoding="utf-8").read().replace("</body>", (
        "<script>addEventListener('load', () => { const i = [...document.images];"
        " document.body.dataset.ok = i.filter(x => x.naturalWidth > 0).length + '/' + i.length; });"
        "</script></body>")), encoding="utf-8")
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}"],
                         check=True, capture_output=True, text=True, timeout=180).stdout
    n = len(expected_figures(figures))
    assert f'data-ok="{n}/{n}"' in dom
