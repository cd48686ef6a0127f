"""The DCGAN stage: models, the training step, train-gan on Ray Train (files, resume after
a lost worker, a killed driver and a damaged checkpoint), bad input, and generate."""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pytest
import ray.data
import torch
from PIL import Image

from deepfake_ray import checkpoint, cli, config, lineage, storage, training
from deepfake_ray.data import datasets, decode, near_copies, prepare
from deepfake_ray.gan import generate, train
from deepfake_ray.errors import UsageError
from deepfake_ray.gan.train import model_uri
from deepfake_ray.models import dcgan
from tests.checkpoints import registered
from tests.cli_output import error_lines
from tests.images import encode, near_copies as saved_again, rgb
from tests.processes import ended_pid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(workdir, *overrides: str):
    return config.build("tiny", None, list(overrides), workdir=str(workdir))


def with_data(src_workdir, dest) -> str:
    """A fresh work directory holding a copy of prepared reals."""
    shutil.copytree(os.path.join(src_workdir, "data"), os.path.join(dest, "data"))
    return str(dest)


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gan-data")
    prepare.run(tiny(workdir))
    return str(workdir)


# --- models and the step, plain torch ---------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_model_shapes(resolution):
    G, D = dcgan.build(resolution, latent_dim=16, g_width=8, d_width=8)
    images = G(torch.randn(3, 16))
    assert images.shape == (3, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1  # tanh
    assert D(images).shape == (3,)  # one logit per image
    blocks = int(np.log2(resolution)) - 2  # stride-2 blocks between 4x4 and the output size
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) and m.stride == (2, 2)
               for m in G.modules()) == blocks
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in D.modules()) == blocks


def test_init_statistics_and_activations():
    G, D = dcgan.build(64)  # the study's sizes: latent 100, widths 64
    convs = torch.cat([m.weight.flatten() for m in [*G.modules(), *D.modules()]
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
    scales = torch.cat([m.weight for m in [*G.modules(), *D.modules()]
                        if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(convs.mean()) < 1e-3 and abs(convs.std() - 0.02) < 1e-3
    assert abs(scales.mean() - 1) < 0.01 and abs(scales.std() - 0.02) < 0.005
    assert G.latent_dim == 100 and G.width == 64 and D.width == 64
    relus = [m for m in D.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert relus and all(m.negative_slope == 0.2 for m in relus)
    assert isinstance(list(G.modules())[-1], torch.nn.Tanh)


def test_unsupported_resolution_is_refused():
    with pytest.raises(ValueError, match="resolution 48 not supported: use 32, 64 or 128"):
        dcgan.Generator(48)


def test_gan_step_updates_both_networks():
    torch.manual_seed(0)
    G, D = dcgan.build(32, latent_dim=16, g_width=8, d_width=8)
    opt_g, opt_d = dcgan.optimizers(G, D, lr=2e-4, beta1=0.5)
    assert opt_g.defaults["betas"] == (0.5, 0.999) and opt_d.defaults["betas"] == (0.5, 0.999)
    g0, d0 = [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    out = dcgan.gan_step(G, D, opt_g, opt_d, real, torch.randn(8, 16))
    assert set(out) == {"g_loss", "d_loss", "d_real", "d_fake"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert 0 < out["d_real"] < 1 and 0 < out["d_fake"] < 1
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()) if a.dim() > 1)
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()) if a.dim() > 1)


def test_the_discriminator_learns_to_tell_reals_from_fakes():
    """A few steps on one batch of reals: D scores them as real and G's output as fake (a D
    trained on the wrong targets scored both alike, and G had nothing to learn from)."""
    torch.manual_seed(0)
    G, D = dcgan.build(32, latent_dim=16, g_width=8, d_width=8)
    opt_g, opt_d = dcgan.optimizers(G, D)
    real = torch.rand(8, 3, 32, 32) * 0.5 + 0.5  # bright, unlike G's first output
    for _ in range(20):
        out = dcgan.gan_step(G, D, opt_g, opt_d, real, torch.randn(8, 16))
    assert out["d_real"] > 0.7 and out["d_real"] - out["d_fake"] > 0.3, out


def test_fake_pixels_span_the_whole_range_of_the_reals():
    """G's tanh output in [-1, 1] becomes the fakes' pixels: -1 black, 1 white, 0 mid-grey."""
    pixels = dcgan.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 4, 1, 1))
    assert pixels.dtype == torch.uint8 and pixels.flatten().tolist() == [0, 128, 255, 255]


# --- train-gan --------------------------------------------------------------------------

def cli_env() -> dict:
    # only what --address says; no colour setting an in-process command of an earlier test left
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    env["PYTHONPATH"] = REPO
    env["PYTHONUNBUFFERED"] = "1"  # its lines in the log before a SIGKILL, as on a terminal
    return env


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group and wait until it is gone."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"process group {pgid} survived SIGKILL for 60s")


def wait_until_settled(*paths: str, quiet_s: float = 5.0, limit_s: float = 120.0) -> None:
    """Until none of `paths` has changed for `quiet_s`: the killed run's last processes may
    still write (a worker exits only once it notices its raylet is gone). Still changing
    after `limit_s`, the test fails here, not later in a race with that write."""
    deadline, last, since = time.time() + limit_s, None, time.time()
    while time.time() < deadline:
        stamp = [os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in paths]
        if stamp != last:
            last, since = stamp, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.5)
    pytest.fail(f"{paths} still changed {limit_s:.0f} s after the run was killed")


# One tiny run serves every train-gan test below (each Ray Train run costs tens of seconds
# on 2 cores), and it meets each failure the issue names: `deepfake-ray train-gan` on 2
# workers is SIGKILLed after two checkpoints, the newest is half-overwritten (as if its
# upload stopped; so is any newer one its workers wrote on, unregistered), the same command
# runs again and resumes after the older intact one, and then one worker dies once at the
# last epoch and is replaced.
EPOCHS = 6  # the fault waits at the last epoch: far past where the first run is killed
ADAM = ("gan.lr=2.5e-4", "gan.beta1=0.45")  # not the defaults: the run's own must reach Adam
TRAINED = ("resources.workers=2", f"gan.epochs={EPOCHS}", f"gan.fail_at_epoch={EPOCHS - 1}",
           "gan.max_failures=1", *ADAM)


@pytest.fixture(scope="module")
def trained(ray_session, prepared, tmp_path_factory):
    """(workdir, completion summary, the epoch the rerun resumed after, the local copy of a
    checkpoint that a worker killed before the rerun had left in the temp dir)."""
    tmp = tmp_path_factory.mktemp("gan-trained")
    workdir = with_data(prepared, tmp / "w")
    gan = os.path.join(workdir, "gan")
    # the driver joins the session's Ray, as on a cluster: killing it ends the run's actors
    # there, and the session's warm Ray spares a second one's start-up on 2 cores
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "deepfake_ray.cli", "train-gan", "--preset", "tiny",
               "--workdir", workdir, "--address", address] + [a for kv in TRAINED for a in ("--set", kv)]
    log = open(tmp / "first.log", "w")
    first = subprocess.Popen(command, env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 600
    while not registered(gan, "epoch_0001") and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    said = time.time() + 20  # epoch 2's line, printed as its checkpoint registers, can trail it
    while b"train-gan: epoch 2/" not in (tmp / "first.log").read_bytes() and time.time() < said \
            and first.poll() is None:
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    kill_group(first.pid)  # anything it started itself
    # neither Ray's record of the checkpoints nor a folder the workers, going on, start
    wait_until_settled(os.path.join(gan, "checkpoint_manager_snapshot.json"), gan)
    assert registered(gan, "epoch_0001"), (tmp / "first.log").read_text()[-3000:]
    assert b"\x1b[" not in (tmp / "first.log").read_bytes()  # Ray's colour codes, in a log file
    # with DEEPFAKE_RAY_PROGRESS=0, as jobs run: no line of Ray's saying to set a flag ours
    # cleared, no deprecation of Ray Train's own call, no "dataset finished" every epoch
    said = (tmp / "first.log").read_text()
    assert not re.search(r"Progress bars disabled|exclude_resources|execution finished in", said), said[-3000:]
    assert storage.completed(gan) is None, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(gan, f"_fault_injected_epoch_{EPOCHS - 1}"))
    intact = sorted(int(m.group(1)) for n in os.listdir(gan) if (m := re.match(r"epoch_(\d+)$", n))
                    and checkpoint.read_state(os.path.join(gan, n)))
    newest = max(e for e in intact if registered(gan, f"epoch_{e:04d}"))
    older = max(e for e in intact if e < newest)
    # Ray's newest, and any the workers wrote after the kill that it never registered
    for epoch in (e for e in intact if e >= newest):
        with open(os.path.join(gan, f"epoch_{epoch:04d}", "state.pt"), "r+b") as f:
            f.write(b"half-written")
    left = left_by_a_killed_worker()
    # the same command again, in-process on the session's Ray
    assert cli.main(command[3:]) == 0
    return workdir, storage.completed(gan), older, left


def left_by_a_killed_worker() -> str:
    """A checkpoint's local copy as a worker killed during its report leaves it: named by
    a process now ended, last changed an hour ago."""
    left = os.path.join(tempfile.gettempdir(), f"{training.LOCAL_CHECKPOINT_PREFIX}{ended_pid()}-killed")
    os.makedirs(left, exist_ok=True)
    with open(os.path.join(left, "state.pt"), "wb") as f:
        f.write(b"a model and its optimizer")
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))
    return left


def test_train_writes_every_promised_file(trained):
    workdir, summary, *_ = trained
    gan = os.path.join(workdir, "gan")
    history = storage.read_json(os.path.join(gan, "history.json"))
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    for h in history:
        assert {"g_loss", "d_loss", "d_real", "d_fake", "images_per_s", "restored"} <= set(h)
        assert (h["workers"], h["device"], h["precision"]) == (2, "cpu", "float32")  # how, for an audit
        assert h["images_per_s"] > 0 and 0 <= h["d_real"] <= 1 and 0 <= h["d_fake"] <= 1
    last = EPOCHS - 1
    for name in ("samples/epoch_000.png", f"samples/epoch_{last:03d}.png", "losses.png"):
        assert Image.open(os.path.join(gan, name)).format == "PNG"
    grid = Image.open(os.path.join(gan, f"samples/epoch_{last:03d}.png"))
    assert grid.width >= 4 * 32  # 16 fixed-noise samples of 32 px, 4 x 4
    for epoch in (last - 1, last):  # keep=2: the newest two checkpoints, each intact
        assert checkpoint.read_state(os.path.join(gan, f"epoch_{epoch:04d}"))["epoch"] == epoch
    state = checkpoint.read_state(os.path.join(gan, f"epoch_{last:04d}"))
    for optimizer in ("opt_g", "opt_d"):  # the run's gan.lr and gan.beta1, not dcgan's defaults
        group = state[optimizer]["param_groups"][0]
        assert (group["lr"], tuple(group["betas"])) == (2.5e-4, (0.45, 0.999)), optimizer
    assert not os.path.exists(os.path.join(gan, "epoch_0000"))
    weights, meta = checkpoint.load_model(os.path.join(gan, "model"))
    assert meta["arch"] == "dcgan_generator" and meta["resolution"] == 32
    assert meta["latent_dim"] == 16 and meta["g_width"] == 8
    assert meta["config"]["gan"]["epochs"] == EPOCHS
    G = dcgan.generator_from_meta(meta)
    G.load_state_dict(weights)
    assert summary["epochs"] == EPOCHS
    assert summary["discriminator_won"] is (train.discriminator_won(history[-1]) is not None)


@pytest.mark.parametrize("last,won", [
    ({"epoch": 7, "d_fake": 1e-7, "g_loss": 16.2}, True),  # gan.lr=0.002 by epoch 8: grey noise for faces
    ({"epoch": 7, "d_fake": 0.18, "g_loss": 2.9}, False),  # a DCGAN learning faces
    ({"epoch": 7, "d_fake": 0.004, "g_loss": 5.6}, False),  # a confident discriminator, a generator still taught
    ({"epoch": 7, "d_fake": 0.02, "g_loss": 9.0}, False),
])
def test_a_discriminator_that_has_won_is_warned_about(last, won):
    """train-gan ended with success on a generator that drew noise: its last epoch's
    figures (a discriminator calling every fake fake, a vanished generator gradient) now
    get a warning naming what to look at and what to change; said during the run, the
    first epoch it shows, it says to stop the hours of epochs left."""
    said, during = train.discriminator_won(last), train.discriminator_won(last, finished=False)
    assert (said is not None) is won and (during is not None) is won
    if won:
        assert said.startswith("train-gan: warning: the discriminator has won (epoch 8: D(G(z)) 0.0000, "
                               "G loss 16.2)") and "lower gan.lr" in said
        assert "stop it (Ctrl-C, or `ray job stop`)" in during


def test_a_gan_that_diverged_is_refused_with_a_lower_rate_not_exported(trained, tmp_path, capsys):
    """A NaN loss (the figures reduced over workers) stops the loop and exports nothing:
    train-gan had ended "done" on a NaN generator, whose black squares generate then
    blamed on a collapse. No gan.lr the config takes (up to 1) makes this tiny GAN's
    float32 losses NaN in a test's few steps (at 1, G loss 17779 after 300 steps, finite),
    so the run goes on for one epoch from a checkpoint whose generator went NaN."""
    from deepfake_ray.gan import loop

    workdir = str(tmp_path / "w")
    shutil.copytree(trained[0], workdir)
    gan = os.path.join(workdir, "gan")
    newest = os.path.join(gan, f"epoch_{EPOCHS - 1:04d}")
    state = checkpoint.read_state(newest)
    state["G"] = {k: w.fill_(float("nan")) if w.is_floating_point() else w for k, w in state["G"].items()}
    checkpoint.write_state(newest, state, state["history"][-1])
    model = os.path.join(gan, "model", "weights.safetensors")
    before = open(model, "rb").read()  # the 6 epochs' generator, exported when they completed

    more = [a for kv in (*TRAINED, f"gan.epochs={EPOCHS + 1}", "resources.workers=1") for a in ("--set", kv)]
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", workdir, *more)
    assert code == 2 and err == [
        f"deepfake-ray train-gan: error: train-gan diverged at epoch {EPOCHS + 1} (G loss not finite, D loss not finite) at "
        "gan.lr=0.00025: no generator was exported; train anew with a lower rate: deepfake-ray train-gan "
        f"--config {workdir}/config.yaml --workdir {workdir} --force --set gan.lr=2.5e-05"], err
    # that file holds this run's settings (the tiny preset's, not the demo's a bare hint ran)
    saved = config.build(config_file=os.path.join(workdir, "config.yaml"))
    ran = config.build("tiny", overrides=[*TRAINED, f"gan.epochs={EPOCHS + 1}"])
    assert (saved.gan, saved.data.resolution) == (ran.gan, ran.data.resolution)
    history = storage.read_json(os.path.join(gan, "history.json"))
    assert history[-1]["epoch"] == EPOCHS and loop.diverged(history[-1])
    assert open(model, "rb").read() == before  # not overwritten by the NaN generator
    assert storage.completed(gan) is None  # the stage is not complete: generate refuses it
    assert not os.path.exists(os.path.join(gan, f"epoch_{EPOCHS:04d}"))  # nor a NaN epoch kept to resume
    assert loop.diverged({**history[-1], "g_loss": 1.0, "d_loss": float("inf")})  # an infinite loss too


def test_a_collapse_is_warned_once_as_it_shows_not_at_every_epoch_nor_the_last():
    """A collapse shows by epoch 8 of 60; the warning came only after the 60th."""
    from deepfake_ray.gan import loop

    healthy = {"d_real": 0.7, "d_loss": 1.0, "images_per_s": 100.0, "seconds": 5.0, "restored": False,
               "d_fake": 0.2, "g_loss": 2.0}
    won = {**healthy, "d_fake": 1e-6, "g_loss": 15.0}
    said, warned = [], False
    for epoch, m in enumerate([healthy, won, won, won]):
        lines, warned = loop.epoch_lines({**m, "epoch": epoch}, 6, "0:01:00", warned)
        said.append(lines)
    assert [len(lines) for lines in said] == [1, 2, 1, 1]  # the epoch's line; the warning once
    assert said[1][0].endswith("5 s, 0:01:00 left") and "stop it (Ctrl-C" in said[1][1]
    assert loop.epoch_lines({**won, "epoch": 5}, 6, "0:00:00", False)[0] == [
        loop.progress_line({**won, "epoch": 5}, 6, "0:00:00")]  # the last: train-gan's own line says it


def test_each_epoch_line_says_how_long_it_took_and_how_long_is_left(trained):
    """Hours of epochs said only their losses and images/s: nothing told when it ends."""
    log = open(os.path.join(os.path.dirname(trained[0]), "first.log")).read()
    lines = re.findall(r"train-gan: epoch (\d+)/6 .* (\d+) s, (\d+):(\d\d):(\d\d) left", log)
    assert [int(n) for n, *_ in lines][:2] == [1, 2], log[-3000:]  # killed after its second checkpoint
    assert all(int(h) * 3600 + int(m) * 60 + int(s) > 0 for _, _, h, m, s in lines)
    assert training.time_left(30.0, 2, 4) == "0:01:00" and training.time_left(0.0, 0, 3) == "0:00:00"


def test_complete_run_is_not_retrained_nor_unmarked_by_a_refused_one(trained, capsys):
    from deepfake_ray.errors import UsageError

    workdir, summary, *_ = trained
    model = os.path.join(workdir, "gan", "model", "weights.safetensors")
    before = os.stat(model).st_mtime_ns
    assert train.run(tiny(workdir, *TRAINED)) == summary
    assert "already complete" in capsys.readouterr().out
    # --force with a mistake found once the run is planned (the data are 32 px): refused,
    # and the complete stage stays complete, or every stage after it would be redone
    with pytest.raises(UsageError, match="data.resolution=32"):
        train.run(tiny(workdir, *TRAINED, "data.resolution=64"), force=True)
    assert storage.completed(os.path.join(workdir, "gan")) == summary
    assert os.stat(model).st_mtime_ns == before


def test_killed_driver_resumes_past_a_damaged_checkpoint_at_the_next_epoch(trained):
    """The rerun started after the older intact checkpoint, not at 0 and not from the
    half-written newest one; every epoch ended up trained once; and the local checkpoint
    copy a killed worker leaves in the temp dir is gone."""
    workdir, _, older, left = trained
    history = storage.read_json(os.path.join(workdir, "gan", "history.json"))
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    resumed = [(h["epoch"], h["resumed_from"]) for h in history[:-1] if h["restored"]]
    assert resumed == [(older + 1, older)], history
    state = checkpoint.read_state(os.path.join(workdir, "gan", f"epoch_{EPOCHS - 1:04d}"))
    assert state["epoch"] == EPOCHS - 1
    for optimizer in ("opt_g", "opt_d"):  # Adam's moments went on too: it counted every step
        steps = {int(s["step"]) for s in state[optimizer]["state"].values()}
        assert steps == {state["global_step"]}, (optimizer, steps, state["global_step"])
    assert not os.path.exists(left)  # the resumed run's first report removed the dead worker's copy


def test_lost_worker_is_replaced_and_every_epoch_trained_once(trained):
    workdir, summary, *_ = trained
    last = EPOCHS - 1
    assert os.path.exists(os.path.join(workdir, "gan", f"_fault_injected_epoch_{last}"))
    history = storage.read_json(os.path.join(workdir, "gan", "history.json"))
    assert (history[last]["restored"], history[last]["resumed_from"]) == (True, last - 1)
    assert all(h["workers"] == 2 for h in history)
    assert summary["restored"] is True


def test_a_stop_whose_newest_checkpoint_ray_never_registered_resumes_after_it(trained, tmp_path):
    """Stopped, the workers went on: epoch 7's checkpoint written whole and epoch 8's half,
    neither registered by Ray, which lists epoch 6's. Continued, the run resumed from
    epoch 6's and trained 7 again over what history.json held. It resumes after epoch 7
    (1-based), keeps its history, trains only epoch 8, and leaves Ray's folders only."""
    workdir, *_ = trained
    copy = str(tmp_path / "stopped")
    shutil.copytree(workdir, copy)
    gan = os.path.join(copy, "gan")
    state = checkpoint.read_state(os.path.join(gan, f"epoch_{EPOCHS - 1:04d}"))
    steps_per_epoch = state["global_step"] // EPOCHS
    entry = {**state["history"][-1], "epoch": EPOCHS, "restored": False, "resumed_from": None, "g_loss": 123.0}
    # a global step no retrained epoch reaches: the final state must go on from this one
    unregistered = {**state, "epoch": EPOCHS, "global_step": state["global_step"] + 1000,
                    "history": [*state["history"], entry]}
    for epoch in (EPOCHS, EPOCHS + 1):
        os.makedirs(os.path.join(gan, f"epoch_{epoch:04d}"))
        checkpoint.write_state(os.path.join(gan, f"epoch_{epoch:04d}"), {**unregistered, "epoch": epoch})
    with open(os.path.join(gan, f"epoch_{EPOCHS + 1:04d}", "state.pt"), "r+b") as f:
        f.write(b"half-written")
    storage.write_json(os.path.join(gan, "history.json"), unregistered["history"])
    assert not registered(gan, f"epoch_{EPOCHS:04d}")

    more = [a for kv in (*TRAINED[:2], *ADAM, f"gan.epochs={EPOCHS + 2}") for a in ("--set", kv)]
    assert cli.main(["train-gan", "--preset", "tiny", "--workdir", copy, *more]) == 0
    history = storage.read_json(os.path.join(gan, "history.json"))
    assert [h["epoch"] for h in history] == list(range(EPOCHS + 2))
    assert history[EPOCHS] == entry  # not trained again
    assert [(h["epoch"], h["resumed_from"]) for h in history[EPOCHS:] if h["restored"]] == [(EPOCHS + 1, EPOCHS)]
    final = checkpoint.read_state(os.path.join(gan, f"epoch_{EPOCHS + 1:04d}"))
    assert final["global_step"] == unregistered["global_step"] + steps_per_epoch
    meta = checkpoint.load_meta(model_uri(copy))
    assert meta["epochs"] == EPOCHS + 2 and meta["final_metrics"] == history[-1]
    kept = sorted(n for n in os.listdir(gan) if n.startswith("epoch_"))
    assert kept == [f"epoch_{EPOCHS - 1:04d}", f"epoch_{EPOCHS + 1:04d}"], kept
    assert all(registered(gan, n) for n in kept)


def test_a_run_whose_checkpoints_are_damaged_or_gone_is_refused_not_started_over(trained, tmp_path, capsys,
                                                                                monkeypatch):
    """Continued for more epochs, a run must resume from a checkpoint. With none intact
    (an interrupted sync damaged them), or with the ones Ray lists deleted by hand, it
    exits 2 saying so, and what it made stays: it is not trained again from epoch 1."""
    workdir, *_ = trained
    # refused before any worker starts: raised in one, it would be retried max_failures
    # times (with gan.max_failures=-1, checked by hand, without end)
    more = [a for kv in (*TRAINED[:2], *ADAM, f"gan.epochs={EPOCHS + 1}") for a in ("--set", kv)]
    decoded = []  # and before the training split is decoded (minutes at Celeb 100k's size)
    monkeypatch.setattr(train, "train_dataset", lambda *a, real=train.train_dataset:
                        decoded.append(1) or real(*a))
    for damage in ("damaged", "gone"):
        copy = str(tmp_path / damage)
        shutil.copytree(workdir, copy)
        gan = os.path.join(copy, "gan")
        history = storage.read_json(os.path.join(gan, "history.json"))
        kept = [n for n in os.listdir(gan) if re.match(r"epoch_\d+", n)]
        assert len(kept) == 2
        for name in kept:
            if damage == "damaged":
                with open(os.path.join(gan, name, "state.pt"), "r+b") as f:
                    f.write(b"cut short")
            else:
                shutil.rmtree(os.path.join(gan, name))
        assert cli.main(["train-gan", "--preset", "tiny", "--workdir", copy, *more]) == 2
        said = error_lines(capsys)[-1]
        assert said.startswith("deepfake-ray train-gan: error: ") and said.endswith(
            "--force starts the stage over"), said
        assert ("none of the 2 checkpoints of the run in" if damage == "damaged"
                else "Ray cannot resume the run in") in said
        if damage == "gone":  # Ray's own record: read as its trainer starts, after the decode
            assert "a reference to a checkpoint that does not exist anymore" in said
            assert decoded == [1]  # (which the probe sees)
        else:
            assert decoded == []
        assert storage.read_json(os.path.join(gan, "history.json")) == history


# --- bad input: exit 2 with one line ----------------------------------------------------

def test_the_gan_draws_its_batches_from_the_whole_split_not_in_folder_order(prepared):
    stored = datasets.read_split(datasets.data_dir(prepared), "train").take_all()
    position = {decode.decode_jpeg(row["image"]).tobytes(): i for i, row in enumerate(stored)}
    cfg = tiny(prepared)

    ds = train.train_dataset(cfg, len(stored))
    first = [position[row["pixels"].tobytes()] for row in ds.take_all()]
    assert sorted(first) == list(range(len(stored)))  # every training image, once
    batch = first[:16]  # stored in path order, a batch would be 16 neighbours (a span of 15);
    assert max(batch) - min(batch) > 2 * len(batch)  # a random 16 of 77 spans less than 33 ~1e-5 of the time
    # nor the same images in the same batch each epoch (each epoch iterates the dataset again)
    # Blocks of a batch or less: 77 images make 4-5 blocks, so 4 epochs in one order are
    # ~1e-4 likely (CI once met the 1-in-4 chance of the two blocks a shuffle alone left).
    orders = {tuple(position[row["pixels"].tobytes()] for row in ds.take_all()) for _ in range(4)}
    assert len(orders) > 1


@pytest.mark.parametrize("as_jpegs", [False, True])
def test_with_deterministic_a_rerun_draws_the_same_batches_each_epoch_and_epochs_differ(
        prepared, monkeypatch, tmp_path, as_jpegs):
    """deterministic=true: a rerun (a new dataset over the same data/) reads, shuffles and
    orders the blocks as the first run did, epoch by epoch; each epoch still another order.
    So does a run resumed after its newest intact checkpoint, from the epoch after it.
    Decoded once, or kept as JPEGs and decoded as each epoch reads them."""
    if as_jpegs:
        monkeypatch.setattr(datasets, "DECODED_SHARE", 0.0)  # an object store too small for them
    stored = datasets.read_split(datasets.data_dir(prepared), "train").take_all()
    position = {decode.decode_jpeg(row["image"]).tobytes(): i for i, row in enumerate(stored)}
    cfg = tiny(prepared, "deterministic=true")

    def epochs(ds) -> list[tuple[int, ...]]:
        return [tuple(position[row["pixels"].tobytes()] for row in ds.take_all()) for _ in range(3)]

    first, rerun = epochs(train.train_dataset(cfg, len(stored))), epochs(train.train_dataset(cfg, len(stored)))
    assert first == rerun and len(set(first)) > 1
    assert sorted(first[0]) == list(range(len(stored)))
    run = tmp_path / "run"  # checkpointed after epoch 1, and after epoch 2 cut short
    for epoch in (0, 1):
        os.makedirs(run / f"epoch_{epoch:04d}")
        checkpoint.write_state(str(run / f"epoch_{epoch:04d}"), {"epoch": epoch})
    (run / "epoch_0001" / checkpoint.STATE).write_bytes(b"half-written")
    resumed = training.resumable({"train": train.train_dataset(cfg, len(stored))}, str(run), True)["train"]()
    assert epochs(resumed)[:2] == first[1:]


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = cli.main(list(args))
    return code, error_lines(capsys)


def test_bad_input_exits_2_with_one_line(ray_session, prepared, tmp_path, capsys):
    empty = str(tmp_path / "nothing")
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", empty)
    assert code == 2 and len(err) == 1 and "deepfake-ray prepare" in err[0]

    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", prepared,
                        "--set", "data.resolution=48")
    assert code == 2 and len(err) == 1
    assert "resolution 48 not supported: use 32, 64 or 128 (data.resolution)" in err[0]

    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", prepared,
                        "--set", "data.resolution=64")
    assert code == 2 and len(err) == 1 and "data.resolution=32" in err[0]  # data is 32 px
    # a part left empty (as one whose every image was a copy kept in another was) read first
    emptied = with_data(prepared, tmp_path / "emptied")
    images = datasets.images_uri(datasets.data_dir(emptied))
    part = sorted(storage.list_files(images))[0]
    datasets.write_images_part(storage.join(images, "part-0000000000000000.parquet"),
                               storage.read_parquet(part).slice(0, 0))
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", emptied,
                        "--set", "data.resolution=64")
    assert code == 2 and len(err) == 1 and "data.resolution=32" in err[0], err

    # more than the in-process Ray holds: Ray Train would retry its start without end
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", prepared,
                        "--set", "resources.workers=2", "--set", "resources.cpus_per_worker=8")
    assert code == 2 and len(err) == 1, err
    assert "x resources.cpus_per_worker=8 + resources.data_cpus=1 (a Ray Data task beside them) is 17 CPUs " \
        "and the in-process Ray has" in err[0] and "lower them" in err[0]
    # the suggested value fits: rounded to 6 digits, 2/3 came out 0.666667, over by a millionth
    cpus = ray.cluster_resources()["CPU"]
    data_cpus = cpus - 2
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", prepared, "--set", "resources.workers=3",
                        "--set", "resources.cpus_per_worker=2", "--set", f"resources.data_cpus={data_cpus:g}")
    suggested = float(re.search(r"--set resources.cpus_per_worker=([\d.]+)", err[0])[1])
    assert code == 2 and 3 * suggested + data_cpus <= cpus, err

    nothing_to_train = str(tmp_path / "empty")
    data = datasets.data_dir(nothing_to_train)
    storage.write_parquet(datasets.manifest_uri(data), storage.read_parquet(
        datasets.manifest_uri(datasets.data_dir(prepared))).slice(0, 0))
    storage.mark_complete(data, {"images": 0})
    code, err = run_cli(capsys, "train-gan", "--preset", "tiny", "--workdir", nothing_to_train)
    assert code == 2 and len(err) == 1 and "lists no images" in err[0]

    code, err = run_cli(capsys, "generate", "--preset", "tiny", "--workdir", prepared)
    assert code == 2 and len(err) == 1 and "deepfake-ray train-gan" in err[0]


# --- generate ---------------------------------------------------------------------------

def quantization(jpeg: bytes) -> dict:
    return Image.open(io.BytesIO(jpeg)).quantization


@pytest.fixture(scope="module")
def generated(trained):
    workdir, *_ = trained
    return workdir, generate.run(tiny(workdir))


def test_generate_matches_the_reals_layout_and_encoding(generated):
    workdir, summary = generated
    cfg = tiny(workdir)
    reals = storage.read_parquet(datasets.manifest_uri(datasets.data_dir(workdir)))
    fakes = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(workdir)))
    assert fakes.schema == reals.schema.remove_metadata()
    assert sorted(fakes.column("split").to_pylist()) == sorted(reals.column("split").to_pylist())
    assert summary["images"] == reals.num_rows
    rows = fakes.to_pylist()
    assert all(re.fullmatch(r"fake:0:\d{7}", r["path"]) and r["format"] == "JPEG"
               and r["width"] == r["height"] == 32 for r in rows)
    real_images = storage.read_parquet(datasets.images_uri(datasets.data_dir(workdir)))
    fake_images = storage.read_parquet(datasets.images_uri(datasets.fakes_dir(workdir)))
    assert fake_images.schema.remove_metadata() == real_images.schema.remove_metadata()
    assert fake_images.column_names == datasets.IMAGES_COLUMNS  # the split is the manifest's alone
    by_sha1 = {r["sha1"]: r for r in rows}
    real_jpeg = real_images.column("image")[0].as_py()
    for row in fake_images.to_pylist():
        meta = by_sha1[row["sha1"]]
        assert decode.sha1(row["image"]) == row["sha1"] and len(row["image"]) == meta["bytes"]
        assert meta["split"] == prepare.assign_split(row["sha1"], cfg.data.splits)
        assert decode.decode_jpeg(row["image"]).shape == (32, 32, 3)
        assert quantization(row["image"]) == quantization(real_jpeg)  # same JPEG quality
    assert Image.open(os.path.join(workdir, "fakes", "preview.png")).format == "PNG"
    assert fake_images.num_rows == fakes.num_rows == len(rows)  # the checks above saw every fake
    # the session's barely trained generator draws greys: the summary counts what is stored
    assert 0 < summary["blank_fakes"] == sum(near_copies.blank(t) for t in fake_images.column("thumb").to_pylist())


def test_fakes_encoded_unlike_the_reals_are_refused_and_the_complete_ones_kept(generated, capsys):
    workdir, _ = generated
    code, err = run_cli(capsys, "generate", "--preset", "tiny", "--workdir", workdir, "--force",
                        "--set", "data.jpeg_quality=80")
    refused = (f"{workdir}/data was made with data.jpeg_quality=95 (asked: 80), and generate reads it as it "
               "is: leave out data.jpeg_quality to take the settings it was made with, or run `deepfake-ray "
               f"prepare --config {workdir}/config.yaml --workdir {workdir} --force --set data.jpeg_quality=80` "
               "first, with yours")
    assert code == 2 and len(err) == 1 and refused in err[0], err
    assert storage.completed(datasets.fakes_dir(workdir))
    # without --force too: complete fakes are not what that run should get either
    code, err = run_cli(capsys, "generate", "--preset", "tiny", "--workdir", workdir, "--set", "data.jpeg_quality=80")
    assert code == 2 and len(err) == 1 and refused in err[0], err


def test_generate_is_deterministic_for_a_seed(generated, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(generated[0], workdir)

    def fakes(*overrides):
        generate.run(tiny(workdir, *overrides), force=True)
        table = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(workdir)))
        return list(zip(table.column("path").to_pylist(), table.column("sha1").to_pylist()))

    first = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(generated[0])))
    first = list(zip(first.column("path").to_pylist(), first.column("sha1").to_pylist()))
    assert fakes() == first  # the same seed: the same fakes, byte for byte
    other = fakes("seed=1", "gan.num_fakes=12")
    assert len(other) == 12 and {s for _, s in other}.isdisjoint(s for _, s in first)


def test_fakes_are_given_the_jpeg_encodings_the_reals_carry(generated, tmp_path):
    """Reals whose source JPEG is stored at its own size carry its encoding under the
    stored one; a fake stored straight from the generator carried only the stored one, a
    cue the detector could learn instead of the faces. Here half the reals carry q90
    4:2:0: about half the fakes are given it, drawn by their own seed (fake i is the
    generator's picture of latent i, so encoded, then stored), the others are the very
    fakes made before."""
    workdir = str(tmp_path / "w")
    shutil.copytree(generated[0], workdir)
    uri = datasets.manifest_uri(datasets.data_dir(workdir))
    reals, history = storage.read_parquet(uri), "jpeg q90 4:2:0"
    carried = pa.array([history if i % 2 else "" for i in range(reals.num_rows)], pa.large_string())
    storage.write_parquet(uri, reals.set_column(reals.column_names.index("history"), "history", carried))
    summary = generate.run(tiny(workdir), force=True)
    fakes = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(workdir))).to_pylist()
    given = [row["history"] for row in fakes]
    assert set(given) == {history, ""} and 0.25 < given.count(history) / len(given) < 0.75, summary
    assert summary["histories"] == {history: given.count(history)}
    from importlib.metadata import version
    assert summary["device"] == "cpu" and summary["software"]["torch"] == version("torch")  # fakes' bytes are theirs
    before = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(generated[0]))).to_pylist()
    before = {row["path"]: row["sha1"] for row in before}
    both = [row for row in fakes if row["path"] in before]
    assert {row["history"] for row in both} == {history, ""}
    assert all((row["sha1"] == before[row["path"]]) == (row["history"] == "") for row in both)
    state, meta = checkpoint.load_model(model_uri(workdir))
    G = dcgan.generator_from_meta(meta)
    G.load_state_dict(state)
    for row in [next(r for r in fakes if r["history"] == h) for h in (history, "")]:
        z = generate.latent(0, int(row["path"].rsplit(":", 1)[1]), int(meta["latent_dim"]))
        with torch.no_grad():
            drawn = Image.fromarray(dcgan.to_uint8(G.eval()(torch.from_numpy(z[None])))[0].numpy())
        if row["history"]:  # as a JPEG at q90 4:2:0 leaves it
            drawn = Image.open(io.BytesIO(encode(drawn, "JPEG", quality=90, subsampling="4:2:0"))).convert("RGB")
        assert decode.sha1(decode.jpeg_bytes(drawn, 95)) == row["sha1"]


def select_among(pictures: list, reals: list = ()) -> generate.Selection:
    """`generate.select` over candidates 0, 1, ... drawing `pictures` (encoded as the
    generator's are), room for all of them, given these real photos."""
    candidates = [{"index": i, "sha1": decode.sha1(decode.jpeg_bytes(p, 95)), "thumb": near_copies.thumbnail(p)}
                  for i, p in enumerate(pictures)]
    return generate.select([ray.data.from_items(candidates)], dict.fromkeys(datasets.SPLITS, 100),
                           (0.8, 0.1, 0.1), [near_copies.thumbnail(real) for real in reals])


@pytest.mark.parametrize("faces,fills", [(1_150, True), (1_200, True), (1_005, False)])
def test_a_generator_that_repeats_itself_often_fills_the_splits_if_it_can(tmp_path, faces, fills):
    """A generator drawing from 1,150 faces at random, 1,000 fakes wanted: each round was
    sized for the gap alone, so the rounds shrank as repeats grew, the eighth ended one
    fake short, and the line blamed data.splits. Rounds now grow with the share left out;
    a generator of barely more faces than wanted is still refused, as repeating itself."""
    cfg = config.build("tiny", workdir=str(tmp_path / "w"))
    draws = np.random.default_rng(0).integers(0, faces, 10**6)  # candidate index -> its face

    def select_from(rounds):  # the first of each face chosen, all in train
        made = sum(count for _, count in rounds)
        _, first = np.unique(draws[:made], return_index=True)
        chosen = {int(i): "train" for i in np.sort(first)[:1_000]}
        return generate.Selection(chosen, made - len(first), 0, 0)

    want = {"train": 1_000, "val": 0, "test": 0}
    if fills:
        _, picked, _ = generate.draw_rounds(cfg, want, lambda start, count: (start, count), select_from)
        assert len(picked.chosen) == 1_000
    else:
        with pytest.raises(UsageError, match="the generator has collapsed to a few faces"):
            generate.draw_rounds(cfg, want, lambda start, count: (start, count), select_from)


def test_each_fake_face_is_chosen_once_its_near_copies_left_out(ray_session):
    """A generator repeating itself (mode collapse) would put one face in train and test
    alike. Candidates 0-11 are distinct faces, 12-23 the same faces again with other
    pixels (as JPEG at quality 30), 24-25 the first two again, byte for byte."""
    faces = [rgb(i, 32) for i in range(12)]
    again = [Image.open(io.BytesIO(saved_again(face)["q30.jpg"])).convert("RGB") for face in faces]
    picked = select_among(faces + again + faces[:2])
    assert sorted(picked.chosen) == list(range(12))
    assert (picked.repeats, picked.copies_of_reals, picked.blank) == (14, 0, 0)


def test_fakes_that_copy_a_real_photo_are_left_out(ray_session):
    """A generator reproducing its training photos: its copies of them, labelled fake,
    would teach the detector that those real photos are fake. Candidates 0-11 are
    distinct faces, 12 a grey with noise (an untrained generator's: chosen, and counted
    blank); the reals hold 0-2 recompressed, 3 blurred, and ten other faces, one of them
    twice (a group of reals alone, which leaves the candidates be)."""
    grey = np.random.default_rng(0).integers(127, 130, (32, 32, 3)).astype(np.uint8)
    faces = [rgb(i, 32) for i in range(12)] + [Image.fromarray(grey)]
    reals = [saved_again(face)["q30.jpg"] for face in faces[:3]] + [saved_again(faces[3])["blurred.jpg"]]
    reals += [saved_again(rgb(100, 32))["q30.jpg"]]
    reals = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in reals] + [rgb(i, 32) for i in range(100, 110)]
    picked = select_among(faces, reals)
    assert sorted(picked.chosen) == list(range(4, 13))
    assert (picked.repeats, picked.copies_of_reals, picked.blank) == (0, 4, 1)


def test_reals_stored_without_thumbnails_get_them_from_their_images(prepared, tmp_path):
    """A data/ prepared before thumbnails were stored beside the images: `generate` makes
    them from the stored images, alike to what `prepare` now stores."""
    stored = datasets.thumbnails(datasets.data_dir(prepared))  # sha1 -> thumbnail
    old = os.path.join(tmp_path, "data")
    os.makedirs(datasets.images_uri(old))
    for name in os.listdir(datasets.images_uri(datasets.data_dir(prepared))):
        part = storage.read_parquet(os.path.join(datasets.images_uri(datasets.data_dir(prepared)), name))
        datasets.write_images_part(os.path.join(datasets.images_uri(old), name), part.drop_columns(["thumb"]))
    made = datasets.thumbnails(old)
    manifest = storage.read_parquet(datasets.manifest_uri(datasets.data_dir(prepared)))
    assert sorted(made) == sorted(stored) == sorted(manifest.column("sha1").to_pylist())
    order = sorted(made)
    alike = near_copies.unit_vectors([made[h] for h in order]) * near_copies.unit_vectors([stored[h] for h in order])
    assert (alike.sum(axis=1) >= 0.99).all()  # each image's own, but for its JPEG encoding


def add_reals(workdir: str, images: list[dict]) -> None:
    """Stored images (sha1, image, thumb) put among the reals of `workdir`, as if prepared
    from its source, leaving data/'s marker (so its identity) as it was."""
    part = storage.join(datasets.images_uri(datasets.data_dir(workdir)), "added.parquet")
    reals = storage.read_parquet(datasets.images_uri(datasets.data_dir(workdir)))
    datasets.write_images_part(part, pa.Table.from_pylist(images, schema=reals.schema))


def with_contrast(workdir: str, state: dict, meta: dict) -> None:
    """Save the generator with its output layer's weights 300 times larger. The session's
    generator, barely trained, draws faces of one grey (pixels within a level or two),
    which have no near copies to find: this one draws faces as varied as a trained one."""
    last = [name for name, w in state.items() if w.ndim == 4][-1]
    checkpoint.save_model(model_uri(workdir), {**state, last: state[last] * 300}, meta)


def test_generate_leaves_out_the_fakes_that_copy_a_real_photo(generated, tmp_path, capsys):
    """The reals here hold the first five faces this generator draws (as one that memorised
    them would): the fakes leave those out, make others in their place, and say so."""
    workdir = str(tmp_path / "w")
    shutil.copytree(generated[0], workdir)
    with_contrast(workdir, *checkpoint.load_model(model_uri(workdir)))
    first = generate.FakeMaker(model_uri(workdir), 0, 95, False)({"id": np.arange(5)}, 0)
    add_reals(workdir, [{"sha1": sha1, "image": image, "thumb": thumb}
                        for sha1, image, thumb in zip(first["sha1"], first["image"], first["thumb"])])
    summary = generate.run(tiny(workdir), force=True)
    out, err = capsys.readouterr()
    assert summary["copies_of_reals_left_out"] >= 5 and "near copies of real photos" in out
    assert summary["blank_fakes"] == 0 and "nearly one grey" not in err  # faces with contrast
    fakes = storage.read_parquet(datasets.manifest_uri(datasets.fakes_dir(workdir))).to_pylist()
    reals = storage.read_parquet(datasets.manifest_uri(datasets.data_dir(workdir)))
    assert len(fakes) == summary["images"] == reals.num_rows  # others made in their place
    assert not {f"fake:0:{i:07d}" for i in range(5)} & {row["path"] for row in fakes}


def test_generate_run_alone_records_the_settings_the_gan_was_made_with(trained, tmp_path, capsys):
    """Run with the preset's 2 epochs on a GAN of 6, it recorded 2 in config.yaml: the hints'
    `--config W/config.yaml` then refused the GAN (or trained it on, with more epochs)."""
    workdir = str(tmp_path / "w")
    shutil.copytree(trained[0], workdir)
    shutil.rmtree(datasets.fakes_dir(workdir), ignore_errors=True)  # made by `generated`, if it ran
    assert cli.main(["generate", "--preset", "tiny", "--workdir", workdir]) == 0
    assert f"gan.epochs={EPOCHS} (asked: 2)" in capsys.readouterr().out
    settings = os.path.join(workdir, "config.yaml")
    assert config.build("demo", settings).gan.epochs == EPOCHS
    assert cli.main(["train-gan", "--config", settings, "--workdir", workdir]) == 0
    assert "is already complete" in capsys.readouterr().out


def test_a_generator_that_only_repeats_itself_exits_2_naming_the_fix(generated, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    shutil.copytree(generated[0], workdir)
    state, meta = checkpoint.load_model(model_uri(workdir))
    first = next(name for name, w in state.items() if w.ndim == 4)  # latent -> 4x4 projection
    state[first].zero_()  # the input no longer counts: every fake the same face
    with_contrast(workdir, state, meta)
    code, err = run_cli(capsys, "generate", "--preset", "tiny", "--workdir", workdir, "--force")
    assert code == 2 and len(err) == 1
    assert "the generator has collapsed to a few faces" in err[0] and "train-gan --force" in err[0]
    # and when that one face is a real photo, the generator reproduces what it trained on
    face = generate.FakeMaker(model_uri(workdir), 0, 95, False)({"id": np.arange(1)}, 0)
    add_reals(workdir, [{"sha1": face["sha1"][0], "image": face["image"][0],
                         "thumb": face["thumb"][0]}])
    code, err = run_cli(capsys, "generate", "--preset", "tiny", "--workdir", workdir, "--force")
    assert code == 2 and len(err) == 1
    assert "near copies of real photos" in err[0] and "reproduces the photos it trained on" in err[0]


def test_stages_record_what_they_were_made_from(generated, tmp_path, capsys):
    """A rerun with other settings is refused before Ray; operational values do not count;
    more epochs continue a finished training; a stage whose input was redone is made
    again; one whose input is out of date is refused."""
    workdir = str(tmp_path / "w")
    shutil.copytree(generated[0], workdir)
    train_gan = ["train-gan", "--preset", "tiny", "--workdir", workdir]
    for kv in TRAINED:
        train_gan += ["--set", kv]
    assert cli.main(train_gan + ["--set", "gan.lr=0.001"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "gan was made with gan.lr=0.00025 (asked: 0.001)" in err[0] and "--force" in err[0]
    own = err[0].rsplit("its own settings (", 1)[1].rstrip(")")  # the advice, followed as given
    assert cli.main(train_gan + ["--set", "gan.lr=0.001", *shlex.split(own)]) == 0
    assert "is already complete" in capsys.readouterr().out
    assert cli.main(["pipeline", "--preset", "tiny", "--workdir", workdir, "--set", "seed=3"]) == 2
    assert "seed=0 (asked: 3)" in error_lines(capsys)[0]
    generate_again = ["generate", "--preset", "tiny", "--workdir", workdir]
    assert cli.main(generate_again + ["--set", "resources.workers=3", "--set", "gan.generate_batch_size=7"]) == 0
    out = capsys.readouterr().out
    assert "is already complete" in out and "note:" not in out  # another cluster's resources: still current
    marker = os.path.join(datasets.fakes_dir(workdir), storage.COMPLETE)
    current = storage.read_json(marker)
    for key, says in (("repeats_left_out", "repeated faces were left out"),  # fakes of older versions
                      ("copies_of_reals_left_out", "fakes copying a real photo were left out"),
                      ("flipped_copies_left_out", "flipped copies counted")):
        storage.write_json(marker, {k: v for k, v in current.items() if k != key})
        assert cli.main(generate_again) == 0
        assert f"generate: note: {datasets.fakes_dir(workdir)} was made before {says}" in capsys.readouterr().out

    # one epoch more, on one worker: the finished run goes on from its last checkpoint
    assert cli.main(train_gan + ["--set", f"gan.epochs={EPOCHS + 1}", "--set", "resources.workers=1"]) == 0
    assert f"continuing {workdir}/gan from its last checkpoint (gan.epochs {EPOCHS} -> {EPOCHS + 1})" \
        in capsys.readouterr().out
    history = storage.read_json(os.path.join(workdir, "gan", "history.json"))
    assert [h["epoch"] for h in history] == list(range(EPOCHS + 1))
    assert (history[-1]["restored"], history[-1]["resumed_from"]) == (True, EPOCHS - 1)

    fakes = datasets.fakes_dir(workdir)
    before = storage.read_parquet(datasets.manifest_uri(fakes)).column("sha1").to_pylist()
    generate.run(tiny(workdir))  # the generator changed: the fakes are made again
    assert "gan/ changed since" in capsys.readouterr().out
    after = storage.read_parquet(datasets.manifest_uri(fakes)).column("sha1").to_pylist()
    # remade (kept, all would be the same): some of a barely trained generator's near-flat
    # greys may encode to the same bytes after one more epoch, so not necessarily all differ
    assert len(after) == len(before) and set(after) != set(before)
    assert storage.completed(fakes)["inputs"]["gan"] == lineage.identity(tiny(workdir), "gan")

    prepare.run(tiny(workdir), force=True)  # the reals redone: the generator is out of date
    assert cli.main(generate_again) == 2
    assert ("is out of date: data/ changed since it was made. Run `deepfake-ray train-gan --config "
            f"{workdir}/config.yaml --workdir {workdir}` first") in error_lines(capsys)[0]


def test_an_unfinished_run_whose_input_was_redone_starts_over(prepared, tmp_path, capsys):
    """Checkpoints that learned from reals since re-prepared are not resumed from."""
    cfg = tiny(with_data(prepared, tmp_path / "w"))
    lineage.start(cfg, train.STAGE, lineage.plan(cfg, train.STAGE, force=False))  # as train-gan begins
    assert not lineage.plan(cfg, train.STAGE, force=False).redo  # a resubmission resumes
    prepare.run(cfg, force=True)
    assert lineage.plan(cfg, train.STAGE, force=False).redo  # train-gan deletes its run first
    assert "data/ changed since the unfinished run in" in capsys.readouterr().out


def test_an_unfinished_run_resumes_only_with_the_settings_it_began_with(prepared, tmp_path, capsys):
    """Its checkpoints hold the old settings (the optimizer's rates too), which would quietly
    win over the new ones while its records showed the new: refused before Ray starts."""
    workdir = with_data(prepared, tmp_path / "w")
    cfg = tiny(workdir)
    lineage.start(cfg, train.STAGE, lineage.plan(cfg, train.STAGE, force=False))  # as train-gan begins
    train_gan = ["train-gan", "--preset", "tiny", "--workdir", workdir]
    for changed, text in (("gan.lr=0.002", "gan.lr=0.0002 (asked: 0.002)"),
                          (f"gan.epochs={cfg.gan.epochs - 1}", f"gan.epochs={cfg.gan.epochs} (asked:")):
        for command in (train_gan, ["pipeline", "--preset", "tiny", "--workdir", workdir]):
            assert cli.main(command + ["--set", changed]) == 2
            err = error_lines(capsys)
            assert len(err) == 1 and f"{workdir}/gan holds an unfinished run begun with {text}" in err[0]
            hint = re.search(r"`(deepfake-ray train-gan [^`]*)` to start it over there with yours", err[0])
            assert hint and f"--workdir {workdir} --force " in hint[1] and f"--set {changed}" in hint[1], err[0]  # even from pipeline
    more = tiny(workdir, f"gan.epochs={cfg.gan.epochs + 5}")  # a longer run: it goes on
    assert not lineage.plan(more, train.STAGE, force=False).redo
    assert lineage.plan(tiny(workdir, "gan.lr=0.002"), train.STAGE, force=True).redo


def test_too_few_training_images_for_the_gan_name_a_fix_that_works(tmp_path):
    """One training image: no batch size helps (batch norm needs two), so the line says to
    prepare more, not "lower gan.batch_size", which the config refuses below 2."""
    from deepfake_ray.data import sample
    from deepfake_ray.errors import UsageError
    from tests.detector_stages import write_stage

    faces = [(sample.face(0, i, 32), split) for i, split in enumerate(["train", "val", "test"] + ["train"] * 5)]
    write_stage(datasets.data_dir(str(tmp_path)), faces[:3])
    with pytest.raises(UsageError, match=r"the train split holds 1 image\(s\), 1 for each of resources.workers=1; "
                                         r"the DCGAN needs 2 or more each: prepare more images$"):
        train.check_data(tiny(str(tmp_path), "data.resolution=32"))
    write_stage(datasets.data_dir(str(tmp_path)), faces)
    with pytest.raises(UsageError, match="6 training images give 3 per worker, fewer than gan.batch_size=8: "
                                         "set gan.batch_size=3 or lower or use fewer workers"):
        train.check_data(tiny(str(tmp_path), "data.resolution=32", "gan.batch_size=8", "resources.workers=2"))
