"""`deepfake-ray report`: WORKDIR/report.html (self-contained) and WORKDIR/report.md.

The report is built from whatever the work directory holds, so it can be written after
any stage; a section whose outputs are missing names the command that produces them,
and one whose stage is not complete, or was made before a stage it reads was redone,
says it is out of date (the old held-out metrics after `train-detector --force`) and
names the first stage to run again (the detector's, when that is out of date too).
Figures are embedded in the HTML as data: URIs, so the one file opens anywhere (no
network, no sibling files); report.md links them by relative path instead.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import re
import time

import deepfake_ray
from deepfake_ray import lineage, storage
from deepfake_ray.config import Config
from deepfake_ray.errors import UsageError
from deepfake_ray.report_render import Figure, Missing, Stale, Table, Text, render_html, render_md

MAX_SAMPLE_GRIDS = 8  # GAN sample grids shown, spread over the epochs (each can be ~1 MB)
MAX_COLUMNS = 12
MAX_ROWS = 100


# --- reading the work directory ----------------------------------------------------

def read_json(workdir: str, rel: str):
    try:
        return json.loads(storage.read_bytes(storage.join(workdir, rel)))
    except FileNotFoundError:
        return None
    except ValueError as e:
        return Text(f"{rel} is not valid JSON ({e}); rerun the stage that writes it with --force")


def not_an_object(value, rel: str) -> list:
    """The blocks for a marker read_json did not find an object in: none where it is
    missing, read_json's own note where it is not JSON, else this one."""
    if value is None or isinstance(value, Text):
        return [value] if value else []
    return [Text(f"{rel} is not a JSON object (damaged?); rerun the stage that writes it with --force")]


def figure(workdir: str, rel: str, caption: str) -> list[Figure]:
    try:
        return [Figure(caption, rel, storage.read_bytes(storage.join(workdir, rel)))]
    except FileNotFoundError:
        return []


def fmt(value) -> str:
    if isinstance(value, float):  # 86,400 s, not 8.64e+04
        return f"{value:,.0f}" if 1e4 <= abs(value) < 1e15 else short(value)
    if isinstance(value, list) and len(value) > 8:  # e.g. per-batch losses: summarize
        numbers = [v for v in value if isinstance(v, (int, float))]
        if len(numbers) == len(value):
            return f"{len(value)} values, first {numbers[0]:.4g}, last {numbers[-1]:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


def short(value: float) -> str:
    """4 significant digits, more where those would round a score to a perfect one (a
    recall of 0.99996 is not 1, a threshold of 0.99999997 not "only p = 1"). Within 1e-12
    of a whole number it is that number: a sum's rounding (scikit-learn's average precision
    of a perfect ranking is 0.9999999999999999), not a score."""
    if math.isfinite(value) and abs(value - round(value)) < 1e-12:  # round(inf) raises
        value = float(round(value))
    for digits in range(4, 17):
        text = f"{value:.{digits}g}"
        if float(text) == value or float(text) not in (0.0, 1.0):
            return text
    return text


# what train-gan and train-detector print per epoch: first, before the columns left out
# past MAX_COLUMNS (the files' keys come sorted: val_loss fell behind frozen_backbone)
PRINTED = ("g_loss", "d_loss", "d_real", "d_fake", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc")


def history_blocks(w: str, rel: str) -> list:
    """A per-epoch history, its epochs counted from 1 as every command prints them and
    the model's "best epoch" row shows them (the file counts from 0)."""
    history = read_json(w, rel)
    if not (isinstance(history, list) and history and all(
            isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in history)):
        return json_blocks(history, rel)
    return [Text(f"{rel}, per epoch (counted from 1):"), *json_blocks([as_printed(h) for h in history], rel)]


def as_printed(entry: dict) -> dict:
    """An epoch's entry with its printed metrics first and its epochs counted from 1 (a
    resumed GAN's `resumed_from` too: "resumed after epoch 4" is the file's 3)."""
    counted = {k: entry[k] + 1 for k in ("epoch", "resumed_from") if type(entry.get(k)) is int}
    return {**{k: entry[k] for k in PRINTED if k in entry}, **entry, **counted}


def flatten(obj: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so nested metrics fit in one table."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


FIRST_COLUMNS = ("condition", "epoch", "trial_id")  # JSON keys arrive sorted: put these first


def records_table(records: list[dict], source: str) -> Table:
    headers = list(dict.fromkeys(k for r in records for k in r))
    headers.sort(key=lambda h: h not in FIRST_COLUMNS)  # stable: the rest keep their order
    note = []
    if len(headers) > MAX_COLUMNS:
        note.append(f"{len(headers) - MAX_COLUMNS} more columns")
        headers = headers[:MAX_COLUMNS]
    if len(records) > MAX_ROWS:
        note.append(f"{len(records) - MAX_ROWS} more rows")
    # a value given as null (a diverged epoch's NaN loss, as JSON writes it) is n/a; a key
    # the entry lacks (a newer column) is left empty
    rows = [[fmt(r[h]) if r.get(h) is not None else "n/a" if h in r else "" for h in headers]
            for r in records[:MAX_ROWS]]
    return Table(headers, rows, f"{' and '.join(note)} in {source}" if note else "")


def as_records(obj) -> list[dict] | None:
    """Per-epoch histories come as [{...}], {"epochs": [{...}]} or {"1": {...}}."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return [flatten(r) for r in obj]
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1:
            return as_records(lists[0])
        if obj and all(isinstance(v, dict) for v in obj.values()):
            return [{"epoch": k, **flatten(v)} for k, v in obj.items()]
    return None


def json_blocks(obj, source: str) -> list:
    if obj is None or isinstance(obj, Text):
        return [obj] if obj else []
    records = as_records(obj)
    if records:
        return [records_table(records, source)]
    if isinstance(obj, dict):
        return [Table(["", ""], [[k, fmt(v)] for k, v in flatten(obj).items()])]
    return [Text(f"{source}: {fmt(obj)}")]


# --- the sections --------------------------------------------------------------------

def timings(w: str) -> list:
    stages = (read_json(w, "pipeline.json") or {})
    if isinstance(stages, Text):  # not valid JSON: say so
        return [stages]
    stages = stages.get("stages") if isinstance(stages, dict) else None
    if not stages:
        return []
    # pipeline.json is the last run's: a stage an earlier run made is skipped in it, with
    # the seconds of the run that completed it where it knows them (a resumed training's
    # are that run's only); a failed stage's output is not made
    stages = [s for s in stages if isinstance(s, dict)]
    on_record = [lineage.seconds_to_make(s) for s in stages]
    made = [m if m is not None else marker_seconds(w, s) for s, m in zip(stages, on_record)]
    rows = [[fmt(s.get("name")), fmt(s.get("status")), fmt(s.get("seconds")), fmt(m) if m is not None else "?"]
            for s, m in zip(stages, made)]
    total = sum(lineage.recorded_seconds(s.get("seconds")) or 0 for s in stages)
    to_make = fmt(sum(made)) if None not in made else "?"
    note = ("a stage no pipeline run made: the seconds its own command recorded in its _COMPLETE.json"
            if made != on_record else "")
    return [Table(["stage", "status", "seconds (last run)", "seconds of the run that completed it"],
                  rows + [["total", "", fmt(total), to_make]], note)]


def marker_seconds(w: str, stage: dict) -> float | None:
    """A skipped stage's seconds as its marker records them, where it is the output the
    pipeline skipped: made by the stage's own command (`train-gan`), pipeline.json has none."""
    folders = {command: folder for *_, command, folder in SECTIONS if folder}
    name, completed = stage.get("name"), stage.get("completed")
    folder = folders.get(name) if isinstance(name, str) else None  # else hand-edited
    if stage.get("status") != "skipped" or folder is None or not isinstance(completed, str):
        return None
    done = read_json(w, f"{folder}/_COMPLETE.json")
    if isinstance(done, dict) and done.get("completed") == completed:
        return lineage.recorded_seconds(done.get("seconds"))
    return None


def data(w: str) -> list:
    s = read_json(w, "data/_COMPLETE.json")
    if not isinstance(s, dict):
        return not_an_object(s, "data/_COMPLETE.json")
    blocks = [Table(["", ""], [["source", fmt(s.get("source"))], ["usable images", fmt(s.get("images"))],
                               ["rejected files", fmt(s.get("rejected"))]])]
    if s.get("splits"):
        order = ["train", "val", "test"]
        splits = sorted(s["splits"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 3)
        blocks.append(Table(["split", "images"], [[k, fmt(v)] for k, v in splits]))
    if s.get("reasons"):
        reasons = sorted(s["reasons"].items(), key=lambda kv: -kv[1])
        blocks.append(Table(["rejected because", "files"], [[k, fmt(v)] for k, v in reasons]))
    return blocks


def fakes(w: str) -> list:
    """A section of their own, not part of data's: missing or out of date (a GAN trained
    further since), it says so and names the command, as the other stages' do."""
    s = read_json(w, "fakes/_COMPLETE.json")
    if not isinstance(s, dict):
        return not_an_object(s, "fakes/_COMPLETE.json")
    scalars = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
    return ([Table(["fakes/_COMPLETE.json", ""], [[k, fmt(v)] for k, v in scalars.items()])]
            + figure(w, "fakes/preview.png", "the first fakes chosen, as the detector sees them"))


def epoch_of(uri: str) -> int:
    match = re.search(r"epoch_(\d+)", uri.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else -1


def gan(w: str) -> list:
    blocks = figure(w, "gan/losses.png", "DCGAN generator and discriminator losses")
    grids = sorted((u for u in storage.list_files(storage.join(w, "gan", "samples"))
                    if u.endswith(".png")), key=epoch_of)
    if len(grids) > MAX_SAMPLE_GRIDS:  # evenly spread, always the first and the last epoch
        step = (len(grids) - 1) / (MAX_SAMPLE_GRIDS - 1)
        shown = [grids[round(i * step)] for i in range(MAX_SAMPLE_GRIDS)]
        blocks.append(Text(f"Sample grids of {len(shown)} of {len(grids)} epochs (fixed noise):"))
        grids = shown
    for uri in grids:
        rel = "gan/samples/" + uri.rsplit("/", 1)[-1]
        blocks += [Figure(f.caption, rel, f.data, small=True)
                   for f in figure(w, rel, f"generated faces (fixed noise) after epoch {epoch_of(uri) + 1}")]
    return blocks + history_blocks(w, "gan/history.json")


MODEL_KEYS = ("arch", "input_size", "resolution", "threshold")


def detector(w: str) -> list:
    blocks = history_blocks(w, "detector/history.json")
    meta = read_json(w, "detector/model/model.json")
    if isinstance(meta, dict):
        rows = [[k, threshold_cell(meta[k]) if k == "threshold" else fmt(meta[k])] for k in MODEL_KEYS if k in meta]
        if isinstance(meta.get("epoch"), int):  # counted from 1, as train-detector prints it
            rows.append(["best epoch", str(meta["epoch"] + 1)])
        if isinstance(meta.get("software"), dict):  # what made it
            rows.append(["made with", deepfake_ray.versions_text(meta["software"])])
        blocks += [Text("Exported model (WORKDIR/detector/model):"), Table(["", ""], rows)]
    return blocks


def tune(w: str) -> list:
    blocks = []
    try:
        text = storage.read_text(storage.join(w, "tune", "results.csv"))
        blocks.append(records_table(list(csv.DictReader(io.StringIO(text))), "tune/results.csv"))
    except FileNotFoundError:
        pass
    best = read_json(w, "tune/_COMPLETE.json")
    if isinstance(best, dict):
        best = {k: v for k, v in best.items() if k not in ("settings", "inputs")}  # lineage records
        blocks.append(Table(["tune/_COMPLETE.json", ""], [[k, fmt(v)] for k, v in flatten(best).items()]))
    return blocks + figure(w, "tune/lr.png", "validation metric against learning rate")


def metrics(w: str) -> list:
    """eval/'s files, the training curves too: evaluate draws them, so they are out of date
    with the rest of eval/ (after a retrained detector) and are labelled with it."""
    found = read_json(w, "eval/metrics.json")
    if isinstance(found, dict):  # its reliability bins are drawn below, not listed
        found = as_metric_cells(thresholds_whole({k: v for k, v in found.items() if k != "reliability"}))
        if (said := confusion_said(found.get("confusion_matrix"))) is not None:  # its layout said in it
            found = {k: (said if k == "confusion_matrix" else v) for k, v in found.items()
                     if k != "confusion_matrix_layout"}
        if isinstance(val := found.get("validation"), dict) and isinstance(val.get("epoch"), int):
            found["validation"] = {**val, "epoch": val["epoch"] + 1}  # counted from 1, as "best epoch" is
    blocks = json_blocks(found, "eval/metrics.json")
    if isinstance(found, dict) and isinstance(share := found.get("fake_share"), float):
        blocks.insert(0, Text(
            f"What these figures measure: the held-out test split, {share:.0%} of it fakes, and those "
            "fakes made by the same GAN as the detector's training fakes. Precision, average precision "
            "and calibration hold at that share of fakes only (where 1 image in 100 is fake, most "
            "flagged ones can be real: the false-positive rate says how many), and no other generator "
            "is measured. ci95: 95% intervals (Wilson; DeLong for ROC-AUC)."))
    return (blocks + budget_blocks(w) + figure(w, "eval/confusion.png", "confusion matrix (held-out test split)")
            + figure(w, "eval/roc.png", "ROC curve (held-out test split)")
            + figure(w, "eval/reliability.png", "reliability of p_fake (held-out test split)")
            + figure(w, "eval/curves.png", "the detector's training and validation curves"))


def threshold_cell(value):
    """A threshold whole (copied from a report, a rounded one flags other images)."""
    return repr(value) if isinstance(value, float) else value


def thresholds_whole(metrics: dict) -> dict:
    """`metrics` with each threshold (a key ending in it, validation's too) whole."""
    return {k: thresholds_whole(v) if isinstance(v, dict) else threshold_cell(v) if k.endswith("threshold") else v
            for k, v in metrics.items()}


def confusion_said(matrix) -> str | None:
    """evaluate's [[tn, fp], [fn, tp]] (rows actual real, fake) in words; None if not that."""
    try:
        (tn, fp), (fn, tp) = matrix
    except (TypeError, ValueError):
        return None
    return f"reals: {tn} right, {fp} flagged fake; fakes: {tp} flagged, {fn} missed"


def budget_blocks(w: str) -> list:
    """eval/thresholds.json: a threshold per false-positive budget, and what it does."""
    budgets = read_json(w, "eval/thresholds.json")
    if not (isinstance(budgets, list) and all(isinstance(b, dict) for b in budgets)):
        return json_blocks(budgets, "eval/thresholds.json")
    rows = [as_metric_cells({"reals flagged at most": b.get("false_positive_budget"),
                             # whole, to copy: a short decimal (metrics.budget_threshold)
                             "threshold": threshold_cell(b.get("threshold")),
                             "validation FPR": b.get("validation_false_positive_rate"),
                             "test FPR": b.get("test_false_positive_rate"),
                             "test FPR 95%": b.get("test_false_positive_rate_ci95"),
                             "test recall": b.get("test_recall"), "test recall 95%": b.get("test_recall_ci95"),
                             **({"note": b["note"]} if b.get("note") else {})}) for b in budgets]
    reals = budgets[0].get("validation_reals") if budgets else None
    return [Text(f"Thresholds for a false-positive budget, chosen on the validation split's {fmt(reals)} "
                 "reals, and what each does on the held-out test split: to use one, set it as "
                 "\"threshold\" in detector/model/model.json and run evaluate again."),
            records_table(rows, "eval/thresholds.json")]


def robustness(w: str) -> list:
    """A row per condition, the metrics evaluate prints first; their intervals in a table
    of their own (beside the rest they crowded the metrics out of the columns shown)."""
    obj = read_json(w, "eval/robustness.json")
    if not (isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values())):
        return json_blocks(obj, "eval/robustness.json")
    from deepfake_ray.detector.metrics import CONDITIONS, REPORTED

    def first(metrics: dict, leave_out=()) -> dict:  # evaluate's order, then the rest
        order = [*(m for m in REPORTED if m in metrics), *(m for m in metrics if m not in REPORTED)]
        return as_metric_cells({m: metrics[m] for m in order if m not in leave_out})

    # the file's keys are sorted (write_json): clean first, as evaluate prints them
    obj = dict(sorted(obj.items(), key=lambda kv: CONDITIONS.index(kv[0]) if kv[0] in CONDITIONS else len(CONDITIONS)))

    # the share of fakes is the split's (said above the metrics), the matrix a figure
    rows = [{"condition": k, **first(v, ("ci95", "confusion_matrix", "fake_share"))} for k, v in obj.items()]
    blocks = [records_table(rows, "eval/robustness.json")]
    intervals = [{"condition": k, **first(v["ci95"])} for k, v in obj.items() if isinstance(v.get("ci95"), dict)]
    if intervals:
        blocks += [Text("95% intervals (eval/robustness.json, ci95):"),
                   records_table(intervals, "eval/robustness.json")]
    return blocks


def as_metric_cells(metrics: dict) -> dict:
    """Metrics as their cells show them: an interval as 0.9922-1, a null (no value there:
    precision where nothing was flagged) as n/a."""
    def cell(value):
        if value is None:
            return "n/a"
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
            return f"{short(value[0])}-{short(value[1])}"
        if isinstance(value, dict):
            return {k: cell(v) for k, v in value.items()}
        return value
    return {k: cell(v) for k, v in metrics.items()}


def config_text(w: str) -> list:
    try:
        return [Text(storage.read_text(storage.join(w, "config.yaml")), pre=True)]
    except FileNotFoundError:
        return []


# (anchor, title, builder, the command that produces the section's files, their stage folder)
SECTIONS = [
    ("timings", "Stage timings", timings, "pipeline", None),
    ("data", "Data", data, "prepare", "data"),
    ("gan", "GAN training", gan, "train-gan", "gan"),
    ("fakes", "Generated fakes", fakes, "generate", "fakes"),
    ("detector", "Detector training", detector, "train-detector", "detector"),
    ("tune", "Learning-rate sweep (Ray Tune)", tune, "tune", "tune"),
    ("metrics", "Held-out test metrics", metrics, "evaluate", "eval"),
    ("robustness", "Robustness", robustness, "evaluate", "eval"),
    ("config", "Resolved configuration", config_text, "pipeline", None),
]


def out_of_date(cfg: Config, folder: str, read: dict, seen: frozenset = frozenset()) -> tuple[str, str] | None:
    """Why the files in WORKDIR/`folder` may not describe the run as it is now, and the
    folder whose stage must run first (one it was made from, when that is out of date:
    this stage's own command would be refused), or None.
    `read`: the markers read so far (the sections share inputs; on S3 each is a request)."""
    done = lineage.marker(cfg, folder, read)
    if done is None and folder == "tune" and retrained_by_hand(cfg, read):
        return ("train-detector has trained detector/model again since this sweep, whose best "
                "trial it no longer is (rerunning tune publishes that trial again over it; "
                "tune --force sweeps anew)", folder)
    if done is None:  # left by an earlier run while the stage is redone, or not finished
        return f"{folder}/ is not complete (being redone, or interrupted)", folder
    inputs = done.get("inputs")  # a hand-edited marker's may name itself, or be no mapping
    for source in inputs if isinstance(inputs, dict) else ():  # made from a stage that no longer follows
        if source in seen | {folder}:
            continue
        if stale := out_of_date(cfg, source, read, seen | {folder}):
            return f"{source}/, which {folder}/ was made from, is out of date: {stale[0]}", stale[1]
    if redone := lineage.redone_since(cfg, done, read):
        return f"{', '.join(f + '/' for f in redone)} changed since {folder}/ was made", folder
    return None


def maker(cfg: Config, folder: str, read: dict, saved: str | None) -> str:
    """The command that makes WORKDIR/`folder`."""
    if folder == "detector":
        done = lineage.marker(cfg, folder, read)
        if (done or {}).get("tuned") or (done is None and sweeps(cfg, saved)):
            return "tune"  # the sweep's best trial: train-detector would retrain it at detector.lr
    return next(command for *_, command, f in SECTIONS if f == folder)


def retrained_by_hand(cfg: Config, read: dict) -> bool:
    """A sweep publishes its best trial as detector/model; train-detector since (which
    unmarks the sweep) leaves a complete detector that no sweep made."""
    model = lineage.marker(cfg, "detector", read)
    return model is not None and not model.get("tuned")


def saved_config(workdir: str) -> str | None:
    """The run's config.yaml, read once for every section that asks; None without one."""
    try:
        return storage.read_text(storage.join(workdir, "config.yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def sweeps(cfg: Config, saved: str | None) -> bool:
    """Whether the run sweeps the learning rate, as its own config.yaml says: `report`'s
    settings come from its command line, whose preset need not be the run's."""
    import yaml

    try:
        return bool(yaml.safe_load(saved or "")["tune"]["enabled"])
    except (yaml.YAMLError, TypeError, KeyError):  # none saved, or not as we write it
        return cfg.tune.enabled


def read_section(cfg: Config, build, folder: str | None, read: dict) -> tuple[list, bool]:
    """A section's blocks, read between two equal reads of its stage's marker, and whether
    they were: a stage writes its marker after its files, so one finishing meanwhile left
    the last run's files (metrics of the model before) shown under its new marker. Read
    again, up to 3 times."""
    if folder is None:
        return build(cfg.workdir), True
    uri = storage.join(cfg.workdir, folder)
    for _ in range(3):
        read[folder] = before = storage.completed(uri)  # the marker the rest of the report uses
        blocks = build(cfg.workdir)
        if storage.completed(uri) == before:
            return blocks, True
    return blocks, False


def collect(cfg: Config, saved: str | None) -> list[tuple[str, str, list]]:
    out, read = [], {}
    for anchor, title, build, command, folder in SECTIONS:
        redo = lineage.command_line(cfg.workdir, maker(cfg, folder, read, saved) if folder else command,
                                    saved is not None)
        blocks, settled = read_section(cfg, build, folder, read)
        if not blocks and folder == "tune" and not sweeps(cfg, saved):
            # not missing: a sweep run by hand would replace the detector this run serves
            blocks = [Text("Not part of this run: with tune.enabled false the detector trains at "
                           "one learning rate, detector.lr. To sweep it, run the pipeline with "
                           "--set tune.enabled=true.")]
        elif not blocks:
            blocks = [Missing(redo)]
        elif not settled:
            blocks = [Stale(lineage.command_line(cfg.workdir, "report", saved is not None),
                            f"{folder}/ changed while this report read it (its stage is running)"), *blocks]
        elif folder and (stale := out_of_date(cfg, folder, read)):
            why, first = stale  # first: a stage it was made from, when that is out of date too
            redo = lineage.command_line(cfg.workdir, maker(cfg, first, read, saved), saved is not None)
            blocks = [Stale(redo, why, then=first != folder), *blocks]
        out.append((anchor, title, blocks))
    return out


def check_is_a_run(cfg: Config, saved: str | None) -> None:
    """A report of a folder no stage has written to (a mistyped --workdir) would be all
    "not produced yet", and create the folder."""
    if saved is not None:
        return
    read = {}
    if not storage.is_dir(cfg.workdir) or not any(
            folder and lineage.marker(cfg, folder, read) for _, _, _, _, folder in SECTIONS):
        raise UsageError(f"--workdir {cfg.workdir} holds no run (no config.yaml, no finished "
                         "stage): pass the work directory of a run, e.g. runs/demo")


def run(cfg: Config, **_) -> dict:
    """Write WORKDIR/report.html and WORKDIR/report.md (always rebuilt, --force or not: it is cheap)."""
    workdir = cfg.workdir
    saved = saved_config(workdir)
    check_is_a_run(cfg, saved)
    sections = collect(cfg, saved)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    html_uri, md_uri = storage.join(workdir, "report.html"), storage.join(workdir, "report.md")
    try:
        storage.write_text(html_uri, render_html(workdir, sections, generated))
        storage.write_text(md_uri, render_md(workdir, sections, generated))
    except OSError as e:  # a shared or read-only copy of a run (S3's refusals are explained)
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = e.strerror or "permission denied"
        raise UsageError(f"cannot write the report into --workdir {workdir} ({why}): give yourself write "
                         "permission there, or copy the run to a folder you can write") from None
    missing = [title for _, title, blocks in sections if isinstance(blocks[0], Missing)]
    stale = [title for _, title, blocks in sections if isinstance(blocks[0], Stale)]
    notes = [f"{what}: {', '.join(titles)}" for what, titles in
             (("not produced yet", missing), ("out of date", stale)) if titles]
    print(f"report: {html_uri}" + (f" ({'; '.join(notes)})" if notes else ""))
    return {"html": html_uri, "md": md_uri, "missing": missing, "stale": stale}
