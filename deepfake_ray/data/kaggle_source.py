"""A `kaggle:OWNER/DATASET` source: its credentials (checked, never printed), its download
into a cache folder (once, under a lock, reused), and the unzipping of its archives
(damaged or hostile members refused, each with its reason)."""
from __future__ import annotations

import contextlib
import copy
import errno
import filecmp
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import sys
import zipfile
import zlib
from collections.abc import Iterator

from deepfake_ray import progress, storage
from deepfake_ray.config import DataConfig
from deepfake_ray.errors import UsageError, disk_full


CREDENTIALS_FIX = ("save your API token as ~/.kaggle/access_token or ~/.kaggle/kaggle.json (chmod 600), "
                   "or set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY (kaggle.com > Settings > "
                   "API > Create New Token); or run `kaggle auth login`")
# what the client (kaggle 2.x) signs in with, in ~/.kaggle whatever KAGGLE_CONFIG_DIR says:
# API tokens, and `kaggle auth login`'s OAuth credentials
KAGGLE_HOME_FILES = ("access_token", "access_token.txt", "credentials.json")


def kaggle_config_dir() -> str:
    """The one folder whose kaggle.json the client reads, chosen as it chooses it."""
    if folder := os.environ.get("KAGGLE_CONFIG_DIR"):
        return folder
    home = os.path.expanduser("~/.kaggle")
    if os.path.exists(home) or not sys.platform.startswith("linux"):
        return home
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "kaggle")


def kaggle_credentials_problem() -> str | None:
    """What is wrong with the Kaggle credentials, as far as can be told before Ray starts
    and without the network (the client's own sign-in tells the rest), or None. Never
    their values."""
    env = {name: bool(os.environ.get(name)) for name in ("KAGGLE_USERNAME", "KAGGLE_KEY")}
    if os.environ.get("KAGGLE_API_TOKEN") or all(env.values()):
        return None
    if any(os.path.isfile(os.path.expanduser(f"~/.kaggle/{name}")) for name in KAGGLE_HOME_FILES):
        return None
    if os.path.isfile(token := os.path.join(kaggle_config_dir(), "kaggle.json")):
        return kaggle_json_problem(token, env)
    if any(env.values()):
        missing, given = sorted(env, key=env.get)
        return (f"{missing} is not set, though {given} is: set both, from your API token (kaggle.com > "
                "Settings > API > Create New Token)")
    return f"no Kaggle credentials: {CREDENTIALS_FIX}"


def kaggle_json_problem(path: str, env: dict[str, bool]) -> str | None:
    """A kaggle.json the client cannot sign in with: not JSON, or without a username or
    key that the environment does not give either."""
    try:
        with open(path, "rb") as f:
            token = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else "not valid JSON"
        return f"{path} cannot be used ({why}): {CREDENTIALS_FIX}"
    fields = {"username": "KAGGLE_USERNAME", "key": "KAGGLE_KEY"}
    lacking = [f'"{name}"' for name, var in fields.items()
               if not (isinstance(token, dict) and isinstance(token.get(name), str) and token[name]) and not env[var]]
    return f"{path} has no {' or '.join(lacking)}: {CREDENTIALS_FIX}" if lacking else None


def kaggle_dataset(text: str, data: DataConfig) -> str:
    """OWNER/DATASET named by a `kaggle[:NAME]` source (data.kaggle_dataset when bare):
    checked, as it names folders in the cache and the work directory."""
    dataset = text.strip().partition(":")[2] or data.kaggle_dataset
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) or {".", ".."} & set(dataset.split("/")):
        raise UsageError(f"kaggle dataset '{dataset}' must look like OWNER/DATASET, "
                         "e.g. kaggle:greg115/celebrities-100k")
    return dataset


def kaggle_folder(dataset: str, cache_dir: str) -> str:
    """Where OWNER/DATASET (checked) is, or will be, cached, unzipped."""
    return os.path.join(os.path.expanduser(cache_dir), "kaggle", *dataset.split("/"))


def kaggle_cached(text: str, data: DataConfig) -> bool:
    """Whether this machine's cache holds the whole download of a `kaggle[:NAME]` source."""
    folder = kaggle_folder(kaggle_dataset(text, data), data.cache_dir)
    return os.path.exists(os.path.join(folder, ".complete"))


def cache_folder(dataset: str, cache_dir: str) -> str:
    """kaggle_folder, created: one line where data.cache_dir cannot hold it."""
    if not cache_dir.strip():
        raise UsageError("data.cache_dir is empty: set it to the folder that keeps downloads, "
                         "e.g. ~/.cache/deepfake-ray")
    if "://" in cache_dir:  # os.makedirs would make a local folder `s3:`
        raise UsageError(f"data.cache_dir={cache_dir}: the Kaggle download is kept on this machine's "
                         "disk: set a local folder, e.g. ~/.cache/deepfake-ray (with an s3:// work "
                         "directory, a cluster's prepare copies it to WORKDIR/sources/ itself)")
    folder = kaggle_folder(dataset, cache_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only disk
        raise UsageError(f"data.cache_dir {cache_dir} cannot hold the Kaggle download ({e.strerror or e}): "
                         "set data.cache_dir to a folder you can write to") from None
    return folder


def kaggle_download(dataset: str, cache_dir: str) -> str:
    """Download OWNER/DATASET once into the cache (unzipped) and return the folder;
    check_source has checked the name and the credentials."""
    folder = cache_folder(dataset, cache_dir)
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):  # complete, so never changed again: read without the lock (a read-only cache)
        print(f"using cached Kaggle dataset {dataset} in {folder}")
        return folder
    with cache_lock(folder, dataset):
        if os.path.exists(done):
            print(f"using cached Kaggle dataset {dataset} in {folder}")
            return folder
        if downloaded_earlier(folder):
            print(f"extracting the Kaggle dataset {dataset} downloaded earlier into {folder}")
        else:
            download(dataset, folder)  # the client resumes a zip an interrupted run left
        unzip_all(folder, dataset)
        with open(done, "w") as f:
            f.write(dataset + "\n")
    return folder


@contextlib.contextmanager
def cache_lock(folder: str, dataset: str):
    """One prepare at a time downloads and extracts a dataset into the cache (two work
    directories can read one dataset): another waits, then finds it cached. The OS frees
    the lock when its holder ends, even killed."""
    import fcntl

    locked = False
    path = folder.rstrip("/") + ".lock"  # beside the folder: not in its listing
    try:  # refused: read-only, another user's lock file, NFS without locks (ENOLCK)
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another prepare downloading the Kaggle dataset {dataset} into {folder}",
                      flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            locked = True
            yield
    except OSError as e:
        if locked:  # the download's own error
            raise
        raise UsageError(f"cannot lock {path} for the download ({e.strerror or type(e).__name__}): "
                         "set data.cache_dir to a folder of yours on a local disk") from None


def downloaded_earlier(folder: str) -> bool:
    """Whether `folder` holds a whole download, or what was extracted of one, that an
    earlier run could not finish extracting (its zips, at any depth, all whole). A zip the
    client is still writing (its `.kaggle-partial` marker beside it, or no zip's end yet) is
    not one: taken for damaged, it would be deleted instead of resumed."""
    if any(n.endswith(".kaggle-partial") for n in os.listdir(folder)):
        return False
    zips = zips_under(folder)
    return bool(zips) and all(zipfile.is_zipfile(z) for z in zips)


def zips_under(folder: str) -> list[str]:
    """Zips under `folder`, outside hidden folders (an extraction in progress)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(".zip")]
    return found


def download(dataset: str, folder: str) -> None:
    api = kaggle_api()
    print(f"downloading Kaggle dataset {dataset} into {folder} ...", flush=True)
    try:
        api.dataset_download_files(dataset, path=folder, quiet=not progress.bars_wanted(), unzip=False)
    except Exception as e:  # noqa: BLE001 - the client raises many kinds; name the fix
        if disk_full(e) or isinstance(e, UsageError):  # a full disk, with its fix (the client resumes
            raise  # the zip after); or ours, delivered into the call (an S3 lease taken over)
        raise UsageError(f"Kaggle download of {dataset} failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}): {download_fix(e)}")


def download_fix(e: Exception) -> str:
    """What to do about a failed download, by the HTTP status Kaggle answered, if any: a
    key signs in without a request, so a revoked one is first refused here."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return ("Kaggle refused the credentials or the access: check your API token (making a "
                "new one on kaggle.com expires the old) and that you accepted the dataset's rules")
    if status == 404:
        return "no such dataset, or a private one: check the name (kaggle:OWNER/DATASET)"
    if status == 429 or (isinstance(status, int) and status >= 500):
        return "Kaggle is busy or failing: run the same command again later (the download resumes)"
    return "check the dataset name, that you accepted its rules on kaggle.com, and your network"


# A zip Python's zipfile cannot extract: damaged (a bad header, bad compressed data, cut
# short), or encrypted or compressed in a way it does not read (Deflate64, as Windows writes)
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError)
UNEXTRACTABLE = (*DAMAGED, RuntimeError, NotImplementedError)


def unzip_all(folder: str, dataset: str) -> None:
    """Extract every zip under `folder`, zips inside zips too, and delete it. A damaged
    download empties the folder (with what was extracted of it), so the next run downloads
    it anew instead of trusting any of it; a zip that could not be extracted for want of
    disk space is kept, and the next run extracts it. A zip the dataset itself holds that
    cannot be extracted is left out with a note: downloading again would bring it back."""
    download = os.path.join(folder, dataset.split("/")[1] + ".zip")  # as the Kaggle client names it
    for _ in range(4):  # levels of zips in zips; a zip that holds itself stops here
        for path in zips_under(folder):
            name = storage.shown(os.path.relpath(path, folder))  # a nested zip's own name: escapes shown
            try:
                left_out, renamed = extract(path)
            except UNEXTRACTABLE as e:
                if path == download:
                    refuse_download(folder, dataset, path, e)
                print(f"prepare: left out {name} of the Kaggle dataset {dataset}: "
                      f"a zip that cannot be extracted ({zip_error(e)}); its files are not read")
            else:
                if left_out:
                    first, why = left_out[0]
                    print(f"prepare: left out {len(left_out):,} of the files in {name} "
                          f"of the Kaggle dataset {dataset}, which cannot be written on this disk (first "
                          f"{storage.printable(first)[:120]!r}: {why}); the others are read")
                if renamed:
                    first, new = renamed[0]
                    print(f"prepare: {len(renamed):,} of the files in {name} of the Kaggle "
                          f"dataset {dataset} share a name with another of its files on this disk (repeated, or "
                          f"differing only in case): each is kept under a new name (first "
                          f"{storage.printable(first)[:120]!r} as {storage.printable(new)[:120]!r})")
            os.remove(path)


def zip_error(e: Exception) -> str:
    """zipfile's error, a member named by its name (not its whole ZipInfo)."""
    return f"{type(e).__name__}: " + re.sub(r"<ZipInfo filename=('[^']*')[^>]*>", r"\1", str(e))


def refuse_download(folder: str, dataset: str, path: str, e: Exception) -> None:
    name = os.path.basename(path)
    if not isinstance(e, DAMAGED):  # downloading again brings the same zip
        raise UsageError(f"the Kaggle download of {dataset} is a zip Python cannot extract ({name}: "
                         f"{zip_error(e)}): extract it with another tool into {folder}, then "
                         f"create {os.path.join(folder, '.complete')}") from e
    shutil.rmtree(folder)
    os.makedirs(folder)
    raise UsageError(f"the Kaggle download of {dataset} holds a damaged zip ({name}: {e}); it was "
                     "deleted: run again to download it anew") from e


def check_room(path: str, z: zipfile.ZipFile, folder: str) -> None:
    """UsageError, before writing anything, for a zip whose members add up to more than the
    disk has free: a zip bomb (or a dataset too large for it) would fill the disk first,
    on every rerun. A member's stated size bounds what zipfile writes of it."""
    unpacked = sum(member.file_size for member in z.infolist())
    free = shutil.disk_usage(folder).free
    if unpacked > free:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"{path} unpacks to {unpacked / 1e9:,.1f} GB, more than the {free / 1e9:,.1f} GB free "
                         "on its disk: free disk space or set data.cache_dir to a larger disk, then run "
                         "again: the download is kept")


# What the disk says of one member's name, before writing any of it (too long, a file where
# the zip also holds a folder of that name, characters it does not take). Any other error is
# the disk's own (full, read-only, a network share gone stale): the zip is kept for a rerun.
MEMBER_ERRORS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EINVAL, errno.EILSEQ}


def extract(path: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`path`'s members beside it, put in place only once all are out: extracted into a
    hidden folder first, so an interrupted extraction leaves no cut-off member (a zip in
    the zip) for the next run to take for a damaged download. Nothing already there is
    replaced by other bytes: where a member would land on such a file (two zips in the
    zip with one layout, a zip holding one named like itself), all of them go into a
    folder named after the zip. Returns the members left out, and why: those this disk
    cannot hold as named (a name too long, a file where the zip also holds a folder of
    that name); and those renamed (extract_members). Raises UNEXTRACTABLE's."""
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.extracting")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted run's
    try:
        os.makedirs(staging)  # an empty zip makes none
        with zipfile.ZipFile(path) as z:
            check_room(path, z, staging)
            left_out, renamed = extract_members(z, staging)
    except OSError as e:  # this machine's: a full disk, no permission
        shutil.rmtree(staging, ignore_errors=True)
        fix = ("free disk space or set data.cache_dir to a larger disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check that data.cache_dir is a folder you can write to, or set another")
        raise UsageError(f"could not extract {path} ({e.strerror or e}): {fix}, then run again: the "
                         "download is kept") from e
    except UNEXTRACTABLE:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    place = os.path.dirname(path)
    if would_overwrite(staging, place):
        place = next(p for p in names_like(path[:-len(".zip")]) if not would_overwrite(staging, p))
    for root, _, names in os.walk(staging):  # renames within one disk: no space needed
        folder = os.path.join(place, os.path.relpath(root, staging))
        os.makedirs(folder, exist_ok=True)
        for name in names:
            os.replace(os.path.join(root, name), os.path.join(folder, name))
    shutil.rmtree(staging)
    return left_out, renamed


def extract_members(z: zipfile.ZipFile, into: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All of `z` into `into` (member names cannot climb out). Returns the members the disk
    refused by their names, with the reason, left out; and those renamed, with their new
    names: a zip may hold one name twice, or names differing only in case, which a
    case-insensitive disk (macOS's) takes for one, and extracting overwrote the first."""
    def taken(name: str) -> bool:
        return os.path.lexists(os.path.join(into, member_path(name)))

    left_out, renamed = [], []
    for member in z.infolist():
        if not member.is_dir() and taken(member.filename):
            member = copy.copy(member)  # zipfile reads it by its header's name, kept in orig_filename
            stem, ext = posixpath.splitext(member.filename)
            member.filename = next(f"{s}{ext}" for s in names_like(stem) if not taken(f"{s}{ext}"))
            renamed.append((member.orig_filename, member.filename))
        try:
            z.extract(member, into)
        except OSError as e:
            if e.errno not in MEMBER_ERRORS:
                raise
            left_out.append((member.filename, e.strerror or type(e).__name__))
    return left_out, renamed


def member_path(name: str) -> str:
    """Where zipfile extracts a member of that name, below the folder: its parts without
    the empty, `.` and `..` ones."""
    return os.path.join(*[part for part in name.split("/") if part not in ("", ".", "..")] or ["."])


def would_overwrite(staging: str, place: str) -> bool:
    """Whether moving what `staging` holds into `place` would replace a file there with
    other bytes, or need a folder where a file is. The same bytes are no loss: an
    extraction interrupted while it moved its files, extracted again."""
    if os.path.lexists(place) and not os.path.isdir(place):
        return True
    for root, dirs, names in os.walk(staging):
        there = os.path.join(place, os.path.relpath(root, staging))
        for name in dirs:
            if os.path.lexists(folder := os.path.join(there, name)) and not os.path.isdir(folder):
                return True
        for name in names:
            if os.path.lexists(file := os.path.join(there, name)) and not same_bytes(os.path.join(root, name), file):
                return True
    return False


def same_bytes(a: str, b: str) -> bool:
    return os.path.isfile(b) and not os.path.islink(b) and filecmp.cmp(a, b, shallow=False)


def names_like(base: str) -> Iterator[str]:
    """`base`, `base-2`, `base-3`, ..."""
    yield base
    yield from (f"{base}-{n}" for n in itertools.count(2))


def kaggle_api():
    """Imported lazily: `import kaggle` authenticates at import time. Its output is
    swallowed so nothing it prints (which may echo configuration) reaches logs. The client
    calls exit(1) when no credentials it finds are usable (a kaggle.json without its key, an
    expired token): one line with the fix instead, never their values."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
    except SystemExit:
        raise UsageError("the Kaggle credentials found are not usable (a kaggle.json without its "
                         f"\"key\", an expired token?): {CREDENTIALS_FIX}") from None
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - its message may quote the configuration: not shown
        raise UsageError(f"the Kaggle client could not sign in ({type(e).__name__}): check the "
                         f"network, then the credentials: {CREDENTIALS_FIX}") from None
    return api
