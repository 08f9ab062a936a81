"""Domain adaptation (`dann`, `mcc`): the gradient-reversal layer, the MCC loss, both methods raising
USPS accuracy above the MNIST source-only model with no USPS labels, and the clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.errors import UserError
from tl_core.evaluate import evaluate_loaded
from tl_core.strategies.domain_adaptation import dann_lambda, mcc_loss, reverse_gradient
from tl_core.train import train


def test_gradient_reversal_negates_and_scales_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.double)
    w = torch.randn(4, 6, dtype=torch.double)  # loss = sum(w * f(x)): its gradient through f is w * f'
    for lam in (1.0, 0.3, 2.5):
        # Forward: the identity, checked numerically (central differences of the layer's output).
        eps = 1e-6
        for i, j in [(0, 0), (2, 3), (3, 5)]:
            step = torch.zeros_like(x)
            step[i, j] = eps
            numeric = ((w * reverse_gradient(x + step, lam)).sum() - (w * reverse_gradient(x - step, lam)).sum()) / (2 * eps)
            assert numeric.item() == pytest.approx(w[i, j].item(), rel=1e-6)  # d identity = w
        # Backward: -lambda times the identity's autograd gradient.
        a = x.clone().requires_grad_(True)
        (w * a).sum().backward()
        b = x.clone().requires_grad_(True)
        (w * reverse_gradient(b, lam)).sum().backward()
        assert torch.allclose(b.grad, -lam * a.grad)
    assert dann_lambda(0.0) == 0.0 and dann_lambda(1.0) == pytest.approx(1.0, abs=1e-4)
    assert 0 < dann_lambda(0.1) < dann_lambda(0.5) < 1  # the paper's schedule grows from 0 towards 1


def test_mcc_loss_is_zero_when_confident_and_grows_with_confusion():
    k = 10
    labels = torch.arange(40) % k
    confident = 50.0 * F.one_hot(labels, k).float()  # one-hot predictions over distinct classes
    assert mcc_loss(confident, temperature=2.5).item() < 1e-4
    uniform = torch.zeros(40, k)
    assert mcc_loss(uniform, 2.5).item() == pytest.approx((k - 1) / k, abs=1e-5)  # the most confused batch
    torch.manual_seed(0)
    somewhat = confident / 10 + torch.randn(40, k)  # right but hesitant
    assert 1e-3 < mcc_loss(somewhat, 2.5).item() < mcc_loss(uniform, 2.5).item()
    # Its gradient lowers the confusion: one step along it makes the batch more confident.
    logits = somewhat.clone().requires_grad_(True)
    mcc_loss(logits, 2.5).backward()
    assert mcc_loss(logits.detach() - 5.0 * logits.grad, 2.5) < mcc_loss(somewhat, 2.5)


@pytest.fixture(scope="module")
def mnist_to_usps(module_workdir, shared_data):
    """A small MNIST -> USPS at 16x16: 2000 MNIST images, 1500 unlabeled USPS train images (the
    whole USPS test split scores), a source model pretrained for 8 epochs (about 63 % on USPS)."""
    source, _ = prepare(PrepareConfig(uri=f"idx:{shared_data}/mnist-test", image_size=16, max_per_class=200))
    target, _ = prepare(PrepareConfig(uri=f"npz:{shared_data}/usps/usps_16x16.npz", image_size=16, max_per_class=150))
    pre = train(TrainConfig(data=source.path, epochs=8, augment=2, eval_every=0, checkpoint_every=0))
    source_only = evaluate_loaded(pre.checkpoint, target).metrics["accuracy"]
    return source, target, pre, source_only


@pytest.mark.parametrize("strategy, epochs", [("dann", 8), ("mcc", 4)])
def test_adaptation_beats_source_only_without_target_labels(mnist_to_usps, strategy, epochs):
    source, target, pre, source_only = mnist_to_usps
    cfg = TrainConfig(data=target.path, source_data=source.path, backbone=pre.checkpoint_uri, strategy=strategy, shots=0,
                      epochs=epochs, optimizer="sgd", lr=0.01, eval_every=0, checkpoint_every=0)
    result = train(cfg).checkpoint
    assert result["metrics"]["train_images"] == 0  # not one USPS label
    assert result["metrics"]["test_accuracy"] > source_only + 0.10, (result["metrics"]["test_accuracy"], source_only)
    if strategy == "dann":  # the domain classifier is saved with the checkpoint, for resume
        assert any(k.endswith("weight") for k in result["strategy_state"])
    if strategy == "mcc":  # the method's own term, not only the training around it, does the work
        control = train(cfg.model_copy(update={"adapt_weight": 0.0})).checkpoint["metrics"]["test_accuracy"]
        assert result["metrics"]["test_accuracy"] > control + 0.03, (result["metrics"]["test_accuracy"], control)


def test_bad_sources_give_clear_errors(workdir):
    digits, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    low, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["0", "1", "2", "3", "4"]))
    bigger, _ = prepare(PrepareConfig(uri="sklearn:digits", image_size=16))
    base = {"data": digits.path, "strategy": "dann", "shots": 0, "epochs": 1}
    with pytest.raises(UserError, match="--source-data"):
        train(TrainConfig(**base))
    with pytest.raises(UserError, match="same classes"):
        train(TrainConfig(**base, source_data=low.path))
    with pytest.raises(UserError, match="same --image-size"):
        train(TrainConfig(**{**base, "strategy": "mcc"}, source_data=bigger.path))
    # shots=0 leaves a supervised strategy nothing to learn from: fit says which strategies can.
    with pytest.raises(UserError, match="no training images with shots=0.*dann, mcc"):
        train(TrainConfig(data=digits.path, strategy="scratch", shots=0, epochs=1))
