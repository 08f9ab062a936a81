"""Evaluation: a checkpoint on a prepared dataset's split -> metrics (+ confusion matrix, curves).

Metrics: accuracy, macro-F1, per-class accuracy, expected calibration error (15 bins), the
confusion matrix. `negative_transfer` compares a transfer's accuracy with its scratch baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tl_core.checkpoints import load_checkpoint, load_state, require_trained
from tl_core.config import TrainConfig, validate
from tl_core.data import PreparedDataset, load_prepared, normalise
from tl_core.errors import UserError
from tl_core.models import build_from_spec
from tl_core.strategies import STRATEGIES
from tl_core.strategies.base import predict_chunks

ECE_BINS = 15


@dataclass
class Evaluation:
    metrics: dict  # scalars: accuracy, macro_f1, ece, loss, per-class accuracy as class_acc/<name>
    confusion: np.ndarray
    classes: list[str]


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> Evaluation:
    k = len(classes)
    probs = torch.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    y_np, pred_np = y.numpy(), pred.numpy()
    confusion = np.bincount(y_np * k + pred_np, minlength=k * k).reshape(k, k)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    correct = (pred == y).float()
    # ECE: |accuracy - confidence| per confidence bin, weighted by the bin's share of samples.
    bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = sum(
        (bins == b).float().mean().item() * abs(correct[bins == b].mean().item() - conf[bins == b].mean().item())
        for b in range(ECE_BINS)
        if (bins == b).any()
    )
    metrics = {
        "accuracy": correct.mean().item(),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "ece": float(ece),
        "loss": torch.nn.functional.cross_entropy(logits.float(), y).item(),
        "n": int(len(y)),
    }
    metrics.update({f"class_acc/{name}": float(recall[i]) for i, name in enumerate(classes) if present[i]})
    return Evaluation(metrics, confusion, classes)


def check_fits(ckpt: dict, data: PreparedDataset, uri: str) -> None:
    require_trained(ckpt, uri)
    reads_text = ckpt["data"].get("stored") == "text"
    if reads_text != data.text:
        kind = {True: "text", False: "images"}
        raise UserError(f"{uri} was trained on {kind[reads_text]} but {data.path} holds {kind[data.text]}: evaluate on "
                        f"{kind[reads_text]}")
    trained = ckpt["data"]["classes"]
    if trained != data.classes:
        raise UserError(
            f"{uri} was trained on data with {len(trained)} classes {trained} but {data.path} has {len(data.classes)} "
            f"{data.classes}: evaluate on data with the model's classes"
        )
    # A text model reads texts of any length (it tokenises the bytes and cuts at its max_tokens).
    if not reads_text and list(ckpt["data"]["shape"]) != list(data.shape):
        raise UserError(
            f"the model takes images of shape {ckpt['data']['shape']} but {data.path} has {data.shape}: "
            f"prepare the data with --image-size {ckpt['data']['shape'][-1]} --channels {ckpt['data']['shape'][0]}"
        )


def evaluate_checkpoint(model_uri: str, data_uri: str, split: str = "test") -> Evaluation:
    return evaluate_loaded(load_checkpoint(model_uri), load_prepared(data_uri), split, model_uri)


def evaluate_loaded(ckpt: dict, data: PreparedDataset, split: str = "test", uri: str = "the checkpoint") -> Evaluation:
    check_fits(ckpt, data, uri)
    model = build_from_spec(ckpt["model_spec"])
    load_state(model, ckpt["model"], uri)
    # As the model was trained: with its training data's statistics; a shard at a time.
    chunks = ((normalise(x, ckpt["data"]), torch.from_numpy(y)) for x, y in data.rows(split).chunks())
    # Scored as the model's strategy scores it: logits over the classes by default, episodes for
    # few-shot models, attribute signatures for zero-shot ones.
    try:
        cfg = validate(TrainConfig, ckpt["config"])
    except UserError as err:
        raise UserError(f"{uri} holds a config this tl cannot use ({err}): train it again") from None
    logits, labels, classes = predict_chunks(STRATEGIES[cfg.strategy], model, cfg, chunks, data.classes,
                                             torch.device("cpu"))
    return classification_metrics(logits, labels, classes)


def negative_transfer(accuracy: float, scratch_accuracy: float, tolerance: float = 0.0) -> bool:
    """True when a transfer scores below training the same model from scratch on the same labels."""
    return accuracy < scratch_accuracy - tolerance


def plot_confusion(ev: Evaluation, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(ev.classes)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * k, 1 + 0.4 * k))
    ax.imshow(ev.confusion, cmap="Blues")
    ax.set_xticks(range(k), ev.classes, fontsize=7)
    ax.set_yticks(range(k), ev.classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if ev.confusion[i, j]:
                ax.text(j, i, int(ev.confusion[i, j]), ha="center", va="center", fontsize=6)
    ax.set_title(title or f"accuracy {ev.metrics['accuracy']:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    for key in ("val_accuracy", "test_accuracy"):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker=".", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
