"""The model registry against real services: an `mlflow server` (SQLite) whose artifacts go to a
moto S3 server, driven through `MLFLOW_TRACKING_URI` and the `tl` CLI. Tiny real models are
trained in-process on sklearn:digits. No mocks."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests import servers
from tests.conftest import tl, tl_error, tl_json
from tl_core import registry
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.errors import UserError
from tl_core.train import train

BUCKET = "tl-registry"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with servers.registry_services(root, BUCKET) as (s3, url):
        yield SimpleNamespace(s3=s3, url=url)


@pytest.fixture(scope="module")
def models(services):
    """Prepared digits and checkpoints of known quality (seeded, a few seconds in all)."""
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))

    def fit(**settings) -> str:
        return train(TrainConfig(data=data.path, eval_every=0, checkpoint_every=0, **settings)).checkpoint_uri

    return SimpleNamespace(
        data=data,
        weak=fit(epochs=1, shots=1),  # about 0.2: below the floor
        fair=fit(epochs=3, model_kwargs={"width": 8}),  # about 0.8
        good=fit(epochs=6, model_kwargs={"width": 16}),  # about 0.97
        good2=fit(epochs=4, model_kwargs={"width": 16}, seed=1),
    )


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def champion_of(name: str) -> int | None:
    version = client().get_registered_model(name).aliases.get("champion")
    return int(version) if version else None


def test_register_promote_refuse_rollback(models):
    name, data = "digits", models.data.path

    weak = tl_json("register", "--checkpoint", models.weak, "--name", name, "--data", data)
    assert weak["version"] == 1 and weak["alias"] == "challenger"
    tags = client().get_model_version(name, "1").tags
    assert tags["tl.data_hash"] == models.data.hash and tags["tl.strategy"] == "scratch"
    assert json.loads(tags["tl.config"])["shots"] == 1 and tags["tl.backbone_uri"] == "none"
    assert len(tags["tl.checkpoint_sha256"]) == 64 and len(tags.get("tl.git_commit", "0" * 40)) == 40
    assert client().get_registered_model(name).aliases == {"challenger": "1"}

    # No champion yet, but below the floor: refused, and no champion is made.
    refused = tl_json("promote", "--model", name, "--data", data, "--min-accuracy", 0.5)
    assert refused["decision"] == "refused" and refused["accuracy"] < 0.5
    assert "threshold" in refused["reason"] and champion_of(name) is None

    tl_json("register", "--checkpoint", models.fair, "--name", name)
    first = tl_json("promote", "--model", name, "--data", data)
    assert first["decision"] == "promoted" and first["version"] == 2 and first["champion_version"] is None
    assert champion_of(name) == 2
    assert "challenger" not in client().get_registered_model(name).aliases  # decided

    tl_json("register", "--checkpoint", models.good, "--name", name)
    better = tl_json("promote", "--model", name, "--data", data, "--min-delta", 0.05)
    assert better["decision"] == "promoted" and champion_of(name) == 3
    assert better["accuracy"] >= better["champion_accuracy"] + 0.05
    assert client().get_model_version(name, "3").tags[registry.PREVIOUS_CHAMPION] == "2"

    # Above the floor but worse than the champion: refused, the champion stays, all recorded.
    tl_json("register", "--checkpoint", models.fair, "--name", name)
    worse = tl("promote", "--model", name, "--data", data)  # as a person reads it
    assert worse.exit_code == 0 and worse.stdout.startswith(f"refused: {name} v4 accuracy 0.")
    assert f"vs champion v3 {better['accuracy']:.4f}" in worse.stdout and champion_of(name) == 3
    tags = client().get_model_version(name, "4").tags
    assert tags[registry.DECISION] == "refused" and tags["tl.promotion.champion_version"] == "3"
    assert 0.5 < float(tags["tl.promotion.accuracy"]) < better["accuracy"]
    assert float(tags["tl.promotion.champion_accuracy"]) == pytest.approx(better["accuracy"], abs=1e-6)
    assert tags["tl.promotion.data_hash"] == models.data.hash
    assert client().get_model_version(name, "3").tags[registry.DECISION] == "promoted"

    back = tl("rollback", "--model", name)
    assert back.exit_code == 0 and "champion is version 2 again (was 3)" in back.stdout and champion_of(name) == 2
    assert "replaced by version 2" in client().get_model_version(name, "3").tags["tl.rolled_back"]
    assert "first champion" in tl_error("rollback", "--model", name)  # version 2 replaced nobody
    assert champion_of(name) == 2
    # Promoted again, version 3 no longer says it was rolled back from.
    again = tl_json("promote", "--model", name, "--data", data, "--version", 3)
    assert again["decision"] == "promoted" and champion_of(name) == 3
    assert "tl.rolled_back" not in client().get_model_version(name, "3").tags


def test_register_and_promote_are_safe_to_run_again(models):
    """What a KFP retry after a crash does: the same register or promote again changes nothing."""
    name, data = "digits-retried", models.data.path
    first = tl_json("register", "--checkpoint", models.good, "--name", name, "--data", data)
    again = tl_json("register", "--checkpoint", models.good, "--name", name, "--data", data)
    assert first["version"] == again["version"] == 1 and not first["reused"] and again["reused"]
    assert len(client().search_model_versions(f"name='{name}'")) == 1
    promoted = tl_json("promote", "--model", name, "--data", data, "--version", 1)
    retried = tl_json("promote", "--model", name, "--data", data, "--version", 1)
    assert promoted["decision"] == retried["decision"] == "promoted" and "already the champion" in retried["reason"]
    assert retried["accuracy"] == pytest.approx(promoted["accuracy"], abs=1e-6) and champion_of(name) == 1
    # Once judged, the same checkpoint registered again is a new version, for a new judgement.
    third = tl_json("register", "--checkpoint", models.good, "--name", name)
    assert third["version"] == 2 and not third["reused"]


def test_register_from_a_training_run_keeps_its_lineage(models):
    from tl_core import tracking
    from tl_core.checkpoints import load_checkpoint

    # A transfer from a backbone, its checkpoint logged into its run as `tl transfer` does.
    probe = train(TrainConfig(data=models.data.path, strategy="linear-probe", backbone=models.fair, epochs=1, shots=5,
                              eval_every=0, checkpoint_every=0))
    with tracking.run("transfer linear-probe") as run:
        tracking.log_bytes(Path(probe.checkpoint_uri).read_bytes(), "checkpoint.pt", artifact_path="checkpoint")
    uri = f"runs:/{run.info.run_id}/checkpoint/checkpoint.pt"

    registered = tl_json("register", "--checkpoint", uri, "--name", "digits-lineage")
    version = client().get_model_version("digits-lineage", str(registered["version"]))
    assert version.run_id == run.info.run_id == registered["run_id"]  # the model sits in its training run
    assert version.tags["tl.strategy"] == "linear-probe" and version.tags["tl.backbone_uri"] == models.fair
    assert version.tags["tl.backbone_sha256"] == load_checkpoint(models.fair)["sha256"]
    assert version.tags["tl.checkpoint_sha256"] == probe.checkpoint["sha256"]


def test_two_promotions_at_once_one_wins(models):
    name, data = "digits-race", models.data.path
    registry.register_model(models.fair, name)
    registry.promote(name, data)
    contenders = [registry.register_model(models.good, name)["version"], registry.register_model(models.good2, name)["version"]]

    results, errors = {}, []

    def run(version):
        try:
            results[version] = registry.promote(name, data, version=version)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(v,)) for v in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2
    decisions = sorted(r["decision"] for r in results.values())
    assert decisions == ["lost", "promoted"], results
    winner = next(v for v, r in results.items() if r["decision"] == "promoted")
    loser = next(v for v, r in results.items() if r["decision"] == "lost")
    assert champion_of(name) == winner and results[loser]["champion_now"] == winner
    assert "another promotion" in results[loser]["reason"]
    assert client().get_model_version(name, str(loser)).tags[registry.DECISION] == "lost"
    assert not any(m.name.endswith(registry.LOCK_SUFFIX) for m in client().search_registered_models())  # released


def test_lock_excludes_and_stale_lock_is_taken_over(services):
    name = "digits-lock"
    c = client()
    with registry.promotion_lock(c, name):
        started = time.monotonic()
        with pytest.raises(UserError, match="another promotion or rollback"), registry.promotion_lock(c, name, wait_seconds=1):
            pass
        assert time.monotonic() - started < 10
    # A lock left by a crashed promotion long ago does not block forever.
    c.create_registered_model(name + registry.LOCK_SUFFIX, tags={"tl.locked_at": str(time.time() - 3600)})
    with registry.promotion_lock(c, name, wait_seconds=1):
        pass
    assert not c.search_registered_models(filter_string=f"name = '{name}{registry.LOCK_SUFFIX}'")


def test_gate_follows_mlflow_metric_threshold():
    gate = registry.check_gate
    assert gate(0.6, None, 0.5, 0.0, 0.0)[0]  # no champion: the floor alone
    assert not gate(0.4, None, 0.5, 0.0, 0.0)[0]
    assert gate(0.90, 0.90, 0.5, 0.0, 0.0)[0]  # as good: allowed by default
    assert not gate(0.89, 0.90, 0.5, 0.0, 0.0)[0]  # worse never passes
    assert not gate(0.92, 0.90, 0.5, 0.05, 0.0)[0] and gate(0.96, 0.90, 0.5, 0.05, 0.0)[0]  # absolute change
    assert not gate(0.92, 0.90, 0.5, 0.0, 0.05)[0] and gate(0.95, 0.90, 0.5, 0.0, 0.05)[0]  # relative change
    assert "threshold" in gate(0.4, 0.3, 0.5, 0.0, 0.0)[1]


@pytest.fixture(scope="module")
def served(models):
    """A model registered and promoted to champion: what a serving job loads."""
    name = "digits-served"
    registered = registry.register_model(models.good, name, models.data.path)
    promoted = registry.promote(name, models.data.path)
    assert promoted["decision"] == "promoted"
    return SimpleNamespace(name=name, registered=registered, promoted=promoted)


def test_champion_predicts_on_raw_images(models, served):
    import mlflow
    from PIL import Image
    from sklearn.datasets import load_digits

    model = mlflow.pyfunc.load_model(f"models:/{served.name}@champion")
    x, y = models.data.split("test")  # uint8, N x 1 x 8 x 8
    classes = models.data.classes
    out = model.predict(x)
    assert list(out.columns) == ["label", "probability", *[f"p_{c}" for c in classes]]
    assert np.allclose(out[[f"p_{c}" for c in classes]].sum(axis=1), 1, atol=1e-4)
    labels = out["label"].map(classes.index).to_numpy()
    assert (labels == y).mean() == pytest.approx(served.promoted["accuracy"], abs=1e-6)
    assert (labels == y).mean() > 0.9  # chance is 0.1
    # The same images as floats in [0, 1] without a channel axis: the same answers.
    assert (model.predict(x[:, 0] / 255.0)["label"] == out["label"]).all()
    # scikit-learn's raw digits: float counts 0..16, N x 8 x 8.
    digits = load_digits()
    raw = model.predict(digits.images)["label"].map(classes.index).to_numpy()
    assert (raw == digits.target).mean() > 0.9
    # Upscaled to 16 x 16, grey and as RGB (N x H x W x C): resized back as in training.
    big = np.stack([np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR)) for img in x[:, 0]])
    assert (model.predict(big)["label"].map(classes.index).to_numpy() == y).mean() > 0.85
    rgb = np.repeat(big[..., None], 3, axis=-1)
    assert (model.predict(rgb)["label"] == model.predict(big)["label"]).all()


def test_evaluate_and_checkpoint_load_by_alias(models, served):
    from tl_core.checkpoints import load_checkpoint

    ckpt = load_checkpoint(f"models:/{served.name}@champion")
    assert ckpt["sha256"] == served.registered["tags"]["tl.checkpoint_sha256"]
    result = tl_json("evaluate", "--model", f"models:/{served.name}@champion", "--data", models.data.path)
    assert result["metrics"]["accuracy"] == pytest.approx(served.promoted["accuracy"], abs=1e-6)


def test_model_artifacts_are_in_s3(services, served):
    import boto3

    s3 = boto3.client("s3", endpoint_url=services.s3, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
            for o in page.get("Contents", [])]
    model_id = served.registered["model_uri"].split("/")[-1]
    mine = [k for k in keys if model_id in k]
    assert any(k.endswith("/MLmodel") for k in mine), mine
    assert any(k.endswith(".py") for k in mine), mine  # the wrapper's source, not a pickle
    assert not any(k.endswith((".pkl", ".cloudpickle")) for k in mine), mine
    checkpoint = next(k for k in mine if k.endswith("/checkpoint.pt"))
    assert s3.get_object(Bucket=BUCKET, Key=checkpoint)["Body"].read() == Path(served.registered["checkpoint"]).read_bytes()


def flip_middle_byte(raw: bytes) -> bytes:
    damaged = bytearray(raw)
    damaged[len(damaged) // 2] ^= 0x01  # inside the weights: torch.load alone does not notice
    return bytes(damaged)


def test_a_damaged_copy_of_a_checkpoint_is_refused_wherever_it_is_read(services, models, monkeypatch):
    """No .sha256 file travels with the registry's copy or an S3 copy: the digest inside the
    checkpoint refuses them, naming the copy, in evaluate, transfer, promote and the pyfunc."""
    import boto3
    import mlflow

    s3 = boto3.client("s3", endpoint_url=services.s3, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    name = "digits-damaged"
    reg = registry.register_model(models.fair, name, models.data.path)
    model_id = reg["model_uri"].split("/")[-1]
    (key,) = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
              for o in page.get("Contents", []) if model_id in o["Key"] and o["Key"].endswith("/checkpoint.pt")]
    s3.put_object(Bucket=BUCKET, Key=key, Body=flip_middle_byte(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))

    version = f"models:/{name}/{reg['version']}"
    data = models.data.path
    assert f"checkpoint {version} is corrupt" in tl_error("evaluate", "--model", version, "--data", data)
    assert f"checkpoint {version} is corrupt" in tl_error("transfer", "--data", data, "--backbone", version, "--no-baseline", "--epochs", 1)
    assert "is corrupt" in tl_error("promote", "--model", name, "--data", data)
    assert champion_of(name) is None  # nothing promoted
    with pytest.raises(Exception, match="is corrupt"):
        mlflow.pyfunc.load_model(f"models:/{name}@challenger")

    # A copy on S3 made without its .sha256 (aws s3 cp of the .pt alone).
    copy = f"s3://{BUCKET}/copies/checkpoint.pt"
    s3.put_object(Bucket=BUCKET, Key="copies/checkpoint.pt", Body=flip_middle_byte(Path(models.good).read_bytes()))
    monkeypatch.setenv("AWS_ENDPOINT_URL", services.s3)
    for name, value in servers.S3_ENV.items():
        monkeypatch.setenv(name, value)
    assert f"checkpoint {copy} is corrupt" in tl_error("evaluate", "--model", copy, "--data", data)


def test_bad_input(models, served):
    data = models.data.path
    assert "no registered model named 'nope'" in tl_error("promote", "--model", "nope", "--data", data)
    assert "no registered model" in tl_error("rollback", "--model", "nope")
    # The served model's challenger was decided: nothing waits for promotion.
    assert "has no challenger" in tl_error("promote", "--model", served.name, "--data", data)
    assert "between 0 and 1" in tl_error("promote", "--model", served.name, "--data", data, "--min-accuracy", 2)

    three, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["0", "1", "2"]))
    # Registering against data with other classes stops before anything is written.
    assert "has 3" in tl_error("register", "--checkpoint", models.good, "--name", "digits-other", "--data", three.path)
    assert not client().search_registered_models(filter_string="name = 'digits-other'")
    # Promoting on such data: refused as bad input, the champion untouched.
    champion = champion_of(served.name)
    tl_json("register", "--checkpoint", models.fair, "--name", served.name)
    line = tl_error("promote", "--model", served.name, "--data", three.path)
    assert "classes" in line and three.path in line
    assert champion_of(served.name) == champion


def test_tracking_server_down(models, monkeypatch):
    port = servers.free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for args in (["register", "--checkpoint", models.good, "--name", "digits"],
                 ["promote", "--model", "digits", "--data", models.data.path],
                 ["rollback", "--model", "digits"]):
        started = time.monotonic()
        line = tl_error(*args)
        assert time.monotonic() - started < 30, args
        assert "cannot reach the MLflow tracking store" in line and str(port) in line
        # The default retries (tracking._bounded_retries: about 15 s of backoff) are timed once,
        # above; the other commands need only their error line, so they try once.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_the_gate_never_promotes_a_negative_transfer_and_says_why(models, tmp_path):
    """`tl promote --min-gain-over-scratch` (default 0): the challenger must beat its scratch
    baseline, the same model trained from random init on the same labels. A linear probe of a
    backbone pretrained on shuffled labels (features that carry nothing) loses to it: refused,
    the decision tag says so, even with no champion; -1 turns the comparison off."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "shuffled.npz", x=digits.images, y=np.random.default_rng(0).permutation(digits.target))
    shuffled, _ = prepare(PrepareConfig(uri=f"npz:{tmp_path / 'shuffled.npz'}"))
    noise = train(TrainConfig(data=shuffled.path, epochs=15, eval_every=0, checkpoint_every=0))
    probe = train(TrainConfig(data=models.data.path, strategy="linear-probe", backbone=noise.checkpoint_uri, shots=10,
                              epochs=60, eval_every=0, checkpoint_every=0))
    name, data = "digits-negative", models.data.path
    tl_json("register", "--checkpoint", probe.checkpoint_uri, "--name", name)
    refused = tl_json("promote", "--model", name, "--data", data, "--min-accuracy", 0.1)
    assert refused["decision"] == "refused" and refused["reason"].startswith("negative transfer"), refused
    assert refused["accuracy"] < refused["scratch_accuracy"] and champion_of(name) is None
    tags = client().get_model_version(name, "1").tags
    assert tags[registry.DECISION] == "refused" and tags["tl.promotion.reason"].startswith("negative transfer")
    assert float(tags["tl.promotion.scratch_accuracy"]) == pytest.approx(refused["scratch_accuracy"], abs=1e-6)
    assert json.loads(tags["tl.promotion.gate"])["min_gain_over_scratch"] == 0.0

    allowed = tl_json("promote", "--model", name, "--data", data, "--min-accuracy", 0.1, "--version", 1,
                      "--min-gain-over-scratch", -1)
    assert allowed["decision"] == "promoted" and allowed["scratch_accuracy"] is None and champion_of(name) == 1
    assert "between -1 and 1" in tl_error("promote", "--model", name, "--data", data, "--min-gain-over-scratch", 2)


@pytest.mark.timeout(240)
def test_a_run_against_a_tracking_server_prints_tls_lines_only(models, services):
    """MLflow prints "View run ... / View experiment ..." at the end of every run against a
    server: 48 lines for the demo's tl run. tl says what it made itself."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"}  # as a shell has it
    env["MLFLOW_TRACKING_URI"] = services.url
    done = subprocess.run([servers.BIN / "tl", "evaluate", "--model", models.good, "--data", models.data.path],
                          capture_output=True, text=True, env=env, timeout=100)
    assert done.returncode == 0 and done.stdout.startswith("accuracy 0."), done.stdout[-2000:] + done.stderr[-2000:]
    assert "View run" not in done.stdout and len(done.stdout.strip().splitlines()) == 1, done.stdout
    # A registered model's files come down with no progress bar into a log (stderr is a pipe here).
    version = registry.register_model(models.good, "quiet-download", models.data.path)["version"]
    done = subprocess.run([servers.BIN / "tl", "evaluate", "--model", f"models:/quiet-download/{version}", "--data",
                           models.data.path], capture_output=True, text=True, env=env, timeout=100)
    assert done.returncode == 0 and "Downloading artifacts" not in done.stderr, done.stderr[-2000:]
