"""The one training core: `fit` reads top to bottom, `train_one_epoch` and `evaluate` do the work.

`fit` runs unchanged in this process (`LocalSession`) and as the `train_loop_per_worker` of a
Ray Train `TorchTrainer` (`RaySession`): the session is the only thing that knows where it runs
(DDP wrapping, distributed sampler, device, reporting, checkpoint restore).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from tl_core.checkpoints import FORMAT, load_checkpoint, load_state
from tl_core.config import TrainConfig
from tl_core.data import load_prepared, sample_shots
from tl_core.data.transforms import random_shift
from tl_core.errors import UserError
from tl_core.strategies import create_strategy


def train_one_epoch(net, strategy, loader, optimizer, device, augment: int, generator, amp: bool) -> dict:
    """One pass over the training set; the strategy gives the loss of each batch."""
    total_loss, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment and strategy.trains_on_images:
            x = random_shift(x, augment, generator)

        def closure():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = strategy.loss(net, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()}: lower the learning rate")
            loss.backward()
            return loss

        if isinstance(optimizer, torch.optim.LBFGS):
            loss = optimizer.step(closure)  # calls the closure several times per step
        else:
            loss = closure()
            optimizer.step()
        total_loss += loss.item() * len(y)
        seen += len(y)
    return {"train_loss": total_loss / max(seen, 1)}


def evaluate(strategy, model, x: torch.Tensor, y: torch.Tensor, classes: list[str], device) -> dict:
    """Loss and accuracy of the model on (x, y), scored as its strategy scores it."""
    logits, labels, _ = strategy.predict(model, strategy.cfg, x, y, classes, device)
    return {"loss": F.cross_entropy(logits, labels).item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    for group in groups:
        group.setdefault("base_lr", group.get("lr", cfg.lr))  # schedules scale from here
    if cfg.optimizer == "lbfgs":  # full-batch quasi-Newton: fast for a linear head on cached features
        params = [p for g in groups for p in g["params"]]
        return torch.optim.LBFGS(params, lr=cfg.lr, max_iter=20, history_size=10, line_search_fn="strong_wolfe")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def replica_spread(net, session) -> float:
    """max - min over workers of a checksum of the weights: 0.0 when DDP kept them identical."""
    checksum = torch.tensor([sum(p.detach().double().sum().item() for p in net.parameters())])
    values = session.all_gather(checksum)
    return float(values.max() - values.min())


def fit(cfg: TrainConfig, session) -> dict:
    """Train one model as the config says; returns the final checkpoint (a plain dict)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = session.device
    data = load_prepared(cfg.data)
    train_pool_x, train_pool_y = data.split("train")
    train_idx, val_idx = sample_shots(train_pool_y, cfg.shots, cfg.seed, data.classes, cfg.val_per_class)
    test_x, test_y = data.normalise(data.split("test")[0]), torch.from_numpy(data.split("test")[1])
    val_x, val_y = data.normalise(train_pool_x[val_idx]), torch.from_numpy(train_pool_y[val_idx])
    eval_name, eval_x, eval_y = ("val", val_x, val_y) if len(val_idx) else ("test", test_x, test_y)

    strategy = create_strategy(cfg)
    backbone = load_checkpoint(cfg.backbone) if cfg.backbone else None
    in_channels = data.shape[0]
    model, spec = strategy.build_model(len(data.classes), in_channels, backbone)
    # Images of the train pool that are neither shots nor validation: unlabeled data, for the
    # strategies that use it (distillation on soft labels, domain adaptation).
    unlabeled = None
    if strategy.uses_unlabeled:
        rest = np.setdiff1d(np.arange(len(train_pool_y)), np.concatenate([train_idx, val_idx]))
        unlabeled = data.normalise(train_pool_x[rest])
    train_x, train_y = strategy.train_set(model, data.normalise(train_pool_x[train_idx]),
                                          torch.from_numpy(train_pool_y[train_idx]), unlabeled)
    if not len(train_y):
        raise UserError(f"strategy {cfg.strategy} has no training images with shots={cfg.shots}: give it labels "
                        "(--shots N) or use a strategy that learns from unlabeled images (dann, mcc, simclr)")

    model = model.to(device)
    net = session.prepare_model(strategy.trainable(model))
    optimizer = make_optimizer(cfg, strategy.param_groups(net))
    per_worker_batch = max(1, cfg.batch_size // session.world_size)
    loader = strategy.batches(train_x, train_y, per_worker_batch, session.rank, session.world_size)
    generator = torch.Generator().manual_seed(cfg.seed + session.rank)  # augmentation differs per worker
    amp = cfg.amp and device.type == "cuda"

    history, start_epoch = [], 0
    resumed = session.restore()
    if resumed is not None:
        load_state(model, resumed["model"], "the resumed checkpoint")
        strategy.load_extra_state(net, resumed.get("strategy_state") or {})
        optimizer.load_state_dict(resumed["optimizer"])
        history, start_epoch = resumed["history"], resumed["epoch"] + 1

    def checkpoint(epoch: int, metrics: dict) -> dict:
        return {
            "format": FORMAT,
            "model_spec": spec,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "strategy_state": strategy.extra_state(net),
            "epoch": epoch,
            "config": cfg.model_dump(),
            "history": history,
            "metrics": metrics,
            "data": {k: data.manifest[k] for k in ("hash", "uri", "classes", "shape", "mean", "std")},
            "backbone": {"uri": cfg.backbone, "sha256": backbone["sha256"]} if backbone else None,
        }

    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        strategy.on_epoch_start(net, optimizer, epoch)
        metrics = {"epoch": epoch, **train_one_epoch(net, strategy, loader, optimizer, device, cfg.augment, generator, amp)}
        strategy.on_epoch_end(net, epoch)
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        last = epoch == cfg.epochs - 1
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            result = evaluate(strategy, model, eval_x, eval_y, data.classes, device)
            metrics.update({f"{eval_name}_accuracy": result["accuracy"], f"{eval_name}_loss": result["loss"]})
        history.append(metrics)
        if not last:  # the last epoch is reported below, with the final test metrics
            save = cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0
            session.report(metrics, checkpoint(epoch, metrics) if save and session.rank == 0 else None)

    final = evaluate(strategy, model, test_x, test_y, data.classes, device)
    summary = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "train_images": int(len(train_idx)),
        "train_seconds": time.perf_counter() - started,
        "workers": session.world_size,
    }
    if len(val_idx):
        summary.update({f"val_{k}": v for k, v in evaluate(strategy, model, val_x, val_y, data.classes, device).items()})
    if session.world_size > 1:
        summary["replica_spread"] = replica_spread(net, session)
    if getattr(strategy, "cache_hit", None) is not None:
        summary["feature_cache_hit"] = float(strategy.cache_hit)
    ckpt = checkpoint(cfg.epochs - 1, summary)
    session.report({**(history[-1] if history else {}), **summary}, ckpt if session.rank == 0 else None)
    return ckpt
