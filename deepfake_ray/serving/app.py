"""The detector as a Ray Serve HTTP service with dynamic batching.

    deepfake-ray serve --model WORKDIR/detector/model [--host 127.0.0.1] [--port 8000]
    serve run jobs/serve.yaml          # Ray's own CLI, through build_app(args)

Routes: POST /v1/detect (raw body or a multipart file), POST /v1/detect/batch
(multipart files, one result per file in order), GET /healthz, GET /v1/model,
GET /v1/stats, and FastAPI's /docs. Every request's image goes through one
`@serve.batch` method, so concurrent requests share a forward pass.
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` type
# on the ingress methods that Serve rewraps
import asyncio
import contextlib
import errno
import functools
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import RayServeException

from deepfake_ray import checkpoint, runtime, storage
from deepfake_ray.config import Config
from deepfake_ray.data import crashes
from deepfake_ray.data.decode import DecodeError, inflated_at_open
from deepfake_ray.errors import UsageError, out_of_memory_cause
from deepfake_ray.serving import http, isolation
from deepfake_ray.serving.predictor import Predictor, error_status, error_text

APP_NAME = "deepfake-ray"
# How long a stop waits for the requests in flight (Ray's default, named here as the
# README states it); and how often a stopping replica counts them (Ray's 2 s would add up
# to 2 s to every stop, the last request long answered).
DRAIN_TIMEOUT_S = 20.0
DRAIN_CHECK_S = 0.2
# Serve's deadline on a whole request, upload included (jobs/serve.yaml and the RayService
# set it too): past it Serve answers its own 408, in text/plain. A stalled upload gets the
# app's JSON 408 first, after serve.body_idle_timeout_s, which must be shorter.
REQUEST_TIMEOUT_S = 300.0
PROXY_START_TIMEOUT_S = 300.0  # for a proxy Serve restarts, on a machine busy enough to need it
# A face crop decodes in well under a millisecond, less than a thread hop costs, so it
# is decoded on the event loop. Larger images go to a thread: by pixels (a flat 36 MP
# PNG of 120 KB takes the better part of a second) or by bytes (a 64x64 progressive
# JPEG of 9 MB, one scan repeated, took 0.8 s; the decoder refuses one of over 100 scans,
# and 100 at 512x512 take ~8 ms). Multipart bodies are parsed there too unless small and
# of few lines: the parser goes a line at a time (256 KB of line breaks: 0.15 s, against
# 12 ms for a photo's bytes).
INLINE_DECODE_PIXELS = 512 * 512
INLINE_BYTES = 256 * 1024
INLINE_PARSE_LINES = 4096


def parses_fast(body: bytes) -> bool:
    return len(body) <= INLINE_BYTES and body.count(b"\n") + body.count(b"\r") <= INLINE_PARSE_LINES


class InlineBudget:
    """The pixels one request may still decode on the event loop: a batch of many small
    images is bounded as one large image is (64 flat 512x512 PNGs in a 127 KB body,
    each under the limit, held the loop 0.33 s one after another)."""

    def __init__(self, pixels: int = INLINE_DECODE_PIXELS):
        self.pixels = pixels

    def take(self, pixels: int) -> bool:
        if pixels > self.pixels:
            return False
        self.pixels -= pixels
        return True


# a forward pass running this long is hung: a CPU batch takes seconds (16 images at 128 px
# on 2 busy cores: ~3 s), a GPU one less. Well under Serve's 300 s deadline on a request: at
# 300 s every request queued behind the pass had timed out (as slow uploads, to a reader of
# 408s) before Serve's health checks (3 failed, 10 s apart) replaced the replica. Larger
# batches and inputs get longer (hung_after): a slow pass taken for hung restarts for ever
HUNG_FORWARD_S = 60.0
SECONDS_PER_IMAGE = 2.0  # at 128 px on one busy core, ~10x what was measured (0.19 s)
# forward passes failing in a row (not for memory) that make a replica broken: a GPU in a
# sticky CUDA error answered every request with a 500 while its health check passed
FAILED_PASSES = 3


def decode_answer(error: DecodeError) -> http.ApiError:
    """A file the decoder (or the model) refused, as its error answer."""
    return http.ApiError(error_status(error), http.reason_code(error.reason), error_text(error))


def file_error(name: str, answer: http.ApiError) -> dict:
    """One file's entry in a /v1/detect/batch answer, when it has no score (counted, as
    an error answer is)."""
    http.count_error(answer.reason, answer.status)
    return {"file": name, "error": answer.message, "reason": answer.reason, "status": answer.status}


def hung_after(max_batch_size: int, input_size: int) -> float:
    """How long a forward pass may run before it is taken for hung: HUNG_FORWARD_S, or more
    for a batch that takes longer on a CPU."""
    return max(HUNG_FORWARD_S, max_batch_size * (input_size / 128) ** 2 * SECONDS_PER_IMAGE)


def short_of_memory(e: BaseException) -> bool:
    """A pass that failed for memory, the GPU's (torch's or CUDA's own allocations) or the
    host's: retried, not counted against the model."""
    return bool(out_of_memory_cause(e)) or isinstance(e, MemoryError) or "can't allocate memory" in str(e)


def check_forward(started: float | None, now: float, limit: float = HUNG_FORWARD_S,
                  failed: int = 0, last_error: str = "") -> None:
    """RuntimeError when the forward pass that began at `started` (time.monotonic(); None:
    none runs) has run over `limit` seconds, or the last FAILED_PASSES passes failed."""
    if started is not None and now - started > limit:
        raise RuntimeError(f"the replica's forward pass has run {now - started:.0f} s, over "
                           f"{limit:.0f} s: it is hung, and Serve replaces the replica")
    if failed >= FAILED_PASSES:
        raise RuntimeError(f"the replica's last {failed} forward passes failed ({last_error}): its model "
                           "or device is broken, and Serve replaces the replica")


# above the class: Serve serializes it as it is decorated, with the globals it names then
def check_same_model(predictor: Predictor, deployed: str | None) -> None:
    """A replica serves the model its application was built with, or does not start.
    Serve rebuilds an application only when its config changes, so a model retrained in
    place would reach the replicas started after it (a scale-up, a restart) while the
    others kept the old one: one service answering with two models."""
    if deployed and deployed not in checkpoint.model_ids(predictor.meta):  # an earlier id of it too
        raise RuntimeError(
            f"the model at {predictor.model_uri} is now {predictor.model_id}, but this application "
            f"was deployed with {deployed}: deploy it again to serve the new model (with "
            f"`serve deploy`, set args.model_id: {predictor.model_id})")


# redirect_slashes off: `/v1/detect/` got a 307 with no body, its Location rebuilt as
# http:// behind a TLS front end; now it is the JSON 404 that names /docs
api = FastAPI(title="deepfake-ray detector", redirect_slashes=False,
              description="Is this face image GAN-generated? p_fake is the model's score for fake, "
                          "labelled fake at or above its threshold.")
http.install_error_handlers(api)
api.add_middleware(http.ModelHeader)


@serve.deployment(name="Detector")
@serve.ingress(api)
class Detector:
    def __init__(self, model: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_body_bytes: int, max_pixels: int, threads: int = 1, max_files: int = 64,
                 model_id: str | None = None, body_idle_timeout_s: float = 30.0,
                 isolate_decoding: bool = False, max_buffered_bytes: int = 0):
        self.predictor = Predictor(model, max_pixels=max_pixels, threads=threads,
                                   device=runtime.assigned_device())
        check_same_model(self.predictor, model_id)
        http.ModelHeader.answering = self.predictor.model_id
        p = self.predictor
        self.helpers = isolation.DecodeHelpers(max(1, threads), p.resolution, p.max_pixels, p.quality) \
            if isolate_decoding else None
        self.max_body_bytes, self.max_files = max_body_bytes, max_files
        self.body_idle_timeout_s = body_idle_timeout_s
        self.uploads = http.UploadBudget(max_buffered_bytes or 16 * max_body_bytes)
        # large decodes at once: each can take ~0.6 GB (40 MP as RGBA and RGB), and a batch
        # request can carry dozens
        self.decode_slots = asyncio.Semaphore(max(1, threads))
        # the decorator's values are placeholders; the config's apply per replica
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batching = {"max_batch_size": max_batch_size,
                         "batch_wait_timeout_s": batch_wait_timeout_s}
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0, "predict_seconds": 0.0,
                      "decoding_now": 0, "most_decoding_at_once": 0, "done_in_threads": 0,
                      "killed_decoders": 0, "out_of_memory": 0}
        self.stats_lock = threading.Lock()  # decode threads count themselves
        # forward passes get their own thread, never queued behind decodes in the default pool
        self.forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.forward_started: float | None = None  # time.monotonic() of the pass running now
        self.failed_passes, self.last_error = 0, ""  # passes failed in a row, and the last one's error
        self.hung_after = hung_after(max_batch_size, int(self.predictor.meta.get("input_size", p.resolution)))
        self.replica = serve.get_replica_context().replica_id.unique_id  # /v1/stats names it
        # torch, timm and Serve loaded: ~500k objects that a full collection would walk
        # for 0.4-0.55 s mid-request
        runtime.freeze_startup_objects()

    def __del__(self):
        """Serve calls it as the replica stops."""
        if getattr(self, "helpers", None):  # None, or a constructor that failed before it
            self.helpers.close()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[dict]:
        """Decoded images of concurrent requests -> one forward pass."""
        self.stats["batches"] += 1
        self.stats["images"] += len(images)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        started = time.perf_counter()
        self.forward_started = time.monotonic()
        ran_out = ""  # what had no memory for the pass: the GPU, or the host
        try:  # off the event loop, so the next batch fills while this one computes
            p_fake = await asyncio.get_running_loop().run_in_executor(
                self.forward_thread, self.predictor.predict_pixels, np.stack(images))
        except Exception as e:
            if not short_of_memory(e):
                self.failed_passes, self.last_error = self.failed_passes + 1, f"{type(e).__name__}: {str(e)[:200]}"
                raise
            device = self.predictor.device
            ran_out = ("GPU" if device.type == "cuda" else device.type.upper()) if out_of_memory_cause(e) else "host"
        finally:
            self.forward_started = None
        if ran_out:  # out of the except clause: its traceback held the pass's tensors
            raise self.out_of_memory_answer(ran_out)
        self.failed_passes = 0
        self.stats["predict_seconds"] += time.perf_counter() - started
        return [self.predictor.describe(p) for p in p_fake]

    def out_of_memory_answer(self, device: str) -> http.ApiError:
        """A batch the `device` (GPU, or host) had no memory for (other processes on it, a
        burst of large batches): each of its requests gets a 503 to retry, not a 500 that
        reads as a broken model, and the cache the failed pass left is given back."""
        import torch

        self.stats["out_of_memory"] += 1
        http.log.warning("a batch the %s had no memory for: answered 503 (out_of_memory: %d so far)",
                         device, self.stats["out_of_memory"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return http.ApiError(503, "out_of_memory",
                             f"the replica's {device} ran out of memory for a batch of images: retry; "
                             "if it repeats, lower serve.max_batch_size", headers={"Retry-After": "1"})

    async def predict(self, blob: bytes, inline: InlineBudget | None) -> dict | DecodeError:
        """Predictor.predict_bytes for one image, its forward pass shared with others.
        Decoding happens per request, so a bad file is answered at once and the batch
        holds only images ready for the model."""
        try:
            pixels = await (self.decoded_apart(blob) if self.helpers else self.decoded(blob, inline))
        except DecodeError as e:
            return e
        return await self.predict_batch(pixels)

    async def decoded(self, blob: bytes, inline: InlineBudget | None) -> np.ndarray:
        """Only small images in a small body are decoded on the event loop, within the
        request's `inline` budget (None: the body is large, so its other files may be slow
        even to open); the rest go to a thread, a few at a time."""
        if inline is not None and len(blob) <= INLINE_BYTES and not inflated_at_open(blob):
            img = self.predictor.open(blob)  # the header: cheap here, and refuses bombs
            if inline.take(img.width * img.height):
                return self.predictor.decode_opened(img)
        # a large body can be slow even to open (400,000 tiny PNG chunks: 2.4 s); opened
        # again in the thread, so that a request waiting for a slot holds only its bytes
        return await self.in_decode_slot(functools.partial(self.predictor.decode, blob))

    async def decoded_apart(self, blob: bytes) -> np.ndarray:
        """In a helper process (serve.isolate_decoding), one per serve.cpus_per_replica."""
        try:
            return await self.helpers(blob)
        except DecodeError as e:
            if e.reason == crashes.REASON:  # it ended two helpers
                self.stats["killed_decoders"] += 1
            raise

    async def in_decode_slot(self, decode):
        """`decode` in a thread, at most `threads` at once. The slot stays taken until the
        thread ends, even when the request is cancelled (its client hung up): a thread
        cannot be stopped, so clients that hang up must not start more decodes than that."""
        await self.decode_slots.acquire()

        def finished(task: asyncio.Task) -> None:
            self.stats["done_in_threads"] += 1
            self.decode_slots.release()
            if not task.cancelled():
                task.exception()  # retrieved: a request that left is not an unhandled error

        decoding = asyncio.ensure_future(asyncio.to_thread(self.counted, decode))
        decoding.add_done_callback(finished)
        return await asyncio.shield(decoding)

    def counted(self, decode):
        """`decode`, counted in `decoding_now` while its thread runs: what the slots bound."""
        with self.stats_lock:
            self.stats["decoding_now"] += 1
            self.stats["most_decoding_at_once"] = max(self.stats["most_decoding_at_once"],
                                                      self.stats["decoding_now"])
        try:
            return decode()
        finally:
            with self.stats_lock:
                self.stats["decoding_now"] -= 1

    async def files_in(self, request: Request, body: bytes) -> list[tuple[str, str, bytes]]:
        """The multipart body's files, at most serve.max_files_per_request of them. A large
        body is parsed in a decode slot: parsing 10 MB holds ~100 MB and half a second of
        CPU, so concurrent uploads are bounded as decodes are."""
        parse = functools.partial(http.multipart_files, request.headers["content-type"], body,
                                  self.max_files)
        if parses_fast(body):
            return parse()
        return await self.in_decode_slot(parse)

    @contextlib.asynccontextmanager
    async def body(self, request: Request):
        """The request's body, its bytes counted against serve.max_buffered_bytes while the
        request is answered."""
        body = await http.read_body(request, self.max_body_bytes, self.body_idle_timeout_s, self.uploads)
        try:
            yield body
        finally:
            self.uploads.give(len(body))

    async def image_from(self, request: Request, body: bytes) -> bytes:
        """The one image of a /v1/detect request: its body, or its multipart body's one file.
        An empty file is left to the decoder, which says "empty file" as /batch and score do."""
        if not http.is_multipart(request):
            if not body:
                raise http.ApiError(400, "empty_body", "empty body: send the image bytes as the body "
                                                       "or as a multipart file")
            return body
        files = await self.files_in(request, body)
        if not files:
            raise http.ApiError(400, "no_file", "no file in the multipart body: send the image as "
                                                "field 'file'")
        if len(files) > 1:  # scoring the first alone would drop the others without a word
            raise http.ApiError(400, "several_files", f"{len(files)} files in the multipart body: "
                                "/v1/detect scores one; send one file, or use /v1/detect/batch")
        return files[0][2]

    @api.post("/v1/detect", openapi_extra=http.DETECT_BODY, operation_id="detect",
              responses={**http.ok_response(http.RESULT, "the image's score"),
                         **http.error_responses(400, 408, 413, 415, 422, 500, 503)})
    async def detect(self, request: Request) -> dict:
        """One image (raw body, or multipart field `file`) -> p_fake, label, threshold, model."""
        async with self.body(request) as body:
            result = await self.predict(await self.image_from(request, body), InlineBudget())
        if isinstance(result, DecodeError):
            raise decode_answer(result)
        return result

    @api.post("/v1/detect/batch", openapi_extra=http.BATCH_BODY, operation_id="detect_batch",
              responses={**http.ok_response(http.BATCH_RESULT, "a score, or an error, per file"),
                         **http.error_responses(400, 408, 413, 415, 500, 503)})
    async def detect_batch(self, request: Request) -> dict:
        """Several multipart files -> one result (or per-file error) per file, in order."""
        if not http.is_multipart(request):
            raise http.ApiError(415, "not_multipart", "send the images as multipart/form-data files")
        async with self.body(request) as body:
            files = await self.files_in(request, body)
            if not files:
                raise http.ApiError(400, "no_file", "no files in the multipart body")
            # each file of a large body in a thread: opened one after another on the event
            # loop, 40 small files of 256 KB (a PNG of 20,000 empty chunks: 75 ms to open) held it 3 s
            inline = InlineBudget() if len(body) <= INLINE_BYTES else None
            # every file's outcome, failed or not: one that raised left the others running
            # after its 500, holding decode slots and forward passes no answer waited for
            outcomes = await asyncio.gather(*(self.predict(data, inline) for _, _, data in files),
                                            return_exceptions=True)
        results = []
        for number, ((_, name, _), outcome) in enumerate(zip(files, outcomes), 1):
            if isinstance(outcome, DecodeError):
                results.append(file_error(name, decode_answer(outcome)))
            elif isinstance(outcome, http.ApiError):  # its batch ran out of memory: retry it
                results.append(file_error(name, outcome))
            elif isinstance(outcome, Exception):  # that file's 500, as /v1/detect answers it
                # by its place, not its name: an uploader's file name may name a person
                http.log.error("internal error on file %d of %d of %s", number, len(files), request.url.path,
                               exc_info=outcome)
                results.append(file_error(name, http.ApiError(500, "internal_error",
                                                              f"internal error: {type(outcome).__name__}")))
            elif isinstance(outcome, BaseException):  # cancelled, or the process stopping
                raise outcome
            else:
                results.append({"file": name, **outcome})
        errors = sum("error" in r for r in results)
        return {"model": self.predictor.model_id, "count": len(results), "errors": errors,
                "results": results}

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose forward pass hangs (a GPU stuck) answers
        nothing, and one whose passes all fail answers 500s, while its event loop runs on and
        Serve took it for healthy: now it is reported broken, and Serve replaces it."""
        check_forward(self.forward_started, time.monotonic(), self.hung_after, self.failed_passes, self.last_error)

    # monitors probe with HEAD too; one operation each in /openapi.json (a route of both
    # methods gave them one id, a generated client's validator refused the schema)
    @api.get("/healthz", operation_id="healthz",
             responses={**http.ok_response(http.HEALTH, "the replica is serving"),
                        503: {"description": "a forward pass is hung, or every pass fails: Serve "
                                             "replaces the replica", "content": http.ERROR_BODY}})
    @api.head("/healthz", include_in_schema=False)
    async def healthz(self) -> dict:
        try:
            self.check_health()
        except RuntimeError as e:
            raise http.ApiError(503, "unhealthy", str(e)) from None
        return {"status": "ok", "model": self.predictor.model_id}

    @api.get("/v1/model", operation_id="model_info",
             responses=http.ok_response(http.MODEL_INFO, "the model served, and how this replica serves it"))
    @api.head("/v1/model", include_in_schema=False)
    async def model_info(self) -> dict:
        return {**self.predictor.info(), "batching": self.batching, "stats": dict(self.stats),
                "replica": self.replica,  # whose stats: one replica's
                "max_body_bytes": self.max_body_bytes, "max_files_per_request": self.max_files}

    @api.get("/v1/stats", operation_id="stats", responses=http.ok_response(http.STATS, "this replica's counts"))
    async def batch_stats(self) -> dict:
        """Batching observed by the replica that answers (batches, images, largest batch),
        its large-image decodes in threads (now, and the most at once), and the bytes of
        uploads it holds now (serve.max_buffered_bytes is their limit): one replica's,
        since it started, named (another request may reach another)."""
        return {**self.stats, "mean_batch": self.stats["images"] / max(1, self.stats["batches"]),
                "upload_bytes_held": self.uploads.held, "replica": self.replica}


def gpus_per_replica(cfg: Config) -> float:
    """serve.gpus_per_replica (but none on the in-process Ray of a machine without a GPU,
    where a replica asking for one would never start), or one GPU per replica when the
    cluster has GPUs, or resources.use_gpu asks for them (an autoscaler adds them)."""
    import ray

    if cfg.serve.gpus_per_replica > 0:
        wanted = f"serve.gpus_per_replica={cfg.serve.gpus_per_replica:g}"
        granted = not ray.is_initialized() or runtime.use_gpus(True, wanted)
        return cfg.serve.gpus_per_replica if granted else 0.0
    if ray.is_initialized():
        return 1.0 if runtime.cluster_gpus() > 0 or runtime.use_gpus(cfg.resources.use_gpu) else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_options(cfg: Config) -> dict:
    s = cfg.serve
    # below max_batch_size the replica never holds enough requests to fill a batch;
    # queueing at the replica is cheap, the router's back-off when it is full is not
    ongoing = max(s.max_ongoing_requests or 8 * s.max_batch_size, s.max_batch_size)
    return {
        "max_ongoing_requests": ongoing,
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "initial_replicas": s.min_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": gpus_per_replica(cfg)},
        # only to turn the access log off: a deployment's logging_config replaces the one a
        # serve.yaml sets for the application (its JSON encoding, its level) whole
        **({} if s.access_log else {"logging_config": {"enable_access_log": False}}),
        "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
    }


def build(cfg: Config, model: str, model_id: str | None = None):
    """The bound Serve application for `model` (a local folder or s3:// URI), its replicas
    held to the model found there now (`check_same_model`); `model_id`: the one expected."""
    check_settings(cfg)
    model = storage.normalize(model)
    meta = checkpoint.check_detector(model)  # fails here, not in a replica
    found = checkpoint.model_id(meta)
    if model_id and model_id not in checkpoint.model_ids(meta):
        raise UsageError(f"args.model_id is {model_id}, but the model at {model} is {found}: "
                         f"set args.model_id: {found} to serve it, or leave args.model_id out")
    s = cfg.serve
    return Detector.options(**deployment_options(cfg)).bind(
        model=model, max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
        max_body_bytes=s.max_body_bytes, max_pixels=cfg.data.max_pixels,
        threads=max(1, int(s.cpus_per_replica)), max_files=s.max_files_per_request, model_id=found,
        body_idle_timeout_s=s.body_idle_timeout_s, isolate_decoding=s.isolate_decoding,
        max_buffered_bytes=s.max_buffered_bytes)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (jobs/serve.yaml).

    args: model (absolute path or s3:// URI, required), preset (default demo),
    config (a YAML file), set (list of "section.key=value" overrides), model_id (the
    model expected there, as /v1/model and train-detector name it: optional, and the way
    to roll out a model retrained in place, since Serve rebuilds only on a changed config).
    """
    try:
        return build_from_args(dict(args or {}))
    except UsageError as e:  # what `serve status` and a RayService show: one line, no retries
        raise BuildError(re.sub(r"--(set|config|model)\b", r"args.\1", str(e))) from None


class BuildError(UsageError, RayServeException):
    """A bad args of build_app. Serve shows a RayServeException's text as it is, and
    builds the application once: any other error it retried 3 times (each a new process
    importing torch and hashing the weights) and showed as a 40-line traceback."""


def build_from_args(args: dict):
    from deepfake_ray import config

    check_args(args)
    model = str(args.get("model") or "")
    if not model:
        raise UsageError("build_app needs args.model: the exported model folder "
                         "(absolute path or s3:// URI), e.g. WORKDIR/detector/model")
    if not storage.is_s3(model) and not os.path.isabs(os.path.expanduser(model)):  # whose folder?
        raise UsageError(f"args.model {model} must be an absolute path or an s3:// URI: Serve builds "
                         "the application in a process of its own, in another folder")
    runtime.check_outside_job_code(model, "args.model")
    overrides = args.get("set") or []
    cfg = config.build(args.get("preset", "demo"), args.get("config"),
                       [overrides] if isinstance(overrides, str) else list(overrides))
    return build(cfg, model, args.get("model_id"))


BUILD_ARGS = ("model", "preset", "config", "set", "model_id")


def check_args(args: dict) -> None:
    """A misspelt key (`presets:`) was ignored: the demo's settings served, CPU replicas."""
    import difflib

    for key in args:
        if key not in BUILD_ARGS:
            near = difflib.get_close_matches(str(key), BUILD_ARGS, n=1)
            raise UsageError(f"build_app takes no args.{key}" + (f": did you mean args.{near[0]}?" if near else
                             f": its args are {', '.join(BUILD_ARGS)}"))
    overrides = args.get("set") or []
    if not isinstance(overrides, (str, list)) or not all(isinstance(o, str) for o in overrides):
        raise UsageError("args.set must be a list of \"section.key=value\" strings, e.g. "
                         "set: [\"serve.max_batch_size=32\"] (`=`, not `: `)")


def check_settings(cfg: Config) -> None:
    s = cfg.serve
    if s.min_replicas > s.max_replicas:
        raise UsageError(f"serve.min_replicas={s.min_replicas} is more than serve.max_replicas="
                         f"{s.max_replicas}: raise serve.max_replicas or lower serve.min_replicas")
    if s.body_idle_timeout_s >= REQUEST_TIMEOUT_S:  # Serve's plain-text 408 would come first
        raise UsageError(f"serve.body_idle_timeout_s={s.body_idle_timeout_s:g} must be under Serve's "
                         f"{REQUEST_TIMEOUT_S:.0f} s deadline on a whole request, e.g. 30")
    if 0 < s.max_buffered_bytes < s.max_body_bytes:  # a body that fits no budget: 503s forever
        raise UsageError(f"serve.max_buffered_bytes={s.max_buffered_bytes} is less than serve.max_body_bytes="
                         f"{s.max_body_bytes}, so the largest uploads would always be told to retry: "
                         "raise it, or set 0 (16 x serve.max_body_bytes)")


def check_port_free(host: str, port: int) -> None:
    try:  # the address family of the host's own form: "::" or "::1" is IPv6
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): pass a host name or "
                         "address of this machine with --host") from None
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # the address is not this machine's: no port helps
                raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): pass a host "
                                 "name or address of this machine with --host") from None
            if e.errno == errno.EACCES:  # nothing uses it: ports below 1024 are root's
                raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): ports below 1024 need "
                                 "root; pass a --port of 1024 or more (e.g. 8000)") from None
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): stop what uses it "
                             "or pass another --port") from None


def preflight(cfg: Config, model: str | None = None, address: str | None = None, **_) -> None:
    """Before Ray starts: a model to serve, and a port to serve it on. On a cluster Serve's
    proxies listen on its nodes, not necessarily this machine, and one already running
    holds its port: check_http_address asks Serve instead."""
    if not model:
        raise UsageError("serve needs --model: the exported model folder, e.g. WORKDIR/detector/model")
    checkpoint.check_detector(storage.normalize(model))  # its weights too: not a replica's traceback
    if not (runtime.on_cluster() or runtime.cluster_address(address)):
        check_port_free(cfg.serve.host, cfg.serve.port)


def run(cfg: Config, force: bool = False, model: str | None = None, **_) -> dict:
    """`deepfake-ray serve`: start the service, print its URL, block until Ctrl-C or SIGTERM,
    then finish the requests in flight (`drain`) before stopping."""
    preflight(cfg, model)
    check_fits(cfg)
    app = build(cfg, model)
    model_id = checkpoint.model_id(checkpoint.load_meta(storage.normalize(model)))
    host, port = cfg.serve.host, cfg.serve.port
    url = f"http://{host}:{port}"
    started = time.time()
    if not runtime.in_process():  # before anything is replaced, or deleted on the way out
        check_not_served_already()  # first: another address would not help there
        check_http_address(host, port)
    try:
        start_serve(host, port)
        deploy(app)
        print(f"serving {model_id} at {url}  (POST {url}/v1/detect, docs {url}/docs; "
              f"{runtime.serve_ingress()} ingress; ready in {time.time() - started:.0f}s; "
              "Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (docker stop, kill: the CLI makes it one)
        # Serve's HAProxy keeps a stopping replica at least its draining period (2 s on the
        # embedded Ray; Ray's 30 s on a cluster, for the load balancers in front of it)
        print(f"stopping the service: answering the requests in flight (at most {DRAIN_TIMEOUT_S:.0f} s"
              f"{'' if runtime.in_process() else '; 30-35 s where the cluster serves through HAProxy'})...",
              flush=True)
        drain()
    finally:
        try:
            if runtime.in_process():
                serve.shutdown()
            else:  # this application alone: a cluster's Serve, and what else it serves, stay
                drain()
        finally:  # a Ctrl-C during the shutdown too
            runtime.remove_haproxy_folder()
    return {"url": url, "model": model_id}


def deploy(app, name: str = APP_NAME, route_prefix: str = "/") -> None:
    """serve.run, whose error when a replica cannot start names no cause ("Failed to update
    the deployments ['Detector']"): the replica's own error is taken from Serve's status,
    its last line first, and then its traceback."""
    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:
        if said := replica_start_failure(name):
            cause = said.rstrip().rsplit("\n", 1)[-1].strip()
            raise RuntimeError(f"the service's replica did not start: {cause}\n{said}") from e
        raise


def replica_start_failure(app_name: str) -> str | None:
    """What Serve says kept the application's replicas from starting (it ends with the
    replica's error), without terminal colours; None when it says nothing."""
    application = serve.status().applications.get(app_name)
    said = [d.message for d in (application.deployments.values() if application else ())
            if d.message and d.status in ("UNHEALTHY", "DEPLOY_FAILED")]  # not a slow start's note
    return re.sub(r"\x1b\[[0-9;]*m", "", said[0]) if said else None


def check_fits(cfg: Config) -> None:
    """UsageError where the in-process Ray, which nothing can add to, cannot place
    serve.min_replicas replicas: the application would stay DEPLOYING, and serve.run wait,
    without end. (A cluster's autoscaler adds nodes for them.)"""
    import ray

    if not runtime.in_process():
        return
    s, have = cfg.serve, ray.cluster_resources()
    for kind, each, setting in (("CPU", s.cpus_per_replica, "serve.cpus_per_replica"),
                                ("GPU", gpus_per_replica(cfg), "serve.gpus_per_replica")):
        if (wanted := s.min_replicas * each) > have.get(kind, 0):
            raise UsageError(f"serve.min_replicas={s.min_replicas} x {setting}={each:g} is {wanted:g} "
                             f"{kind}s and the in-process Ray has {have.get(kind, 0):g}: lower them")


def check_http_address(host: str, port: int) -> None:
    """UsageError on a cluster whose Serve already listens at another address: a cluster's
    applications share one, and serve.start with another only logs that it ignores it
    (the service answered there while this command printed the address asked for)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    running = client.http_config if client else None
    if running and (running.host, running.port) != (host, port):
        raise UsageError(f"Serve already runs on this Ray cluster, its HTTP proxies at {running.host}:"
                         f"{running.port}, the one address its applications share: pass --host "
                         f"{running.host} --port {running.port}")


def check_not_served_already() -> None:
    """UsageError on a cluster that already serves an application of this name (a
    RayService's, `serve deploy`'s, another `deepfake-ray serve`'s): serve.run would
    replace it, and this command delete it when stopped."""
    if APP_NAME in serve.status().applications:
        raise UsageError(f"this Ray cluster already serves an application named {APP_NAME}: "
                         "`deepfake-ray serve` would replace it, and delete it when stopped; see it "
                         "with `serve status`, and change it with `serve deploy` (jobs/serve.yaml) "
                         "or where it was deployed from")


def start_serve(host: str, port: int) -> None:
    """serve.start, waiting out an HTTP proxy that is slow to start. Serve kills a new proxy
    that fails three readiness checks in a row and starts another with longer checks, but
    serve.start fails at that first kill (seen: a loaded 2-core machine, after 67 s). The
    in-process Ray gives each check 20 s instead of 5 (`runtime.init`); past that, we wait
    for Serve's restarts instead of failing."""
    from ray.exceptions import RayActorError

    runtime.make_haproxy_folder()
    try:
        serve.start(http_options=http_options(host, port))
        return
    except (RayActorError, TimeoutError):  # the proxy killed, or not ready in Serve's 60 s
        print("note: Serve's HTTP proxy was slow to start (a busy machine?) and Serve restarts "
              f"it: waiting for it, at most {PROXY_START_TIMEOUT_S:.0f} s", flush=True)
    serve.start(http_options=http_options(host, port))  # the running controller's client
    deadline = time.monotonic() + PROXY_START_TIMEOUT_S
    while not proxies_healthy():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's HTTP proxy has not started in {PROXY_START_TIMEOUT_S:.0f} s "
                               "of restarts: see why in logs/serve/ (controller_*.log, proxy_*.log) "
                               "of Ray's session folder, /tmp/ray/session_latest on the head node "
                               "by default")
        time.sleep(1)


def http_options(host: str, port: int) -> dict:
    return {"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S}


def proxies_healthy() -> bool:
    proxies = serve.status().proxies
    return bool(proxies) and all(status == "HEALTHY" for status in proxies.values())


def drain(name: str = APP_NAME) -> None:
    """Stop taking requests and answer those in flight, before serve.shutdown: that kills
    HAProxy (SIGKILL) at once, beside the replicas' own graceful stop, so every connection
    still open was reset (28 of 60 uploads in flight). Deleting the application first
    takes its route away and lets each replica finish its requests (within
    graceful_shutdown_timeout_s) while HAProxy, or Serve's proxy, still relays them.
    One deployed from a config since (`serve deploy`, a RayService taking the name over)
    is the platform's, not this command's (which deploys from Python): it is left serving."""
    with contextlib.suppress(RayServeException):  # stopped before Serve had started: nothing to drain
        if not runtime.in_process() and deployed_from(name) == "declarative":  # in-process: all goes
            print(f"note: the application {name} was deployed from a config since this command "
                  "deployed it (serve deploy, a RayService): it is left serving", flush=True)
            return
        serve.delete(name)


def deployed_from(name: str) -> str | None:
    """How the application `name` was deployed, as Serve records it: "imperative" (from
    Python, as this command does), "declarative" (a config), or None (no such app)."""
    from ray.serve.context import _get_global_client

    application = _get_global_client().get_serve_details().get("applications", {}).get(name)
    source = application.get("source") if application else None
    return getattr(source, "value", source)  # an APIType, or its value once serialized
