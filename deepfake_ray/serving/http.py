"""HTTP plumbing of the detector service: size-limited bodies, multipart, JSON errors.

Serve has no request-size limit of its own, so the body is read here as a stream and
refused as soon as it passes the limit (and before reading, when Content-Length
already says so). Multipart bodies are parsed with the standard library's email
parser, once the size is known to be acceptable. Every error answer is JSON
`{"error": what and how to fix it, "reason": a code from REASONS}`; nothing a client
sends turns into a 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import Iterator
from email import errors, policy
from email.message import Message
from email.parser import BytesParser

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfake_ray.data import decode

log = logging.getLogger("ray.serve")
EMAIL = BytesParser(policy=policy.HTTP)  # holds no state between parses
MIN_BODY_RATE = 500  # bytes/s a body must average past serve.body_idle_timeout_s (Apache's mod_reqtimeout's)


class ModelHeader:
    """ASGI middleware: every answer of this replica carries `X-Model-Id`, the model it
    serves (`answering`, set as the replica starts), so that an error, whose JSON names
    none, can be told apart during a rollout. Pure ASGI: Starlette's BaseHTTPMiddleware
    would sit between the routes and the request bodies they stream."""

    answering: str | None = None  # one replica per process: its model's id

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ModelHeader.answering:
            return await self.app(scope, receive, send)

        async def with_model(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-model-id", ModelHeader.answering.encode())]}
            await send(message)

        await self.app(scope, receive, with_model)


def reason_code(reason: str) -> str:
    """A DecodeError's reason ("not an image") as an answer's code ("not_an_image")."""
    return reason.replace(" ", "_")


# Every error answer's `reason`: a stable code for a client to branch on (the `error`
# text is for people and may be reworded). A file's are decode.REASONS, as codes.
REASONS = {
    "empty_body": "the request had no body",
    "no_file": "the multipart body holds no file",
    "several_files": "/v1/detect got several files: send one, or use /v1/detect/batch",
    "not_multipart": "/v1/detect/batch takes multipart/form-data only",
    "malformed_multipart": "a multipart body or header the server cannot read",
    "invalid_content_length": "a Content-Length that is not a number",
    "client_disconnected": "the client hung up before the whole body arrived",
    "body_stalled": "no byte of the body arrived for serve.body_idle_timeout_s",
    "body_too_slow": "the body arrived slower than the least rate past serve.body_idle_timeout_s",
    "body_too_large": "the body passed serve.max_body_bytes",
    "too_many_files": "more files than serve.max_files_per_request",
    "replica_busy": "the replica holds its limit of uploads (serve.max_buffered_bytes): retry",
    "out_of_memory": "the GPU (or host) had no memory for the batch: retry",
    "unhealthy": "a forward pass hung, or every one fails: Serve replaces the replica",
    "no_route": "no such route (see /docs)",
    "method_not_allowed": "the route takes another method (see /docs)",
    "invalid_request": "the request does not match the route's parameters",
    "http_error": "another refusal of the web framework's (its status says which)",
    "internal_error": "a fault of the server's own (logged)",
    # "too large" is for files read from storage: an upload meets the body limit first
    **{reason_code(r): meaning for r, meaning in decode.REASONS.items() if r != "too large"},
}


class ApiError(Exception):
    """An error answer: `status`, JSON {"error": message, "reason": reason} (a REASONS
    code), and `headers`."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers


class UploadBudget:
    """The bytes of request bodies a replica holds at once (serve.max_buffered_bytes), as
    they arrive: past it a request gets a 503 to retry in a moment, not a replica killed
    for its memory. One event loop takes and gives: no lock."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise ApiError(503, "replica_busy",
                           f"this replica holds {self.held:,} bytes of uploads, its limit "
                           f"(serve.max_buffered_bytes {self.limit:,}): retry in a moment",
                           headers={"Retry-After": "1"})
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


def too_large(size_text: str, limit: int) -> ApiError:
    return ApiError(413, "body_too_large",
                    f"request body is {size_text} bytes; the limit is {limit:,} "
                    "(serve.max_body_bytes): send a smaller image")


async def read_body(request: Request, limit: int, idle_timeout: float, budget: UploadBudget | None = None) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `limit` bytes, or 408 when
    no byte of it arrives for `idle_timeout` seconds or it arrives slower than
    MIN_BODY_RATE on average after those. The deadlines are on progress, not on the whole
    upload, so a large image on a slow link still arrives; without them a client that
    stops mid-body held a replica's slot (of max_ongoing_requests) until it hung up, and
    one sending a byte every 25 s held it for Serve's 300 s: HAProxy and Serve's proxy both
    stream the body to the replica as it comes. Its bytes are taken from `budget` as they
    arrive (503 past it); the caller gives them back."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_content_length",
                           f"invalid Content-Length header {declared!r}")
        if declared_size > limit:
            raise too_large(f"{declared_size:,}", limit)
    chunks, size = [], 0
    stream = request.stream()  # chunked uploads carry no Content-Length
    started = time.monotonic()
    try:
        while (chunk := await next_chunk(stream, idle_timeout, due(started, idle_timeout, size))) is not None:
            if size + len(chunk) > limit:
                raise too_large(f"more than {limit:,}", limit)
            if budget is not None:
                budget.take(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
    except BaseException as e:  # refused, stalled or gone: what it held comes back at once
        if budget is not None:
            budget.give(size)
        if isinstance(e, ClientDisconnect):  # the client's doing, not an internal error to log
            raise ApiError(400, "client_disconnected",
                           "the client disconnected before the whole body arrived") from None
        raise
    return b"".join(chunks)


def due(started: float, idle_timeout: float, size: int) -> float:
    """When `size` bytes should have come at MIN_BODY_RATE after the idle timeout's grace
    (none yet: no rate to miss, the idle timeout alone applies)."""
    return started + idle_timeout + size / MIN_BODY_RATE if size else math.inf


async def next_chunk(stream, idle_timeout: float, deadline: float) -> bytes | None:
    """The body's next chunk (None at its end), or 408 after `idle_timeout` s without one
    or at `deadline`, the time by which the bytes so far should have come at MIN_BODY_RATE."""
    wait = min(idle_timeout, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(anext(stream), max(wait, 0.0))
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        if wait < idle_timeout:
            raise ApiError(408, "body_too_slow",
                           f"the request body arrived slower than {MIN_BODY_RATE} bytes/s on average "
                           "after serve.body_idle_timeout_s: send it on a faster link") from None
        raise ApiError(408, "body_stalled",
                       f"no part of the request body arrived for {idle_timeout:g} s "
                       "(serve.body_idle_timeout_s): send the whole body") from None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


FILE_FIELDS = ("file", "files")  # parts under these names are files, named or not
FORM_FIELDS = 16  # plain form fields a request may hold beside its files
# The parser's header parsing is quadratic in a header's length (CPython gh-136063: a
# part's Content-Disposition of 40,000 semicolons took 2.6 s, its Content-Type of 8,000
# 1 s, the latter while the body is split), so headers are measured before parsing:
MAX_HEADER = 1024  # the request's Content-Type (a boundary is at most 70 characters)
MAX_PART_HEADER = 2048  # a part's header, unfolded: a 255-byte file name sent both plain
#                         and percent-encoded (filename*=, as .NET sends it) takes ~1.2 KB
MAX_PART_TYPE = 512  # a part's Content-Type ("image/jpeg", a name= at most), parsed while
#                       the body is split
MAX_PART_HEADERS = 4096  # all of a part's headers
LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # as the parser ends a line
COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")  # innermost first: (a (b) c) takes two passes


def too_many_files(limit: int) -> ApiError:
    return ApiError(413, "too_many_files",
                    f"more than {limit} files in one request (serve.max_files_per_request): "
                    "send them in several requests")


def header_block(content_type: str) -> bytes:
    """The Content-Type header as the start of a message for the email parser (Starlette
    decodes headers as Latin-1, so this gives back the bytes the client sent)."""
    return b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"


def check_part_count(content_type: str, body: bytes, limit: int) -> None:
    """413 before parsing a body of many more parts than `limit` files: the parser takes
    ~0.6 ms a part, and 70,000 tiny parts fit in 10 MB. The boundary and the line breaks
    are read as the parser reads them (its own header policy: another one reads
    `boundary=AA (c)` as a different boundary, and the count as none; it ends a line at
    CR, LF or CRLF); a part begins at each delimiter line but the closing one.

    A part can be multipart itself, under a boundary of its own, which the parser would
    parse too, at a cost no count of the outer parts bounds (300,000 tiny inner parts in
    3 MB: 50 s). However its header is written (folded, an encoded word), an inner part
    begins at a line starting with "--": lines of that kind beyond the outer delimiters
    are bounded before parsing, and a nested part, as few as its parts may be, is refused
    (400) after."""
    if len(content_type) > MAX_HEADER:
        raise ApiError(400, "malformed_multipart",
                       f"a Content-Type header longer than {MAX_HEADER} bytes: send "
                       "multipart/form-data with a short boundary")
    with malformed_header("send multipart/form-data; boundary=... and nothing else"):
        boundary = EMAIL.parsebytes(header_block(content_type)).get_boundary()
    if not boundary:
        return  # the parser refuses the body as malformed
    if not boundary.isascii():  # RFC 2046: a few ASCII characters (`boundary*=utf-8''%E2%82%AC`)
        raise ApiError(400, "malformed_multipart",
                       "malformed multipart body: the boundary must be ASCII")
    delimiter = b"--" + boundary.encode("ascii")
    # CRLF holds one LF, and a bare CR is not followed by one: each delimiter counted once
    parts = body.count(b"\n" + delimiter) + body.count(b"\r" + delimiter) + body.startswith(delimiter) - 1
    if parts > limit + FORM_FIELDS:
        raise too_many_files(limit)
    dash_lines = body.count(b"\n--") + body.count(b"\r--") + body.startswith(b"--")
    if dash_lines > parts + 1 + limit + FORM_FIELDS:  # room for "--" lines in a form field's text
        raise nested_parts()
    check_part_headers(body, delimiter)


def check_part_headers(body: bytes, delimiter: bytes) -> None:
    """400 for a part whose headers are longer than any client sends, before the parser
    spends seconds on them (MAX_PART_HEADER). Read as the parser reads them: a part's
    headers start on the line after its delimiter and end at the first empty line; a line
    that starts with a space or a tab continues the header before it."""
    for start in delimiter_ends(body, delimiter):  # as many as check_part_count allowed
        if body.startswith(b"--", start):
            continue  # the closing delimiter: what follows is no part
        lines = LINE_BREAK.split(body[start:start + MAX_PART_HEADERS + 1])[1:]  # after its line
        headers: list[bytes] = []
        for line in lines:
            if not line:
                break
            if line[:1] in (b" ", b"\t") and headers:
                headers[-1] += line
            else:
                headers.append(line)
        else:
            if start + MAX_PART_HEADERS < len(body):  # no empty line in reach
                raise part_headers_too_long(f"its headers exceed {MAX_PART_HEADERS} bytes")
        for header in headers:
            if len(header) > MAX_PART_HEADER:
                raise part_headers_too_long(f"a header of {len(header):,} bytes")
            if header[:13].lower() == b"content-type:":
                if len(header) > MAX_PART_TYPE:
                    raise part_headers_too_long(f"a Content-Type of {len(header):,} bytes")
                if main_type(header[13:]) in (b"message", b"multipart"):
                    raise nested_parts()  # the parser reads a message/* part as a whole email


def main_type(value: bytes) -> bytes:
    """A Content-Type's main type as the parser reads it: comments, nested ones too, and
    white space left out (`(x) Message /rfc822` is a message)."""
    while True:
        value, found = COMMENT.subn(b"", value)
        if not found:
            return re.sub(rb"\s", b"", value.split(b"/", 1)[0]).lower()


def delimiter_ends(body: bytes, delimiter: bytes) -> Iterator[int]:
    """Where each delimiter ends that starts the body or a line (bytes.find: a regex
    over a 10 MB body took 160 ms)."""
    at = body.find(delimiter)
    while at != -1:
        if at == 0 or body[at - 1] in b"\r\n":
            yield at + len(delimiter)
        at = body.find(delimiter, at + 1)


def part_headers_too_long(what: str) -> ApiError:
    return ApiError(400, "malformed_multipart",
                    f"a multipart part's headers are too long ({what}): send a file "
                    "name of at most 255 bytes and the file's own Content-Type")


@contextlib.contextmanager
def malformed_header(fix: str):
    """Within: the email parser's errors on a header it cannot read as a 400 that says
    `fix`, not the server's 500. It reads each header when first asked for it (the
    boundary, a file name, the transfer encoding as the payload is decoded), and some
    raise there: comments nested hundreds deep exhaust its recursion, a parameter `name*`
    without a value is an IndexError, an encoded name (RFC 2231) that does not decode a
    LookupError or ValueError."""
    try:
        yield
    except (ValueError, LookupError, RecursionError, errors.MessageError) as e:
        raise ApiError(400, "malformed_multipart",
                       f"malformed multipart header ({type(e).__name__}): {fix}") from None


def nested_parts() -> ApiError:
    return ApiError(400, "malformed_multipart",
                    "a multipart part holds parts of its own: send each file as a part "
                    "of the form itself")


def multipart_files(content_type: str, body: bytes, limit: int) -> list[tuple[str, str, bytes]]:
    """(field name, file name, bytes) of every file part, in order; 413 for more than
    `limit` files. A part is a file when it has a file name (`curl -F file=@face.jpg`) or
    sits under a file field (`-F file=<face.jpg`)."""
    check_part_count(content_type, body, limit)
    with malformed_header("send plain name= and filename= parameters and the file's own Content-Type"):
        message = EMAIL.parsebytes(header_block(content_type) + body)
        if not message.is_multipart() or message.defects:
            raise ApiError(400, "malformed_multipart",
                           "malformed multipart body: send files as multipart/form-data")
        files = []
        for part in message.iter_parts():
            if part.is_multipart():
                raise nested_parts()
            filename = file_name(part)
            field = part.get_param("name", header="content-disposition") or ""
            if filename is None and field not in FILE_FIELDS:
                continue  # a plain form field, not a file
            files.append((field, filename or field, part.get_payload(decode=True) or b""))
    if len(files) > limit:
        raise too_many_files(limit)
    return files


ENCODED_NAME = re.compile(r"filename\*")  # as the parser reads it: lower case
WINDOWS_PATH = re.compile(r"[A-Za-z]:\\|\\")  # C:\ or \\server (\server once unquoted): old browsers sent the whole path


def file_name(part: Message) -> str | None:
    """The part's file name as its client meant it. The parser reads a quoted name as an
    email's, where a backslash escapes any character; browsers and curl send file names as
    HTML's form encoding says, backslashes as they are (`a\\b.jpg` would read `ab.jpg`),
    Python's clients double them. So a backslash escapes only a quote or a backslash (as
    Starlette's parser reads it), and a Windows path is cut to its last name."""
    name = part.get_filename()
    raw = next((value for key, value in part.raw_items() if key.lower() == "content-disposition"), "")
    if name is None or "\\" not in raw or ENCODED_NAME.search(raw):
        return name  # an encoded name (RFC 2231) has no quoting to read
    legacy = Message()  # compat32's unquoting; the parser kept the bytes it read as surrogates
    legacy["Content-Disposition"] = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    name = legacy.get_filename() or name
    return name.rsplit("\\", 1)[-1] if WINDOWS_PATH.match(name) else name


# The request bodies and error answers of the image routes, for /openapi.json (and so
# /docs' "Try it out" and generated clients): the handlers read the raw Request, so
# FastAPI cannot infer either.
BINARY = {"type": "string", "format": "binary"}
REASON = {"type": "string", "enum": list(REASONS),
          "description": "a stable code to branch on (README: Every error answer's reason)"}
ERROR_BODY = {"application/json": {"schema": {"type": "object", "required": ["error", "reason"], "properties": {
    "error": {"type": "string", "description": "what is wrong and how to fix it, for people"},
    "reason": REASON}}}}
DETECT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY},
                                       "required": ["file"]}},
    "application/octet-stream": {"schema": BINARY},
    "image/*": {"schema": BINARY}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": BINARY}}, "required": ["files"]}}}}}


# what a 200 holds, for /docs and generated clients (the routes return dicts: FastAPI
# described them as any object)
RESULT = {"type": "object", "required": ["p_fake", "label", "threshold", "model"], "properties": {
    "p_fake": {"type": "number", "minimum": 0, "maximum": 1,
               "description": "the model's score for fake: a probability only for clean face crops at "
                              "its training's share of fakes (half), not after blur or downscaling"},
    "label": {"type": "string", "enum": ["fake", "real"], "description": "fake when p_fake >= threshold"},
    "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                  "description": "the model's (model.json): chosen on validation when it was trained, "
                                 "unless set there since"},
    "model": {"type": "string", "description": "the id of the model that answered"}}}
FILE_ERROR = {"type": "object", "required": ["file", "error", "reason", "status"], "properties": {
    "file": {"type": "string"}, "error": {"type": "string"}, "reason": REASON,
    "status": {"type": "integer", "description": "the HTTP status this file alone would have had "
                                                "(503: send that file again in a moment)"}}}
BATCH_RESULT = {"type": "object", "required": ["model", "count", "errors", "results"], "properties": {
    "model": {"type": "string"}, "count": {"type": "integer"}, "errors": {"type": "integer"},
    "results": {"type": "array", "description": "one per file, in order", "items": {"oneOf": [
        {**RESULT, "required": ["file", *RESULT["required"]],
         "properties": {"file": {"type": "string"}, **RESULT["properties"]}}, FILE_ERROR]}}}}
HEALTH = {"type": "object", "required": ["status", "model"], "properties": {
    "status": {"type": "string", "enum": ["ok"]}, "model": {"type": "string"}}}
COUNT, SECONDS = {"type": "integer", "minimum": 0}, {"type": "number", "minimum": 0}
STATS = {"type": "object", "description": "one replica's, since it started", "required": [
    "batches", "images", "largest_batch", "mean_batch", "upload_bytes_held", "replica"], "properties": {
    "batches": COUNT, "images": COUNT, "largest_batch": COUNT, "mean_batch": SECONDS,
    "predict_seconds": {**SECONDS, "description": "in forward passes, all batches together"},
    "decoding_now": COUNT, "most_decoding_at_once": COUNT, "done_in_threads": COUNT,
    "killed_decoders": {**COUNT, "description": "uploads set aside because they ended a decoding helper"},
    "out_of_memory": {**COUNT, "description": "batches the GPU (or host) had no memory for: 503s"},
    "upload_bytes_held": {**COUNT, "description": "request bodies held now, against serve.max_buffered_bytes"},
    "replica": {"type": "string", "description": "which replica answered"}}}
MODEL_INFO = {"type": "object", "required": ["model", "device", "threshold", "class_names", "replica"],
              "properties": {
    "model": {"type": "string", "description": "its id (weights and what decides a label), not where it is"},
    "device": {"type": "string"}, "arch": {"type": "string"}, "num_classes": COUNT,
    "class_names": {"type": "array", "items": {"type": "string"}},
    "resolution": COUNT, "input_size": COUNT, "jpeg_quality": {"type": ["integer", "null"]},
    "threshold": {"type": "number", "minimum": 0, "maximum": 1}, "epoch": COUNT,
    "metrics": {"type": "object", "description": "its validation figures; null where none is a number"},
    "preprocessing": {"type": "object"}, "format_version": COUNT, "software": {"type": "object"},
    "batching": {"type": "object"}, "stats": {"type": "object", "description": "as /v1/stats"},
    "replica": {"type": "string"}, "max_body_bytes": COUNT, "max_files_per_request": COUNT}}


MODEL_HEADER = {"X-Model-Id": {"description": "the id of the model that answered", "schema": {"type": "string"}}}
RETRY_HEADER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def ok_response(schema: dict, description: str) -> dict:
    """FastAPI `responses` entry for a 200 holding `schema`."""
    return {200: {"description": description, "headers": MODEL_HEADER,
                  "content": {"application/json": {"schema": schema}}}}


def error_responses(*statuses: int) -> dict:
    """FastAPI `responses` for these statuses, each a JSON {"error": text, "reason": code}."""
    what = {400: "bad request (empty, malformed or several files)",
            408: f"the body stopped arriving, or averaged under {MIN_BODY_RATE} bytes/s past "
                 "serve.body_idle_timeout_s",
            413: "too large: the body (serve.max_body_bytes), the image or the file count",
            415: "not an image, or not multipart", 422: "a damaged image",
            500: "the model gave no finite score, or its forward pass failed",
            503: "the replica holds its limit of uploads (serve.max_buffered_bytes), or its GPU (or host) ran "
                 "out of memory for a batch: retry (Retry-After)"}
    return {status: {"description": what[status], "content": ERROR_BODY,
                     "headers": {**MODEL_HEADER, **(RETRY_HEADER if status == 503 else {})}}
            for status in statuses}


async def error_json(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_answer(exc.status, exc.reason, exc.message, exc.headers)
    if isinstance(exc, StarletteHTTPException):
        said = {404: ("no_route", f"no route {request.url.path}: see /docs"),
                405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}: see /docs")}
        reason, message = said.get(exc.status_code, ("http_error", str(exc.detail)))
        return error_answer(exc.status_code, reason, message, getattr(exc, "headers", None))
    if isinstance(exc, RequestValidationError):
        return error_answer(422, "invalid_request", f"invalid request: {exc.errors()}")
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_answer(500, "internal_error", f"internal error: {type(exc).__name__}")


def error_answer(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    count_error(reason, status)
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


def count_error(reason: str, status: int) -> None:
    """Counts an error answer (or a batch file's error) by its reason, for Prometheus:
    `ray_deepfake_ray_errors_total{reason, status}`, scraped from Ray's metrics port as
    Serve's own request counts are, which tell statuses apart but not why (a file that is
    no image from a GPU out of memory). Outside Ray (a unit test) nothing is counted."""
    import ray

    if ray.is_initialized():
        errors_counter().inc(1, tags={"reason": reason, "status": str(status)})


@functools.cache  # one per replica process, made on its first error
def errors_counter():
    from ray.util.metrics import Counter

    return Counter("deepfake_ray_errors", tag_keys=("reason", "status"),
                   description="error answers of the detector service, and files of /v1/detect/batch "
                               "answered with one, by reason")


def install_error_handlers(app: FastAPI) -> None:
    for kind in (ApiError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, error_json)
