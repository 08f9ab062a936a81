"""`distill`: knowledge distillation (Hinton et al. 2015).

A teacher (a checkpoint trained on the target's classes, e.g. a fine-tuned larger backbone)
gives soft labels at temperature T; the student (`--model`, from `--backbone` if given, else
random init) trains on

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2  +  (1 - alpha) * CE(student, y)

The T^2 keeps the soft term's gradients on the scale of the hard term's as T grows. With
`use_unlabeled`, the train pool's unlabeled images join the batches with the soft term only.

Texts are never augmented, so a text's soft labels are the same every epoch: the teacher's
logits of each text are kept (a few floats, keyed by a digest of its bytes) and the teacher, a
22 M parameter encoder where the student is a small CNN, reads each text once instead of once
an epoch. Images are shifted anew each batch, so the teacher sees each batch.

The two networks may read images normalised differently: a small_cnn student reads the
dataset's own mean and std, an EfficientNet teacher [-1, 1] (`tl_core.models.INPUT_STATS`). The
batches come normalised for the student, so the teacher reads them through `Renormalise`, into
the statistics its checkpoint was trained with. (Fed the student's, a linear probe of the packaged
EfficientNet on hymenoptera, 10 shots a class, seed 0, scored 90.2 % of the 153 val photos where
it scores 92.8 %: the soft labels it teaches would be those of a worse teacher.)
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.checkpoints import load_checkpoint, load_state
from tl_core.data.prepare import UNLABELED
from tl_core.errors import UserError
from tl_core.models import INPUT_STATS, build_from_spec
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                      alpha: float) -> torch.Tensor:
    """The soft term on every example, the hard term on the labelled ones (y >= 0)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
    labelled = y >= 0
    hard = F.cross_entropy(student[labelled], y[labelled]) if labelled.any() else student.sum() * 0.0
    return alpha * soft + (1 - alpha) * hard


class Renormalise(nn.Module):
    """Images normalised by one {"mean", "std"} (per channel) -> the same images normalised by another."""

    def __init__(self, given: dict, wanted: dict):
        super().__init__()
        given_std, wanted_std = torch.tensor(given["std"]), torch.tensor(wanted["std"])
        shift = (torch.tensor(given["mean"]) - torch.tensor(wanted["mean"])) / wanted_std
        self.register_buffer("scale", (given_std / wanted_std).view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@register_strategy
class Distill(Strategy):
    name = "distill"
    streams = True  # the pool streams with its unlabeled rows labelled UNLABELED: the loss takes both

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None  # the student may start pretrained or from scratch
        self.uses_unlabeled = cfg.use_unlabeled
        if not cfg.teacher:
            raise UserError("strategy distill needs a teacher: pass --teacher with a checkpoint trained on the target classes")
        self.teacher_ckpt = load_checkpoint(cfg.teacher)
        self.teacher: nn.Module | None = None
        self.soft_labels: dict[bytes, torch.Tensor] = {}  # text digest -> the teacher's logits

    def build_model(self, num_classes, shape, backbone):
        spec = self.teacher_ckpt["model_spec"]
        if spec["num_classes"] != num_classes or spec["in_channels"] != shape[0]:
            raise UserError(
                f"the teacher {self.cfg.teacher} predicts {spec['num_classes']} classes from {spec['in_channels']}-channel "
                f"images, the target has {num_classes} classes and {shape[0]} channels: use a teacher trained on this target"
            )
        self.teacher = build_from_spec(spec)
        load_state(self.teacher, self.teacher_ckpt["model"], self.cfg.teacher, part="teacher")
        model, student_spec = super().build_model(num_classes, shape, backbone)
        trained_on = self.teacher_ckpt["data"]
        if trained_on.get("stored") != "text":  # images: from the student's normalisation into the teacher's
            from tl_core.data import load_prepared

            # the student's statistics by the training loop's own rule (`normalised_as`)
            student = load_prepared(self.cfg.data).normalised_as(INPUT_STATS.get(student_spec["name"])).manifest
            if (student["mean"], student["std"]) != (trained_on["mean"], trained_on["std"]):
                self.teacher = nn.Sequential(Renormalise(student, trained_on), self.teacher)
        self.teacher.eval().requires_grad_(False)
        return model, student_spec

    def train_set(self, model, x, y, unlabeled):
        if unlabeled is None or not len(unlabeled):
            return x, y
        return torch.cat([x, unlabeled]), torch.cat([y, torch.full((len(unlabeled),), UNLABELED, dtype=y.dtype)])

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.to(x.device)
        if x.dtype != torch.uint8:  # images, augmented: new inputs every batch
            return self.teacher(x)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x.cpu().numpy()]
        new = [i for i, key in enumerate(keys) if key not in self.soft_labels]
        if new:
            for i, logits in zip(new, self.teacher(x[new]).float().cpu()):
                self.soft_labels[keys[i]] = logits
        return torch.stack([self.soft_labels[key] for key in keys]).to(x.device)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return distillation_loss(net(x), self.teacher_logits(x), y, self.cfg.temperature, self.cfg.alpha)
