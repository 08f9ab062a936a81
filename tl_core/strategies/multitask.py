"""`multitask`: one backbone, one head per task, trained on the source and the target together.

Every step sees a target batch and a source batch of the same size, through one shared
backbone (one forward pass, so DDP synchronises both heads' gradients), and minimises
CE(target) + source_weight * CE(source). The checkpoint's model is the backbone with the target
head; the source head is kept in the checkpoint's strategy state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.errors import UserError
from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import SourcePool, Strategy, unwrap


class MultitaskNet(nn.Module):
    def __init__(self, model: Classifier, source_classes: int):
        super().__init__()
        self.model = model
        self.source_head = nn.Linear(model.feature_dim, source_classes)

    def forward(self, x: torch.Tensor, x_source: torch.Tensor | None = None):
        if x_source is None:
            return self.model(x)
        features = self.model.backbone(torch.cat([x, x_source]))
        return self.model.head(features[: len(x)]), self.source_head(features[len(x) :])


@register_strategy
class Multitask(Strategy):
    name = "multitask"
    streams = True  # the target's labelled batches stream as scratch's do; the source is a `SourcePool`

    def __init__(self, cfg):
        super().__init__(cfg)
        self.needs_backbone = cfg.backbone is not None
        self.source = SourcePool(cfg, self.name)
        self.source_classes = len(self.source.data.classes)
        self.source_shape = self.source.data.shape
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def build_model(self, num_classes, shape, backbone):
        model, spec = super().build_model(num_classes, shape, backbone)
        if self.source_shape[0] != shape[0]:
            raise UserError(f"the source has {self.source_shape[0]}-channel images, the target {shape[0]}: "
                            f"prepare both with the same --channels")
        return model, spec

    def trainable(self, model: Classifier) -> nn.Module:
        return MultitaskNet(model, self.source_classes)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xs, ys = self.source.draw(len(x), self.generator, x.device)
        if xs.shape[-2:] != x.shape[-2:]:
            raise UserError(f"source images are {tuple(xs.shape[-2:])}, target images {tuple(x.shape[-2:])}: "
                            "prepare both with the same --image-size")
        target_logits, source_logits = net(x, xs)
        return F.cross_entropy(target_logits, y) + self.cfg.source_weight * F.cross_entropy(source_logits, ys)

    def extra_state(self, net: nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in unwrap(net).source_head.state_dict().items()}

    def load_extra_state(self, net: nn.Module, state: dict) -> None:
        if state:
            unwrap(net).source_head.load_state_dict(state)
