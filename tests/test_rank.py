"""`tl rank` (issue 30): LogME against a direct evidence computation, LEEP, NCE and H-score against
their definitions written out, ranking that reads only the target's labelled training shots (never
the test split) through linear-probe's feature cache, and the command's table, MLflow run and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tl, tl_error, tl_json
from tl_core.rank import h_score, leep, logme, logme_class, nce


def direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T/alpha): the marginal likelihood of y = F w + e, w ~ N(0, I/alpha),
    e ~ N(0, I/beta), with an explicit inverse and determinant (slow; no SVD, no fixed point)."""
    n = len(f)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.inv(cov) @ y)


@pytest.mark.parametrize("n, d", [(40, 8), (30, 50)])  # more examples than features, and fewer
def test_logme_is_the_maximised_evidence_of_the_direct_computation(n, d):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + labels[:, None] * rng.normal(size=d)  # features that say something
    u, s, vt = np.linalg.svd(f, full_matrices=False)
    per_class = []
    for c in range(3):
        y = (labels == c).astype(float)
        ours, alpha, beta = logme_class(f, y, u, s, vt)
        reference = direct_evidence(f, y, alpha, beta) / n
        assert ours == pytest.approx(reference, abs=1e-9)
        # The fixed point maximises the evidence: no (alpha, beta) on a grid around it does better.
        grid = [direct_evidence(f, y, alpha * a, beta * b) / n for a in (0.25, 0.5, 0.9, 1.1, 2, 4)
                for b in (0.25, 0.5, 0.9, 1.1, 2, 4)]
        assert max(grid) <= reference + 1e-9
        per_class.append(reference)
    assert logme(f, labels) == pytest.approx(np.mean(per_class), abs=1e-9)


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 10)
    noise = rng.normal(size=(100, 32))
    informative = noise * 0.3 + np.eye(10)[labels] @ rng.normal(size=(10, 32))
    assert logme(informative, labels) > logme(noise, labels) + 0.1


def test_leep_is_its_definition_written_out():
    rng = np.random.default_rng(1)
    theta = rng.dirichlet(np.ones(4), size=25)  # a source head's probabilities over 4 source classes
    y = rng.integers(0, 3, 25)
    total = 0.0
    for i in range(25):
        expected = 0.0
        for z in range(4):
            p_z = theta[:, z].mean()
            p_yz = theta[y == y[i], z].sum() / 25
            expected += p_yz / p_z * theta[i, z]
        total += math.log(expected)
    assert leep(theta, y) == pytest.approx(total / 25, abs=1e-12)
    assert leep(np.eye(3)[y], y) == pytest.approx(0.0, abs=1e-12)  # a head that names the labels: log 1


def test_nce_is_the_conditional_entropy_counted_out():
    rng = np.random.default_rng(2)
    theta = rng.dirichlet(np.ones(5), size=40)  # a source head over 5 source classes
    y = rng.integers(0, 3, 40) * 7  # target labels need not be 0..K-1
    z = [max(range(5), key=lambda k: theta[i, k]) for i in range(40)]
    total = 0.0
    for yv in set(y.tolist()):
        for zv in set(z):
            n_yz = sum(1 for i in range(40) if y[i] == yv and z[i] == zv)
            n_z = sum(1 for i in range(40) if z[i] == zv)
            if n_yz:
                total += n_yz / 40 * math.log(n_yz / n_z)
    assert nce(theta, y) == pytest.approx(total, abs=1e-12)
    # Source labels that determine the target labels (several source classes per target class): NCE 0.
    source = rng.integers(0, 6, 40)
    assert nce(np.eye(6)[source] * 0.8 + 0.02, source // 2) == pytest.approx(0.0, abs=1e-12)
    assert nce(np.eye(6)[source], rng.permutation(source // 2)) < -0.1


def test_h_score_is_its_definition_with_explicit_class_means_and_pinv():
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(3)
    for n, d in ((60, 5), (30, 40)):  # more examples than features, and fewer
        y = rng.integers(0, 4, n)
        f = rng.normal(size=(n, d)) + y[:, None] * rng.normal(size=d)
        centred = f - f.mean(0)
        shrunk, _ = ledoit_wolf(centred, assume_centered=True)  # (1 - s) cov + s tr(cov)/d I, computed apart
        class_mean = {c: centred[y == c].mean(0) for c in set(y.tolist())}
        between = sum(np.outer(class_mean[c], class_mean[c]) for c in y) / n
        assert h_score(f, y) == pytest.approx(np.trace(np.linalg.pinv(shrunk) @ between), rel=1e-9)
    # Why the shrinkage: with N <= D the paper's plain (pseudo-)inverse scores any features classes - 1.
    plain = np.trace(np.linalg.pinv(centred.T @ centred / n) @ between)
    assert plain == pytest.approx(len(set(y.tolist())) - 1, rel=1e-6)


def test_h_score_prefers_features_that_separate_the_classes():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(10), 10)
    informative = rng.normal(size=(100, 32)) * 0.3 + np.eye(10)[labels] @ rng.normal(size=(10, 32))
    assert h_score(informative, labels) > h_score(informative, rng.permutation(labels)) + 1


# -- ranking real candidates on real data ---------------------------------------------------------


def _checkpoint(path, seed: int, source_head: bool) -> str:
    """A small_cnn checkpoint for 8x8 grey images: random weights (seeded); with `source_head`, as
    tl training writes one (its data's classes, so its head is a source classifier for LEEP)."""
    from tl_core.checkpoints import FORMAT, save_checkpoint
    from tl_core.models import create_model, model_spec

    torch.manual_seed(seed)
    model = create_model("small_cnn", 4 if source_head else 10, 1, width=8)
    ckpt = {"format": FORMAT, "model_spec": model_spec("small_cnn", model.head.out_features, 1, {"width": 8}),
            "model": model.state_dict()}
    if source_head:
        ckpt["data"] = {"hash": "other", "classes": list("abcd"), "shape": [1, 8, 8], "mean": [0.5], "std": [0.5]}
    uri = str(path / f"cand{seed}" / "checkpoint.pt")
    save_checkpoint(ckpt, uri)
    return uri


@pytest.fixture(scope="module")
def digits(module_workdir):
    """scikit-learn's digits prepared, and two candidates (one with a source head)."""
    from tl_core.config import PrepareConfig
    from tl_core.data import prepare

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    return data, _checkpoint(module_workdir, 0, False), _checkpoint(module_workdir, 1, True)


def test_ranking_reads_only_the_training_shots_and_the_probe_reuses_its_features(digits, monkeypatch):
    from tl_core.data.prepare import PreparedDataset
    from tl_core.strategies import linear_probe
    from tl_core.rank import rank

    data, bare, headed = digits
    splits = []
    for name in ("rows", "split", "labels"):
        original = getattr(PreparedDataset, name)

        def spy(self, split, *args, _original=original, **kwargs):
            splits.append(split)
            return _original(self, split, *args, **kwargs)

        monkeypatch.setattr(PreparedDataset, name, spy)
    extracted = []
    real_extract = linear_probe.extract_features
    monkeypatch.setattr(linear_probe, "extract_features", lambda m, x: extracted.append(len(x)) or real_extract(m, x))

    result = rank(data.path, shots=5, seed=3, candidates=[bare, headed])
    assert splits and set(splits) == {"train"}, splits  # the test split is never asked for
    assert extracted == [50, 50]  # 5 shots x 10 classes, once per candidate
    assert [r["rank"] for r in result["table"]] == [1, 2]
    by_uri = {r["candidate"]: r for r in result["table"]}
    assert by_uri[bare]["leep"] is None and by_uri[headed]["leep"] < 0  # LEEP only through a source head
    assert by_uri[bare]["nce"] is None and by_uri[headed]["nce"] <= 0  # NCE too
    assert all(r["hscore"] > 0 for r in result["table"])  # H-score from the features, for every candidate
    assert result["best"] == result["table"][0]["candidate"]
    assert result["table"][0]["logme"] >= result["table"][1]["logme"]

    # The linear probe of a candidate on the same shots embeds nothing again: ranking filled its cache.
    from tl_core.config import TrainConfig
    from tl_core.data import sample_shots
    from tl_core.strategies import create_strategy
    from tl_core.checkpoints import load_checkpoint

    cfg = TrainConfig(data=data.path, strategy="linear-probe", backbone=headed, shots=5, seed=3, head_solver="epochs")
    probe = create_strategy(cfg)
    model, _ = probe.build_model(10, data.shape, load_checkpoint(headed))
    idx, _ = sample_shots(data.labels("train"), 5, 3, data.classes)
    probe.train_set(model, *data.rows("train", idx).tensors())
    assert probe.cache_hit is True and extracted == [50, 50]
    assert set(splits) == {"train"}


def test_tl_rank_prints_logs_and_refuses_bad_input(digits, module_workdir):
    import mlflow

    from tl_core import tracking

    data, bare, headed = digits
    summary = tl_json("rank", "--target", data.path, "--shots", "3", "--candidates", f"{bare},{headed}")
    assert [r["rank"] for r in summary["table"]] == [1, 2] and summary["skipped"] == []
    tracking.setup()
    logged = mlflow.get_run(summary["run_id"]).data
    assert logged.metrics["rank_1.logme"] == pytest.approx(summary["table"][0]["logme"])
    for row in summary["table"]:  # every score of the table beside LogME, where it has one
        for score in ("leep", "nce", "hscore"):
            assert logged.metrics.get(f"rank_{row['rank']}.{score}") == pytest.approx(row[score])
    assert logged.tags["tl.rank_best"] == summary["best"]

    assert "unknown data scheme 'nope'" in tl_error("rank", "--target", "nope:x", "--candidates", bare)
    assert "not a prepared dataset" in tl_error("rank", "--target", str(module_workdir / "missing"))
    assert "ranking needs labels" in tl_error("rank", "--target", data.path, "--shots", "0", "--candidates", bare)


def test_default_candidates_are_the_workdirs_pretrained_models_that_fit(digits, module_workdir):
    import json
    import shutil

    from tl_core.rank import resolve

    data, bare, headed = digits
    assert "no candidate fits" in tl_error("rank", "--target", data.path)  # nothing registered or pretrained yet
    models = module_workdir / "work" / "models"
    source, texts = module_workdir / "source", module_workdir / "texts"
    for folder, stored, shape in ((source, "arrays", [1, 16, 16]), (texts, "text", [1, 1, 128])):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"hash": folder.name, "stored": stored, "shape": shape}))
    for name, uri, data_folder in (("scratch-a", headed, source), ("scratch-b", bare, data.path),
                                   ("finetune-c", bare, source), ("scratch-e", bare, texts)):
        (models / name).mkdir(parents=True)
        shutil.copy(uri, models / name / "checkpoint.pt")
        (models / name / "config.json").write_text(json.dumps({"data": str(data_folder), "strategy": "x"}))
    # A pretraining (scratch) on another dataset of images is a candidate; a scratch run on the
    # target itself (a baseline), a transfer and a pretraining on text are not.
    assert resolve(data.path, None, 5)[1] == [str(models / "scratch-a" / "checkpoint.pt")]

    # `tl transfer --backbone auto` trains from the candidate ranked first, and records the ranking with its run.
    import mlflow

    from tl_core import tracking

    (models / "scratch-d").mkdir()
    shutil.copy(bare, models / "scratch-d" / "checkpoint.pt")
    (models / "scratch-d" / "config.json").write_text(json.dumps({"data": str(source), "strategy": "scratch"}))
    summary = tl_json("transfer", "--data", data.path, "--backbone", "auto", "--strategy", "linear-probe",
                      "--shots", "3", "--no-baseline")
    ranking = summary["rank"]
    assert {r["candidate"] for r in ranking["table"]} == {str(models / n / "checkpoint.pt") for n in ("scratch-a", "scratch-d")}
    tracking.setup()
    run = mlflow.get_run(summary["run_id"]).data
    assert run.params["backbone"] == ranking["best"] == ranking["table"][0]["candidate"]
    assert run.tags["tl.backbone_auto"] == "true" and run.tags["tl.rank_best"] == ranking["best"]
    assert run.metrics["rank_1.logme"] == pytest.approx(ranking["table"][0]["logme"])
    said = tl("transfer", "--data", data.path, "--backbone", "auto", "--strategy", "linear-probe", "--shots", "3",
              "--no-baseline").stdout  # as a person reads it: the backbone it took
    assert f"backbone {ranking['best']}: ranked first by LogME" in said, said

    # `tl run --backbone auto`: the winner stands where the pretrained source would, the ranking in the parent run.
    from tl_core.config import ExperimentConfig
    from tl_core.rank import ranked_source

    cfg = ExperimentConfig(backbone="auto", shots=3, seeds=[0])
    with tracking.run("tl run") as parent:
        target, source, pretrain, ranked = ranked_source(cfg, lambda m: None, lambda: {"path": data.path})
    assert source == {"path": ranked["best"], "ranked": True} and pretrain["checkpoint"] == ranked["best"]
    assert [r["candidate"] for r in ranked["table"]] == [r["candidate"] for r in ranking["table"]]  # same shots
    tags = mlflow.get_run(parent.info.run_id).data.tags
    assert tags["tl.backbone_auto"] == "true" and tags["tl.rank_best"] == ranked["best"]
    shutil.rmtree(models)


def test_registered_versions_that_read_images_are_candidates(digits, module_workdir):
    """A version in the MLflow registry (tags as tl register writes them) is a default candidate, scored
    from the checkpoint its model holds; a text model's version is not, for an image target."""
    import shutil

    import mlflow

    from tl_core import tracking
    from tl_core.rank import rank

    data, bare, headed = digits
    tracking.setup()
    client = mlflow.MlflowClient()
    for name, arch in (("rank-digits", "small_cnn"), ("rank-text", "minilm-l6")):
        folder = module_workdir / name / "model" / "artifacts"
        folder.mkdir(parents=True)
        shutil.copy(headed, folder / "checkpoint.pt")
        client.create_registered_model(name)
        client.create_model_version(name, str(folder.parent), tags={"tl.architecture": arch})
    result = rank(data.path, shots=3, seed=0)
    assert [r["candidate"] for r in result["table"]] == ["models:/rank-digits/1"]
    assert result["table"][0]["leep"] is not None  # the registered classifier's head is its source head


def test_the_pipelines_transfer_step_ranks_its_own_pretrained_source_among_the_candidates(digits, module_workdir):
    """`tl pipeline run --backbone auto`: the transfer step (the component's function, in this
    process, as kfp.local runs it) ranks the default candidates and the run's pretrained source,
    trains from the first, and keeps the ranking in its output and its MLflow run."""
    import json
    import shutil
    from types import SimpleNamespace

    import mlflow

    from components.transfer import transfer
    from tl_core import tracking
    from tl_core.config import PipelineConfig

    data, bare, headed = digits
    pretrained = module_workdir / "pipeline-pretrain.pt"  # not under TL_WORKDIR/models: a candidate only as the step's input
    shutil.copy(bare, pretrained)

    def given(name: str, uri: str):
        path = module_workdir / f"{name}.json"
        path.write_text(json.dumps({"uri": uri, "summary": {}}))
        return SimpleNamespace(path=str(path))

    checkpoint = SimpleNamespace(path=str(module_workdir / "checkpoint-out.json"), metadata={})
    logged = {}
    transfer.python_func(data=given("data", data.path), backbone=given("backbone", str(pretrained)),
                         source=given("source", data.path), strategy="linear-probe", model="small_cnn", shots=3,
                         epochs=5, lr=0.01, batch_size=64, augment=0, workers=1, tuned="{}", backbone_choice="auto",
                         checkpoint=checkpoint, metrics=SimpleNamespace(log_metric=logged.__setitem__))
    summary = json.loads(Path(checkpoint.path).read_text())["summary"]
    ranking = summary["rank"]
    assert str(pretrained) in [r["candidate"] for r in ranking["table"]]
    tracking.setup()
    run = mlflow.get_run(summary["run_id"]).data
    assert run.params["backbone"] == ranking["best"] and run.tags["tl.backbone_auto"] == "true"
    assert logged["accuracy"] == summary["metrics"]["accuracy"]

    # Ranking needs labels, and chooses the backbone after a search would have tuned the pretrained one.
    assert "shots 0" in tl_error("pipeline", "run", "--local", "--backbone", "auto", "--shots", "0", "--strategy", "mcc")
    assert "drop one of them" in tl_error("pipeline", "run", "--local", "--backbone", "auto", "--strategy", "finetune",
                                          "--search-space", '{"lr": {"choice": [0.01]}}')
    assert PipelineConfig(backbone="auto").backbone == "auto"
