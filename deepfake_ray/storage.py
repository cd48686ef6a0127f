"""URIs -> pyarrow filesystems, and atomic writes.

Every stage names files by URI: a local path or `s3://bucket/key`. S3 credentials,
region and endpoint come from the standard AWS environment and config files
(`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` or the profile's `endpoint_url` for
S3-compatible stores such as MinIO).

Writes are atomic: a reader sees the whole file or none of it. Locally we write a
temporary sibling and rename it; on S3 an object only changes when its upload
completes, so we upload from memory with boto3 (one PutObject, or a multipart upload
that is aborted if any part fails), never through a stream that a failure would close.

Also here: the stage markers (`mark_complete`, `completed`, `unmark`: a stage is complete
when its folder holds the marker it writes last), the work directory's lock
(`exclusive`; on S3, lease.py's lease), listings of local folders and buckets, and the
filesystem's refusals. S3's endpoint, clients and the explanations of its errors are in
s3.py.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import posixpath
import re
import shutil
import socket
import stat
import sys
import tempfile
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from deepfake_ray.errors import LockHeld, UsageError, warn
from deepfake_ray import s3

if TYPE_CHECKING:  # annotations only: pyarrow.compute adds ~30 ms to every import
    import pyarrow.compute as pc

COMPLETE = "_COMPLETE.json"  # the marker a stage writes last


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


UMASK = current_umask()


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def normalize(uri: str) -> str:
    """Absolute local paths (Ray workers change directory), URIs unchanged."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return posixpath.join(str(uri), *parts) if is_s3(uri) else os.path.join(str(uri), *parts)


def parent(uri: str) -> str:
    """The folder or prefix holding `uri` (normalized); a bucket or `/` is its own."""
    uri = normalize(uri)
    if not is_s3(uri):
        return os.path.dirname(uri)
    return uri.rsplit("/", 1)[0] if "/" in uri.removeprefix("s3://") else uri


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        check_s3_path(uri)
        return s3.s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


def check_s3_path(uri: str, forms: str = "s3://BUCKET/prefix or a local path", source: bool = False) -> None:
    """pyarrow refuses a path with an empty part with a traceback, far from the cause; one
    with no bucket (`s3://$BUCKET/runs` with BUCKET unset) would even read as a local folder
    once normalized (`s3:`). `source`: a prefix to read, whose keys may hold such a part."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):/(/)?", str(uri))
    if scheme and not is_s3(uri) and (scheme.group(2) or scheme.group(1).lower() == "s3"):
        # S3://, s3:/bucket, gs://: each would be a local folder (`S3:`); C:/data may be one
        rest = str(uri)[scheme.end():].lstrip("/")
        fix = f"write s3://{rest}" if scheme.group(1).lower() == "s3" else f"use {forms}"
        raise UsageError(f"{uri}: not a location this tool can use ({scheme.group(0)}): {fix}")
    path = str(uri)[len("s3://"):].rstrip("/")
    if is_s3(uri) and not path.split("/", 1)[0]:
        raise UsageError(f"{uri}: an S3 path that names no bucket: write s3://BUCKET/prefix")
    if is_s3(uri) and "//" in path:
        # keys may hold one ('faces//a.jpg'): listed from the prefix above, they are read as they are
        above = f", or, for keys that hold '//' themselves, the prefix above it (s3://{path.split('//')[0]})" \
            if source else ""
        raise UsageError(f"{uri}: an S3 path with an empty part ('//'): write it as "
                         f"s3://{re.sub('/+', '/', path)}{above}")


def exists(uri: str) -> bool:
    if not is_s3(uri):  # the OS: pyarrow refuses a name that is not UTF-8 (an old Latin-1 folder's)
        return os.path.exists(normalize(uri))
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.isfile(normalize(uri))
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.isdir(normalize(uri))
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:  # an object named like a prefix may hold keys too
        return has_keys_under(uri)
    return kind == pafs.FileType.Directory


def has_keys_under(uri: str) -> bool:
    """Whether any key starts with `uri`/ (one request for at most one key). Without leave
    to list the bucket, the object is taken for what S3 said it is: a file."""
    from botocore.exceptions import ClientError

    client, bucket, prefix = s3.s3_client(uri)
    with s3.store_errors(uri):  # the network's failures, said as the store's
        try:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=key_prefix(prefix), MaxKeys=1)
        except ClientError:
            return False
    return listed.get("KeyCount", 0) > 0


def bucket_missing(uri: str) -> bool:
    """Whether S3 says the bucket of `uri` does not exist (one request). Any other answer
    (no leave to ask, the network) is said where the bucket is used."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, _ = s3.s3_client(uri)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        return e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket")
    except BotoCoreError:
        return False
    return False


def key_prefix(key: str) -> str:
    """What keys under `key` start with: `key/`, or anything at a bucket's root."""
    return f"{key.rstrip('/')}/" if key.strip("/") else ""


# non-blocking: opening a named pipe for reading otherwise waits for a writer, forever
OPEN_TO_READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_to_end(fd: int, size: int, max_bytes: int | None = None) -> bytes:
    """The rest of a file opened at its start, `size` bytes by its last stat: one read
    where the OS gives it all (a local file does), more where it gives less (some network
    filesystems) or the file has grown since, never more than `max_bytes` (FileTooLarge)."""
    data = os.read(fd, size + 1)  # the byte over its size: the end of a file that did not grow, in one call
    if len(data) == size:
        return data
    chunks, total = [data], len(data)
    while True:
        check_size(total, max_bytes)  # grown past the limit since its stat: read no further
        if not (chunk := os.read(fd, 1 << 20)):
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)


class FileTooLarge(ValueError):
    """A file over the size a caller reads: refused before its bytes are read."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size:,} bytes, over {limit:,}")
        self.size, self.limit = size, limit


def check_size(size: int | None, max_bytes: int | None) -> None:
    if max_bytes is not None and size is not None and size > max_bytes:
        raise FileTooLarge(size, max_bytes)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The file's bytes; over `max_bytes`, FileTooLarge without reading them."""
    if not is_s3(uri):  # the OS directly, no file object: ingest reads many small files
        path = normalize(uri)
        fd = os.open(path, OPEN_TO_READ)  # read_bytes of a face crop: ~10 us, against ~13 through open()
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(f"{uri} is not a regular file (a pipe, socket or device)")
            check_size(info.st_size, max_bytes)
            return read_to_end(fd, info.st_size, max_bytes)
        finally:
            os.close(fd)
    if pyarrow_cannot_name(uri):
        return s3_get(uri, max_bytes)
    fs, path = resolve(uri)
    try:
        # A random-access file reads in one sized request; a stream's small reads are
        # each a ranged GET (minutes for a 200 MB checkpoint on some S3-compatible stores).
        # Its opening HEAD gives the size: no get_file_info first (a third request per image).
        with fs.open_input_file(path) as f:
            check_size(f.size(), max_bytes)
            return f.read()
    except FileNotFoundError:  # a key that is not there, or a prefix ("folder")
        raise FileNotFoundError(uri) from None
    except FileTooLarge:
        raise
    except OSError as e:
        # a failure pyarrow does not name, or a refusal, asked again through boto3, which
        # names it (an archived object reads as "INTERNAL_FAILURE ... Failed to flush
        # response stream"); the store's own (network, bucket, credentials) stays as it is
        if s3.pyarrow_problem(e) not in (None, "ACCESS_DENIED"):
            raise
        return s3_get(uri, max_bytes)


def pyarrow_cannot_name(uri: str) -> bool:
    """Keys S3 allows and pyarrow reads as another path, or refuses: an empty part
    ('faces//a.jpg'), a '.' or '..' part ('faces/./a.jpg' is a key of its own)."""
    parts = uri[len("s3://"):].split("/")
    return any(part in ("", ".", "..") for part in parts[1:])


def s3_get(uri: str, max_bytes: int | None = None) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    client, bucket, key = s3.s3_client(uri)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]  # read as botocore's: a reset mid-body is its error, not urllib3's
        try:
            check_size(response.get("ContentLength"), max_bytes)
            return body.read()
        finally:
            body.close()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(uri) from e
        if code in s3.OBJECT_REFUSALS:
            raise s3.ObjectRefused(uri, s3.redacted(f"{uri}: {e}"), s3.boto_problem(e)) from None
        raise s3.store_error(uri, e) from None  # unchained, as in store_errors
    except BotoCoreError as e:  # no connection, a timeout: the store's, as pyarrow's OSErrors
        raise s3.store_error(uri, e) from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


# Larger S3 writes go in parts, several at once; a failed part aborts the upload.
MULTIPART_BYTES, PART_BYTES = 64 << 20, 16 << 20
WRITERS = s3.CONNECTIONS  # write_many's files at once: as many as a client's connections


def durable(fd: int) -> None:
    """The file's bytes on the disk itself: macOS's fsync leaves them in the drive's cache,
    which a power cut may lose or reorder (Apple's fsync(2)); F_FULLFSYNC flushes it."""
    if sys.platform == "darwin":
        import fcntl

        with contextlib.suppress(OSError):  # a filesystem without it (SMB): fsync's promise
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        s3_put(uri, data)
        return
    path = normalize(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    except OSError as e:  # named by the file it was for, not a temporary that never was
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed on every path
            with contextlib.suppress(OSError):  # vfat/exFAT refuse modes: the file is still ours to write
                os.fchmod(fd, 0o666 & ~UMASK)  # as open() would make it: mkstemp's 0600 hides it from the team
            f.write(data)
            f.flush()
            durable(f.fileno())  # on disk before it has the name: a power cut leaves old or new
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):  # a stop landing just after the rename
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk's write or fsync names no file
            raise OSError(e.errno, e.strerror, path) from None
        raise


def s3_put(uri: str, data: bytes) -> None:
    """Not through pyarrow's output stream: its close, which also runs after an error,
    sends what it holds, so a failed multipart start or an interrupt before the write
    replaced the object with an empty one."""
    import io

    from boto3.s3.transfer import TransferConfig

    check_s3_path(uri)
    client, bucket, key = s3.s3_client(uri)
    data = data if isinstance(data, bytes) else bytes(data)  # a pyarrow Buffer (a parquet file)
    with s3.store_errors(uri):
        if len(data) < MULTIPART_BYTES:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        else:
            client.upload_fileobj(io.BytesIO(data), bucket, key, Config=TransferConfig(
                multipart_threshold=MULTIPART_BYTES, multipart_chunksize=PART_BYTES))


def write_many(files: dict[str, bytes]) -> None:
    """uri -> bytes, written 32 at a time: on S3 each is a round trip, which overlap."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(write_bytes, files, files.values()):
            pass  # raises the first failure


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj) -> None:
    """As strict JSON: NaN and infinities (a diverged epoch's losses, a ROC-AUC of one
    class's images) as null, which every parser reads; readers take null as not finite."""
    write_text(uri, json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def finite(value) -> bool:
    """A number, and finite: JSON's null (a NaN or infinity written) is not."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def json_safe(value):
    """NaN and infinities as null, for JSON that other tools read (an HTTP answer, eval/'s
    files): JSON has no such numbers, and jq or a browser refuses a file that holds them.
    (A ROC-AUC of one class's images is NaN.)"""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table, **options) -> None:
    """`options`: pyarrow.parquet.write_table's. Serialized into Arrow's own buffer: into a
    Python BytesIO the writer makes many small Python calls, and getvalue copies it all
    (a 4 MB images part: 10 ms against 4.5 ms)."""
    out = pa.BufferOutputStream()
    pq.write_table(table, out, **options)
    write_bytes(uri, out.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None, where: pc.Expression | None = None) -> pa.Table:
    """`where`: the rows to keep, tested as each batch is read, so only they are held."""
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=where)


def upload_file(path: str, uri: str) -> None:
    """Copy a file on this machine's disk to `uri`."""
    with open(normalize(path), "rb") as f:
        write_bytes(uri, f.read())


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to `uri`."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            upload_file(src, join(uri, os.path.relpath(src, local_dir).replace(os.sep, "/")))


def s3_objects(uri: str) -> dict[str, dict]:
    """Key relative to `uri` -> S3's listing entry (Size, ETag, LastModified) of every
    object under it: pyarrow's listing has no ETag."""
    client, bucket, prefix = s3.s3_client(uri)
    prefix = key_prefix(prefix)
    with s3.store_errors(uri):  # the pages are fetched as they are read
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"][len(prefix):]: o for page in pages for o in page.get("Contents", [])}


def file_digest(uri: str, algorithm: str) -> str:
    """Hex digest of a file, local or s3://, read a MB at a time."""
    digest = hashlib.new(algorithm, usedforsecurity=False)  # a FIPS host's Python refuses MD5 else
    if is_s3(uri):
        fs, path = resolve(uri)
        stream = fs.open_input_stream(path)
    else:  # by the OS, which takes any name: pyarrow refuses one that is not valid UTF-8
        stream = open(normalize(uri), "rb")
    with stream as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(uri: str) -> list[str]:
    """Every file under a prefix, recursively, as URIs, sorted."""
    if not is_s3(uri):
        return sorted(walk_local(normalize(uri)))
    return list(s3_sizes(uri))


def s3_sizes(uri: str) -> dict[str, int]:
    """Every object under a prefix, recursively, as URIs, sorted -> its size, as listed."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {f"s3://{i.path}": i.size for i in sorted(infos, key=lambda i: i.path) if i.type == pafs.FileType.File}


def list_visible(uri: str) -> list[str]:
    """list_files without hidden files and folders (`.git`, `.ipynb_checkpoints`, macOS's
    `.DS_Store` and `._NAME.jpg`, this module's `.tmp-*`): none holds a user's data. An S3
    key's '.' or '..' part is no hidden name ('faces/./a.jpg' is a key like any other)."""
    return list(listing(uri))


def listing(uri: str) -> dict[str, int | None]:
    """list_visible's files -> each one's size where the listing gave it (S3), else None
    (a local folder's files are not stat'ed to be listed)."""
    sizes = s3_sizes(uri) if is_s3(uri) else dict.fromkeys(list_files(uri))
    root = len(normalize(uri))
    return {f: size for f, size in sizes.items()
            if not any(part.startswith(".") and part not in (".", "..") for part in f[root:].split("/"))}


def walk_local(root: str) -> list[str]:
    """Files under `root`, following linked folders, except a link back to a folder it is
    inside of (a loop), `root` and the folders above it included: a link to `..` or `/`
    would list what is beside the source, or the whole disk. The listing gives entry
    types, so only folders are stat'ed (pyarrow stats every file: 5,000 photos ~35 ms
    against ~12). A folder that cannot be read (a root-only `lost+found` on a mounted
    drive) is left out, with a warning."""
    files, folders = [], [(root, folders_above(root))] if os.path.isdir(root) else []  # none: no files
    unreadable = []
    while folders:
        folder, outer = folders.pop()
        try:
            info = os.stat(folder)
            here = outer | {(info.st_dev, info.st_ino)}
            if len(here) == len(outer):
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if is_folder(entry):
                        folders.append((entry.path, here))
                    else:
                        files.append(entry.path)
        except OSError as e:  # no permission, or a link to nowhere: left out, and said
            raise_store_failure(folder, e, listing=True)  # a listing without it would pass as whole
            unreadable.append(f"{folder} ({e.strerror or type(e).__name__})")
    if unreadable:
        warn(f"warning: {len(unreadable)} folder(s) under {root} could not be read, and their files "
             f"are left out: {shown(', '.join(sorted(unreadable)[:3]))}{', ...' if len(unreadable) > 3 else ''}")
    UNREADABLE_UNDER[root] = sum(not any(part.startswith(".") for part in f[len(root):].split("/"))
                                 for f in unreadable)  # hidden ones are not listed anyway
    return files


UNREADABLE_UNDER: dict[str, int] = {}  # local folder -> visible folders its last listing could not read

# a network filesystem's failures, not one file's: taken as that file's, a complete data/
# (or a score table) would lack the files read after the mount went
MOUNT_GONE = {errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EHOSTUNREACH}


def raise_store_failure(uri: str, e: OSError, listing: bool = False) -> None:
    """Raises when reading `uri` failed for its store's sake (S3's network or credentials,
    a network mount gone stale), not the file's own (gone, no permission): every file
    after it would fail alike, so the run stops rather than set each aside. A folder
    (`listing`) whose disk fails (EIO) stops it too: its files would be missed unseen,
    where one file's bad sector is that file's row."""
    if is_s3(uri):
        if not isinstance(e, (FileNotFoundError, s3.ObjectRefused)):
            raise e
    elif e.errno in MOUNT_GONE or (listing and e.errno == errno.EIO):
        what = ("listing", "folder", "a network mount gone stale, a failing disk") if listing else \
            ("reading", "file", "a network mount gone stale")
        raise UsageError(f"{what[0]} {shown(uri)} failed ({e.strerror}): its filesystem, not the {what[1]} "
                         f"({what[2]}?): check it, then run again") from None


def folders_above(root: str) -> frozenset[tuple[int, int]]:
    """(device, inode) of each folder above `root`, by its path as given and as resolved."""
    found = set()
    for path in {os.path.abspath(root), os.path.realpath(root)}:
        while (parent := os.path.dirname(path)) != path:
            path = parent
            with contextlib.suppress(OSError):  # one this user cannot stat: not known, as before
                info = os.stat(path)
                found.add((info.st_dev, info.st_ino))
    return frozenset(found)


def is_folder(entry: os.DirEntry) -> bool:
    """A link that cannot be followed (a loop, no permission) is not a folder: listed as
    a file, it is then rejected as unreadable, and the rest of its folder still listed."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def printable(path: str) -> str:
    """`path` as text any table can hold: a file name that is not valid UTF-8 (an old
    Latin-1 archive) shows its odd bytes as \\xNN."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """`text` for a console line: control characters (a file name's escape sequences, its
    newlines) as \\xNN, so that no name can restyle, rewrite or split the line it is in."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", printable(s3.redacted(text)))


@contextlib.contextmanager
def exclusive(uri: str, command: str):
    """Holds a lock on folder `uri` (locally the OS frees it when the process ends, even
    killed; on S3 it lapses, see lease.py), or fails with UsageError while another
    process holds it (one on another Ray cluster's S3 lock is waited on until it lapses)."""
    if is_s3(uri):
        from deepfake_ray import lease

        with lease.held(uri, command):
            yield
        return
    import fcntl

    check_folder(uri, command)
    os.makedirs(normalize(uri), exist_ok=True)
    with open(os.path.join(normalize(uri), ".lock"), "a+") as lock:  # "a+": a loser truncates nothing
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or command
            raise LockHeld(f"another {holder} is writing {uri}: wait for it to end, "
                           "or use another --workdir", holder) from None
        except OSError as e:  # Lustre without -o flock says ENOSYS, some FUSE mounts EOPNOTSUPP
            # (macOS's ENOTSUP is another number than its EOPNOTSUPP)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            raise UsageError(f"cannot lock {uri}: its filesystem offers no file locks ({e.strerror}; NFS "
                             "without lockd?): use a --workdir on s3://, which has its own lease, or mount "
                             "it with locks (on one machine, a local disk does)") from None
        lock.truncate(0)  # who holds it, for the message of a run refused meanwhile
        lock.write(f"{command} (pid {os.getpid()} on {socket.gethostname()})")
        lock.flush()
        yield


def check_free(uri: str, command: str) -> bool:
    """The UsageError `exclusive` would raise now, if any: so that a command refused for
    another's lock fails before it changes anything (WORKDIR/config.yaml). False when
    this cannot tell yet: an S3 lock held by a driver on a Ray cluster, which only a run
    on that cluster can see is dead or alive."""
    if is_s3(uri):
        from deepfake_ray import lease

        return lease.check_free(uri, command)
    if os.path.exists(os.path.join(normalize(uri), ".lock")):
        with exclusive(uri, command):
            pass
    return True


def check_not_held(uri: str, command: str) -> None:
    """check_free, where a local work directory this user cannot open counts as free (its
    write says so, where it matters)."""
    try:
        check_free(uri, command)
    except OSError:
        if is_s3(uri):
            raise


def check_folder(uri: str, command: str) -> None:
    """UsageError when a file (or a link to nothing) has the name of a folder `command`
    writes in: the OS refused it with a traceback, some only after a whole ingest. S3
    holds a key and keys under it side by side."""
    path = normalize(uri)
    if not is_s3(uri) and os.path.lexists(path) and not os.path.isdir(path):
        what = f"a link to {os.readlink(path)}, which does not exist" if not os.path.exists(path) else \
            "a link to a file" if os.path.islink(path) else "a file"
        raise UsageError(f"{uri} is {what}, not a folder, and {command} writes its outputs "
                         "there: move it away, or pass another --workdir")


def check_workdir(uri: str) -> None:
    """UsageError for a local work directory the OS cannot look up (a name too long, a loop
    of links, a folder on the way that may not be searched): its first read failed with a
    traceback. One that does not exist yet is made by the first write."""
    if not is_s3(uri) and (refused := os_refusal(normalize(uri), os.stat)):
        raise UsageError(f"--workdir {uri} cannot be used ({refused.strerror or type(refused).__name__}): "
                         "pass another folder")


def os_refusal(path: str, look) -> OSError | None:
    """Why the OS refuses `look(path)` (os.stat, or listing: no permission, a loop of links,
    a name too long), else None; also None where the path does not exist or lies under a
    file, which the callers' own checks say in their words."""
    try:
        look(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return e
    return None


def list_folder(path: str) -> None:
    """os_refusal's `look` for a folder that must be listed."""
    os.scandir(path).close()


def delete_file(uri: str) -> bool:
    """Whether there was a file to delete."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    if is_s3(uri):
        s3_delete(uri, [s3.s3_client(uri)[2]])
    else:
        fs.delete_file(path)
    return True


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        # the marker first: a deletion cut short leaves none vouching for the rest
        if delete_file(join(uri, COMPLETE)):  # a complete stage's, not a scratch folder
            stage_changed()
        if is_s3(uri):
            s3_delete(uri, s3_keys_under(uri))
        elif os.path.islink(path):  # a folder put on another disk: removing the link left its
            empty_folder(path)  # files there, and the stage wrote anew on the workdir's disk
        else:
            fs.delete_dir(path)


def empty_folder(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# S3 through boto3, not pyarrow: pyarrow's delete and move leave an empty "folder" object
# (`data/`, `data/.images-new/`) in place of the last one they remove from a prefix.
def s3_keys_under(uri: str) -> list[str]:
    """Every key under the prefix `uri`, folder objects (`x/`) included."""
    client, bucket, key = s3.s3_client(uri)
    with s3.store_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix(key))
        return [o["Key"] for page in pages for o in page.get("Contents", ())]


def s3_delete(uri: str, keys: list[str]) -> None:
    """`keys` of the bucket of `uri`, one DeleteObject each, WRITERS at once: DeleteObjects
    needs a Content-MD5 on some S3-compatible stores (older MinIO, some Ceph), which
    botocore no longer sends (a CRC32 instead), and a stage's folder holds few objects."""
    from concurrent.futures import ThreadPoolExecutor

    client, bucket, _ = s3.s3_client(uri)
    with s3.store_errors(uri), ThreadPoolExecutor(min(WRITERS, len(keys)) or 1) as pool:
        for _ in pool.map(lambda key: client.delete_object(Bucket=bucket, Key=key), keys):
            pass  # raises the first failure


def s3_move(uri: str, new_uri: str) -> None:
    client, bucket, key = s3.s3_client(uri)
    _, new_bucket, new_key = s3.s3_client(new_uri)
    with s3.store_errors(uri):
        client.copy_object(Bucket=new_bucket, Key=new_key, CopySource={"Bucket": bucket, "Key": key})
        client.delete_object(Bucket=bucket, Key=key)


# Stages this process has unmarked or marked complete: once one has, a run refused later
# has changed the work directory (cli puts config.yaml back only when none has).
marker_changes = 0


def stage_changed() -> None:
    global marker_changes
    marker_changes += 1


def unmark(stage_uri: str) -> None:
    """The stage is no longer complete: its outputs are about to change. Temporary files
    that a killed run left in its folder go too (write_bytes removes its own otherwise)."""
    stage_changed()
    delete_file(join(stage_uri, COMPLETE))
    delete_temporaries(stage_uri)


TEMPORARY = re.compile(r"\.tmp-[a-z0-9_]{8}")  # write_bytes' names (tempfile.mkstemp's)


def delete_temporaries(folder: str) -> None:
    """Locally: write_bytes' files under `folder`, which a process killed while writing
    left (on S3 an unfinished upload is no object). Called under the work directory's
    lock: no live run is writing them."""
    if is_s3(folder):
        return
    for root, _, names in os.walk(normalize(folder)):
        for name in names:
            if TEMPORARY.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))


def replace_dir(uri: str, new: str) -> None:
    """`uri` holds what `new` held (then gone): so a stage can make its outputs beside the
    previous ones and drop those only once the new are good. Locally one rename; on S3 a
    copy within the store per object (a stage's few Parquet parts)."""
    delete_dir(uri)
    fs, source = resolve(new)
    _, target = resolve(uri)
    if not is_s3(uri):
        delete_file(uri)  # a file of that name: a stage's own folder holds nothing of the user's
        if fs.get_file_info(source).type != pafs.FileType.Directory:
            return
        if os.path.islink(target) and os.path.isdir(target):  # the link stays, as delete_dir's
            for name in os.listdir(source):  # another disk: each moved, copied if need be
                shutil.move(os.path.join(source, name), os.path.join(os.path.realpath(target), name))
            os.rmdir(source)
        else:
            os.replace(source, target)
        return
    for file in list_files(new):
        s3_move(file, "s3://" + target + resolve(file)[1][len(source):])
    s3_delete(new, s3_keys_under(new))  # folder objects, which runs before 2026-12-05 left


def mark_complete(stage_uri: str, summary: dict, is_stage: bool = True) -> None:
    """Written last: a stage whose folder holds this marker is complete and is skipped.
    `is_stage=False`: a folder no stage reads as its output (a source's copy), whose
    marker is no change to a stage's output (`stage_changed`)."""
    if is_s3(stage_uri):
        from deepfake_ray import lease

        lease.check_fresh(stage_uri)  # no marker vouching for files another run may be rewriting
    if is_stage:
        stage_changed()
    write_json(join(stage_uri, COMPLETE), summary)


def completed(stage_uri: str) -> dict | None:
    """The stage's marker, or None while it is not complete. A damaged marker (it is written
    atomically, so only something else can damage it) vouches for nothing: not complete."""
    try:
        done = read_json(join(stage_uri, COMPLETE))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file where a folder would be
        return None
    except ValueError:  # not JSON, or not UTF-8
        done = None
    except OSError as e:  # the store's own is explained where S3 failures are
        if is_s3(stage_uri):
            raise
        fix = {errno.EACCES: "give it read permission", errno.EPERM: "give it read permission",
               errno.EISDIR: "a folder has the name of the stage's marker: move it away"}.get(e.errno, "check it")
        raise UsageError(f"cannot read {join(stage_uri, COMPLETE)} ({e.strerror or type(e).__name__}): "
                         f"{fix}, or pass another --workdir") from None
    if not isinstance(done, dict):
        say_damaged_once(join(stage_uri, COMPLETE))
        return None
    return done


DAMAGED_SAID: set[str] = set()


def say_damaged_once(marker: str) -> None:
    """A damaged marker, said once a process (a command asks about a stage many times):
    the stage is made again, and so every stage after it, which would otherwise puzzle."""
    if marker not in DAMAGED_SAID:
        DAMAGED_SAID.add(marker)
        warn(f"warning: {marker} is damaged (not a JSON object): its stage counts as not "
             "complete: a run makes it again")
