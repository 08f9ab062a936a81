"""Transfer strategies: each learns on real data; the feature cache; the distillation formula;
fine-tuning schedules; negative transfer flagged on a constructed case."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.strategies.distill import distillation_loss
from tl_core.strategies.finetune import Finetune
from tl_core.strategies.setfit import pair_loss
from tl_core.train import train


@pytest.fixture
def digits_split(workdir):
    """Source: digits 0-4 (all labels); target: digits 5-9 (few labels). Real data, fast."""
    source, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["0", "1", "2", "3", "4"], image_size=8))
    target, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["5", "6", "7", "8", "9"], image_size=8))
    backbone = train(TrainConfig(data=source.path, epochs=10, augment=1))
    return source, target, backbone


@pytest.mark.parametrize("options", [
    {"strategy": "linear-probe", "epochs": 100, "lr": 0.01},  # a head alone learns fast on cached features
    # Full-batch L-BFGS fits an unregularised head to 50 images exactly: it overfits more than Adam.
    {"strategy": "linear-probe", "optimizer": "lbfgs", "lr": 1.0, "epochs": 5, "batch_size": 1000, "min_accuracy": 0.6},
    {"strategy": "finetune"},
    {"strategy": "finetune", "freeze": 1, "backbone_lr_mult": 0.3},
    {"strategy": "finetune", "head_warmup_epochs": 5, "unfreeze_every": 5, "epochs": 60},
    {"strategy": "finetune", "l2sp_alpha": 0.01, "l2sp_beta": 0.001},
    {"strategy": "multitask"},
    # 0.717 on this machine on 2026-12-04, at 77a434a's unchanged code too (its CI saw > 0.75): the
    # figure moves with the machine; 0.7 still says it learns (chance is 0.20).
    {"strategy": "setfit", "backbone_lr_mult": 0.3, "min_accuracy": 0.7},
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_each_strategy_learns_on_real_digits(digits_split, options):
    source, target, backbone = digits_split
    options = dict(options)
    min_accuracy = options.pop("min_accuracy", 0.75)
    extra = {"source_data": source.path} if options["strategy"] == "multitask" else {}
    cfg = TrainConfig(**{"data": target.path, "backbone": backbone.checkpoint_uri, "shots": 10, "epochs": 30, **options, **extra})
    accuracy = train(cfg).checkpoint["metrics"]["test_accuracy"]
    assert accuracy > min_accuracy, accuracy  # 5 classes: chance is 0.20


def test_distill_student_learns_from_teacher_soft_labels(digits_split):
    _, target, backbone = digits_split
    teacher = train(TrainConfig(data=target.path, strategy="finetune", backbone=backbone.checkpoint_uri, shots=10, epochs=30))
    student = train(TrainConfig(data=target.path, strategy="distill", teacher=teacher.checkpoint_uri, shots=10, epochs=15,
                                use_unlabeled=True, model_kwargs={"width": 16}))
    assert student.checkpoint["model_spec"]["kwargs"]["width"] == 16  # a smaller student than the teacher
    assert student.checkpoint["metrics"]["test_accuracy"] > 0.75


def test_distillation_loss_follows_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, -1, -1])  # two unlabeled examples
    for temperature, alpha in [(1.0, 0.5), (4.0, 0.7), (2.0, 0.0), (3.0, 1.0)]:
        p_t = F.softmax(t / temperature, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / temperature, 1))).sum(1).mean()
        ce = F.cross_entropy(s[:4], y[:4])
        expected = alpha * kl * temperature**2 + (1 - alpha) * ce
        assert torch.allclose(distillation_loss(s, t, y, temperature, alpha), expected, atol=1e-6)
    # A higher temperature softens the teacher: the soft term changes, as the formula says.
    assert not torch.allclose(distillation_loss(s, t, y, 1.0, 1.0), distillation_loss(s, t, y, 4.0, 1.0))


def test_setfit_pair_loss_pulls_a_class_together_and_pushes_classes_apart():
    same, apart = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Two examples of one class: loss (cos - 1)^2; of two classes: (cos - 0)^2. Lengths do not matter.
    assert torch.isclose(pair_loss(same * 3, torch.tensor([0, 0])), torch.tensor(1.0))
    assert torch.isclose(pair_loss(apart, torch.tensor([0, 1])), torch.tensor(1.0))
    assert pair_loss(same, torch.tensor([0, 1])) == 0 and pair_loss(apart, torch.tensor([1, 1])) == 0
    # Positive and negative pairs weigh the same however many of each: five equal embeddings, four
    # of class 0 (6 positive pairs, error 0) and one of class 1 (4 negative pairs, error 1) give
    # 0.5, where a mean over all 10 pairs would give 0.4.
    z = torch.ones(5, 2)
    assert torch.isclose(pair_loss(z, torch.tensor([0, 0, 0, 0, 1])), torch.tensor(0.5))
    one = torch.ones(1, 2, requires_grad=True)
    assert pair_loss(one, torch.tensor([0])) == 0 and pair_loss(one, torch.tensor([0])).requires_grad


def test_feature_cache_hit_and_invalidation(digits_split):
    source, target, backbone = digits_split
    cfg = TrainConfig(data=target.path, strategy="linear-probe", backbone=backbone.checkpoint_uri, shots=5, epochs=5)
    first = train(cfg).checkpoint["metrics"]
    second = train(cfg.model_copy(update={"seed": 0, "lr": 2e-3})).checkpoint["metrics"]  # same images, same backbone
    assert first["feature_cache_hit"] == 0.0 and second["feature_cache_hit"] == 1.0
    other_images = train(cfg.model_copy(update={"shots": 6})).checkpoint["metrics"]
    assert other_images["feature_cache_hit"] == 0.0  # the data changed
    new_backbone = train(TrainConfig(data=source.path, epochs=2, seed=1))
    other_backbone = train(cfg.model_copy(update={"backbone": new_backbone.checkpoint_uri})).checkpoint["metrics"]
    assert other_backbone["feature_cache_hit"] == 0.0  # the backbone changed


def test_gradual_unfreezing_schedule_and_warmup_keep_backbone_fixed(digits_split):
    _, target, backbone = digits_split
    cfg = TrainConfig(data=target.path, strategy="finetune", backbone=backbone.checkpoint_uri, head_warmup_epochs=2,
                      unfreeze_every=3, shots=5, epochs=2)
    schedule = Finetune(cfg)
    blocks = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)], torch.nn.Flatten())  # last has no weights
    assert [schedule.training_blocks_from(e, blocks) for e in range(0, 12)] == [4, 4, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    # During the warm-up only the head moves: the backbone's weights and batch-norm stay as pretrained.
    warm = train(cfg).checkpoint["model"]
    for key, value in backbone.checkpoint["model"].items():
        if key.startswith("backbone."):
            assert torch.equal(value, warm[key]), key


def test_negative_transfer_is_flagged_on_a_backbone_pretrained_on_shuffled_labels(workdir, tmp_path):
    from tl_core.steps import transfer_step

    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shuffled.npz", x=digits.images, y=rng.permutation(digits.target))  # labels carry no signal
    shuffled, _ = prepare(PrepareConfig(uri=f"npz:{tmp_path / 'shuffled.npz'}"))
    target, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    noise = train(TrainConfig(data=shuffled.path, epochs=15))
    result = transfer_step(TrainConfig(data=target.path, strategy="linear-probe", backbone=noise.checkpoint_uri,
                                       shots=10, epochs=60))
    assert result["negative_transfer"] is True and result["gain_over_scratch"] < -0.05, result["gain_over_scratch"]
    import mlflow

    assert mlflow.get_run(result["run_id"]).data.tags["negative_transfer"] == "true"
    assert result["baseline"]["strategy"] == "scratch" and result["baseline"]["metrics"]["accuracy"] > 0.85


def test_strategies_that_score_other_tasks_skip_scratch_and_are_refused_where_a_classifier_is_needed(workdir):
    """A few-shot model is scored on episodes of unseen classes: no scratch baseline on the same
    labels, `tl run` and the registry refuse it with a clear error. A zero-label transfer has no
    scratch baseline either (nothing to train it on)."""
    from tl_core.config import ExperimentConfig, validate
    from tl_core.errors import UserError
    from tl_core.registry import register_model
    from tl_core.steps import transfer_step

    episodes, _ = prepare(PrepareConfig(uri="sklearn:digits", test_split="classes", test_fraction=0.5))
    result = transfer_step(TrainConfig(data=episodes.path, strategy="protonet", epochs=2, episodes_per_epoch=20,
                                       eval_episodes=40))
    assert "baseline" not in result and result["metrics"]["accuracy"] > 0.4  # 5-way episodes: chance 0.2
    assert result["metrics"]["n"] == 40 * 5 * 5  # queries of the 40 episodes, scored by the strategy
    with pytest.raises(UserError, match="registry serves classifiers"):
        register_model(result["checkpoint"], "digits-protonet")
    with pytest.raises(UserError, match="tl run cannot compare"):
        validate(ExperimentConfig, {"strategies": ["finetune", "protonet"]})

    digits, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    unlabeled = transfer_step(TrainConfig(data=digits.path, strategy="mcc", source_data=digits.path, shots=0, epochs=1))
    assert "baseline" not in unlabeled and unlabeled["metrics"]["accuracy"] > 0.5


def test_head_init_source_starts_from_the_backbones_own_head_matched_by_class_name(workdir):
    """--head-init source: the new head is the backbone's trained head, its rows picked by class
    name; the solved probe is pulled towards it; `auto` takes it for finetune only
    (bench/source_head.md); a backbone whose head knows other classes is refused, naming both."""
    from tl_core.errors import UserError
    from tl_core.strategies import create_strategy

    source, _ = prepare(PrepareConfig(uri="sklearn:digits", image_size=8))  # all ten digits
    target, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["9", "3", "7"], image_size=8))
    backbone = train(TrainConfig(data=source.path, epochs=2))
    rows = [source.classes.index(c) for c in target.classes]
    weight, bias = backbone.checkpoint["model"]["head.weight"][rows], backbone.checkpoint["model"]["head.bias"][rows]

    cfg = TrainConfig(data=target.path, strategy="finetune", backbone=backbone.checkpoint_uri, shots=5, epochs=5,
                      head_init="source")
    strategy = create_strategy(cfg)
    model, _ = strategy.build_model(len(target.classes), target.shape, backbone.checkpoint)
    assert torch.equal(model.head.weight, weight) and torch.equal(model.head.bias, bias)
    assert torch.equal(strategy.head_start, weight)  # what head_prior pulls towards
    # auto: finetune starts from the source's head where it fits, the solved probe does not (bench/source_head.md)
    for name, from_source in (("finetune", True), ("linear-probe", False)):
        auto, _ = create_strategy(cfg.model_copy(update={"head_init": "auto", "strategy": name})).build_model(
            len(target.classes), target.shape, backbone.checkpoint)
        assert torch.equal(auto.head.weight, weight) == from_source, name

    # C -> 0: the solved head is the source's (the bias is not penalised); C large: the labels' own.
    pulled = train(cfg.model_copy(update={"strategy": "linear-probe", "head_c": 1e-4})).checkpoint["model"]
    free = train(cfg.model_copy(update={"strategy": "linear-probe", "head_c": 100.0})).checkpoint["model"]
    assert (pulled["head.weight"] - weight).abs().max() < 0.05 < (free["head.weight"] - weight).abs().max()

    other, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["0", "1"], image_size=8))
    narrow = train(TrainConfig(data=other.path, epochs=1))
    with pytest.raises(UserError, match=rf"--head-init source: .*{re.escape(str(target.classes))}.*\['0', '1'\]"):
        train(cfg.model_copy(update={"backbone": narrow.checkpoint_uri}))
