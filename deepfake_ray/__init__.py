"""deepfake-ray: detect GAN-generated faces, each pipeline stage a Ray job."""
from __future__ import annotations

import functools
import platform
from importlib import metadata

# pyproject.toml reads it from here: a job whose code travels as Ray's working_dir
# (not installed on the node) still knows its version
__version__ = "0.1.0"
# what a model was made with and what a bug report needs: read from the installed
# packages' metadata, so no process imports torch to learn its version
# (numpy draws the sample faces, latents and splits' subsamples; Pillow's libjpeg-turbo makes
# the stored bytes whose hash is an image's split)
SOFTWARE = ("ray", "torch", "torchvision", "timm", "pillow", "pyarrow", "numpy")


@functools.cache  # every model save asks: one read of the packages' metadata a process
def versions() -> dict[str, str]:
    """This package's version, the installed ones of the software that makes and runs
    models, and Python's. Shared: copy it to change it."""
    found = {"deepfake-ray": __version__}
    for name in SOFTWARE:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {**found, "libjpeg-turbo": jpeg_library(), "python": platform.python_version()}


def jpeg_library() -> str:
    from PIL import features

    return features.version("libjpeg_turbo") or "not in this Pillow"


def versions_text(found: dict[str, str]) -> str:
    """`name version, name version, ...`, as --version and the report show them."""
    return ", ".join(f"{name} {version}" for name, version in found.items())


def version_line() -> str:
    """`deepfake-ray --version`: the package, then what it runs on."""
    found = dict(versions())
    return f"deepfake-ray {found.pop('deepfake-ray')} ({versions_text(found)})"
