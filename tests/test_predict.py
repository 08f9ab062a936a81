"""`tl predict`: batch inference on Ray Data (an actor pool over the shards of a prepared dataset),
against real services: a local Ray, an `mlflow server` whose artifacts go to a moto S3 server, and
moto S3 as the output. A small CNN trained in-process on MNIST at 16 x 16. No mocks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests import servers
from tests.conftest import tl, tl_error, tl_json

BUCKET = "tl-predict"


@pytest.fixture(scope="module")
def trained(module_workdir, shared_data):
    """MNIST's test images at 16 x 16 in small shards (about 390 images each: 18 train and 8 test
    shards, so a prediction has many blocks), and a small CNN trained on them for one epoch."""
    import ray

    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare, shards
    from tl_core.train import train

    mp = pytest.MonkeyPatch()
    mp.setattr(shards, "SHARD_BYTES", 100_000)
    mp.setenv("RAY_AUTH_MODE", "disabled")
    try:
        data, _ = prepare(PrepareConfig(uri=f"idx:{shared_data / 'mnist-test'}", image_size=16))
        result = train(TrainConfig(data=data.path, epochs=1, batch_size=128, eval_every=0, checkpoint_every=0))
        yield SimpleNamespace(data=data, checkpoint=result.checkpoint_uri, root=module_workdir,
                              mnist=f"idx:{shared_data / 'mnist-test'}")
    finally:
        ray.shutdown()  # the local Ray the predictions started in this process
        mp.undo()


def read_parts(folder: Path) -> "pyarrow.Table":  # noqa: F821
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


@pytest.mark.timeout(420)  # with the module's fixture: MNIST prepared, a model trained
def test_predictions_on_the_prepared_set_score_what_tl_evaluate_scores(trained, tmp_path):
    out = tmp_path / "preds"
    # As many actors as the local Ray has CPUs: their pool once took every CPU and left none to
    # Ray Data's reads, and the command waited forever (batch.actor_cpus).
    result = tl("predict", "--model", trained.checkpoint, "--data", trained.data.path, "--split", "test",
                "--output", out, "--batch-size", 256, "--actors", os.cpu_count(), "--json")
    assert result.exit_code == 0, result.output[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # tl's own lines, not Ray Data's INFO lines on each dataset's plan and progress (its log file has them)
    assert "part 1/8" in result.output and "Execution plan" not in result.output, result.output[-3000:]
    evaluated = tl_json("evaluate", "--model", trained.checkpoint, "--data", trained.data.path)["metrics"]
    n = evaluated["n"]
    assert summary["rows"] == n == 3000 and summary["parts_predicted"] == len(trained.data.manifest["shards"]["test"]) == 8
    # The same images right: the accuracy of the Parquet rows is tl evaluate's, to the image.
    table = read_parts(out)
    correct = sum(a == b for a, b in zip(table.column("label").to_pylist(), table.column("predicted").to_pylist()))
    assert round(evaluated["accuracy"] * n) == correct == round(summary["accuracy"] * n)
    assert evaluated["accuracy"] > 0.5  # a trained model, not chance (0.1)
    # One row per image of the split, each with its id, probabilities and the model that made it.
    assert table.num_rows == n and len(set(table.column("id").to_pylist())) == n
    assert sorted(table.column("index").to_pylist()) == list(range(n))
    probs = np.stack([table.column(f"p_{c}").to_numpy() for c in trained.data.classes], axis=1)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.allclose(probs.max(axis=1), table.column("probability").to_numpy())
    sha = summary["model_sha256"]
    assert set(table.column("model_version").to_pylist()) == {f"sha256:{sha[:12]}"}
    written = json.loads((out / "predictions.json").read_text())  # written last
    assert written["rows"] == n and len(written["parts"]) == 8 and written["model_sha256"] == sha


@pytest.mark.timeout(480)  # three tl predict, two of them starting a local Ray: 100-180 s at load 15-20
def test_a_rerun_after_a_crash_keeps_the_finished_parts_and_says_why_it_redoes_others(trained, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "preds"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    # A real crash: the command (and the local Ray it started) SIGKILLed once its first parts are written.
    args = [servers.BIN / "tl", "predict", "--model", trained.checkpoint, "--data", trained.data.path,
            "--output", out, "--batch-size", 32]
    with servers.started(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("part-*.parquet"))) < 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert done, "no part was written before the kill"
    total = sum(len(trained.data.manifest["shards"][s]) for s in ("train", "test"))
    again = tl_json("predict", "--model", trained.checkpoint, "--data", trained.data.path, "--output", out)
    assert again["parts_kept"] == len(done) and again["parts_predicted"] == total - len(done)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in done} == done  # not rewritten
    assert again["rows"] == 10_000 and read_parts(out).num_rows == 10_000

    # A part made by another model is predicted again, and the summary says why.
    victim = out / sorted(done)[0]
    table = pq.read_table(victim)
    meta = json.loads(table.schema.metadata[b"tl.predictions"])
    pq.write_table(table.replace_schema_metadata({b"tl.predictions": json.dumps(
        {**meta, "model_sha256": "0" * 64, "model_version": "7"}).encode()}), victim)
    third = tl_json("predict", "--model", trained.checkpoint, "--data", trained.data.path, "--output", out)
    assert third["parts_redone"] == 1 and third["parts_predicted"] == 1 and third["parts_kept"] == total - 1
    assert "made by another model (7" in third["why_redone"] and not third["foreign_parts"]

    # The test split alone into the same folder, where another model made a train part: it is
    # named (a reader of the folder would mix it in), not touched, and not in this run's summary.
    other = out / "part-train-00000.parquet"
    table = pq.read_table(other)
    meta = json.loads(table.schema.metadata[b"tl.predictions"])
    pq.write_table(table.replace_schema_metadata({b"tl.predictions": json.dumps(
        {**meta, "model_sha256": "1" * 64, "model_version": "8"}).encode()}), other)
    before = other.stat().st_mtime_ns
    tests_only = tl_json("predict", "--model", trained.checkpoint, "--data", trained.data.path, "--split", "test",
                         "--output", out)
    assert tests_only["parts_predicted"] == 0 and "part-train-00000.parquet" in tests_only["foreign_parts"]
    assert "part-train-00001.parquet" not in tests_only["foreign_parts"]  # this model's, from this data
    assert other.stat().st_mtime_ns == before
    assert all(p["split"] == "test" for p in json.loads((out / "predictions.json").read_text())["parts"])


@pytest.fixture(scope="module")
def registry_on_s3(trained, tmp_path_factory):
    """An `mlflow server` with its artifacts on a moto S3 server, the model registered there as
    version 1 with the alias champion; the S3 endpoint is where the predictions go too."""
    from mlflow import MlflowClient

    logs = tmp_path_factory.mktemp("predict-services")
    mp = pytest.MonkeyPatch()
    try:
        with servers.moto_s3(logs) as s3:
            servers.make_bucket(s3, BUCKET)
            for key, value in servers.S3_ENV.items():
                mp.setenv(key, value)
            mp.setenv("AWS_ENDPOINT_URL", s3)
            with servers.mlflow_server(logs, s3, BUCKET) as url:
                mp.setenv("MLFLOW_TRACKING_URI", url)
                registered = tl_json("register", "--checkpoint", trained.checkpoint, "--name", "digits16")
                client = MlflowClient(url)
                client.set_registered_model_alias("digits16", "champion", registered["version"])
                yield SimpleNamespace(s3=s3, version=registered["version"])
    finally:
        mp.undo()


@pytest.mark.timeout(600)  # with an mlflow server's start: 100-230 s at load 15-40
def test_the_champion_by_alias_on_a_raw_source_into_s3(trained, registry_on_s3, tmp_path):
    """The model by its alias (resolved to its version, which every row names), the data as a source URI
    (MNIST's IDX files at 28 x 28, prepared, brought to the model's 16 x 16 as they are read), the
    predictions on S3."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    summary = tl_json("predict", "--model", "models:/digits16@champion", "--data", trained.mnist, "--split", "test",
                      "--output", f"s3://{BUCKET}/predictions/run1")
    assert summary["model_version"] == str(registry_on_s3.version) == "1"
    s3 = boto3.client("s3", endpoint_url=registry_on_s3.s3, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="predictions/run1/")["Contents"]]
    parts = sorted(k for k in keys if k.rsplit("/", 1)[-1].startswith("part-"))
    assert f"predictions/run1/predictions.json" in keys and len(parts) == summary["parts_predicted"] >= 1
    table = pa.concat_tables([pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
                              for k in parts])
    assert table.num_rows == 3000 and set(table.column("model_version").to_pylist()) == {"1"}
    # The same test images as the 16 x 16 prepared set (same split seed), resized as prepare resizes: the
    # same predictions, so the same accuracy as tl evaluate's there.
    evaluated = tl_json("evaluate", "--model", trained.checkpoint, "--data", trained.data.path)["metrics"]
    assert round(summary["accuracy"] * 3000) == round(evaluated["accuracy"] * 3000)
    # Run again: every part is on S3 already, nothing is predicted.
    again = tl_json("predict", "--model", "models:/digits16@champion", "--data", trained.mnist, "--split", "test",
                    "--output", f"s3://{BUCKET}/predictions/run1")
    assert again["parts_kept"] == len(parts) and again["parts_predicted"] == 0


@pytest.mark.timeout(120)
def test_bad_input_is_one_error_line(trained, tmp_path):
    out = tmp_path / "o"
    assert "does not exist" in tl_error("predict", "--model", tmp_path / "nope.pt", "--data", trained.data.path,
                                        "--output", out)
    line = tl_error("predict", "--model", trained.checkpoint, "--data", tmp_path, "--output", out)
    assert "not a prepared dataset" in line and "idx:DIR" in line
    assert "split" in tl_error("predict", "--model", trained.checkpoint, "--data", trained.data.path, "--output", out,
                               "--split", "validation")
    assert "models:/NAME/VERSION" in tl_error("predict", "--model", "models:/digits16", "--data", trained.data.path,
                                              "--output", out)
    text = tl_error("predict", "--model", trained.checkpoint, "--data", "tsv:" + str(tmp_path / "x.tsv"),
                    "--output", out)
    assert "reads images" in text
    assert not out.exists()  # nothing written
