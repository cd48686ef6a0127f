"""Shared by gan_step.py and detector.py: a Ray Train fit (in a thread) and a plain-torch
loop take epochs in turns, so a shared machine's drifting load hits both sides alike.

The Ray loop gets `to_ray`/`to_driver` queues in its config (`loop_config`), waits on
`to_ray` before each epoch and puts (images, seconds) on `to_driver` after it."""
from __future__ import annotations

import threading
from typing import Callable

from ray.util.queue import Queue


class Turns:
    def __init__(self):  # needs a running Ray: the queues are actors
        self.to_ray, self.to_driver = Queue(), Queue()
        self.errors: list[Exception] = []
        self.thread: threading.Thread | None = None
        self.ratios: list[float] = []  # Ray / plain images/s of each timed epoch pair

    def loop_config(self, args) -> dict:
        return {**vars(args), "to_ray": self.to_ray, "to_driver": self.to_driver}

    def start(self, fit: Callable[[], object]) -> None:
        def run():
            try:
                fit()
            except Exception as e:  # noqa: BLE001 - raised in the driver by receive()
                self.errors.append(e)
                self.to_driver.put(None)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def receive(self):
        """The Ray side's next message; raises if its fit failed."""
        got = self.to_driver.get(timeout=1800)
        if got is None:
            raise RuntimeError(f"the Ray Train side failed: {self.errors[0]}")
        return got

    def compare(self, epochs: int, plain_epoch: Callable[[], tuple[int, float]]) -> tuple[float, float]:
        """(plain images/s, Ray images/s); each side's first epoch is warm-up."""
        totals = {"plain": [0, 0.0], "ray": [0, 0.0]}
        for epoch in range(epochs):
            self.to_ray.put(epoch)
            ray_epoch = self.receive()
            plain = plain_epoch()
            if epoch:
                for side, (n, s) in (("ray", ray_epoch), ("plain", plain)):
                    totals[side][0] += n
                    totals[side][1] += s
                self.ratios.append((ray_epoch[0] / ray_epoch[1]) / (plain[0] / plain[1]))
        self.thread.join()
        return totals["plain"][0] / totals["plain"][1], totals["ray"][0] / totals["ray"][1]


def ratio_line(ratio: float, ratios: list[float]) -> str:
    """The ratio, the range of its epochs, and a warning where identical work came out
    much faster on one side: a measurement fault (too few images timed), not a speed-up."""
    line = f"ratio Ray / plain:           {ratio:8.3f}  (goal >= 0.9; epochs {min(ratios):.2f}-{max(ratios):.2f})"
    if round(ratio, 2) >= 1.1:  # what prints as 1.10 is flagged too
        line += "\n  suspect: the same work ran 10% or more faster under Ray; time more batches (--batches) or epochs"
    return line
