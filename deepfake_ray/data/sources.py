"""Where face images come from: a local folder, s3://, Kaggle, or the built-in sample.

`resolve_source` turns a source string into either a list of file URIs (folders,
buckets, Kaggle downloads) or a sample count; ingest then treats all of them alike.
Also the guards against a work directory inside a source or another run's stage folders
where a workdir is made; a Kaggle dataset's download is kaggle_source's.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from PIL import features

from deepfake_ray import storage
from deepfake_ray.config import DataConfig
from deepfake_ray.data import kaggle_source, sample
from deepfake_ray.errors import UsageError
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
        if not (copied or kaggle_source.kaggle_cached(text, data)):
            if problem := kaggle_source.kaggle_credentials_problem():
                raise UsageError(problem)
            kaggle_source.cache_folder(kaggle_source.kaggle_dataset(text, data), data.cache_dir)  # where it will download
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
        dataset = kaggle_source.kaggle_dataset(text, data)
        folder = kaggle_source.kaggle_download(dataset, data.cache_dir)
        if not (files := find_images(folder)):
            raise UsageError(f"the Kaggle dataset {dataset} holds no {'/'.join(image_suffixes())} files "
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
    return UsageError(f"no {'/'.join(image_suffixes())} files under '{text}': check the path "
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
        return "kaggle/" + kaggle_source.kaggle_dataset(text, data)
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
