"""Uploads decoded in helper processes (serve.isolate_decoding), so that a file which
crashes the image library ends a helper, not the replica: that request gets a 422 of its
own, the others are answered, and the replica keeps serving.

Measured here (2 cores, face crops to 75 px): one decode at a time, a round trip to a
helper adds ~0.7 ms to a ~0.19 ms decode; with requests in flight the helper keeps up
(~1,380 against ~1,500 images/s in the replica's own process), small beside a forward
pass. A helper is a fresh process (spawned, not forked: a replica holds Ray's threads)
that starts in ~0.4 s; the pool starts with the replica.
"""
from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from deepfake_ray.data import crashes, decode

DIED = ("the helper process decoding it died, and died again decoding it alone (a crash in the "
        "image library on a malformed file?): not scored")


def exit_with_parent(parent: int) -> None:
    """In a helper, as it starts: end once the replica that started it, `parent`, is gone
    (perhaps already, while this one was starting). Ray ends a worker's children when the
    worker exits of itself, not when it is killed (a crash, the kernel's OOM killer), and
    a helper left waiting on its pool would live on."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def decode_in_helper(data: bytes, resolution: int, max_pixels: int, quality: int | None) -> np.ndarray | tuple:
    """In a helper: the pixels, or a DecodeError's (reason, detail), which crosses the
    process boundary as plain values."""
    try:
        return decode.as_stored(decode.open_image(data, max_pixels), resolution, quality)
    except decode.DecodeError as e:
        return e.reason, str(e)[len(e.reason) + 2:]  # "reason: detail", or the reason alone


class DecodeHelpers:
    """`await helpers(data)`: decode_in_helper's pixels, or its DecodeError raised."""

    def __init__(self, workers: int, resolution: int, max_pixels: int, quality: int | None):
        self.workers = workers
        self.decode = functools.partial(decode_in_helper, resolution=resolution, max_pixels=max_pixels,
                                        quality=quality)
        self.pool = self.started(workers)
        self.alone = asyncio.Lock()
        self.crashed = 0  # files set aside: each ended two helpers

    @staticmethod
    def started(workers: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=exit_with_parent, initargs=(os.getpid(),))
        for _ in range(workers):  # started, and the decoder imported, now: not on the first uploads
            pool.submit(decode_in_helper, b"", 1, 1, None)
        return pool

    async def __call__(self, data: bytes) -> np.ndarray:
        pool = self.pool
        try:
            out = await asyncio.get_running_loop().run_in_executor(pool, self.decode, data)
        except BrokenProcessPool:  # a helper died: every decode it held or queued fails
            if self.pool is pool:
                self.pool = self.started(self.workers)
                pool.shutdown(wait=False)
            out = await self.decoded_alone(data)
        if isinstance(out, tuple):
            raise decode.DecodeError(*out)
        return out

    async def decoded_alone(self, data: bytes) -> np.ndarray | tuple:
        """Again, in a helper of its own, one file at a time: of the decodes a dead helper
        took down, only the file that ends this one too is to blame."""
        async with self.alone:
            one = self.started(1)
            try:
                return await asyncio.get_running_loop().run_in_executor(one, self.decode, data)
            except BrokenProcessPool:
                self.crashed += 1
                return crashes.REASON, DIED
            finally:
                one.shutdown(wait=False)

    def close(self) -> None:
        """Helpers ended, and their pool's semaphores removed, as the replica stops (left
        to Ray, which kills a stopping worker's children, each stop left five in /dev/shm)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
