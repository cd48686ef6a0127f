"""What the CLI itself wrote to stderr, without lines Ray forwards from other processes.

The suite shares one in-process Ray, so a worker or controller of an earlier test can
print (e.g. "(TrainController pid=..) Failed to stop PlacementGroupCleaner") while a
later test captures stderr. Those lines carry Ray's "(Name pid=N)" prefix.
"""
from __future__ import annotations

import re

_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\S+ pid=\d+")


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if not _FORWARDED.match(line)]
