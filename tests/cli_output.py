"""What the CLI itself wrote, without the lines Ray forwards from other processes.

The suite shares one in-process Ray, so a worker or controller of an earlier test can
print (e.g. "(TrainController pid=..) Failed to stop PlacementGroupCleaner") while a
later test captures its output (CI failed once on a ServeController's "Released ... port
from quarantine" line). Those lines carry Ray's "(Name pid=N)", "(pid=N)", "(raylet)" or "(autoscaler +Ns)" prefix.
"""
from __future__ import annotations

import re

_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((\S+ )?pid=\d+|^(\x1b\[[0-9;]*m)?\((raylet|autoscaler)\b")


def error_lines(capsys) -> list[str]:
    """The captured stderr's non-blank lines, less Ray's forwarded ones; every test that
    compares what the CLI wrote to stderr line by line reads it through this."""
    return _own(capsys.readouterr().err)


def output_lines(capsys) -> list[str]:
    """The same for stdout, where Ray forwards what other processes print."""
    return _own(capsys.readouterr().out)


def _own(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not _FORWARDED.match(line)]
