"""Runs at once in one work directory: two identical transfers (one trains, the other waits and
reuses its result), eight evaluations of one registered model (one SQLite MLflow store)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import torch

from tests import servers
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.train import train


def test_two_identical_transfers_at_once_train_once(workdir):
    """linear-probe, so the feature cache is written by one and read by the other too."""
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    backbone = train(TrainConfig(data=data.path, epochs=1)).checkpoint_uri
    command = [str(servers.BIN / "tl"), "transfer", "--data", data.path, "--strategy", "linear-probe",
               "--backbone", backbone, "--shots", "10", "--epochs", "5", "--no-baseline", "--json"]
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(servers.started(command, env=dict(os.environ), stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)) for _ in range(2)]
        outs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-3000:]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert first["checkpoint"] == second["checkpoint"]
    assert sorted([first["reused"], second["reused"]]) == [False, True]  # trained once, then reused
    assert first["metrics"]["accuracy"] == second["metrics"]["accuracy"]
    assert torch.load(first["checkpoint"], weights_only=True)["metrics"]["test_accuracy"] > 0.5
    leftovers = list(workdir.rglob("*.tmp"))
    assert not leftovers, leftovers  # no half-written file of either run


def test_eight_evaluations_of_one_registered_model_at_once(workdir):
    from mlflow import MlflowClient

    from tl_core import tracking
    from tl_core.registry import register_model

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    checkpoint = train(TrainConfig(data=data.path, epochs=2)).checkpoint_uri
    register_model(checkpoint, "digits-at-once", data.path)
    command = [str(servers.BIN / "tl"), "evaluate", "--model", "models:/digits-at-once@challenger", "--data", data.path,
               "--json"]
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(servers.started(command, env=dict(os.environ), stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)) for _ in range(8)]
        outs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len({r["metrics"]["accuracy"] for r in results}) == 1  # the same model, the same answer
    tracking.setup()
    client = MlflowClient()
    logged = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                                "tags.`tl.step` = 'evaluate'")
    assert sorted(r.info.run_id for r in logged) == sorted(r["run_id"] for r in results)  # 8 runs, none lost
    assert all(r.data.metrics["test_accuracy"] == results[0]["metrics"]["accuracy"] for r in logged)
