"""Where face images come from: a local folder, s3://, Kaggle, or the built-in sample.

`resolve_source` turns a source string into either a list of file URIs (folders,
buckets, Kaggle downloads) or a sample count; ingest then treats all of them alike.
Also: Kaggle credentials, download and unzipping, and the guards against a work
directory inside a source or another run's stage folders where a workdir is made.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import filecmp
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import stat
import sys
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from PIL import features

from deepfake_ray import progress, storage
from deepfake_ray.config import DataConfig
from deepfake_ray.data import sample
from deepfake_ray.errors import UsageError, disk_full
from deepfake_ray.lineage import STARTED


def image_suffixes() -> tuple[str, ...]:
    # .jfif and .jpe are JPEGs by other names (Chrome on Windows saves JPEGs as .jfif)
    suffixes = (".jpg", ".jpeg", ".jfif", ".jpe", ".png")
    return suffixes + ((".webp",) if features.check("webp") else ())


@dataclass(frozen=True)
class Source:
    name: str  # as the user wrote it
    files: tuple[str, ...] = ()  # URIs of candidate image files
    sample_count: int = 0  # > 0 for the built-in generator
    root: str = ""  # the folder or prefix that `files` lie under
    # files of `files` not read where they were listed (copy_to): URI -> the read's error
    unread: dict = field(default_factory=dict, compare=False)
    # folders or prefixes at or under `root` that are work directories (see workdirs_in)
    workdirs: tuple[str, ...] = ()
    # an S3 prefix's files -> their sizes, as listed (a local folder's are not listed)
    sizes: dict = field(default_factory=dict, compare=False)
    # the other files listed, left out for their names (a .bmp, a .txt): said, not read
    others: tuple[str, ...] = field(default=(), compare=False)


FORMS = "a folder of images, s3://bucket/prefix, kaggle:OWNER/DATASET or sample[:N]"


def kind(text: str) -> str:
    """"sample", "kaggle" or "path" (a folder or s3:// prefix); ` sample:040` is the sample."""
    text = text.strip()
    for name in ("sample", "kaggle"):
        if text == name or text.startswith(name + ":"):
            return name
    return "path"


def as_given(text: str) -> str:
    """The source stripped where it names the sample or Kaggle (a script's variable pads
    it), a path as typed: a folder's name may end in a space (an unzipped archive's)."""
    return text if kind(text) == "path" and text.strip() else text.strip()


def canonical(text: str) -> str:
    """The source as it names the same data on every run: local folders absolute, and
    `sample:050` as `sample:50` (`sample:` or `kaggle:` with no name, which check_source
    refuses, as the bare word). On macOS, whose disks take `é` typed (NFC) and pasted from
    Finder (NFD) for one name, a folder in NFC: the same folder is the same source."""
    text = as_given(text)
    if text and kind(text) == "path":
        path = storage.normalize(text)
        return unicodedata.normalize("NFC", path) if sys.platform == "darwin" and not storage.is_s3(path) else path
    count = text.partition(":")[2]
    if kind(text) == "sample" and count.isascii() and count.isdigit():
        return f"sample:{int(count)}"
    return text.removesuffix(":")


def respelled(text: str) -> str | None:
    """`Sample:100`, `KAGGLE` or `sampel:100` as the source it was meant to name, else None."""
    import difflib

    scheme, colon, rest = text.partition(":")
    if "/" in scheme or "\\" in scheme:  # a path
        return None
    near = difflib.get_close_matches(scheme.lower(), ("sample", "kaggle"), n=1, cutoff=0.7)
    return near[0] + colon + rest if near else None


def check_source(text: str, data: DataConfig, copied: bool = False) -> None:
    """What can be checked before any Ray process starts or any file is listed: a bad
    source fails in a second, not after Ray's start-up. `copied`: a Kaggle dataset's
    complete copy is in the work directory, so no download (nor credentials) is needed."""
    text = as_given(text)
    if not text:
        raise UsageError(f"no source given: pass --source (or data.source) as {FORMS}")
    if kind(text) != "path" and text.endswith(":"):  # `kaggle:$DATASET` of an unset variable
        example = "kaggle:OWNER/DATASET" if kind(text) == "kaggle" else "sample:N"
        raise UsageError(f"source '{text}' names nothing after its colon (an unset variable?): "
                         f"write {example}, or {kind(text)} alone for the default")
    if text in ("sample", "kaggle") and os.path.isdir(text):  # the word wins: a silent swap
        what = "sample faces the tool draws" if text == "sample" else "Kaggle download"
        raise UsageError(f"source '{text}' names the built-in {what}, but ./{text} is also a folder "
                         f"here: pass ./{text} for the folder's images, or run from another folder")
    if kind(text) == "sample":
        sample.parse(text, data.sample_size)
        return
    if kind(text) == "kaggle":
        if not (copied or kaggle_cached(text, data)):
            if problem := kaggle_credentials_problem():
                raise UsageError(problem)
            cache_folder(kaggle_dataset(text, data), data.cache_dir)  # where it will download
        return
    storage.check_s3_path(text, forms=FORMS, source=True)
    # one it may not list would miss every file after Ray's start; a loop of links or a name
    # too long would read as missing
    if not storage.is_s3(text) and (refused := storage.os_refusal(storage.normalize(text), storage.list_folder)):
        fix = "give your user read access to it" if isinstance(refused, PermissionError) else "check the path"
        raise UsageError(f"source '{text}' cannot be read ({refused.strerror or type(refused).__name__}): {fix}")
    if not storage.is_dir(text):  # one request where all is well
        if not storage.exists(text):
            if storage.is_s3(text) and storage.bucket_missing(text):
                raise UsageError(f"source '{text}': the bucket {text[5:].split('/')[0]} does not exist: "
                                 "check the s3:// path (and AWS_ENDPOINT_URL, for another store)")
            if meant := respelled(text):
                raise UsageError(f"source '{text}' does not exist: did you mean '{meant}'? "
                                 "(the sample and kaggle sources, in lower case)")
            raise UsageError(f"source '{text}' does not exist: pass {FORMS}")
        raise UsageError(f"source '{text}' is a file: pass the folder that holds the images")


def resolve_source(text: str, data: DataConfig) -> Source:
    """The source's files (listed, Kaggle's downloaded once) or sample count."""
    check_source(text, data)
    text = as_given(text)
    if kind(text) == "sample":
        return Source(text, sample_count=sample.parse(text, data.sample_size))
    if kind(text) == "kaggle":
        dataset = kaggle_dataset(text, data)
        folder = kaggle_download(dataset, data.cache_dir)
        if not (files := find_images(folder)):
            raise UsageError(f"the Kaggle dataset {dataset} holds no .jpg/.jpeg/.png/.webp files "
                             f"(downloaded into {folder}): check the dataset name")
        return Source(text, files=files, root=folder)
    listing = source_listing(text)
    if not (files := images_in(listing)):
        raise no_images(text)
    root = storage.normalize(text)
    sizes = {f: listing[f] for f in files} if storage.is_s3(root) else {}
    return Source(text, files=files, root=root, workdirs=workdirs_in(listing), sizes=sizes,
                  others=others_in(listing, files))


def check_has_images(text: str) -> None:
    """A folder that holds no image file, refused before Ray starts: listed once a command
    (`listed_once`), so the run that follows reads the same listing."""
    if not images_in(source_listing(text)):
        raise no_images(text)


def no_images(text: str) -> UsageError:
    return UsageError(f"no .jpg/.jpeg/.png/.webp files under '{text}': check the path "
                      "(folders are searched recursively; hidden ones are left out)")


# The listings of source folders, while `listed_once` holds: a pipeline asks whether data/
# is current up to five times before its prepare reads the source, and an S3 prefix of
# 100k images lists in 100 requests. Within one command the files are taken as listed once.
_listings: dict[str, dict[str, int | None]] | None = None


@contextlib.contextmanager
def listed_once():
    global _listings
    outer, _listings = _listings, {}
    try:
        yield
    finally:
        _listings = outer


def source_listing(text: str) -> dict[str, int | None]:
    """storage.listing: the visible files -> their sizes on S3."""
    if _listings is None:
        return storage.listing(text)
    key = storage.normalize(text)
    if key not in _listings:
        _listings[key] = storage.listing(text)
    return _listings[key]


def find_images(folder: str) -> tuple[str, ...]:
    """Image files under `folder` by extension, any letter case, recursively. Hidden files
    and folders are left out: `.git`, `.ipynb_checkpoints`, macOS's `._NAME.jpg` (not
    images) hold nothing a user means to train on."""
    return images_in(storage.list_visible(folder))


def images_in(listing: Iterable[str]) -> tuple[str, ...]:
    suffixes = image_suffixes()
    return tuple(f for f in listing if f.lower().endswith(suffixes))


def others_in(listing: dict, images: tuple[str, ...]) -> tuple[str, ...]:
    """The listed files that are not `images` (images_in's): left out for their names."""
    if len(images) == len(listing):  # mostly: no pass over the listing
        return ()
    kept = set(images)
    return tuple(f for f in listing if f not in kept)


STAGE_FOLDERS = ("data", "gan", "fakes", "detector", "tune", "eval", "score")


def workdirs_in(listing: Iterable[str]) -> tuple[str, ...]:
    """Folders or prefixes in the listing that are work directories: each holds the
    config.yaml every run writes and a stage's completion marker, which no user's own
    folder has (a project's config.yaml beside its data/ of photos is not one). A work
    directory holds images only once a stage has completed (data/ first, and a rerun
    unmarks one stage at a time), and its markers survive what its hidden `.lock` does
    not: `cp -r W/*`, an archive of `*`, `aws s3 sync`, and on S3 the run's end."""
    configs = {f.removesuffix("/config.yaml") for f in listing if f.endswith("/config.yaml")}
    if not configs:  # mostly: no pass over the listing
        return ()
    listed = set(listing)
    return tuple(sorted(p for p in configs if is_workdir(p, listed.__contains__)))


def is_workdir(folder: str, has_file) -> bool:
    """Whether `folder` holds config.yaml and a completion marker in a stage's folder,
    asking `has_file(uri)`."""
    return has_file(storage.join(folder, "config.yaml")) and any(
        has_file(storage.join(folder, stage, storage.COMPLETE)) for stage in STAGE_FOLDERS)


def workdir_around(root: str, root_is_one: bool | None = None) -> tuple[str, str] | None:
    """(where, what) for the work directory `root` is (this run's is refused before), or
    the stage folder of any work directory, this run's too, that `root` is or lies inside:
    `--source runs/demo/score` names a run's outputs, fakes too. A user's own folder
    beside a run's stage folders (`~/proj/faces` in a `~/proj` once used as --workdir) is
    neither. `root_is_one`: whether `root` is a work directory, where its listing told."""
    def workdir(folder: str) -> bool:
        try:
            return is_workdir(folder, storage.is_file)
        except OSError:  # S3 refuses to say (credentials for a prefix only): none there
            return False

    root = storage.normalize(root)
    if workdir(root) if root_is_one is None else root_is_one:
        return root, "is the work directory"
    for folder in dict.fromkeys([root, location(root)]):  # a link too
        while (parent := storage.parent(folder)) != folder:
            inside, folder = folder, parent
            if inside.rsplit("/", 1)[-1] in STAGE_FOLDERS and workdir(folder):
                return inside, "is the stage folder" if inside == root else "lies inside the stage folder"
    return None


def stage_folder_holding(root: str, workdir: str) -> str | None:
    """The stage folder of `workdir` that `root` is or lies in, if any: one this run is
    about to write, when it is no run's yet (`--workdir proj --source proj/data/images`
    would lose the photos to prepare's own images once read)."""
    where = location(storage.normalize(root))
    for stage in STAGE_FOLDERS:
        folder = storage.join(storage.normalize(workdir), stage)
        if where == location(folder) or where.startswith(location(folder).rstrip("/") + "/"):
            return folder
    return None


def check_no_foreign_stage_folders(workdir: str, command: str) -> None:
    """UsageError for a work directory no run has written (no config.yaml) where a stage
    folder already holds a user's own files: stages replace what their folders hold
    (prepare's data/images, generate's fakes/, a redo's whole folder), so `--workdir .` in
    a project with a data/images of its own would lose them. What a first run cut short
    left there (hidden staging folders, markers) is its own."""
    workdir = storage.normalize(workdir)
    if runs_config(storage.join(workdir, "config.yaml")):
        return
    for stage in STAGE_FOLDERS:
        folder = storage.join(workdir, stage)
        try:
            names = names_in(folder)
        except NotADirectoryError:  # a file of that name: check_folder says so
            continue
        if any(n in (storage.COMPLETE, STARTED) for n in names):
            continue
        if own := sorted(n for n in names if not n.startswith(".")):
            raise UsageError(f"{folder} already holds files no deepfake-ray run made ({storage.shown(own[0])}"
                             f"{', ...' if len(own) > 1 else ''}), and {command} writes its outputs there, "
                             "replacing what it finds: move them away, or pass another --workdir")


def names_in(folder: str) -> list[str]:
    """The names in a folder, none if it is missing. Locally through the OS: pyarrow fails
    on a name that is not UTF-8 (an old Latin-1 file), which os.listdir keeps as it is."""
    if not storage.is_s3(folder):
        try:
            return os.listdir(storage.normalize(folder))
        except FileNotFoundError:
            return []
    import pyarrow.fs as pafs

    fs, path = storage.resolve(folder)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


def runs_config(uri: str) -> bool:
    """Whether `uri` is the config.yaml a run writes (a mapping naming its workdir and
    stages' sections), not a project's own file of that name."""
    import yaml

    try:
        found = yaml.safe_load(storage.read_text(uri))
    except (OSError, ValueError, yaml.YAMLError):  # none, unreadable, not YAML
        return False
    return isinstance(found, dict) and {"workdir", "data", "gan", "detector"} <= found.keys()


def location(uri: str) -> str:
    """A local folder by where it is, reached through links or not; an S3 prefix as named."""
    return uri if storage.is_s3(uri) else os.path.realpath(uri)


def check_outside_workdirs(text: str, root: str, own: str, root_is_one: bool | None = None) -> None:
    """UsageError for a source that is this run's work directory, another run's, or lies
    inside a work directory's stage folder (see workdir_around)."""
    if location(storage.normalize(root)) == location(storage.normalize(own)):
        # the photos would share a folder with the outputs: read once, then left out as
        # a work directory's own files from the second run on
        raise UsageError(f"--source {text} is also the --workdir, where the run writes its outputs: "
                         "keep the face images in a folder of their own, or pass another --workdir")
    if found := workdir_around(root, root_is_one):
        where, what = found
        raise UsageError(f"{text} {what} {where}, whose images are a run's outputs (fakes, sample "
                         "grids, figures), not real faces: pass a folder of face images as --source")
    if stage := stage_folder_holding(root, own):  # this run's, before it is a work directory
        raise UsageError(f"--source {text} lies inside {stage}, where this run writes its outputs, "
                         "replacing what it finds there: move the face images to a folder of their "
                         "own, or pass another --workdir")


# --- a copy every node of a cluster can read -----------------------------------------

def copy_name(text: str, data: DataConfig) -> str:
    """The source's folder under WORKDIR/sources/: kaggle/OWNER/DATASET, or a local
    folder's name and a hash of its full path (two folders named `faces` stay apart)."""
    if kind(text) == "kaggle":
        return "kaggle/" + kaggle_dataset(text, data)
    path = canonical(text)
    name = storage.printable(os.path.basename(path.rstrip("/")))  # an S3 key is UTF-8
    return f"{name or 'root'}-{hashlib.sha1(os.fsencode(path)).hexdigest()[:8]}"


def local_copies(dest: str) -> dict[str, dict]:
    """s3_objects of a local folder (a cluster's shared mount): each file's size and last
    change, with no hash (as a multipart upload's entry), so compared by those."""
    from datetime import datetime, timezone

    root, found = storage.normalize(dest), {}
    for folder, _, names in os.walk(root):
        for name in names:
            info = os.stat(path := os.path.join(folder, name))
            found[os.path.relpath(path, root).replace(os.sep, "/")] = {
                "Size": info.st_size, "ETag": "local-copy",
                "LastModified": datetime.fromtimestamp(info.st_mtime, timezone.utc)}
    return found


def is_copy_of(copy: dict | None, path: str) -> bool:
    """`copy` (S3's listing entry, or None) holds `path`'s bytes as they are now: by MD5
    where its ETag is one (a single PutObject: files under storage.MULTIPART_BYTES), else
    by size and a last change of the file before the copy's upload (a multipart upload's
    ETag is no file's hash)."""
    try:
        local = os.stat(path)
    except OSError:
        return False  # gone since listed, a link to itself: copy_to finds out which
    if copy is None or copy["Size"] != local.st_size:
        return False
    etag = copy["ETag"].strip('"')
    if "-" not in etag:  # (an encrypted store's ETag is no MD5 either: sent again, safely)
        if not stat.S_ISREG(local.st_mode):  # a pipe would block the hash: send() finds it out
            return False
        try:
            return storage.file_digest(path, "md5") == etag
        except OSError:  # no permission: send() finds it out
            return False
    return copy["LastModified"].timestamp() >= int(local.st_mtime)


def copy_to(src: Source, dest: str, command: str, max_bytes: int | None = None) -> Source:
    """`src`, its files copied from this machine's disk to `dest` (s3://, or a shared
    mount), where the tasks on every node can read them. A file already there with the
    same bytes is not sent again, so a resubmitted job only sends what the killed one had
    not, and a file changed since is sent again. A file that cannot be read here (gone, a
    pipe, a link to itself, no permission, over `max_bytes`) is not sent, but named in
    `unread` with its error, as ingest would have read it."""
    from concurrent.futures import ThreadPoolExecutor

    from deepfake_ray.progress import Progress

    # an S3 key is UTF-8: a name that is not (an old Latin-1 archive's) is copied under
    # the \xNN form the manifest shows it in
    relative = {f: storage.printable(os.path.relpath(f, src.root).replace(os.sep, "/")) for f in src.files}
    there = storage.s3_objects(dest) if storage.is_s3(dest) else local_copies(dest)
    todo = [f for f, rel in relative.items() if not is_copy_of(there.get(rel), f)]
    print(f"{command}: copying {len(todo):,} of {len(relative):,} files from this machine to {dest}, "
          "where every node of the cluster can read them", flush=True)
    done, unread = [], {}

    def send(path: str) -> None:
        try:  # as ingest reads: a pipe is not waited on, a huge file not read
            data = storage.read_bytes(path, max_bytes)
        except (OSError, storage.FileTooLarge) as e:
            unread[path] = e
        else:
            storage.write_bytes(storage.join(dest, relative[path]), data)
        done.append(path)

    with Progress(command, len(todo), "files copied", lambda: len(done)):
        with ThreadPoolExecutor(32) as pool:  # PUTs are latency-bound: overlap them
            list(pool.map(send, todo))
    for path in unread:  # an earlier run's copy is not this file as it is now
        if relative[path] in there:
            storage.delete_file(storage.join(dest, relative[path]))
    return Source(src.name, files=tuple(storage.join(dest, relative[f]) for f in src.files), root=dest,
                  unread={storage.join(dest, relative[f]): e for f, e in unread.items()})


class UnreadBefore(OSError):
    """A file a reused copy lacks: the run that made the copy could not read it, and said
    why (its error's name and text) in the copy's marker."""


def recorded_unread(unread: dict, copy: str) -> dict:
    """copy_to's `unread`, as the marker of the copy in `copy` keeps it (names relative to
    it, so a moved work directory names its own): a later run that reuses the copy, which
    lacks these files, still rejects each, with the same reason."""
    return {uri[len(copy):].lstrip("/"): {"size": e.size, "limit": e.limit} if isinstance(e, storage.FileTooLarge)
            else {"error": f"{type(e).__name__}: {e}"} for uri, e in unread.items()}


def unread_from(record: dict, copy: str) -> dict:
    return {storage.join(copy, name): storage.FileTooLarge(r["size"], r["limit"]) if "size" in r
            else UnreadBefore(r["error"]) for name, r in record.items()}


# --- Kaggle -----------------------------------------------------------------------

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
