"""The `Strategy` interface and the behaviour most strategies share."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.checkpoints import load_state
from tl_core.data import load_manifest, load_prepared
from tl_core.data.batches import ShuffledBatches, StreamedBatches
from tl_core.errors import UserError
from tl_core.models import Classifier, create_model, defaults_for_shape, model_spec, predict_logits

DEFAULT_MODEL = "small_cnn"


class Strategy:
    name = ""
    needs_backbone = True  # False: trains from random init (the backbone only names the architecture)
    trains_on_images = True  # False: trains on cached features, so no image augmentation
    uses_unlabeled = False  # True: the loop hands it the train pool's unlabeled images too
    # True: it can train on its training images streamed from shards (larger than memory, or
    # photos cropped anew each epoch) through `stream_set`: the labelled shots, and with
    # `uses_unlabeled` the whole pool, the unlabeled rows labelled UNLABELED. False: it needs its
    # training images in memory (every strategy with `uses_unlabeled` streams).
    streams = False
    # False where streamed batches are not a share of the rows (episodes): each worker then reads
    # its own batches' rows itself (`stream_batches`), and a Ray Train run builds no Ray Dataset.
    streams_shares = True
    # False where the model is no classifier of the dataset's classes (few-shot episodes on unseen
    # classes, zero-shot attribute signatures): then there is no scratch baseline on the same
    # labels, no `tl run`, and no registry pyfunc (which predicts the dataset's classes).
    classifies_dataset_classes = True
    needs_examples = True  # False: it may have nothing to train on (zero-shot with every class unseen)

    def __init__(self, cfg):
        self.cfg = cfg
        self.head_start: torch.Tensor | None = None  # the head's weights as --head-init set them (source, descriptions)
        # The start is text's class names read as their own descriptions (--head-init auto, no
        # descriptions file): a guess, which a solved head keeps only where the labels support it.
        self.head_start_guessed = False
        self.head_start_described = False  # the start is the zero-shot head of a descriptions file's sentences

    # -- the model ---------------------------------------------------------------------------
    def architecture(self, backbone: dict | None, shape: list[int]) -> tuple[str, dict]:
        """Model name and kwargs: the backbone's when there is one, else the config's over the
        architecture's defaults for images of `shape` [C, H, W]."""
        in_channels = shape[0]
        if backbone is None:
            name = self.cfg.model or DEFAULT_MODEL
            return name, {**defaults_for_shape(name, shape), **self.cfg.model_kwargs}
        spec = backbone["model_spec"]
        if self.cfg.model and self.cfg.model != spec["name"]:
            raise UserError(
                f"the backbone is a {spec['name']} but --model is {self.cfg.model}: drop --model or use a "
                f"{self.cfg.model} backbone"
            )
        if spec["in_channels"] != in_channels:
            raise UserError(
                f"the backbone takes {spec['in_channels']}-channel images but the target has {in_channels}: "
                f"prepare the target with --channels {spec['in_channels']}"
            )
        return spec["name"], {**spec.get("kwargs", {}), **self.cfg.model_kwargs}

    def build_model(self, num_classes: int, shape: list[int], backbone: dict | None) -> tuple[Classifier, dict]:
        """A model for `num_classes` on images of `shape` [C, H, W], with pretrained backbone
        weights if the strategy uses them."""
        if self.needs_backbone and backbone is None:
            raise UserError(f"strategy {self.name} needs a pretrained backbone: pass --backbone (see tl pretrain)")
        name, kwargs = self.architecture(backbone, shape)
        in_channels = shape[0]
        model = create_model(name, num_classes, in_channels, **kwargs)
        if self.needs_backbone:
            load_state(model.backbone, backbone_state(backbone), self.cfg.backbone, part="backbone")
        start, source = head_start(self.cfg, self.name, name, backbone)
        if start == "source":
            model.head.weight.data, model.head.bias.data = source
            self.head_start = model.head.weight.detach().clone()
        elif start == "descriptions":
            from tl_core.strategies.zero_shot import description_head, descriptions_of, refuse_glyphs_for

            refuse_glyphs_for(name, self.cfg)
            model.head.weight.data = description_head(model, self.cfg, shape)
            model.head.bias.data.zero_()
            self.head_start = model.head.weight.detach().clone()
            self.head_start_described = bool(descriptions_of(self.cfg))  # else the class names, read as descriptions
            self.head_start_guessed = self.cfg.head_init == "auto" and not self.head_start_described
        return model, model_spec(name, num_classes, in_channels, kwargs)

    def head_penalty(self, net: nn.Module) -> torch.Tensor | float:
        """head_prior/2 * ||W - W_start||^2 on a head that started from the source's head or the
        class descriptions (the trainable module is the head itself, or holds it as `.head`), else 0."""
        if self.head_start is None or not self.cfg.head_prior:
            return 0.0
        head = unwrap(net)
        weight = getattr(head, "head", head).weight
        return self.cfg.head_prior / 2 * ((weight - self.head_start.to(weight.device)) ** 2).sum()

    # -- what trains, on what --------------------------------------------------------------
    def trainable(self, model: Classifier) -> nn.Module:
        """The module the optimiser updates (and DDP wraps)."""
        return model

    def train_set(self, model: Classifier, x: torch.Tensor, y: torch.Tensor,
                  unlabeled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the trainable module trains on: the labelled images by default. Label -1 marks
        an unlabeled example."""
        return x, y

    def stream_set(self, model: Classifier, rows, normalise) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a streamed labelled set (`tl_core.data.prepare.Rows`): what to train on in memory
        instead (e.g. cached features), or None to train on the images themselves, streamed."""
        return None

    def test_input(self, model: Classifier, rows, normalise) -> tuple[nn.Module, Iterable]:
        """What scores the test split during training, and the chunks of (inputs, labels) it
        scores: the model on the normalised images, a shard at a time, by default; a frozen
        backbone's strategy may score its head on cached features instead."""
        return model, ((normalise(x), torch.from_numpy(y)) for x, y in rows.chunks())

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int):
        """One worker's training batches, an iterable with `set_epoch` and `len`: shuffled
        mini-batches by default; episodes for the few-shot strategies."""
        return ShuffledBatches(x, y, batch_size, self.cfg.seed, rank, world_size)

    def stream_batches(self, rows, normalise, batch_size: int, session):
        """One worker's training batches streamed from the shards of `rows`: its share of them, in
        this process or through Ray Data (see `session.stream`)."""
        return session.stream(rows, normalise, batch_size, self.cfg.seed, augment=self.cfg.augment > 0)

    def on_loader(self, loader, rank: int) -> None:
        """The loader this worker trains from (in memory or streamed), once before the first epoch."""

    def param_groups(self, net: nn.Module) -> list[dict]:
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": self.cfg.lr}]

    def epochs(self) -> int:
        """The epochs the loop trains (after `train_set`): --epochs, or 0 where the strategy has
        fitted what it trains itself (linear-probe's head, solved to its optimum)."""
        return self.cfg.epochs

    def run_metrics(self) -> dict:
        """Figures of the run the strategy knows (e.g. the C its solved head chose), for its summary."""
        return {}

    def on_epoch_start(self, net: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Before each epoch: train mode, and any schedule (unfreezing, warm-up)."""
        net.train()

    def on_epoch_end(self, net: nn.Module, epoch: int) -> None:
        """After each epoch's training steps, before it is evaluated (e.g. re-estimate batch-norm
        statistics)."""

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x), y) + self.head_penalty(net)

    @classmethod
    def predict(cls, model: Classifier, cfg, x: torch.Tensor, y: torch.Tensor, classes: list[str],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """What evaluation scores: logits, the labels they are scored against, and the class
        names of the logits' columns. By default the model's logits over the dataset's classes.
        A classmethod, so a checkpoint can be evaluated from its config alone; strategies whose
        model is no classifier over the dataset's classes (few-shot episodes, zero-shot
        attributes) override it."""
        return predict_logits(model, x, device), y, classes

    @classmethod
    def set_input(cls, model: Classifier, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Where `predict` scores a split as one set (an override of it): what that set holds of
        each chunk of images, made a chunk at a time. The images themselves by default; their
        features (small) where that is all `predict` needs (protonet's episodes)."""
        return x

    # State beyond the model's own weights (e.g. an extra head), saved in checkpoints for resume.
    def extra_state(self, net: nn.Module) -> dict:
        return {}

    def load_extra_state(self, net: nn.Module, state: dict) -> None:
        pass


def predict_chunks(strategy: type[Strategy], model: Classifier, cfg, chunks, classes: list[str],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`strategy.predict` over a split given as chunks of (normalised images, labels): chunk by
    chunk (one shard of images held at a time) where the strategy scores each image alone, as
    one set where it scores the set as a whole (few-shot episodes, zero-shot signatures), that set
    made a chunk at a time (`set_input`)."""
    if strategy.predict.__func__ is not Strategy.predict.__func__:
        parts = [(strategy.set_input(model, x, device), y) for x, y in chunks]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return strategy.predict(model, cfg, x, y, classes, device)
    logits, labels = [], []
    for x, y in chunks:
        chunk_logits, chunk_labels, _ = strategy.predict(model, cfg, x, y, classes, device)
        logits.append(chunk_logits)
        labels.append(chunk_labels)
    if not logits:
        return torch.zeros(0, len(classes)), torch.zeros(0, dtype=torch.long), classes
    return torch.cat(logits), torch.cat(labels), classes


def backbone_state(ckpt: dict) -> dict:
    """The backbone's part of a checkpoint's state_dict (the head is left behind)."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


class SourcePool:
    """The labelled source task (`--source-data`) that a strategy trains beside the target
    (multitask, dann, mcc, simclr), drawn from a batch at a time. Its train split is held in
    memory when it fits in `in_memory_mb` as float32 (batches drawn with replacement, the fast
    path); larger, or photos (cropped anew each time), it streams from its shards: pass after pass,
    each in a new order, one shard and the next held at a time."""

    def __init__(self, cfg, strategy: str):
        if not cfg.source_data:
            raise UserError(f"strategy {strategy} needs the source task: pass --source-data with a prepared dataset")
        self.data = load_prepared(cfg.source_data)
        self.rows = self.data.rows("train")
        self.streamed = self.rows.float_bytes() > cfg.in_memory_mb * 2**20 or self.data.photos
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # read on first use, not here:
        # a strategy is also built where it never trains (a Ray run's driver checks its settings)
        self.augment = cfg.augment > 0
        self.batch_size = cfg.batch_size
        self._passes = None  # the stream's batches, once the first draw started it
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last streamed batch left over

    def __len__(self) -> int:
        return len(self.rows)

    def normalised_as(self, stats: dict | None) -> None:
        """Normalise the source's images by `stats` (the network's own; see PreparedDataset.normalised_as)."""
        self.data = self.data.normalised_as(stats)
        self.rows = self.data.rows("train")

    @property
    def x(self) -> torch.Tensor | None:
        """The normalised images, in memory (None where the source streams)."""
        return None if self.streamed else self._in_memory()[0]

    @property
    def y(self) -> torch.Tensor | None:
        return None if self.streamed else self._in_memory()[1]

    def _in_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self.rows.tensors()
        return self._tensors

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` images and labels: drawn at random (in memory), or the next `n` of the stream."""
        if not self.streamed:
            return draw_batch(self.x, self.y, n, generator, device)
        if self._passes is None:  # seeded by the caller's generator: each worker its own order
            self._passes = self._stream(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        x, y = self._held if self._held is not None else next(self._passes)
        while len(y) < n:
            more_x, more_y = next(self._passes)
            x, y = torch.cat([x, more_x]), torch.cat([y, more_y])
        self._held = (x[n:], y[n:]) if len(y) > n else None
        return x[:n].to(device), y[:n].to(device)

    def _stream(self, seed: int):
        from itertools import count

        batches = StreamedBatches(self.rows, self.data.normalise, self.batch_size, seed, self.augment)
        for number in count():
            batches.set_epoch(number)
            yield from batches


def draw_batch(x: torch.Tensor, y: torch.Tensor, n: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` examples drawn with replacement: a batch of a second set beside the loader's, which
    sets the epoch's length (the source task's images in memory; a few labelled shots among many
    unlabeled)."""
    pick = torch.randint(0, len(y), (n,), generator=generator)
    return x[pick].to(device), y[pick].to(device)


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(net, "module", net)


def has_source_head(ckpt: dict) -> bool:
    """Whether the checkpoint's head is a classifier trained on its source's labels: a tl training
    on labels (not a bare backbone, a packaged encoder, or simclr with --shots 0, whose head stays
    at random init), of a strategy that classifies its dataset's classes."""
    from tl_core.strategies import STRATEGIES

    config = ckpt.get("config") or {}
    strategy = STRATEGIES.get(config.get("strategy", "scratch"))
    return ("data" in ckpt and "head.weight" in ckpt["model"] and config.get("shots", None) != 0
            and (strategy is None or strategy.classifies_dataset_classes))


def source_head(ckpt: dict | None, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The backbone checkpoint's own head, its rows in the order of `classes`, where it was trained
    on labels of every one of them (MNIST's digits for USPS's, a font's for sklearn's: the same
    names taken to mean the same classes); None otherwise."""
    if ckpt is None or not has_source_head(ckpt):
        return None
    names = [str(c) for c in ckpt["data"].get("classes") or []]
    weight = ckpt["model"]["head.weight"]
    if len(names) != len(weight) or not set(classes) <= set(names):
        return None
    rows = [names.index(c) for c in classes]
    return weight[rows].float().clone(), ckpt["model"]["head.bias"][rows].float().clone()


def head_start(cfg, strategy: str, model_name: str, backbone: dict | None) -> tuple[str, tuple | None]:
    """Where the new head starts, --head-init resolved: `source` (the backbone's own head, where it
    was trained on the target's classes; returned with it, its (weight, bias)), `descriptions` (the
    zero-shot classifier of the class descriptions) or `random`. `auto` (the default): for `finetune`, the source's head where it
    fits, else as for the others: the descriptions where the data has them
    (`head_from_descriptions`), else random.

    Why finetune only (bench/source_head.md, MNIST-test -> USPS and fonts -> sklearn's digits):
    fine-tuning moves the head with the network, so a head that knows the classes is a warm start,
    +7.6, +2.2 and +0.9 points at 1, 5 and 10 shots on the first pair, within 0.8 of a random head
    on the second. A solved probe keeps the start wherever its few labels say nothing, so a source
    head that fits the target less well than its features do stays wrong: +7.3 on the first pair
    at 1 shot, -5.7 on the second."""
    from tl_core.strategies.zero_shot import head_from_descriptions

    if cfg.head_init == "source" or (cfg.head_init == "auto" and strategy == "finetune"):
        classes = load_manifest(cfg.data)["classes"]
        source = source_head(backbone, classes)
        if source is not None:
            return "source", source
        if cfg.head_init == "source":
            known = backbone.get("data", {}).get("classes") if backbone and has_source_head(backbone) else None
            raise UserError(f"--head-init source: the backbone's head was not trained on the target's classes {classes} "
                            f"(its own: {known or 'none, it has no trained head'}): pass --head-init random, or a "
                            "backbone trained on these classes")
    return ("descriptions" if head_from_descriptions(cfg, strategy, model_name) else "random"), None
