"""Which stages a run keeps, continues or makes anew, from the markers in a work directory
(written by the same calls the stages make when they complete; no stage runs here)."""
from __future__ import annotations

import re

import pytest

from deepfake_ray import config, lineage, pipeline
from deepfake_ray.data import prepare
from deepfake_ray.detector import evaluate, train as detector_train
from deepfake_ray.errors import UsageError
from deepfake_ray.gan import generate, train as gan_train
from tests.cli_output import error_lines

STAGES = (prepare.STAGE, gan_train.STAGE, generate.STAGE, detector_train.STAGE, evaluate.STAGE)


def completed_run(workdir: str):
    """A work directory whose every stage completed with the tiny preset's settings."""
    cfg = config.build("tiny", workdir=workdir)
    for stage in STAGES:
        lineage.complete(cfg, stage, {}, lineage.made(cfg, stage))
    return cfg


def test_a_stage_whose_input_was_remade_is_made_anew_with_any_settings(tmp_path):
    """Its old output is thrown away anyway: other settings for it protect nothing."""
    made = completed_run(str(tmp_path))
    other = config.build("tiny", None, ["detector.jpeg_aug_prob=0.5"], workdir=made.workdir)
    with pytest.raises(UsageError, match=r"detector.jpeg_aug_prob=0.0 \(asked: 0.5\)"):
        lineage.current(other, detector_train.STAGE)  # it would be kept: refused
    lineage.complete(made, generate.STAGE, {}, lineage.made(made, generate.STAGE))  # fakes made again
    assert lineage.current(other, detector_train.STAGE) is None  # to be made anew: fine


def test_a_pipeline_that_continues_the_gan_takes_new_settings_for_the_stages_after_it(tmp_path):
    """More GAN epochs remake the fakes, so the detector is made anew: `pipeline --set
    gan.epochs=N --set detector.X=...` was refused, leaving only --force (all from scratch)."""
    made = completed_run(str(tmp_path))
    more = config.build("tiny", None, [f"gan.epochs={made.gan.epochs + 2}", "detector.jpeg_aug_prob=0.5"],
                        workdir=made.workdir)
    pipeline.preflight(more)  # no UsageError
    alone = config.build("tiny", None, ["detector.jpeg_aug_prob=0.5"], workdir=made.workdir)
    with pytest.raises(UsageError, match=r"detector.jpeg_aug_prob=0.0 \(asked: 0.5\)"):
        pipeline.preflight(alone)  # nothing before it changes: the detector would be kept


def test_a_stage_run_before_the_stages_it_reads_names_the_command_that_makes_them(tmp_path, monkeypatch, capsys):
    """Refused in a second, before Ray starts and before anything is written there: a
    newcomer running the commands out of order learns which one comes first."""
    from deepfake_ray import cli, runtime, storage

    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)
    workdir = tmp_path / "w"
    cfg = config.build("tiny", workdir=str(workdir))

    def refusals(*commands: str, force: tuple[str, ...] = ()) -> list[str]:
        lines = []
        for command in commands:
            assert cli.main([command, "--preset", "tiny", "--workdir", str(workdir), *force]) == 2, command
            lines += error_lines(capsys)
        return lines

    def missing(what: str, folder: str, made_by: str) -> str:
        return (f"no {what} in {workdir}/{folder}: run {made_by} with this --workdir first, "
                "or the whole `deepfake-ray pipeline`")

    first = missing("prepared images", "data", "`deepfake-ray prepare`")
    stages = ("train-gan", "generate", "train-detector", "tune", "evaluate")
    assert refusals(*stages) == [f"deepfake-ray {c}: error: {first}" for c in stages]
    assert refusals("train-gan", force=("--force",)) == [f"deepfake-ray train-gan: error: {first}"]
    assert not workdir.exists()  # no lock, no config.yaml

    lineage.complete(cfg, prepare.STAGE, {}, lineage.made(cfg, prepare.STAGE))
    assert refusals("generate", "train-detector") == [
        f"deepfake-ray generate: error: {missing('trained generator', 'gan', '`deepfake-ray train-gan`')}",
        # the first stage to run, not the one before the refused one: generate would be refused next
        f"deepfake-ray train-detector: error: no generated fakes in {workdir}/fakes, nor trained generator in "
        f"{workdir}/gan: run `deepfake-ray train-gan`, then `deepfake-ray generate` with this --workdir, "
        "or the whole `deepfake-ray pipeline`"]
    for stage in (gan_train.STAGE, generate.STAGE):
        lineage.complete(cfg, stage, {}, lineage.made(cfg, stage))
    detector = missing("finished detector", "detector", "`deepfake-ray train-detector` (or `deepfake-ray tune`)")
    assert refusals("evaluate") == [f"deepfake-ray evaluate: error: {detector}"]
    assert sorted(storage.list_files(str(workdir))) == sorted(
        storage.join(str(workdir), f, "_COMPLETE.json") for f in ("data", "gan", "fakes"))
    # a run's work directory (its config.yaml there): the hint runs its own settings, not the
    # demo preset's, which a bare `deepfake-ray train-detector` would, to be refused
    storage.write_text(str(workdir / "config.yaml"), config.to_yaml(cfg))
    saved = f"--config {workdir}/config.yaml --workdir {workdir}"
    assert refusals("evaluate") == [
        f"deepfake-ray evaluate: error: no finished detector in {workdir}/detector: run `deepfake-ray "
        f"train-detector {saved}` (or `deepfake-ray tune {saved}`) first, or the whole `deepfake-ray "
        f"pipeline {saved}`"]


def test_a_stage_run_alone_takes_the_settings_the_stages_it_reads_were_made_with(tmp_path, capsys):
    """`train-detector` after a GAN of 8 epochs, run with the preset's 2: it was accepted and
    config.yaml recorded 2, so `pipeline --config W/config.yaml`, as every hint says, was refused."""
    made = config.build("tiny", None, ["gan.epochs=8", "data.jpeg_quality=90", "detector.lr=0.01"],
                        workdir=str(tmp_path))
    for stage in STAGES[:3]:  # data, gan, fakes
        lineage.complete(made, stage, {}, lineage.made(made, stage))
    asked = config.build("tiny", None, ["detector.lr=0.002"], workdir=made.workdir)
    taken, note = lineage.as_made_upstream(asked, detector_train.STAGE)
    assert (taken.gan.epochs, taken.data.jpeg_quality, taken.detector.lr) == (8, 90, 0.002)  # its own: as asked
    assert note.startswith("train-detector: note: the stages it reads were made with")
    assert "data.jpeg_quality=90 (asked: 95)" in note and f"gan.epochs=8 (asked: {asked.gan.epochs})" in note
    for stage in STAGES[:3]:
        assert lineage.current(taken, stage) is not None  # what a rerun with its config.yaml finds
    assert lineage.as_made_upstream(taken, detector_train.STAGE) == (taken, "")
    # asked for on the command line, not left to the preset: refused, as it was not made so
    with pytest.raises(UsageError, match=rf"{tmp_path}/gan was made with gan.epochs=8 \(asked: 2\), and "
                                         r"train-detector reads it as it is: leave out gan.epochs to take the "
                                         r"settings it was made with, or run `deepfake-ray train-gan --workdir .* --force --set seed=0 "
                                         r"--set gan.epochs=2 --set gan.batch_size=16 .*` first, with yours"):
        lineage.as_made_upstream(asked, detector_train.STAGE, {"gan.epochs", "detector.lr"})


def test_a_setting_taken_from_the_stages_it_reads_that_the_stage_cannot_use_is_refused_first(tmp_path, capsys):
    """data/ prepared at 48 px (prepare takes any size; the DCGAN has layers for 32, 64 and
    128 only): `train-gan` left to the preset's resolution took 48 from it, started Ray and
    failed there on a line naming data.resolution alone, which the user had not set. Now,
    before Ray starts or anything is written: where the 48 comes from and what to run."""
    from deepfake_ray import cli

    workdir = tmp_path / "w"
    made = config.build("tiny", None, ["data.resolution=48"], workdir=str(workdir))
    lineage.complete(made, prepare.STAGE, {}, lineage.made(made, prepare.STAGE))
    assert cli.main(["train-gan", "--preset", "tiny", "--workdir", str(workdir)]) == 2
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.strip()] == [
        f"deepfake-ray train-gan: error: {workdir}/data was made with data.resolution=48 (asked: 32), which "
        "train-gan cannot take: resolution 48 not supported: use 32, 64 or 128 (data.resolution); run "
        f"`deepfake-ray prepare --workdir {workdir} --force` with settings it takes (then the stages after it)"]
    assert "ray: " not in out and "note:" not in out  # no Ray started, no note of settings taken
    assert sorted(p.name for p in workdir.iterdir()) == ["data"]  # no config.yaml, no gan/


def test_evaluate_with_the_runs_config_yaml_takes_the_rate_a_sweep_chose(tmp_path, monkeypatch, capsys):
    """A detector `tune` chose records the best trial's rate, which the run's config.yaml
    (the preset's detector.lr) does not hold: `evaluate --config W/config.yaml`, the command
    every hint prints, was refused as asking for another rate, and told to retrain the
    detector, throwing the sweep away."""
    from deepfake_ray import cli, runtime

    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)
    made = completed_run(str(tmp_path / "w"))
    swept = {**lineage.made(made, detector_train.STAGE)}
    swept["settings"] = {**swept["settings"], "detector.lr": 3.7e-4, "detector.epochs": made.tune.epochs}
    lineage.complete(made, detector_train.STAGE, {"tuned": True, "lr": 3.7e-4}, swept)
    lineage.complete(made, evaluate.STAGE, {}, lineage.made(made, evaluate.STAGE))
    saved = tmp_path / "w" / "config.yaml"
    saved.write_text(config.to_yaml(made))
    assert cli.main(["evaluate", "--config", str(saved), "--workdir", made.workdir]) == 0, error_lines(capsys)
    assert "is already complete" in capsys.readouterr().out
    with pytest.raises(UsageError, match="best trial of `deepfake-ray tune`"):
        lineage.current(made, detector_train.STAGE)  # train-detector itself still says whose it is


def test_generate_run_alone_takes_the_jpeg_quality_the_reals_were_stored_at(tmp_path, monkeypatch, capsys):
    """generate's own check of the fakes' encoding ran before the reals' settings were taken:
    reals stored at data.jpeg_quality=90, then `generate --workdir W` (the preset's 95) was
    refused, where train-gan and train-detector take the 90. Asked for on the command line,
    another quality is still refused."""
    from deepfake_ray import cli, runtime

    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)
    made = config.build("tiny", None, ["data.jpeg_quality=90"], workdir=str(tmp_path / "w"))
    for stage in STAGES[:3]:  # data, gan, fakes
        lineage.complete(made, stage, {"images": 10}, lineage.made(made, stage))
    command = ["generate", "--preset", "tiny", "--workdir", made.workdir]
    assert cli.main(command) == 0, error_lines(capsys)
    out = capsys.readouterr().out
    assert "is already complete" in out and "were made with" not in out  # took nothing: ran nothing
    assert cli.main([*command, "--set", "data.jpeg_quality=95"]) == 2
    assert "leave out data.jpeg_quality" in error_lines(capsys)[0]


@pytest.mark.parametrize("data_redone", [True, False])
def test_a_redo_cut_short_while_clearing_starts_over_when_run_again(data_redone, tmp_path, monkeypatch):
    """A redo (--force, or data made anew) clears a training's folder. Cut short before the
    checkpoints were gone, the next run resumed them as its own: with the data since redone,
    checkpoints of data that is gone; after `--force` (whose stop line says to run it again
    without), the very run the user asked to start over (a finished sweep was republished)."""
    from deepfake_ray import storage

    made = completed_run(str(tmp_path))
    gan = lineage.uri(made, gan_train.STAGE)
    storage.write_json(storage.join(gan, lineage.STARTED), lineage.made(made, gan_train.STAGE))
    storage.write_bytes(storage.join(gan, "run", "checkpoint_epoch_0001", "state.pt"), b"weights")
    delete_dir = storage.delete_dir

    def cut_short(uri):
        if uri.endswith("run"):
            raise KeyboardInterrupt
        delete_dir(uri)

    monkeypatch.setattr(storage, "delete_dir", cut_short)
    with pytest.raises(KeyboardInterrupt):
        lineage.clear(gan)
    assert storage.completed(gan) is None  # no marker vouches for what is left
    if data_redone:
        lineage.complete(made, prepare.STAGE, {}, lineage.made(made, prepare.STAGE))
    assert lineage.plan(made, gan_train.STAGE, force=False).redo  # so the checkpoints are not resumed
    assert lineage.current(made, gan_train.STAGE) is None
    monkeypatch.undo()
    lineage.clear(gan)  # a clearing that finishes leaves nothing to start over
    assert not storage.exists(storage.join(gan, lineage.STARTED)) and not storage.exists(storage.join(gan, "run"))


def other_value(value):
    """Another value of a setting's type: never a higher epoch count, which would continue."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value - 1
    if isinstance(value, str):
        return value + "0"
    if isinstance(value, (list, tuple)):
        return [*value, 0]
    return 1


def test_a_rerun_asking_another_value_of_any_setting_a_stage_records_is_refused(tmp_path):
    """Every setting a stage records decides its output: one left out of the comparison
    would have a rerun asking another value of it reuse the old output as if made with it."""
    from deepfake_ray.detector import tune

    made = completed_run(str(tmp_path))
    lineage.complete(made, tune.STAGE, {}, lineage.made(made, tune.STAGE))
    compared = 0
    for stage in (*STAGES, tune.STAGE):
        done = lineage.marker(made, stage.folder)
        for key, value in lineage.made(made, stage)["settings"].items():
            asked = lineage.made(made, stage)
            asked["settings"][key] = other_value(value)
            with pytest.raises(UsageError, match=rf"was made with {re.escape(key)}="):
                lineage.check_recorded_settings(made, stage, done, asked)
            compared += 1
    assert compared > 40  # every stage's, not none


def test_a_stage_run_alone_refuses_an_upstream_setting_its_command_line_or_config_file_asks(
        tmp_path, monkeypatch, capsys):
    """`train-detector` reads the GAN's fakes as they are: a GAN setting asked with --set or
    in a --config file that they were not made with is refused before Ray starts (taking
    the recorded one instead would record settings the user did not ask for)."""
    from deepfake_ray import cli, runtime

    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)
    made = config.build("tiny", None, ["gan.epochs=8"], workdir=str(tmp_path / "w"))
    for stage in STAGES[:3]:  # data, gan, fakes
        lineage.complete(made, stage, {}, lineage.made(made, stage))
    mine = tmp_path / "mine.yaml"
    mine.write_text("gan:\n  epochs: 3\n")
    command = ["train-detector", "--preset", "tiny", "--workdir", made.workdir]
    for asked in (["--set", "gan.epochs=3"], ["--config", str(mine)]):
        assert cli.main(command + asked) == 2, asked
        err = error_lines(capsys)
        assert err == [f"deepfake-ray train-detector: error: {made.workdir}/gan was made with gan.epochs=8 "
                       "(asked: 3), and train-detector reads it as it is: leave out gan.epochs to take the "
                       f"settings it was made with, or run `deepfake-ray train-gan --workdir {made.workdir} --force "
                       "--set seed=0 --set gan.epochs=3 --set gan.batch_size=16 --set gan.lr=0.0002 --set gan.beta1=0.5 "
                       "--set gan.latent_dim=16 --set gan.g_width=8 --set gan.d_width=8` first, with yours (then "
                       "the stages after it)"], asked  # no config.yaml there: every setting of the stage, bare
    # the run's config.yaml there, another run's batch size in it: --set for what differs from it
    from deepfake_ray import storage

    storage.write_text(f"{made.workdir}/config.yaml", config.to_yaml(config.merge(made, {"gan": {"batch_size": 8}})))
    assert cli.main(command + ["--set", "gan.epochs=3"]) == 2
    assert error_lines(capsys)[0].endswith(
        f"run `deepfake-ray train-gan --config {made.workdir}/config.yaml --workdir {made.workdir} --force --set "
        "gan.epochs=3 --set gan.batch_size=16` first, with yours (then the stages after it)")
    # one there that cannot be read: still named (run, it says why), not the demo preset's bare command
    storage.write_text(f"{made.workdir}/config.yaml", "gan: [")
    assert cli.main(command + ["--set", "gan.epochs=3"]) == 2
    assert f"run `deepfake-ray train-gan --config {made.workdir}/config.yaml --workdir {made.workdir} --force " \
           "--set seed=0 --set gan.epochs=3" in error_lines(capsys)[0]


def test_a_detector_marked_with_an_earlier_id_of_its_model_leaves_evaluate_current(tmp_path):
    """A marker written before ids covered the threshold names the model by its weights
    alone, and evaluate recorded that marker's identity as it was: an upgrade must not
    redo evaluate and the scores of every work directory. Under a marker of today's id, a
    threshold edited in model.json makes another model."""
    import hashlib
    import json

    from deepfake_ray import checkpoint, storage

    cfg = config.build("tiny", workdir=str(tmp_path))
    model = storage.join(cfg.workdir, "detector", "model")
    checkpoint.save_model(model, {}, {"arch": "resnet10t", "threshold": 0.4, "class_names": ["real", "fake"],
                                      "resolution": 32, "input_size": 75,
                                      "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    saved = checkpoint.load_meta(model)
    for model_id, edited in ((f"resnet10t@{saved['weights_sha256'][:12]}", []),
                             (checkpoint.model_id(saved), ["detector"])):
        storage.write_json(storage.join(model, "model.json"), saved)
        for stage in STAGES[:4]:
            lineage.complete(cfg, stage, {"model_id": model_id} if stage is detector_train.STAGE else {},
                             lineage.made(cfg, stage))
        marker = storage.completed(storage.join(cfg.workdir, "detector"))
        made = lineage.made(cfg, evaluate.STAGE)  # the detector's identity as e7510f9 took it: its marker's
        as_recorded = json.dumps(marker, sort_keys=True, default=str).encode()
        made["inputs"]["detector"] = hashlib.sha1(as_recorded).hexdigest()[:16]
        evaluated = lineage.complete(cfg, evaluate.STAGE, {}, made)
        assert lineage.redone_since(cfg, evaluated) == []
        storage.write_json(storage.join(model, "model.json"), {**saved, "threshold": 0.6})
        assert lineage.redone_since(cfg, evaluated) == edited  # an earlier id covers the weights alone
