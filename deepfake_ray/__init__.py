"""deepfake-ray: detect GAN-generated faces, each pipeline stage a Ray job."""
from __future__ import annotations

from importlib import metadata
import platform

# what a model was made with and what a bug report needs: read from the installed
# packages' metadata, so no process imports torch to learn its version
SOFTWARE = ("deepfake-ray", "ray", "torch", "torchvision", "timm", "pillow", "pyarrow")


def versions() -> dict[str, str]:
    """Installed versions of the software that makes and runs models, and Python's."""
    found = {}
    for name in SOFTWARE:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {**found, "python": platform.python_version()}


def version_line() -> str:
    """`deepfake-ray --version`: the package, then what it runs on."""
    found = versions()
    return f"deepfake-ray {found.pop('deepfake-ray')} (" + ", ".join(f"{k} {v}" for k, v in found.items()) + ")"
