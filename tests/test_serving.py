"""Serving the registry's champion (issue 29, items 0 and 1), against real services: an `mlflow
server` (SQLite) with its artifacts on a moto S3 server, `tl serve` (Ray Serve on a local Ray) and
`mlflow models serve --env-manager local`, each started here on a free port of 127.0.0.1 and ended
here with every process it started, also when a test fails. Tiny real models, trained in-process
on sklearn:digits (images) and a slice of AG News (text). No mocks.

The README's "Serving" requests are read from the README itself and sent to both servers.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests import servers
from tests.conftest import ROOT, tl_error, tl_json
from tests.serve_tools import (AliasWatch, Client, b64, load, malformed_requests, mlflow_models_serve,
                               png_bytes, tl_serve)
from tl_core import registry
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.train import train

pytestmark = pytest.mark.slow
BUCKET = "tl-serving"
POLL_S = 0.5
MAX_BODY = 256 * 1024  # the fuzz's oversized bodies stay small


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    with servers.registry_services(root, BUCKET) as (s3, url):
        yield SimpleNamespace(s3=s3, url=url, root=root)


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def champion_of(name: str) -> int:
    return int(client().get_registered_model(name).aliases["champion"])


@pytest.fixture(scope="module")
def digits(services):
    """Three digit classifiers of rising quality: v1 the champion, v2 and v3 registered, waiting."""
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))

    def fit(**settings) -> str:
        return train(TrainConfig(data=data.path, eval_every=0, checkpoint_every=0, **settings)).checkpoint_uri

    checkpoints = [fit(epochs=2, model_kwargs={"width": 8}), fit(epochs=5, model_kwargs={"width": 16}),
                   fit(epochs=3, model_kwargs={"width": 16}, seed=1)]  # v3: set by hand, never gated
    name = "digits"
    versions = [registry.register_model(c, name, data.path)["version"] for c in checkpoints]
    assert registry.promote(name, data.path, version=versions[0], min_gain_over_scratch=-1)["promoted"]
    x, y = data.split("test")
    return SimpleNamespace(name=name, data=data, checkpoints=checkpoints, versions=versions, x=x, y=y)


@pytest.fixture(scope="module")
def text_model(services, shared_data):
    """A byte-level text CNN on a slice of AG News, registered and promoted."""
    from tests.test_text import small_agnews

    folder = small_agnews(str(shared_data), services.root / "agnews", train_per_class=40, test_per_class=10)
    data, _ = prepare(PrepareConfig(uri=f"tsv:{folder}", header=False))
    checkpoint = train(TrainConfig(data=data.path, model="text_cnn", epochs=3, eval_every=0,
                                   checkpoint_every=0)).checkpoint_uri
    name = "agnews"
    version = registry.register_model(checkpoint, name, data.path)["version"]
    assert registry.promote(name, data.path, version=version, min_accuracy=0.0, min_gain_over_scratch=-1)["promoted"]
    return SimpleNamespace(name=name, data=data, version=version)


# -- the README's requests ------------------------------------------------------------------------


def readme_requests() -> list[tuple[int, str, str]]:
    """(port, path, body) of every `curl ... -d '...'` in the README's Serving section, `$PNG`
    left in for the test to fill."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Serving"):]
    section = section[: section.index("\n## ", 1)]
    found = []
    for line in section.splitlines():
        m = re.match(r"curl -s (?:http://)?127\.0\.0\.1:(\d+)(/\S*) .*-d '(.*)'\s*(#.*)?$", line.strip())
        if m:
            found.append((int(m.group(1)), m.group(2), m.group(3)))
    return found


def fill(body: str, png: bytes) -> bytes:
    return body.replace("'$PNG'", b64(png)).encode()


def test_the_readme_shows_requests_for_both_servers_and_both_modalities():
    requests = readme_requests()
    ports = {port for port, _, _ in requests}
    assert ports == {8000, 5001}, requests
    assert any('"image"' in body for port, _, body in requests if port == 8000)
    assert any('"text"' in body for port, _, body in requests if port == 8000)
    assert any("$PNG" in body for port, _, body in requests if port == 5001)
    assert any('"text"' in body for port, _, body in requests if port == 5001)


@pytest.mark.timeout(600)
def test_mlflow_models_serve_answers_the_readme_requests(services, digits, text_model, tmp_path):
    """Item 0: the registered pyfunc served by MLflow's own scoring server, images and text, with
    the README's requests; the answers are the in-process pyfunc's."""
    import mlflow
    import pandas as pd

    image_model = mlflow.pyfunc.load_model(f"models:/{digits.name}@champion")
    png = png_bytes(digits.x[0])
    requests = [r for r in readme_requests() if r[0] == 5001]
    image_requests = [(path, fill(body, png)) for _, path, body in requests if '"text"' not in body]
    text_requests = [(path, body.encode()) for _, path, body in requests if '"text"' in body]
    assert len(image_requests) >= 2 and text_requests

    port = servers.free_port()
    with mlflow_models_serve(f"models:/{digits.name}@champion", port, tmp_path / "mlflow-serve.log") as server:
        c = Client(server.url)
        for path, body in image_requests:
            status, data = c.request("POST", path, body)
            assert status == 200, (body[:200], data[:2000], server.output()[-3000:])
            (row,) = json.loads(data)["predictions"]
            inputs = json.loads(body)["inputs"]
            expected = image_model.predict(np.array([png], dtype=object) if isinstance(inputs[0], str)
                                           else np.asarray(inputs, dtype=object))
            assert row["label"] == expected["label"][0], (row, expected)
            assert row["probability"] == pytest.approx(float(expected["probability"][0]), abs=1e-5)
            assert sum(row[f"p_{c}"] for c in digits.data.classes) == pytest.approx(1, abs=1e-4)
        # The README's pixel request is a handwritten 0, and the champion says so.
        pixels = next(json.loads(body) for _, body in image_requests if b"[[[" in body)
        assert json.loads(c.request("POST", "/invocations", json.dumps(pixels).encode())[1])["predictions"][0]["label"] == "0"
        # A batch of the test split's PNGs, base64: the accuracy the promotion measured on them.
        batch = {"inputs": [b64(png_bytes(img)) for img in digits.x[:200]]}
        status, data = c.request("POST", "/invocations", json.dumps(batch).encode())
        assert status == 200, data[:2000]
        labels = [digits.data.classes.index(r["label"]) for r in json.loads(data)["predictions"]]
        direct = image_model.predict(digits.x[:200])["label"].map(digits.data.classes.index).to_numpy()
        assert (np.array(labels) == direct).all()
        # Bad input is a 400 with MLflow's error, not a crash.
        status, data = c.request("POST", "/invocations", b'{"inputs": ["not base64!"]}')
        assert status == 400 and b"not base64" in data, data[:500]
        # The README's text request, sent to this image model by mistake: the error says so.
        status, data = c.request("POST", *text_requests[0])
        assert status == 400 and b"classifies images, not texts" in data, data[:3000]
        assert c.request("GET", "/ping")[0] == 200
    assert not server.left_behind, server.left_behind

    text = mlflow.pyfunc.load_model(f"models:/{text_model.name}@champion")
    port = servers.free_port()
    with mlflow_models_serve(f"models:/{text_model.name}@champion", port, tmp_path / "mlflow-text.log") as server:
        c = Client(server.url)
        for path, body in text_requests + [("/invocations", b'{"inputs": ["Stocks slump as oil prices jump"]}')]:
            status, data = c.request("POST", path, body)
            assert status == 200, (body, data[:2000], server.output()[-3000:])
            (row,) = json.loads(data)["predictions"]
            expected = text.predict(pd.DataFrame({"text": ["Stocks slump as oil prices jump"]}))
            assert row["label"] == expected["label"][0]
            assert set(row) == {"label", "probability", *[f"p_{c}" for c in text_model.data.classes]}
    assert not server.left_behind, server.left_behind


# -- tl serve --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(services, digits):
    """`tl serve digits` on a free port of 127.0.0.1: one local Ray for the module's tests."""
    port = servers.free_port()
    with tl_serve(digits.name, port, services.root / "tl-serve.log", "--poll-s", POLL_S,
                  "--max-body-bytes", MAX_BODY, "--max-batch-size", 16) as server:
        yield server
    assert not server.left_behind, f"tl serve left processes behind: {server.left_behind}"


def predict(c: Client, png: bytes) -> tuple[int, dict]:
    status, data = c.request("POST", "/predict", json.dumps({"image": b64(png)}).encode())
    return status, json.loads(data)


@pytest.mark.timeout(600)
def test_tl_serve_answers_images_with_class_probabilities_and_version(served, digits):
    import mlflow

    c = Client(served.url)
    status, health = c.request("GET", "/healthz")
    assert status == 200 and json.loads(health) == {"status": "ok", "model": digits.name, "version": 1}
    status, version = c.request("GET", "/version")
    info = json.loads(version)
    assert status == 200 and info["version"] == 1 and info["alias"] == "champion" and info["input"] == "image"
    assert info["checkpoint_sha256"] == client().get_model_version(digits.name, "1").tags["tl.checkpoint_sha256"]
    assert info["classes"] == digits.data.classes and info["refused"] == []
    # The service's answers are the registered pyfunc's, on the same PNG bytes.
    model = mlflow.pyfunc.load_model(f"models:/{digits.name}/1")
    pngs = [png_bytes(img) for img in digits.x[:60]]
    expected = model.predict(np.array(pngs, dtype=object))
    for png, (label, p) in zip(pngs, zip(expected["label"], expected["probability"])):
        status, answer = predict(c, png)
        assert status == 200, answer
        assert answer["class"] == label and answer["model"] == digits.name and answer["version"] == 1
        assert set(answer["probabilities"]) == set(digits.data.classes)
        assert answer["probabilities"][label] == pytest.approx(p, abs=1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    # JPEG too, and the README's request as written.
    status, answer = predict(c, png_bytes(digits.x[0], "JPEG"))
    assert status == 200 and answer["class"] in digits.data.classes
    for port, path, body in readme_requests():
        if port == 8000 and '"image"' in body:
            status, data = c.request("POST", path, fill(body, pngs[0]))
            assert status == 200 and json.loads(data)["class"] == expected["label"][0], data
    # Concurrent requests are batched (a batch of several answers at once) and all answered.
    results = load(served.url, "/predict", lambda i: json.dumps({"image": b64(pngs[i % len(pngs)])}).encode(),
                   clients=8, requests=400, version_of=lambda a: a["version"])
    assert [r.status for r in results] == [200] * 400


@pytest.mark.timeout(600)
def test_a_fuzz_of_malformed_requests_gets_4xx_json_errors_and_the_server_stays_up(served, digits):
    c = Client(served.url)
    png = png_bytes(digits.x[0])
    before = json.loads(c.request("GET", "/version")[1])
    cases = malformed_requests(png, MAX_BODY, seed=0)
    assert len(cases) >= 100
    answers = {}
    for case in cases:
        status, data = Client(served.url).request(case.method, case.path, case.body, case.headers)
        answers[case.name] = (status, data[:300])
        assert 400 <= status < 500, (case.name, status, data[:500], served.output()[-3000:])
        doc = json.loads(data)
        assert isinstance(doc.get("error"), str) and doc["error"], (case.name, doc)
    assert answers["a body over max_body_bytes"][0] == 413
    assert answers["GET /predict"][0] == 405 and answers["unknown path"][0] == 404
    assert b"classifies images, not texts" in answers["a text to an image model"][1]
    # Still up, the same replica (never restarted), answering.
    assert served.proc.poll() is None
    status, answer = predict(c, png)
    assert status == 200 and answer["version"] == before["version"]
    assert json.loads(c.request("GET", "/version")[1])["loaded_at"] == before["loaded_at"]
    assert "Traceback" not in served.output()


def switch_under_load(served, digits, action, expected_version: int) -> dict:
    """Run `action` (a tl command) while 4 clients send requests; returns the requests, the failed
    ones, and the seconds from the alias's move (an upper bound: from the last look at the
    registry that still saw the old version) to the first answer of `expected_version`."""
    pngs = [json.dumps({"image": b64(png_bytes(img))}).encode() for img in digits.x[:50]]
    stop = threading.Event()
    results = []
    runner = threading.Thread(target=lambda: results.extend(
        load(served.url, "/predict", lambda i: pngs[i % len(pngs)], clients=4, stop=stop,
             version_of=lambda a: a["version"])), daemon=True)
    watch = AliasWatch(digits.name)
    runner.start()
    try:
        time.sleep(2)
        started = time.perf_counter()
        outcome = action()
        ended = time.perf_counter()
        deadline = ended + 15
        while time.perf_counter() < deadline:
            if json.loads(Client(served.url).request("GET", "/version")[1])["version"] == expected_version:
                break
            time.sleep(0.1)
        time.sleep(1.5)  # requests after the switch, on the new version
    finally:
        stop.set()
        runner.join(60)
        watch.stop()
    moved = watch.moved_to(expected_version, started)
    first_new = min((r.start + r.seconds for r in results if r.version == expected_version and r.start >= started),
                    default=None)
    return {"outcome": outcome, "requests": len(results), "failed": [r for r in results if r.status != 200],
            "from_alias_move": None if first_new is None or moved is None else first_new - moved,
            "from_command_start": None if first_new is None else first_new - started,
            "versions": sorted({r.version for r in results if r.version is not None}),
            "last_version": results[-1].version if results else None}


@pytest.mark.timeout(600)
def test_a_promotion_and_a_rollback_reach_the_service_under_load_with_no_failed_request(served, digits):
    champion = champion_of(digits.name)
    new = digits.versions[1]
    promoted = switch_under_load(served, digits, lambda: tl_json(
        "promote", "--model", digits.name, "--data", digits.data.path, "--version", new,
        "--min-gain-over-scratch", -1), new)
    assert promoted["outcome"]["decision"] == "promoted", promoted["outcome"]
    assert promoted["failed"] == [], promoted["failed"][:5]
    assert promoted["requests"] > 50 and promoted["versions"] == [champion, new]
    assert promoted["last_version"] == new
    # The new champion answered within 10 s of the alias's move (the gate's evaluation comes before it).
    assert promoted["from_alias_move"] is not None and promoted["from_alias_move"] < 10, promoted

    back = switch_under_load(served, digits, lambda: tl_json("rollback", "--model", digits.name), champion)
    assert back["outcome"]["champion"] == champion
    assert back["failed"] == [], back["failed"][:5]
    assert back["last_version"] == champion and back["from_alias_move"] < 10, back
    assert "now serving version" in served.output()


@pytest.mark.timeout(600)
def test_a_checkpoint_that_fails_its_integrity_check_is_refused_and_the_old_model_keeps_serving(
        served, digits, services):
    """The champion alias set by hand to a version whose stored checkpoint has a flipped byte (no
    promotion would pass it): refused, logged, the previous version goes on answering; the alias
    moved back and forth again, it is looked at again."""
    import boto3

    from tests.test_registry import flip_middle_byte

    s3 = boto3.client("s3", endpoint_url=services.s3, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bad = digits.versions[2]
    source = client().get_model_version(digits.name, str(bad)).source
    model_id = source.rstrip("/").split("/")[-1]
    (key,) = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
              for o in page.get("Contents", []) if model_id in o["Key"] and o["Key"].endswith("/checkpoint.pt")]
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=flip_middle_byte(original))
    good = champion_of(digits.name)
    c = Client(served.url)
    try:
        client().set_registered_model_alias(digits.name, "champion", bad)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = json.loads(c.request("GET", "/version")[1])
            if info["refused"]:
                break
            status, answer = predict(c, png_bytes(digits.x[1]))
            assert status == 200 and answer["version"] == good, answer
            time.sleep(0.2)
        assert info["version"] == good, info
        assert [r["version"] for r in info["refused"]] == [bad] and "corrupt" in info["refused"][0]["reason"], info
        for img in digits.x[:20]:  # the old model keeps serving, and is not asked to load it again
            status, answer = predict(c, png_bytes(img))
            assert status == 200 and answer["version"] == good
        assert served.output().count(f"REFUSED version {bad} of {digits.name}") == 1, served.output()[-3000:]
        assert "is corrupt" in served.output()
    finally:
        s3.put_object(Bucket=BUCKET, Key=key, Body=original)
        client().set_registered_model_alias(digits.name, "champion", good)
    # Repaired, and the alias moved away (seen by the replica: the refusal is forgotten) and back: now it loads.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and json.loads(c.request("GET", "/version")[1])["refused"]:
        time.sleep(0.2)
    assert json.loads(c.request("GET", "/version")[1])["refused"] == []
    client().set_registered_model_alias(digits.name, "champion", bad)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and predict(c, png_bytes(digits.x[1]))[1]["version"] != bad:
        time.sleep(0.2)
    assert predict(c, png_bytes(digits.x[1]))[1]["version"] == bad
    client().set_registered_model_alias(digits.name, "champion", good)


# -- tl serve on text, and bad input to the command --------------------------------------------------


@pytest.mark.timeout(600)
def test_tl_serve_answers_text_and_refuses_images_for_a_text_model(services, text_model, digits, tmp_path):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{text_model.name}@champion")
    texts = ["Stocks slump as oil prices jump", "Federer wins the Wimbledon final", "NASA launches a new Mars probe"]
    expected = model.predict(pd.DataFrame({"text": texts}))
    port = servers.free_port()
    with tl_serve(text_model.name, port, tmp_path / "tl-serve-text.log", "--max-batch-size", 4) as server:
        c = Client(server.url)
        for text, label in zip(texts, expected["label"]):
            status, answer = c.post_json("/predict", {"text": text})
            assert status == 200 and answer["class"] == label and answer["version"] == text_model.version, answer
            assert set(answer["probabilities"]) == set(text_model.data.classes)
        for _, path, body in [r for r in readme_requests() if r[0] == 8000 and '"text"' in r[2]]:
            status, data = c.request("POST", path, body.encode())
            assert status == 200 and json.loads(data)["class"] in text_model.data.classes
        status, answer = c.post_json("/predict", {"image": b64(png_bytes(digits.x[0]))})
        assert status == 400 and "classifies texts, not images" in answer["error"]
        status, answer = c.post_json("/predict", {"text": ""})  # an empty text is a text
        assert status == 200
        assert json.loads(c.request("GET", "/version")[1])["input"] == "text"
    assert not server.left_behind, server.left_behind


def test_bad_input_to_tl_serve_is_one_error_line(services, digits):
    assert "no registered model named 'nope'" in tl_error("serve", "nope")
    assert "has no alias 'staging'" in tl_error("serve", digits.name, "--alias", "staging")
    assert "poll_s" in tl_error("serve", digits.name, "--poll-s", 60)
    assert "port" in tl_error("serve", digits.name, "--port", 0)
    assert "name" in tl_error("serve", "a/b")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = tl_error("serve", digits.name, "--port", port)
        assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_a_port_a_server_closed_a_moment_ago_is_free_again():
    # A stopped server leaves its closed connections waiting (TIME_WAIT) for a minute; tl serve
    # started again on its port must not call it taken (a listener still is, above).
    from tl_core.serving import _port_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's proxy (uvicorn) binds
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server's side closes first: its end waits
            client.recv(1)
    _port_free("127.0.0.1", port)


def test_the_settings_reach_the_replicas_as_their_user_config():
    from tl_core.config import ServeConfig
    from tl_core.serving import RELOADED, application, build_app

    app = application(ServeConfig(name="digits", max_batch_size=7, poll_s=2), "http://127.0.0.1:1")
    deployment = app._bound_deployment
    assert deployment.user_config == {"name": "digits", "alias": "champion", "max_batch_size": 7,
                                      "batch_wait_s": 0.005, "poll_s": 2.0, "max_body_bytes": 8 * 1024**2,
                                      "tracking_uri": "http://127.0.0.1:1"}
    assert set(RELOADED) <= set(ServeConfig.model_fields)
    # A RayService or `serve run` passes the same fields as `args:`, through Serve's own builder call.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    built = call_user_app_builder_with_args_if_necessary(build_app, {"name": "digits", "replicas": 2})
    assert built._bound_deployment.num_replicas == 2
    with pytest.raises(Exception, match="max_batch_size"):
        build_app({"name": "digits", "max_batch_size": 0})
