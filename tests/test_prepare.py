import errno
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from deepfake_ray import cli, config, progress, runtime, s3, storage
from deepfake_ray.data import crashes, datasets, decode, kaggle_source, prepare, sample, sources
from deepfake_ray.errors import UsageError
from tests.cli_output import error_lines, output_lines
from tests.images import SHARED_UTKFACE, bad_files, crashing_jpeg, encode, good_files, near_copies, rgb
from tests.processes import ended_pid


def write_folder(root) -> int:
    """A dataset folder with good, bad, duplicate and non-image files; returns files found."""
    os.makedirs(root / "nested")
    for name, data in good_files().items():
        (root / name).write_bytes(data)
    for name, (data, _) in bad_files().items():
        (root / "nested" / name).write_bytes(data)
    (root / "zz_copy.jpg").write_bytes(good_files()["plain.jpg"])  # sorts after the original
    (root / "README.txt").write_text("not a candidate: wrong extension")
    return len(good_files()) + len(bad_files()) + 1


def read_outputs(workdir):
    data = datasets.data_dir(workdir)
    return (storage.read_parquet(datasets.manifest_uri(data)).to_pandas(),
            storage.read_parquet(storage.join(data, "rejected.parquet")).to_pandas(),
            storage.completed(data))


@pytest.mark.parametrize("named", ["as itself", "through a link"])
def test_a_source_that_is_also_the_workdir_is_refused_from_the_first_run(named, tmp_path, capsys):
    """Taken once, such a folder's photos were read, then left out from the second run on
    as the work directory's own files: a changed source went unnoticed, --force found none."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(3):
        (faces / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    source = str(faces)
    if named == "through a link":
        os.symlink(faces, tmp_path / "link")
        source = str(tmp_path / "link")
    assert cli.main(["prepare", "--preset", "tiny", "--source", source, "--workdir", str(faces)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"--source {source} is also the --workdir" in err[0], err
    assert sorted(os.listdir(faces)) == ["face_0.jpg", "face_1.jpg", "face_2.jpg"]  # nothing written


def test_a_workdir_whose_stage_folders_hold_a_users_own_files_is_refused_before_it_changes_them(
        tmp_path, monkeypatch, capsys):
    """`--workdir proj` in a project with its own proj/data/images of photos: prepare read
    them, then replaced data/images with its stored copies, deleting the originals (and
    generate deletes any fakes/). Refused before Ray starts or anything is written; a first
    run's own leftovers (a prepare stopped while ingesting) are not a user's."""
    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)
    proj = tmp_path / "proj"
    photos = proj / "data" / "images"
    photos.mkdir(parents=True)
    for i in range(3):
        (photos / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    elsewhere = tmp_path / "faces"
    shutil.copytree(photos, elsewhere)
    for source, command in [(photos, "prepare"), (elsewhere, "pipeline")]:
        assert cli.main([command, "--preset", "tiny", "--source", str(source), "--workdir", str(proj)]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"{proj}/data already holds files no deepfake-ray run made (images)" in err[0], err
    assert sorted(os.listdir(proj)) == ["data"] and len(os.listdir(photos)) == 3  # nothing written
    (proj / "config.yaml").write_text("model: resnet50\nepochs: 3\n")  # the project's own, not a run's
    assert cli.main(["prepare", "--preset", "tiny", "--source", str(elsewhere), "--workdir", str(proj)]) == 2
    assert f"{proj}/data already holds files no deepfake-ray run made" in error_lines(capsys)[0]
    # a run of ours began there (its config.yaml): the photos inside its own stage folder still refused
    (proj / "config.yaml").write_text(config.to_yaml(config.build("tiny", workdir=str(proj))))
    assert cli.main(["prepare", "--preset", "tiny", "--source", str(photos), "--workdir", str(proj)]) == 2
    assert f"--source {photos} lies inside {proj}/data, where this run writes" in error_lines(capsys)[0]
    # what a first prepare stopped mid-ingest leaves: its hidden staging folder only
    shutil.rmtree(proj)
    (proj / "data" / ".images-new").mkdir(parents=True)
    sources.check_no_foreign_stage_folders(str(proj), "prepare")  # no UsageError
    # a file whose name is not UTF-8 (an old Latin-1 one): pyarrow's listing was a traceback
    (proj / "gan").mkdir()
    open(os.path.join(os.fsencode(proj / "gan"), b"caf\xe9.pt"), "wb").close()
    with pytest.raises(UsageError, match=r"gan already holds files no deepfake-ray run made \(caf\\xe9.pt\)"):
        sources.check_no_foreign_stage_folders(str(proj), "train-gan")


def test_a_work_directory_inside_the_source_folder_is_left_out(ray_session, tiny_cfg, tmp_path, capsys):
    """`--source .` beside runs/: the run's own sample grids and figures are no faces."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(6):
        (faces / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    workdir = faces / "runs" / "demo"
    (workdir / "gan" / "samples").mkdir(parents=True)
    (workdir / "gan" / "samples" / "epoch_000.png").write_bytes(encode(rgb(1, 64), "PNG"))
    (workdir / "gan" / "losses.png").write_bytes(encode(rgb(2, 64), "PNG"))
    (faces / "runs" / "demo-old").mkdir()  # beside it, its name longer: photos like any others
    (faces / "runs" / "demo-old" / "face_old.jpg").write_bytes(sample.face_jpeg(0, 99))
    summary = prepare.run(tiny_cfg(f"data.source={faces}", workdir=str(workdir)))
    assert (summary["images"], summary["rejected"]) == (7, 0)
    assert f"leaving out 2 files inside the work directory {workdir}" in capsys.readouterr().out
    # another run's work directory there holds its fakes: never to be taken for real faces
    other = faces / "runs" / "tiny"
    (other / "score" / "test_images" / "fake").mkdir(parents=True)
    (other / "score" / "test_images" / "fake" / "0abc.jpg").write_bytes(sample.face_jpeg(1, 0))
    (other / "fakes" / "images").mkdir(parents=True)
    (other / "fakes" / "images" / "fake_0.jpg").write_bytes(sample.face_jpeg(1, 1))
    (other / "config.yaml").write_text("workdir: runs/tiny\n")
    (other / "data").mkdir()
    (other / "data" / storage.COMPLETE).write_text("{}")  # copied by `cp -r W/*`: no hidden .lock
    # a user's own project: config.yaml beside a data/ folder of photos is no work directory
    (faces / "config.yaml").write_text("a user's own file\n")
    (faces / "data").mkdir()
    (faces / "data" / "face_6.jpg").write_bytes(sample.face_jpeg(0, 6))
    summary = prepare.run(tiny_cfg(f"data.source={faces}", workdir=str(workdir)), force=True)
    assert (summary["images"], summary["rejected"]) == (8, 0)
    assert f"leaving out 4 files inside the work directories {workdir}, {other}" in capsys.readouterr().out
    # a folder inside a work directory's stage folder is that run's outputs, its fakes here
    with pytest.raises(UsageError, match=re.escape(f"{other / 'score'} is the stage folder "
                                                   f"{other / 'score'}, whose images are a run's outputs")):
        prepare.run(tiny_cfg(f"data.source={other / 'score'}", workdir=str(tmp_path / "w2")))
    (workdir / "config.yaml").write_text("workdir: runs/demo\n")  # this run's own outputs too
    with pytest.raises(UsageError, match=re.escape(f"lies inside the stage folder {workdir / 'gan'},")):
        prepare.run(tiny_cfg(f"data.source={workdir / 'gan' / 'samples'}", workdir=str(workdir)), force=True)
    # a user's photos beside a run's stage folders (a folder once used as --workdir) are photos
    (other / "photos").mkdir()
    for i in range(3):
        (other / "photos" / f"face_{i}.jpg").write_bytes(sample.face_jpeg(2, i))
    assert prepare.run(tiny_cfg(f"data.source={other / 'photos'}", workdir=str(tmp_path / "w4")))["images"] == 3
    # one that is another run's work directory: refused before Ray starts or anything is written
    capsys.readouterr()
    assert cli.main(["prepare", "--preset", "tiny", "--source", str(other), "--workdir", str(tmp_path / "w3")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"{other} is the work directory {other}, whose images are" in err[0]
    assert not (tmp_path / "w3").exists()


def test_another_runs_work_directory_inside_an_s3_source_is_left_out(ray_session, s3_server, tiny_cfg, capsys):
    """Its held-out test fakes, saved as image files, must never be taken for real faces.
    On S3 its lock is gone once it ends: config.yaml and a stage's folder mark it."""
    faces = f"{s3_server('faces-with-runs')}/faces"
    for i in range(6):
        storage.write_bytes(f"{faces}/face_{i}.jpg", sample.face_jpeg(0, i))
    other = f"{faces}/runs/tiny"
    storage.write_bytes(f"{other}/score/test_images/fake/0abc.jpg", sample.face_jpeg(1, 0))
    storage.write_bytes(f"{other}/gan/samples/epoch_001.png", encode(rgb(1, 64), "PNG"))
    storage.write_bytes(f"{other}/config.yaml", b"workdir: runs/tiny\n")
    storage.write_bytes(f"{other}/gan/{storage.COMPLETE}", b"{}")
    # a user's own config.yaml beside a data/ of photos: no stage ever completed there
    storage.write_bytes(f"{faces}/config.yaml", b"a user's own file\n")
    storage.write_bytes(f"{faces}/data/face_6.jpg", sample.face_jpeg(0, 6))
    summary = prepare.run(tiny_cfg(f"data.source={faces}"))
    assert (summary["images"], summary["rejected"]) == (7, 0)
    assert f"leaving out 2 files inside the work directory {other}" in capsys.readouterr().out
    with pytest.raises(UsageError, match="lies inside the stage folder " + re.escape(f"{other}/score,")):
        prepare.run(tiny_cfg(f"data.source={other}/score/test_images"), force=True)


@pytest.fixture
def read_only_view(tmp_path):
    """(a folder, the same folder mounted read-only), where this machine lets a test mount
    one (as root); skipped elsewhere. A read-only disk or a teammate's folder, for real."""
    writable, read_only = tmp_path / "rw", tmp_path / "ro"
    writable.mkdir(), read_only.mkdir()
    try:
        mounted = subprocess.run(["mount", "-o", "bind,ro", str(writable), str(read_only)], capture_output=True)
    except OSError as e:  # no mount command
        pytest.skip(f"no read-only bind mount here: {e}")
    if mounted.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {mounted.stderr.decode().strip()[:100]}")
    try:
        yield writable, read_only
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


@pytest.mark.parametrize("command", ["prepare", "pipeline"])
def test_a_complete_workdir_that_cannot_be_written_any_more_exits_2_with_one_line(
        command, ray_session, read_only_view, capsys):
    """--force on a finished work directory now read-only: the same line as a new one
    gets, not a traceback from the lock of its data/."""
    writable, read_only = read_only_view
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(writable / "w"), "--source", "sample:8"]) == 0
    capsys.readouterr()
    workdir = str(read_only / "w")
    assert cli.main([command, "--preset", "tiny", "--workdir", workdir, "--source", "sample:8", "--force"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"cannot write to --workdir {workdir} (Read-only file system)" in err[0], err


def test_local_folder_every_file_accounted_for(ray_session, tiny_cfg, tmp_path, capsys):
    found = write_folder(tmp_path / "faces")
    cfg = tiny_cfg(f"data.source={tmp_path / 'faces'}")
    prepare.run(cfg)
    manifest, rejected, summary = read_outputs(cfg.workdir)
    assert len(manifest) + len(rejected) == found
    assert set(manifest["path"]).isdisjoint(rejected["path"])
    assert len(manifest) == len(good_files())
    assert dict(zip(rejected["path"].map(os.path.basename), rejected["reason"])) == {
        **{n: r for n, (_, r) in bad_files().items()}, "zz_copy.jpg": "duplicate"}
    assert summary["rejected"] == len(bad_files()) + 1
    # where the time went, for a user sizing a cluster: the parallel ingest, then the driver
    assert set(summary["phases"]) == {"ingest", "near_copies", "rest"}
    assert sum(summary["phases"].values()) == pytest.approx(summary["seconds"], abs=0.1)
    assert manifest.groupby("sha1")["split"].nunique().max() == 1
    images = pq.read_table(datasets.images_uri(datasets.data_dir(cfg.workdir))).to_pandas()
    assert sorted(images["sha1"]) == sorted(manifest["sha1"])
    assert f"prepared {len(good_files())} images ({len(bad_files()) + 1} rejected" in capsys.readouterr().out


def test_images_unlike_face_crops_are_said_once_prepared(ray_session, tiny_cfg, tmp_path, capsys):
    """prepare checks that files are images, not faces: a folder of wide scenes, thumbnails
    and logos was prepared without a word, and the detector learnt from them as faces."""
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(14):  # face crops at the size the run keeps
        (folder / f"face{i}.png").write_bytes(encode(rgb(i, 64), "PNG"))
    for i in range(2):
        (folder / f"scene{i}.png").write_bytes(encode(rgb(20 + i, 64).resize((200, 60)), "PNG"))
        (folder / f"thumb{i}.png").write_bytes(encode(rgb(30 + i, 16), "PNG"))  # tiny's resolution is 32
        (folder / f"logo{i}.png").write_bytes(encode(Image.new("RGB", (64, 64), (200, 30 + i, 40)), "PNG"))
    prepare.run(tiny_cfg(f"data.source={folder}"))
    warned = [line for line in error_lines(capsys) if line.startswith("prepare: warning:")]
    assert warned == [
        "prepare: warning: 2 images of 20 are far from square (over 1.3:1): each keeps only its middle square, "
        "which can cut a face off; crop the faces first",
        "prepare: warning: 2 images of 20 are smaller than data.resolution=32 px and are enlarged, softer than "
        "the fakes will be (a cue that is not fakeness): use larger crops, or a lower data.resolution",
        "prepare: warning: 2 images of 20 are flat, one colour or nearly (a blank frame, a logo): no face to "
        "learn from; remove them from the source"], warned


def test_the_jpeg_encoding_a_stored_photo_still_carries_is_recorded(ray_session, tiny_cfg, tmp_path):
    """What generate gives the fakes alike: a JPEG at the stored size keeps its own encoding
    under the stored one; a PNG, or a JPEG resized to the stored size, keeps none."""
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "own_size.jpg").write_bytes(encode(rgb(1, 32), "JPEG", quality=75))
    (faces / "lossless.png").write_bytes(encode(rgb(2, 32), "PNG"))
    (faces / "larger.jpg").write_bytes(encode(rgb(3, 64), "JPEG", quality=75))
    cfg = tiny_cfg(f"data.source={faces}")
    prepare.run(cfg)
    manifest, _, summary = read_outputs(cfg.workdir)
    assert dict(zip(manifest["path"].map(os.path.basename), manifest["history"])) == {
        "own_size.jpg": "jpeg q75 4:2:0", "lossless.png": "", "larger.jpg": ""}
    assert summary["histories"] == {"jpeg q75 4:2:0": 1}
    # what made the stored bytes, whose hash is each image's split: another build may store others
    from importlib.metadata import version

    from PIL import features
    assert summary["software"]["numpy"] == version("numpy")
    assert summary["software"]["libjpeg-turbo"] == features.version("libjpeg_turbo")


def test_one_picture_saved_twice_with_other_metadata_is_in_one_split_and_stored_alike(
        ray_session, tiny_cfg, tmp_path):
    """A re-save that only adds a comment is other bytes, so both files are kept, but it is
    the same picture: it must not train the detector while its copy tests it. The stored
    images are one encoding of the pixels, with nothing of the source's metadata, as the
    fakes are."""
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.jpg").write_bytes(encode(rgb(i, 48), "JPEG", quality=90))
        (folder / f"{i}-commented.jpg").write_bytes(encode(rgb(i, 48), "JPEG", quality=90,
                                                           comment=b"from a camera"))
    cfg = tiny_cfg(f"data.source={folder}", "data.splits=[0.34, 0.33, 0.33]")
    prepare.run(cfg)
    manifest, rejected, _ = read_outputs(cfg.workdir)
    assert len(manifest) == 24 and rejected.empty and manifest["sha1"].nunique() == 24
    picture = manifest["path"].map(lambda p: os.path.basename(p).split("-")[0].split(".")[0])
    assert manifest.groupby(picture)["split"].nunique().max() == 1
    images = pq.read_table(datasets.images_uri(datasets.data_dir(cfg.workdir))).to_pandas()
    stored = dict(zip(images["sha1"], images["image"]))
    by_picture = manifest.assign(image=manifest["sha1"].map(stored)).groupby(picture)["image"]
    assert by_picture.nunique().max() == 1
    assert not any(b"from a camera" in image for image in images["image"])


def test_near_copies_of_a_picture_share_its_split_in_the_manifest_and_every_reader(
        ray_session, tiny_cfg, tmp_path, capsys):
    """A photo filed again recompressed, resized or retouched is other pixels, so kept, but
    the same picture: the detector must not train on one copy and be tested on another."""
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(40):  # 200 files: several ingest tasks, so copies land in other parts
        picture = rgb(i, 96)
        (folder / f"{i}.png").write_bytes(encode(picture, "PNG"))
        for name, data in near_copies(picture).items():
            (folder / f"{i}-{name}").write_bytes(data)
    cfg = tiny_cfg(f"data.source={folder}", "data.splits=[0.34, 0.33, 0.33]", "resources.data_cpus=0.5")
    summary = prepare.run(cfg)
    manifest, rejected, _ = read_outputs(cfg.workdir)
    assert len(manifest) == 200 and rejected.empty
    picture = manifest["path"].map(lambda p: os.path.basename(p).split("-")[0].split(".")[0])
    assert manifest.groupby(picture)["split"].nunique().max() == 1
    assert set(manifest["split"]) == set(datasets.SPLITS)
    # one file of each picture is the one the others name
    named = manifest.groupby(picture)["near_copy_of"].agg(lambda s: set(s) - {""})
    assert all(len(n) == 1 and picture[manifest["path"] == next(iter(n))].item() == p for p, n in named.items())
    assert summary["near_copies"] == 160
    assert "160 near copies in their picture's split" in capsys.readouterr().out
    # training reads each split as the manifest draws it, from parts that hold no split
    data = datasets.data_dir(cfg.workdir)
    assert len(storage.list_files(datasets.images_uri(data))) > 1
    assert pq.read_table(datasets.images_uri(data)).column_names == datasets.IMAGES_COLUMNS
    for split in datasets.SPLITS:
        stored = datasets.read_split(data, split).select_columns(["sha1"]).to_pandas()["sha1"]
        assert sorted(stored) == sorted(manifest.loc[manifest["split"] == split, "sha1"])
    # parts made before kept a split of their own: a stale one does not count
    for uri in storage.list_files(datasets.images_uri(data)):
        part = storage.read_parquet(uri)
        datasets.write_images_part(uri, part.append_column("split", pa.array(["train"] * part.num_rows)))
    stored = datasets.read_split(data, "test").select_columns(["sha1"]).to_pandas()["sha1"]
    assert sorted(stored) == sorted(manifest.loc[manifest["split"] == "test", "sha1"]) != []


@pytest.mark.parametrize("where", ["in-process", "copied to S3 first, as on a cluster"])
def test_odd_folder_entries_neither_hang_nor_loop_nor_crash(ray_session, tiny_cfg, tmp_path, capsys,
                                                            where, s3_server, monkeypatch):
    # a folder in it named in Latin-1 (the source itself cannot be: Ray takes the command
    # line as UTF-8, see test_runtime)
    root, sub, good = tmp_path / "odd", os.fsdecode(b"sub_\xe9"), good_files()
    (root / sub).mkdir(parents=True)
    (root / "a.jpg").write_bytes(good["plain.jpg"])
    (root / sub / "b.png").write_bytes(good["gray.png"])
    os.symlink("..", root / sub / "up")  # a link back up the tree: each file still once
    os.mkfifo(root / "pipe.jpg")  # a reader that opens it waits for a writer, forever
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself: following it fails (ELOOP)
    with open(root / "huge.jpg", "wb") as f:  # larger than any image can be (a video?): sparse,
        f.truncate(decode.max_file_bytes() + 1)  # so it costs no disk; refused unread
    (root / ".git").mkdir()
    (root / ".git" / "c.png").write_bytes(good["rgba.png"])  # hidden folder: left out
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: left out
    with open(os.fsencode(root) + b"/latin1_\xe9.jpg", "wb") as f:  # not valid UTF-8
        f.write(good["upper.JPG"])
    workdir = str(tmp_path / "work")
    if where != "in-process":  # the driver reads them, and sends what it can read to S3
        monkeypatch.setattr(runtime, "driver_files_need_copying", lambda workdir: True)
        workdir = f"{s3_server('odd-entries')}/r1"
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", workdir, "--source", str(root),
                     "--set", "data.splits=[0.001, 0.499, 0.5]"]) == 0  # and no train split
    out = capsys.readouterr().err
    assert "warning: the train split is empty (3 images in all)" in out
    cfg = tiny_cfg(workdir=workdir)
    manifest, rejected, summary = read_outputs(cfg.workdir)
    assert any(p.endswith("/sub_\\xe9/b.png") for p in manifest["path"])  # its odd byte shown as \xNN
    assert sorted(manifest["path"].map(os.path.basename)) == ["a.jpg", "b.png", "latin1_\\xe9.jpg"]
    reasons = dict(zip(rejected["path"].map(os.path.basename), rejected["detail"]))
    assert sorted(reasons) == ["huge.jpg", "loop.jpg", "pipe.jpg"]
    assert sorted(rejected["reason"]) == ["too large", "unreadable", "unreadable"]
    assert reasons["huge.jpg"] == (f"too large: {decode.max_file_bytes() + 1:,} bytes, over "
                                   f"{decode.max_file_bytes():,}: more than any image within "
                                   "data.max_pixels can be")
    assert "not a regular file" in reasons["pipe.jpg"] and "symbolic links" in reasons["loop.jpg"]
    assert list(rejected["sha1"]) == ["", "", ""]  # none was read: no hash of nothing


def test_rerun_skips_and_force_redoes(ray_session, tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", {True: 0.02, False: 0.02})
    cfg = tiny_cfg("data.source=sample", "data.sample_size=40")  # a bare `sample`: its count from the setting
    first = prepare.run(cfg)
    shown = [int(n) for n in re.findall(r"^prepare: (\d+) / 40 files", capsys.readouterr().out, re.M)]
    assert shown and shown == sorted(shown) and shown[-1] == 40  # counts up, ends complete
    manifest, _, _ = read_outputs(cfg.workdir)
    assert prepare.run(cfg) == first
    out = capsys.readouterr().out
    assert "already complete" in out and "note:" not in out
    marker = os.path.join(datasets.data_dir(cfg.workdir), storage.COMPLETE)
    # a data/ of the version before near copies were grouped: kept, and said so
    older = storage.read_json(marker)
    del older["near_copies"]
    storage.write_json(marker, older)
    assert prepare.run(cfg) == older
    out = capsys.readouterr().out
    assert f"prepare: note: {datasets.data_dir(cfg.workdir)} was made before near copies were grouped" in out
    assert "--force prepares it again" in out
    older["near_copies"] = 0  # and one made before flipped copies counted
    del older["flipped_copies_grouped"]
    storage.write_json(marker, older)
    prepare.run(cfg)
    assert f"{datasets.data_dir(cfg.workdir)} was made before flipped copies counted as near copies" \
        in capsys.readouterr().out
    made = os.stat(marker).st_mtime_ns
    prepare.run(cfg, force=True)
    assert "prepared 40 images" in capsys.readouterr().out and os.stat(marker).st_mtime_ns != made
    again, _, _ = read_outputs(cfg.workdir)
    assert list(again["sha1"]) == list(manifest["sha1"])  # seeded: same images, same splits
    assert list(again["split"]) == list(manifest["split"])


def test_progress_in_a_log_is_quiet_for_a_short_run_and_never_claims_more_than_was_done(monkeypatch, capsys):
    """In a log, a line every 10 s: a run shorter than that prints none (its summary line
    says it all). A run stopped part way ends on what it did, not on its total."""
    done = [0]
    with progress.Progress("prepare", 10, "files", lambda: done[0]):
        done[0] = 10
        time.sleep(1.5)  # past a terminal's interval, within a log's
    assert output_lines(capsys) == []
    monkeypatch.setattr(progress, "EVERY_S", {True: 0.02, False: 0.02})
    with pytest.raises(KeyboardInterrupt):
        with progress.Progress("prepare", 10, "files", lambda: done[0]):
            done[0] = 3
            time.sleep(0.2)
            raise KeyboardInterrupt
    assert output_lines(capsys)[-1] == "prepare: 3 / 10 files (30%)"


def test_sample_faces_are_the_same_for_a_seed_and_differ_between_seeds_and_faces():
    """`sample` makes each face from (seed, index) alone: a rerun makes the same bytes, and
    another seed (the config's `seed`) other faces, not the same set again."""
    first = sample.face_jpeg(0, 1)
    assert sample.face_jpeg(0, 1) == first
    assert sample.face_jpeg(1, 1) != first and sample.face_jpeg(0, 2) != first


def test_a_first_pipeline_stopped_before_any_stage_changed_names_no_config_it_put_back(
        ray_session, tmp_path, capsys):
    """Its closing hint named `--config W/config.yaml` "with the settings of this run", but
    a run that changed no stage puts its config.yaml back (here: none): the hint failed
    with "config file not found", or ran an earlier run's settings."""
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "x.jpg").write_bytes(b"not an image at all\n" * 40)
    workdir = tmp_path / "w"
    assert cli.main(["pipeline", "--preset", "tiny", "--source", str(faces), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "pipeline stopped at stage 'prepare'" in err and "this stage alone" not in err
    assert not (workdir / "config.yaml").exists()


def test_a_source_subfolder_gone_unreadable_keeps_the_complete_data(ray_session, tiny_cfg, tmp_path, capsys,
                                                                    monkeypatch):
    """`chmod 000 faces/b` after a prepare: its images counted as deleted, and data/, the
    GAN, the fakes and the detector were all made again without them."""
    faces = tmp_path / "faces"
    for i in range(6):
        (faces / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (faces / "ab"[i % 2] / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    (faces / "lost+found").mkdir()  # never readable: no reason to keep data/ when photos are added
    scandir, denied = os.scandir, {str(faces / "lost+found")}

    def denied_to_us(path="."):  # tests run as root, whom no mode stops
        if path in denied:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied_to_us)
    cfg = tiny_cfg(f"data.source={faces}")
    assert prepare.run(cfg)["images"] == 6
    (faces / "a" / "face_6.jpg").write_bytes(sample.face_jpeg(0, 6))
    assert prepare.preflight(cfg) is None  # an added photo: made again
    (faces / "a" / "face_6.jpg").unlink()
    denied.add(str(faces / "b"))
    capsys.readouterr()
    assert prepare.preflight(cfg) is not None  # complete, kept
    assert (f"prepare: cannot tell whether the files in {faces} changed (2 folder(s) could not be read): "
            "keeping the complete data/ (--force makes it again)") in capsys.readouterr().out


def test_a_source_folder_whose_files_changed_is_prepared_again(ray_session, tiny_cfg, tmp_path, capsys):
    """Not "complete, skipped" over the images the folder held before: the pipeline would
    train on the old set. The same files again: skipped."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(6):
        (faces / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    cfg = tiny_cfg(f"data.source={faces}")
    assert prepare.run(cfg)["images"] == 6
    capsys.readouterr()
    assert prepare.preflight(cfg) is not None and "already complete" in capsys.readouterr().out
    (faces / "face_6.jpg").write_bytes(sample.face_jpeg(0, 6))  # one more photo
    assert prepare.preflight(cfg) is None  # to be made again, before Ray starts
    summary = prepare.run(cfg)
    out = capsys.readouterr().out
    assert f"prepare: the files in {faces} changed (6 images then, 7 now) since" in out
    assert summary["images"] == 7 and "making it again" in out
    os.rename(faces / "face_0.jpg", faces / "renamed.jpg")  # as many, other names
    assert prepare.run(cfg)["images"] == 7
    assert "changed (7 images then, 7 now, other names)" in capsys.readouterr().out
    assert prepare.preflight(cfg) is not None  # unchanged since: complete
    assert "already complete" in capsys.readouterr().out
    # a photo read while it was still being copied, then whole: same names, other sizes
    whole = (faces / "face_1.jpg").read_bytes()
    (faces / "face_1.jpg").write_bytes(whole[:400])
    summary = prepare.run(cfg)
    assert (summary["images"], summary["reasons"]) == (6, {"truncated": 1})
    (faces / "face_1.jpg").write_bytes(whole)
    summary = prepare.run(cfg)
    assert (summary["images"], summary["rejected"]) == (7, 0)
    assert "(7 images then, 7 now, other sizes: a file rewritten, or still being copied then)" in \
        capsys.readouterr().out
    # data/ made before sizes were recorded: its names still match, so it is complete
    data = datasets.data_dir(cfg.workdir)
    done = storage.completed(data)
    del done["source_files"]["sizes"]
    storage.mark_complete(data, done)
    (faces / "face_2.jpg").write_bytes((faces / "face_2.jpg").read_bytes() + b"\0")
    assert prepare.preflight(cfg) is not None and "already complete" in capsys.readouterr().out


def test_one_command_lists_its_source_folder_once(ray_session, tiny_cfg, tmp_path, capsys, monkeypatch):
    """Asking whether data/ is current lists the source, and a pipeline asks up to five
    times before its prepare reads it: an S3 prefix of 100k images lists in 100 requests."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(6):
        (faces / f"face_{i}.jpg").write_bytes(sample.face_jpeg(0, i))
    cfg = tiny_cfg(f"data.source={faces}")
    prepare.run(cfg)
    (faces / "face_6.jpg").write_bytes(sample.face_jpeg(0, 6))  # changed: listed, then read
    listed = []
    listing = storage.listing
    monkeypatch.setattr(storage, "listing", lambda uri: listed.append(uri) or listing(uri))
    command = ["prepare", "--preset", "tiny", "--workdir", cfg.workdir, "--source", str(faces)]
    assert cli.main(command) == 0  # checked before Ray starts, and as it runs; then read
    assert listed == [str(faces)], listed
    assert storage.completed(datasets.data_dir(cfg.workdir))["images"] == 7
    listed.clear()
    assert cli.main(command) == 0 and "already complete" in capsys.readouterr().out
    assert listed == [str(faces)], listed


def test_jfif_and_jpe_files_are_read_and_the_files_left_out_for_their_names_are_said(
        ray_session, tiny_cfg, tmp_path, capsys):
    """A folder of .jfif files (Chrome on Windows saves JPEGs so) was prepared as 0 images,
    and a .bmp among .jpgs made the count smaller, with no word of either."""
    faces = tmp_path / "faces"
    (faces / "more").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.JFIF", "more/c.jpe"]):
        (faces / name).write_bytes(encode(rgb(i, 32), "JPEG"))
    (faces / "more" / "d.bmp").write_bytes(encode(rgb(3, 32), "BMP"))
    (faces / "notes.txt").write_text("not an image")
    cfg = tiny_cfg(f"data.source={faces}")
    prepare.run(cfg)
    manifest = read_outputs(cfg.workdir)[0]
    assert sorted(manifest["path"].map(lambda p: os.path.relpath(p, faces))) == ["a.jpg", "b.JFIF", "more/c.jpe"]
    noted = [line for line in output_lines(capsys) if line.startswith("prepare: note: left out")]
    assert noted == [f"prepare: note: left out 2 files not named {'/'.join(sources.image_suffixes())} "
                     "(first: more/d.bmp): convert any images among them to one of these to ingest them"], noted


def test_a_source_folder_whose_name_ends_in_a_space_is_read_as_typed(ray_session, tmp_path, capsys):
    """`--source "faces "` (an unzipped archive's folder) was stripped: it read `faces`."""
    for name, count in (("faces ", 3), ("faces", 5)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.jpg").write_bytes(sample.face_jpeg(len(name), i))
    workdir = str(tmp_path / "w")
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", workdir, "--source", str(tmp_path / "faces ")]) == 0
    manifest = read_outputs(workdir)[0]
    assert len(manifest) == 3 and all(p.startswith(str(tmp_path / "faces ") + "/") for p in manifest["path"])
    assert storage.completed(datasets.data_dir(workdir))["settings"]["data.source"] == str(tmp_path / "faces ")


def test_complete_data_of_other_settings_is_refused_and_a_failed_redo_keeps_it(
        ray_session, tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("data.source=sample:40")
    prepare.run(cfg)
    before = read_outputs(cfg.workdir)[0]
    prepare_again = ["prepare", "--preset", "tiny", "--workdir", cfg.workdir]
    assert cli.main(prepare_again + ["--source", " sample:040"]) == 0  # the same 40 faces, spelled otherwise
    assert "already complete" in capsys.readouterr().out
    marker = os.path.join(datasets.data_dir(cfg.workdir), storage.COMPLETE)
    done = storage.read_json(marker)
    done["settings"]["data.source"] = "sample:040"  # as versions before recorded it: as typed
    storage.write_bytes(marker, json.dumps(done).encode())
    for spelled in ("sample:040", "sample:40"):
        assert cli.main(prepare_again + ["--source", spelled]) == 0
        assert "already complete" in capsys.readouterr().out
    for bare in (["--source", "sample", "--set", "data.sample_size=40"],
                 ["--set", "data.source=sample:", "--set", "data.sample_size=40"]):
        assert cli.main(prepare_again + bare) == 0  # its count from the setting: the same faces
        assert "already complete" in capsys.readouterr().out
    for empty in (["--source", " "], ["--set", "data.source="]):  # not "made with data.source=sample:40"
        assert cli.main(prepare_again + empty) == 2
        assert error_lines(capsys) == ["deepfake-ray prepare: error: no source given: pass --source (or "
                                       f"data.source) as {sources.FORMS}"]
    assert cli.main(prepare_again + ["--source", "sample:41", "--set", "data.resolution=48"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "made with data.source=sample:40 (asked: sample:41), " \
                             "data.resolution=32 (asked: 48)" in err[0] and "--force" in err[0]
    own = err[0].rsplit("its own settings (", 1)[1].rstrip(")")  # appended, it wins over --source
    assert cli.main(prepare_again + ["--source", "sample:41", "--set", "data.resolution=48", *shlex.split(own)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert cli.main(["pipeline", "--preset", "tiny", "--workdir", cfg.workdir,
                     "--set", "data.source=sample:41"]) == 2  # the stages after it build on it
    assert "made with data.source=sample:40 (asked: sample:41)" in error_lines(capsys)[0]
    assert not os.path.exists(os.path.join(cfg.workdir, "config.yaml"))  # nothing was run
    for command in ("prepare", "pipeline"):  # a typo is caught before the complete data/ is unmarked
        assert cli.main([command, "--preset", "tiny", "--workdir", cfg.workdir, "--force",
                         "--set", f"data.source={tmp_path / 'typo'}"]) == 2
        assert "does not exist" in error_lines(capsys)[0]
        assert storage.completed(datasets.data_dir(cfg.workdir)) is not None
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    for name, (data, _) in bad_files().items():
        (unusable / name).write_bytes(data)
    (unusable / "\x1b]0;owned\x07\x1b[2K\rall good.jpg").write_bytes(b"text")  # named to rewrite a terminal
    leftover = os.path.join(datasets.data_dir(cfg.workdir), ".images-new")  # an interrupted run's
    os.makedirs(leftover)
    open(os.path.join(leftover, "part.parquet"), "wb").close()
    assert cli.main(prepare_again + ["--source", str(unusable), "--force"]) == 2
    err = capsys.readouterr().err
    assert "none of the" in err and "\\x1b]0;owned\\x07\\x1b[2K\\x0dall good.jpg" in err
    assert not any(c in err.rsplit("error: ", 1)[1] for c in "\x1b\x07\r"), err  # the line as it is
    assert not os.path.exists(os.path.join(cfg.workdir, "config.yaml"))  # no stage was changed
    # found only once every file was read: the data it would have replaced are kept, whole
    assert storage.completed(datasets.data_dir(cfg.workdir))["images"] == 40
    assert read_outputs(cfg.workdir)[0].equals(before)
    assert datasets.read_split(datasets.data_dir(cfg.workdir), "train").count() == (before["split"] == "train").sum()
    assert sorted(os.listdir(datasets.data_dir(cfg.workdir))) == [
        ".lock", storage.COMPLETE, "images", "manifest.parquet", "rejected.parquet"]  # nothing else


def test_s3_source_and_s3_workdir(ray_session, s3_server, tiny_cfg, tmp_path, capsys):
    bucket = s3_server("faces-in")
    write_folder(tmp_path / "faces")
    storage.upload_dir(str(tmp_path / "faces"), f"{bucket}/celebs")
    storage.write_bytes(f"{bucket}/celebs", b"")  # a folder placeholder some S3 tools write
    client, name, _ = s3.s3_client(bucket)  # a key with an empty part, which S3 allows
    client.put_object(Bucket=name, Key="celebs//doubled/slash.jpg", Body=sample.face_jpeg(3, 1))
    for i, key in enumerate(("celebs/./dot.jpg", "celebs/x/../dots.jpg")):  # keys too, not hidden names
        client.put_object(Bucket=name, Key=key, Body=sample.face_jpeg(3, 3 + i))
    # archived by a lifecycle rule: S3 lists it but will not read it, one file's problem
    client.put_object(Bucket=name, Key="celebs/archived.jpg", Body=sample.face_jpeg(3, 2),
                      StorageClass="GLACIER")
    with pytest.raises(UsageError, match="is a file: pass the folder"):
        sources.check_source(f"{bucket}/celebs/plain.jpg", tiny_cfg().data)
    assert cli.main(["prepare", "--preset", "tiny", "--source", f"{bucket}/celebs//doubled",
                     "--workdir", str(tmp_path / "w")]) == 2  # pyarrow cannot list it, but can its parent:
    assert error_lines(capsys) == [f"deepfake-ray prepare: error: {bucket}/celebs//doubled: an S3 path with an "
                                   f"empty part ('//'): write it as {bucket}/celebs/doubled, or, for keys that "
                                   f"hold '//' themselves, the prefix above it ({bucket}/celebs)"]
    cfg = tiny_cfg(f"data.source={bucket}/celebs", workdir=f"{s3_server('runs-out')}/r1")
    prepare.run(cfg)
    manifest, rejected, summary = read_outputs(cfg.workdir)
    assert len(manifest) == len(good_files()) + 3 and summary["rejected"] == len(bad_files()) + 2
    archived = rejected[rejected["path"] == f"{bucket}/celebs/archived.jpg"].iloc[0]
    assert archived["reason"] == "unreadable" and "InvalidObjectState" in archived["detail"]
    assert {f"{bucket}/celebs//doubled/slash.jpg", f"{bucket}/celebs/./dot.jpg",
            f"{bucket}/celebs/x/../dots.jpg"} <= set(manifest["path"])
    assert all(p.startswith(f"{bucket}/celebs/") for p in manifest["path"])
    assert datasets.read_split(datasets.data_dir(cfg.workdir), "train").count() == (manifest["split"] == "train").sum()
    # an object overwritten with another picture of another size: data/ is made again
    client.put_object(Bucket=name, Key="celebs/./dot.jpg", Body=sample.face_jpeg(3, 9) + b"\0" * 10)
    assert prepare.preflight(cfg) is None
    summary = prepare.run(cfg)
    assert summary["images"] == len(good_files()) + 3 and "other sizes" in capsys.readouterr().out
    # what a redo leaves: no empty "folder" object or temporary prefix, as pyarrow's moves left
    out, prefix = s3.s3_client(cfg.workdir)[1:]
    keys = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=out, Prefix=prefix)["Contents"]}
    assert all(size > 0 and ".images-new" not in key for key, size in keys.items()), keys


def test_an_s3_source_of_which_no_object_can_be_read_is_one_line(ray_session, s3_server, tiny_cfg):
    bucket = s3_server("faces-archived")
    client, name, _ = s3.s3_client(bucket)
    for i in range(3):
        client.put_object(Bucket=name, Key=f"cold/face{i}.jpg", Body=sample.face_jpeg(3, i),
                          StorageClass="DEEP_ARCHIVE")
    cfg = tiny_cfg(f"data.source={bucket}/cold")
    with pytest.raises(UsageError, match=r"none of the 3 files .* is a usable image \({'unreadable': 3}; "
                                         r"the first: .*/cold/face0.jpg \(unreadable: ObjectRefused: "
                                         r".*InvalidObjectState.*\)\): "
                                         r"check the source"):
        prepare.run(cfg)


def test_s3_problems_are_one_line_naming_the_fix(s3_server, tmp_path, capsys, monkeypatch):
    prepare_on = ["prepare", "--preset", "tiny", "--source", "sample:8", "--workdir"]
    assert cli.main(prepare_on + ["s3://no-such-bucket/run"]) == 2
    err = error_lines(capsys)
    assert err == ["deepfake-ray prepare: error: s3://no-such-bucket/run/config.yaml: "
                   "the bucket does not exist: check the s3:// path"]
    s3_server("faces-here")  # the store answers: only that bucket is missing
    assert cli.main(["prepare", "--preset", "tiny", "--source", "s3://no-such-bucket/faces", "--workdir",
                     str(tmp_path / "w")]) == 2
    assert error_lines(capsys) == ["deepfake-ray prepare: error: source 's3://no-such-bucket/faces': the bucket "
                                   "no-such-bucket does not exist: check the s3:// path (and AWS_ENDPOINT_URL, "
                                   "for another store)"]
    assert cli.main(prepare_on + [s3_server("faces-doubled") + "//run"]) == 2
    assert error_lines(capsys) == [f"deepfake-ray prepare: error: {s3_server('faces-doubled')}//run: an "
                                   f"S3 path with an empty part ('//'): write it as "
                                   f"{s3_server('faces-doubled')}/run"]
    # nothing listens there; the user and password a proxy may take are never printed
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://bob:Pr0xy-Secret@127.0.0.1:9")
    s3.filesystem_for.cache_clear()
    try:
        assert cli.main(prepare_on + [s3_server("faces-unreached") + "/run"]) == 2
    finally:
        s3.filesystem_for.cache_clear()
    err = error_lines(capsys)
    assert len(err) == 1 and "cannot reach the S3 endpoint http://***@127.0.0.1:9" in err[0], err
    assert "Pr0xy-Secret" not in err[0] and "bob" not in err[0]


def test_an_s3_failure_inside_an_ingest_task_still_names_the_fix(ray_session, monkeypatch):
    """...and Ray Data's tracebacks of it stay off the console (a real bug's do not)."""
    def refused(batch):  # as a store that refuses the reads after the listing; local: sent by value
        raise OSError("When reading information for key 'faces/a.jpg' in bucket 'photos': "
                      "AWS Error ACCESS_DENIED during GetObject operation: Access Denied")

    def broken(batch):
        raise RuntimeError("a bug of ours")

    console = io.StringIO()  # in place of the stderr Ray Data's console handler writes to
    for handler in runtime.console_handlers("ray.data"):
        monkeypatch.setattr(handler, "stream", console)
    with pytest.raises(Exception) as failed:
        ray.data.range(2).map_batches(refused).take_all()
    assert str(cli.find_usage_error(failed.value)).startswith(
        "s3://photos/faces/a.jpg: access denied: check the AWS credentials")
    assert "ACCESS_DENIED" not in console.getvalue()
    with pytest.raises(Exception):
        ray.data.range(2).map_batches(broken).take_all()
    assert "RuntimeError: a bug of ours" in console.getvalue()


def test_copies_in_other_tasks_parts_are_removed_on_s3(ray_session, s3_server, tiny_cfg, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(150):
        (folder / f"face_{i:03d}.jpg").write_bytes(sample.face_jpeg(3, i))
    for i in range(0, 150, 10):  # sort last: most land in another task than their original
        (folder / f"zz_copy_{i:03d}.jpg").write_bytes(sample.face_jpeg(3, i))
    cfg = tiny_cfg(f"data.source={folder}", "resources.data_cpus=0.5",  # 2+ tasks on any machine
                   workdir=f"{s3_server('runs-dedupe')}/r1")
    summary = prepare.run(cfg)
    manifest, rejected, _ = read_outputs(cfg.workdir)
    assert summary["images"] == 150 and summary["reasons"] == {"duplicate": 15}
    assert all(os.path.basename(p).startswith("zz_copy_") for p in rejected["path"])
    # read where they are: the in-process Ray's tasks share this disk, so no copy of the
    # folder goes to the bucket first (100k photos: gigabytes and minutes for nothing)
    assert all(p.startswith(f"{folder}/") for p in manifest["path"])
    assert storage.list_files(f"{cfg.workdir}/sources") == []
    images = datasets.images_uri(datasets.data_dir(cfg.workdir))
    assert len(storage.list_files(images)) > 1  # originals and copies were in different tasks
    hashes = storage.read_parquet(images, columns=["sha1"]).column("sha1").to_pylist()
    assert sorted(hashes) == sorted(manifest["sha1"])  # every image once, none lost


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def flat(chunks) -> list[str]:
    return [p for chunk in chunks for p in chunk]


def test_claims_a_killed_run_left_are_removed_by_the_next(tmp_path):
    gone = ended_pid()
    fresh = prepare.claims_dir()
    parent = os.path.dirname(fresh)
    left = os.path.join(parent, f"{prepare.CLAIMS_PREFIX}{gone}-killed")
    os.makedirs(os.path.join(left, "0.0"))
    # of a process this one cannot see (another container sharing /dev/shm), still changing
    elsewhere = os.path.join(parent, f"{prepare.CLAIMS_PREFIX}{gone}-in-another-container")
    os.makedirs(os.path.join(elsewhere, "0.0"))
    earlier = time.time() - prepare.CLAIMS_STALE_S - 60
    os.utime(left, (earlier, earlier))
    mine = prepare.claims_dir()
    try:
        assert not os.path.exists(left) and os.path.isdir(fresh)  # a live run's are kept
        assert os.path.isdir(elsewhere)
    finally:
        for folder in (fresh, mine, left, elsewhere):
            shutil.rmtree(folder, ignore_errors=True)


def test_a_finished_task_takes_over_chunks_of_running_blocks_only(tmp_path):
    blocks = [names("a", 100), names("b", 100), names("c", 100)]
    slow = prepare.shared_chunks(0, blocks, str(tmp_path))
    first = next(slow)  # block 0's task has started and holds one chunk
    fast = flat(prepare.shared_chunks(1, blocks, str(tmp_path)))  # block 1's ends first
    rest = flat(slow)
    assert set(blocks[1]) < set(fast) and set(fast) - set(blocks[1]) <= set(blocks[0])
    assert sorted(first + rest + fast) == blocks[0] + blocks[1]  # each file once
    assert flat(prepare.shared_chunks(2, blocks, str(tmp_path))) == blocks[2]  # not started: left to its task


def test_a_retried_task_redoes_the_chunks_its_lost_attempt_claimed(tmp_path):
    blocks = [names("a", 100), names("b", 100)]
    lost = prepare.shared_chunks(0, blocks, str(tmp_path))
    claimed = next(lost) + next(lost)  # then its worker died
    other = flat(prepare.shared_chunks(1, blocks, str(tmp_path)))  # takes over the rest of block 0
    retried = flat(prepare.shared_chunks(0, blocks, str(tmp_path)))
    assert retried == claimed == blocks[0][:2 * prepare.CHUNK_FILES]
    assert sorted(retried + other) == blocks[0] + blocks[1]


@pytest.mark.slow
def test_files_that_crash_the_image_library_are_set_aside_and_the_rest_prepared(tmp_path):
    """A file whose decoding kills its worker failed every try of its task (then `prepare`).
    Now Ray's retries of the task find the file, which is set aside and counted."""
    from tests.processes import crashing_image_library, run_cli

    faces = tmp_path / "faces"
    faces_folder(faces, {f"face{i:03d}.jpg": i for i in range(70)})  # two blocks: two tasks
    for i in range(2):  # first by name: both in the first task's first chunk
        (faces / f"crash{i}.jpg").write_bytes(crashing_jpeg(i))
    prepared = run_cli(["prepare", "--preset", "tiny", "--source", str(faces), "--workdir", str(tmp_path / "w")],
                       crashing_image_library(tmp_path / "library"), timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    manifest, rejected, summary = read_outputs(tmp_path / "w")
    assert sorted(manifest["path"].map(os.path.basename)) == [f"face{i:03d}.jpg" for i in range(70)]
    assert dict(zip(rejected["path"].map(os.path.basename), rejected["reason"])) == {
        "crash0.jpg": "killed its decoder", "crash1.jpg": "killed its decoder"}
    assert "prepared 70 images (2 rejected: 2 killed its decoder;" in prepared.stdout


def faces_folder(root, names_to_faces: dict[str, int]) -> dict[str, str]:
    """Real JPEG files (sample faces by index), as block paths by name."""
    root.mkdir(exist_ok=True)
    for name, face in names_to_faces.items():
        (root / name).write_bytes(sample.face_jpeg(5, face))
    return {name: str(root / name) for name in names_to_faces}


def run_task(block: int, blocks, claims, images) -> list[dict]:
    """One task of `prepare` (ingest_block) run here, as a Ray worker runs it."""
    os.makedirs(claims, exist_ok=True)
    rows = prepare.ingest_block({"block": [block], "paths": [blocks[block]]}, images=str(images),
                                size=32, quality=90, max_pixels=10 ** 7, splits=(0.8, 0.1, 0.1),
                                blocks=blocks, claims=str(claims))
    return rows.to_pylist()


def task_dying_on(bad: list[str], block: int, blocks, claims, images, run: str):
    """run_task as a Ray task, with prepare's retries, whose worker dies, as a crashing
    image library kills it, whenever it decodes one of the files `bad`; its result's ref."""
    crashing = {open(path, "rb").read() for path in bad}
    os.makedirs(claims, exist_ok=True)

    @ray.remote(max_retries=runtime.WORKER_RETRIES)  # by value: Ray's workers cannot import a test
    def task():
        real = decode.inspect
        decode.inspect = lambda data, *a, **kw: os.kill(os.getpid(), signal.SIGKILL) if data in crashing \
            else real(data, *a, **kw)
        try:
            return prepare.ingest_block({"block": [block], "paths": [blocks[block]]}, images=str(images),
                                        size=32, quality=90, max_pixels=10 ** 7, splits=(0.8, 0.1, 0.1),
                                        blocks=blocks, claims=str(claims), run=run).to_pylist()
        finally:  # the worker that lived on serves other tests' tasks
            decode.inspect = real

    return task.remote()


def notes_left(run: str) -> list[bytes]:
    """The run's notes in Ray's key-value store, where its tasks keep them."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_list(f"{run}/", namespace=crashes.NAMESPACE)


def test_a_file_that_killed_the_task_which_took_it_over_is_set_aside_by_its_retry(ray_session, tmp_path):
    """Block 1's task has started; block 0's, done with its own, takes over block 1's last
    chunk, whose file kills it. Ray's retry decodes that chunk a file at a time and dies on
    the file, noted; the next try sets the file aside and keeps the rest."""
    count = prepare.CHUNK_FILES
    paths = faces_folder(tmp_path / "faces", {f"{i:03d}.jpg": i for i in range(3 * count)})
    blocks = [list(paths.values())[:count], list(paths.values())[count:]]
    bad = blocks[1][-1]
    claims, images = tmp_path / "claims", tmp_path / "images"
    claims.mkdir()
    os.symlink("1", claims / "1.0")  # block 1's task holds its first chunk
    with crashes.named_if_fatal("took-over", "FOLDER"):
        rows = ray.get(task_dying_on([bad], 0, blocks, claims, images, "took-over"))
    assert sorted(r["path"] for r in rows) == sorted(blocks[0] + blocks[1][count:])
    assert {r["path"]: r["reason"] for r in rows if r["reason"]} == {bad: "killed its decoder"}
    assert notes_left("took-over") == []


def test_more_crashing_files_than_a_task_can_set_aside_are_named_in_one_line(ray_session, tmp_path, monkeypatch):
    """Three files that kill the decoder in one task: its 1 + 3 tries set two aside and die
    on the third, and the stage then stops, on the error Ray raises once the tries are
    spent, with one line naming the three (and their notes are gone), Ray Data's traceback
    of it kept off the console."""
    paths = list(faces_folder(tmp_path / "faces", {f"{i:03d}.jpg": i for i in range(8)}).values())
    claims, images = tmp_path / "claims", tmp_path / "images"
    console = io.StringIO()  # in place of the stderr Ray Data's console handler writes to
    for handler in runtime.console_handlers("ray.data"):
        monkeypatch.setattr(handler, "stream", console)
    logged = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    with pytest.raises(UsageError) as stopped, crashes.named_if_fatal("too-many", "FOLDER"):
        try:
            ray.get(task_dying_on(paths[2:5], 0, [paths], claims, images, "too-many"))
        except ray.exceptions.WorkerCrashedError as e:  # as Ray Data logs it, then raises it
            logged.error("An exception was raised from a task", exc_info=e)
            raise
    assert "WorkerCrashedError" not in console.getvalue()
    logged.error("An exception was raised from a task", exc_info=ray.exceptions.WorkerCrashedError())
    assert "WorkerCrashedError" in console.getvalue()  # elsewhere, where nothing explains it
    assert str(stopped.value) == (
        "the workers decoding the images died on every try of their task (a crash in the image "
        f"library on a malformed file?); they died decoding {', '.join(paths[2:5])}: take them out "
        "of FOLDER, then run the same command again")
    assert notes_left("too-many") == []


def part_hashes(images) -> dict[str, list[str]]:
    return {name: pq.read_table(os.path.join(images, name), columns=["sha1"])["sha1"].to_pylist()
            for name in sorted(os.listdir(images))}


def test_a_task_ending_later_leaves_images_another_part_holds_to_it(tmp_path):
    paths = faces_folder(tmp_path / "faces", {"a0.jpg": 0, "a1.jpg": 1, "b0.jpg": 2, "b_copy.jpg": 0})
    blocks = [[paths["a0.jpg"], paths["a1.jpg"]], [paths["b0.jpg"], paths["b_copy.jpg"]]]
    first = run_task(0, blocks, tmp_path / "claims", tmp_path / "images")
    later = run_task(1, blocks, tmp_path / "claims", tmp_path / "images")
    held = part_hashes(tmp_path / "images")
    assert sorted(sum(held.values(), [])) == sorted({r["sha1"] for r in first + later})  # each once
    copy = next(r for r in later if r["path"] == paths["b_copy.jpg"])
    assert copy["part"] == first[0]["part"] and copy["sha1"] in held[copy["part"]]
    rows = sorted(first + later, key=lambda r: r["path"])
    assert prepare.sort_rows(rows)[2] == {}  # nothing left for the driver to rewrite


def test_a_retried_task_keeps_the_images_its_lost_attempt_published(tmp_path):
    """Its lost attempt published face 0, a task ending next pointed its copy there, and
    a third task, ending at the same time, kept face 0 too: the retry must still write it."""
    paths = faces_folder(tmp_path / "faces", {"a0.jpg": 0, "b_copy.jpg": 0, "c_copy.jpg": 0, "c1.jpg": 1})
    blocks = [[paths["a0.jpg"]], [paths["b_copy.jpg"]], [paths["c_copy.jpg"], paths["c1.jpg"]]]
    claims, images = tmp_path / "claims", tmp_path / "images"
    lost = run_task(0, blocks, claims, images)
    os.remove(images / lost[0]["part"])  # its worker died after publishing, before writing
    b_rows = run_task(1, blocks, claims, images)
    run_task(2, blocks, tmp_path / "claims-of-c", images)  # saw nothing: ended at the same time
    c_held = next((tmp_path / "claims-of-c").glob("held-*"))
    os.replace(c_held, claims / c_held.name)  # then published, as if at the same time
    retried = run_task(0, blocks, claims, images)
    held = part_hashes(images)
    assert all(row["sha1"] in held.get(row["part"], []) for row in b_rows + retried)  # none points at nothing


def test_a_task_holds_a_chunk_of_its_files_in_memory_not_its_whole_block(tmp_path):
    """On a cluster (no claims folder) a task's block is up to 2,048 files: read all before
    decoding any, a block of 4 MB photos was 8 GB in one worker. Every file still gets its row."""
    import tracemalloc

    folder = tmp_path / "big"
    folder.mkdir()
    paths = []
    for i in range(8 * prepare.CHUNK_FILES):  # 256 files of 256 KB: 64 MB in all
        paths.append(str(folder / f"{i:03d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(encode(rgb(i % 7), "JPEG") + os.urandom(256 * 1024))  # a camera's trailing data
    tracemalloc.start()
    try:
        rows = prepare.ingest_block({"block": [0], "paths": [paths]}, images=str(tmp_path / "images"),
                                    size=32, quality=90, max_pixels=10 ** 7, splits=(0.8, 0.1, 0.1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows.num_rows == len(paths) and not any(rows.column("reason").to_pylist())
    assert peak < 3 * prepare.CHUNK_FILES * 256 * 1024, f"{peak / 2**20:.0f} MB at the peak"


def test_copies_two_tasks_kept_at_once_are_removed_by_the_driver(tmp_path):
    paths = faces_folder(tmp_path / "faces", {"a0.jpg": 0, "a1.jpg": 1, "b_copy.jpg": 0})
    blocks = [[paths["a0.jpg"], paths["a1.jpg"]], [paths["b_copy.jpg"]]]
    images, out = tmp_path / "images", str(tmp_path)
    rows = run_task(0, blocks, tmp_path / "claims-a", images) + run_task(1, blocks, tmp_path / "claims-b", images)
    assert sorted(sum(part_hashes(images).values(), [])).count(rows[0]["sha1"]) == 2
    manifest, rejected, copies = prepare.sort_rows(rows)
    prepare.write_outputs(out, str(images), manifest, rejected, copies)
    assert sorted(sum(part_hashes(images).values(), [])) == sorted(r["sha1"] for r in manifest)
    assert len(part_hashes(images)) == 1  # the part left with nothing is gone, not an empty file


def test_files_on_the_drivers_disk_are_copied_to_s3_for_a_cluster_once(s3_server, tmp_path, tiny_cfg, capsys):
    """What `prepare` does on a cluster before its tasks, which run on other machines, read
    a local folder or the Kaggle download (run there in the pipeline scenario's job)."""
    found = write_folder(tmp_path / "faces") + 1
    with open(os.path.join(os.fsencode(tmp_path / "faces"), b"caf\xe9.jpg"), "wb") as f:  # not UTF-8
        f.write(encode(rgb(7), "JPEG"))
    src = sources.resolve_source(str(tmp_path / "faces"), tiny_cfg().data)
    dest = f"{s3_server('copies')}/runs/r1/sources/{sources.copy_name(src.name, tiny_cfg().data)}"
    copied = sources.copy_to(src, dest, "prepare")
    assert [storage.read_bytes(f) for f in copied.files] == [open(f, "rb").read() for f in src.files]
    assert copied.files[0].startswith(f"{dest}/") and "nested/" in "".join(copied.files)
    assert f"{dest}/caf\\xe9.jpg" in copied.files  # under the name the manifest shows
    assert f"copying {found} of {found} files" in capsys.readouterr().out
    (tmp_path / "faces" / "plain.jpg").write_bytes(good_files()["large.jpg"])  # changed since
    again = sources.copy_to(src, dest, "prepare")  # as a resubmitted job: the rest is there
    assert f"copying 1 of {found} files" in capsys.readouterr().out
    assert storage.read_bytes(again.files[src.files.index(str(tmp_path / "faces" / "plain.jpg"))]) \
        == good_files()["large.jpg"]
    # rewritten in place to other bytes of the same size, its time set back (as cp -p or
    # tar x leave a file): sent again too
    gray = tmp_path / "faces" / "gray.png"
    data = gray.read_bytes()
    gray.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    earlier = time.time() - 3600
    os.utime(gray, (earlier, earlier))
    third = sources.copy_to(src, dest, "prepare")
    assert f"copying 1 of {found} files" in capsys.readouterr().out
    assert storage.read_bytes(third.files[src.files.index(str(gray))]) == gray.read_bytes()
    # deleted since it was listed: its copy of an earlier run is not read in its place
    os.remove(gray)
    fourth = sources.copy_to(src, dest, "prepare")
    with pytest.raises(FileNotFoundError):  # ingest: "unreadable", as a local read would be
        storage.read_bytes(fourth.files[src.files.index(str(gray))])


def kaggle_config(monkeypatch, folder) -> None:
    """The Kaggle client's configuration folder (it reads kaggle.json and its tokens there)."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(folder))
    monkeypatch.setattr(KaggleApi, "config_dir", str(folder))
    monkeypatch.setattr(KaggleApi, "config", os.path.join(folder, "kaggle.json"))


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """The Kaggle client replaced at its network boundary: the download writes a real zip."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    calls = []

    def download(self, dataset, path=None, **_):
        calls.append(dataset)
        five = list(good_files().items())[:5]
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:  # datasets ship zips in their zip, too
            z.writestr(five[4][0], five[4][1])
        zip_path = os.path.join(path, dataset.split("/")[1] + ".zip")
        with zipfile.ZipFile(zip_path, "w") as z:  # replaces a partial one, as a resume ends
            for name, data in five[:4]:
                z.writestr(f"celeb/{name}", data)
            z.writestr("celeb/more/part2.zip", inner.getvalue())
        if os.path.exists(zip_path + ".kaggle-partial"):  # done: the client drops its marker
            os.remove(zip_path + ".kaggle-partial")

    monkeypatch.setattr(KaggleApi, "dataset_download_files", download)
    # the client's own sign-in, which reads these without a request; never this machine's
    # own Kaggle files (the client picks its folder when it is imported)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    kaggle_config(monkeypatch, tmp_path / "home" / ".kaggle")
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-never-printed")
    return calls


def test_a_kaggle_download_into_a_log_draws_no_progress_bar(fake_kaggle, monkeypatch, tmp_path):
    """The client's bar, redrawn ten times a second, filled a log (ray job logs, CI) with
    one line of tens of KB; DEEPFAKE_RAY_PROGRESS=0 did not stop it. It is drawn only on a
    terminal, or with DEEPFAKE_RAY_PROGRESS=1, as Ray Data's are."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    asked = []
    monkeypatch.setattr(KaggleApi, "dataset_download_files",
                        lambda self, dataset, path=None, quiet=False, **_: asked.append(quiet))
    for setting in (None, "1", "0"):
        if setting is None:
            monkeypatch.delenv("DEEPFAKE_RAY_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("DEEPFAKE_RAY_PROGRESS", setting)
        kaggle_source.download("owner/faces", str(tmp_path))
    assert asked == [True, False, True]  # stdout here is pytest's capture, not a terminal


def test_kaggle_downloads_once_into_cache(ray_session, fake_kaggle, tiny_cfg, tmp_path, capsys):
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        cfg = tiny_cfg("data.source=kaggle:owner/faces", f"data.cache_dir={cache}",
                       workdir=str(tmp_path / run))
        prepare.run(cfg)
        assert read_outputs(cfg.workdir)[2]["images"] == 5
    assert fake_kaggle == ["owner/faces"]
    assert (cache / "kaggle" / "owner" / "faces" / "celeb" / "plain.jpg").exists()
    assert not list((cache / "kaggle").rglob("*.zip"))  # each extracted, then deleted
    assert "secret-key-never-printed" not in str(capsys.readouterr())


def test_a_cache_that_cannot_be_locked_is_read_when_complete_and_said_when_not(fake_kaggle, tmp_path,
                                                                                monkeypatch):
    """A team's read-only cache, another user's lock file, NFS mounted without locks: a
    complete download is read without the lock; one still to make exits 2 naming the fix,
    not an OSError traceback after Ray's start."""
    import errno
    import fcntl

    cache = str(tmp_path / "cache")
    kaggle_source.kaggle_download("owner/faces", cache)

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert kaggle_source.kaggle_download("owner/faces", cache).endswith("kaggle/owner/faces")
    with pytest.raises(UsageError, match=r"cannot lock .*/kaggle/owner/others.lock for the download \(No locks "
                                         r"available\): set data.cache_dir to a folder of yours on a local disk"):
        kaggle_source.kaggle_download("owner/others", cache)
    assert fake_kaggle == ["owner/faces"]


def test_a_kaggle_copy_in_an_s3_workdir_stands_for_the_download(ray_session, s3_server, fake_kaggle,
                                                                 monkeypatch, tmp_path, capsys):
    """A resubmitted job on a new head node: the first job's driver copied the download into
    WORKDIR/sources/ (as on a cluster, whose tasks cannot read its disk); the new head has no
    cache and, here, no credentials either. It downloads nothing and asks for none, and
    rejects the file the first could not read (so not copy) as the first did."""
    workdir = f"{s3_server('kaggle-copies')}/w"
    args = ["prepare", "--preset", "tiny", "--workdir", workdir, "--source", "kaggle:owner/faces"]
    downloaded = kaggle_source.kaggle_download("owner/faces", str(tmp_path / "first-head"))
    os.remove(os.path.join(downloaded, "celeb", "plain.jpg"))
    os.mkfifo(os.path.join(downloaded, "celeb", "plain.jpg"))  # not a file the first head can read
    with monkeypatch.context() as cluster:
        cluster.setattr(runtime, "driver_files_need_copying", lambda workdir: True)
        assert cli.main(args + ["--set", f"data.cache_dir={tmp_path / 'first-head'}"]) == 0
    assert fake_kaggle == ["owner/faces"]
    _, rejected_first, _ = read_outputs(workdir)
    assert list(rejected_first["reason"]) == ["unreadable"], rejected_first
    assert "not a regular file" in rejected_first["detail"][0]
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    capsys.readouterr()
    assert cli.main(args + ["--force", "--set", f"data.cache_dir={tmp_path / 'new-head'}"]) == 0
    out = capsys.readouterr().out
    assert f"using the copy of kaggle:owner/faces in {workdir}/sources/kaggle/owner/faces (5 files)" in out
    assert "prepared 4 images (1 rejected: 1 unreadable;" in out and fake_kaggle == ["owner/faces"]
    _, rejected, _ = read_outputs(workdir)
    assert rejected[["path", "reason", "detail"]].equals(rejected_first[["path", "reason", "detail"]])


def test_on_a_cluster_a_kaggle_download_is_copied_into_a_shared_local_workdir(ray_session, fake_kaggle,
                                                                              monkeypatch, tmp_path, capsys):
    """A job whose --workdir is a shared mount: the download lies in the head's own cache,
    which ingest tasks on other nodes cannot read (they rejected its files as unreadable,
    or none ran). It is copied into WORKDIR/sources/, as for an S3 work directory."""
    workdir = tmp_path / "shared" / "w"
    args = ["prepare", "--preset", "tiny", "--workdir", str(workdir), "--source", "kaggle:owner/faces",
            "--set", f"data.cache_dir={tmp_path / 'head-cache'}"]
    with monkeypatch.context() as cluster:
        cluster.setattr(runtime, "in_process", lambda: False)
        assert cli.main(args) == 0
    copy = workdir / "sources" / "kaggle" / "owner" / "faces"
    assert storage.completed(str(copy))["files"] == 5 and fake_kaggle == ["owner/faces"]
    manifest, _, _ = read_outputs(str(workdir))
    assert len(manifest) == 5 and all(str(copy) in p for p in manifest["path"]), list(manifest["path"])
    capsys.readouterr()
    with monkeypatch.context() as cluster:  # a resubmitted job: the copy stands for the download
        cluster.setattr(runtime, "in_process", lambda: False)
        assert cli.main(args + ["--force"]) == 0
    assert f"using the copy of kaggle:owner/faces in {copy} (5 files)" in capsys.readouterr().out


def test_unusable_kaggle_credentials_are_one_line_before_ray_and_never_shown(fake_kaggle, monkeypatch,
                                                                             tmp_path, capsys):
    """A kaggle.json without its key or not JSON, or KAGGLE_USERNAME without KAGGLE_KEY: the
    client exits the process (status 1, its message swallowed), after Ray's start. Here exit
    2 with what is wrong, before it."""
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    kaggle_config(monkeypatch, tmp_path / "kaggle")
    os.makedirs(tmp_path / "kaggle")
    token = tmp_path / "kaggle" / "kaggle.json"
    monkeypatch.setattr(runtime, "init", lambda *a, **k: pytest.fail("Ray started with unusable credentials"))
    prepare_kaggle = ["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source",
                      "kaggle:owner/faces", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for text, said in (('{"username": "secret-user-never-printed"}', f'{token} has no "key": save your API token'),
                       ('{"username": "secret-user-never-printed", "key": ', f"{token} cannot be used (not valid "
                                                                               "JSON): save your API token")):
        token.write_text(text)
        assert cli.main(prepare_kaggle) == 2
        out = str(capsys.readouterr())
        assert said in out and "secret-user-never-printed" not in out and not fake_kaggle, out
    monkeypatch.setenv("KAGGLE_KEY", "s3cret-key-never-printed")
    token.write_text('{"username": "someone"}')
    assert kaggle_source.kaggle_credentials_problem() is None  # the environment gives what the file lacks
    token.unlink()
    assert cli.main(prepare_kaggle) == 2
    err = error_lines(capsys)
    assert err == ["deepfake-ray prepare: error: KAGGLE_USERNAME is not set, though KAGGLE_KEY is: set both, "
                   "from your API token (kaggle.com > Settings > API > Create New Token)"]


@pytest.mark.parametrize("status,fix", [
    (401, "Kaggle refused the credentials or the access: check your API token (making a new one on kaggle.com "
          "expires the old)"),  # a key signs in without a request: a revoked one is refused here first
    (404, "no such dataset, or a private one: check the name (kaggle:OWNER/DATASET)"),
    (429, "Kaggle is busy or failing: run the same command again later (the download resumes)")])
def test_a_refused_kaggle_download_says_why_by_its_http_status(status, fix, fake_kaggle, monkeypatch, tmp_path):
    import requests
    from kaggle.api.kaggle_api_extended import KaggleApi

    def refused(self, dataset, path=None, **_):
        answer = requests.Response()
        answer.status_code = status
        raise requests.HTTPError(f"{status} Client Error", response=answer)

    monkeypatch.setattr(KaggleApi, "dataset_download_files", refused)
    with pytest.raises(UsageError, match=rf"Kaggle download of owner/faces failed \(HTTPError: {status} Client "
                                         rf"Error\): {re.escape(fix)}"):
        kaggle_source.kaggle_download("owner/faces", str(tmp_path / "cache"))


def test_our_own_error_raised_into_a_kaggle_download_stays_as_it_is(fake_kaggle, monkeypatch, tmp_path):
    """A lease taken over reaches the driver as a UsageError raised into whatever runs then,
    the download too: it was said as "Kaggle download failed (UsageError: ...): check the
    dataset name ... and your network"."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    said = "another pipeline took over the lock on s3://b/w: this run stops"

    def taken_over(self, dataset, path=None, **_):
        raise UsageError(said)

    monkeypatch.setattr(KaggleApi, "dataset_download_files", taken_over)
    with pytest.raises(UsageError, match=f"^{said}$"):
        kaggle_source.kaggle_download("owner/faces", str(tmp_path / "cache"))


def test_kaggle_credentials_are_looked_for_where_the_client_reads_them(monkeypatch, tmp_path):
    """`kaggle auth login` keeps ~/.kaggle/credentials.json, and a token may be saved as
    access_token.txt: both were refused as no credentials. A kaggle.json in ~/.config/kaggle
    beside an existing ~/.kaggle, which the client never reads, was taken for one."""
    for name in ("KAGGLE_CONFIG_DIR", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")  # where the client falls back to ~/.config/kaggle
    home = tmp_path / ".kaggle"
    home.mkdir()
    for name in ("credentials.json", "access_token.txt"):
        (home / name).write_text("{}")
        assert kaggle_source.kaggle_credentials_problem() is None, name
        (home / name).unlink()
    (tmp_path / ".config" / "kaggle").mkdir(parents=True)
    (tmp_path / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_source.kaggle_credentials_problem().startswith("no Kaggle credentials: save your API token")
    home.rmdir()  # no ~/.kaggle: the client reads $XDG_CONFIG_HOME/kaggle, by default ~/.config/kaggle
    assert kaggle_source.kaggle_credentials_problem() is None


def test_a_kaggle_datasets_name_decides_whether_data_is_current(ray_session, fake_kaggle, tmp_path, capsys):
    """A bare `kaggle` source reads data.kaggle_dataset: data/ prepared from one dataset is
    not taken for another's. `kaggle:NAME` names its own, and another setting is refused."""
    workdir = str(tmp_path / "w")
    prepare_kaggle = ["prepare", "--preset", "tiny", "--workdir", workdir, "--source", "kaggle",
                      "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert cli.main(prepare_kaggle + ["--set", "data.kaggle_dataset=owner/faces"]) == 0
    capsys.readouterr()  # its warning of an empty split (5 images)
    assert cli.main(prepare_kaggle + ["--set", "data.kaggle_dataset=owner/others"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "data.source=kaggle:owner/faces (asked: kaggle:owner/others)" in err[0]
    assert cli.main(prepare_kaggle[:-3] + ["kaggle:owner/faces"]) == 0  # the same dataset, named
    assert "already complete" in capsys.readouterr().out
    named = prepare_kaggle[:-3] + ["kaggle:owner/faces", "--set", "data.kaggle_dataset=owner/others"]
    assert cli.main(named) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "data.source=kaggle:owner/faces names its own dataset; pass --set " \
        "data.source=kaggle:owner/others instead" in err[0]
    assert fake_kaggle == ["owner/faces"]
    bare = prepare_kaggle[:-3] + ["kaggle", "--set", "data.kaggle_dataset=owner/others"]
    assert cli.main(bare) == 2  # a bare `kaggle` names data.kaggle_dataset
    err = error_lines(capsys)
    yours = (f"deepfake-ray prepare --config {workdir}/config.yaml --workdir {workdir} --force --set "
             "data.source=kaggle:owner/others --set data.kaggle_dataset=owner/others")
    assert err[0].endswith("was made with data.source=kaggle:owner/faces (asked: kaggle:owner/others): use "
                           f"another --workdir to keep both, `{yours}` to redo it alone there with yours, or its "
                           "own settings (--set data.source=kaggle:owner/faces --set data.kaggle_dataset=owner/faces)")
    own = err[0].rsplit("its own settings (", 1)[1].rstrip(")")
    assert cli.main(bare + shlex.split(own)) == 0  # as the line says, after the run's own --set
    assert "already complete" in capsys.readouterr().out
    assert cli.main(shlex.split(yours)[1:]) == 0  # the redo, as it is written
    assert fake_kaggle == ["owner/faces", "owner/others"]


def test_a_damaged_kaggle_zip_is_one_line_and_is_not_kept(ray_session, fake_kaggle, monkeypatch,
                                                        tmp_path, capsys):
    from kaggle.api.kaggle_api_extended import KaggleApi

    def cut_short(self, dataset, path=None, **_):
        with open(os.path.join(path, "faces.zip"), "wb") as f:
            f.write(b"PK\x03\x04" + os.urandom(500))

    monkeypatch.setattr(KaggleApi, "dataset_download_files", cut_short)
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source",
                     "kaggle:owner/faces", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and "holds a damaged zip (faces.zip" in err[0]
    assert os.listdir(tmp_path / "cache" / "kaggle" / "owner" / "faces") == []  # nothing to trust


def test_a_kaggle_cache_on_s3_is_refused_not_made_a_local_folder_named_s3(fake_kaggle, monkeypatch, tmp_path,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source",
                     "kaggle:owner/faces", "--set", "data.cache_dir=s3://bucket/cache"])
    err = error_lines(capsys)
    assert code == 2 and err == ["deepfake-ray prepare: error: data.cache_dir=s3://bucket/cache: the Kaggle "
                                 "download is kept on this machine's disk: set a local folder, e.g. "
                                 "~/.cache/deepfake-ray (with an s3:// work directory, a cluster's prepare "
                                 "copies it to WORKDIR/sources/ itself)"], err
    assert not os.path.exists(tmp_path / "s3:") and not os.path.exists(tmp_path / "w")


def encrypted(zip_bytes: bytes) -> bytes:
    """The zip with its members marked encrypted (Python's zipfile cannot write one)."""
    data = bytearray(zip_bytes)
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # each central directory entry's flags
        data[at + 8] |= 1
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def test_zips_a_kaggle_dataset_ships_that_cannot_be_extracted_are_left_out_with_a_note(
        fake_kaggle, monkeypatch, tmp_path, tiny_cfg, capsys):
    """Not deleted with the whole download for the next run to fetch again: the dataset
    holds them, so every download would."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    def shipped_broken(self, dataset, path=None, **_):
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            z.writestr("secret.jpg", good_files()["plain.jpg"])
        with zipfile.ZipFile(os.path.join(path, dataset.split("/")[1] + ".zip"), "w") as z:
            for name, data in list(good_files().items())[:3]:
                z.writestr(f"celeb/{name}", data)
            z.writestr("celeb/damaged.zip", b"PK\x03\x04" + os.urandom(300))
            z.writestr("celeb/locked.zip", encrypted(inner.getvalue()))
        fake_kaggle.append(dataset)

    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    monkeypatch.setattr(KaggleApi, "dataset_download_files", shipped_broken)
    assert len(sources.resolve_source("kaggle:owner/shipped", data).files) == 3
    out = capsys.readouterr().out
    assert "left out celeb/damaged.zip of the Kaggle dataset owner/shipped: a zip that cannot be " \
           "extracted (BadZipFile" in out
    assert "left out celeb/locked.zip of the Kaggle dataset owner/shipped: a zip that cannot be " \
           "extracted (RuntimeError: File 'secret.jpg' is encrypted" in out
    assert len(sources.resolve_source("kaggle:owner/shipped", data).files) == 3
    assert fake_kaggle == ["owner/shipped"]  # cached: not downloaded again

    def locked_download(self, dataset, path=None, **_):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.jpg", good_files()["plain.jpg"])
        with open(os.path.join(path, "locked.zip"), "wb") as f:
            f.write(encrypted(buf.getvalue()))

    monkeypatch.setattr(KaggleApi, "dataset_download_files", locked_download)
    with pytest.raises(UsageError, match=r"the Kaggle download of owner/locked is a zip Python cannot "
                                         r"extract \(locked.zip: RuntimeError: .*\): extract it with "
                                         r"another tool into .*owner/locked, then create .*/.complete"):
        sources.resolve_source("kaggle:owner/locked", data)
    assert os.listdir(tmp_path / "cache" / "kaggle" / "owner" / "locked") == ["locked.zip"]  # kept


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_zips_in_a_kaggle_zip_never_overwrite_each_other(fake_kaggle, monkeypatch, tmp_path, tiny_cfg):
    """Two zips in the zip of one layout (part1.zip and part2.zip, each images/0.jpg ...),
    and a zip holding one named like itself: each file extracted is found, none replaced."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    faces = [encode(rgb(i, 48), "JPEG") for i in range(6)]
    layouts = {"parts": {"part1.zip": zip_of({f"images/{i}.jpg": faces[i] for i in range(3)}),
                         "part2.zip": zip_of({f"images/{i}.jpg": faces[3 + i] for i in range(3)}),
                         "empty.zip": zip_of({})},  # extracts to nothing, and no error
               "selfnamed": {"selfnamed.zip": zip_of({f"{i}.jpg": faces[i] for i in range(5)}),
                             "loose.jpg": faces[5]}}

    def download(self, dataset, path=None, **_):
        slug = dataset.split("/")[1]
        with open(os.path.join(path, f"{slug}.zip"), "wb") as f:
            f.write(zip_of(layouts[slug]))

    monkeypatch.setattr(KaggleApi, "dataset_download_files", download)
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    for slug, count in (("parts", 6), ("selfnamed", 6)):
        files = sources.resolve_source(f"kaggle:owner/{slug}", data).files
        assert sorted(storage.read_bytes(f) for f in files) == sorted(faces[:count]), slug
    assert not list((tmp_path / "cache").rglob("*.zip"))


@pytest.mark.parametrize("slug", ["faces", "selfnamed"])
def test_a_kaggle_extraction_stopped_while_moving_its_files_resumes_without_copies(
        slug, fake_kaggle, monkeypatch, tmp_path, tiny_cfg):
    """Ctrl-C after some files were moved into place (the zip not yet deleted): the rerun
    extracts the zip again and finds those files there with the same bytes, which is no
    collision (a collision would put a second copy of everything beside them). The same
    where the zip's files go into a folder named after it (a zip holding one named like
    itself)."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    faces = [encode(rgb(i, 48), "JPEG") for i in range(6)]
    members = ({f"celeb/{i}.jpg": faces[i] for i in range(6)} if slug == "faces" else
               {"selfnamed.zip": zip_of({f"{i}.jpg": faces[i] for i in range(5)}), "loose.jpg": faces[5]})
    monkeypatch.setattr(KaggleApi, "dataset_download_files", lambda self, dataset, path=None, **_:
                        open(os.path.join(path, f"{slug}.zip"), "wb").write(zip_of(members)))
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    real_replace, moves = os.replace, []

    def stopped_at_the_second_move(src, dst):
        moves.append(dst)
        if len(moves) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(sources.os, "replace", stopped_at_the_second_move)
        with pytest.raises(KeyboardInterrupt):
            sources.resolve_source(f"kaggle:owner/{slug}", data)
    files = sources.resolve_source(f"kaggle:owner/{slug}", data).files
    assert sorted(storage.read_bytes(f) for f in files) == sorted(faces)  # each once


def test_a_disk_error_while_extracting_keeps_the_download_for_the_next_run(
        fake_kaggle, monkeypatch, tmp_path, tiny_cfg):
    """Not only a full disk: a network share gone stale is the disk's, not the files'. No
    file is left out for it, and the rerun extracts all of them."""
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data

    def stale(self, member, path=None, pwd=None):
        raise OSError(errno.ESTALE, "Stale file handle")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extract", stale)
        with pytest.raises(UsageError, match=r"Stale file handle\): check that data.cache_dir is a folder "
                                             r"you can write to.*the download is kept"):
            sources.resolve_source("kaggle:owner/faces", data)
    assert len(sources.resolve_source("kaggle:owner/faces", data).files) == 5
    assert fake_kaggle == ["owner/faces"]  # extracted from the kept download


def test_files_a_kaggle_zip_names_as_this_disk_cannot_are_left_out_with_a_note(
        fake_kaggle, monkeypatch, tmp_path, tiny_cfg, capsys):
    """A name longer than the disk allows, or a file where the zip also holds a folder of
    that name, is the dataset's, not a full disk: the rest is read, and the run goes on."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    faces = [encode(rgb(i, 48), "JPEG") for i in range(4)]
    members = {"celeb/a.jpg": faces[0], "celeb/" + "n" * 300 + ".jpg": faces[1],
               "celeb/x.jpg": faces[2], "celeb/x.jpg/y.jpg": faces[3]}
    monkeypatch.setattr(KaggleApi, "dataset_download_files", lambda self, dataset, path=None, **_:
                        open(os.path.join(path, "odd.zip"), "wb").write(zip_of(members)))
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    files = sources.resolve_source("kaggle:owner/odd", data).files
    assert sorted(storage.read_bytes(f) for f in files) == sorted(faces[0:3:2])
    out = capsys.readouterr().out
    assert "left out 2 of the files in odd.zip of the Kaggle dataset owner/odd, which cannot be written " \
           "on this disk (first 'celeb/nnn" in out and "File name too long" in out


def test_a_kaggle_zip_holding_one_name_twice_keeps_both_files(fake_kaggle, monkeypatch, tmp_path, tiny_cfg, capsys):
    """A zip may hold a name twice (appended to), or names differing only in case, which
    macOS's disk takes for one: the later file overwrote the earlier, and the images were
    lost without a word. The zip holding them is named as the dataset named it, its
    control characters shown, not sent to the terminal."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    faces = [encode(rgb(i, 48), "JPEG") for i in range(3)]
    inner, outer = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        for name, face in [("celeb/a.jpg", faces[0]), ("celeb/a.jpg", faces[1]), ("celeb/b.jpg", faces[2])]:
            z.writestr(name, face)
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("part\x1b[2J1.zip", inner.getvalue())  # an escape that clears the screen
    monkeypatch.setattr(KaggleApi, "dataset_download_files", lambda self, dataset, path=None, **_:
                        open(os.path.join(path, "twice.zip"), "wb").write(outer.getvalue()))
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    files = sources.resolve_source("kaggle:owner/twice", data).files
    assert sorted(storage.read_bytes(f) for f in files) == sorted(faces)
    assert ("1 of the files in part\\x1b[2J1.zip of the Kaggle dataset owner/twice share a name with another "
            "of its files on this disk (repeated, or differing only in case): each is kept under a new name "
            "(first 'celeb/a.jpg' as 'celeb/a-2.jpg')") in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["a file", "", "a file/cache"])
def test_a_kaggle_cache_dir_that_cannot_hold_the_download_exits_2_before_downloading(
        cache, fake_kaggle, tmp_path, capsys):
    (tmp_path / "a file").write_text("x")
    cache_dir = str(tmp_path / cache) if cache else ""
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source",
                     "kaggle:owner/faces", "--set", f"data.cache_dir={cache_dir}"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "data.cache_dir" in err[0] and "set" in err[0], err
    assert fake_kaggle == []


def test_an_interrupted_kaggle_download_is_resumed_not_deleted(fake_kaggle, tmp_path, tiny_cfg, monkeypatch):
    from kaggle.api.kaggle_api_extended import KaggleApi

    download, handed = KaggleApi.dataset_download_files, {}

    def resuming(self, dataset, path=None, **kw):  # what the client finds there to resume
        handed[dataset] = (Path(path) / f"{dataset.split('/')[1]}.zip").read_bytes()
        return download(self, dataset, path=path, **kw)

    monkeypatch.setattr(KaggleApi, "dataset_download_files", resuming)
    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    so_far = b"PK\x03\x04" + b"\x00" * 500
    for slug, marker in (("resumable", True), ("cut", False)):  # the client writes its marker
        folder = tmp_path / "cache" / "kaggle" / "owner" / slug    # when the server can resume
        folder.mkdir(parents=True)
        (folder / f"{slug}.zip").write_bytes(so_far)  # the zip so far
        if marker:
            (folder / f"{slug}.zip.kaggle-partial").write_text('{"validator": "etag", "size": 9000}')
        assert len(sources.resolve_source(f"kaggle:owner/{slug}", data).files) == 5
        assert handed[f"owner/{slug}"] == so_far  # the client was handed it to resume, not deleted
    assert len(fake_kaggle) == 2


def test_a_kaggle_dataset_another_prepare_is_downloading_is_waited_for(fake_kaggle, tmp_path, tiny_cfg, capsys):
    """Two work directories reading one dataset: the second waits for the first's
    download, instead of writing the same zip at once."""
    import fcntl
    import threading

    data = tiny_cfg(f"data.cache_dir={tmp_path / 'cache'}").data
    folder = kaggle_source.kaggle_folder("owner/faces", data.cache_dir)
    os.makedirs(folder)
    found = []
    with open(folder + ".lock", "a") as held:  # the other prepare, downloading
        fcntl.flock(held, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: found.append(sources.resolve_source("kaggle:owner/faces", data)))
        second.start()
        deadline, out = time.time() + 30, ""
        while "waiting for another prepare downloading the Kaggle dataset owner/faces" not in out:
            assert time.time() < deadline, out
            time.sleep(0.1)
            out += capsys.readouterr().out
        assert fake_kaggle == [] and second.is_alive()
    second.join(120)
    assert not second.is_alive(), "the second download did not end once the lock was free"
    assert fake_kaggle == ["owner/faces"] and len(found[0].files) == 5


def test_a_kaggle_download_cut_short_by_a_full_disk_says_so(fake_kaggle, monkeypatch, tiny_cfg, tmp_path):
    """It was told to check the dataset's name, its rules on kaggle.com and the network."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    def full(self, dataset, path=None, **_):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "faces.zip"))

    monkeypatch.setattr(KaggleApi, "dataset_download_files", full)
    data = tiny_cfg("data.source=kaggle:owner/faces", f"data.cache_dir={tmp_path / 'cache'}").data
    with pytest.raises(OSError) as failed:
        sources.resolve_source("kaggle:owner/faces", data)
    line = cli.usage_line(failed.value)
    assert line.startswith("no space left on device writing ") and "free space on the disk" in line, line


def test_a_kaggle_zip_larger_than_the_free_disk_is_refused_before_extracting(fake_kaggle, monkeypatch, tiny_cfg,
                                                                             tmp_path):
    """A zip bomb, or a dataset too large for the cache's disk, filled the disk before
    failing, and again on every rerun (the download is kept for one)."""
    data = tiny_cfg("data.source=kaggle:owner/faces", f"data.cache_dir={tmp_path / 'cache'}").data
    folder = tmp_path / "cache" / "kaggle" / "owner" / "faces"
    disk_usage = shutil.disk_usage
    with monkeypatch.context() as m:  # a disk with 1 KB free
        m.setattr(shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=1000))
        with pytest.raises(UsageError, match=r"faces.zip unpacks to 0.0 GB, more than the 0.0 GB free on its "
                                             r"disk: free disk space .* the download is kept"):
            sources.resolve_source("kaggle:owner/faces", data)
    assert os.listdir(folder) == ["faces.zip"]  # nothing extracted, the download kept
    assert len(sources.resolve_source("kaggle:owner/faces", data).files) == 5  # room again: extracted


def test_kaggle_zips_that_fail_to_extract_and_an_empty_dataset_are_one_line(fake_kaggle, monkeypatch,
                                                                           tmp_path, tiny_cfg):
    from kaggle.api.kaggle_api_extended import KaggleApi

    data = tiny_cfg("data.source=kaggle:owner/faces", f"data.cache_dir={tmp_path / 'cache'}").data
    folder = tmp_path / "cache" / "kaggle" / "owner" / "faces"

    def corrupt_inside(self, dataset, path=None, **_):  # intact headers, damaged compressed data
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.jpg", b"x" * 5000)
        damaged = bytearray(buf.getvalue())
        damaged[30 + len("a.jpg")] = 0xFF  # the data's first byte: a deflate block of no valid type
        (tmp_path / "cache" / "kaggle" / "owner" / "faces" / "faces.zip").write_bytes(damaged)

    with monkeypatch.context() as m:
        m.setattr(KaggleApi, "dataset_download_files", corrupt_inside)
        with pytest.raises(UsageError, match="holds a damaged zip .faces.zip: Error -3"):
            sources.resolve_source("kaggle:owner/faces", data)
    assert os.listdir(folder) == []  # deleted: the next run downloads it anew

    def disk_full(self, member, path=None, pwd=None):  # the real one, once the disk has room again
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extract", disk_full)
        with pytest.raises(UsageError, match="No space left on device.*free disk space.*the download is kept"):
            sources.resolve_source("kaggle:owner/faces", data)
    assert fake_kaggle == ["owner/faces"] and os.listdir(folder) == ["faces.zip"]
    assert len(sources.resolve_source("kaggle:owner/faces", data).files) == 5
    assert fake_kaggle == ["owner/faces"]  # extracted from the kept download: not downloaded again

    real_extract = zipfile.ZipFile.extract

    def inner_disk_full(self, member, path=None, pwd=None):  # once the outer zip is out and gone
        if self.filename.endswith("part2.zip"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_extract(self, member, path, pwd)

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extract", inner_disk_full)
        with pytest.raises(UsageError, match="part2.zip .No space left on device.*the download is kept"):
            sources.resolve_source("kaggle:owner/nested", data)
    assert len(sources.resolve_source("kaggle:owner/nested", data).files) == 5
    assert fake_kaggle.count("owner/nested") == 1  # the kept inner zip extracted, not downloaded again

    def interrupted(self, member, path=None, pwd=None):  # Ctrl-C midway: a member cut short
        os.makedirs(os.path.join(path, "celeb", "more"), exist_ok=True)
        with open(os.path.join(path, "celeb", "more", "part2.zip"), "wb") as f:
            f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extract", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sources.resolve_source("kaggle:owner/stopped", data)
    stopped = tmp_path / "cache" / "kaggle" / "owner" / "stopped"
    assert [n for n in os.listdir(stopped) if not n.startswith(".")] == ["stopped.zip"]  # nothing cut short
    assert len(sources.resolve_source("kaggle:owner/stopped", data).files) == 5
    assert fake_kaggle.count("owner/stopped") == 1

    monkeypatch.setattr(KaggleApi, "dataset_download_files", lambda self, dataset, path=None, **_:
                        (tmp_path / "cache" / "kaggle" / "owner" / "empty" / "notes.csv").write_text("x"))
    with pytest.raises(UsageError, match="the Kaggle dataset owner/empty holds no .jpg"):
        sources.resolve_source("kaggle:owner/empty", data)


def test_kaggle_without_credentials_exits_2(ray_session, monkeypatch, tmp_path, capsys):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nowhere"))
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                     "--source", "kaggle:owner/faces", "--set", f"data.cache_dir={tmp_path}"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and "kaggle.json" in err[0] and "KAGGLE_KEY" in err[0]


@pytest.mark.parametrize("command", ["prepare", "pipeline"])
def test_a_file_where_a_stage_writes_its_folder_exits_2_before_anything_runs(ray_session, tmp_path, capsys,
                                                                             command):
    """The OS refused it with a traceback, after Ray's start (and config.yaml's write)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / ("data" if command == "prepare" else "gan")).write_text("a user's notes")
    code = cli.main([command, "--preset", "tiny", "--workdir", str(workdir), "--source", "sample:20"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1, err
    assert f"{workdir / ('data' if command == 'prepare' else 'gan')} is a file, not a folder" in err[0]
    assert not (workdir / "config.yaml").exists()


def test_a_file_in_the_way_of_the_images_folder_is_replaced(ray_session, tiny_cfg, tmp_path):
    """data/ is prepare's own: the images replace a stray file named images there (the
    rename failed after the whole ingest)."""
    cfg = tiny_cfg("data.source=sample:20")
    os.makedirs(datasets.data_dir(cfg.workdir))
    with open(datasets.images_uri(datasets.data_dir(cfg.workdir)), "w") as f:
        f.write("stray")
    summary = prepare.run(cfg)
    assert summary["images"] == 20
    assert datasets.read_split(datasets.data_dir(cfg.workdir), "train").count() == summary["splits"]["train"]


def test_a_complete_stage_that_another_run_is_replacing_is_not_called_complete(ray_session, tmp_path, capsys):
    """While a `prepare --force` holds the work directory, a plain `prepare` said its data/
    was complete (exit 0), as it was being replaced."""
    workdir = str(tmp_path / "w")
    args = ["prepare", "--preset", "tiny", "--source", "sample:20", "--workdir", workdir]
    assert cli.main(args) == 0
    capsys.readouterr()
    with storage.exclusive(workdir, "prepare"):  # as the --force run holds it
        assert cli.main(args) == 2
        err = error_lines(capsys)
    assert len(err) == 1 and f"another prepare (pid {os.getpid()} on " in err[0] and "is writing" in err[0]
    assert cli.main(args) == 0 and "already complete" in capsys.readouterr().out


def test_temporary_files_a_killed_run_left_go_when_the_stage_is_redone(ray_session, tiny_cfg):
    """A run killed while writing a file leaves its temporary name (hidden) forever."""
    cfg = tiny_cfg("data.source=sample:20")
    prepare.run(cfg)
    data = datasets.data_dir(cfg.workdir)
    left = [os.path.join(data, ".tmp-k1ll3d_0"), os.path.join(data, "images", ".tmp-abcdefgh")]
    for path in left:
        with open(path, "wb") as f:
            f.write(b"PAR1")
    prepare.run(cfg, force=True)
    assert not any(os.path.exists(p) for p in left)
    assert sorted(os.listdir(data)) == [".lock", storage.COMPLETE, "images", "manifest.parquet", "rejected.parquet"]


@pytest.mark.parametrize("source,needle", [("/no/such/folder", "does not exist"),
                                           ("ftp://host/x", "ftp://host/x: not a location this tool can use "
                                                             "(ftp://): use a folder of images, s3://"),
                                           ("", "no source given"),
                                           (__file__, "is a file: pass the folder"),
                                           ("sample:zero", "positive whole number"),
                                           ("sample:0", "positive whole number"),
                                           ("sample:1e3", "positive whole number"),
                                           ("sample:\u00b2", "positive whole number"),  # a digit to str.isdigit
                                           ("sample:100000000", "more than 1,000,000"),
                                           ("Sample:10", "does not exist: did you mean 'sample:10'?"),
                                           ("KAGGLE:o/d", "did you mean 'kaggle:o/d'?"),
                                           ("sampel:10", "did you mean 'sample:10'?"),  # a typo, not case
                                           ("kagle:o/d", "did you mean 'kaggle:o/d'?")])
def test_bad_source_exits_2_with_one_line(ray_session, tmp_path, capsys, source, needle):
    code = cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path), "--source", source])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_a_folder_named_like_a_source_kind_is_a_folder(ray_session, tmp_path, capsys, monkeypatch):
    """Only `sample`, `sample:N`, `kaggle` and `kaggle:NAME` name those sources: a folder
    called `samples` or `kaggle-faces` beside the command is a folder of photos."""
    monkeypatch.chdir(tmp_path)
    for folder in ("samples", "kaggle-faces"):
        os.mkdir(folder)
        for i in range(3):
            (tmp_path / folder / f"face_{i}.jpg").write_bytes(sample.face_jpeg(4, i))
        workdir = str(tmp_path / f"w-{folder}")
        assert cli.main(["prepare", "--preset", "tiny", "--source", folder, "--workdir", workdir]) == 0
        assert "prepared 3 images" in capsys.readouterr().out
        manifest = read_outputs(workdir)[0]
        assert all(p.startswith(str(tmp_path / folder) + "/") for p in manifest["path"])
    # the bare word names the built-in source: with a folder of that name here, the user's
    # photos were silently swapped for drawn faces
    os.mkdir("sample")
    assert cli.main(["prepare", "--preset", "tiny", "--source", "sample", "--workdir", str(tmp_path / "w")]) == 2
    assert error_lines(capsys) == [
        "deepfake-ray prepare: error: source 'sample' names the built-in sample faces the tool draws, but "
        "./sample is also a folder here: pass ./sample for the folder's images, or run from another folder"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("platform,same", [("darwin", True), ("linux", False)])
def test_one_folder_typed_and_pasted_from_finder_is_one_source_on_macos(monkeypatch, platform, same):
    """macOS takes `Café` typed (NFC) and pasted from Finder (NFD) for one folder: the rerun
    was refused as made from another source, though both looked alike. On Linux they are
    two folders."""
    import dataclasses

    typed, pasted = "/Users/me/Caf\u00e9", "/Users/me/Cafe\u0301"
    monkeypatch.setattr(sys, "platform", platform)
    cfg = config.build("tiny", workdir="/w")
    made = prepare.settings(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=pasted)))
    asked = prepare.settings(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=typed)))
    assert (prepare.settings_now(made) == prepare.settings_now(asked)) is same


def test_a_stores_failure_mid_read_fails_the_ingest_while_one_objects_refusal_is_its_row(monkeypatch):
    """An object deleted since it was listed, or one S3 will not read (archived), is that
    file's rejected row. A failure of the store itself (the network, its credentials) is
    no file's: taken as rows, it would leave rejected.parquet listing good photos as
    unreadable, a complete data/ missing them, and a rerun skipping it."""
    bucket = "s3://faces/celebs"

    def read(uri, max_bytes=None):
        name = uri.rsplit("/", 1)[1]
        if name == "gone.jpg":
            raise FileNotFoundError(uri)
        if name == "archived.jpg":
            raise s3.ObjectRefused(uri, f"{uri}: InvalidObjectState", "INVALID_OBJECT_STATE")
        if name == "blip.jpg":
            raise s3.StoreError(uri, f"{uri}: Connection reset by peer", "NETWORK_CONNECTION")
        if name == "outage.jpg":  # as pyarrow says it, unnamed by storage
            raise OSError(f"When reading information for key '{name}' in bucket 'faces': AWS Error "
                          "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect")
        return sample.face_jpeg(0, 0)

    monkeypatch.setattr(storage, "read_bytes", read)
    got = prepare.fetch_all([f"{bucket}/a.jpg", f"{bucket}/gone.jpg", f"{bucket}/archived.jpg"], 1 << 20)
    assert got[0] == sample.face_jpeg(0, 0)
    assert isinstance(got[1], FileNotFoundError) and isinstance(got[2], s3.ObjectRefused)
    rows = [prepare.file_row(p, d, 32, 95, 10**6) for p, d in zip(["a", "gone", "archived"], got)]
    assert [r["reason"] for r in rows] == ["", "unreadable", "unreadable"]
    with pytest.raises(s3.StoreError, match="Connection reset"):
        prepare.fetch_all([f"{bucket}/a.jpg", f"{bucket}/blip.jpg"], 1 << 20)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        prepare.fetch_all([f"{bucket}/a.jpg", f"{bucket}/outage.jpg"], 1 << 20)


def test_a_network_mount_gone_stale_mid_read_fails_the_ingest_while_a_bad_sector_is_its_files_row(
        tmp_path, monkeypatch):
    """A local source on NFS whose mount goes stale mid-ingest: every later file became an
    "unreadable" row, and a complete data/ lacked them all. One file's read error (EIO, a
    bad sector) stays that file's."""
    import errno

    faces = [str(tmp_path / f"{name}.jpg") for name in ("a", "bad", "stale")]

    def read(uri, max_bytes=None):
        if uri.endswith("bad.jpg"):
            raise OSError(errno.EIO, "Input/output error", uri)
        if uri.endswith("stale.jpg"):
            raise OSError(errno.ESTALE, "Stale file handle", uri)
        return sample.face_jpeg(0, 0)

    monkeypatch.setattr(storage, "read_bytes", read)
    got = prepare.fetch_all(faces[:2], 1 << 20)
    assert got[0] == sample.face_jpeg(0, 0) and isinstance(got[1], OSError)
    with pytest.raises(UsageError, match=rf"reading {faces[2]} failed \(Stale file handle\): its "
                                         "filesystem, not the file .*check it, then run again"):
        prepare.fetch_all(faces, 1 << 20)


def test_a_subfolder_on_a_mount_gone_stale_fails_the_listing_while_a_locked_one_is_left_out(tmp_path, monkeypatch):
    """A folder of a network source the mount lost (ESTALE) was left out with a warning like a
    locked one, and prepare marked a data/ without its files complete."""
    import errno

    for name in ("locked", "gone", "kept"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        (tmp_path / "faces" / name / "a.jpg").write_bytes(sample.face_jpeg(0, 0))
    scandir, failing = os.scandir, {"locked": PermissionError(13, "Permission denied")}

    def listing(path):
        if (e := failing.get(os.path.basename(path))):
            raise e
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)
    root = str(tmp_path / "faces")
    assert sorted(storage.walk_local(root)) == [f"{root}/gone/a.jpg", f"{root}/kept/a.jpg"]
    failing["gone"] = OSError(errno.ESTALE, "Stale file handle")
    with pytest.raises(UsageError, match=rf"listing {root}/gone failed \(Stale file handle\): its "
                                         "filesystem, not the folder .*check it, then run again"):
        storage.walk_local(root)
    failing["gone"] = OSError(errno.EIO, "Input/output error")  # a failing disk: its files unseen
    with pytest.raises(UsageError, match=rf"listing {root}/gone failed \(Input/output error\)"):
        storage.walk_local(root)


def test_a_source_folder_the_os_will_not_list_exits_2_with_one_line_before_ray(tmp_path, capsys, monkeypatch):
    """No permission read as 'no image files under it: check the path' after Ray's start (with
    a warning besides), a loop of links or a name too long as 'does not exist'."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "locked").mkdir()
    scandir = os.scandir

    def locked_to_us(path):  # tests run as root, whom no folder's mode stops
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked_to_us)
    monkeypatch.setattr(runtime, "init", lambda *a, **k: pytest.fail("Ray started for a source it cannot read"))
    for name, said in (("locked", "cannot be read (Permission denied): give your user read access to it"),
                       ("loop", "cannot be read (Too many levels of symbolic links): check the path"),
                       ("c" * 300, "cannot be read (File name too long): check the path")):
        source = str(tmp_path / name)
        assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w"), "--source", source]) == 2
        assert error_lines(capsys) == [f"deepfake-ray prepare: error: source '{source}' {said}"]


def test_a_folder_of_no_images_exits_2_before_ray_and_leaves_no_workdir(tmp_path, capsys, monkeypatch):
    """It was refused only once Ray had started (~10 s), leaving the workdir's locks behind."""
    source = tmp_path / "notes"
    (source / "inner").mkdir(parents=True)
    (source / "inner" / "readme.txt").write_text("no faces here")
    (source / "animation.gif").write_bytes(encode(rgb(1), "GIF"))  # an image, of no extension prepare reads
    (source / ".hidden").mkdir()
    (source / ".hidden" / "face.jpg").write_bytes(encode(rgb(2), "JPEG"))
    monkeypatch.setattr(runtime, "init", lambda *a, **k: pytest.fail("Ray started for a folder of no images"))
    workdir = tmp_path / "w"
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(workdir), "--source", str(source)]) == 2
    assert error_lines(capsys) == [f"deepfake-ray prepare: error: no .jpg/.jpeg/.jfif/.jpe/.png/.webp files under "
                                   f"'{source}': check the path (folders are searched recursively; hidden "
                                   "ones are left out)"]
    assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_UTKFACE), reason="../shared/data/utkface_crop_part1_5k absent")
def test_real_utkface_photos_all_accepted(ray_session, tiny_cfg):
    cfg = tiny_cfg(f"data.source={os.path.abspath(SHARED_UTKFACE)}", "data.resolution=64")
    summary = prepare.run(cfg)
    assert summary["images"] + summary["reasons"].get("duplicate", 0) == 5000
    assert set(summary["reasons"]) <= {"duplicate"}
    # Copies spread over several ingest tasks still leave each image once in data/images.
    hashes = pq.read_table(datasets.images_uri(datasets.data_dir(cfg.workdir)), columns=["sha1"])
    assert summary["reasons"]["duplicate"] > 0 and hashes.num_rows == summary["images"]
    assert len(set(hashes.column("sha1").to_pylist())) == summary["images"]
    # The same photo filed under two ages, other bytes: one picture, so one split.
    manifest = read_outputs(cfg.workdir)[0]
    twins = manifest[manifest["path"].map(os.path.basename).isin(
        ["10_0_0_20170110225442428.jpg.chip.jpg", "9_0_0_20170110220406314.jpg.chip.jpg"])]
    assert len(twins) == 2 and twins["split"].nunique() == 1 and (twins["near_copy_of"] != "").sum() == 1
    assert summary["near_copies"] >= 40
