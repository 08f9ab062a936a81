"""End to end: `tl run` as a new user runs it, and transfer beating scratch on real data."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import servers

pytestmark = pytest.mark.slow


def tl_run(workdir, *args: str, timeout: int = 600) -> dict:
    env = {**os.environ, "TL_WORKDIR": str(workdir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([str(servers.BIN / "tl"), "run", *args, "--json"], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=workdir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_embedded_default_best_strategy_beats_scratch_on_every_seed(workdir):
    summary = tl_run(workdir)
    assert summary["source"]["path"].split("/")[-1].startswith("fonts-digits")
    assert summary["target"]["path"].split("/")[-1].startswith("sklearn-digits")
    rows = {row["strategy"]: row for row in summary["table"]}
    assert set(rows) == {"scratch", "linear-probe", "finetune", "auto"}
    assert [a["seed"] for a in summary["auto"]] == [0, 1, 2]  # auto's choice, seed by seed, with its reason
    assert all(a["choice"] in ("zero-shot", "linear-probe", "scratch", "finetune") and a["reason"] for a in summary["auto"])
    best = rows[summary["best_strategy"]]
    assert best["seeds"] == 3 and best["seeds_beating_scratch"] == 3, summary["table"]
    assert best["gain_over_scratch"] > 0.02
    # Every strategy is in the table, flagged where it loses to scratch.
    for row in summary["table"][1:]:
        assert row["negative_transfer"] == (row["gain_over_scratch"] < 0)

    # MLflow (SQLite in the work directory): one parent run, a child per step.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["tl"], output_format="list")
    parent = [r for r in runs if r.info.run_id == summary["run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # prepare x2, pretrain, (scratch + 3 strategies) x 3 seeds, and auto's one search for the 3 seeds
    assert len(children) == 2 + 1 + 3 * 4 + 1
    finetune = [r for r in children if r.data.tags.get("tl.strategy") == "finetune"]
    assert all("test_accuracy" in r.data.metrics and "gain_over_scratch" in r.data.metrics for r in finetune)
    assert all(r.data.params["shots"] == "5" for r in finetune)


def test_mnist_to_usps_at_10_shots_transfer_beats_scratch(workdir, shared_data):
    # finetune alone: the strategy auto takes here (bench/auto.md, usps-10); with the default rows
    # (auto's search over 3 seeds and the probe too) this test took 98 s of the suite's CPU.
    summary = tl_run(workdir, "--source", f"idx:{shared_data}/mnist-test", "--target",
                     f"npz:{shared_data}/usps/usps_16x16.npz", "--shots", "10", "--pretrain-epochs", "2",
                     "--strategies", "finetune")
    rows = {row["strategy"]: row for row in summary["table"]}
    assert set(rows) == {"scratch", "finetune"}
    assert rows["finetune"]["test_accuracy"] > rows["scratch"]["test_accuracy"] + 0.02, summary["table"]
    assert rows["finetune"]["seeds_beating_scratch"] == 3, summary["table"]
