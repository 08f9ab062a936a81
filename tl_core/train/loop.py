"""The one training core: `fit` reads top to bottom, `train_one_epoch` and `evaluate` do the work.

`fit` runs unchanged in this process (`LocalSession`) and as the `train_loop_per_worker` of a
Ray Train `TorchTrainer` (`RaySession`): the session is the only thing that knows where it runs
(DDP wrapping, distributed sampler, device, reporting, checkpoint restore).
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from tl_core.checkpoints import FORMAT, load_checkpoint, load_state
from tl_core.config import TrainConfig
from tl_core.data import load_prepared, sample_shots
from tl_core.data.transforms import random_shift
from tl_core.errors import UserError
from tl_core.models import INPUT_STATS
from tl_core.strategies import STRATEGIES, create_strategy
from tl_core.strategies.base import predict_chunks
from tl_core.strategies.logistic import stratified_folds


def train_one_epoch(net, strategy, loader, optimizer, device, augment: int, generator, amp: bool,
                    photos: bool = False) -> dict:
    """One pass over the training set; the strategy gives the loss of each batch."""
    total_loss, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment and strategy.trains_on_images and not photos and x.dtype != torch.uint8:
            # photos: cropped when decoded; texts (byte rows, uint8) are not shifted
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


def evaluate(strategy, model, chunks, classes: list[str], device, per_image: bool = False) -> dict:
    """Loss, accuracy and macro-F1 of the model on chunks of (images, labels), scored as its strategy scores it."""
    from tl_core.evaluate import classification_metrics

    logits, labels, names = predict_chunks(type(strategy), model, strategy.cfg, chunks, classes, device)
    metrics = classification_metrics(logits, labels, names).metrics  # the same figures tl evaluate reports
    result = {key: metrics[key] for key in ("loss", "accuracy", "macro_f1")}
    if per_image:  # which images it got right, in their order, one character each: auto compares candidates image by image
        result["correct"] = "".join("1" if right else "0" for right in (logits.argmax(1) == labels).tolist())
    return result


def training_rows(data, strategy, train_idx: np.ndarray, val_idx: np.ndarray):
    """What a run trains on, as rows of the train split, and the unlabeled rest of the pool
    (neither shots nor validation images; empty unless the strategy learns from unlabeled images).
    The rows are the labelled shots, or for a strategy that streams its unlabeled images too, the
    shots and the rest together, the rest labelled UNLABELED."""
    rest = np.zeros(0, dtype=np.int64)
    if strategy.uses_unlabeled:
        rest = np.setdiff1d(np.arange(len(data.labels("train"))), np.concatenate([train_idx, val_idx]))
    if strategy.uses_unlabeled and strategy.streams:
        return data.rows("train", np.union1d(train_idx, rest), unlabeled=rest), rest
    return data.rows("train", train_idx), rest


def streams(cfg: TrainConfig, data, rows, strategy) -> bool:
    """Whether the training rows stream from their shards rather than sitting in memory: when they
    are larger than `in_memory_mb` as float32, and for photos (cropped anew each epoch) where the
    strategy can. The driver of a Ray Train run asks the same question to build its Ray Dataset."""
    too_big = rows.float_bytes() > cfg.in_memory_mb * 2**20
    if too_big and not strategy.streams:
        can = ", ".join(sorted(name for name, s in STRATEGIES.items() if s.streams))
        raise UserError(
            f"strategy {cfg.strategy} needs its {len(rows)} training images in memory "
            f"({rows.float_bytes() / 2**20:.0f} MB > --in-memory-mb {cfg.in_memory_mb}): raise --in-memory-mb, "
            f"lower --shots, or use a strategy that streams ({can})")
    return too_big or (data.photos and strategy.streams)


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


def rows_seen(loader, session, pool_size: int) -> dict:
    """Of a streamed last epoch: the rows and the bytes of decoded images each worker trained on,
    the seconds it waited for them, and (on Ray Data, where the loader knows which rows it got)
    how many rows two workers both saw, which should be none."""
    counts = session.all_gather(torch.tensor([loader.rows_seen, loader.bytes_seen, loader.wait_seconds],
                                             dtype=torch.float64))
    out = {}
    for rank, (rows, size, wait) in enumerate(counts.view(-1, 3).tolist()):
        out[f"rows_seen_worker{rank}"], out[f"bytes_seen_worker{rank}"] = int(rows), int(size)
        out[f"input_wait_seconds_worker{rank}"] = wait  # of the last epoch: > 0 where reading is the bottleneck
    if session.world_size > 1 and getattr(loader, "indices_seen", None) is not None:
        seen = torch.zeros(pool_size, dtype=torch.int32)
        for idx in loader.indices_seen:
            seen[torch.from_numpy(idx)] += 1
        out["rows_seen_twice"] = int((session.all_gather(seen).sum(0) > 1).sum())
    return out


def fit(cfg: TrainConfig, session) -> dict:
    """Train one model as the config says; returns the final checkpoint (a plain dict)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = session.device
    data = load_prepared(cfg.data)
    pool_y = data.labels("train")
    train_idx, val_idx = sample_shots(pool_y, cfg.shots, cfg.seed, data.classes, cfg.val_per_class)
    if cfg.cv_folds:  # one fold of the labelled shots validates, the others train (--strategy auto)
        held = stratified_folds(pool_y[train_idx], cfg.cv_folds, cfg.seed)[cfg.cv_fold]
        train_idx, val_idx = np.delete(train_idx, held), train_idx[held]

    strategy = create_strategy(cfg)
    backbone = load_checkpoint(cfg.backbone) if cfg.backbone else None
    model, spec = strategy.build_model(len(data.classes), data.shape, backbone)
    # A pretrained network reads its inputs normalised as it was trained (EfficientNet-Lite: to
    # [-1, 1]), not by the dataset's own statistics; so does the source task trained beside it.
    data = data.normalised_as(INPUT_STATS.get(spec["name"]))
    if getattr(strategy, "source", None) is not None:
        strategy.source.normalised_as(INPUT_STATS.get(spec["name"]))
    labelled, test = data.rows("train", train_idx), data.rows("test")
    val_x, val_y = data.rows("train", val_idx).tensors()  # a few images per class: in memory
    trained, rest = training_rows(data, strategy, train_idx, val_idx)
    streamed = streams(cfg, data, trained, strategy)
    if streamed:
        train_x, train_y = strategy.stream_set(model, trained, data.normalise) or (None, torch.from_numpy(trained.labels()))
    else:
        # The unlabeled rest of the pool, for the strategies that use it (distillation on soft
        # labels, domain adaptation, simclr): it fits, or it would stream (see `streams`).
        unlabeled = data.rows("train", rest).tensors()[0] if strategy.uses_unlabeled else None
        train_x, train_y = strategy.train_set(model, *labelled.tensors(), unlabeled)
    epochs = strategy.epochs()  # 0 where the strategy fitted what it trains itself (a solved linear head)
    if not len(train_y) and strategy.needs_examples:
        raise UserError(f"strategy {cfg.strategy} has no training images with shots={cfg.shots}: give it labels "
                        "(--shots N) or use a strategy that learns from unlabeled images (dann, mcc, simclr)")

    def test_input():  # the test split as the strategy scores it (see Strategy.test_input)
        return strategy.test_input(model, test, data.normalise)

    def eval_input():  # what is validated each epoch: the validation images, else the test split
        return (model, [(val_x, val_y)]) if len(val_idx) else test_input()

    eval_name = "val" if len(val_idx) else "test"
    model = model.to(device)
    net = session.prepare_model(strategy.trainable(model))
    optimizer = make_optimizer(cfg, strategy.param_groups(net))
    per_worker_batch = max(1, cfg.batch_size // session.world_size)
    if train_x is None:  # the images themselves, streamed shard by shard
        loader = strategy.stream_batches(trained, data.normalise, per_worker_batch, session)
    else:
        loader = strategy.batches(train_x, train_y, per_worker_batch, session.rank, session.world_size)
    strategy.on_loader(loader, session.rank)
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
            # Tensors, and a text model's tokenizer (a string: tl_core.models.text.Tokenize)
            "model": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "strategy_state": strategy.extra_state(net),
            "epoch": epoch,
            "config": cfg.model_dump(),
            "history": history,
            "metrics": metrics,
            "data": {k: data.manifest[k] for k in ("hash", "uri", "classes", "shape", "mean", "std", "stored")},
            "backbone": {"uri": cfg.backbone, "sha256": backbone["sha256"]} if backbone else None,
        }

    tested = None
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        strategy.on_epoch_start(net, optimizer, epoch)
        metrics = {"epoch": epoch, **train_one_epoch(net, strategy, loader, optimizer, device, cfg.augment, generator, amp,
                                                      photos=data.photos and train_x is None)}
        strategy.on_epoch_end(net, epoch)
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        last = epoch == epochs - 1
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            result = evaluate(strategy, *eval_input(), data.classes, device)
            metrics.update({f"{eval_name}_accuracy": result["accuracy"], f"{eval_name}_loss": result["loss"]})
            if last and eval_name == "test":
                tested = result  # the final model on the test split: not scored twice (text encodes it anew)
        history.append(metrics)
        if not last and session.epoch_reports:  # the last epoch is reported below, with the final test metrics
            save = cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0
            session.report(metrics, checkpoint(epoch, metrics) if save and session.rank == 0 else None)

    # A run validated on a fold of its labels (an auto candidate) never reads the test split.
    final = None if cfg.cv_folds else tested or evaluate(strategy, *test_input(), data.classes, device)
    summary = {
        **({"test_accuracy": final["accuracy"], "test_loss": final["loss"], "test_macro_f1": final["macro_f1"]}
           if final else {}),
        "train_images": int(len(train_idx)),
        "train_seconds": time.perf_counter() - started,
        "workers": session.world_size,
    }
    if resumed is not None:  # this attempt went on from a checkpoint (a lost worker, or a run resumed by name)
        summary["resumed_at_epoch"] = start_epoch
    if len(val_idx):
        # A candidate of auto (validated on a fold of the labels) tells which held-out labels it got right
        summary.update({f"val_{k}": v for k, v in evaluate(strategy, model, [(val_x, val_y)], data.classes, device,
                                                           per_image=bool(cfg.cv_folds)).items()})
    if session.world_size > 1:
        summary["replica_spread"] = replica_spread(net, session)
    # The largest resident set of any worker so far (Linux reports KiB): what memory the run needs.
    summary["peak_rss_mb"] = float(session.all_gather(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])).max())
    if streamed and train_x is None:
        summary["streamed"] = 1.0
        summary.update(rows_seen(loader, session, len(pool_y)))
    if getattr(strategy, "source", None) is not None:  # a SourcePool (dann, mcc, multitask, simclr)
        summary["source_streamed"] = float(strategy.source.streamed)
    if getattr(strategy, "cache_hit", None) is not None:
        summary["feature_cache_hit"] = float(strategy.cache_hit)
    summary.update(strategy.run_metrics())
    ckpt = checkpoint(epochs - 1, summary)
    # The last epoch of the run's budget, also where none was trained (a solved head: nothing left to train)
    session.report({"epoch": cfg.epochs - 1, **(history[-1] if history else {}), **summary},
                   ckpt if session.rank == 0 else None)
    return ckpt
