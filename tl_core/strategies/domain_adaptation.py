"""`dann` and `mcc`: unsupervised domain adaptation, from a labelled source to a target whose
images are (mostly) unlabeled, with the same classes (e.g. MNIST -> USPS digits).

Both train one classifier on three batches per step, through ONE forward pass of the
concatenated images (one batch-norm batch, and DDP synchronises every gradient):

- the loader's batch of target images: the unlabeled rest of the target's train pool (all of it
  with `--shots 0`), and the labelled shots among them;
- a source batch of the same size from `--source-data`: drawn with replacement, or the next of
  its stream where it is larger than memory (see `SourcePool`);
- with target labels (`--shots N`), an extra batch of the same size drawn from the labelled
  shots, so that 10 labels per class are not drowned out by thousands of unlabeled images.

    loss = CE(source) + CE(labelled target) + adapt_weight * the method's term on the target batch

The method's term:

- `dann` (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by Backpropagation"): a small
  MLP, the domain classifier, tells source features from target features (binary
  cross-entropy). Between the features and it sits a gradient-reversal layer: the identity
  forward, gradient * -lambda backward. So the domain classifier learns to tell the domains
  apart while the backbone learns features it cannot tell apart. lambda grows over training as
  in the paper, 2 / (1 + exp(-10 p)) - 1 at progress p in [0, 1], so the noisy early domain
  signal does not disturb the features the classifier is still building on.
- `mcc` (Jin et al. 2020, "Minimum Class Confusion for Versatile Domain Adaptation"): no extra
  network. On the target batch's predictions (softmax at temperature `mcc_temperature`), the
  class-correlation matrix C = P^T W P (W weights confident, low-entropy examples more)
  counts how often the classifier hesitates between two classes; each row is normalised by its
  sum, and the loss is the off-diagonal mass / K. It pushes the target predictions to be
  confident and distinct classes apart, without any domain classifier.

Shared by both: the papers' learning-rate annealing over training progress p, lr / (1 + 10 p)^0.75
(without it dann oscillated on MNIST -> USPS); and after each epoch, the batch-norm statistics
the model tests with are re-estimated on the target's train images (AdaBN, Li et al. 2016): the
running statistics of the training batches, half source images, fit neither domain (on MNIST ->
USPS they cost dann up to 20 points). A target pool larger than memory (or photos) streams from
its shards; its statistics are then re-estimated on a seeded sample of it. So does a source
larger than memory.

The start point is `--backbone`, a checkpoint trained on the source: since the source and the
target share their classes, its head is loaded too (the source-only model is the start), unless
the class count differs (then a new head). Without `--backbone`: random init. A model is scored
as any classifier of the target's classes (the default `predict`). Images drawn here get the
loop's shift augmentation (`--augment`) too, so that the domain classifier cannot tell the
domains apart by the augmentation alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_core.checkpoints import load_state
from tl_core.data import load_manifest
from tl_core.data.prepare import UNLABELED
from tl_core.data.transforms import random_shift
from tl_core.errors import UserError
from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import SourcePool, Strategy, draw_batch, unwrap

DOMAIN_HIDDEN = 256  # width of the domain classifier's hidden layers (dann)
BATCH_NORM_IMAGES = 8192  # a streamed pool's batch-norm statistics are re-estimated on a sample this large


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lambda_ * grad, None  # no gradient for lambda


def reverse_gradient(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    return GradientReversal.apply(x, lambda_)


def dann_lambda(progress: float) -> float:
    """The paper's schedule of the reversal strength: 0 at the start, -> 1 at the end of training."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al. 2020) of a batch of target logits."""
    batch, classes = logits.shape
    p = F.softmax(logits.float() / temperature, dim=1)
    # Confident (low-entropy) examples say more about which classes are confused: weight
    # 1 + exp(-H), scaled so the weights sum to the batch size. No gradient through the weights.
    entropy = -(p * torch.log(p + 1e-5)).sum(1).detach()
    weight = 1.0 + torch.exp(-entropy)
    weight = batch * weight / weight.sum()
    confusion = (p * weight.unsqueeze(1)).T @ p  # K x K, symmetric
    # Category normalisation: each class's row sums to 1, so frequent classes do not dominate.
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / classes


@torch.no_grad()
def recalibrate_batch_norm(model: Classifier, x: torch.Tensor, device, batch_size: int = 512) -> None:
    """Re-estimate the running mean and variance of every batch-norm layer from the images `x`
    (AdaBN, Li et al. 2016); the weights are untouched. No-op for a model without batch norm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    for start in range(0, len(x), batch_size):
        model.backbone(x[start : start + batch_size].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


class AdaptationNet(nn.Module):
    """The classifier, and for dann the domain classifier behind a gradient-reversal layer: one
    forward pass gives the class logits and the domain logits (None for mcc)."""

    def __init__(self, model: Classifier, domain_classifier: nn.Module | None):
        super().__init__()
        self.model = model
        self.domain_classifier = domain_classifier
        self.reversal = 0.0  # lambda of the gradient-reversal layer, set by the strategy each step

    def forward(self, x: torch.Tensor):
        features = self.model.backbone(x)
        logits = self.model.head(features)
        if self.domain_classifier is None:
            return logits, None
        return logits, self.domain_classifier(reverse_gradient(features, self.reversal)).squeeze(1)


class DomainAdaptation(Strategy):
    """What dann and mcc share: the inputs, the start point, the batches and the loss but for the
    method's own term (`adaptation_loss`)."""

    uses_unlabeled = True
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None  # random init unless --backbone
        self.source = SourcePool(cfg, self.name)
        source = self.source.data
        target = load_manifest(cfg.data)  # fit loads its images; here only its classes and shape
        target_classes, target_shape = target["classes"], list(target["shape"])
        if source.classes != target_classes:
            raise UserError(f"the source {cfg.source_data} has classes {source.classes}, the target {cfg.data} "
                            f"{target_classes}: domain adaptation needs the same classes in the same order "
                            "(prepare both with the same --classes)")
        if list(source.shape) != target_shape:
            raise UserError(f"the source {cfg.source_data} has images of shape {list(source.shape)}, the target "
                            f"{target_shape}: prepare both with the same --image-size and --channels")
        self.labelled_x = self.labelled_y = self.target_x = None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_per_epoch, self.epoch, self.step, self.optimizer = 1, 0, 0, None

    # -- the method's own parts ---------------------------------------------------------------
    def domain_classifier(self, feature_dim: int) -> nn.Module | None:
        return None

    def before_forward(self, net: nn.Module) -> None:
        """Called before each step's forward pass (dann sets the reversal strength here)."""

    def adaptation_loss(self, net: nn.Module, target_logits: torch.Tensor, domain_logits: torch.Tensor | None,
                        n: int) -> torch.Tensor:
        """The method's term; `domain_logits` holds the source batch's n rows, then the target's n."""
        raise NotImplementedError

    # -- the shared parts -----------------------------------------------------------------------
    def build_model(self, num_classes, shape, backbone):
        model, spec = super().build_model(num_classes, shape, backbone)
        if backbone is not None and backbone["model_spec"]["num_classes"] == num_classes:
            # Same classes as the source: start from the source-only model, head included.
            load_state(model, backbone["model"], self.cfg.backbone)
        return model, spec

    def trainable(self, model: Classifier) -> nn.Module:
        return AdaptationNet(model, self.domain_classifier(model.feature_dim))

    def train_set(self, model, x, y, unlabeled):
        """The labelled shots and the unlabeled rest of the target's train pool (label -1); the shots
        are kept apart too, for the extra labelled batch of each step."""
        if len(y):
            self.labelled_x, self.labelled_y = x, y
        if unlabeled is None:
            unlabeled = x[:0]
        self.target_x = torch.cat([x, unlabeled])  # for the batch-norm statistics (on_epoch_end)
        return self.target_x, torch.cat([y, torch.full((len(unlabeled),), UNLABELED, dtype=y.dtype)])

    def stream_set(self, model, rows, normalise):
        """The pool streams (shots and unlabeled rows, larger than memory or photos); the shots are
        held for the extra labelled batch, and batch norm is re-estimated on a seeded sample."""
        shots = rows.data.rows(rows.split, np.setdiff1d(rows.indices, rows.unlabeled))
        if len(shots):
            self.labelled_x, self.labelled_y = shots.tensors()
        sample = np.random.default_rng(self.cfg.seed).permutation(rows.indices)[:BATCH_NORM_IMAGES]
        self.target_x = rows.data.rows(rows.split, np.sort(sample)).tensors()[0]
        return None

    def on_loader(self, loader, rank):
        self.steps_per_epoch = max(1, len(loader))  # for dann's schedule over training progress
        # Each worker draws its own source and labelled batches.
        self.generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + rank)

    def on_epoch_start(self, net, optimizer, epoch):
        super().on_epoch_start(net, optimizer, epoch)
        self.optimizer, self.epoch, self.step = optimizer, epoch, 0

    def on_epoch_end(self, net, epoch):
        # Batch norm's running statistics (used at test time) average the training batches, half
        # source images: re-estimated on the target's train images (no labels needed), they fit the
        # target, the domain the model is tested on.
        recalibrate_batch_norm(unwrap(net).model, self.target_x, next(net.parameters()).device)

    def progress(self) -> float:
        """Share of training done, in [0, 1]."""
        return min(1.0, (self.epoch + self.step / self.steps_per_epoch) / self.cfg.epochs)

    def shifted(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A drawn batch shifted as the loop shifts the loader's (photos are cropped when decoded)."""
        x, y = batch
        if self.cfg.augment and not self.source.data.photos:
            x = random_shift(x, self.cfg.augment, self.generator)
        return x, y

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        xs, ys = self.shifted(self.source.draw(n, self.generator, x.device))
        parts, labels = [xs, x], [y[y >= 0]]
        if self.labelled_x is not None:
            xl, yl = self.shifted(draw_batch(self.labelled_x, self.labelled_y, n, self.generator, x.device))
            parts.append(xl)
            labels.append(yl)
        # The papers' learning-rate annealing (both DANN and MCC): lr / (1 + 10 p)^0.75.
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] / (1 + 10 * self.progress()) ** 0.75
        self.before_forward(net)
        logits, domain_logits = net(torch.cat(parts))
        source_logits, target_logits = logits[:n], logits[n : 2 * n]
        loss = F.cross_entropy(source_logits, ys)
        labelled_logits = torch.cat([target_logits[y >= 0], logits[2 * n :]])
        if len(labelled_logits):
            loss = loss + F.cross_entropy(labelled_logits, torch.cat(labels))
        adapt = self.adaptation_loss(net, target_logits, None if domain_logits is None else domain_logits[: 2 * n], n)
        self.step += 1
        return loss + self.cfg.adapt_weight * adapt


@register_strategy
class DANN(DomainAdaptation):
    name = "dann"

    def domain_classifier(self, feature_dim):
        return nn.Sequential(nn.Linear(feature_dim, DOMAIN_HIDDEN), nn.ReLU(inplace=True),
                             nn.Linear(DOMAIN_HIDDEN, DOMAIN_HIDDEN), nn.ReLU(inplace=True), nn.Linear(DOMAIN_HIDDEN, 1))

    def before_forward(self, net):
        unwrap(net).reversal = dann_lambda(self.progress())  # read by the reversal layer in this forward pass

    def adaptation_loss(self, net, target_logits, domain_logits, n):
        is_source = torch.cat([torch.ones(n), torch.zeros(n)]).to(domain_logits.device)
        return F.binary_cross_entropy_with_logits(domain_logits.float(), is_source)

    def extra_state(self, net):
        return {k: v.detach().cpu() for k, v in unwrap(net).domain_classifier.state_dict().items()}

    def load_extra_state(self, net, state):
        if state:
            unwrap(net).domain_classifier.load_state_dict(state)


@register_strategy
class MCC(DomainAdaptation):
    name = "mcc"

    def adaptation_loss(self, net, target_logits, domain_logits, n):
        return mcc_loss(target_logits, self.cfg.mcc_temperature)
