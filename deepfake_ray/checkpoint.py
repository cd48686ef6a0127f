"""The one on-disk model format, shared by every stage.

    MODEL_DIR/weights.safetensors   tensors only: loading never unpickles objects
    MODEL_DIR/model.json            architecture, input size, preprocessing, threshold,
                                    class names, config, data fingerprints and the
                                    versions of the software that made it

The training state inside Ray Train checkpoints (`state.pt`) is separate: it is
loaded with `torch.load(weights_only=True)` and verified against a SHA-256 written
after it, so a half-written checkpoint is never trusted.

torch is imported where tensors are read or written, not at the top: Ray Data tasks
that only need metadata (scoring's decode tasks) would otherwise import it in every
fresh worker process, seconds each on a small machine.
"""
from __future__ import annotations

import hashlib
import json
import os

import deepfake_ray
from deepfake_ray import storage
from deepfake_ray.errors import UsageError

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
META = "model.json"


def save_model(uri: str, state_dict: dict, meta: dict) -> None:
    """Weights first, metadata last: a model dir without model.json is incomplete."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    blob = st_save(tensors)
    write_model(uri, blob, {**meta, "format_version": FORMAT_VERSION,
                            "weights_sha256": hashlib.sha256(blob).hexdigest(),
                            "software": deepfake_ray.versions()})


def write_model(uri: str, weights: bytes, meta: dict) -> None:
    """An earlier model's model.json goes first: a crash before the new one is written
    must not leave new weights under old metrics (the best epoch so far would lie)."""
    storage.delete_file(storage.join(uri, META))
    storage.write_bytes(storage.join(uri, WEIGHTS), weights)
    storage.write_json(storage.join(uri, META), meta)


def load_meta(uri: str) -> dict:
    path = storage.join(uri, META)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        if storage.is_s3(uri) and storage.bucket_missing(uri):
            raise UsageError(f"--model {uri}: the bucket does not exist: check the s3:// path") from None
        if storage.exists(storage.join(uri, WEIGHTS)):  # written just before model.json
            raise UsageError(f"{uri} holds weights but no {META}: a train-detector or tune may be "
                             "exporting a model there now (try again once it ends), or the folder "
                             "was copied in part (copy it again)") from None
        raise UsageError(f"no model at {uri} ({META} missing): pass the folder that "
                         "train-detector or tune exported, e.g. WORKDIR/detector/model") from None
    except NotADirectoryError:  # --model .../model/weights.safetensors
        raise UsageError(f"--model {uri} is a file, not a model folder: pass the folder holding "
                         f"it, {storage.parent(uri)}") from None
    except PermissionError as e:  # a teammate's files
        raise unreadable(path, e) from None
    return parse_meta(path, data)


def unreadable(path: str, e: PermissionError) -> UsageError:
    return UsageError(f"cannot read {path} ({e.strerror or 'permission denied'}): give yourself read "
                      "permission on the model folder, or copy it somewhere you can read")


def parse_meta(path: str, data: bytes) -> dict:
    """model.json's description; a damaged one (a partial copy, another file of that name)
    is the user's to mend, not a JSONDecodeError or AttributeError in whichever code reads it."""
    try:
        meta = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} is damaged (not a JSON object: a partial copy?): "
                         "export or copy the model folder again")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:  # its fields may mean other things
        made_by = (meta.get("software") or {}).get("deepfake-ray", "a newer release")
        raise UsageError(f"{path} is model format {version}, made by deepfake-ray {made_by}; this one "
                         f"({deepfake_ray.__version__}) reads format {FORMAT_VERSION}: upgrade deepfake-ray")
    return meta


def stored_quality(meta: dict) -> int | None:
    """The JPEG quality the model's training images were stored at (models exported
    before it was recorded: from their config)."""
    quality = meta.get("jpeg_quality", meta.get("config", {}).get("data", {}).get("jpeg_quality"))
    return None if quality is None else int(quality)


def load_detector_meta(uri: str) -> dict:
    """load_meta of a model that must be a detector: another model (the DCGAN's generator,
    also in a folder named model/) would fail deep inside a replica or scoring actor."""
    meta = load_meta(uri)
    if not {"arch", "threshold", "class_names"} <= meta.keys():
        raise UsageError(f"{uri} holds a {meta.get('arch', 'model')} model, not a detector: pass the "
                         "folder train-detector or tune exported, e.g. WORKDIR/detector/model")
    pre = meta.get("preprocessing")
    missing = [k for k in ("resolution", "input_size", "weights_sha256") if k not in meta] + \
        [f"preprocessing.{k}" for k in ("mean", "std") if not isinstance(pre, dict) or k not in pre]
    if missing:  # else a service that answers every upload with a 500
        raise UsageError(f"{storage.join(uri, META)} lacks {', '.join(missing)} (written by hand, or "
                         "by another tool?): pass the folder train-detector or tune exported")
    check_threshold(uri, meta["threshold"])
    return meta


def check_threshold(uri: str, threshold) -> None:
    """model.json's threshold may be edited by hand (README): NaN labelled every image
    "real" (p >= NaN is False) and broke the JSON answer; 50 (meant as a percent) did the
    same silently; "0.8" served but crashed evaluate."""
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (number and 0 <= threshold <= 1):
        raise UsageError(f"{storage.join(uri, META)} has threshold {json.dumps(threshold)}: it must be a "
                         "number from 0 to 1 (p_fake at or above it is labelled fake), e.g. 0.5")


def check_detector(uri: str) -> dict:
    """load_detector_meta, with the weights checked against their hash: what `score` and
    `serve` check before Ray starts. Damaged weights (a truncated copy) were found only
    inside a scoring actor or a replica, as a traceback of Ray's."""
    meta = load_detector_meta(uri)
    check_weights(uri, meta)
    check_arch(uri, meta)
    return meta


def check_arch(uri: str, meta: dict) -> None:
    """An architecture this timm lacks fails in every replica or actor, as Ray's traceback.
    A model made with the installed timm names one it knows: only another's is looked up,
    as importing timm (and torch) adds seconds to the start of `score` and `serve`."""
    from importlib.metadata import version

    installed = version("timm")
    if (meta.get("software") or {}).get("timm") == installed:
        return
    import timm

    if not timm.is_model(meta["arch"]):
        raise UsageError(f"{uri} is a {meta['arch']} model, which timm {installed} does not "
                         "know: install the timm its model.json names under software")


VERIFIED: set[tuple[str, str]] = set()  # (model, weights_sha256) whose weights matched in this process


def check_weights(uri: str, meta: dict) -> None:
    """The weights' hash, read as a stream. Once a process: a command's checks run before
    Ray starts and again in its run (220 MB: ~0.3-0.6 s each). Weights damaged after
    that are still refused where they are loaded (read_model)."""
    expected = meta.get("weights_sha256")
    if (uri, expected) in VERIFIED:
        return
    try:
        found = storage.file_digest(storage.join(uri, WEIGHTS), "sha256")
    except FileNotFoundError:
        raise UsageError(f"{storage.join(uri, WEIGHTS)} is missing: copy it with {META}, or "
                         "export the model folder again") from None
    except IsADirectoryError:
        found = None
    except PermissionError as e:
        raise unreadable(storage.join(uri, WEIGHTS), e) from None
    if found != expected:
        raise weights_mismatch(uri)
    VERIFIED.add((uri, expected))


def weights_mismatch(uri: str) -> UsageError:
    return UsageError(f"model weights at {uri} do not match {META} (missing, or a partial copy?): "
                      "export or copy the model folder again")


def load_model(uri: str) -> tuple[dict, dict]:
    """(state_dict, meta), checking the weights against the hash in the metadata."""
    blob, meta = read_model(uri)
    from safetensors.torch import load as st_load

    return st_load(blob), meta


def read_model(uri: str) -> tuple[bytes, dict]:
    """(weights as stored, meta), checked against the hash in the metadata."""
    meta = load_meta(uri)
    blob = storage.read_bytes(storage.join(uri, WEIGHTS))
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise weights_mismatch(uri)
    return blob, meta


# what decides a detector's answers besides its weights: one edited (a threshold set by
# hand) makes another model, which a service's replicas and a resumed score must not mix
DECIDING = ("threshold", "resolution", "input_size", "preprocessing", "jpeg_quality")


def threshold_set_by_hand(meta: dict) -> float | None:
    """A model's threshold where it is not the one its validation chose (edited in
    model.json, for a false-positive budget), else None."""
    chosen = meta.get("metrics", {}).get("val_threshold")
    return meta.get("threshold") if chosen is not None and meta.get("threshold") != chosen else None


def model_id(meta: dict) -> str:
    digest = meta.get("weights_sha256", "")
    if "threshold" in meta:
        deciding = {k: meta[k] for k in DECIDING if k in meta}
        digest = hashlib.sha256(json.dumps([digest, deciding], sort_keys=True).encode()).hexdigest()
    return f"{meta.get('arch', 'model')}@{digest[:12]}"


def model_ids(meta: dict) -> set[str]:
    """model_id, and the id of the same weights from before ids covered the threshold
    (deepfake-ray before 2026-12-07): a serve config, a running application, a score
    table or a work directory's marker that names a model so still names it."""
    return {model_id(meta), f"{meta.get('arch', 'model')}@{meta.get('weights_sha256', '')[:12]}"}


# --- training state inside Ray Train checkpoints ---------------------------------

STATE = "state.pt"
STATE_OK = "state.json"


def write_state(directory: str, state: dict, metrics: dict | None = None) -> None:
    """state.pt, then state.json with its hash, epoch and the epoch's reported numbers
    (what ranks a checkpoint Ray never registered), written last."""
    import torch

    path = os.path.join(directory, STATE)
    torch.save(state, path)
    digest = storage.file_digest(path, "sha256")  # as a stream: not the ~0.65 GB at once
    # finite ones only: strict JSON, as every file of a run (a NaN ranks nothing anyway)
    numbers = {k: v for k, v in (metrics or {}).items() if storage.finite(v)}
    with open(os.path.join(directory, STATE_OK), "w") as f:
        json.dump({"sha256": digest, "epoch": int(state.get("epoch", -1)), "metrics": numbers}, f)


# missing or damaged; not a read that failed (a throttled or cut-off S3 read, a permission):
# that is raised, never reported as damage that --force would "mend"
_DAMAGED = (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, KeyError, TypeError)


def _state_record(uri: str) -> dict | None:
    """state.json in folder `uri`, or None where it is missing or damaged: a folder cut short."""
    try:
        record = storage.read_json(storage.join(uri, STATE_OK))
    except _DAMAGED:
        return None
    return record if isinstance(record, dict) else None


def state_metrics(uri: str) -> dict | None:
    """The numbers reported with the state in folder `uri` ({} in a folder written before
    they were kept), or None where state.json is missing or damaged."""
    record = _state_record(uri)
    metrics = None if record is None else record.get("metrics", {})
    return metrics if isinstance(metrics, dict) else None


def state_intact(uri: str) -> bool:
    """Whether the state in folder `uri` (local or s3://) matches its hash, read as a
    stream: what read_state would find, without holding it in memory."""
    if (record := _state_record(uri)) is None:
        return False
    try:
        return storage.file_digest(storage.join(uri, STATE), "sha256") == record["sha256"]
    except _DAMAGED:
        return False


def read_state(directory: str) -> dict | None:
    """The state in the local `directory`, or None when it is missing, partial or corrupt.
    Hashed as a stream, then loaded from the file: the detector's state is ~0.65 GB, and
    its bytes held beside the loaded tensors doubled a worker's memory as it resumed."""
    if not state_intact(directory):
        return None
    import torch

    return torch.load(os.path.join(directory, STATE), map_location="cpu", weights_only=True)
