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

from deepfake_ray.data import crashes
from deepfake_ray.data.decode import DecodeError
from deepfake_ray.serving.predictor import decode_image

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


class DecodeHelpers:
    """`await helpers(data)`: predictor.decode_image's pixels, made in a helper; its
    DecodeError (which crosses the process boundary as it is) raised here."""

    def __init__(self, workers: int, resolution: int, max_pixels: int, quality: int | None):
        self.workers = workers
        self.decode = functools.partial(decode_image, resolution=resolution, max_pixels=max_pixels,
                                        quality=quality)
        self.pool = self.started(workers)
        self.alone = asyncio.Lock()
        self.alone_pool: ProcessPoolExecutor | None = None  # started at the first death

    @staticmethod
    def started(workers: int) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=exit_with_parent, initargs=(os.getpid(),))
        for _ in range(workers):  # started, and the decoder imported, now: not on the first uploads
            pool.submit(decode_image, b"", 1)
        return pool

    async def __call__(self, data: bytes) -> np.ndarray:
        pool = self.pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self.decode, data)
        except BrokenProcessPool:  # a helper died: every decode it held or queued fails
            if self.pool is pool:
                self.pool = self.started(self.workers)
                pool.shutdown(wait=False)
            return await self.decoded_alone(data)

    async def decoded_alone(self, data: bytes) -> np.ndarray:
        """Again, in a helper of its own, one file at a time: of the decodes a dead helper
        took down, only the file that ends this one too is to blame. The helper lives on
        until a file ends it: one started for each file (~0.4 s) held the last of many
        uploads queued beside a crashing one for seconds."""
        async with self.alone:
            while True:
                fresh = self.alone_pool is None
                if fresh:
                    self.alone_pool = self.started(1)
                try:
                    return await asyncio.get_running_loop().run_in_executor(self.alone_pool, self.decode, data)
                except BrokenProcessPool:
                    self.alone_pool.shutdown(wait=False)
                    self.alone_pool = None
                    if fresh:  # one started for this file ended: the file is to blame
                        raise DecodeError(crashes.REASON, DIED) from None
                    # else found dead (killed while idle: the OOM killer): tried in a fresh one

    def close(self) -> None:
        """Helpers ended, and their pool's semaphores removed, as the replica stops (left
        to Ray, which kills a stopping worker's children, each stop left five in /dev/shm)."""
        for pool in (self.pool, self.alone_pool):
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
