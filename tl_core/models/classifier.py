"""`Classifier`: the one shape of every model, a `backbone` and a replaceable linear `head`."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """A `backbone` (an `nn.Sequential` of blocks ending in a flat feature vector) and a linear
    `head` over its features."""

    def __init__(self, backbone: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
