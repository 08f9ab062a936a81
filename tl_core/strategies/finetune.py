"""`finetune`: every layer starts from the pretrained backbone; a new head.

Options (all in TrainConfig):
- `freeze`: the first k backbone blocks never train (their batch-norm statistics stay too);
- `backbone_lr_mult`: the backbone learns at lr * mult, the new head at lr;
- `head_warmup_epochs`: only the head trains for the first N epochs, so a random head does not
  send large gradients into good features;
- `unfreeze_every`: gradual unfreezing (ULMFiT): after the warm-up, the top block trains, then
  one more block every N epochs;
- `l2sp_alpha` / `l2sp_beta`: L2-SP (Li et al. 2018): alpha/2 * ||w - w_pretrained||^2 on the
  backbone instead of plain weight decay, beta/2 * ||w||^2 on the new head.

Blocks that wait their turn get learning rate 0 rather than requires_grad=False: DDP fixes the
set of parameters it synchronises when it wraps the model, so flipping requires_grad later
would leave unfrozen blocks unsynchronised across workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy, unwrap


@register_strategy
class Finetune(Strategy):
    name = "finetune"
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.anchor: dict[str, torch.Tensor] = {}

    def build_model(self, num_classes, shape, backbone):
        model, spec = super().build_model(num_classes, shape, backbone)
        for block in model.backbone[: self.cfg.freeze]:
            block.requires_grad_(False)
        if self.cfg.l2sp_alpha:
            self.anchor = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
        return model, spec

    def param_groups(self, net: nn.Module) -> list[dict]:
        model: Classifier = unwrap(net)
        groups = [{"params": list(model.head.parameters()), "lr": self.cfg.lr}]
        for index, block in enumerate(model.backbone):
            params = [p for p in block.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": self.cfg.lr * self.cfg.backbone_lr_mult, "block": index})
        return groups

    def training_blocks_from(self, epoch: int, backbone: nn.Sequential) -> int:
        """Index of the first backbone block that trains in this epoch (len(backbone): none)."""
        cfg = self.cfg
        if epoch < cfg.head_warmup_epochs:
            return len(backbone)
        if cfg.unfreeze_every:
            with_weights = [i for i, block in enumerate(backbone) if any(True for _ in block.parameters())]
            stage = (epoch - cfg.head_warmup_epochs) // cfg.unfreeze_every  # stage 0: the top block
            return max(cfg.freeze, with_weights[max(0, len(with_weights) - 1 - stage)])
        return cfg.freeze

    def on_epoch_start(self, net: nn.Module, optimizer, epoch: int) -> None:
        net.train()
        backbone = unwrap(net).backbone
        first = self.training_blocks_from(epoch, backbone)
        for block in backbone[:first]:
            block.eval()  # blocks that do not train keep their batch-norm statistics
        for group in optimizer.param_groups:
            if "block" in group:
                group["lr"] = group["base_lr"] if group["block"] >= first else 0.0

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(net(x), y) + self.head_penalty(net)
        model: Classifier = unwrap(net)
        if self.cfg.l2sp_alpha:
            drift = sum(((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in model.backbone.named_parameters()
                        if p.requires_grad)
            loss = loss + self.cfg.l2sp_alpha / 2 * drift
        if self.cfg.l2sp_beta:
            loss = loss + self.cfg.l2sp_beta / 2 * sum((p**2).sum() for p in model.head.parameters())
        return loss
