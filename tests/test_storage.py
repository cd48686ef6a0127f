import os
import stat

from deepfake_ray import storage


def test_local_writes_get_the_modes_any_new_file_gets(tmp_path):
    storage.write_text(str(tmp_path / "run" / "config.yaml"), "seed: 0\n")
    (tmp_path / "plain.txt").write_text("made by open()")
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "config.yaml").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert [p for p in os.listdir(tmp_path / "run")] == ["config.yaml"]  # no temporary left


def test_listing_follows_linked_folders_but_not_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "back")  # a loop through a link
    os.symlink(tmp_path / "a" / "b", tmp_path / "linked")  # one more way in: a second path
    files = storage.list_files(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a/b/x.jpg", "linked/x.jpg"]


def test_printable_keeps_valid_names_and_escapes_odd_bytes():
    assert storage.printable("/faces/José.jpg") == "/faces/José.jpg"
    assert storage.printable(os.fsdecode(b"/faces/Jos\xe9.jpg")) == "/faces/Jos\\xe9.jpg"


def test_s3_failures_are_explained_and_others_are_not():
    down = OSError("When getting information for key 'runs/x' in bucket 'bkt': AWS Error "
                   "NETWORK_CONNECTION during HeadObject operation: curlCode: 7")
    assert storage.explain(down).startswith("s3://bkt/runs/x: cannot reach the S3 endpoint")
    denied = OSError("When reading 'k' in bucket 'b': AWS Error ACCESS_DENIED during GetObject")
    assert "check the AWS credentials" in storage.explain(denied)
    assert storage.explain(OSError("disk full")) is None
    assert storage.explain(ValueError("AWS Error NO_SUCH_BUCKET")) is None
