"""Plain torch/timm models: nothing here imports Ray."""
from __future__ import annotations

import torch


def autocast_dtype(device: torch.device, wanted: bool = True) -> torch.dtype | None:
    """bfloat16 on a GPU that computes in it (compute capability 8.0 and up: A10G, L4,
    A100, H100), else None, full precision: on the T4 (7.5, the oldest the pinned torch's
    CUDA 13 build runs on: not the V100) cuDNN has no bfloat16 convolutions, which torch
    would emulate slowly if at all. Training, validation (which
    sets the threshold), evaluation and serving all ask this, so a model is scored as it
    was validated on the same kind of GPU. `wanted`: False for full precision anywhere."""
    if device.type != "cuda" or not wanted:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None


def detector_autocast(meta: dict, device: torch.device) -> torch.dtype | None:
    """The precision an exported detector is scored in on `device`: the one its validation
    chose the threshold in (detector.mixed_precision; bfloat16 where supported for models
    exported before the setting)."""
    wanted = meta.get("config", {}).get("detector", {}).get("mixed_precision", True)
    return autocast_dtype(device, bool(wanted))
