"""The one prediction path shared by the HTTP service and batch scoring (evaluate's
scorer, detector/data.py, calls the same model functions without the service's decode).

bytes --decode_image--> uint8 pixels --predict_pixels--> p_fake --describe--> result

`predict_bytes` is the three steps in one call. The HTTP service decodes each request
as it arrives and runs `predict_pixels` + `describe` once per dynamic batch; batch
scoring runs `decode_image` in parallel Ray Data tasks and `predict_pixels` + `describe`
in an actor pool. All use these same functions with the model's own metadata, so an
image gets the same score from each.
"""
from __future__ import annotations

import math
import re

import numpy as np

from deepfake_ray import checkpoint, storage
from deepfake_ray.errors import UsageError
from deepfake_ray.storage import json_safe
from deepfake_ray.data import crashes
from deepfake_ray.data.decode import DEFAULT_MAX_PIXELS, DecodeError, as_stored, open_image

# DecodeError.reason -> HTTP status of a request whose image fails that way
STATUS_BY_REASON = {
    "empty file": 400,
    "decompression bomb": 413,
    "not an image": 415,
    "html page": 415,
    "unsupported format": 415,
    "truncated": 422,
    "corrupt": 422,
    crashes.REASON: 422,  # with serve.isolate_decoding
}


class NotScored(DecodeError):
    """A decoded image the model gave NaN (or an infinite logit) for: an error, never a
    label, since NaN >= threshold is False and would read as "real"."""
    REASON = "no finite score"

    def __init__(self):
        super().__init__(self.REASON, "the model's output for this image is not a number; the model "
                         "is broken (did its training diverge?): retrain it with a lower detector.lr")


STATUS_BY_REASON[NotScored.REASON] = 500  # the model's fault, not the file's


def error_status(error: DecodeError) -> int:
    return STATUS_BY_REASON.get(error.reason, 422)


def error_text(error: DecodeError) -> str:
    """The reason for a client, without Python object reprs from the imaging library."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", str(error))


def decode_image(data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 quality: int | None = None) -> np.ndarray:
    """Raw file bytes -> resolution x resolution x 3 uint8, as the model's data was made
    (re-encoded at the stored images' JPEG `quality`, when the model names one)."""
    return as_stored(open_image(data, max_pixels), resolution, quality)


def load_here(model_uri: str) -> tuple[dict, dict]:
    """checkpoint.load_model, where a local folder missing on this node says why: the
    driver found it on its own disk, which a replica or actor on another node cannot read."""
    try:
        return checkpoint.load_model(model_uri)
    except UsageError as e:
        import ray

        if storage.is_s3(model_uri) or not ray.is_initialized() or len(ray.nodes()) < 2 or \
                storage.exists(model_uri):
            raise
        node = ray.util.get_node_ip_address()
        raise UsageError(f"{e} (on the Ray node {node}: a local --model must lie on every node's disk, "
                         "e.g. a shared mount; or upload it and pass s3://...)") from None


class Predictor:
    """A loaded detector: `model_uri` is an exported model folder, local or s3://."""

    def __init__(self, model_uri: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: str | None = None, threads: int | None = None, frozen: bool = True):
        import torch

        from deepfake_ray.models import detector, detector_autocast

        if threads:
            torch.set_num_threads(threads)
        state, meta = load_here(model_uri)
        checkpoint.check_threshold(model_uri, meta.get("threshold", 0.5))  # as score and serve check it first
        self.meta = meta
        self.model_uri = model_uri
        self.max_pixels = max_pixels
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = detector.from_meta(meta, state).to(self.device)
        # uint8 pixels -> logits; on the CPU one frozen graph (`frozen`: for a caller whose
        # other threads run Python beside the forward pass, as a replica's), the GPU path
        # stays eager until measured there
        self.model = (detector.inference_graph(model, meta) if self.device.type == "cpu" and frozen
                      else detector.FromPixels(model, meta).eval())
        # on a GPU, the precision validation (which chose the threshold) and evaluate ran
        # in: served scores are the evaluated ones
        self.amp = detector_autocast(meta, self.device)
        self.resolution = int(meta["resolution"])
        self.quality = checkpoint.stored_quality(meta)
        self.threshold = float(meta.get("threshold", 0.5))
        self.class_names = list(meta.get("class_names", ["real", "fake"]))
        self.model_id = checkpoint.model_id(meta)

    def info(self) -> dict:
        """What /v1/model shows: identity and how inputs are treated. Not where the model
        is stored: a home folder's path or a bucket's name is no client's business."""
        keys = ("arch", "num_classes", "class_names", "resolution", "input_size",
                "preprocessing", "threshold", "epoch", "metrics", "format_version", "software")
        return {"model": self.model_id, "device": str(self.device),
                **{k: json_safe(self.meta[k]) for k in keys if k in self.meta}, "jpeg_quality": self.quality}

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.resolution, self.max_pixels, self.quality)

    def open(self, data: bytes):
        """The image's header only (cheap): DecodeError for what is plainly unusable,
        a decompression bomb included; `decode_opened` decodes the rest."""
        return open_image(data, self.max_pixels)

    def decode_opened(self, img) -> np.ndarray:
        return as_stored(img, self.resolution, self.quality)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC at the model's resolution -> p_fake per image (float64)."""
        import torch

        from deepfake_ray.models import detector

        if len(pixels) == 0:
            return np.zeros(0)
        r = self.resolution
        if pixels.dtype != np.uint8 or pixels.shape[1:] != (r, r, 3):  # a float image scored as black
            raise ValueError(f"predict_pixels takes uint8 images of N x {r} x {r} x 3 (decode_image "
                             f"makes them), not {pixels.dtype} {pixels.shape}")
        # uint8 to the device first: a quarter of the bytes of float input; a read-only array
        # (decode_opened's, one image's) is copied, as torch warns it cannot share one
        x = torch.as_tensor(np.require(pixels, requirements=["C", "W"])).to(self.device)
        with torch.inference_mode():
            return detector.p_fake(detector.predict(self.model, x, self.amp))

    def describe(self, p_fake: float) -> dict | NotScored:
        if not math.isfinite(p_fake):
            return NotScored()
        fake = p_fake >= self.threshold
        return {"p_fake": float(p_fake), "label": self.class_names[1 if fake else 0],
                "threshold": self.threshold, "model": self.model_id}

    def predict_bytes(self, blobs: list[bytes]) -> list[dict | DecodeError]:
        """One result per input, in order: a dict, or the DecodeError for an unusable file.
        The reference the tests and benchmarks compare the service and `score` against."""
        results: list = [None] * len(blobs)
        good, pixels = [], []
        for i, blob in enumerate(blobs):
            try:
                pixels.append(self.decode(blob))
                good.append(i)
            except DecodeError as e:
                results[i] = e
        if good:
            for i, p in zip(good, self.predict_pixels(np.stack(pixels))):
                results[i] = self.describe(p)
        return results
