"""`deepfake-ray` console script: parse, build the config, call one stage's run().

Exit codes: 0 done, 2 bad usage or bad input, or a problem around it the user can fix (a
full disk, an unreachable store, workers out of memory): one line saying what and how to
fix it; 1 anything else, 130 interrupted (Ctrl-C), 128 + N stopped by signal N (143
SIGTERM, 129 SIGHUP, 138 SIGUSR1), 141 the reader of the output has gone (`| head`).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import deepfake_ray
from deepfake_ray.errors import (Terminated, UsageError, disk_full, find_error, find_usage_error, note_sigterm,
                                 out_of_memory_cause, stdout_reader_gone, stop_signal, to_devnull)


@dataclass(frozen=True)
class Command:
    """What the CLI knows of one command; its module has run(cfg, **options)."""
    module: str
    help: str
    flags: dict[str, str | None] = field(default_factory=dict)  # flag -> the config key it sets (None: an option)
    required: tuple[str, ...] = ()
    set_example: str | None = None  # what --set's help shows: a key the command reads
    force_help: str | None = None  # None: FORCE_HELP, a stage's
    # one at a time per work directory: two trainings would share one run's checkpoints,
    # and one's --force would delete what the other writes
    writes: bool = True
    workdir: bool = True  # score and serve read --model and --input, write --out: no work directory
    ray: bool = True  # report reads files only
    keeps_config: bool = False  # must not overwrite the run's resolved config
    batch: str | None = None  # the batch its workers hold in memory: what to lower when they run out
    batch_recorded: bool = False  # a setting it records: an unfinished training resumes only with it


FORCE_HELP = ("start the training over: an unfinished run's checkpoints are deleted, and its outputs replaced "
              "(train-detector and tune keep the complete model until the new one is ready); without it a "
              "complete stage is skipped and an unfinished one resumes from its last checkpoint; the stages "
              "made from it are redone when next run")
COMMANDS = {
    "pipeline": Command(
        "deepfake_ray.pipeline", "prepare, train-gan, generate, train-detector (or tune, with tune.enabled), "
        "evaluate, score the test split, report; complete stages are skipped", {"--source": "data.source"},
        set_example="gan.epochs=20",
        force_help="redo EVERY stage, from prepare on (to redo one, run its own command with --force)"),
    "prepare": Command("deepfake_ray.data.prepare", "ingest a face dataset into WORKDIR/data",
                       {"--source": "data.source"}, set_example="data.resolution=128",
                       force_help="prepare it again: the complete WORKDIR/data is kept until the new is ready "
                                  "(without it, it is skipped while the source's files are unchanged); the "
                                  "stages made from it are redone when next run"),
    "train-gan": Command("deepfake_ray.gan.train", "train the DCGAN with Ray Train into WORKDIR/gan",
                         set_example="gan.epochs=20", batch="gan.batch_size", batch_recorded=True),
    "generate": Command("deepfake_ray.gan.generate", "generate fakes with the trained DCGAN into WORKDIR/fakes",
                        {"--num": "gan.num_fakes"}, set_example="gan.generate_batch_size=128",
                        force_help="make the fakes again, replacing WORKDIR/fakes (without it complete fakes "
                                   "are skipped); the stages made from them are redone when next run",
                        batch="gan.generate_batch_size"),
    "train-detector": Command("deepfake_ray.detector.train", "fine-tune the detector with Ray Train, exported "
                              "to WORKDIR/detector/model", set_example="detector.lr=3e-4",
                              batch="detector.batch_size", batch_recorded=True),
    # tune refuses detector.lr: it sweeps it
    "tune": Command("deepfake_ray.detector.tune", "sweep the detector learning rate with Ray Tune into "
                    "WORKDIR/tune, and export the best trial's model to WORKDIR/detector/model (replacing "
                    "train-detector's)", {"--samples": "tune.samples"}, set_example="tune.epochs=3",
                    batch="detector.batch_size", batch_recorded=True),
    "evaluate": Command("deepfake_ray.detector.evaluate", "measure the detector on the held-out test split, "
                        "clean and degraded, with a threshold per false-positive budget, into WORKDIR/eval",
                        set_example="serve.score_batch_size=64",
                        force_help="measure again, replacing WORKDIR/eval (without it a complete one is "
                                   "skipped)", batch="serve.score_batch_size"),
    "score": Command(
        "deepfake_ray.serving.score", "score a folder, bucket or manifest into a table",
        {"--model": None, "--input": None, "--out": None}, required=("--model", "--input", "--out"),
        set_example="serve.score_batch_size=64",
        force_help="score into an existing --out again (without it, an --out this model scored is kept; one "
                   "another model scored is refused); a stopped run's finished parts are still reused: remove "
                   ".OUT.parts/ beside --out to score every file anew",
        writes=False, workdir=False, keeps_config=True, batch="serve.score_batch_size"),
    "serve": Command("deepfake_ray.serving.app", "serve the detector over HTTP with Ray Serve",
                     {"--model": None, "--host": "serve.host", "--port": "serve.port"}, required=("--model",),
                     set_example="serve.max_replicas=2", force_help=argparse.SUPPRESS,  # accepted: nothing to redo
                     writes=False, workdir=False, keeps_config=True),
    "report": Command("deepfake_ray.report", "write WORKDIR/report.html and report.md",
                      force_help=argparse.SUPPRESS,  # accepted; the report is always rebuilt
                      writes=False, ray=False, keeps_config=True),
}
WRITERS = tuple(name for name, c in COMMANDS.items() if c.writes)  # jobs/_entry.py adds --run-name to these


# a flag that sets a config key says which (an error about its value names the key)
FLAG_HELP = {
    "--source": "DIR | s3://bucket/prefix | kaggle:OWNER/DATASET | sample[:N]; sets data.source "
                "(default: the preset's)",
    "--num": "how many fakes, 0 for as many as the reals; sets gan.num_fakes (default: the preset's)",
    "--samples": "how many learning rates to try; sets tune.samples (default: the preset's)",
    "--model": "an exported model folder, local or s3://, e.g. runs/demo/detector/model",
    "--input": "folder, s3://bucket/prefix, or a .parquet manifest with a 'path' column, of images to score",
    "--out": "the table to write, .parquet or .csv (local or s3://): a row per file with path, p_fake, "
             "label, error, threshold, model",
    "--host": "address to listen on, 0.0.0.0 for every interface; sets serve.host (default: the "
              "preset's, 127.0.0.1)",
    "--port": "port to listen on; sets serve.port (default: the preset's, 8000)",
}
ADDRESS_HELP = ("a running Ray cluster's GCS address, HEAD:6379 (not the dashboard's URL), or auto on "
                "one of its nodes (default: RAY_ADDRESS, else an in-process Ray)")
DESCRIPTION = """Detect GAN-generated face images: each stage of the pipeline is a command, run
on an in-process Ray (the default) or a Ray cluster (--address)."""
EPILOG = """examples:
  deepfake-ray pipeline                    # the demo, offline, in runs/demo
  deepfake-ray train-detector --workdir runs/demo --set detector.epochs=4
  deepfake-ray serve --model runs/demo/detector/model
  deepfake-ray score --model runs/demo/detector/model --input faces/ --out scores.csv

exit codes: 0 done; 2 bad usage or input, a full disk, an unreachable store or workers
out of memory (one line says what and how to fix it); 1 anything else; 130 Ctrl-C; 143
SIGTERM, 129 SIGHUP, 138 SIGUSR1 (a rerun resumes); 141 the reader of the output has gone.

environment:
  RAY_ADDRESS            the cluster to use, as --address
  DEEPFAKE_RAY_PROGRESS  1 or 0: progress bars on or off (default: on a terminal only)
  NO_COLOR               no colour codes in Ray's worker prefixes
  AWS_*                  the S3 store: AWS_ENDPOINT_URL, AWS_REGION, AWS_CA_BUNDLE,
                         AWS_PROFILE or the keys, as boto3 reads them
  KAGGLE_*               a kaggle: source's credentials: KAGGLE_API_TOKEN, or
                         KAGGLE_USERNAME and KAGGLE_KEY; KAGGLE_CONFIG_DIR

'deepfake-ray COMMAND --help' for a command's options; README.md is the guide;
docs/configuration.md lists every config key."""


class PrintVersion(argparse.Action):
    """argparse's own version action wraps the line at the terminal's width and reads
    the packages' metadata for every command; this does so only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(deepfake_ray.version_line())
        parser.exit()


class OneLineParser(argparse.ArgumentParser):
    """A mistake on the command line is one line, as every other bad input is: argparse
    printed its usage block (the top level's, for a subcommand's unknown flag) above it."""

    def error(self, message):
        if message.startswith("argument COMMAND: invalid choice") and self.options_first:
            message += "; options go after the command, e.g. deepfake-ray prepare --workdir W"
        elif (typed := re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)) and (
                close := difflib.get_close_matches(typed[1], COMMANDS, n=1, cutoff=0.6)):
            message = message.replace(" (choose from", f" (did you mean {close[0]}?) (choose from", 1)
        elif message == "the following arguments are required: COMMAND":
            # `deepfake-ray --vers`: no abbreviations here either, and the fix is the flag
            if near := near_flag(self.options_first, self):
                message = f"unrecognized arguments: {self.options_first} (did you mean {near}?)"
            else:
                message += f" (choose from {', '.join(map(repr, COMMANDS))})"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    options_first = ""  # set by main: the option the command line put before the command, if any


def near_flag(typed: str, *parsers: argparse.ArgumentParser) -> str | None:
    """The flag of `parsers` nearest a mistyped or abbreviated one (`--forc`, `--wor=w`), if any."""
    typed = typed.partition("=")[0]
    flags = sorted({flag for p in parsers for action in p._actions for flag in action.option_strings})
    return next(iter(difflib.get_close_matches(typed, flags, n=1)), None) if typed.startswith("--") else None


def unrecognized(argv: list[str], unknown: list[str], *parsers: argparse.ArgumentParser) -> str:
    """argparse's "unrecognized arguments" error, with its likely fix: `--set KEY VALUE`
    typed with a space (argparse took VALUE for an argument of its own), or the flag of
    `parsers` nearest a mistyped one. jobs/_entry.py's scripts say theirs so too."""
    for flag, key, value in zip(argv, argv[1:], argv[2:]):
        if flag == "--set" and "=" not in key and value == unknown[0]:
            return f"--set {key} {value}: join them with '=': --set {key}={value}"
    near = near_flag(unknown[0], *parsers)
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {near}?)" if near else "")


def parser() -> argparse.ArgumentParser:
    from deepfake_ray.config import preset_names

    # no abbreviations (`--vers`), as on each command's: see below
    p = OneLineParser(prog="deepfake-ray", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=PrintVersion,
                   help="print the version, and those of the libraries it runs on and Python; exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    p.commands = {}
    for name, command in COMMANDS.items():
        # no abbreviations: `--se` for --set would become ambiguous with a flag added later
        c = p.commands[name] = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        c.add_argument("--preset", default="demo", metavar="NAME",
                       help=f"config preset: {', '.join(preset_names())} (default: demo); README's "
                            "Presets says what each is for")
        c.add_argument("--config", metavar="FILE", help="YAML file layered over the preset (flags and --set "
                       "win over it), e.g. WORKDIR/config.yaml for that run's settings")
        example = command.set_example
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key (repeatable; wins over --config and flags)"
                            + (f", e.g. --set {example}" if example else "") + "; every key: docs/configuration.md")
        # accepted everywhere, as scripts pass them; offered only where they are read
        c.add_argument("--workdir", help=argparse.SUPPRESS if not command.workdir else
                       "local folder or s3://bucket/prefix; sets workdir (default: the --config "
                       "file's workdir, else runs/<preset>)")
        c.add_argument("--address", help=ADDRESS_HELP if command.ray else argparse.SUPPRESS)
        c.add_argument("--force", action="store_true", help=command.force_help or FORCE_HELP)
        for flag in command.flags:
            required = flag in command.required
            c.add_argument(flag, required=required, help=FLAG_HELP[flag] + (" (required)" if required else ""))
    return p


def set_key(override: str) -> str:
    """The key a `--set key=value` sets."""
    return override.partition("=")[0].strip()


def asked_keys(args: argparse.Namespace) -> set[str]:
    """The config keys this command line sets itself (--set, a flag, --config), as
    against those its preset gives."""
    from deepfake_ray import config

    def dotted(section: dict, prefix: str = "") -> list[str]:
        return [k for key, value in section.items() for k in (
            dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]

    keys = flag_and_set_keys(args)
    return keys | set(dotted(config.load_file(args.config))) if args.config else keys


def build_config(args: argparse.Namespace):
    from deepfake_ray import config, storage
    from deepfake_ray.data import sources

    flagged, paths = [], [args.workdir]
    for flag, key in COMMANDS[args.command].flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if key and value is not None:
            flagged.append(f"{key}={value}")
        if key != "data.source":  # checked below, as the source it is
            paths.append(value)
    # --set last: it wins over a flag for the same key (`--samples 8 --set tune.samples=4`
    # is 4), so a `--set` appended to any command line asks for that value
    overrides = [*flagged, *args.overrides]
    cfg = config.build(args.preset, args.config, overrides)
    set_last = any(set_key(o) == "workdir" for o in args.overrides)  # wins, as for any key
    workdir = cfg.workdir if args.workdir is None or set_last else args.workdir
    if not workdir.strip():
        raise UsageError("no work directory given (--workdir or workdir is blank): pass --workdir DIR "
                         "or s3://bucket/prefix")
    # named as given, before a missing bucket reads as a local folder `s3:`, and before
    # the first file written there
    for path in (*paths, cfg.workdir):
        if isinstance(path, str):
            storage.check_s3_path(path)
    storage.check_s3_path(cfg.data.source, forms=sources.FORMS, source=True)
    check_swept_settings(args.command, cfg, args.overrides)
    cfg = config.build(args.preset, args.config, overrides, workdir=storage.normalize(workdir))
    check_unexpanded(cfg, args)  # the work directory chosen: a --workdir wins over a file's
    return with_absolute_pretrained(cfg)


PATH_KEYS = ("workdir", "data.source", "data.cache_dir", "detector.pretrained")


def check_unexpanded(cfg, args: argparse.Namespace) -> None:
    """`workdir: $HOME/runs` in a --config file: no shell expands it, and a folder named
    `$HOME` was made in the current one. A value typed on the command line (a flag, a
    --set) has been through the shell: a `$` left in it was quoted, a folder's own name;
    so is one that names a folder there now (a run's config.yaml records it so)."""
    from deepfake_ray.config import value_of

    typed = typed_keys(args)
    for key in PATH_KEYS:
        value = value_of(cfg, key)
        if key in typed or os.path.exists(os.path.expanduser(value)):
            continue
        if variable := re.search(r"\$\{?[A-Za-z_]\w*\}?", value):
            raise UsageError(f"{key}={value_of(cfg, key)} holds {variable[0]}, which nothing expands in a "
                             "config file: write the path out, or pass it on the command line, where "
                             "the shell expands it")


def typed_keys(args: argparse.Namespace) -> set[str]:
    """The config keys the command line gives values to itself (--workdir, a flag, --set),
    which win over a --config file's and the preset's."""
    return flag_and_set_keys(args) | ({"workdir"} if args.workdir is not None else set())


def flag_and_set_keys(args: argparse.Namespace) -> set[str]:
    """The config keys of this command's flags that were given, and of its --set overrides."""
    keys = {key for flag, key in COMMANDS[args.command].flags.items()
            if key and getattr(args, flag.lstrip("-").replace("-", "_")) is not None}
    return keys | {set_key(o) for o in args.overrides}


def with_absolute_pretrained(cfg):
    """`cfg` with a detector.pretrained file named relative to this folder made absolute:
    Ray Train runs its workers in folders of their own, where it names nothing (and a
    rerun from elsewhere reads config.yaml). `~/...` is kept as typed, as data.cache_dir."""
    import dataclasses

    from deepfake_ray import storage

    spec = cfg.detector.pretrained
    if spec in ("hub", "none", "") or storage.is_s3(spec) or spec.startswith("~") or os.path.isabs(spec):
        return cfg
    return dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, pretrained=os.path.abspath(spec)))


# what a sweep's trials take instead of the detector's own setting
SWEPT = {"detector.lr": "the rate from tune.lr_min..tune.lr_max",
         "detector.epochs": "tune.epochs epochs"}


def check_swept_settings(command: str, cfg, overrides: list[str]) -> None:
    """A --set that would be ignored: where the sweep trains the detector (tune, or the
    pipeline with tune.enabled), each trial draws its own rate and trains tune.epochs;
    where the pipeline trains it once (tune.enabled false), no tune.* setting is read."""
    keys = dict.fromkeys(o.partition("=")[0].strip() for o in overrides)
    if command == "pipeline" and not cfg.tune.enabled:
        if unread := [k for k in keys if k.startswith("tune.") and k != "tune.enabled"]:
            raise UsageError(f"--set {unread[0]} is not used: this pipeline trains the detector once, "
                             "at detector.lr (tune.enabled is false); add --set tune.enabled=true to "
                             "sweep the learning rate")
        return
    if command != "tune" and command != "pipeline":
        return
    for key in keys:
        if key in SWEPT:
            where, instead = (("tune", "or run `deepfake-ray train-detector`") if command == "tune"
                              else ("the pipeline with tune.enabled", "or set tune.enabled=false"))
            raise UsageError(f"--set {key} is not used by {where}: its trials take {SWEPT[key]}; "
                             f"set those instead, {instead} to train once with {key}")


def options(args: argparse.Namespace) -> dict:
    opts = {"force": args.force}
    for flag, key in COMMANDS[args.command].flags.items():
        if key is None:
            opts[flag.lstrip("-")] = getattr(args, flag.lstrip("-"))
    return opts


@contextlib.contextmanager
def settings_recorded(cfg):
    """WORKDIR/config.yaml holds this run's settings while it runs. A run that ends before
    any stage began to change (unmarked or completed), refused (exit 2), stopped (Ctrl-C,
    `ray job stop`) or failed, puts back the config.yaml it replaced: reports and rerun
    hints go on naming the settings the outputs came from."""
    from deepfake_ray import storage

    uri, ours = recorded(cfg)
    try:
        previous = storage.read_text(uri) if storage.exists(uri) else None
        storage.write_text(uri, ours)
    except OSError as e:
        raise unwritable(cfg, e) from None
    changes = storage.marker_changes
    try:
        yield
    except BaseException:
        if storage.marker_changes == changes:
            # not on a full disk or an unreachable store, the error itself: that is the line
            with contextlib.suppress(OSError):
                put_back(uri, ours, previous)
        raise


def recorded(cfg) -> tuple[str, str]:
    """Where this run's settings are recorded, and the text recorded."""
    from deepfake_ray import config, storage

    return storage.join(cfg.workdir, "config.yaml"), config.to_yaml(as_recorded(cfg))


def record_again(cfg) -> None:
    """config.yaml once more, now that this run holds the lock: written before (on S3, when
    no lock was seen), it may since have been replaced by a run that started at the same
    moment, wrote its own, was refused at the lock, and put back the one before."""
    from deepfake_ray import storage

    uri, ours = recorded(cfg)
    if not storage.exists(uri) or storage.read_text(uri) != ours:
        storage.write_text(uri, ours)


def as_recorded(cfg):
    """`cfg` as config.yaml keeps it: a local source and the download cache absolute, as the
    workdir is, so that a rerun with --config W/config.yaml from another folder reads the
    same data, and finds the download it made. (Errors name them as typed.)"""
    import dataclasses

    from deepfake_ray.data import sources

    cache = cfg.data.cache_dir  # `~/...` kept as it is: the same folder for any user on any machine
    if cache.strip() and not cache.startswith("~"):
        cache = os.path.abspath(cache)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=sources.canonical(cfg.data.source),
                                                             cache_dir=cache))


def put_back(uri: str, ours: str, previous: str | None) -> None:
    """config.yaml as it was, unless another run has written it since (on S3 another run
    may take the lock between this run's check_free and its own lock, and write its
    config.yaml meanwhile)."""
    from deepfake_ray import storage

    if not storage.exists(uri) or storage.read_text(uri) != ours:
        return
    if previous is None:
        storage.delete_file(uri)
    else:
        storage.write_text(uri, previous)


def stop_on_sigterm(held: contextlib.ExitStack | None = None) -> None:
    """SIGTERM, SIGHUP and SIGUSR1 stop the command as Ctrl-C does: one line on how to
    resume, exit 128 + the signal's number (Ray's own SIGTERM handler exits 15 with a
    traceback, or dumps a stack; SIGHUP and SIGUSR1 ended the process at once, its
    config.yaml and S3 lease left behind). A signal ignored (`nohup`) stays ignored. With
    `held`, the handlers before go back when the command ends (tests call main() in their
    own process)."""
    import signal
    import threading

    from deepfake_ray.errors import SIGTERMS, STOP_SIGNALS, STOPPED_BY, raise_terminated

    if threading.current_thread() is not threading.main_thread():
        return
    if held is not None:  # the command's start
        SIGTERMS.clear()
        STOPPED_BY.clear()
    for sig in STOP_SIGNALS:
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            previous = signal.signal(sig, raise_terminated)
            if held is not None and previous is not None:
                held.callback(signal.signal, sig, previous)


def start_ray(address: str | None) -> None:
    """runtime.init, with SIGTERM ours again after it. Ray's start puts in its own handler
    first thing, whose sys.exit(15) ended a command stopped meanwhile (~2-10 s here) with
    exit 15 and no line: that is a Terminated too, with what Ray had started shut down."""
    import signal

    import ray

    from deepfake_ray import runtime

    try:
        runtime.init(address)
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        note_sigterm()  # this one, so that ours ignores a second (`timeout`'s) while Ray shuts down
        stop_on_sigterm()
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise Terminated from None
    stop_on_sigterm()


def quiet_cleanup_errors() -> None:
    """Once a command is stopped, what the stop cut off half-built (a Ray Data dataset
    stopped in its __init__) fails in its __del__ when freed, and Python prints that as
    "Exception ignored in ..." with a traceback after our one line: nothing anyone can act
    on, as the process exits next. Only where it does (the console script, a job's driver)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if getattr(unraisable.object, "__name__", "") != "__del__":
            previous(unraisable)

    sys.unraisablehook = hook


def quiet_ray_output() -> None:
    """Once a command is stopped, Ray's processes stop too, and say so: a sweep's trial
    controllers printed ~100 lines of tracebacks of each other's death after our one line
    (a Ctrl-C reaches them all). Ray's log files keep them. Only where the process exits
    next (the console script, a job's driver): in a caller of main(), its Ray goes on."""
    import logging

    logging.getLogger("ray").setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):  # Ray's private names: a Ray without them prints on
        from ray._private import worker

        worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")  # workers' output
        worker.global_worker.threads_stopped.set()  # its threads printing that and the raylet's errors
        for held in (worker.stdout_deduplicator, worker.stderr_deduplicator):
            held.flush()  # repeated lines held back, which Ray's shutdown would print


def quiet_ray_output_after_an_error(exits: bool) -> None:
    """The error's line is the command's last: Ray's processes, failing with it (a training
    run's retried workers), went on printing their tracebacks after it."""
    ray = sys.modules.get("ray")
    if exits and ray is not None and ray.is_initialized():
        quiet_ray_output()


def exit_within(code: int, seconds: float = 15.0) -> None:
    """The command ends at the latest `seconds` after its stop line, with its own code. A
    SIGTERM to the whole process group (`timeout`, a container's stop) also stops the
    in-process Ray's own processes, and the clean-up at exit (Tune's, then Ray's shutdown)
    then waited 60 s for a GCS that was going down, ending with exit 1 and Ray's error.
    Ray ties the lives of the processes it started to this one."""
    import threading

    def end():
        time.sleep(seconds)
        exit_now(code)

    threading.Thread(target=end, name="deepfake-ray-exit", daemon=True).start()


def exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):  # os._exit leaves buffers unwritten
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def quit_at_once_if_signalled(code: int) -> None:
    """After the first stop signal (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1), another ends the
    process at once: Ray's shutdown at exit (a second or two) otherwise ends in a
    KeyboardInterrupt traceback. Only where the process exits next (the console script, a
    job's driver), not in a caller of main()."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda *_: exit_now(code))


def take_lock(held: contextlib.ExitStack, cfg, command: str) -> None:
    from deepfake_ray import storage

    try:
        held.enter_context(storage.exclusive(cfg.workdir, command))
    except OSError as e:
        raise unwritable(cfg, e) from None


def unwritable(cfg, e: OSError) -> Exception:
    from deepfake_ray import storage

    if storage.is_s3(cfg.workdir) or disk_full(e):
        return e  # explained with the fix where S3 failures and full disks are
    return UsageError(f"cannot write to --workdir {cfg.workdir} ({e.strerror or type(e).__name__}): "
                      "pass a folder you can write to")


def usage_line(error: BaseException) -> str | None:
    """The one line saying what to fix, when `error` is (or wraps) bad input or settings;
    None for anything else. One line: Ray Data appends its retry advice to a task's error."""
    usage = find_usage_error(error)
    # at "\n" only: splitlines() also ends a line at a carriage return in a file name
    return str(getattr(usage, "cause", None) or usage).split("\n", 1)[0] if usage else None


def out_of_memory_line(command: str, error: BaseException) -> str | None:
    """The one line for workers that ran out of memory (a Ray Train run gives up after
    retrying them), with the setting to lower; None for any other error."""
    if not (what := find_error(error, out_of_memory_cause)):
        return None
    failed = getattr(error, "pipeline_stage", None) if command == "pipeline" else command
    stage = COMMANDS.get(failed)
    if (setting := stage and stage.batch) and stage.batch_recorded:
        # an unfinished training resumes only with the batch size it began with; --force on
        # the pipeline would redo every stage
        over = (f"start the stage over (--force --set {setting}=N)" if failed == command else
                f"start that stage over alone (deepfake-ray {failed} --config WORKDIR/config.yaml --workdir "
                f"WORKDIR --force --set {setting}=N), then the pipeline with --set {setting}=N and without --force")
        return (f"{what}: lower {setting} and {over}, or run the same command again on machines with "
                "more memory: a training resumes from its last checkpoint")
    if setting:
        fix = f"lower {setting} (--set {setting}=N), or run it on machines with more memory"
    elif command == "pipeline":  # a stage that did not say (the stage that ran out printed its progress last)
        batches = dict.fromkeys(c.batch for c in COMMANDS.values() if c.batch)
        fix = (f"lower the batch size of the stage that ran out ({', '.join(batches)}), "
               "or run it on machines with more memory")
    else:
        fix = "run it on machines with more memory"
    again = (": finished stages are skipped and a training resumes from its last checkpoint"
             if command in WRITERS else "")
    return f"{what}: {fix}; then run the same command again{again}"


def escape_odd_bytes(e: UnicodeError) -> tuple[str, int]:
    """A file name's bytes that are not UTF-8 (Python holds them as lone surrogates) as
    \\xNN, as the tables show them (storage.printable); other unwritable characters as
    backslashreplace writes them."""
    text = e.object[e.start:e.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode() for c in text), e.end


def configure_output() -> None:
    """Output a log file reads as a terminal shows it:
    - a message naming a folder whose name is not UTF-8 (an old Latin-1 archive's) is
      printed, escaped, instead of failing the command (stdout's default is to raise);
    - stdout is line-buffered: into a file or pipe (nohup, tee, CI) it was block-buffered,
      and a failed run's log ended with its stage headers, after the error line on stderr;
    - Ray's worker prefixes carry no colour codes there, or with NO_COLOR set (but in a
      notebook or at a prompt, which shows colours and keeps its environment);
    - lines of Ray's that mislead or repeat are left out (progress.hide_ray_noise)."""
    import codecs

    codecs.register_error("deepfake_ray.escape", escape_odd_bytes)
    for name, fd in (("stdout", 1), ("stderr", 2)):  # closed (`>&-`): Python's is None, and the
        if getattr(sys, name) is None:  # next file opened would take the fd Ray's processes inherit
            to_devnull(fd)
            setattr(sys, name, open(fd, "w", closefd=False))
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="deepfake_ray.escape", line_buffering=True)
    from deepfake_ray import progress

    if not progress.interactive() and ("NO_COLOR" in os.environ or not sys.stdout.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray as it prints each line
    progress.hide_ray_noise()


def execute(args: argparse.Namespace) -> int:
    """The command, with its source folder listed once however often it is asked about."""
    from deepfake_ray.data import sources

    with sources.listed_once(), contextlib.ExitStack() as held:
        stop_on_sigterm(held)  # first, so that it goes back last: after the lock and config.yaml
        cfg = build_config(args)
        command = COMMANDS[args.command]
        module = importlib.import_module(command.module)
        from deepfake_ray import lineage, runtime, storage

        if command.ray:  # first: the checks below read those paths too
            check_utf8(args)
        check_paths_outside_job_code(args, cfg)
        if command.workdir:  # score and serve have none: runs/demo is not theirs
            storage.check_workdir(cfg.workdir)
        if command.writes:
            sources.check_no_foreign_stage_folders(cfg.workdir, args.command)

        # a stage's own checks that need no Ray: a mistake, or nothing to do, in a second
        if hasattr(module, "check_settings"):
            module.check_settings(cfg)
        taken = ""  # before the stage's preflight, which checks what it is given against
        # what it reads (generate: the reals' JPEG quality)
        if (stage := getattr(module, "STAGE", None)) and stage.inputs:
            cfg, taken = lineage.as_made_upstream(cfg, stage, asked_keys(args),
                                                  getattr(module, "check_settings", None))
        try:
            if hasattr(module, "preflight"):
                if module.preflight(cfg, **options(args), address=args.address):
                    return 0
            elif hasattr(module, "STAGE") and lineage.preflight(cfg, module.STAGE, args.force):
                return 0
        except lineage.WorkdirState:
            # a run writing there says more: it may be making the inputs, or be the
            # unfinished run whose settings differ (a mistake of this command's own, a
            # missing --source, is said as it is)
            if command.writes:
                storage.check_not_held(cfg.workdir, args.command)
            raise
        if taken:  # said once the stage runs: a complete one takes nothing, records nothing
            print(taken, flush=True)
        if command.ray:
            runtime.check_address(args.address)
        writes_config = not command.keeps_config
        # refused before this run changes anything there (config.yaml included). A local
        # lock is taken now (the OS knows whether its holder lives): another run starting
        # meanwhile is refused, not let write its config.yaml. On S3, when only the
        # cluster can tell whether the holder lives, the lock and config.yaml wait for Ray.
        lock_now = command.writes and not storage.is_s3(cfg.workdir)
        if lock_now:
            take_lock(held, cfg, args.command)
        free = storage.check_free(cfg.workdir, args.command) if command.writes and not lock_now else True
        if writes_config and free:  # first: an unwritable workdir fails before Ray starts
            held.enter_context(settings_recorded(cfg))
        if command.ray:
            start_ray(args.address)
        if command.writes and runtime.on_cluster():  # one machine sees its own files
            runtime.check_shared(cfg.workdir, source_to_read(args, cfg))
        if command.writes and not lock_now:
            take_lock(held, cfg, args.command)  # once Ray is up: a dead driver's is freed at once
            if writes_config and free:
                record_again(cfg)
        if writes_config and not free:
            held.enter_context(settings_recorded(cfg))
        module.run(cfg, **options(args))
    return 0


def source_read(command: str, cfg) -> str | None:
    """The folder (local or s3://) `command` reads images from, if it reads one."""
    from deepfake_ray.data import sources

    source = sources.as_given(cfg.data.source)
    return source if command in ("prepare", "pipeline") and sources.kind(source) == "path" else None


def source_to_read(args: argparse.Namespace, cfg) -> str | None:
    """source_read, unless the pipeline skips prepare: a source gone since (unmounted, on
    the old head) must not stop the stages after it."""
    from deepfake_ray import lineage
    from deepfake_ray.data import prepare

    source = source_read(args.command, cfg)
    if source and args.command == "pipeline" and not args.force and lineage.current(cfg, prepare.STAGE):
        return None
    return source


def check_paths_outside_job_code(args: argparse.Namespace, cfg) -> None:
    """check_outside_job_code for each path the command is given: `ray job submit
    --working-dir . -- deepfake-ray pipeline` put the preset's runs/NAME in the job's copy."""
    from deepfake_ray.runtime import check_outside_job_code

    if COMMANDS[args.command].workdir:
        check_outside_job_code(cfg.workdir, "--workdir")
    check_outside_job_code(source_read(args.command, cfg), "data.source")
    for flag in ("--model", "--input", "--out"):  # score's and serve's
        check_outside_job_code(getattr(args, flag[2:], None), flag)


def check_utf8(args: argparse.Namespace) -> None:
    """UsageError for an argument, the current folder or Python's path that is not valid
    UTF-8 (an old Latin-1 folder name): Ray hands the command line (`args` when main() is
    called with them) and the folder to its core as UTF-8, and fails with a traceback.
    Such files inside a source are fine."""
    from deepfake_ray import storage

    given = [v for value in vars(args).values() for v in (value if isinstance(value, list) else [value])]
    path = "if it names a file or folder, rename it, or pass a link to it (ln -s) whose name is"
    for what, text, fix in [*(("the argument", v, path) for v in [*given, *sys.argv] if isinstance(v, str)),
                            ("the current folder", os.getcwd(), "run from a folder whose path is"),
                            ("Python's own path", sys.executable, "run a Python installed under a path")]:
        try:
            text.encode()
        except UnicodeEncodeError:
            raise UsageError(f"{what} {storage.printable(text)[:200]} is not valid UTF-8, which Ray "
                             f"cannot take: {fix} valid UTF-8") from None


def stage_changes() -> int:
    """storage.marker_changes, without importing storage (and pyarrow) for `--help`."""
    storage = sys.modules.get("deepfake_ray.storage")
    return storage.marker_changes if storage else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, or exit 2 with one line naming the command whose flags are wrong.
    A notebook's paths may be pathlib.Path: taken as the text they stand for."""
    if isinstance(argv, (str, bytes)):  # would be parsed a character at a time
        raise TypeError(f"argv is a list of arguments, e.g. {os.fsdecode(argv).split()!r}, not one string")
    argv = sys.argv[1:] if argv is None else [os.fsdecode(os.fspath(a)) if isinstance(a, os.PathLike) else a
                                              for a in argv]
    p = parser()
    first = argv[0] if argv else ""
    p.options_first = first if first.startswith("-") and first not in ("-h", "--help", "--version") else ""
    args, unknown = p.parse_known_args(argv)
    if unknown:
        command = p.commands[args.command]
        said = f"unrecognized arguments: {' '.join(unknown)}"
        # `deepfake-ray --force prepare`: its --help lists --force, so say where it goes
        flags = {flag for action in command._actions for flag in action.option_strings}
        if p.options_first and all(u.partition("=")[0] in flags for u in unknown if u.startswith("-")):
            command.error(f"{said}; options go after the command")
        if "--version" in unknown:  # `deepfake-ray prepare --version`
            command.error(f"{said}; --version goes before the command: deepfake-ray --version")
        # one put before the command may be a near miss of the top level's (`--vers prepare`)
        command.error(unrecognized(argv, unknown, command, *([p] if p.options_first else [])))
    return args


def note_unused(args: argparse.Namespace) -> None:
    """Says a flag that the command accepts, as scripts pass it to every command, but does
    not read: given, it changes nothing, which the user may not expect."""
    command = COMMANDS[args.command]
    for flag, unused, why in (("--workdir", not command.workdir, "it has no work directory"),
                              ("--address", not command.ray, "it reads files only and starts no Ray")):
        if unused and getattr(args, flag[2:]) is not None:
            print(f"deepfake-ray {args.command}: note: {flag} is not used by {args.command}: {why}",
                  file=sys.stderr, flush=True)


def shown(text: str) -> str:
    """An error's text as the command's last line: a file name in it may hold escape
    sequences or line breaks, which must not restyle or split the line."""
    from deepfake_ray import storage

    return storage.shown(text)


def console_main(exits: bool | None = True) -> None:
    """The `deepfake-ray` console script: the process ends with the command. Output piped
    into a reader that has gone (`| head`) ends it quietly, as SIGPIPE ends a Unix tool,
    not with Python's "Exception ignored ... BrokenPipeError" and exit 120. `exits`: as
    main takes it (None: `python -m deepfake_ray.cli`, which may run in IPython)."""
    try:
        code = main(exits=exits)
        sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        code = reader_gone()
    sys.exit(code)


def reader_gone() -> int:
    """Exit code 141 (128 + SIGPIPE), stdout pointed at /dev/null: the interpreter's last
    flush would raise again."""
    to_devnull(sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None, exits: bool | None = None) -> int:
    """The command `argv` (sys.argv's by default); its exit code. `exits`: the process ends
    once this returns (the console script, a job's driver), so a stop also ends it within
    15 s and quiets Ray's output. By default, where sys.argv's command runs outside
    IPython (`python -m deepfake_ray.cli`, a console script installed before
    console_main). In a notebook (`cli.main([...])`, `%run -m`) nothing is done to the
    process beyond the command: an Interrupt there once killed the kernel."""
    if exits is None:
        exits = argv is None and "IPython" not in sys.modules
    if sys.platform == "win32":  # file locks (fcntl), fchmod and signals a command needs
        print("deepfake-ray: error: native Windows is not supported: run it in WSL2, or on "
              "Linux or macOS", file=sys.stderr)
        return 2
    configure_output()
    try:
        args = parse(argv)
    except SystemExit as e:  # a mistake on the line (said), --help or --version: a code, as below
        if exits:
            raise
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    note_unused(args)
    started, changes = time.monotonic(), stage_changes()
    try:
        return execute(args)
    except UsageError as e:
        quiet_ray_output_after_an_error(exits)
        # a task's, through Ray, is a RayTaskError(UsageError): its text is Ray's traceback
        print(f"deepfake-ray {args.command}: error: {in_stage(e)}{shown(usage_line(e) or str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        sig = stop_signal(e)
        said = stopped_line(args, sig, replaced=stage_changes() != changes)
        code = 128 + sig if sig else 130
        if exits:
            quiet_ray_output()
            # before the line: a second signal sent once it shows (as a test does at once)
            # arrived while exit_within started its thread, and was a traceback and exit 1
            quit_at_once_if_signalled(code)
        print(f"deepfake-ray {args.command}: {said}", file=sys.stderr)
        if exits:
            exit_within(code)
            quiet_cleanup_errors()
        return code
    except Exception as e:  # noqa: BLE001 - the last line must say what failed
        import traceback

        if isinstance(e, BrokenPipeError) and exits and stdout_reader_gone():  # `| head`: none reads on
            return reader_gone()

        if line := usage_line(e) or out_of_memory_line(args.command, e):  # settings the user can change
            quiet_ray_output_after_an_error(exits)
            print(f"deepfake-ray {args.command}: error: {in_stage(e)}{shown(line)}", file=sys.stderr)
            return 2
        from deepfake_ray.s3 import redacted

        print(redacted(traceback.format_exc()), end="", file=sys.stderr)  # botocore quotes the endpoint
        print(failure_line(args.command, e, time.monotonic() - started), file=sys.stderr)
        return 1


def stopped_line(args: argparse.Namespace, sig: int | None, replaced: bool) -> str:
    """What a stopped command says after its name: how it stopped, and what to run to
    resume. `replaced`: a stage's output changed (before that, a --force run is still
    needed)."""
    stopped = f"stopped ({signal.Signals(sig).name})" if sig else "interrupted"
    if args.command == "score":  # its parts are kept, --force or not
        return f"{stopped}; run the same command again: it resumes from the parts it finished"
    if args.force and not replaced:  # the complete stages are still the old ones
        return f"{stopped} before anything was replaced; run the same command again"
    again = "the same command again" if not args.force else "it again without --force (which starts over)"
    if args.command not in WRITERS:  # serve and report have no stages to skip
        return f"{stopped}; run {again}"
    return f"{stopped}; run {again}: finished stages are skipped and a training resumes from its last checkpoint"


def in_stage(e: BaseException) -> str:
    """`(in stage 'X') ` for an error a pipeline's stage raised, else "": the last line of a
    long run's log is all some read."""
    stage = getattr(e, "pipeline_stage", None)
    return f"(in stage '{stage}') " if stage else ""


def failure_line(command: str, e: BaseException, seconds: float) -> str:
    """The last line of a command that failed, naming the pipeline's stage it failed in:
    a multi-hour run's log ends here, its traceback and the stage's own line above."""
    stage = getattr(e, "pipeline_stage", None)
    where = f" at stage '{stage}'" if stage else ""
    return (f"deepfake-ray {command}: failed{where} after {seconds:.0f}s: "
            f"{type(e).__name__}: {shown(str(e).split(chr(10), 1)[0])}")


if __name__ == "__main__":  # `python -m deepfake_ray.cli`, or IPython's `%run -m`
    console_main(exits=None)
