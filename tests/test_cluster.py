"""Cluster configs and job entrypoints: the AWS launcher config passes Ray's own schema and
config preparation; the KubeRay manifests carry what the operator needs; the Serve
configs pass Ray Serve's schema; `jobs/*.py` behave like `deepfake-ray COMMAND`."""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import ray
import yaml

from deepfake_ray import cli, runtime
from tests.cli_output import error_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
import _entry  # noqa: E402  (jobs/_entry.py)

KUBERAY = os.path.join(ROOT, "cluster", "kuberay")
JOBS = {"pipeline.py": "pipeline", "train_gan.py": "train-gan", "train_detector.py": "train-detector",
        "tune_lr.py": "tune", "score.py": "score"}
IMAGE = re.compile(rf"^rayproject/ray:{re.escape(ray.__version__)}-py311-(gpu|cu\d+)$")


def load(path: str):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


# --- cluster/aws.yaml -----------------------------------------------------------------

def test_aws_config_passes_rays_schema_and_preparation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("cluster/aws.yaml")
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cfg, json.load(f))
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before AWS calls


def test_aws_config_autoscales_gpu_workers_from_zero():
    cfg = load("cluster/aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert 1 in gpus and max(gpus) > 1  # a single-GPU type and a multi-GPU training type
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= cfg["max_workers"], name
        assert "IamInstanceProfile" in t["node_config"], f"{name}: no S3 access"
    # README: "8 one-GPU and 2 four-GPU nodes at most", CPU nodes up or not
    assert cfg["max_workers"] == sum(t["max_workers"] for t in workers.values())
    for name, t in types.items():  # Ray's default AMI has a CUDA 11.2 driver: too old
        # the placeholder, or the id README's setup writes in its place
        assert re.fullmatch(r"AMI_ID|ami-[0-9a-f]{8,17}", t["node_config"].get("ImageId", "")), f"{name}: no AMI named"
    assert IMAGE.match(cfg["docker"]["image"]), cfg["docker"]["image"]
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f"ray[data,train,tune,serve]=={ray.__version__}" in f.read()  # image == pinned Ray
    (remote, local), = cfg["file_mounts"].items()
    assert local == "." and any(remote in c and "pip install" in c for c in cfg["setup_commands"])


# --- cluster/kuberay --------------------------------------------------------------------

def manifests() -> dict:
    docs = {}
    for name in sorted(os.listdir(KUBERAY)):
        with open(os.path.join(KUBERAY, name)) as f:
            for doc in yaml.safe_load_all(f):
                docs[doc["kind"]] = doc
    return docs


def cluster_specs(docs: dict) -> dict:
    return {"RayCluster": docs["RayCluster"]["spec"], "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"],
            "RayService": docs["RayService"]["spec"]["rayClusterConfig"]}


def test_the_service_account_outlives_any_cluster():
    """Defined in a file of its own: deleting raycluster.yaml's cluster must not take it
    from a RayService or RayJob whose new pods still need it."""
    kinds = {}
    for name in sorted(os.listdir(KUBERAY)):
        with open(os.path.join(KUBERAY, name)) as f:
            kinds[name] = [doc["kind"] for doc in yaml.safe_load_all(f)]
    assert kinds.pop("serviceaccount.yaml") == ["ServiceAccount"]
    assert all("ServiceAccount" not in k for k in kinds.values()), kinds


def test_kuberay_manifests_have_autoscaled_gpu_groups():
    docs = manifests()
    assert {"RayCluster", "RayJob", "RayService", "ServiceAccount"} <= set(docs)
    account = docs["ServiceAccount"]["metadata"]["name"]
    for kind, spec in cluster_specs(docs).items():
        assert docs[kind]["apiVersion"] == "ray.io/v1"
        assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__, kind
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head["containers"][0]["image"] and head["serviceAccountName"] == account, kind
        assert spec["workerGroupSpecs"], kind
        gpus = []
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # Ray's object store in memory
            pod = group["template"]["spec"]
            shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
            assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0].get("volumeMounts", []) \
                and "shm" in shm, (kind, group.get("groupName", "head"))
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            gpus.append(int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)))
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, (kind, group["groupName"])
            assert pod["serviceAccountName"] == account
        assert max(gpus) >= 1, kind
        if kind != "RayService":  # ingest's CPU work must not start GPU pods
            assert 0 in gpus, kind


# The EC2 types README's KubeRay section sizes each pod for: (vCPUs, GiB, EKS's max pods).
NODES = {"m5.large": (2, 8, 29), "m5.xlarge": (4, 16, 58), "c5.4xlarge": (16, 32, 234),
         "g5.2xlarge": (8, 32, 58), "g5.12xlarge": (48, 192, 234)}
HEAD_NODE = {"RayCluster": "m5.xlarge", "RayJob": "m5.xlarge", "RayService": "m5.large"}
GROUP_NODE = {"cpu": "c5.4xlarge", "gpu-1x": "g5.2xlarge", "gpu-4x": "g5.12xlarge"}
DAEMONSETS_MILLICPU = 100 + 25  # kube-proxy, aws-node (VPC CNI): on every EKS node
AUTOSCALER_DEFAULT = {"cpu": "500m", "memory": "512Mi"}  # KubeRay's, without autoscalerOptions.resources


def millicpu(q) -> int:
    q = str(q)
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def mebibytes(q) -> int:
    q = str(q)
    return int(q[:-2]) * 1024 if q.endswith("Gi") else int(q[:-2])


def eks_allocatable(node: str) -> tuple[int, int]:
    """(millicpu, MiB) an EKS node of this type leaves the pods: the kubelet's CPU reserve
    (6% of the first core, 1% of the second, 0.5% of the next two, 0.25% of the rest), its
    memory reserve (255 MiB + 11 MiB a pod) and the 100 MiB eviction threshold, from the
    memory the kernel sees (taken as 94% of the type's)."""
    cpus, gib, pods = NODES[node]
    shares = [60, 10, 5, 5] + [2.5] * (cpus - 4)
    return cpus * 1000 - int(sum(shares[:cpus])), int(gib * 1024 * 0.94) - 255 - 11 * pods - 100


def test_kuberay_pods_fit_the_nodes_they_are_sized_for():
    """A pod that asks for more than a node leaves stays Pending. The head pod holds the
    autoscaler's container too: with KubeRay's default 500m the RayService head asked for
    2000m, more than the m5.large README names leaves (1930m)."""
    for kind, spec in cluster_specs(manifests()).items():
        autoscaler = spec.get("autoscalerOptions", {}).get("resources", {"requests": AUTOSCALER_DEFAULT,
                                                                         "limits": AUTOSCALER_DEFAULT})
        assert autoscaler["requests"] == autoscaler["limits"], kind  # as the Ray container's: Guaranteed QoS
        groups = [(HEAD_NODE[kind], spec["headGroupSpec"], [autoscaler])]
        groups += [(GROUP_NODE[g["groupName"]], g, []) for g in spec["workerGroupSpecs"]]
        for node, group, sidecars in groups:
            containers = [c["resources"] for c in group["template"]["spec"]["containers"]] + sidecars
            cpu, mem = eks_allocatable(node)
            asked_cpu = sum(millicpu(c["requests"]["cpu"]) for c in containers)
            asked_mem = sum(mebibytes(c["requests"]["memory"]) for c in containers)
            where = (kind, group.get("groupName", "head"), node)
            assert asked_cpu + DAEMONSETS_MILLICPU <= cpu, (*where, asked_cpu, cpu)
            assert asked_mem <= mem, (*where, asked_mem, mem)


def test_clusters_set_at_every_node_what_rays_processes_read_as_they_start():
    """Serve reads the HAProxy flag in its controller and in each replica: a node without it
    would host replicas that HAProxy cannot reach. Each task's owner reads the memory
    monitor's retries as it starts, Train's Ray Data coordinator too, which a driver joining
    with --address cannot hand its own environment."""
    wanted = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_task_oom_retries": str(runtime.WORKER_RETRIES)}
    options = load("cluster/aws.yaml")["docker"]["run_options"]
    assert all(f"--env {name}={value}" in options for name, value in wanted.items()), options
    specs = cluster_specs(manifests())
    for kind in ("RayCluster", "RayService"):
        groups = [specs[kind]["headGroupSpec"], *specs[kind]["workerGroupSpecs"]]
        for group in groups:
            env = {e["name"]: e["value"] for e in group["template"]["spec"]["containers"][0]["env"]}
            assert {name: env.get(name) for name in wanted} == wanted, (kind, group.get("groupName", "head"))


def test_rayjob_runs_the_pipeline_entrypoint():
    job = manifests()["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"] and os.path.exists(os.path.join(ROOT, argv[1]))
    args = _entry.parser("pipeline", "pipeline.py").parse_args(argv[2:])  # flags the script takes
    assert args.workdir.startswith("s3://") and args.run_name and args.preset == "celeb100k"
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] and env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert env["env_vars"]["RAY_task_oom_retries"] == str(runtime.WORKER_RETRIES)
    # the driver runs on the head: the preset's kaggle: source needs the credentials there
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "KAGGLE_API_TOKEN" in {e["name"] for e in head["env"]}


def serve_apps(config: dict) -> list:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config).applications  # Ray Serve's own schema


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_rayservice_serves_the_detector_app():
    service = manifests()["RayService"]["spec"]
    apps = serve_apps(yaml.safe_load(service["serveConfigV2"]))
    app = apps[0]
    assert app.import_path == "deepfake_ray.serving.app:build_app"
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app.args["model"].startswith("s3://") and app.args["model"].endswith("/detector/model")
    local = {a.name: a for a in serve_apps(load("jobs/serve.yaml"))}  # as `serve deploy jobs/serve.yaml`
    assert app.name in local and local[app.name].import_path == app.import_path
    assert set(local[app.name].args) == set(app.args)
    assert ([d.name for d in local[app.name].deployments] == [d.name for d in app.deployments])
    from deepfake_ray import config
    from deepfake_ray.serving.app import Detector, check_settings

    from deepfake_ray.serving.app import REQUEST_TIMEOUT_S

    for served in (app, local[app.name]):  # their settings are valid, and name our deployment
        check_settings(config.build(served.args["preset"], None, served.args["set"]))
        assert [d.name for d in served.deployments] == [Detector.name]
        # options the code derives from the settings: one set here replaced them whole, so
        # `set: serve.max_replicas=...` did nothing, and a num_cpus alone dropped the GPU
        assert served.deployments[0].model_dump(exclude_unset=True).keys() == {"name"}
    for http_options in (yaml.safe_load(service["serveConfigV2"]), load("jobs/serve.yaml")):
        assert http_options["http_options"]["request_timeout_s"] == REQUEST_TIMEOUT_S  # as deepfake-ray serve


# --- jobs/ ------------------------------------------------------------------------------

def run_job(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join("jobs", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("script", sorted(JOBS))
def test_job_help_and_bad_flag(script):
    ok = run_job(script, "--help")
    assert ok.returncode == 0
    # score writes --out, no work directory
    assert ("--run-name" in ok.stdout) == ("--workdir" in ok.stdout) == (script != "score.py")
    required = ["--model", "m", "--input", "i", "--out", "o"] if script == "score.py" else []
    bad = run_job(script, *required, "--no-such-flag")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [  # one line, as deepfake-ray's
        f"python jobs/{script}: error: unrecognized arguments: --no-such-flag (see python jobs/{script} --help)"]


def test_job_usage_errors_exit_2_with_the_fix():
    bad_preset = run_job("train_gan.py", "--preset", "nope", "--run-name", "r1")
    assert bad_preset.returncode == 2 and "choose one of" in bad_preset.stderr
    bad_name = run_job("pipeline.py", "--workdir", "/tmp/x", "--run-name", "../up")
    assert bad_name.returncode == 2 and "--run-name r1" in bad_name.stderr
    # a --config the job cannot read while it resolves --run-name: one line, as deepfake-ray's
    unreachable = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                   "AWS_SECRET_ACCESS_KEY": "y"}
    bad_config = run_job("train_gan.py", "--config", "s3://bucket/mine.yaml", "--run-name", "r1",
                         env=unreachable)
    assert bad_config.returncode == 2, bad_config.stderr[-2000:]
    assert bad_config.stderr.strip().splitlines() == [
        "python jobs/train_gan.py: error: s3://bucket/mine.yaml: cannot reach the S3 endpoint "
        "http://127.0.0.1:9: check AWS_ENDPOINT_URL and the network"]


def test_a_job_refuses_a_work_directory_inside_its_unpacked_code(tmp_path, monkeypatch, capsys):
    """`ray job submit --working-dir .` runs the job in its copy of the code: the preset's
    runs/NAME would land there, on one node, lost to the next submission."""
    unpacked = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    unpacked.mkdir(parents=True)
    monkeypatch.chdir(unpacked)
    for args in (["--run-name", "r1"], []):
        assert _entry.main("train-gan", "train_gan.py", ["--preset", "tiny", *args]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and "is inside this job's unpacked code" in err[0] and "--workdir s3://" in err[0]
    # `ray job submit --working-dir . -- deepfake-ray pipeline`: the console script, not a jobs/ script
    assert cli.main(["pipeline", "--preset", "tiny"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "--workdir " + str(unpacked / "runs" / "tiny") + " is inside this job's unpacked code" in err[0]
    assert cli.main(["score", "--model", "s3://b/m", "--input", "s3://b/in", "--out", "scores.csv"]) == 2
    assert "--out scores.csv is inside this job's unpacked code" in capsys.readouterr().err
    assert not (unpacked / "runs").exists()
    # a source shipped with the code: its path changes with each submission's copy
    assert _entry.main("pipeline", "pipeline.py", ["--preset", "tiny", "--workdir", "s3://bucket/runs",
                                                   "--set", "data.source=faces"]) == 2
    assert "data.source faces is inside this job's unpacked code" in capsys.readouterr().err
    p = _entry.parser("pipeline", "pipeline.py")
    for source in ("sample", " sample", "sample:40", "kaggle", "kaggle:owner/faces", "s3://bucket/faces", "/data/faces"):
        args = p.parse_args(["--preset", "tiny", "--workdir", "s3://bucket/runs", "--set", f"data.source={source}"])
        assert _entry.run_workdir("pipeline", args) == "s3://bucket/runs"  # no path in the code's copy
    for flag in ("--out", "--input", "--model"):  # score: each of its paths
        paths = {"--model": "s3://b/m", "--input": "s3://b/in", "--out": "s3://b/o.parquet", flag: "x"}
        assert _entry.main("score", "score.py", [a for kv in paths.items() for a in kv]) == 2
        assert f"{flag} x is inside this job's unpacked code" in capsys.readouterr().err


@pytest.mark.parametrize("workdir, expected", [
    (["--workdir", "s3://bucket/runs"], "s3://bucket/runs/r1"),
    (["--workdir", "/data/runs"], "/data/runs/r1"),
    (["--set", "workdir=/data/runs"], "/data/runs/r1"),  # a --set wins over a flag: not over the run name
    ([], os.path.abspath("runs/tiny/r1")),  # the preset's default work directory
])
def test_run_name_is_a_subfolder_of_the_workdir(workdir, expected):
    from deepfake_ray import cli

    p = _entry.parser("train-detector", "train_detector.py")
    given = ["--preset", "tiny", "--set", "detector.lr=1e-3", "--set", "detector.epochs=3",
             "--force", "--run-name", "r1", *workdir]
    args = p.parse_args(given)
    argv = _entry.cli_argv(p, "train-detector", args, _entry.run_workdir("train-detector", args))
    again = cli.parser().parse_args(argv)  # what `deepfake-ray` itself receives
    assert again.command == "train-detector" and cli.build_config(again).workdir == expected
    assert again.overrides == ["detector.lr=1e-3", "detector.epochs=3"] and again.force
    assert again.preset == "tiny" and again.address is None


def test_a_job_exits_as_the_command_it_runs(tmp_path, capsys):
    """`ray job status` reads the entrypoint's exit code: a command that failed must not
    be a job that SUCCEEDED. Here train-gan finds no prepared data in WORKDIR/RUN_NAME."""
    assert _entry.main("train-gan", "train_gan.py", ["--preset", "tiny", "--workdir", str(tmp_path),
                                                     "--run-name", "r1"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"no prepared images in {tmp_path}/r1/data" in err[0], err


def test_runtime_env_is_valid_and_ships_the_working_dir():
    from ray.runtime_env import RuntimeEnv

    env = load("jobs/runtime_env.yaml")
    assert "working_dir" not in env  # given on the command line: --working-dir .
    RuntimeEnv(**env, working_dir=ROOT)  # Ray's own validation
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    # as the embedded Ray has it: a task Ray's memory monitor keeps stopping ends the stage
    assert env["env_vars"]["RAY_task_oom_retries"] == str(runtime.WORKER_RETRIES)
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def ray_node(command: list[str], env: dict, log) -> subprocess.Popen:
    """A `ray start ... --block` node in a process group of its own: killed with it."""
    ports = runtime.free_ports(4)
    return subprocess.Popen(
        command + ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=200000000",
                   "--disable-usage-stats",  # the session's in-process Ray holds the default agent ports
                   f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
                   f"--runtime-env-agent-port={ports[2]}", f"--metrics-export-port={ports[3]}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def two_machines(tmp_path):
    """(address, env, hidden): a cluster of two nodes on this machine, the second in a mount
    namespace of its own where a tmpfs covers `hidden`, as a folder on the first machine's
    own disk is out of another machine's reach, and started with an S3 endpoint of its own."""
    import signal
    import tempfile
    import time

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root, or a user namespace) to hide a folder from one node")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=ROOT, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(32).hex())
    gcs, client = runtime.free_ports(2)
    temp_dir = tempfile.mkdtemp(prefix="ray-2n-")  # short: Ray's socket paths live under it
    nodes = [ray_node(["ray", "start", "--head", f"--port={gcs}", f"--temp-dir={temp_dir}",
                       "--include-dashboard=false", f"--ray-client-server-port={client}"],
                      env, open(tmp_path / "head.log", "w"))]
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert nodes[0].poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        nodes.append(ray_node(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"', "ray", "start",
                               f"--address=127.0.0.1:{gcs}"], {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                              open(tmp_path / "node2.log", "w")))
        while "Ray runtime started" not in (tmp_path / "node2.log").read_text():
            assert nodes[1].poll() is None and time.time() < deadline, (tmp_path / "node2.log").read_text()[-2000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", env, hidden
    finally:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)  # throwaway nodes: no need for a clean stop
            node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_node_that_sees_other_files_or_another_s3_store_is_refused(two_machines, tmp_path, s3_server):
    """A local --workdir on one machine's disk: prepare's tasks on another wrote their parts
    to theirs, and it said "prepared N images" of files the next stage could not find; a
    local source there, its files set aside as unreadable; a node whose `ray start` had
    another AWS_ENDPOINT_URL, its tasks writing to another store. Refused, naming the
    node; a folder every node sees works."""
    from PIL import Image

    address, env, hidden = two_machines
    faces = hidden / "faces"
    faces.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 90)).save(faces / "a.jpg")

    def prepare(source: str, workdir) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deepfake_ray.cli", "prepare", "--preset", "tiny",
                               "--source", source, "--workdir", str(workdir), "--address", address],
                              env=env, capture_output=True, text=True, timeout=300)

    for source, workdir, flag, path in (("sample:20", hidden / "w", "--workdir", hidden / "w"),
                                        (str(faces), tmp_path / "w1", "data.source", faces)):
        done = prepare(source, workdir)
        assert done.returncode == 2, done.stderr[-3000:]
        assert re.fullmatch(rf"deepfake-ray prepare: error: {flag} {path} is not on a disk every node of this "
                            r"cluster shares: [\d.]+ \(\w{8}\) cannot see it; use s3://BUCKET/\.\.\. or a folder "
                            r"every node mounts at the same path \(NFS\)", done.stderr.strip().splitlines()[-1]), \
            done.stderr[-3000:]
        assert not (workdir / "data").exists()
    done = prepare("sample:20", f"{s3_server('two-machines')}/r1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(rf"deepfake-ray prepare: error: this command uses the S3 endpoint {os.environ['AWS_ENDPOINT_URL']}, "
                        r"but [\d.]+ \(\w{8}\) uses http://127.0.0.1:9: set the same AWS_ENDPOINT_URL .*",
                        done.stderr.strip().splitlines()[-1]), done.stderr[-3000:]
    shared = tmp_path / "shared"
    done = prepare("sample:20", shared)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Progress bars disabled" not in done.stderr  # Ray Data's advice: DEEPFAKE_RAY_PROGRESS=0 is ours
    assert (shared / "data" / "manifest.parquet").exists()
    assert not [n for n in os.listdir(shared) if n.startswith(".shared-check")]  # the probe is gone


def test_one_s3_store_is_one_whatever_the_form_of_its_endpoint():
    """A node's AWS_ENDPOINT_URL written with a trailing slash, another letter case or the
    scheme's own port is the driver's store; another host or port is another store."""
    same = ["http://minio:9000", "http://MinIO:9000/", "HTTP://minio:9000", "http://key:secret@minio:9000"]
    assert len({runtime.endpoint_key(e) for e in same}) == 1
    assert runtime.endpoint_key("https://s3.example.com") == runtime.endpoint_key("https://s3.example.com:443/")
    assert runtime.endpoint_key("http://minio:9001") != runtime.endpoint_key("http://minio:9000")
    assert runtime.endpoint_key(None) is None and runtime.endpoint_key("") is None  # AWS S3 itself
