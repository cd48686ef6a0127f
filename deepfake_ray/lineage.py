"""What each complete stage was made from, so that a rerun reuses it only while that holds.

A stage's `_COMPLETE.json` records `settings` (the config values its output depends on)
and `inputs` (an identity of each upstream stage's own marker, which changes each time
that stage completes). A rerun then:

- reuses it when both still match (or when the marker predates these records);
- refuses, exit 2, when this run asks for other settings: a redo may cost hours of
  training, so it is never started on a guess (`--force` redoes it; another
  `--workdir` keeps both);
- redoes it when an input was redone since: its output was made from data that is gone;
- continues a finished training from its last checkpoint when only its epoch count
  rose (the study trained 60 epochs in six sittings; here `--set gan.epochs=60` after 50).

A training that resumes also records them when it begins (`_STARTED.json`): resubmitted
after an input was redone, it starts over rather than resume from checkpoints that
learned from the old one; resubmitted with other settings (but more epochs), it is
refused, as its checkpoints would carry on with the old ones.

Operational values (resources, checkpoint retention, retries, batch sizes of inference)
are not settings: a resubmission to another cluster must still find its stages complete.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, NamedTuple

from deepfake_ray import config, storage
from deepfake_ray.config import Config, value_of
from deepfake_ray.errors import UsageError


STARTED = "_STARTED.json"  # a resumable stage's run under way: what it is made from
CLEARING = "clearing"  # STARTED's one key while a redo clears the stage: it starts over
class Maker(NamedTuple):
    """What a stage folder that others read holds, the module whose STAGE makes it, and
    the commands that make it, as a refusal names them."""
    holds: str
    module: str
    commands: tuple[str, ...]


# the detector also by `tune`, which records train-detector's settings in it
MAKERS = {"data": Maker("prepared images", "deepfake_ray.data.prepare", ("prepare",)),
          "gan": Maker("trained generator", "deepfake_ray.gan.train", ("train-gan",)),
          "fakes": Maker("generated fakes", "deepfake_ray.gan.generate", ("generate",)),
          "detector": Maker("finished detector", "deepfake_ray.detector.train", ("train-detector", "tune"))}


def maker_stage(folder: str) -> "Stage":
    """The Stage that makes WORKDIR/`folder` (one of MAKERS)."""
    return importlib.import_module(MAKERS[folder].module).STAGE


def contents(folder: str) -> str:
    return MAKERS[folder].holds if folder in MAKERS else "complete output"


def made_by(folder: str) -> tuple[str, ...]:
    return MAKERS[folder].commands if folder in MAKERS else ()


class WorkdirState(UsageError):
    """A refusal for what the work directory holds (an input missing or out of date, a
    stage made or begun with other settings): a run holding it may be changing that."""


def no_settings(cfg: Config) -> dict:
    return {}


def no_description(done: dict) -> str:
    return "see its _COMPLETE.json"


def source_unchanged(cfg: Config, done: dict) -> None:
    return None


def made_here(done: dict) -> None:
    return None


def as_recorded(settings: dict) -> dict:
    return settings


@dataclass(frozen=True)
class Stage:
    command: str  # the CLI command that runs it
    folder: str  # WORKDIR/<folder>/_COMPLETE.json marks it complete
    inputs: tuple[str, ...] = ()  # the folders of the stages it reads
    settings: Callable[[Config], dict] = field(default=no_settings, compare=False)
    describe: Callable[[dict], str] = field(default=no_description, compare=False)  # "1,600 images"
    grows: tuple[str, ...] = ()  # settings that may rise on a complete stage: it goes on
    # (what made it, the flags that remake it here) when another command made this stage's
    # output from a run of its own: it cannot be continued, only remade
    made_elsewhere: Callable[[dict], tuple[str, str] | None] = field(default=made_here, compare=False)
    # settings that command chose itself (a sweep's rate): a stage reading the output takes
    # them as they are, whatever the run's config.yaml says
    chosen_elsewhere: tuple[str, ...] = ()
    # checks added since, oldest first: (the summary key each records, "before ..." what a
    # complete stage lacking that key was made without). Said, not refused: refusing would
    # stop every old work directory over a setting its user never set
    added: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # how what the stage reads from outside the work directory (a source folder) differs
    # from what its complete summary recorded, if it does: then it is made again
    source_changed: Callable[[Config, dict], str | None] = field(default=source_unchanged, compare=False)
    # settings, recorded or asked, as they are compared: two spellings of one value
    # (`sample:040`, `sample:40`, a bare `sample` of 40) must not refuse a work directory
    settings_now: Callable[[dict], dict] = field(default=as_recorded, compare=False)
    # the settings a rerun hint asks for, completed so that they pass the stage's own checks
    hint: Callable[[dict], dict] = field(default=as_recorded, compare=False)


@dataclass(frozen=True)
class Plan:
    done: dict | None  # the complete stage's summary, to reuse as it is
    redo: bool  # start from nothing: --force, or an input changed since it was made
    made: dict  # what this run is made from, recorded in its marker


def uri(cfg: Config, stage: Stage) -> str:
    return storage.join(cfg.workdir, stage.folder)


def marker(cfg: Config, folder: str, read: dict | None = None) -> dict | None:
    """The `_COMPLETE.json` of WORKDIR/`folder`, read once per `read` (one decision asks
    for the same markers several times: small reads that add up on S3)."""
    if read is None:
        return storage.completed(storage.join(cfg.workdir, folder))
    if folder not in read:
        read[folder] = storage.completed(storage.join(cfg.workdir, folder))
    return read[folder]


def identity(cfg: Config, folder: str, read: dict | None = None) -> str | None:
    """Changes whenever the stage in `folder` completes again (its marker has the time)."""
    done = marker(cfg, folder, read)
    if done is None:
        return None
    if folder == "detector" and done.get("model_id") not in exported_ids(cfg, read):
        # another model copied in (or its threshold edited): what it made is out of date
        done = {**done, "model_found": exported_model(cfg, read)}
    return hashlib.sha1(json.dumps(done, sort_keys=True, default=str).encode()).hexdigest()[:16]


def exported_meta(cfg: Config, read: dict | None = None) -> dict | None:
    """The model.json in WORKDIR/detector/model now (None if there is none to read)."""
    from deepfake_ray import checkpoint

    read = {} if read is None else read
    if "detector/model" not in read:
        try:
            read["detector/model"] = checkpoint.load_meta(storage.join(cfg.workdir, "detector", "model"))
        except UsageError:  # none, or damaged; a store that fails now is said, not taken for none
            read["detector/model"] = None
    return read["detector/model"]


def exported_model(cfg: Config, read: dict | None = None) -> str | None:
    """The id of the model in WORKDIR/detector/model now (None if there is none)."""
    from deepfake_ray import checkpoint

    meta = exported_meta(cfg, read)
    return checkpoint.model_id(meta) if meta is not None else None


def exported_ids(cfg: Config, read: dict | None = None) -> set:
    """Every id that names that model (checkpoint.model_ids: a marker written before ids
    covered the threshold names it by its weights alone); {None} if there is none."""
    from deepfake_ray import checkpoint

    meta = exported_meta(cfg, read)
    return checkpoint.model_ids(meta) if meta is not None else {None}


def made(cfg: Config, stage: Stage, read: dict | None = None) -> dict:
    return {"settings": stage.settings(cfg),
            "inputs": {folder: identity(cfg, folder, read) for folder in stage.inputs}}


def differences(stage: Stage, done: dict, asked: dict) -> dict[str, str]:
    """Setting -> "key=recorded (asked: value)", for each this run asks to change."""
    recorded = stage.settings_now(done.get("settings", {}))
    return {k: f"{k}={recorded[k]} (asked: {v})" for k, v in stage.settings_now(asked["settings"]).items()
            if k in recorded and recorded[k] != v}


def grown(stage: Stage, done: dict, asked: dict) -> list[str]:
    """The epoch counts this run raises: a finished training goes on from its last checkpoint."""
    recorded = done.get("settings", {})
    return [k for k in stage.grows if k in recorded and asked["settings"][k] > recorded[k]]


def check_recorded_settings(cfg: Config, stage: Stage, done: dict, asked: dict) -> None:
    """UsageError when the complete stage was made with other settings than this run's
    (more epochs are not other settings: they continue it, unless another command made
    it from a run of its own)."""
    elsewhere = stage.made_elsewhere(done)
    more = [] if elsewhere else grown(stage, done, asked)
    differ = [text for k, text in differences(stage, done, asked).items() if k not in more]
    if differ and elsewhere:
        made_by, remake = elsewhere
        raise WorkdirState(f"{uri(cfg, stage)} is {made_by}, which cannot be trained further or remade "
                         f"with {', '.join(differ)}: use another --workdir, or "
                         f"`{command_line(cfg.workdir, stage.command, settings_saved=False)} {remake}` to "
                         "train one anew there")
    if differ:
        own = set_flags(own_settings(cfg, stage, done, asked, more))
        # the stage's own command: --force on the pipeline would redo every stage
        raise WorkdirState(f"{uri(cfg, stage)} was made with {', '.join(differ)}: use another "
                         f"--workdir to keep both, `{redo_with_yours(cfg, stage)}` to "
                         f"redo it alone there with yours, or its own settings ({own})")


def redo_with_yours(cfg: Config, stage: Stage) -> str:
    """The command that makes `stage` anew alone with this run's settings of it: the work
    directory's config.yaml (another run's, maybe) with --set for each setting it holds
    otherwise; every one, bare, where there is none to read. A hint without them ran the
    demo preset's."""
    yours = stage.hint(stage.settings_now(stage.settings(cfg)))
    saved_uri = storage.join(cfg.workdir, "config.yaml")
    try:
        saved = config.build(config_file=saved_uri)
    except UsageError:  # none there; or unreadable now, which the command, run, will say
        saved_settings = storage.exists(saved_uri)
        return f"{command_line(cfg.workdir, stage.command, saved_settings)} --force {set_flags(yours)}"
    theirs = stage.hint(stage.settings_now(stage.settings(saved)))
    differ = {k: v for k, v in yours.items() if theirs.get(k) != v}
    return f"{command_line(cfg.workdir, stage.command)} --force {set_flags(differ)}".rstrip()


def set_flags(settings: dict) -> str:
    return " ".join(f"--set {shlex.quote(f'{k}={as_override(v)}')}" for k, v in settings.items())


def own_settings(cfg: Config, stage: Stage, done: dict, asked: dict, more: list[str]) -> dict:
    """The recorded values a rerun must ask for to be this stage's settings: those that
    differ, and those this run does not ask about."""
    recorded = stage.settings_now(done.get("settings", {}))
    keys = [k for k in differences(stage, done, asked) if k not in more]
    keys += [k for k in recorded if k not in stage.settings_now(asked["settings"]) and known(cfg, k)]
    return stage.hint({k: recorded[k] for k in keys})


def known(cfg: Config, key: str) -> bool:
    try:
        value_of(cfg, key)
        return True
    except AttributeError:  # a setting an older version recorded
        return False


def as_override(value) -> str:
    """A recorded setting as `--set` takes it back: text as is, the rest as JSON (which
    YAML reads: true, null, [0.8, 0.1, 0.1])."""
    return value if isinstance(value, str) else json.dumps(value)


def changed_inputs(done: dict, asked: dict) -> list[str]:
    recorded = done.get("inputs", {})
    return [f for f, now in asked["inputs"].items() if f in recorded and recorded[f] != now]


def redone_since(cfg: Config, done: dict, read: dict | None = None) -> list[str]:
    """The input folders of a complete stage (`done`, its marker) completed again since."""
    return [f for f, was in done.get("inputs", {}).items() if identity(cfg, f, read) != was]


def stale_inputs(cfg: Config, stage: Stage, read: dict | None = None) -> dict[str, list[str]]:
    """Input folder of `stage` -> the folders it was made from that changed since."""
    return {folder: stale for folder in stage.inputs
            if (stale := redone_since(cfg, marker(cfg, folder, read) or {}, read))}


def check_inputs(cfg: Config, stage: Stage, read: dict | None = None) -> None:
    """A stage must not be made from one that is missing (said before Ray starts, not once
    it is up) or itself out of date."""
    read = {} if read is None else read
    for folder in stage.inputs:
        if marker(cfg, folder, read) is None:
            check_bucket(cfg.workdir)
            if len(chain := missing_chain(cfg, folder, read)) > 1:
                raise WorkdirState(missing_line(cfg, chain))
            raise WorkdirState(f"no {contents(folder)} in {storage.join(cfg.workdir, folder)}: "
                                 f"run {makers(cfg, folder)}")
    if out_of_date := stale_inputs(cfg, stage, read):
        folder, stale = next(iter(out_of_date.items()))
        raise WorkdirState(f"{storage.join(cfg.workdir, folder)} is out of date: "
                             f"{', '.join(f + '/' for f in stale)} changed since it was made. Run "
                             f"{makers(cfg, folder)}")


def check_bucket(uri: str) -> None:
    """UsageError for an s3:// path whose bucket does not exist: everything in it reads as
    missing, and a stage was told to run the one before it, which failed on the bucket."""
    if storage.is_s3(uri) and storage.bucket_missing(uri):
        raise UsageError(f"{uri}: the bucket does not exist: check the s3:// path")


def missing_chain(cfg: Config, folder: str, read: dict) -> list[str]:
    """`folder` (missing) and the missing folders its stage reads in turn: no fakes and no
    GAN are ["fakes", "gan"]. Each hint named one stage back, one refused run at a time."""
    chain = [folder]
    while chain[-1] in MAKERS and (up := next(
            (f for f in maker_stage(chain[-1]).inputs if marker(cfg, f, read) is None), None)):
        chain.append(up)
    return chain


def missing_line(cfg: Config, chain: list[str]) -> str:
    """What is missing along `chain`, and the commands that make it, the first first."""
    saved, name = hint_names(cfg)
    what = ", nor ".join(f"{contents(f)} in {storage.join(cfg.workdir, f)}" for f in chain)
    steps = ", then ".join(name(made_by(f)[0]) for f in reversed(chain))
    return f"no {what}: run {steps}{'' if saved else ' with this --workdir'}, or the whole {name('pipeline')}"


def hint_names(cfg: Config) -> tuple[bool, Callable[[str], str]]:
    """Whether the work directory holds its run's config.yaml, and how a hint names a
    command then: with that run's settings, or bare (the hint adds "with this --workdir")."""
    saved = storage.exists(storage.join(cfg.workdir, "config.yaml"))

    def name(command: str) -> str:
        return f"`{command_line(cfg.workdir, command)}`" if saved else f"`deepfake-ray {command}`"

    return saved, name


def makers(cfg: Config, folder: str) -> str:
    """The commands that make `folder`, then the whole pipeline, as a hint names them:
    with the run's own settings where its config.yaml holds them, as command_line does
    (following a bare `deepfake-ray train-gan` ran the demo preset's, and was refused)."""
    commands = made_by(folder)
    saved, name = hint_names(cfg)
    first = " first" if saved else " with this --workdir first"
    whole = f"the whole {name('pipeline')}"
    if not commands:
        return whole + first
    return " (or ".join(map(name, commands)) + ")" * (len(commands) - 1) + f"{first}, or {whole}"


def command_line(workdir: str, command: str, settings_saved: bool = True) -> str:
    """`command` on this work directory with the settings it was run with: its config.yaml
    holds them all (without them, the hint would run the demo preset's)."""
    config = f" --config {shlex.quote(storage.join(workdir, 'config.yaml'))}" if settings_saved else ""
    return f"deepfake-ray {command}{config} --workdir {shlex.quote(workdir)}"


def say_complete(cfg: Config, stage: Stage, done: dict, read: dict | None = None) -> None:
    """Says so, and whether a stage it was made from is itself out of date since: complete
    from its inputs, it no longer follows from the run as it is now."""
    print(f"{stage.command}: {uri(cfg, stage)} is already complete ({stage.describe(done)}); "
          "--force redoes it", flush=True)
    say_missing(cfg, stage, done)
    for folder, stale in stale_inputs(cfg, stage, read).items():
        print(f"{stage.command}: note: {storage.join(cfg.workdir, folder)}, which it was made from, is "
              f"out of date ({', '.join(f + '/' for f in stale)} changed since): `deepfake-ray "
              f"pipeline` with this --workdir remakes both", flush=True)


def rerun_reason(cfg: Config, stage: Stage, done: dict, asked: dict) -> tuple[str, bool] | None:
    """None while the complete stage is current; else why it runs again, and whether it
    starts over (not when it continues for more epochs). UsageError when this run asks for
    other settings of a stage it would keep or continue: one whose inputs changed is made
    anew anyway, with whatever settings this run has."""
    if changed := changed_inputs(done, asked):
        folders = ", ".join(f + "/" for f in changed)
        return f"{folders} changed since {uri(cfg, stage)} was made: making it again", True
    check_recorded_settings(cfg, stage, done, asked)
    if changed := stage.source_changed(cfg, done):
        return f"{changed} since {uri(cfg, stage)} was made: making it again", True
    if more := grown(stage, done, asked):
        rises = ", ".join(f"{k} {done['settings'][k]} -> {asked['settings'][k]}" for k in more)
        return f"continuing {uri(cfg, stage)} from its last checkpoint ({rises})", False
    return None


def plan(cfg: Config, stage: Stage, force: bool, read: dict | None = None) -> Plan:
    """Whether a stage runs, says so when it does not, and what its run is made from.
    `read`: the markers this run has read already (check_inputs), not read again."""
    storage.check_folder(uri(cfg, stage), stage.command)
    read = {} if read is None else read
    asked = made(cfg, stage, read)
    done = marker(cfg, stage.folder, read)
    if done and not force:
        if (rerun := rerun_reason(cfg, stage, done, asked)) is None:
            say_complete(cfg, stage, done, read)
            return Plan(done, False, asked)
        why, force = rerun  # more epochs go on; other inputs start over
        print(f"{stage.command}: {why}", flush=True)
    elif not force and (begun := unfinished(cfg, stage)):
        if begun.get(CLEARING):
            print(f"{stage.command}: {uri(cfg, stage)} was being cleared to start over when its run "
                  "stopped: starting it over", flush=True)
            force = True
        elif changed := changed_inputs(begun, asked):
            print(f"{stage.command}: {', '.join(f + '/' for f in changed)} changed since the unfinished "
                  f"run in {uri(cfg, stage)} began: starting it over", flush=True)
            force = True  # its checkpoints learned from data that is gone
        else:
            check_resumable(cfg, stage, begun, asked)
    check_inputs(cfg, stage, read)
    return Plan(None, force, asked)


def check_resumable(cfg: Config, stage: Stage, begun: dict, asked: dict) -> None:
    """UsageError when an unfinished run would resume with other settings than it began
    with: its checkpoints (and their optimizer state) hold the old ones, which would quietly
    win, and its marker would record the new. Only more epochs are fine: it goes on longer."""
    more = grown(stage, begun, asked)
    if differ := [text for k, text in differences(stage, begun, asked).items() if k not in more]:
        raise WorkdirState(f"{uri(cfg, stage)} holds an unfinished run begun with {', '.join(differ)}: "
                         f"run with its settings to resume it, `{redo_with_yours(cfg, stage)}` "
                         "to start it over there with yours, or another --workdir to keep it")


def current(cfg: Config, stage: Stage, read: dict | None = None) -> dict | None:
    """The summary of the stage if complete, with these settings, from the inputs there
    now; None when it must run; UsageError when it was made (or its unfinished run begun)
    with other settings."""
    read = {} if read is None else read
    done, asked = marker(cfg, stage.folder, read), made(cfg, stage, read)
    if done is None:
        if (begun := unfinished(cfg, stage)) and not begun.get(CLEARING) and not changed_inputs(begun, asked):
            check_resumable(cfg, stage, begun, asked)
        return None
    return done if rerun_reason(cfg, stage, done, asked) is None else None


def upstream_made(cfg: Config, stage: Stage) -> dict[str, tuple]:
    """Setting -> (value recorded, "key=recorded (asked: value)", folder, its command) where
    a complete stage that `stage` reads, itself or through another, was made with another
    value than `cfg` asks. `stage`'s own settings are left to its own checks."""
    read: dict = {}
    own, found, seen = stage.settings(cfg), {}, set()
    todo = list(stage.inputs)
    while todo:
        folder = todo.pop(0)
        if folder in seen or folder not in MAKERS or (done := marker(cfg, folder, read)) is None:
            continue
        seen.add(folder)
        todo += list(done.get("inputs", {}))
        maker = maker_stage(folder)
        recorded = maker.settings_now(done.get("settings", {}))
        chosen = maker.chosen_elsewhere if maker.made_elsewhere(done) else ()
        for key, text in differences(maker, done, {"settings": maker.settings(cfg)}).items():
            if key not in own and key not in found and key not in chosen and known(cfg, key):
                found[key] = (recorded[key], text, folder, maker.command)
    return found


def as_made_upstream(cfg: Config, stage: Stage, asked: set[str] = frozenset(),
                     check: Callable[[Config], None] | None = None) -> tuple[Config, str]:
    """`cfg` with the settings the stages `stage` reads were made with, where it differs
    from them on a setting the run left to its preset, and the note that says so (to be
    printed if the stage runs; "" where nothing was taken): a stage run alone reads
    those stages as they are, and this run's config.yaml then names what made the work
    directory, so that `--config W/config.yaml` (what every hint passes) finds them complete
    instead of refusing or redoing them. A setting the run asks for (`asked`: given by
    --set, a flag or --config) that they were not made with is refused: this command would
    not make them so; so is one that `stage`'s own `check` refuses, naming where it came
    from (data/ prepared at a resolution the DCGAN has no layers for)."""
    found = upstream_made(cfg, stage)
    if conflicts := {k: v for k, v in found.items() if k in asked}:
        _, text, folder, _ = next(iter(conflicts.values()))
        keys = ", ".join(conflicts)
        raise UsageError(f"{storage.join(cfg.workdir, folder)} was made with {text}, and {stage.command} "
                         f"reads it as it is: leave out {keys} to take the settings it was made with, or "
                         f"run `{redo_with_yours(cfg, maker_stage(folder))}` first, with yours (then the "
                         "stages after it)")
    if not found:
        return cfg, ""
    made_with = cfg
    try:
        for key, (value, *_) in found.items():
            made_with = config.merge(made_with, config.nested(key, value))
    except UsageError:  # a value an older version recorded in another form: left as asked
        return cfg, ""
    made = ", ".join(text for _, text, *_ in found.values())
    try:
        if check:
            check(made_with)
    except UsageError as e:
        folders = ", ".join(dict.fromkeys(storage.join(cfg.workdir, folder) for *_, folder, _ in found.values()))
        earliest = list(found.values())[-1][3]  # found from `stage` back: the last is the furthest upstream
        redo = command_line(cfg.workdir, earliest, settings_saved=False)
        raise UsageError(f"{folders} was made with {made}, which {stage.command} cannot take: {e}; run "
                         f"`{redo} --force` with settings it takes (then the stages after it)") from None
    return made_with, (f"{stage.command}: note: the stages it reads were made with {made}; this run "
                       "takes those, and config.yaml records them")


def say_missing(cfg: Config, stage: Stage, done: dict) -> None:
    """One note for the oldest check a complete stage was made without, if any."""
    if lacks := next((before for key, before in stage.added if key not in done), None):
        print(f"{stage.command}: note: {uri(cfg, stage)} was made {lacks}", flush=True)


def preflight(cfg: Config, stage: Stage, force: bool) -> dict | None:
    """Before Ray starts: a current stage's summary (and says so), else None once the
    stages it reads are there and current (UsageError if not)."""
    storage.check_folder(uri(cfg, stage), stage.command)
    read: dict = {}
    if not force and (done := current(cfg, stage, read)):
        storage.check_not_held(cfg.workdir, stage.command)  # not complete while another run replaces it
        say_complete(cfg, stage, done, read)
        return done
    check_inputs(cfg, stage, read)
    return None


def unfinished(cfg: Config, stage: Stage) -> dict | None:
    try:
        return storage.read_json(storage.join(uri(cfg, stage), STARTED))
    except (FileNotFoundError, NotADirectoryError):
        return None


def unmark(cfg: Config, stage: Stage) -> None:
    """Called by a run to be redone once its own checks have passed, before it changes
    anything: until it completes again, the stage is not complete. Not in `plan`: a run
    that a check refuses (a typo beside --force) leaves the complete stage as it was."""
    storage.unmark(uri(cfg, stage))


def clear(stage_uri: str, keep: tuple[str, ...] = ()) -> None:
    """A redo (--force, inputs made anew): a stage's outputs and run state gone, but `keep`.
    Its marker first, so that a clearing cut short leaves no marker vouching for the rest;
    then its record of the run under way (STARTED) says CLEARING until the rest is gone, so
    that a rerun after one cut short starts over, as was asked, instead of resuming what is
    left (a GAN's old epochs, a finished sweep's results.csv) as its own."""
    import pyarrow.fs as pafs

    storage.unmark(stage_uri)
    fs, path = storage.resolve(stage_uri)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if not entries:
        return
    started = storage.join(stage_uri, STARTED)
    storage.write_json(started, {CLEARING: True})
    for info in entries:
        if info.base_name in keep or info.base_name == STARTED:
            continue
        entry = storage.join(stage_uri, info.base_name)
        if info.type == pafs.FileType.Directory:
            storage.delete_dir(entry)  # on S3 without the empty folder object pyarrow leaves
        else:
            storage.delete_file(entry)
    storage.delete_file(started)


def start(cfg: Config, stage: Stage, plan: Plan) -> None:
    """For a stage that resumes (a training), once its checks have passed: unmarked, and
    what the run under way is made from, so that a resubmission after its inputs were
    redone starts over instead of resuming."""
    unmark(cfg, stage)
    storage.write_json(storage.join(uri(cfg, stage), STARTED), plan.made)


def complete(cfg: Config, stage: Stage, summary: dict, made_from: dict) -> dict:
    """Marks the stage complete; returns what a later rerun that reuses it returns."""
    finished_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    summary = {**summary, **made_from, "completed": finished_at}
    storage.mark_complete(uri(cfg, stage), summary)
    return summary


def seconds_to_make(entry: dict) -> float | None:
    """What making a pipeline.json entry's output took: a done stage's own seconds, a
    skipped one's as the run that made it recorded them; None for a failed stage (it made
    nothing) or where unknown."""
    seconds = {"done": entry.get("seconds"), "skipped": entry.get("made_in")}.get(entry.get("status"))
    return recorded_seconds(seconds)


def recorded_seconds(value) -> float | None:
    """A recorded number of seconds, or None for anything else (a hand-edited file)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
