import os
import subprocess
import sys

import pytest
import yaml

from deepfake_ray import cli, config
from deepfake_ray.data import prepare
from deepfake_ray.errors import UsageError
from tests.cli_output import error_lines


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = config.build(name)
    assert config.from_dict(config.to_dict(cfg)) == cfg  # round-trips through YAML-able dicts


def test_celeb100k_carries_the_studys_settings():
    cfg = config.build("celeb100k")
    # batch sizes are per worker: the study's 64 a step, across the preset's workers
    step = cfg.resources.workers * cfg.gan.batch_size
    assert (cfg.data.resolution, step, cfg.gan.epochs) == (128, 64, 60)
    assert cfg.resources.workers * cfg.detector.batch_size == 64
    assert (cfg.detector.epochs, cfg.detector.input_size, cfg.detector.max_train_per_class) == (20, 128, 29500)
    assert cfg.detector.pretrained == "hub" and "greg115/celebrities-100k" in cfg.data.source
    # the pipeline's detector is the sweep's best trial: it too trains the study's epochs
    assert cfg.tune.enabled and cfg.tune.epochs == cfg.detector.epochs


@pytest.mark.parametrize("name", [n for n in config.preset_names() if n != "tiny"])
def test_every_detector_users_run_learns_past_recompression_and_blur(name):
    """Without it, a detector of real photos caught 9% of fakes once blurred (README)."""
    d = config.build(name).detector
    assert d.jpeg_aug_prob > 0 and d.blur_aug_prob > 0


def test_layers_file_then_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("gan: {epochs: 7, lr: 0.001}\n")
    cfg = config.build("demo", str(f), ["gan.lr=3e-4", "data.splits=[0.7, 0.2, 0.1]"])
    assert (cfg.gan.epochs, cfg.gan.lr, cfg.data.splits) == (7, 3e-4, (0.7, 0.2, 0.1))


@pytest.mark.parametrize("folder", ["faces #1", "0123", "12:30", "yes", "[faces]", "a: b"])
def test_text_values_are_taken_as_typed(folder):
    # YAML would read a comment, an octal number, a time, a bool, a list, a mapping
    assert config.build("demo", None, [f"data.source={folder}"]).data.source == folder


def test_numbers_with_leading_zeros_are_decimal(tmp_path):
    """YAML 1.1 reads 060 as the octal 48, whether given with --set or in a --config file."""
    (tmp_path / "run.yaml").write_text("seed: 0042\n")
    cfg = config.build("tiny", str(tmp_path / "run.yaml"), ["gan.epochs=060"], workdir=str(tmp_path))
    assert (cfg.gan.epochs, cfg.seed) == (60, 42)
    cfg = config.build("tiny", None, ["detector.jpeg_aug_quality=[030, 100]"], workdir=str(tmp_path))
    assert cfg.detector.jpeg_aug_quality == (30, 100)  # in a list too


@pytest.mark.parametrize("override,needle", [
    ("gan.epochz=3", "unknown config key 'gan.epochz' (did you mean gan.epochs?): valid keys are gan.epochs"),
    ("ganz.epochs=3", "unknown config key 'ganz' (did you mean gan?)"),
    ("detector.lrr=3", "unknown config key 'detector.lrr' (did you mean detector.lr?): valid keys are detector.arch"),
    ("detector.batch=3", "unknown config key 'detector.batch' (did you mean detector.batch_size?)"),
    ("gan.fail=3", "unknown config key 'gan.fail': valid keys are gan.epochs"),  # the test-only key: not offered
    ("gan.epochs=three", "config key 'gan.epochs' expects a whole number (int), got 'three'"),
    ("data.resolution=1e3", "config key 'data.resolution' expects a whole number (int), got '1e3'"),  # no "(str)"
    ("gan.epochs=2.5", "config key 'gan.epochs' expects a whole number (int), got 2.5 (float)"),
    ("resources.use_gpu=maybe", "config key 'resources.use_gpu' expects bool, got 'maybe', e.g. resources.use_gpu=false"),
    ("data.splits=[1, 2]", "expects a list of 3 values, e.g. data.splits=[0.8,0.1,0.1]; got [1, 2]"),
    ("detector.jpeg_aug_quality=5", "expects a list of 2 values, e.g. detector.jpeg_aug_quality=[30,100]"),
    ("gan=5", "'gan' is a section"),
    ("tune.lr_max=1000", "tune.lr_max=1000.0 is out of range: use 0.0..1.0 (Adam's learning rate"),
    ("novalue", "--set 'novalue' must look like KEY=VALUE, e.g. --set novalue=VALUE"),
    ("workdir", "--set 'workdir' must look like KEY=VALUE, e.g. --set workdir=VALUE"),  # no section to name
    (".resolution=1", "must look like section.key=value"),  # was: unknown config key ''
    ("data..resolution=1", "must look like section.key=value"),
    ("resources.data_cpus=0", "resources.data_cpus=0.0 is out of range: use a value above 0"),
    ("resources.workers=0", "resources.workers=0 is out of range: use 1 or more"),
    ("data.sample_size=200", "data.source=sample:96 names its own count; pass --set data.source=sample:200"),
    ("gan.keep_checkpoints=0", "gan.keep_checkpoints=0 is out of range: use 1 or more"),
    ("serve.port=70000", "serve.port=70000 is out of range: use 1..65535"),
    ("detector.jpeg_aug_prob=1.5", "detector.jpeg_aug_prob=1.5 is out of range: use 0.0..1.0"),
    ("data.splits=[0.8, 0.1, nan]", "config key 'data.splits[2]' expects a finite number, got nan"),
    ("gan.lr=inf", "config key 'gan.lr' expects a finite number, got inf"),
    ("seed=-1", "seed=-1 is out of range: use 0..2147483647"),  # was a traceback in every prepare task
    ("data.source=kaggle:../..", "kaggle dataset '../..' must look like OWNER/DATASET"),  # outside the cache
    # `kaggle:$DATASET` unset: not the default dataset's 100k-image download
    ("data.source=kaggle:", "source 'kaggle:' names nothing after its colon (an unset variable?): "
                            "write kaggle:OWNER/DATASET, or kaggle alone for the default"),
    ("data.source=sample:", "write sample:N, or sample alone for the default"),
    pytest.param("gan.lr=1" + "0" * 400, "config key 'gan.lr' expects a finite number, got a number of 401 digits",
                 id="gan.lr=1e400"),
    pytest.param("gan.epochs=1" + "0" * 5000, "config key 'gan.epochs' expects a whole number (int), got '1000",
                 id="gan.epochs=1e5000"),  # more digits than int() reads
    ("data.splits=[1e308, 1e308, 1e308]", "must be three non-negative fractions"),  # their sum is inf
    ("data.resolution.x=1", "config key 'data.resolution' is a value, not a section: 'data.resolution.x' names nothing"),
    ("data.splits=[0.9,0.9,0.9]", "data.splits=[0.9, 0.9, 0.9] sums to 2.7, not 1: give each split's fraction"),
    ("data.source=s3://", "s3://: an S3 path that names no bucket: write s3://BUCKET/prefix"),  # before Ray starts
    ("gan.epochs=1:30", "config key 'gan.epochs' expects a whole number (int), got '1:30'"),  # not YAML 1.1's base 60: 90
    ("gan.epochs=true", "config key 'gan.epochs' expects a whole number (int), got True (bool)"),  # not 1
    ("data.splits=[0, 0.5, 0.5]", "must be three non-negative fractions (train > 0)"),  # nothing to train on
    ("data.splits=[1.2, -0.1, -0.1]", "must be three non-negative fractions"),  # sums to 1: all train
    ("data.jpeg_quality=101", "data.jpeg_quality=101 is out of range: use 1..100"),
    ("data.resolution=8", "data.resolution=8 is out of range: use 16..1024 (32, 64 or 128 for the DCGAN)"),
    # an unset shell variable ($W): it trained Inception-ResNet-v2 from random weights for hours
    ("detector.pretrained=", "detector.pretrained is empty: use hub, none, or the path of a weights file"),
    # every image refused as a bomb, after reading the whole source
    ("data.max_pixels=100", "data.max_pixels=100 is below data.resolution squared (1024): every image "
                            "would be refused; use 1024 or more"),
    # refused by Ray once it had started
    ("serve.cpus_per_replica=0.00001", "serve.cpus_per_replica=1e-05 is out of range: use 0.0001 or more"),
    # a lone request waited ~28 h for a batch to fill
    ("serve.batch_wait_timeout_s=100000", "serve.batch_wait_timeout_s=100000.0 is out of range: use 0.0..10.0"),
    # AdamW's weights diverged, said as a learning rate too high
    ("detector.weight_decay=100", "detector.weight_decay=100.0 is out of range: use 0.0..1.0"),
    # every worker out of memory, a traceback (a CPU allocator's error is not one we recognise)
    ("detector.input_size=100000", "detector.input_size=100000 is out of range: use 1..1024"),
    ("gan.sample_grid=100000000", "gan.sample_grid=100000000 is out of range: use 1..256"),
])
def test_bad_override_exits_2_with_one_line(override, needle, capsys, tmp_path):
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path), "--set", override])
    err = error_lines(capsys)
    assert code == 2
    assert len(err) == 1 and needle in err[0]
    assert "fail_at_epoch" not in err[0]


@pytest.mark.parametrize("overrides,needle", [
    # a random backbone frozen for every epoch: only the head learns
    (["detector.freeze_backbone_epochs=1"], "detector.freeze_backbone_epochs=1 freezes the backbone for all 1 "
                                            "epochs (detector.epochs), and with detector.pretrained=none"),
    (["detector.arch=inceptoin_resnet_v2"], "detector.arch='inceptoin_resnet_v2' is not a timm model"),
    # a ViT's position table is of one size: it failed in each Train worker, after the GAN
    (["detector.arch=vit_tiny_patch16_224", "detector.pretrained=none"],
     "detector.arch=vit_tiny_patch16_224 takes 224 px inputs only, not detector.input_size=75: "
     "set detector.input_size=224"),
    # a mistyped weights tag, or the default tag (Inception's) for another architecture
    (["detector.pretrained=hub", "detector.hub_name=inception_resnet_v2.tf_in1kk"],
     "detector.hub_name='inception_resnet_v2.tf_in1kk' names no weights of detector.arch=inception_resnet_v2 "
     "that timm knows: use one of inception_resnet_v2.tf_ens_adv_in1k, inception_resnet_v2.tf_in1k"),
    (["detector.pretrained=hub", "detector.arch=resnet10t"], "use one of resnet10t.c3_in1k"),
    (["data.resolution=96"], "resolution 96 not supported"),  # prepare takes it; the DCGAN not
    (["tune.enabled=true", "tune.epochs=2", "tune.grace_period=3"], "tune.grace_period (3) must not exceed"),
    # named by the whole path it was looked for at
    (["detector.pretrained=weights.safetensor"], f"detector.pretrained={os.getcwd()}/weights.safetensor: no such file"),
    # prepare takes them, the detector (its epoch and threshold) and evaluate cannot
    (["data.splits=[0.9,0,0.1]"], "leaves the validation split empty: the detector's best epoch"),
    (["data.splits=[0.9,0.1,0]"], "leaves the test split empty: evaluate measures the detector there"),
])
def test_pipeline_checks_every_stages_settings_before_anything_runs(overrides, needle, capsys, tmp_path):
    workdir = tmp_path / "w"
    args = ["pipeline", "--preset", "tiny", "--workdir", str(workdir)]
    assert cli.main(args + [a for o in overrides for a in ("--set", o)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and needle in err[0]
    assert not workdir.exists()  # no data prepared, no config.yaml written, no Ray started


def test_a_forced_redo_with_bad_settings_keeps_the_complete_stage(capsys, tmp_path):
    from deepfake_ray import storage

    marker = tmp_path / "detector" / storage.COMPLETE
    storage.mark_complete(str(tmp_path / "detector"), {"model": "kept"})
    assert cli.main(["train-detector", "--preset", "tiny", "--workdir", str(tmp_path), "--force",
                     "--set", "detector.optimizer=sgd"]) == 2
    assert "detector.optimizer='sgd': choose adam or adamw" in error_lines(capsys)[0]
    assert marker.exists()


def test_an_empty_config_file_changes_nothing_and_an_empty_config_name_is_refused(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("# settings to come\n")
    assert config.build("tiny", str(tmp_path / "empty.yaml")) == config.build("tiny")
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--config", ""]) == 2
    assert error_lines(capsys) == ["deepfake-ray prepare: error: --config names no file: pass a YAML file, "
                                   "or leave --config out"]  # was: no file read, silently


@pytest.mark.parametrize("text,needle", [
    (None, "is a folder: pass a YAML file to --config"),
    ("gan: {epochz: 3}\n", "unknown config key 'gan.epochz' (did you mean gan.epochs?): valid keys are gan.epochs"),
    ("gan: {epochs: three}\n", "config key 'gan.epochs' expects a whole number (int), got 'three', e.g. gan.epochs=8"),  # the preset's
    ("detector: {lr: }\n", "config key 'detector.lr' has no value: give it one, e.g. detector.lr=0.0003, "
                           "or leave the key out to take the preset's"),
    ("gan: {epochs: 0}\n", "gan.epochs=0 is out of range: use 1 or more"),
    ("- gan\n", "must hold a mapping of sections"),
    ("gan: [1,\n", "is not valid YAML"),
    ("gan:\n  epochs: 3\n lr: 2\n", "expected <block end>, but found '<block mapping start>' (line 3, column 2)"),
    ("gan: {1: x}\n", "unknown config key 'gan.1': valid keys are gan.epochs"),
    ("data: {resolution: 32}\ngan: {epochs: 3}\ndata: {source: x}\n",
     "is not valid YAML: 'data' appears twice in one mapping (line 3, column 1)"),  # the first section lost
    ("data:\n  [a]: 1\n", "a key must be a name, not a list or mapping (line 2, column 3)"),
    ("? {gan: 1}\n: 2\n", "a key must be a name, not a list or mapping (line 1, column 3)"),
    ("data: {splits: [0.8, 0.1]}\n", "expects a list of 3 values, e.g. data.splits=[0.8,0.1,0.1]; got [0.8, 0.1]"),
    ("data: {resolution: [64]}\n", "config key 'data.resolution' expects a whole number (int), got [64] (list)"),
    ("gan: 5\n", "'gan' is a section, not a value: give it keys, e.g. --set gan.KEY=VALUE, "
                  "or in a --config file 'gan: {KEY: VALUE}'"),
    # a folder named `$FACES` was looked for in the current one
    ("data: {source: $FACES/photos}\n", "data.source=$FACES/photos holds $FACES, which nothing expands in a "
                                        "config file: write the path out, or pass it on the command line"),
    ("data: {cache_dir: '${XDG_CACHE_HOME}/x'}\n", "data.cache_dir=${XDG_CACHE_HOME}/x holds ${XDG_CACHE_HOME}"),
])
def test_a_bad_config_file_exits_2_with_one_line(text, needle, capsys, tmp_path):
    path = tmp_path / "run.yaml"
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    assert cli.main(["prepare", "--workdir", str(tmp_path / "w"), "--config", str(path)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "w").exists()


def test_a_config_files_mistake_names_the_file_where_a_sets_does_not(capsys, tmp_path):
    """An unknown key or a wrong type read the same from --config as from --set: the user
    looked for it on the command line."""
    path = tmp_path / "run.yaml"
    path.write_text("gan: {epochz: 3, epochs: three}\n")
    argv = ["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w")]
    assert cli.main(argv + ["--config", str(path)]) == 2
    assert error_lines(capsys)[0].startswith(f"deepfake-ray prepare: error: in --config {path}: unknown config "
                                             "key 'gan.epochz' (did you mean gan.epochs?)")
    path.write_text("gan: {epochs: three}\n")
    assert cli.main(argv + ["--config", str(path)]) == 2
    assert error_lines(capsys)[0].startswith(f"deepfake-ray prepare: error: in --config {path}: config key "
                                             "'gan.epochs' expects a whole number (int)")
    assert cli.main(argv + ["--config", str(path), "--set", "gan.lr=fast"]) == 2  # the file's first
    assert cli.main(argv + ["--set", "gan.epochz=3"]) == 2
    assert error_lines(capsys)[-1].startswith("deepfake-ray prepare: error: unknown config key 'gan.epochz'")


def test_a_config_files_unexpanded_workdir_is_refused_unless_workdir_is_given(tmp_path):
    """`workdir: $HOME/runs` made a folder named `$HOME` in the current one; a --workdir
    on the command line (the fix the refusal names) takes its place."""
    path = tmp_path / "team.yaml"
    path.write_text("workdir: $HOME/runs\n")
    args = cli.parser().parse_args(["prepare", "--preset", "tiny", "--config", str(path)])
    with pytest.raises(UsageError, match=r"workdir=.*\$HOME/runs holds \$HOME, which nothing expands"):
        cli.build_config(args)
    given = cli.parser().parse_args(["prepare", "--preset", "tiny", "--config", str(path),
                                     "--workdir", str(tmp_path / "w")])
    assert cli.build_config(given).workdir == str(tmp_path / "w")


def test_a_dollar_typed_on_the_command_line_is_a_name_where_a_config_files_is_refused(tmp_path):
    """`--source '/data/$faces'` (a folder's own name, quoted past the shell) was refused
    as a config file's unexpanded variable, with no way to name that folder."""
    folder = str(tmp_path / "$faces")
    for given in (["--source", folder], ["--set", f"data.source={folder}"]):
        args = cli.parser().parse_args(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), *given])
        assert cli.build_config(args).data.source == folder
    path = tmp_path / "team.yaml"
    path.write_text("data: {source: $HOME/x}\n")
    args = cli.parser().parse_args(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                                    "--config", str(path)])
    with pytest.raises(UsageError, match=r"data.source=\$HOME/x holds \$HOME, which nothing expands"):
        cli.build_config(args)
    # the run's own config.yaml records such a folder as typed: its rerun hints
    # (--config W/config.yaml) must take it, where the folder is there
    os.makedirs(folder)
    path.write_text(f"data: {{source: '{folder}'}}\n")
    assert cli.build_config(args).data.source == folder


def test_a_rate_the_sweep_would_not_use_exits_2_naming_what_to_set(tmp_path, capsys):
    """Where the sweep trains the detector, detector.lr and detector.epochs are not used:
    accepted, they would be silently ignored."""
    w = str(tmp_path / "w")
    for command, extra in (("tune", []), ("pipeline", ["--set", "tune.enabled=true"])):
        for key, says in (("detector.lr=1e-4", "the rate from tune.lr_min..tune.lr_max"),
                          ("detector.epochs=9", "tune.epochs epochs")):
            assert cli.main([command, "--preset", "tiny", "--workdir", w, *extra, "--set", key]) == 2
            err = error_lines(capsys)
            assert len(err) == 1 and f"--set {key.split('=')[0]} is not used by " in err[0], err
            assert f"its trials take {says}; set those instead, " + (
                "or run `deepfake-ray train-detector`" if command == "tune"
                else "or set tune.enabled=false") + f" to train once with {key.split('=')[0]}" in err[0], err
    # and the other way round: a pipeline that trains once reads no sweep setting
    assert cli.main(["pipeline", "--preset", "tiny", "--workdir", w, "--set", "tune.samples=16"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "--set tune.samples is not used: this pipeline trains the detector once" in err[0]
    assert "add --set tune.enabled=true" in err[0]
    assert not os.path.exists(w)
    args = cli.parser().parse_args(["train-detector", "--preset", "tiny", "--set", "detector.lr=1e-4"])
    assert cli.build_config(args).detector.lr == 1e-4  # training at one rate: used


def test_a_section_left_empty_in_a_config_file_keeps_the_presets(tmp_path):
    """A copy of a preset with a section's keys commented out is read as that section
    unchanged, not refused as a section without keys."""
    path = tmp_path / "run.yaml"
    path.write_text("gan:\n  # epochs: 60\n  # lr: 2.0e-4\ndetector: {epochs: 3}\n")
    cfg = config.build("tiny", str(path))
    assert (cfg.gan, cfg.detector.epochs) == (config.build("tiny").gan, 3)


def test_a_config_file_gives_text_settings_its_numbers_as_written(tmp_path):
    """YAML reads 0123 as the octal number 83: a folder named 0123 must stay that."""
    path = tmp_path / "run.yaml"
    path.write_text("workdir: 0755\ndata: {source: 0123, splits: [0.8, 0.1, 0.1]}\n"
                    "gan: {lr: 2.0e-4, epochs: 0x0A}\nseed: 7\n")
    cfg = config.build("tiny", str(path))
    assert (cfg.workdir, cfg.data.source) == ("0755", "0123")
    assert (cfg.data.splits, cfg.gan.lr, cfg.gan.epochs, cfg.seed) == ((0.8, 0.1, 0.1), 2e-4, 10, 7)
    path.write_text("workdir: 2024-06-01\ndata: {source: off}\ngan: {mixed_precision: off}\n")
    cfg = config.build("tiny", str(path))  # YAML alone reads a date and a bool
    assert (cfg.workdir, cfg.data.source, cfg.gan.mixed_precision) == ("2024-06-01", "off", False)
    path.write_text('detector: {hflip: "false", epochs: "3"}\n')  # quoted: taken as "3" is for 3
    cfg = config.build("tiny", str(path))
    assert (cfg.detector.hflip, cfg.detector.epochs) == (False, 3)


@pytest.mark.parametrize("argv,needle", [
    (["--workdir", "s3://"], "s3://: an S3 path that names no bucket: write s3://BUCKET/prefix"),
    (["--workdir", "s3:///runs"], "s3:///runs: an S3 path that names no bucket"),
    (["--workdir", ""], "no work directory given (--workdir or workdir is blank): pass --workdir DIR or s3://bucket/prefix"),
    (["--workdir", "S3://bkt/runs"], "S3://bkt/runs: not a location this tool can use (S3://): write s3://bkt/runs"),
    (["--workdir", "s3:/bkt/runs"], "write s3://bkt/runs"),
    (["--workdir", "gs://bkt/runs"], "gs://bkt/runs: not a location this tool can use (gs://): use s3://BUCKET/prefix or a local path"),
    (["--set", "data.source=S3://bkt/faces"], "write s3://bkt/faces"),
    (["--set", "workdir="], "no work directory given"),
])
def test_a_workdir_of_no_bucket_or_no_name_exits_2(argv, needle, capsys, tmp_path, monkeypatch):
    """`--workdir s3://$BUCKET` with BUCKET unset, or a misspelt scheme: not a local folder
    named `s3:`."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "--preset", "tiny", *argv]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and needle in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_a_workdir_is_kept_as_given_whatever_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = cli.build_config(cli.parser().parse_args(["report", "--preset", "tiny", "--set", "workdir=runs/demo"]))
    assert named.workdir == str(tmp_path / "runs" / "demo")
    assert cli.build_config(cli.parser().parse_args(["report", "--preset", "tiny"])).workdir == str(tmp_path / "runs" / "tiny")
    both = ["report", "--workdir", "flagged", "--set", "workdir=set"]  # a --set wins over the flag, as for any key
    assert cli.build_config(cli.parser().parse_args(both)).workdir == str(tmp_path / "set")


def test_a_relative_source_is_recorded_absolute_as_the_workdir_is(tmp_path, monkeypatch):
    """config.yaml must name the same data when a later run reads it from another folder,
    and the same download cache, so a Kaggle dataset is not downloaded again."""
    monkeypatch.chdir(tmp_path)
    for cache, recorded in (("cache", str(tmp_path / "cache")), ("~/.cache/x", "~/.cache/x")):
        cfg = cli.build_config(cli.parser().parse_args(["prepare", "--preset", "tiny", "--set",
                                                        f"data.cache_dir={cache}"]))
        with cli.settings_recorded(cfg):
            pass
        assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["data"]["cache_dir"] == recorded
    for source, recorded in (("./faces/", str(tmp_path / "faces")), ("faces", str(tmp_path / "faces")),
                             ("sample:8", "sample:8"), ("s3://bucket/faces", "s3://bucket/faces"),
                             ("kaggle:owner/faces", "kaggle:owner/faces")):  # named the same from anywhere
        cfg = cli.build_config(cli.parser().parse_args(["prepare", "--preset", "tiny", "--source", source]))
        with cli.settings_recorded(cfg):
            pass
        assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["data"]["source"] == recorded


@pytest.mark.parametrize("name", ["nope", "../configs/tiny", "configs/demo"])
def test_unknown_preset_names_the_choices(name):
    """A preset is one of the package's names; a file of settings goes to --config."""
    with pytest.raises(UsageError, match="unknown preset .*choose one of .*celeb100k.*demo"):
        config.build(name)


def test_resolved_config_written_to_workdir(ray_session, tmp_path):
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path),
                     "--set", "data.source=sample:8", "--set", "gan.epochs=9"]) == 0
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["gan"]["epochs"] == 9 and written["workdir"] == str(tmp_path)


@pytest.mark.parametrize("before", ["the run's own settings\n", None])
def test_a_run_refused_once_ray_is_up_leaves_config_yaml_as_it_was(before, ray_session, tmp_path, capsys):
    """Refused inside the stage (too few training images for a batch, known once the data
    is read), after config.yaml was written: the settings a report and rerun hints name
    stay those the outputs were made with."""
    settings = ["data.source=sample:8", "gan.batch_size=64"]
    prepare.run(config.build("tiny", None, settings, workdir=str(tmp_path)))
    saved = tmp_path / "config.yaml"
    if before:
        saved.write_text(before)
    args = ["train-gan", "--preset", "tiny", "--workdir", str(tmp_path)]
    assert cli.main(args + [a for kv in settings for a in ("--set", kv)]) == 2
    assert "fewer than gan.batch_size=64" in error_lines(capsys)[-1]
    assert (saved.read_text() if saved.exists() else None) == before


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_any_stage_changed_leaves_config_yaml_as_it_was(stop, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a failure) while Ray starts, after config.yaml was written: the line says
    nothing was replaced, so config.yaml must still name what the outputs were made with,
    or every `--config W/config.yaml` hint is refused for settings nothing was made with."""
    saved = tmp_path / "config.yaml"
    saved.write_text("the run's own settings\n")

    def stopped(*_, **__):
        raise stop("stopped while Ray started")

    monkeypatch.setattr(cli, "start_ray", stopped)
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path), "--set", "data.source=sample:8"])
    assert code == (130 if stop is KeyboardInterrupt else 1)
    assert saved.read_text() == "the run's own settings\n"
    capsys.readouterr()


def test_a_pipeline_refused_after_a_stage_completed_keeps_its_own_config_yaml(ray_session, tmp_path, capsys):
    """prepare completed, then train-gan refused: data/ was made with this run's settings,
    which config.yaml and the failure's rerun hint must go on naming."""
    (tmp_path / "config.yaml").write_text("an earlier run's settings\n")
    args = ["pipeline", "--preset", "tiny", "--workdir", str(tmp_path), "--set", "data.source=sample:8",
            "--set", "gan.batch_size=64"]
    assert cli.main(args) == 2
    assert "deepfake-ray pipeline: error: (in stage 'train-gan') " in (last := error_lines(capsys)[-1])
    assert "fewer than gan.batch_size=64" in last
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["data"]["source"] == "sample:8" and written["gan"]["batch_size"] == 64


@pytest.mark.parametrize("command", ["prepare", "pipeline"])
def test_a_workdir_that_cannot_be_written_exits_2_with_one_line(command, capsys, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    workdir = str(tmp_path / "a-file" / "run")
    assert cli.main([command, "--preset", "tiny", "--workdir", workdir]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"cannot write to --workdir {workdir} (Not a directory)" in err[0]


@pytest.mark.parametrize("command", ["prepare", "pipeline", "report"])
def test_a_workdir_the_os_cannot_look_up_exits_2_with_one_line(command, capsys, tmp_path, monkeypatch):
    """Each failed at its first read, with a traceback."""
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    (tmp_path / "gone").symlink_to(tmp_path / "nothing")
    (tmp_path / "marked" / "data" / "_COMPLETE.json").mkdir(parents=True)
    cases = {tmp_path / ("a" * 300): "--workdir {} cannot be used (File name too long): pass another folder",
             tmp_path / "x" / "run": "--workdir {} cannot be used (Too many levels of symbolic links): "
                                     "pass another folder"}
    if command != "report":  # it writes nothing, and reads no marker
        cases[tmp_path / "gone"] = (f"{{}} is a link to {tmp_path / 'nothing'}, which does not exist, not a "
                                    f"folder, and {command} writes its outputs there")
        (tmp_path / "notes").write_text("a user's notes")
        (tmp_path / "to-notes").symlink_to(tmp_path / "notes")
        cases[tmp_path / "to-notes"] = f"{{}} is a link to a file, not a folder, and {command} writes its outputs"
        cases[tmp_path / "marked"] = ("cannot read {}/data/_COMPLETE.json (Is a directory): a folder has the "
                                      "name of the stage's marker: move it away, or pass another --workdir")
    if command == "report":  # score and serve take no work directory: the default's state is not theirs
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "demo").symlink_to("demo")
        monkeypatch.chdir(tmp_path)
        assert cli.main(["score", "--model", str(tmp_path / "none"), "--input", ".", "--out", "o.csv"]) == 2
        assert "no model at" in error_lines(capsys)[0]
    for workdir, said in cases.items():
        source = [] if command == "report" else ["--source", "sample:20"]
        assert cli.main([command, "--preset", "tiny", "--workdir", str(workdir), *source]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and said.format(workdir) in err[0], err


def test_help_names_the_sources_and_presets(capsys):
    assert cli.main(["prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "kaggle:OWNER/DATASET" in out and "sample[:N]" in out and "celeb100k, demo" in out


@pytest.mark.parametrize("argv,line", [
    (["prepare", "--bogus"], "deepfake-ray prepare: error: unrecognized arguments: --bogus (see deepfake-ray "
                             "prepare --help)"),  # was the top level's usage, and its name
    (["prepare", "--source"], "deepfake-ray prepare: error: argument --source: expected one argument (see "
                              "deepfake-ray prepare --help)"),
    (["--workdir", "w", "prepare"], "; options go after the command, e.g. deepfake-ray prepare --workdir W "
                                    "(see deepfake-ray --help)"),
    (["--force", "prepare"], "deepfake-ray prepare: error: unrecognized arguments: --force; options go after "
                             "the command (see deepfake-ray prepare --help)"),
    (["--bogus", "prepare"], "deepfake-ray prepare: error: unrecognized arguments: --bogus (see deepfake-ray "
                             "prepare --help)"),  # not its own option: moving it would not help
    # an abbreviation is no flag (argparse took `--wor` for --workdir), and a typo gets its fix
    (["prepare", "--wor", "w"], "deepfake-ray prepare: error: unrecognized arguments: --wor w (did you mean "
                                "--workdir?) (see deepfake-ray prepare --help)"),
    (["prepare", "--sourse=x"], "unrecognized arguments: --sourse=x (did you mean --source?) (see deepfake-ray "
                                "prepare --help)"),
    # no abbreviation before the command either (argparse printed the version, or the help)
    (["--vers"], "deepfake-ray: error: unrecognized arguments: --vers (did you mean --version?) (see "
                 "deepfake-ray --help)"),
    (["--he"], "deepfake-ray: error: unrecognized arguments: --he (did you mean --help?) (see deepfake-ray --help)"),
    (["--vers", "prepare"], "deepfake-ray prepare: error: unrecognized arguments: --vers (did you mean --version?) "
                            "(see deepfake-ray prepare --help)"),
    # was "unrecognized arguments: 20"
    (["prepare", "--set", "gan.epochs", "20"], "deepfake-ray prepare: error: --set gan.epochs 20: join them with "
                                               "'=': --set gan.epochs=20 (see deepfake-ray prepare --help)"),
    (["prepare", "--version"], "deepfake-ray prepare: error: unrecognized arguments: --version; --version goes "
                               "before the command: deepfake-ray --version (see deepfake-ray prepare --help)"),
    ([], "deepfake-ray: error: the following arguments are required: COMMAND (choose from "
         f"{', '.join(map(repr, cli.COMMANDS))}) (see deepfake-ray --help)")])
def test_a_mistyped_command_line_is_one_line_naming_the_command(argv, line, capsys):
    """The console script exits 2; cli.main in a notebook returns 2 (its SystemExit was
    raised into the caller: a script calling it ended there)."""
    with pytest.raises(SystemExit) as ended:
        cli.main(argv, exits=True)
    err = error_lines(capsys)
    assert ended.value.code == 2 and len(err) == 1 and err[0].endswith(line), err
    assert cli.main(argv) == 2 and error_lines(capsys)[-1].endswith(line)


@pytest.mark.parametrize("typed,guess", [("pipline", " (did you mean pipeline?)"), ("sreve", " (did you mean serve?)"),
                                         ("xyz", "")])
def test_a_mistyped_command_names_the_nearest(typed, guess, capsys):
    assert cli.main([typed]) == 2
    err = error_lines(capsys)
    assert err == [f"deepfake-ray: error: argument COMMAND: invalid choice: '{typed}'{guess} "
                                             f"(choose from {', '.join(map(repr, cli.COMMANDS))}) (see deepfake-ray --help)"]


def test_a_jobs_mistyped_flag_names_the_nearest_as_deepfake_ray_does(monkeypatch, capsys):
    """`python jobs/pipeline.py --forc`: argparse's bare "unrecognized arguments"; and its
    --run-name and --workdir say what they default to."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "jobs"))
    import _entry

    for argv, line in ((["--forc"], "unrecognized arguments: --forc (did you mean --force?)"),
                       (["--set", "gan.epochs", "3"], "--set gan.epochs 3: join them with '=': --set gan.epochs=3")):
        with pytest.raises(SystemExit) as ended:
            _entry.main("pipeline", "pipeline.py", argv)
        assert ended.value.code == 2 and error_lines(capsys) == [
            f"python jobs/pipeline.py: error: {line} (see python jobs/pipeline.py --help)"]
    helps = {a.dest: a.help for a in _entry.parser("pipeline", "pipeline.py")._actions}
    assert "(default: none, WORKDIR itself)" in helps["run_name"]
    assert "(default: the --config file's workdir, else runs/<preset>" in helps["workdir"]


def test_a_flag_the_command_does_not_read_is_said_to_be_unused(monkeypatch, capsys):
    """Scripts pass --workdir and --address to every command: accepted, but one that
    changes nothing is said (a user may think score writes into the work directory)."""
    monkeypatch.setattr(cli, "execute", lambda args: 0)  # no stage: the line comes before it
    score = ["score", "--model", "m", "--input", "i", "--out", "o.csv"]
    assert cli.main([*score, "--workdir", "w"]) == 0
    assert error_lines(capsys) == ["deepfake-ray score: note: --workdir is not used by score: it has no work "
                                   "directory"]
    assert cli.main(["report", "--address", "auto"]) == 0
    assert error_lines(capsys) == ["deepfake-ray report: note: --address is not used by report: it reads files "
                                   "only and starts no Ray"]
    assert cli.main(["train-gan", "--workdir", "w", "--address", "auto"]) == 0
    assert cli.main([*score, "--address", "auto"]) == 0
    assert error_lines(capsys) == []  # read: nothing to say


def test_help_says_what_each_command_writes_and_what_its_force_redoes():
    """Descriptions named no output; --force's generic help spoke of checkpoints to
    prepare, generate and evaluate, which keep none."""
    import re

    p = cli.parser()

    def said(command: str, dest: str = "help") -> str:
        c = p.commands[command]
        text = c.description if dest == "help" else next(a.help for a in c._actions if a.dest == dest)
        return " ".join(text.split())

    for command, writes in (("train-gan", "WORKDIR/gan"), ("generate", "WORKDIR/fakes"),
                            ("train-detector", "WORKDIR/detector/model"),
                            ("tune", "WORKDIR/detector/model (replacing train-detector's)")):
        assert writes in said(command), command
    for command in ("prepare", "generate", "evaluate"):
        assert "checkpoint" not in said(command, "force"), command
    for command in ("train-gan", "train-detector", "tune"):
        assert "checkpoint" in said(command, "force"), command
    helps = [a.help or "" for c in p.commands.values() for a in c._actions]
    assert not [h for h in helps if h.endswith(") (required)")]  # was "(local or s3://) (required)"
    # the environment the epilog lists: each name one the code reads
    environment = cli.EPILOG.split("environment:\n", 1)[1]
    names = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", environment))
    assert {"RAY_ADDRESS", "DEEPFAKE_RAY_PROGRESS", "NO_COLOR", "AWS_ENDPOINT_URL", "KAGGLE_API_TOKEN"} <= names
    package = os.path.dirname(cli.__file__)
    code = "".join(open(os.path.join(folder, f), encoding="utf-8").read()
                   for folder, _, files in os.walk(package) for f in files if f.endswith(".py"))
    assert [n for n in names if f'"{n}"' not in code] == []


def test_a_notebook_may_pass_paths_as_pathlib_paths_and_is_told_that_argv_is_a_list(tmp_path, capsys):
    """`cli.main(["report", "--workdir", Path(...)])` failed inside argparse ('PosixPath'
    object is not subscriptable); one string was parsed a character at a time."""
    import pathlib

    assert cli.main(["report", "--preset", "tiny", "--workdir", pathlib.Path(tmp_path / "none")]) == 2
    assert f"{tmp_path}/none" in error_lines(capsys)[0]
    with pytest.raises(TypeError, match=r"argv is a list of arguments, e.g. \['report', '--workdir', 'w'\], not one"):
        cli.main("report --workdir w")


def test_the_pipeline_takes_its_source_as_prepare_does(capsys, tmp_path):
    """`pipeline --source DIR`, as `prepare --source DIR`: a source that is not there is
    refused in one line, before anything runs."""
    args = ["pipeline", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source"]
    assert cli.build_config(cli.parser().parse_args(args + ["sample:8"])).data.source == "sample:8"
    assert cli.main(args + [str(tmp_path / "no-faces")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("deepfake-ray pipeline: error: ") and "no-faces" in err[0], err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command,offered,not_offered", [
    ("score", "--address", "--workdir"),  # it reads --model and --input, writes --out
    ("serve", "sets serve.port", "--workdir"),  # a flag's help names the key its errors name
    ("report", "--workdir", "--address"),  # it reads files only: no Ray
    ("train-gan", "HEAD:6379", "--source")])
def test_each_command_offers_the_flags_it_reads(command, offered, not_offered, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert offered in out and not_offered not in out


@pytest.mark.parametrize("force,replaced,advice", [
    ([], True, "interrupted; run the same command again"),  # a stage's adds how its reruns skip and resume
    (["--force"], True, "interrupted; run it again without --force (which starts over)"),
    # the stages there are still the old ones: without --force they would be kept
    (["--force"], False, "interrupted before anything was replaced; run the same command again")])
def test_ctrl_c_exits_130_saying_how_to_resume(force, replaced, advice, monkeypatch, tmp_path, capsys):
    from deepfake_ray import report, storage

    def pressed_ctrl_c(*_, **__):
        if replaced:
            storage.stage_changed()  # as a stage unmarked to be redone
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", pressed_ctrl_c)
    assert cli.main(["report", "--workdir", str(tmp_path), *force]) == 130
    err = error_lines(capsys)
    assert err == [f"deepfake-ray report: {advice}"]


def test_bad_input_found_inside_a_ray_task_exits_2_with_its_first_line(ray_session, monkeypatch, tmp_path, capsys):
    """Raised in a Ray task, a UsageError reaches the command wrapped in Ray's error (whose
    text starts with the task's name and pid), with Ray Data's retry advice after it:
    still bad input (exit 2, one line), not a failure (1)."""
    from deepfake_ray import report

    @ray_session.remote(max_retries=0)
    def check_a_file():
        raise UsageError("s3://photos/a.jpg: access denied: check the AWS credentials\n"
                         "(Ray Data retries a task 3 times)")

    monkeypatch.setattr(report, "run", lambda *_, **__: ray_session.get(check_a_file.remote()))
    assert cli.main(["report", "--workdir", str(tmp_path)]) == 2
    assert error_lines(capsys) == ["deepfake-ray report: error: s3://photos/a.jpg: access denied: check "
                                   "the AWS credentials"]


def test_a_failure_that_is_no_bad_input_exits_1_with_its_traceback_and_a_last_line(monkeypatch, tmp_path, capsys):
    """Exit 1 is a bug or a failure of what it runs on, not a mistake to fix in the command
    (2): the traceback is for its report, the last line says what failed."""
    from deepfake_ray import report

    def bug(*_, **__):
        raise KeyError("epoch")

    monkeypatch.setattr(report, "run", bug)
    assert cli.main(["report", "--workdir", str(tmp_path)]) == 1
    err = error_lines(capsys)
    assert err[0] == "Traceback (most recent call last):" and err[-2] == "KeyError: 'epoch'"
    assert err[-1].startswith("deepfake-ray report: failed after ") and err[-1].endswith("s: KeyError: 'epoch'")


def test_the_rerun_hints_command_runs_with_this_runs_settings(tmp_path):
    """Hints (a failed pipeline's, the report's) name a command to run again: with the
    defaults' preset it would run other settings than this run's."""
    import shlex

    from deepfake_ray import lineage

    workdir = str(tmp_path / "my run")
    cfg = config.build("tiny", None, ["gan.epochs=5", "detector.lr=1e-4"], workdir=workdir)
    with cli.settings_recorded(cfg):
        pass
    hint = lineage.command_line(workdir, "evaluate")
    assert cli.build_config(cli.parser().parse_args(shlex.split(hint)[1:])) == cfg


def test_native_windows_is_refused_in_one_line_naming_wsl2(monkeypatch, capsys, tmp_path):
    """Its locks (fcntl), fchmod and signals are POSIX: every command failed with a
    traceback in whichever of them it reached first."""
    monkeypatch.setattr(sys, "platform", "win32")
    assert cli.main(["prepare", "--workdir", str(tmp_path / "w")]) == 2
    assert error_lines(capsys) == ["deepfake-ray: error: native Windows is not supported: run it in WSL2, "
                                   "or on Linux or macOS"]
    assert not (tmp_path / "w").exists()


def test_version_names_the_package_and_what_it_runs_on(capsys):
    """What a bug report needs: our version, Ray's, torch's, timm's and Python's."""
    import platform
    from importlib.metadata import version

    import ray

    assert cli.main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"deepfake-ray {version('deepfake-ray')} (")
    for part in (f"ray {ray.__version__}", f"torch {version('torch')}", f"timm {version('timm')}",
                 f"python {platform.python_version()}"):
        assert part in line


def test_python_dash_m_deepfake_ray_is_the_command_line():
    """Where the console script is not on PATH (a --user install, a notebook's kernel)."""
    run = subprocess.run([sys.executable, "-m", "deepfake_ray", "prepare", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "deepfake-ray prepare: error: unrecognized arguments: --version; --version goes before the command: "
        "deepfake-ray --version (see deepfake-ray prepare --help)"]


def test_a_notebooks_command_keeps_its_environment_and_a_scripts_log_has_no_colour_codes(monkeypatch, capsys):
    """Every cli.main set RAY_COLOR_PREFIX=0 for the rest of the process: a notebook (whose
    output is no terminal, and shows colours) lost Ray's coloured prefixes for good. A
    script's cli.main into a file still gets none, as the console script's does."""
    import types

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    monkeypatch.delenv("RAY_COLOR_PREFIX")  # absent, and absent again after the test
    with monkeypatch.context() as notebook:
        notebook.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
        assert cli.main(["--version"]) == 0
    assert "RAY_COLOR_PREFIX" not in os.environ
    assert cli.main(["--version"]) == 0  # a script's, its output into a file (here, pytest's capture)
    assert os.environ["RAY_COLOR_PREFIX"] == "0"


def command_process(code: str, *argv: str, **run) -> subprocess.CompletedProcess:
    """`deepfake-ray ARGV` as the console script runs it, after `code` (a stand-in stage),
    with stdout as Python buffers it into a pipe or file (PYTHONUNBUFFERED unset)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", f"from deepfake_ray import cli\n{code}\ncli.console_main()",
                           *argv], env=env, timeout=120, **run)


def test_a_reader_that_has_gone_ends_the_command_quietly():
    """`deepfake-ray --version | true`: Python's "Exception ignored ... BrokenPipeError"
    and exit 120; now 141 (128 + SIGPIPE) and nothing said, as a Unix tool ends. A stage
    printing into a reader gone ends so too, not as a failure with a traceback."""
    stage = "def execute(args):\n    while True:\n        print('a line')\ncli.execute = execute"
    for code, argv in (("", ("--version",)), (stage, ("report",))):
        read, write = os.pipe()
        os.close(read)
        ended = command_process(code, *argv, stdout=write, stderr=subprocess.PIPE)
        os.close(write)
        assert (ended.returncode, ended.stderr) == (141, b""), argv


def test_a_failed_commands_log_ends_with_its_failure_line():
    """Into a file or pipe (nohup, tee, CI) stdout was block-buffered: a failed pipeline's
    log showed the error line first, its stage header and "stopped at stage" lines after."""
    stage = ("def execute(args):\n    print('=== evaluate ===')\n    raise RuntimeError('boom')\n"
             "cli.execute = execute")
    ended = command_process(stage, "report", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = ended.stdout.decode().splitlines()
    assert ended.returncode == 1 and lines[0] == "=== evaluate ===", lines
    assert lines[-1].startswith("deepfake-ray report: failed after ") and lines[-1].endswith("RuntimeError: boom")


def test_every_config_key_is_documented_with_its_default_and_the_presets_values():
    """docs/configuration.md: a key left out (21 were documented nowhere but config.py's
    comments), or a default or preset value changed without it, fails here."""
    import dataclasses
    import re

    def shown(value) -> str:
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(shown(v) for v in value) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md"), encoding="utf-8") as f:
        rows = {m[1]: (m[2], m[3].strip(), m[4].strip()) for m in
                re.finditer(r"^\| `([\w.]+)` \| `([^`]*)` \| ([^|]*) \| ([^|]+) \|$", f.read(), re.M)}
    presets = [config.to_dict(config.build(name, None, [])) for name in ("demo", "celeb100k")]
    defaults = config.to_dict(config.Config())
    keys = [(k,) for k, v in defaults.items() if not isinstance(v, dict)] + [
        (section, f.name) for section in defaults if isinstance(defaults[section], dict)
        for f in dataclasses.fields(type(getattr(config.Config(), section)))]
    for key in keys:
        name = ".".join(key)
        assert name in rows, f"{name} is missing from docs/configuration.md"

        def value(d):
            for part in key:
                d = d[part]
            return d
        default, by_preset, what = rows[name]
        assert (default, by_preset) == (shown(value(defaults)), " / ".join(shown(value(p)) for p in presets)), name
        assert what, name
    assert len(rows) == len(keys)  # no key documented that is gone


def test_a_command_run_with_its_output_closed_runs_all_the_same(tmp_path):
    """`deepfake-ray prepare ... >&-` (a cron line, a daemon): Python's stdout was None, and
    the first look at it (is it a terminal?) was a traceback."""
    workdir = tmp_path / "w"
    ended = command_process("", "prepare", "--preset", "tiny", "--source", "sample:20", "--workdir", str(workdir),
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert ended.returncode == 0 and b"Traceback" not in ended.stderr, ended.stderr[-2000:]
    assert (workdir / "data" / "manifest.parquet").exists()
