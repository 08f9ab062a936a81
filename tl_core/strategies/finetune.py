"""`finetune`: every layer starts from the pretrained backbone; a new head.

Options: `freeze` keeps the first k backbone blocks fixed (and their batch-norm statistics),
`backbone_lr_mult` gives the backbone a lower learning rate than the new head.
"""

from __future__ import annotations

from torch import nn

from tl_core.models import Classifier
from tl_core.strategies import register_strategy
from tl_core.strategies.base import Strategy, unwrap


@register_strategy
class Finetune(Strategy):
    name = "finetune"

    def build_model(self, num_classes, in_channels, backbone):
        model, spec = super().build_model(num_classes, in_channels, backbone)
        for block in model.backbone[: self.cfg.freeze]:
            block.requires_grad_(False)
        return model, spec

    def param_groups(self, net: nn.Module) -> list[dict]:
        model: Classifier = unwrap(net)
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(model.head.parameters()), "lr": self.cfg.lr}]
        if backbone and self.cfg.backbone_lr_mult > 0:
            groups.append({"params": backbone, "lr": self.cfg.lr * self.cfg.backbone_lr_mult})
        return groups

    def set_train_mode(self, net: nn.Module, epoch: int) -> None:
        net.train()
        for block in unwrap(net).backbone[: self.cfg.freeze]:
            block.eval()  # frozen blocks keep their pretrained batch-norm statistics
