import logging
import os
import re
import stat
import time

import pytest

from deepfake_ray import cli, config, s3, storage
from deepfake_ray.errors import UsageError
from tests.cli_output import error_lines
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_writes_get_the_modes_any_new_file_gets(tmp_path):
    storage.write_text(str(tmp_path / "run" / "config.yaml"), "seed: 0\n")
    (tmp_path / "plain.txt").write_text("made by open()")
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "config.yaml").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert [p for p in os.listdir(tmp_path / "run")] == ["config.yaml"]  # no temporary left


def test_a_local_write_that_fails_leaves_the_file_as_it_was_and_no_temporary(tmp_path, monkeypatch):
    """A full disk or a failing drive (here: its fsync) mid-write: readers still find the
    old file whole, and the folder holds nothing else (a `.tmp-` file would stay beside a
    marker or a manifest until the stage is redone)."""
    uri = str(tmp_path / "data" / "manifest.parquet")
    storage.write_bytes(uri, b"the old manifest")

    def disk_fails(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_fails)
    with pytest.raises(OSError, match="Input/output error"):
        storage.write_bytes(uri, b"a new manifest, never complete")
    assert (tmp_path / "data" / "manifest.parquet").read_bytes() == b"the old manifest"
    assert os.listdir(tmp_path / "data") == ["manifest.parquet"]


def test_a_full_disk_mid_write_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A write() or fsync() that finds the disk full names no file: the line said only "no
    space left on device", not whether the work directory's disk or the temp dir's."""
    from deepfake_ray.errors import disk_full

    uri = str(tmp_path / "gan" / "metrics.json")

    def disk_full_now(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full_now)
    with pytest.raises(OSError) as raised:
        storage.write_bytes(uri, b"{}")
    assert disk_full(raised.value).startswith(f"no space left on device writing {uri}: free space")


def test_a_stop_landing_as_a_write_is_renamed_into_place_stays_a_stop(tmp_path, monkeypatch):
    """Ctrl-C just after the rename: removing the temporary (already renamed) raised
    FileNotFoundError in place of the stop, so the command said it failed with a traceback."""
    uri = str(tmp_path / "detector" / "_COMPLETE.json")
    replace = os.replace

    def stopped_after(src, dst):
        replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped_after)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(uri, b"{}")
    assert os.listdir(tmp_path / "detector") == ["_COMPLETE.json"]


def test_a_filesystem_without_locks_is_said_as_such_not_as_unwritable(tmp_path, monkeypatch):
    """NFS without lockd refuses flock with ENOLCK (Lustre ENOSYS, some FUSE mounts
    EOPNOTSUPP): the line said "cannot write to --workdir ... pass a folder you can write
    to", which the user can."""
    import errno
    import fcntl

    for refusal in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):  # NFS; Lustre without -o flock; FUSE
        def no_locks(*_):
            raise OSError(refusal, os.strerror(refusal))

        monkeypatch.setattr(fcntl, "flock", no_locks)
        with pytest.raises(UsageError, match=rf"cannot lock .*: its filesystem offers no file locks \({os.strerror(refusal)};"
                                             r" .*use a --workdir on s3://, which has its own lease, or mount it with locks"):
            with storage.exclusive(str(tmp_path / "w"), "prepare"):
                pass


def test_a_stage_folder_linked_to_another_disk_stays_linked_when_redone(tmp_path):
    """`ln -s /big/fakes runs/demo/fakes`: a redo removed the link alone, leaving the old
    fakes on the big disk, and wrote the new ones on the work directory's (small) disk."""
    big, work = tmp_path / "big", tmp_path / "run"
    (big / "fakes" / "part").mkdir(parents=True)
    (big / "fakes" / "part" / "0.parquet").write_bytes(b"old")
    (big / "fakes" / storage.COMPLETE).write_text("{}")
    (big / "images").mkdir()
    (big / "images" / "old.parquet").write_bytes(b"old")
    work.mkdir()
    for name in ("fakes", "images"):
        os.symlink(big / name, work / name)
    storage.delete_dir(str(work / "fakes"))  # generate's redo
    assert os.path.islink(work / "fakes") and os.listdir(big / "fakes") == []
    (work / ".images-new").mkdir()
    (work / ".images-new" / "new.parquet").write_bytes(b"new")
    storage.replace_dir(str(work / "images"), str(work / ".images-new"))  # prepare's
    assert os.path.islink(work / "images") and os.listdir(big / "images") == ["new.parquet"]
    assert sorted(os.listdir(work)) == ["fakes", "images"]


def test_listing_follows_linked_folders_but_not_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "back")  # a loop through a link
    os.symlink(tmp_path / "a" / "b", tmp_path / "linked")  # one more way in: a second path
    os.symlink("self.jpg", tmp_path / "a" / "b" / "self.jpg")  # a link to itself: can't be followed
    (tmp_path / "a" / "b" / "y.jpg").write_bytes(b"y")
    files = [os.path.relpath(f, tmp_path) for f in storage.list_files(str(tmp_path))]
    # the unfollowable link is listed (to be rejected as unreadable), its folder's other files too
    assert files == ["a/b/self.jpg", "a/b/x.jpg", "a/b/y.jpg", "linked/self.jpg", "linked/x.jpg",
                     "linked/y.jpg"]
    assert storage.list_files(str(tmp_path / "not-there")) == []  # as an empty S3 prefix


def test_a_link_up_to_a_folder_above_the_source_lists_nothing_outside_it(tmp_path):
    """`..` would list the source's neighbours as its own photos (and a link to `/` the
    whole disk, a folder above every source as well)."""
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "other.jpg").write_bytes(b"o")
    (tmp_path / "faces" / "sub").mkdir(parents=True)
    (tmp_path / "faces" / "x.jpg").write_bytes(b"x")
    os.symlink("..", tmp_path / "faces" / "up")
    os.symlink("../..", tmp_path / "faces" / "sub" / "up2")
    os.symlink(tmp_path / "faces", tmp_path / "via-link")  # the source named through a link
    for source in ("faces", "via-link"):
        files = [os.path.relpath(f, tmp_path / source) for f in storage.list_files(str(tmp_path / source))]
        assert files == ["x.jpg"]


def test_a_folder_that_cannot_be_read_is_left_out_with_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "x.jpg").write_bytes(b"x")
    (tmp_path / "lost+found").mkdir()
    scandir = os.scandir

    def denied_for_lost_and_found(path):  # as for a user on a drive's root-only lost+found
        if os.path.basename(path) == "lost+found":  # (tests run as root, whom no mode stops)
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied_for_lost_and_found)
    files = storage.list_files(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == ["faces/x.jpg"]
    warning = error_lines(capsys)
    assert len(warning) == 1 and "1 folder(s)" in warning[0] and "lost+found (Permission denied)" in warning[0]


def test_a_local_read_gets_the_whole_file_whatever_its_last_stat_said(tmp_path):
    """read_bytes reads a file's size in one call; a file that grew or shrank since its
    stat (or a filesystem that answers in pieces) is still read to its end."""
    path = tmp_path / "face.jpg"
    path.write_bytes(bytes(range(256)) * 40)
    assert storage.read_bytes(str(path)) == path.read_bytes()
    for said in (0, 100, 10_240, 20_000):  # grown, grown, as it is, shrunk
        fd = os.open(path, os.O_RDONLY)
        try:
            assert storage.read_to_end(fd, said) == path.read_bytes()
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:  # a file that grew past the limit since its stat is refused, not read whole
        with pytest.raises(storage.FileTooLarge):
            storage.read_to_end(fd, 100, max_bytes=5_000)
    finally:
        os.close(fd)
    with pytest.raises(IsADirectoryError):
        storage.read_bytes(str(tmp_path))
    with pytest.raises(storage.FileTooLarge):
        storage.read_bytes(str(path), max_bytes=100)


def test_printable_keeps_valid_names_and_escapes_odd_bytes():
    assert storage.printable("/faces/José.jpg") == "/faces/José.jpg"
    assert storage.printable(os.fsdecode(b"/faces/Jos\xe9.jpg")) == "/faces/Jos\\xe9.jpg"


def test_s3_failures_are_explained_and_others_are_not():
    down = OSError("When getting information for key 'runs/x' in bucket 'bkt': AWS Error "
                   "NETWORK_CONNECTION during HeadObject operation: curlCode: 7")
    assert s3.explain(down).startswith("s3://bkt/runs/x: cannot reach the S3 endpoint")
    denied = OSError("When reading 'k' in bucket 'b': AWS Error ACCESS_DENIED during GetObject")
    assert "check the AWS credentials" in s3.explain(denied)
    assert s3.explain(OSError("disk full")) is None
    assert s3.explain(ValueError("AWS Error NO_SUCH_BUCKET")) is None
    # a bucket in another region than pyarrow's (which Ray Data and Ray Train use), in
    # pyarrow's own words: the one to set, not "AWS Error UNKNOWN (HTTP status 301)"
    for configured, said in (("us-east-1", "the configured us-east-1"), ("", "the default (none is configured)")):
        redirected = OSError("When getting information for key 'faces' in bucket 'photos': AWS Error UNKNOWN "
                             "(HTTP status 301) during HeadObject operation: No response body. Looks like the "
                             f"configured region is '{configured}' while the bucket is located in 'eu-north-1'.")
        assert s3.explain(redirected) == (
            f"s3://photos/faces: the bucket is in region eu-north-1, not {said}: set AWS_REGION=eu-north-1 "
            "(every bucket a run reads or writes must be in that region: copy a source in another first)")


def test_s3_endpoint_from_the_profile_in_the_aws_config_file(tmp_path, monkeypatch):
    (tmp_path / "config").write_text("[default]\nendpoint_url = http://127.0.0.1:5055\n"
                                     "[profile minio]\ns3 =\n  endpoint_url = http://10.0.0.9:9000\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    assert s3.s3_endpoint() == "http://127.0.0.1:5055"
    monkeypatch.setenv("AWS_PROFILE", "minio")
    assert s3.s3_endpoint() == "http://10.0.0.9:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # the environment wins
    assert s3.s3_endpoint() == "http://127.0.0.1:1"


def test_s3_endpoint_from_a_services_section_and_a_missing_profile_named(tmp_path, monkeypatch):
    """boto3 reads a profile's `services` section; pyarrow must be handed the same store,
    not AWS's own. A profile that is nowhere is named, not taken for a network problem."""
    (tmp_path / "config").write_text("[profile svc]\nservices = local\n"
                                     "[services local]\ns3 =\n  endpoint_url = http://127.0.0.1:5066\n")
    (tmp_path / "credentials").write_text("[keys-only]\naws_access_key_id = x\naws_secret_access_key = y\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_PROFILE", "svc")
    assert s3.s3_endpoint() == "http://127.0.0.1:5066"
    monkeypatch.setenv("AWS_PROFILE", "keys-only")  # a profile in the credentials file alone
    assert s3.s3_endpoint() is None
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    with pytest.raises(UsageError, match=r"\(nosuchprofile\) could not be found: check AWS_PROFILE and "
                                         + re.escape(str(tmp_path / "config"))):
        s3.s3_endpoint()


def test_an_s3_store_named_only_in_the_aws_config_file_is_used(s3_server, tmp_path, monkeypatch):
    bucket = s3_server("named-in-config")
    (tmp_path / "config").write_text(f"[default]\nendpoint_url = {os.environ['AWS_ENDPOINT_URL']}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3.filesystem_for.cache_clear()
    try:
        storage.write_text(f"{bucket}/hello.txt", "hi")
        assert storage.read_text(f"{bucket}/hello.txt") == "hi"
    finally:
        s3.filesystem_for.cache_clear()


def test_many_files_are_written_at_once_and_a_failure_is_explained(s3_server, tmp_path):
    for root in (s3_server("many-files"), str(tmp_path)):
        files = {storage.join(root, "test_images", label, f"{i:02d}.jpg"): f"{label} {i}".encode()
                 for label in ("real", "fake") for i in range(40)}
        storage.write_many(files)
        assert {uri: storage.read_bytes(uri) for uri in files} == files
        assert len(storage.list_files(storage.join(root, "test_images"))) == 80
    # S3 writes are sent when the file is closed: a missing bucket is still one clear line
    with pytest.raises(OSError) as failed:
        storage.write_many({"s3://no-such-bucket/runs/x.jpg": b"x"})
    assert s3.explain(failed.value) == "s3://no-such-bucket/runs/x.jpg: the bucket does not exist: check the s3:// path"


def test_an_s3_object_over_the_size_asked_is_refused_unread(s3_server):
    """As a local file is: a video or an archive named .jpg in a bucket is "too large",
    not read whole into a task's memory first (by either way of reading a key)."""
    bucket = s3_server("too-large")
    client, name, _ = s3.s3_client(bucket)
    for key in ("faces/big.jpg", "faces//big.jpg"):  # pyarrow reads one, boto3 the other
        client.put_object(Bucket=name, Key=key, Body=b"\0" * 5_000)
        with pytest.raises(storage.FileTooLarge, match="5,000 bytes, over 1,000"):
            storage.read_bytes(f"{bucket}/{key}", max_bytes=1_000)
        assert len(storage.read_bytes(f"{bucket}/{key}", max_bytes=5_000)) == 5_000


def test_an_s3_image_is_read_in_two_requests(s3_server, caplog):
    """Its size (a HEAD), then its bytes (a GET): `score` of 5M files made 15M requests,
    a third of them a second HEAD, against S3's ~5,500 a second per prefix."""
    uri = f"{s3_server('requests-per-read')}/faces/a.jpg"
    storage.write_bytes(uri, b"x" * 3_000)
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs each request
    caplog.clear()
    assert len(storage.read_bytes(uri, max_bytes=10_000)) == 3_000
    sent = [re.search(r"([A-Z]+) /requests-per-read/faces/a.jpg", r.getMessage()) for r in caplog.records]
    assert [s.group(1) for s in sent if s] == ["HEAD", "GET"]
    with pytest.raises(FileNotFoundError, match=r"^s3://requests-per-read/faces$"):
        storage.read_bytes(uri.rsplit("/", 1)[0], max_bytes=10_000)  # a prefix, not a file


def test_a_buckets_root_lists_its_keys(s3_server):
    root = s3_server("listed-at-root")
    storage.write_bytes(f"{root}/top.jpg", b"x")
    storage.write_bytes(f"{root}/faces/a.jpg", b"yy")
    assert {k: o["Size"] for k, o in storage.s3_objects(root).items()} == {"top.jpg": 1, "faces/a.jpg": 2}
    assert list(storage.s3_objects(f"{root}/faces")) == ["a.jpg"]


@pytest.mark.parametrize("size, failing", [(1000, "PutObject"), (12 << 20, "UploadPart")])
def test_an_s3_write_that_fails_leaves_the_object_as_it_was(s3_server, monkeypatch, size, failing):
    """pyarrow's output stream sends what it holds when closed, also after an error: a
    failed multipart upload once replaced the file with an empty object, which the next
    run trusted. A failed write now leaves the old object, and no upload half done."""
    import boto3
    from botocore.exceptions import EndpointConnectionError

    uri = f"{s3_server('failed-writes')}/runs/model.safetensors"
    storage.write_bytes(uri, b"the old weights")
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part: 12 MB in 3 parts
    monkeypatch.setattr(storage, "PART_BYTES", 5 << 20)
    def network_drops(request, **_):  # every try of the object, or of its second part
        if failing == "PutObject" or "partNumber=2" in request.url:
            raise EndpointConnectionError(endpoint_url=request.url)

    client = s3.s3_client(uri)[0]
    client.meta.events.register(f"before-send.s3.{failing}", network_drops)
    try:
        with pytest.raises(OSError) as failed:
            storage.write_bytes(uri, os.urandom(size))
    finally:
        client.meta.events.unregister(f"before-send.s3.{failing}", network_drops)
    assert storage.read_bytes(uri) == b"the old weights"
    assert not boto3.client("s3").list_multipart_uploads(Bucket="failed-writes").get("Uploads")
    assert s3.explain(failed.value) == (f"{uri}: cannot reach the S3 endpoint "
                                             f"{s3.s3_endpoint()}: check AWS_ENDPOINT_URL and the network")


def test_a_lost_connection_while_listing_an_earlier_copy_is_said_in_one_line(s3_server, tmp_path):
    """A cluster run's local source is copied to its S3 work directory, after listing what
    an earlier run copied there: a network failure in that listing is the store's one line,
    as in any other S3 call, not botocore's traceback."""
    from botocore.exceptions import EndpointConnectionError

    from deepfake_ray.data import sources

    (tmp_path / "face.jpg").write_bytes(b"a face")
    dest = f"{s3_server('copy-listing')}/runs/source"
    src = sources.Source("folder", files=(str(tmp_path / "face.jpg"),), root=str(tmp_path))

    def network_drops(request, **_):
        raise EndpointConnectionError(endpoint_url=request.url)

    client = s3.s3_client(dest)[0]
    client.meta.events.register("before-send.s3.ListObjectsV2", network_drops)
    try:
        with pytest.raises(OSError) as failed:
            sources.copy_to(src, dest, "prepare")
    finally:
        client.meta.events.unregister("before-send.s3.ListObjectsV2", network_drops)
    assert s3.explain(failed.value) == (f"{dest}: cannot reach the S3 endpoint "
                                             f"{s3.s3_endpoint()}: check AWS_ENDPOINT_URL and the network")
    assert sources.copy_to(src, dest, "prepare").files == (f"{dest}/face.jpg",)  # and once it is back


def test_an_s3_write_without_credentials_says_where_to_put_them(s3_server, monkeypatch, tmp_path):
    uri = f"{s3_server('no-credentials')}/runs/config.yaml"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance to ask here
    s3.boto3_client.cache_clear()
    try:
        with pytest.raises(OSError) as failed:
            storage.write_text(uri, "seed: 0\n")
    finally:
        s3.boto3_client.cache_clear()
    assert s3.explain(failed.value) == (f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID "
                                             "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or ~/.aws/credentials")


def refused_before_it_changes_anything(workdir: str, capsys) -> None:
    """prepare and pipeline, while another prepare holds WORKDIR/data: exit 2 naming it,
    the running one's config.yaml left as it is."""

    storage.write_text(storage.join(workdir, "config.yaml"), "the running prepare's\n")
    for command in ("prepare", "pipeline"):
        assert cli.main([command, "--preset", "tiny", "--workdir", workdir]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and "another prepare (pid " in err[0] and "is writing" in err[0]
    assert storage.read_text(storage.join(workdir, "config.yaml")) == "the running prepare's\n"


def holding(folder: str, command: str, **popen):
    """Another process holding `folder`'s lock as `command`, once it says it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from deepfake_ray import storage\n"
        f"with storage.exclusive({folder!r}, {command!r}):\n"
        "    print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True, **popen)
    assert processes.first_line(holder).strip() == "held"
    return holder


def test_a_second_writer_of_a_local_folder_is_refused_until_the_first_ends(tmp_path, capsys):
    holder = holding(str(tmp_path / "data"), "prepare")
    try:
        with pytest.raises(UsageError, match=rf"another prepare \(pid {holder.pid} on .+\) is writing .*data: wait for it"):
            with storage.exclusive(str(tmp_path / "data"), "prepare"):
                pass
        refused_before_it_changes_anything(str(tmp_path), capsys)
    finally:
        holder.kill()  # killed, not ended cleanly: the OS frees its lock all the same
        holder.wait()
    with storage.exclusive(str(tmp_path / "data"), "prepare"):
        pass


def test_a_run_refused_for_the_settings_of_an_unfinished_one_that_is_running_names_it(tmp_path, capsys):
    """gan/ holds a training begun with gan.epochs=10 and still running: a pipeline with the
    preset's epochs was told the unfinished run has other settings and offered --force,
    which would start over a training that is live. It is told which run holds the folder."""
    from deepfake_ray import config, lineage
    from deepfake_ray.data import prepare
    from deepfake_ray.gan import train as gan_train

    running = config.build("tiny", None, ["gan.epochs=10"], workdir=str(tmp_path))
    lineage.complete(running, prepare.STAGE, {}, lineage.made(running, prepare.STAGE))
    storage.write_json(storage.join(lineage.uri(running, gan_train.STAGE), lineage.STARTED),
                       lineage.made(running, gan_train.STAGE))
    holder = holding(str(tmp_path), "train-gan")
    try:
        assert cli.main(["pipeline", "--preset", "tiny", "--workdir", str(tmp_path)]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"another train-gan (pid {holder.pid} on " in err[0], err
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["pipeline", "--preset", "tiny", "--workdir", str(tmp_path)]) == 2  # alone: the settings
    assert "holds an unfinished run begun with gan.epochs=10" in error_lines(capsys)[0]


def test_a_missing_bucket_is_named_not_taken_for_missing_stages(s3_server, capsys, monkeypatch):
    """Everything in a bucket that does not exist reads as missing: train-gan was told to
    run prepare first (which then failed on the bucket), score that model.json was missing."""
    s3_server("runs-here")  # the store answers; the bucket named below is not in it
    monkeypatch.setattr(cli, "start_ray", lambda address: pytest.fail("Ray started"))
    for command in ("train-gan", "evaluate"):
        assert cli.main([command, "--preset", "tiny", "--workdir", "s3://runs-not-here/r1"]) == 2
        assert error_lines(capsys) == [f"deepfake-ray {command}: error: s3://runs-not-here/r1: the bucket does "
                                       "not exist: check the s3:// path"]
    assert cli.main(["score", "--preset", "tiny", "--model", "s3://runs-not-here/m", "--input", ROOT,
                     "--out", "s3://runs-here/scores.csv"]) == 2
    assert error_lines(capsys) == ["deepfake-ray score: error: --model s3://runs-not-here/m: the bucket does not "
                                   "exist: check the s3:// path"]


def test_an_s3_lock_of_a_run_killed_on_this_machine_is_taken_over_at_once(s3_server):
    """A run killed outright (kill -9) renews nothing: a rerun on the same machine was
    refused for the 300 s of the lease, though the OS could tell its pid was gone."""
    workdir = f"{s3_server('runs-killed-here')}/r1"
    holder = holding(workdir, "train-gan", env={**os.environ, "PYTHONPATH": ROOT})
    try:
        with pytest.raises(UsageError, match=rf"another train-gan \(pid {holder.pid} on .+\) is writing"):
            with storage.exclusive(workdir, "train-gan"):  # it lives: refused
                pass
    finally:
        holder.kill()
        holder.wait()
    # the same, had it been a Ray cluster's driver: the cluster's workers may still be
    # writing, and only Ray can say its job has ended
    import json

    import boto3

    lock = {"Bucket": "runs-killed-here", "Key": "r1/.lock"}
    client = boto3.client("s3")
    as_written = json.loads(client.get_object(**lock)["Body"].read())
    client.put_object(**lock, Body=json.dumps({**as_written, "ray_job": "01000000",
                                               "ray_cluster": "10.0.0.1:6379 session_x"}))
    with pytest.raises(UsageError, match=rf"another train-gan \(pid {holder.pid} on .+\) is writing"):
        with storage.exclusive(workdir, "train-gan"):
            pass
    client.put_object(**lock, Body=json.dumps(as_written))
    started = time.time()
    with storage.exclusive(workdir, "train-gan"):  # gone: taken over well within the lease
        pass
    assert time.time() - started < 30


def test_a_local_work_directory_is_locked_before_ray_starts(tmp_path, monkeypatch):
    """Another run starting while this one starts Ray (seconds) is refused then, rather
    than let write its config.yaml over this run's and only be refused after."""
    import fcntl

    from deepfake_ray import runtime

    tried = []

    def starting_ray(address=None):
        with open(tmp_path / "w" / ".lock", "a+") as lock:  # the other run's attempt, meanwhile
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tried.append("taken")
            except BlockingIOError:
                tried.append("refused")
        raise KeyboardInterrupt  # enough: this run stops here

    monkeypatch.setattr(runtime, "init", starting_ray)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", str(tmp_path / "w")]) == 130
    assert tried == ["refused"]


def test_an_s3_work_directory_is_leased_to_one_writer_and_a_dead_ones_lease_lapses(
        s3_server, monkeypatch, capsys):
    import json

    import boto3

    from deepfake_ray import lease

    data = f"{s3_server('runs-leased')}/r1/data"
    lock = {"Bucket": "runs-leased", "Key": "r1/data/.lock"}
    client = boto3.client("s3")
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    with storage.exclusive(data, "prepare"):
        first = json.loads(client.get_object(**lock)["Body"].read())
        with pytest.raises(UsageError, match=rf"another prepare \(pid {os.getpid()} on .*\) is "
                                             rf"writing {data}: wait for it to end"):
            with storage.exclusive(data, "prepare"):
                pass
        refused_before_it_changes_anything(data.removesuffix("/data"), capsys)
        deadline = time.time() + 30  # renewed every 0.05 s here, by a thread
        while json.loads(client.get_object(**lock)["Body"].read())["renewed"] <= first["renewed"]:
            assert time.time() < deadline, "the lease was never renewed"
            time.sleep(0.05)
    assert "Contents" not in client.list_objects_v2(Bucket="runs-leased", Prefix="r1/data/")  # freed

    # a live run on a machine whose clock is hours behind: its lock's age is the store's
    client.put_object(**lock, Body=json.dumps({"command": "train-gan", "pid": 1, "host": "slow-clock",
                                               "renewed": time.time() - 10 * lease.LAPSE_S}))
    with pytest.raises(UsageError, match=r"another train-gan \(pid 1 on slow-clock\) is writing"):
        with storage.exclusive(data, "prepare"):
            pass
    monkeypatch.setattr(lease, "LAPSE_S", 1.0)
    time.sleep(2.5)  # it stopped renewing: dead (S3's clocks count whole seconds)
    with storage.exclusive(data, "prepare"):  # taken over
        assert json.loads(client.get_object(**lock)["Body"].read())["pid"] == os.getpid()


def test_a_store_that_ignores_conditional_writes_is_said_to_have_no_lock(s3_server, monkeypatch, capsys):
    """AWS S3 before August 2024, older MinIO and Ceph take If-None-Match and do nothing
    with it: a second run wrote over the first's lock, and neither knew. It is found at the
    start, said, and no lock object is left to mislead."""
    import boto3

    uri = f"{s3_server('runs-unconditional')}/r1"
    plain = boto3.client("s3")

    def drop_conditions(params, **_):  # what such a store does with them
        params.pop("IfNoneMatch", None)
        params.pop("IfMatch", None)

    plain.meta.events.register("before-parameter-build.s3.PutObject", drop_conditions)
    monkeypatch.setattr(s3, "s3_client", lambda u, quick=False: (plain, "runs-unconditional", "r1"))
    with storage.exclusive(uri, "prepare"):
        assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket="runs-unconditional", Prefix="r1/")
    assert (f"prepare: warning: this S3 store has no conditional writes, so {uri} has no lock: keep runs "
            "that share it apart yourself") in capsys.readouterr().err


def test_a_lock_write_whose_reply_was_lost_is_still_the_runs_own(s3_server):
    """The write went through, its reply was lost, the SDK's retry was refused (the object
    now exists): the run recognizes its own lock by its token rather than call itself a
    second writer."""
    import boto3

    from deepfake_ray import lease

    client = boto3.client("s3")
    s3_server("runs-retried")
    client.put_object(Bucket="runs-retried", Key="r1/data/.lock", Body=lease.holder("prepare", "t0ken"))
    etag = lease.take(client, "runs-retried", "r1/data/.lock", "s3://runs-retried/r1/data", "prepare", "t0ken")
    assert etag == client.head_object(Bucket="runs-retried", Key="r1/data/.lock")["ETag"]
    with pytest.raises(UsageError, match="another prepare .* is writing"):  # anyone else's token
        lease.take(client, "runs-retried", "r1/data/.lock", "s3://runs-retried/r1/data", "prepare", "other")


def test_a_takeover_or_release_whose_reply_was_lost_is_not_taken_for_another_run(
        s3_server, monkeypatch, capsys):
    """Taking over a dead run's lock: the write went through, its reply was lost and the
    SDK's retry was refused (412). Releasing: the delete went through, the retry found
    nothing. Neither is another run; and a store that cannot answer the release does not
    fail a run that is over."""
    import boto3
    from botocore.config import Config

    from deepfake_ray import lease

    bucket, key, uri = "runs-lost-replies", "r1/data/.lock", f"{s3_server('runs-lost-replies')}/r1/data"
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=key, Body=lease.holder("prepare", "dead-run"))
    dead = client.get_object(Bucket=bucket, Key=key)
    client.put_object(Bucket=bucket, Key=key, Body=lease.holder("prepare", "t0ken"))  # our takeover's write
    monkeypatch.setattr(lease, "LAPSE_S", 0.0)  # the dead run's lock has lapsed
    etag = lease.take_over(client, bucket, key, uri, "prepare", "t0ken", dead)
    assert etag == client.head_object(Bucket=bucket, Key=key)["ETag"]

    client.delete_object(Bucket=bucket, Key=key)  # our release's delete, its reply lost
    lease.release(client, bucket, key, etag, "prepare")
    assert "took over" not in capsys.readouterr().out

    offline = boto3.client("s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}))
    lease.release(offline, bucket, key, etag, "prepare")  # no exception: the run is over
    assert f"could not delete the lock s3://{bucket}/{key}" in capsys.readouterr().err


def test_a_run_that_lost_its_s3_lease_leaves_its_successors_lock_in_place(s3_server, monkeypatch, capsys):
    """A run whose renewals stalled past LAPSE_S was taken over: ending, it must not free
    the lock of the run that now writes there."""
    import json

    import boto3

    from deepfake_ray import lease

    data = f"{s3_server('runs-taken-over')}/r1/data"
    lock = {"Bucket": "runs-taken-over", "Key": "r1/data/.lock"}
    client = boto3.client("s3")
    monkeypatch.setattr(lease, "RENEW_S", 3600.0)  # stalled: never renews in this test
    successor = json.dumps({"command": "train-gan", "pid": 2, "host": "elsewhere", "renewed": 0})
    with storage.exclusive(data, "prepare"):
        client.put_object(**lock, Body=successor)  # the successor's takeover
    assert client.get_object(**lock)["Body"].read().decode() == successor
    assert "another run took over the lock s3://runs-taken-over/r1/data/.lock" in capsys.readouterr().err

    # renewing again, it finds the lock taken over: it stops, not goes on as a second writer
    client.delete_object(**lock)
    monkeypatch.setattr(lease, "RENEW_S", 0.2)
    with pytest.raises(UsageError, match=r"another run took over the lock of .*r1/data \(a run may take a "
                                         r"lock not renewed for 300 s.*\): this run stops"):
        with storage.exclusive(data, "prepare"):
            client.put_object(**lock, Body=successor)
            time.sleep(30)  # the next renewal stops it long before
    assert client.get_object(**lock)["Body"].read().decode() == successor

    # prepare holds two: the work directory's, then data/'s. The one taken over is named
    client.delete_object(**lock)
    workdir_lock = {"Bucket": "runs-taken-over", "Key": "r1/.lock"}
    with pytest.raises(UsageError, match=r"another run took over the lock of s3://runs-taken-over/r1 \("):
        with storage.exclusive(data[:-len("/data")], "prepare"), storage.exclusive(data, "prepare"):
            client.put_object(**workdir_lock, Body=successor)
            time.sleep(30)


def test_a_run_whose_lease_went_unrenewed_for_most_of_a_lapse_stops_and_commits_nothing(
        s3_server, monkeypatch, capsys):
    """A laptop suspended for ten minutes: by the store's clock its lock lapsed, and another
    run may have taken it. Woken, it wrote on (checkpoints, a stage's marker) until its next
    renewal found the lock taken, up to a minute later: two writers."""
    import boto3

    from deepfake_ray import lease

    work = f"{s3_server('runs-asleep')}/r1"
    clock = [1000.0]
    monkeypatch.setattr(lease, "awake_s", lambda: clock[0])
    stale = r"the lock of s3://runs-asleep/r1 went unrenewed for 600 s \(this machine slept, or could not " \
            r"reach the store\), and another run may take a lock after 300 s: this run stops"
    with storage.exclusive(work, "train-gan"):  # its renewer looks in a minute: not in this block
        clock[0] += 600  # asleep; the renewer's own wait does not count it
        with pytest.raises(UsageError, match=stale):  # a commit on waking, before the renewer looks
            storage.mark_complete(storage.join(work, "gan"), {"epochs": 1})
    clock[0] = 1000.0
    monkeypatch.setattr(lease, "CHECK_S", 0.05)
    with pytest.raises(UsageError, match=stale):
        with storage.exclusive(work, "train-gan"):
            clock[0] += 600
            time.sleep(30)  # the renewer stops the run within CHECK_S
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket="runs-asleep", Prefix="r1/")
    # still its own: freed for the rerun, no marker left behind
    assert f"warning: {stale.replace(chr(92), '')[:40]}" in capsys.readouterr().err


def test_a_run_that_waited_out_another_clusters_lock_is_not_taken_for_one_that_slept(s3_server, monkeypatch):
    """A RayJob's retry waits up to LAPSE_S for its dead attempt's lock: counted from before
    that wait, the lock read as unrenewed for minutes once taken, and the retry was stopped."""
    from deepfake_ray import lease

    clock, take = [1000.0], lease.take
    monkeypatch.setattr(lease, "awake_s", lambda: clock[0])
    monkeypatch.setattr(lease, "CHECK_S", 0.05)

    def waited_out(*args, **kwargs):
        clock[0] += lease.LAPSE_S  # as wait_for_lapse does
        return take(*args, **kwargs)

    monkeypatch.setattr(lease, "take", waited_out)
    work = f"{s3_server('runs-waited')}/r1"
    with storage.exclusive(work, "pipeline"):
        time.sleep(0.5)  # the renewer looks ten times
        storage.mark_complete(storage.join(work, "data"), {"images": 1})


def test_one_command_at_a_time_writes_a_work_directory(tmp_path, capsys):
    """A training beside a running pipeline would share its run's checkpoints: refused,
    exit 2 naming it, before it changes anything (config.yaml included)."""

    workdir = str(tmp_path / "w")
    storage.write_text(storage.join(workdir, "config.yaml"), "the running pipeline's\n")
    with storage.exclusive(workdir, "pipeline"):
        for command in ("train-gan", "train-detector", "evaluate", "pipeline"):
            assert cli.main([command, "--preset", "tiny", "--workdir", workdir]) == 2, command
            err = error_lines(capsys)
            assert len(err) == 1 and f"another pipeline (pid {os.getpid()} on " in err[0], err
        # a mistake of this command's own is named as it is, not left for after that run
        assert cli.main(["prepare", "--preset", "tiny", "--workdir", workdir, "--source", workdir + "/none"]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"{workdir}/none" in err[0] and "another pipeline" not in err[0], err
    assert storage.read_text(storage.join(workdir, "config.yaml")) == "the running pipeline's\n"


def test_a_run_refused_at_the_s3_lock_leaves_the_winners_config_yaml(ray_session, s3_server, monkeypatch):
    """Two runs starting together on an S3 work directory both see no lock, and each writes
    its config.yaml before Ray starts; the one refused at the lock put back the config.yaml
    it had found, over the winner's: its report and rerun hints named another run's settings."""
    workdir = f"{s3_server('config-race')}/r1"
    uri = f"{workdir}/config.yaml"
    storage.write_text(uri, "the previous run's\n")
    take_lock = cli.take_lock

    def another_run_starts_too(held, cfg, command):
        storage.write_text(uri, "the other run's\n")  # after ours, having read the previous run's
        take_lock(held, cfg, command)  # this run wins the lock
        cli.put_back(uri, "the other run's\n", "the previous run's\n")  # the other, refused

    monkeypatch.setattr(cli, "take_lock", another_run_starts_too)
    assert cli.main(["prepare", "--preset", "tiny", "--workdir", workdir]) == 0
    assert storage.read_text(uri) == cli.recorded(config.build("tiny", workdir=workdir))[1]


def test_a_killed_cluster_drivers_s3_lock_is_taken_over_at_once_on_that_cluster(ray_session, s3_server):
    """A job killed outright renews nothing; resubmitted to the same cluster, it must not
    wait out the lease while Ray already knows its driver is dead."""
    import subprocess
    import sys

    from ray._private.state import jobs

    workdir = f"{s3_server('runs-killed')}/r1"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, ray; from deepfake_ray import storage\n"
        f"ray.init(address={ray_session.get_runtime_context().gcs_address!r})\n"
        f"with storage.exclusive({workdir!r}, 'pipeline'):\n"
        "    print(ray.get_runtime_context().get_job_id(), flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        job = processes.first_line(holder).strip()
        assert job, "the holder did not start"
        with pytest.raises(UsageError, match=rf"another pipeline \(pid {holder.pid} on .+\) is writing"):
            with storage.exclusive(workdir, "pipeline"):  # it lives: refused
                pass
        # a command not yet on the cluster cannot tell that it lives: it finds out once it
        # joins, and is refused there without having touched the running one's config.yaml
        storage.write_text(f"{workdir}/config.yaml", "the running pipeline's\n")
        refused = subprocess.run(
            [sys.executable, "-m", "deepfake_ray.cli", "prepare", "--preset", "tiny", "--workdir", workdir,
             "--address", ray_session.get_runtime_context().gcs_address],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert refused.returncode == 2, refused.stderr
        assert f"another pipeline (pid {holder.pid} on " in refused.stderr.splitlines()[-1]
        assert storage.read_text(f"{workdir}/config.yaml") == "the running pipeline's\n"
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 60
    while not any(j["JobID"] == job and j["IsDead"] for j in jobs()):
        assert time.time() < deadline, f"Ray never marked the killed holder's job {job} dead"
        time.sleep(0.2)
    with storage.exclusive(workdir, "pipeline"):  # dead to Ray: taken over, well within LAPSE_S
        pass


def test_a_retried_job_on_a_new_cluster_waits_out_its_dead_attempts_s3_lock(ray_session, s3_server):
    """KubeRay retries a RayJob on a new cluster: the dead attempt's driver, on the old one,
    renews its lock no more, and the retry waits for it to lapse rather than fail at once.
    A holder on another cluster that still renews is refused, as any live one."""
    import json
    import subprocess
    import sys
    import threading

    import boto3

    workdir = f"{s3_server('runs-retried-job')}/r1"
    client = boto3.client("s3")

    def write_lock():  # as a driver on another cluster writes it
        client.put_object(Bucket="runs-retried-job", Key="r1/.lock", Body=json.dumps(
            {"command": "pipeline", "pid": 7, "host": "old-head", "renewed": time.time(), "token": "t",
             "ray_job": "01000000", "ray_cluster": "10.255.255.1:6379"}))

    script = ("import ray; from deepfake_ray import lease, storage\n"
              "from deepfake_ray.errors import UsageError\n"
              f"ray.init(address={ray_session.get_runtime_context().gcs_address!r})\n"
              "lease.LAPSE_S, lease.WAIT_POLL_S = 4.0, 0.5\n"
              # the lock is written then: Ray's start alone may outlast LAPSE_S on a busy
              # machine, and so may the S3 client's first start and request
              f"storage.exists({workdir + '/.lock'!r})\n"
              "print('ready', flush=True); input()\n"
              "try:\n"
              f"    with storage.exclusive({workdir!r}, 'pipeline'):\n"
              "        print('taken', flush=True)\n"
              "except UsageError as e:\n"
              "    print('refused:', e, flush=True)\n")

    def retry(lock_written) -> str:
        """The retried driver's output; `lock_written` once it has started (and Ray with it)."""
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "PYTHONPATH": ROOT})
        hung = threading.Timer(120, child.kill)
        hung.start()
        try:
            said = []
            while (line := child.stdout.readline()) not in ("ready\n", ""):
                said.append(line)
            assert line == "ready\n", "".join(said)
            lock_written()
            out, _ = child.communicate("\n")
            return "".join(said) + out
        finally:
            hung.cancel()
            child.kill()
            child.wait()

    out = retry(write_lock)  # and never again: that attempt died with its cluster
    assert "on another Ray cluster (old-head)" in out and "waiting up to" in out and "taken" in out, out

    stop = threading.Event()
    renewer = threading.Thread(target=lambda: [write_lock() for _ in iter(lambda: stop.wait(1.0), True)])
    try:
        out = retry(lambda: (write_lock(), renewer.start()))
    finally:
        stop.set()
        if renewer.ident:  # started once the retry was
            renewer.join()
    assert "refused: another pipeline (pid 7 on old-head, Ray job 01000000) is writing" in out, out
    assert "wait for it to end (`ray job list` on its cluster names it, `ray job stop` ends it)" in out, out

    # a cluster started anew at the same head address numbers its jobs from 1 again: a
    # lock naming that address but not this start of it is an earlier cluster's, waited out,
    # not taken for this cluster's live job 01000000 (this test's driver) and refused
    address = ray_session.get_runtime_context().gcs_address
    out = retry(lambda: client.put_object(Bucket="runs-retried-job", Key="r1/.lock", Body=json.dumps(
        {"command": "pipeline", "pid": 7, "host": "old-head", "renewed": time.time(), "token": "t",
         "ray_job": ray_session.get_runtime_context().get_job_id(), "ray_cluster": address})))
    assert "waiting up to" in out and "taken" in out, out


def test_a_lease_renewal_whose_reply_was_lost_survives_a_blip_reading_the_lock(s3_server, monkeypatch):
    """The renewal went through but its reply was lost, so the retry is refused (412): the
    lock is read to see whose it is. That read failing once (the same network blip) is not
    a takeover: the run goes on holding its lock, instead of stopping and leaving it."""
    import threading

    import boto3
    from botocore.exceptions import EndpointConnectionError

    from deepfake_ray import lease

    bucket, key, token = "runs-blip", "r1/data/.lock", "mine"
    s3_server(bucket)
    client = boto3.client("s3")
    sent = client.put_object(Bucket=bucket, Key=key, Body=lease.holder("prepare", token))["ETag"]
    went_through = client.put_object(Bucket=bucket, Key=key, Body=lease.holder("prepare", token),
                                     IfMatch=sent)["ETag"]  # whose reply never came back

    class Blip:  # the real client, but its first read of the lock fails
        reads = 0

        def __getattr__(self, name):
            return getattr(client, name)

        def get_object(self, **kw):
            Blip.reads += 1
            if Blip.reads == 1:
                raise EndpointConnectionError(endpoint_url="http://s3")
            return client.get_object(**kw)

    monkeypatch.setattr(lease, "RENEW_S", 0.02)
    etag, stop, lost, stopped = [sent], threading.Event(), threading.Event(), []
    renewer = threading.Thread(target=lease.renew_until_stopped, args=(
        Blip(), bucket, key, etag, "prepare", token, stop, lost, lambda: stopped.append(1)))
    renewer.start()
    deadline = time.time() + 30
    while etag[0] in (sent, went_through) and time.time() < deadline:  # until renewed past both
        time.sleep(0.02)
    stop.set()
    renewer.join()
    assert not lost.is_set() and stopped == [] and Blip.reads >= 2
    assert etag[0] == client.head_object(Bucket=bucket, Key=key)["ETag"]  # still this run's lock


def self_signed(folder) -> tuple[str, str]:
    """(certificate, key) files for 127.0.0.1, signed by nothing anyone trusts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    paths = (str(folder / "ca.pem"), str(folder / "key.pem"))
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def test_a_store_behind_a_private_ca_is_explained_then_read_with_aws_ca_bundle(tmp_path, monkeypatch):
    """pyarrow, which reads the work directory, does not read AWS_CA_BUNDLE itself: its
    refusal of the certificate said 'cannot reach the S3 endpoint: check the network'."""
    import http.server
    import ssl
    import threading

    class NoSuchKey(http.server.BaseHTTPRequestHandler):  # a store holding nothing
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):  # a listing: empty
            body = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/'
                    b'doc/2006-03-01/"><KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>')
            self.send_response(200)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ca, key = self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchKey)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"https://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    s3.filesystem_for.cache_clear()
    try:
        with pytest.raises(OSError) as refused:
            storage.exists("s3://private-ca/runs/config.yaml")
        assert "TLS certificate was refused: for a store whose certificate a private CA signed, set " \
               "AWS_CA_BUNDLE" in s3.explain(refused.value), refused.value
        monkeypatch.setenv("AWS_CA_BUNDLE", ca)
        s3.filesystem_for.cache_clear()
        assert storage.exists("s3://private-ca/runs/config.yaml") is False  # trusted: an answer
    finally:
        server.shutdown()
        s3.filesystem_for.cache_clear()


def test_an_endpoint_written_without_its_scheme_or_as_https_for_a_plain_store_says_how_to_write_it(
        s3_server, monkeypatch, tmp_path, capsys):
    """Both were told to set AWS_CA_BUNDLE, which fixes neither: pyarrow takes an address
    with no scheme as https://, and a store that answers in plain HTTP fails its handshake."""
    faces = s3_server("plain-http") + "/faces"
    address = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://")  # moto speaks plain HTTP
    prepare = ["prepare", "--preset", "tiny", "--source", faces, "--workdir", str(tmp_path / "w")]
    try:
        for endpoint in (f"https://{address}", address, f"bob:Pr0xy-Secret@{address}", f"http:/{address}",
                         f"http:/bob:Pr0xy-Secret@{address}"):
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            s3.filesystem_for.cache_clear()
            assert cli.main(prepare) == 2
            err = error_lines(capsys)
            assert len(err) == 1 and "CA_BUNDLE" not in err[0] and "Pr0xy-Secret" not in err[0], err
            if endpoint.startswith("https://"):
                assert err[0] == (f"deepfake-ray prepare: error: {faces}: the S3 endpoint {endpoint} answered "
                                  "in plain HTTP, not TLS: write its address with http://, not https:// "
                                  "(AWS_ENDPOINT_URL)")
            else:  # a password in it (some proxies take one) is never printed
                shown = endpoint.replace("bob:Pr0xy-Secret", "***")
                shown = shown.replace("http:/bob", "http:/***")  # the user too
                host = shown.removeprefix("http:/")  # a slash short: the address is what follows
                assert err[0] == (f"deepfake-ray prepare: error: the S3 endpoint '{shown}' (AWS_ENDPOINT_URL "
                                  f"or ~/.aws/config) has no scheme: write http://{host}, or "
                                  f"https://{host} for a store that speaks TLS")
        assert not os.path.exists(tmp_path / "w" / "config.yaml")  # refused before anything was written
    finally:
        s3.filesystem_for.cache_clear()


def test_an_endpoint_password_never_shows_in_a_store_error_or_a_traceback(monkeypatch, capsys):
    """botocore's connection errors quote the endpoint whole, password included: the lock's
    (an uncaught traceback) and every StoreError's text (a Ray task's log, the dashboard)."""
    import traceback

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://bob:Pr0xy-Secret@127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3.filesystem_for.cache_clear()
    try:
        for reach in (lambda: storage.write_bytes("s3://bucket/key", b"x"),
                      lambda: storage.exclusive("s3://bucket/w", "prepare").__enter__()):
            with pytest.raises(s3.StoreError) as failed:
                reach()
            told = "".join(traceback.format_exception(failed.value))  # as Ray logs a task's error
            assert "***@127.0.0.1:9" in str(failed.value) and "Pr0xy-Secret" not in told
    finally:
        s3.filesystem_for.cache_clear()
    assert s3.redacted('URL: "https://user:pa\'ss@host/b" and s3://bucket/a@b') == \
        'URL: "https://***@host/b" and s3://bucket/a@b'  # an @ in a key is no password


def test_a_filesystem_that_refuses_file_modes_still_takes_a_write_and_leaks_no_descriptor(tmp_path, monkeypatch):
    """vfat and exFAT refuse chmod (EPERM): every write failed with "give this user read and
    write permission there", which it has, and left its temporary file's descriptor open."""
    import errno

    def refused(fd, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    open_before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        storage.write_bytes(str(tmp_path / f"{i}.json"), b"{}")
    assert [(tmp_path / f"{i}.json").read_bytes() for i in range(3)] == [b"{}"] * 3
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("code,said", [
    ("ExpiredToken", "the AWS credentials have expired (a session token's): renew them"),
    ("QuotaExceeded", "the bucket's quota is full: free space there or raise its quota"),  # Ceph
    ("XMinioAdminBucketQuotaExceeded", "the bucket's quota is full")])
def test_expired_credentials_and_a_full_quota_are_one_line_with_their_fix(code, said):
    """A long training outlives an SSO session's credentials; MinIO and Ceph refuse writes
    past a bucket's quota: both ended in botocore's traceback and exit 1."""
    from botocore.exceptions import ClientError

    uri = "s3://b/runs/demo/detector/history.json"
    refused = ClientError({"Error": {"Code": code, "Message": "refused"}}, "PutObject")
    assert s3.explain(s3.store_error(uri, refused)).startswith(f"{uri}: {said}")
    # pyarrow (Ray Train's checkpoints, listings) has no name of its own for these: the
    # AWS SDK's exception name in its message is read
    unknown = OSError(f"When uploading part for key 'runs/demo/detector/history.json' in bucket 'b': AWS Error "
                      f"UNKNOWN (HTTP status 400) during UploadPart operation: Unable to parse ExceptionName: "
                      f"{code} Message: refused")
    assert s3.explain(unknown).startswith(f"{uri}: {said}")


def test_an_s3_filesystem_sent_to_ray_keeps_its_retries(s3_server):
    """pyarrow 26 pickles an S3 filesystem without its retry strategy: the one Ray Train
    writes checkpoints through, and Ray Data reads Parquet through, came back with the
    default (3 tries from a shared budget). Sent as Ray sends it (cloudpickle), it is made
    anew with ours, and still reads the store."""
    import pickle

    import cloudpickle

    uri = f"{s3_server('pickled-filesystem')}/runs/a.txt"
    storage.write_text(uri, "written")
    fs, path = storage.resolve(uri)
    sent = cloudpickle.dumps(fs)
    assert b"with_retries" in sent and b"with_retries" in pickle.dumps(fs)
    with pickle.loads(sent).open_input_file(path) as f:
        assert f.read() == b"written"


def test_s3_failures_that_pass_are_tried_again_and_the_stores_own_are_not(monkeypatch):
    """Throttling (SlowDown) while S3 splits a busy prefix, its 500s and 503s: a Ray Data
    task ended by one once the clients' own retries are spent runs again, where one such
    error failed an ingest of millions of files, which then started anew. A missing
    bucket or refused credentials are no better the second time."""
    import ray.data
    from botocore.exceptions import ClientError

    from deepfake_ray import runtime

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "retried_map_errors", False)
    monkeypatch.setattr(context, "max_map_retries", 0)
    runtime.configure_data()
    assert context.max_map_retries == 3

    from ray._common.retry import format_exception, matches_error  # how Ray Data matches them

    def retried(error: BaseException) -> bool:
        said = format_exception(error, include_cause=True)
        return any(matches_error(pattern, said) for pattern in context.retried_map_errors)

    def boto(code: str) -> BaseException:
        return s3.store_error("s3://b/faces/a.jpg", ClientError({"Error": {"Code": code, "Message": "m"}},
                                                                  "GetObject"))

    assert all(retried(boto(code)) for code in ("SlowDown", "ServiceUnavailable", "InternalError", "503"))
    assert retried(OSError("When reading 'faces/a.jpg' in bucket 'b': AWS Error SLOW_DOWN during GetObject"))
    assert not any(retried(boto(code)) for code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"))
    assert not retried(UsageError("data.resolution=7 is below 16: use 16 or more"))
    # a file whose name holds 500 or 503 is no server error
    assert not retried(s3.store_error("s3://b/faces/IMG_1500.jpg", ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "m"}}, "GetObject")))
    assert not retried(FileNotFoundError("s3://b/x/5031.jpg (500) (503)"))


def test_a_notebook_that_fixes_its_endpoint_reads_through_the_new_one(s3_server, monkeypatch):
    """pyarrow's filesystem was made once per process: after a command failed on a wrong
    AWS_ENDPOINT_URL, setting the right one in the kernel changed nothing for reads."""
    uri = f"{s3_server('endpoint-fixed')}/runs/a.txt"
    storage.write_text(uri, "written")
    right = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(OSError) as failed:
        storage.read_text(uri)
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in s3.explain(failed.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", right)
    assert storage.read_text(uri) == "written"


def test_a_write_on_macos_reaches_the_disk_itself_not_the_drives_cache(tmp_path, monkeypatch):
    """macOS's fsync leaves the bytes in the drive's cache, which a power cut may lose:
    there a write asks for F_FULLFSYNC (this machine is Linux: the call is recorded)."""
    import fcntl
    import sys

    flushed = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # its number on macOS
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, op, *a: flushed.append(op))
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    assert flushed == [51] and (tmp_path / "a.json").read_bytes() == b"{}"
