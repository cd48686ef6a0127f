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


# DESIGN.md's layout, lowest first: a module imports its own layer and those below, never
# one above (serving's replicas imported the CLI; evaluate's actors, serving; the report,
# the pipeline that runs it). lineage names the stages that make each folder by module
# name (its MAKERS registry), which no import statement shows.
LAYERS = [{"__init__", "errors", "progress", "config", "s3", "storage", "lease", "runtime", "checkpoint",
           "lineage", "training", "models"},
          {"data"}, {"gan", "detector"}, {"serving"}, {"report", "report_render"}, {"pipeline"},
          {"cli", "__main__"}]


def test_no_module_imports_a_layer_above_its_own():
    import ast

    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    package = os.path.join(REPO, "deepfake_ray")

    def part(module: str) -> str:  # deepfake_ray.serving.app -> serving
        return (module.split(".") + ["__init__"])[1]

    upward = []
    for folder, _, files in os.walk(package):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            module = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):  # lazy imports too
                if isinstance(node, ast.Import):
                    named = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    named = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                upward += [f"{module} imports {n}" for n in named if n.startswith("deepfake_ray.")
                           and part(n) in layer and layer[part(n)] > layer[part(module)]]
    assert set(layer) >= {part(f"deepfake_ray.{n.removesuffix('.py')}") for n in os.listdir(package)
                          if not n.startswith((".", "_")) and n not in ("configs", "__pycache__")}, "a new module: place it in LAYERS"
    assert not upward, upward
