"""`tl monitor`: drift on the model's own embeddings (MMD with a permutation p-value), on the shared
data: MNIST's test images against USPS must drift, two random halves of one split must not. A small
CNN trained in-process on MNIST at 16 x 16; MLflow on the module's SQLite store."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import tl, tl_error, tl_json


@pytest.fixture(scope="module")
def trained(module_workdir, shared_data):
    """MNIST's test images at 16 x 16 split in two random halves (train, test), a small CNN trained
    on 50 images a class of the train half (so neither half is mostly images it learnt by heart),
    registered as version 1 of `digits-monitor`."""
    from tl_core.config import PrepareConfig, TrainConfig
    from tl_core.data import prepare
    from tl_core.train import train

    data, _ = prepare(PrepareConfig(uri=f"idx:{shared_data / 'mnist-test'}", image_size=16, test_fraction=0.5))
    result = train(TrainConfig(data=data.path, shots=50, epochs=8, batch_size=64, eval_every=0, checkpoint_every=0))
    registered = tl_json("register", "--checkpoint", result.checkpoint_uri, "--name", "digits-monitor")
    return SimpleNamespace(data=data, checkpoint=result.checkpoint_uri, version=registered["version"],
                           usps=f"npz:{shared_data / 'usps' / 'usps_16x16.npz'}")


def monitored(*args) -> tuple[int, dict, list[str]]:
    """(exit code, the JSON summary, the other lines) of `tl monitor ... --json`."""
    result = tl("monitor", *args, "--json")
    assert result.exit_code in (0, 1), result.output[-3000:]
    lines = result.stdout.strip().splitlines()
    return result.exit_code, json.loads(lines[-1]), lines[:-1]


@pytest.mark.timeout(300)
def test_mnist_against_usps_is_drift(trained):
    # The reference is the data the model was trained on, by default (its checkpoint names it).
    code, s, _ = monitored("--model", trained.checkpoint, "--data", trained.usps)
    assert code == 1 and s["drift"] and s["p_value"] < 0.01 and s["p_value"] == pytest.approx(1 / 501)
    assert s["reference"] == trained.data.path and s["reference_split"] == "train"
    assert s["reference_images"] == s["data_images"] == 500 and s["embedding_dim"] > 1
    assert s["decision"].startswith("drift: MMD^2") and s["mmd2"] > 0
    # Beside the statistic: the model's confidence and its predicted class mix on each side.
    assert s["mean_confidence_data"] < s["mean_confidence_reference"]
    assert s["confidence_shift"] == pytest.approx(s["mean_confidence_data"] - s["mean_confidence_reference"])
    assert 0 < s["class_mix_tvd"] <= 1 and sum(s["class_mix_data"].values()) == pytest.approx(1)
    # Without --json: exit 1 and one line.
    plain = tl("monitor", "--model", trained.checkpoint, "--data", trained.usps)
    assert plain.exit_code == 1 and len(plain.stdout.strip().splitlines()) == 1
    assert plain.stdout.startswith("drift: ")


@pytest.mark.timeout(300)
def test_two_halves_of_one_split_are_no_drift(trained):
    code, s, _ = monitored("--model", trained.checkpoint, "--reference", trained.data.path, "--reference-split",
                           "train", "--data", trained.data.path, "--data-split", "test")
    assert code == 0 and not s["drift"] and s["p_value"] >= 0.01
    assert s["decision"].startswith("no drift: ")
    assert abs(s["confidence_shift"]) < 0.05 and s["class_mix_tvd"] < 0.1


@pytest.mark.timeout(120)
def test_the_statistic_is_the_unbiased_mmd_a_reviewer_can_recompute():
    """The vectorised MMD^2 equals the textbook unbiased estimator, and its p-value is calibrated
    enough: samples of one distribution rarely reject at 0.05, shifted ones always do."""
    from tl_core.monitor import mmd_permutation_test

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(loc=0.8, size=(50, 5))
    result = mmd_permutation_test(x, y, 200, np.random.default_rng(1))

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / result["bandwidth_sq"])

    kxx, kyy = k(x, x), k(y, y)
    np.fill_diagonal(kxx, 0)
    np.fill_diagonal(kyy, 0)
    textbook = kxx.sum() / (60 * 59) + kyy.sum() / (50 * 49) - 2 * k(x, y).mean()
    assert result["mmd2"] == pytest.approx(textbook, rel=1e-9) and result["p_value"] < 0.01
    same = [mmd_permutation_test(rng.normal(size=(40, 3)), rng.normal(size=(40, 3)), 100, rng)["p_value"]
            for _ in range(20)]
    assert sum(p < 0.05 for p in same) <= 4


@pytest.mark.timeout(300)
def test_logged_to_mlflow_against_the_registered_version(trained):
    from mlflow import MlflowClient

    code, s, _ = monitored("--model", f"models:/digits-monitor/{trained.version}", "--data", trained.usps)
    assert code == 1 and s["model_version"] == str(trained.version)
    client = MlflowClient()
    run = client.get_run(s["run_id"])
    assert run.data.tags["tl.model_version"] == str(trained.version) and run.data.tags["tl.drift"] == "true"
    assert run.data.metrics["p_value"] == pytest.approx(s["p_value"]) and run.data.metrics["drift"] == 1.0
    version = client.get_model_version("digits-monitor", str(trained.version))
    last = json.loads(version.tags["tl.monitor.last"])
    assert last["drift"] is True and last["run_id"] == s["run_id"]
    import mlflow  # MLflow 3: the version's logged model carries the monitor's metrics too

    assert s["logged_model_id"] and version.source.endswith(s["logged_model_id"])
    logged = {m.key: m.value for m in mlflow.get_logged_model(s["logged_model_id"]).metrics}
    assert logged["monitor.p_value"] == pytest.approx(s["p_value"]) and logged["monitor.drift"] == 1.0
    # The pipeline's first step on the same champion: drift, so it retrains; no drift, so it does not.
    from tl_core.monitor import retraining_decision

    client.set_registered_model_alias("digits-monitor", "champion", str(trained.version))
    assert retraining_decision("digits-monitor", trained.usps)["decision"] == "drift"
    assert retraining_decision("no-such-model", trained.usps)["decision"] == "no-champion"


@pytest.mark.timeout(120)
def test_a_model_version_is_read_from_tls_store_by_a_fresh_process(trained, tmp_path):
    """`models:/NAME/VERSION` as the first thing a `tl` process reads from MLflow: from the work
    directory's store, not MLflow's default ./mlflow.db (the in-process runs above had set it up)."""
    import subprocess

    from tests import servers

    # MLflow's set_tracking_uri (the in-process runs above) exports MLFLOW_TRACKING_URI: not to this process.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([servers.BIN / "tl", "monitor", "--model", f"models:/digits-monitor/{trained.version}",
                           "--data", trained.usps, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # drift: MNIST's model on USPS
    assert json.loads(proc.stdout.strip().splitlines()[-1])["model_version"] == str(trained.version)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(120)
def test_bad_input_is_exit_2_and_one_line(trained, tmp_path):
    assert "alpha" in tl_error("monitor", "--model", trained.checkpoint, "--data", trained.usps, "--alpha", "2")
    assert "not a prepared dataset" in tl_error("monitor", "--model", trained.checkpoint, "--data", tmp_path)
    assert "does not exist" in tl_error("monitor", "--model", tmp_path / "x.pt", "--data", trained.usps)
    assert "no alias" in tl_error("monitor", "--model", "models:/digits-monitor@nobody", "--data", trained.usps)
