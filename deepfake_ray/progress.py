"""A stage's progress as `COMMAND: N / TOTAL UNIT (P%)`: redrawn in place about once a
second in a terminal, a line every 10 s in logs (a run shorter than that prints none)."""
from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable

EVERY_S = {True: 1.0, False: 10.0}  # by whether stdout is a terminal

# Lines of Ray's processes the command line does not show (their log files keep them):
# advice to set a DataContext flag our own setting cleared (DEEPFAKE_RAY_PROGRESS), and Ray
# Train's deprecation warning about its own call; with DEEPFAKE_RAY_PROGRESS=0, also the
# line Ray Data's split coordinators log as each epoch's dataset ends (120 lines in a
# 60-epoch job's log, beside its 60 epoch lines).
RAY_NOISE = (r"Progress bars disabled\. To enable", r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources`",
             r"^\s*self\.exclude_resources = exclude_resources\s*$")
RAY_INFO = (r"Dataset \S+ execution finished in [\d.]+ seconds",)
NOISE = re.compile("|".join(RAY_NOISE))


def hide_ray_noise() -> None:
    """Tells Ray, before it is imported, which of its processes' lines this driver leaves
    out (RAY_DEDUP_LOGS_SKIP_REGEX, read once, and only while Ray deduplicates lines, its
    default). Not in a notebook or at a prompt, whose environment outlives the command."""
    if "ray" in sys.modules or interactive():
        return
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = noise_pattern(os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX"),
                                                             os.environ.get("DEEPFAKE_RAY_PROGRESS") == "0")


def noise_pattern(own: str | None, quiet: bool) -> str:
    """RAY_NOISE (and, `quiet`, RAY_INFO) as one pattern, after a user's `own` one: first,
    where its inline flags (`(?i)...`) must stand; `own` alone if the two will not compile."""
    joined = "|".join([*([own] if own else []), *RAY_NOISE, *(RAY_INFO if quiet else ())])
    try:
        re.compile(joined)
    except re.error:
        return own or ""
    return joined


def ray_noise(record) -> bool:
    """A logging filter: False for a line of RAY_NOISE (the driver's own Ray Data logger)."""
    return not NOISE.search(record.getMessage())


def count(n: int, thing: str) -> str:
    """`1 epoch`, `2 epochs`, `1,000 files`: a count as a sentence says it."""
    return f"{n:,} {thing}{'s' * (n != 1)}"


def figure(value, digits: int = 4) -> str:
    """A metric with `digits` decimals; n/a for none, or one not finite (JSON files write a
    NaN as null, which a format would fail on)."""
    from deepfake_ray import storage  # (pyarrow: not for every importer of this module)

    return f"{value:.{digits}f}" if storage.finite(value) else "n/a"


def interactive() -> bool:
    """Whether this process is a notebook's kernel or a Python prompt (`python -i` too):
    one that goes on after a command, and shows colours."""
    return "IPython" in sys.modules or hasattr(sys, "ps1") or bool(sys.flags.interactive)


def bars_wanted() -> bool:
    """Whether libraries may draw progress bars (Ray Data's, the Kaggle client's):
    DEEPFAKE_RAY_PROGRESS=1 or 0 says; else only on a terminal, as a log file gets each
    redraw of a bar (a Kaggle download's: ten a second, for minutes)."""
    setting = os.environ.get("DEEPFAKE_RAY_PROGRESS")
    return setting == "1" or (setting != "0" and sys.stdout.isatty())


class Progress:
    def __init__(self, command: str, total: int, unit: str, count: Callable[[], int]):
        self.command, self.total, self.unit, self.count = command, total, unit, count
        self.terminal = sys.stdout.isatty()
        self.shown, self.stop = None, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.shown is None:  # a short run: its summary line says it all
            return
        if exc[0] is None and self.shown != self.total:
            self.show(final=True)
        if self.terminal:
            print()  # ends the line redrawn in place

    def loop(self) -> None:
        while not self.stop.wait(EVERY_S[self.terminal]):
            self.show()

    def show(self, final: bool = False) -> None:
        n = self.total if final else min(self.total, self.count())
        if n == self.shown and not final:
            return
        self.shown = n
        line = f"{self.command}: {n:,} / {self.total:,} {self.unit} ({n / max(1, self.total):.0%})"
        if self.terminal:
            print("\r" + line, end="", flush=True)
        else:
            print(line, flush=True)
