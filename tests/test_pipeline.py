"""The whole pipeline end to end, as a cluster user meets it: a real `ray start --head`
cluster, the real `ray job submit` command line, the work directory on S3 (moto on
loopback), the job's driver SIGKILLed during the detector stage, and the same command
submitted again: finished stages are skipped, the detector resumes from its checkpoint,
and every output (model, held-out metrics, figures, scores, report) is complete.

One scenario on purpose: each whole-pipeline job costs minutes on 2 cores (about 4.5
here), so this is also where the detector fine-tune's lost-worker recovery, driver-kill
resume, export and held-out evaluation are tested. The detector here is a small timm
network (resnet10t): Inception-ResNet-v2's 650 MB Adam checkpoints through S3 would double
the scenario's time; that network's own tests are in test_detector.py."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import httpx
import pytest
import timm
from safetensors.torch import save_file

from deepfake_ray import checkpoint, cli, config, storage
from deepfake_ray.data import sample
from deepfake_ray.detector import loop
from deepfake_ray.errors import UsageError
from deepfake_ray.runtime import free_ports
from tests.checkpoints import registered
from tests.detector_checks import assert_exported_model, assert_held_out_evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny"]
EPOCHS = 4  # several, so the driver is surely killed mid-stage however fast an epoch is
# TEST ONLY fail_at_epoch: a training worker also dies once, at the end of epoch 2 of the
# first job (counted from 1), after its export to best/ and before its checkpoint. At this
# rate epoch 2 beats epoch 1 by far (tiny detector runs: val loss ~0.1 against ~0.35), so
# best/ holds epoch 2 when the worker dies.
DETECTOR = [f"detector.epochs={EPOCHS}", "detector.arch=resnet10t", "detector.fail_at_epoch=1",
            "detector.lr=0.001"]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO
    return env


# Ray 2.60 turns token authentication on for `ray start` whenever ~/.ray/auth_token exists
# (the first in-process `ray.init()` writes one), and the job CLI then needs the token.
# The test cluster runs as a secured one would: token mode, its own token, given to the CLI.
# One node on loopback: nothing can be preempted, so Ray Train's preemption watcher (a
# process per training run) is off, as in the embedded default.
CLUSTER_ENV = {**clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Jobs are submitted with the real `ray job submit` command line; waiting on them uses the
# job server's REST API the CLI itself calls: each `ray` CLI call costs 2-4 CPU-seconds of
# imports, and polling with it every second took one of the two cores from the jobs.
AUTH = {"Authorization": f"Bearer {CLUSTER_ENV['RAY_AUTH_TOKEN']}"}


@pytest.fixture
def head_node(tmp_path):
    """A real single-node cluster, own ports and 4 CPUs, stopped by killing what it started.
    Its own temp dir: `ray start` records its address in the temp dir's
    `ray_current_cluster`, which a bare `ray.init()` or `ray status` on this machine then
    joins; in the default /tmp/ray the suite would leave that pointing at this killed
    cluster (or over a developer's own running one)."""
    gcs, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    machines_cluster = default_cluster_address()
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")  # short: Ray's socket paths live under it
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
         f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", "--num-gpus=0",
         "--object-store-memory=1000000000", "--disable-usage-stats",
         f"--ray-client-server-port={client}",
         # the session's in-process Ray holds the default agent ports: without its own,
         # this head's job agent never starts ("No available agent to submit job")
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}"],
        env=CLUSTER_ENV, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while not answers(f"{address}/api/jobs/"):
        assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        assert time.time() < deadline, "the head node's job server never answered"
        time.sleep(1)
    try:
        yield address
        # (the head writes it some time after its job server answers)
        assert default_cluster_address() == machines_cluster, "the test cluster took over ray_current_cluster"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a throwaway cluster: no need to wait for a clean stop
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)  # its logs: a failure's job logs are in its message


def default_cluster_address() -> str | None:
    """What /tmp/ray/ray_current_cluster says (the cluster a bare `ray.init()` joins), if it exists."""
    try:
        with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as f:
            return f.read()
    except FileNotFoundError:
        return None


def answers(url: str) -> bool:
    try:
        return httpx.get(url, headers=AUTH, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def submit(address: str, submission: str, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --no-wait ...` of jobs/pipeline.py with `args`."""
    command = ["ray", "job", "submit", "--address", address, "--submission-id", submission,
               "--no-wait", "--working-dir", REPO,
               "--runtime-env", os.path.join(REPO, "jobs", "runtime_env.yaml"),
               "--", "python", "jobs/pipeline.py", *args]
    for _ in range(30):  # a fresh head answers /api/jobs/ a little before its job agent is up
        done = subprocess.run(command, env=CLUSTER_ENV, capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(2)
    return done


def job_status(address: str, submission: str) -> str:
    """pending, running, stopped, succeeded or failed."""
    response = httpx.get(f"{address}/api/jobs/{submission}", headers=AUTH, timeout=30)
    response.raise_for_status()
    return response.json()["status"].lower()


def job_log(address: str, submission: str) -> str:
    """The job's log so far ("" when the job server does not answer it now)."""
    try:
        response = httpx.get(f"{address}/api/jobs/{submission}/logs", headers=AUTH, timeout=30)
        response.raise_for_status()
        return response.json()["logs"]
    except (httpx.HTTPError, ValueError, KeyError):
        return ""


def wait_until_ended(address: str, submission: str) -> tuple[str, str]:
    """(final status, the job's whole log) once the job has ended."""
    deadline = time.time() + 600
    while (status := job_status(address, submission)) not in ("succeeded", "failed", "stopped"):
        assert time.time() < deadline, f"job {submission} still {status} after 10 minutes"
        time.sleep(2)
    logs = httpx.get(f"{address}/api/jobs/{submission}/logs", headers=AUTH, timeout=30)
    return status, logs.json()["logs"]


def driver_pids(marker: str) -> list[int]:
    """PIDs of `python jobs/pipeline.py ...` processes whose command line holds `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "jobs/pipeline.py" in cmd and marker in cmd and "ray job submit" not in cmd:
            pids.append(int(entry))
    return pids


def first_reports(log: str) -> dict[int, dict]:
    """Epoch (from 1) -> the validation figures its first try printed."""
    reports = {}
    for epoch, loss, auc in re.findall(r"train-detector: epoch (\d+)/\d+ .*?val_loss (\S+) .*?val_auc (\S+)", log):
        reports.setdefault(int(epoch), {"val_loss": float(loss), "val_auc": float(auc)})
    return reports


def kill_driver_when_registered(address: str, submission: str, run_uri: str, checkpoint: str,
                                marker: str, said: str = "") -> None:
    """SIGKILL the job's driver once `checkpoint` is registered, and its line `said` is in
    the job's log (it can trail the registration on a loaded machine)."""
    deadline = time.time() + 600
    while not registered(run_uri, checkpoint):
        status = job_status(address, submission)
        assert status in ("pending", "running"), status
        assert time.time() < deadline, f"the detector never registered {checkpoint}"
        time.sleep(1)
    logged = time.time() + 30
    while said and time.time() < logged and said not in job_log(address, submission) \
            and job_status(address, submission) in ("pending", "running"):
        time.sleep(1)
    pids = driver_pids(marker)
    assert pids, "the job's driver process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    while job_status(address, submission) != "failed":
        assert time.time() < deadline, "the killed job never showed as failed"
        time.sleep(1)


@pytest.mark.slow
def test_pipeline_job_killed_in_detector_stage_resumes_when_resubmitted(head_node, s3_server, tmp_path):
    runs = f"{s3_server('pipeline-runs')}/runs"
    workdir = f"{runs}/r1"
    # the reals in a folder on the driver's disk, which a cluster's other nodes cannot read:
    # prepare copies them into the S3 work directory first
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(96):
        (faces / f"face_{i:03d}.jpg").write_bytes(sample.face_jpeg(0, i))
    # and the detector's starting weights in a file there too, which train-detector copies
    weights = str(tmp_path / "resnet10t.safetensors")
    save_file(timm.create_model("resnet10t", num_classes=1000).state_dict(), weights)
    args = [*TINY, "--workdir", runs, "--run-name", "r1", "--source", str(faces),
            "--set", f"detector.pretrained={weights}"]
    for override in DETECTOR:
        args += ["--set", override]

    first = submit(head_node, "first", args)
    assert first.returncode == 0, first.stderr[-2000:]
    # killed once epoch 1 is checkpointed: after the lost worker was replaced
    kill_driver_when_registered(head_node, "first", f"{workdir}/detector/run", "epoch_0001", runs,
                                said="train-detector: epoch 2/")
    assert not storage.completed(f"{workdir}/detector")
    _, first_log = wait_until_ended(head_node, "first")
    # the retry trained epoch 2 again from epoch 1's checkpoint, and best/ went back to the
    # best epoch a checkpoint vouches for (assert_exported_model below checks the end result),
    # if the first try of epoch 2 was exported there: as good as epoch 1, as it almost always is
    rolled_back = ("best/ held epoch 2, which no checkpoint vouches for; exported the best "
                   "checkpointed epoch, 1, again") in first_log
    one, two = (first_reports(first_log).get(epoch) for epoch in (1, 2))
    assert one and two, first_log[-4000:]
    if any(abs(two[k] - one[k]) >= 1e-4 for k in one):  # printed to 4 decimals: a tie, unknown
        assert rolled_back == (loop.score(two) >= loop.score(one)), (one, two)

    # the starting weights replaced under the same name before the resubmission: the run
    # goes on from its checkpoints, and records the file it began from
    began_from = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    save_file(timm.create_model("resnet10t", num_classes=1000).state_dict(), weights)
    second = submit(head_node, "second", args)
    assert second.returncode == 0, second.stderr[-2000:]
    status, log = wait_until_ended(head_node, "second")
    assert status == "succeeded", log[-4000:]
    for stage in ("prepare", "train-gan", "generate"):
        assert f"=== {stage} === (complete, skipped)" in log
    assert "was made before" not in log  # made by this version: nothing missing
    copy = f"{workdir}/sources/faces-"
    manifest = storage.read_parquet(f"{workdir}/data/manifest.parquet").column("path").to_pylist()
    assert len(manifest) == 96 and all(p.startswith(copy) for p in manifest)  # read from the copy
    copies = storage.list_files(f"{workdir}/detector/pretrained")  # named by their content: each file's
    assert all(c.rsplit("/", 1)[1].startswith("resnet10t-") for c in copies)
    assert {hashlib.sha256(storage.read_bytes(c)).hexdigest() for c in copies} == {
        began_from, hashlib.sha256(open(weights, "rb").read()).hexdigest()}
    assert f"detector.pretrained={weights} changed since this run began" in log
    exported = storage.read_json(f"{workdir}/detector/model/model.json")  # what it began from, for an audit
    assert exported["pretrained"] == {"weights": weights, "sha256": began_from}  # not the file there now
    assert "held-out test: ROC-AUC" in log and "fakes of this run's own DCGAN only, not other generators'" in log
    assert "falling back to serialize as pickled" not in log  # Ray Data's warning on an empty batch
    assert "train-detector: epoch 4/4" in log and "Reporting training result" not in log  # Ray Train's dict dumps
    assert "Progress bars disabled" not in log and "execution finished in" not in log  # Ray Data's, each epoch
    history = storage.read_json(f"{workdir}/detector/history.json")
    assert [h["epoch"] for h in history] == list(range(EPOCHS))  # each epoch once
    assert {(h["device"], h["precision"]) for h in history} == {("cpu", "float32")}  # how each was trained
    # epoch 1 restored from epoch 0 after the lost worker; then the resubmitted job went on
    # after the last checkpoint the killed one left (never from 0 again)
    assert storage.exists(f"{workdir}/detector/_fault_injected_epoch_1")
    restored = [h["epoch"] for h in history if h["restored"]]
    assert len(restored) == 2 and restored[0] == 1 and 2 <= restored[1] < EPOCHS, history
    timings = storage.read_json(f"{workdir}/pipeline.json")
    assert [s["status"] for s in timings["stages"]] == ["skipped"] * 3 + ["done"] * 4
    # the stages it skipped keep the time the first job spent making them, for the report
    assert all(s["made_in"] > 0 for s in timings["stages"][:3]), timings
    cfg = config.build("tiny", None, DETECTOR, workdir=workdir)
    assert_exported_model(cfg, history)
    # the id that serve's args.model_id names, printed as the model is exported
    exported = checkpoint.model_id(checkpoint.load_meta(f"{workdir}/detector/model"))
    assert f"/detector/model (model {exported})" in log
    # it learnt: the tiny run's fakes (a briefly trained generator's) against its reals
    # (measured: ROC-AUC 1.0 on 11 + 11 test images)
    assert_held_out_evaluation(cfg, min_roc_auc=0.8)
    # the score stage scored each stage's test split, as its manifest draws it, and only that
    scored = storage.read_parquet(f"{workdir}/score/test_scores.parquet").column("path").to_pylist()
    for label, stage in (("real", "data"), ("fake", "fakes")):
        manifest = storage.read_parquet(f"{workdir}/{stage}/manifest.parquet").to_pylist()
        test = {row["sha1"] for row in manifest if row["split"] == "test"}
        named = {os.path.basename(p).removesuffix(".jpg") for p in scored if f"/test_images/{label}/" in p}
        assert test and named == test
    html = storage.read_text(f"{workdir}/report.html")
    assert html.count("data:image/png;base64,") >= 4


@pytest.mark.parametrize("text", ['{"stages": null}', '{"stages": 5}', '[1, 2]', '{"stages": [{"name": ["x"], '
                                  '"completed": {}, "status": "done", "seconds": 1}, "a stage", {"name": "prepare", '
                                  '"status": "done", "seconds": true, "completed": "t"}]}', '{"stages": [', ''])
def test_a_damaged_pipeline_json_costs_only_the_earlier_times(tmp_path, text):
    """A rerun reads the last run's times to keep them for stages it skips: a file edited
    by hand, or cut short, must not stop the pipeline before its first stage."""
    from deepfake_ray import pipeline

    (tmp_path / "pipeline.json").write_text(text)
    assert pipeline.times_to_make(str(tmp_path / "pipeline.json")) == {}
    (tmp_path / "pipeline.json").write_text('{"stages": [{"name": "prepare", "status": "done", "seconds": 4.5, '
                                            '"completed": "2026-12-05T10:00:00"}]}')
    assert pipeline.times_to_make(str(tmp_path / "pipeline.json")) == {("prepare", "2026-12-05T10:00:00"): 4.5}


def test_a_pipeline_stopped_in_a_stage_says_so_once_and_records_it_as_interrupted(tmp_path, capsys,
                                                                                   monkeypatch):
    """A Ctrl-C or SIGTERM in a stage was recorded in pipeline.json as a failure, and the
    pipeline told the user to "fix the cause above" beside the command's line on how to
    resume: there is no cause to fix."""
    from deepfake_ray import cli, storage
    from deepfake_ray.data import prepare

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "run", stopped)
    monkeypatch.setattr(cli, "start_ray", lambda address: None)  # the stage is stopped before it needs Ray
    workdir = str(tmp_path / "w")
    assert cli.main(["pipeline", "--preset", "tiny", "--workdir", workdir]) == 130
    out, err = capsys.readouterr()
    assert "Fix the cause above" not in out + err
    assert [line for line in err.splitlines() if line.startswith("deepfake-ray")] == [
        "deepfake-ray pipeline: interrupted; run the same command again: finished stages are skipped "
        "and a training resumes from its last checkpoint"]
    assert storage.read_json(f"{workdir}/pipeline.json")["stages"] == [
        {"name": "prepare", "status": "interrupted", "seconds": 0.0}]


def test_a_stage_that_fails_where_its_record_cannot_be_written_shows_its_own_error(tmp_path, capsys,
                                                                                     monkeypatch):
    """A full disk or a lost store fails the stage and then pipeline.json's write in its
    handler: that second error replaced the first, and with it the resume hint and the
    stage's name."""
    import errno

    from deepfake_ray import pipeline, storage
    from deepfake_ray.data import prepare

    def failed(*_, **__):
        raise RuntimeError("the stage's own failure")

    def disk_full(uri, record):
        raise OSError(errno.ENOSPC, "No space left on device", uri)

    monkeypatch.setattr(prepare, "run", failed)
    monkeypatch.setattr(pipeline, "preflight", lambda cfg, force: None)
    with pytest.raises(RuntimeError):  # recorded where it can be: the error too, as a job's logs go with its cluster
        pipeline.run(config.build("tiny", workdir=str(tmp_path / "w")))
    assert storage.read_json(f"{tmp_path}/w/pipeline.json")["stages"] == [
        {"name": "prepare", "status": "failed", "seconds": 0.0, "error": "RuntimeError: the stage's own failure"}]
    monkeypatch.setattr(storage, "write_json", disk_full)
    with pytest.raises(RuntimeError, match="the stage's own failure") as raised:
        pipeline.run(config.build("tiny", workdir=str(tmp_path / "w")))
    assert raised.value.pipeline_stage == "prepare"
    err = capsys.readouterr().err
    assert f"warning: could not record the run in {tmp_path}/w/pipeline.json (OSError)" in err
    assert "pipeline stopped at stage 'prepare'" in err


def test_a_pipeline_whose_data_holds_no_test_image_stops_before_the_gan_trains(tmp_path, monkeypatch, capsys):
    """A small folder's hashes can leave a split empty whatever its share: the pipeline
    trained the GAN and the detector, then evaluate found no test image. It stops after
    prepare, which warns, and a rerun stops there too (prepare is complete)."""
    from deepfake_ray import lineage, pipeline
    from deepfake_ray.data import prepare
    from deepfake_ray.gan import train as gan_train

    cfg = config.build("tiny", workdir=str(tmp_path / "w"))
    monkeypatch.setattr(prepare, "run", lambda cfg, force=False, **_: lineage.complete(
        cfg, prepare.STAGE, {"splits": {"train": 16, "val": 2, "test": 0}}, lineage.made(cfg, prepare.STAGE)))
    monkeypatch.setattr(gan_train, "run", lambda *_, **__: pytest.fail("the GAN trained"))
    for _ in range(2):
        with pytest.raises(UsageError, match=rf"{cfg.workdir}/data holds no test image: evaluate measures the "
                                             r"detector there, on images it never saw; add images to the "
                                             r"source, or give it a larger data.splits fraction, then run "
                                             r"the pipeline again with --force"):
            pipeline.run(cfg)
    assert "=== prepare === (complete, skipped)" in capsys.readouterr().out


def test_a_rerun_skips_the_current_stages_and_remakes_those_after_a_redone_one(tmp_path, monkeypatch, capsys):
    """Which stages a pipeline run makes, each stage's work stood in for by its marker
    (the real ones run in the scenario above): all of them the first time; on a rerun
    none but the report (always rebuilt), with the times of the run that made them; after
    the fakes were made again, the detector and every stage after it; under --force a
    stage that fails says to keep --force until a stage has been replaced."""
    from deepfake_ray import lineage, pipeline
    from deepfake_ray.data import prepare
    from deepfake_ray.detector import evaluate, train as detector_train
    from deepfake_ray.gan import generate, train as gan_train

    cfg = config.build("tiny", workdir=str(tmp_path / "my runs"))  # a folder name with a space
    ran, fail = [], set()

    def stand_in(stage: lineage.Stage):
        def run(cfg, force=False, **_):
            ran.append(stage.command)
            if stage.command in fail:
                raise RuntimeError(f"{stage.command} failed")
            exported = {"model_id": "inception_resnet_v2@0123456789ab", "val_auc": 0.97} \
                if stage.command == "train-detector" else {"images": 10, "blank_fakes": 3} \
                if stage.command == "generate" else {}
            return lineage.complete(cfg, stage, {"seconds": 1.0, **exported}, lineage.made(cfg, stage))
        return run

    for module in (prepare, gan_train, generate, detector_train, evaluate):
        monkeypatch.setattr(module, "run", stand_in(module.STAGE))
    monkeypatch.setattr(pipeline, "score_test_split", stand_in(pipeline.SCORE))

    def report(cfg, force=False):
        ran.append("report")
        storage.mark_complete(f"{cfg.workdir}/report", {"report": "report.html"})  # as the real one

    monkeypatch.setattr(pipeline, "write_report", report)
    every = ["prepare", "train-gan", "generate", "train-detector", "evaluate", "score", "report"]

    def statuses() -> list[str]:
        return [s["status"] for s in storage.read_json(f"{cfg.workdir}/pipeline.json")["stages"]]

    pipeline.run(cfg)
    assert ran == every and statuses() == ["done"] * 7
    closing = capsys.readouterr().out.split("=== done ===")[1]  # what to serve, and a cluster's pin of it
    assert "model: inception_resnet_v2@0123456789ab (validation ROC-AUC 0.9700)" in closing
    assert "args.model_id inception_resnet_v2@0123456789ab" in closing
    assert f"serve it: deepfake-ray serve --model '{tmp_path}/my runs/detector/model'  (" in closing  # to copy
    # each stage's time and the total; fakes of no face, which generate warned of, said again
    assert re.search(r"\nstages: prepare \d+s, train-gan \d+s, .*, report \d+s; \d+s in all\n", closing), closing
    assert "warning: 3 of 10 fakes are nearly one grey, no face drawn" in closing
    ran.clear()
    pipeline.run(cfg)
    assert ran == ["report"] and statuses() == ["skipped"] * 6 + ["done"]
    assert all("made_in" in s for s in storage.read_json(f"{cfg.workdir}/pipeline.json")["stages"][:6])
    out = capsys.readouterr().out
    assert "=== train-detector === (complete, skipped)" in out and "train-gan 0s (skipped)" in out
    lineage.complete(cfg, generate.STAGE, {}, lineage.made(cfg, generate.STAGE))  # the fakes made again
    ran.clear()
    pipeline.run(cfg)
    assert ran == ["train-detector", "evaluate", "score", "report"]
    assert statuses() == ["skipped"] * 3 + ["done"] * 4

    capsys.readouterr()
    for failing, again in (("prepare", "the same command again"), ("train-gan", "it again without --force")):
        fail.add(failing)
        with pytest.raises(RuntimeError) as failed:
            pipeline.run(cfg, force=True)
        fail.clear()
        # the command's last line, all a log tail shows, names the stage too
        assert cli.failure_line("pipeline", failed.value, 61.4).startswith(
            f"deepfake-ray pipeline: failed at stage '{failing}' after 61s: RuntimeError: ")
        assert f"pipeline stopped at stage '{failing}'. Fix the cause above, then run {again} " \
               "(finished stages are skipped)" in capsys.readouterr().err
