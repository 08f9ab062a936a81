"""The training core in this process: it learns, checkpoints are plain dicts, identical runs are reused."""

from __future__ import annotations

import io

import torch

from tl_core.checkpoints import load_checkpoint
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.data.transforms import random_shift
from tl_core.evaluate import evaluate_checkpoint
from tl_core.models import create_model, defaults_for_shape
from tl_core.train import train


def test_scratch_learns_digits_and_checkpoint_is_a_plain_dict(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    result = train(TrainConfig(data=data.path, epochs=8, eval_every=2))
    ckpt = result.checkpoint
    assert ckpt["metrics"]["test_accuracy"] > 0.85  # chance is 0.10
    assert [h["epoch"] for h in ckpt["history"]] == list(range(8))
    assert "test_accuracy" in ckpt["history"][1] and "test_accuracy" not in ckpt["history"][0]
    # A plain dict of tensors and primitives: loads with weights_only=True, rebuilds the model.
    raw = torch.load(io.BytesIO(open(result.checkpoint_uri, "rb").read()), weights_only=True)
    assert raw["model_spec"]["name"] == "small_cnn" and raw["epoch"] == 7
    assert raw["data"]["hash"] == data.hash
    ev = evaluate_checkpoint(result.checkpoint_uri, data.path)
    assert abs(ev.metrics["accuracy"] - ckpt["metrics"]["test_accuracy"]) < 1e-6
    assert ev.confusion.sum() == ev.metrics["n"] and 0 <= ev.metrics["ece"] < 0.2
    assert 0.85 < ev.metrics["macro_f1"] <= 1


def test_identical_run_is_reused_and_force_retrains(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    cfg = TrainConfig(data=data.path, epochs=1, shots=5)
    first = train(cfg)
    again = train(cfg)
    assert not first.reused and again.reused and again.checkpoint_uri == first.checkpoint_uri
    other = train(cfg.model_copy(update={"seed": 1}))
    assert not other.reused and other.checkpoint_uri != first.checkpoint_uri
    forced = train(cfg, force=True)
    assert not forced.reused and load_checkpoint(forced.checkpoint_uri)["epoch"] == 0


def test_a_run_of_other_code_is_not_reused(workdir, tmp_path, monkeypatch):
    import shutil

    import tl_core.train

    copy = tmp_path / "tl_core"
    shutil.copytree(tl_core.train.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert tl_core.train.code_version(copy) == tl_core.train.code_version()  # the same files, wherever they are
    loop = copy / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n# one line more\n")
    tl_core.train.code_version.cache_clear()  # read once a process: a process runs one version of the code
    assert tl_core.train.code_version(copy) != tl_core.train.code_version()

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    cfg = TrainConfig(data=data.path, epochs=1, shots=5)
    first = train(cfg)
    monkeypatch.setattr(tl_core.train, "code_version", lambda root=None: "the next release")
    upgraded = train(cfg)
    assert not upgraded.reused and upgraded.checkpoint_uri != first.checkpoint_uri


def test_finetune_freeze_keeps_blocks_fixed(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    pre = train(TrainConfig(data=data.path, epochs=1))
    tuned = train(TrainConfig(data=data.path, strategy="finetune", backbone=pre.checkpoint_uri, freeze=2, epochs=2, shots=5))
    before, after = pre.checkpoint["model"], tuned.checkpoint["model"]
    for key in before:
        if key.startswith(("backbone.0.", "backbone.1.")):
            assert torch.equal(before[key], after[key]), key  # frozen, batch-norm statistics included
    assert not torch.equal(before["backbone.2.0.weight"], after["backbone.2.0.weight"])


def test_linear_probe_trains_only_the_head(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    pre = train(TrainConfig(data=data.path, epochs=3))
    probe = train(TrainConfig(data=data.path, strategy="linear-probe", backbone=pre.checkpoint_uri, epochs=30, shots=10))
    for key, value in pre.checkpoint["model"].items():
        if key.startswith("backbone."):
            assert torch.equal(value, probe.checkpoint["model"][key]), key
    assert probe.checkpoint["metrics"]["test_accuracy"] > 0.8


def test_random_shift_moves_images_within_bounds():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and torch.all(shifted.sum((1, 2, 3)) == 4)  # the blob stays whole
    assert (shifted != x).any(dim=(1, 2, 3)).float().mean() > 0.5


def test_the_stem_follows_the_image_size_unless_the_config_says():
    from tl_core.strategies import create_strategy

    assert defaults_for_shape("resnet18", [3, 224, 224]) == {"small_input": False}
    assert defaults_for_shape("resnet18", [1, 28, 28]) == {"small_input": True}
    assert defaults_for_shape("small_cnn", [1, 28, 28]) == {}
    photos = create_strategy(TrainConfig(data="unused", model="resnet18"))
    assert photos.build_model(2, [3, 224, 224], None)[1]["kwargs"] == {"small_input": False}
    told = create_strategy(TrainConfig(data="unused", model="resnet18", model_kwargs={"small_input": True}))
    assert told.build_model(2, [3, 224, 224], None)[1]["kwargs"] == {"small_input": True}


def test_models_take_small_inputs():
    for name, channels in [("small_cnn", 1), ("resnet18", 1), ("mobilenet_v3_small", 3)]:
        model = create_model(name, num_classes=7, in_channels=channels)
        assert model(torch.randn(2, channels, 16, 16)).shape == (2, 7)
        assert model.features(torch.randn(2, channels, 16, 16)).shape == (2, model.feature_dim)
