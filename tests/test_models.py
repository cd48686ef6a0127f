"""Import boundaries, checked in a fresh interpreter (this test session has everything
loaded already): models/ is plain torch and timm, without Ray; and the modules whose
functions run in Ray Data tasks and actors import neither torch nor Ray Train, which a
fresh worker process would pay for in seconds of start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MODULES = ["deepfake_ray.models.dcgan", "deepfake_ray.models.detector"]


def imported_by(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Modules named by `prefixes` (and their submodules) that importing `modules` loads."""
    code = (f"import json, sys, {', '.join(modules)}\n"  # one interpreter: imports load once
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}) "
            f"or m in {tuple(p.rstrip('.') for p in prefixes)!r})))\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_models_do_not_import_ray():
    loaded = imported_by(MODULES, ("ray.",))
    assert not loaded, f"importing {MODULES} imported Ray: {loaded[:5]}"


# where the functions of Ray Data tasks and actors live (prepare, generate, train, evaluate, score)
WORKER_MODULES = ["deepfake_ray.data.prepare", "deepfake_ray.data.datasets",
                  "deepfake_ray.detector.data", "deepfake_ray.serving.score"]


def test_ray_data_worker_modules_do_not_import_torch():
    loaded = imported_by(WORKER_MODULES, ("torch.", "ray.train."))
    assert not loaded, f"importing {WORKER_MODULES} imported {loaded[:5]}"
