"""models/ is plain torch and timm: importing it must not import Ray (checked in a fresh
interpreter, since this test session has Ray loaded already)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MODULES = ["deepfake_ray.models.dcgan", "deepfake_ray.models.detector"]


def test_models_do_not_import_ray():
    code = (f"import sys, {', '.join(MODULES)}\n"  # one interpreter: torch loads once
            "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "print(loaded[:5])\n"
            "sys.exit(1 if loaded else 0)\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"importing {MODULES} imported Ray: {done.stdout}{done.stderr[-2000:]}"
