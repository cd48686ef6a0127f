"""Shared by the `jobs/*.py` entrypoints: the `deepfake-ray COMMAND` parser plus --run-name
(but for score, which writes --out, not a work directory).

Each entrypoint is `deepfake-ray COMMAND` with one more flag, so behaviour, config
handling and exit codes (0 done, 2 bad usage or input, 1 anything else, 130
interrupted, 143 stopped by SIGTERM: `deepfake-ray --help` lists them all) are identical.

--run-name NAME: the run's work directory is WORKDIR/NAME. Every stage keeps its
checkpoints (Ray Train `RunConfig(storage_path, name)`) and completion markers under the
work directory, so resubmitting the same command with the same --workdir and --run-name
skips completed stages and resumes an interrupted training from its last checkpoint.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

# `python jobs/x.py` puts jobs/ first on sys.path; put the tree this file lives in before
# any installed copy, so a `ray job submit --working-dir .` job runs the code it shipped.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from deepfake_ray import cli  # noqa: E402
from deepfake_ray.errors import UsageError  # noqa: E402

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parser(command: str, script: str, description: str | None = None) -> argparse.ArgumentParser:
    """The CLI's own parser for `command`, renamed to the script and given --run-name;
    `description`: the script's docstring (what it is for, how `ray job submit` runs it)."""
    p = cli.parser().commands[command]
    p.prog = f"python jobs/{script}"
    if description:
        p.description, p.formatter_class = description, argparse.RawDescriptionHelpFormatter
    for action in p._actions:
        if action.dest == "workdir" and action.help != argparse.SUPPRESS:  # runs/<preset>: in the code's copy
            action.help = ("s3://bucket/prefix, or a folder every node shares (default: the --config file's "
                           "workdir, else runs/<preset>, which a job submitted with --working-dir refuses: it "
                           "would lie in its copy of the code)")
    if command in cli.WRITERS:  # score writes --out, not a work directory
        p.add_argument("--run-name", help="name of this run: outputs and checkpoints go to "
                       "WORKDIR/RUN_NAME, and resubmitting with the same name resumes it (default: none, "
                       "WORKDIR itself)")
    return p


def cli_argv(p: argparse.ArgumentParser, command: str, args: argparse.Namespace,
             workdir: str | None) -> list[str]:
    """Rebuild `deepfake-ray COMMAND ...` arguments from the parsed namespace."""
    argv = [command]
    for action in p._actions:
        if not action.option_strings or action.dest in ("help", "run_name"):
            continue
        flag = action.option_strings[-1]
        value = workdir if action.dest == "workdir" else getattr(args, action.dest)
        if action.dest == "overrides":  # the run's workdir, passed as --workdir, is the one
            value = [o for o in value if cli.set_key(o) != "workdir"]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_workdir(command: str, args: argparse.Namespace) -> str | None:
    """WORKDIR/RUN_NAME, where WORKDIR is what `deepfake-ray` would use without a run name
    (None for score, which has no work directory)."""
    if command not in cli.WRITERS:  # score: writes to --out, not to a work directory
        return None
    if args.run_name is not None and not RUN_NAME.match(args.run_name):
        raise UsageError(f"--run-name '{args.run_name}' must be letters, digits, '.', '_' or '-' "
                         "(no '/'), e.g. --run-name r1")
    from deepfake_ray import storage

    args.command = command
    cfg = cli.build_config(args)  # the preset/config default when --workdir is absent
    # deepfake-ray checks it, and the source, against the job's copy of the code
    return storage.join(cfg.workdir, args.run_name) if args.run_name else cfg.workdir


def main(command: str, script: str, argv: list[str] | None = None, description: str | None = None) -> int:
    p = parser(command, script, description)
    given = sys.argv[1:] if argv is None else argv
    args, unknown = p.parse_known_args(given)  # bad flags exit 2 here
    if unknown:  # with the fix, as deepfake-ray says it (`--forc`: did you mean --force?)
        p.error(cli.unrecognized(given, unknown, p))
    try:
        workdir = run_workdir(command, args)
    except Exception as e:  # noqa: BLE001 - bad input is one line, as deepfake-ray says it
        if (line := cli.usage_line(e)) is None:
            raise
        print(f"{p.prog}: error: {cli.shown(line)}", file=sys.stderr)
        return 2
    return cli.main(cli_argv(p, command, args, workdir), exits=argv is None)  # a job's driver ends with it
