"""Models by name: `create_model(name, num_classes, in_channels, **kwargs)`.

Every model is a `Classifier`: a `backbone` (an `nn.Sequential` of blocks ending in a flat
feature vector) and a replaceable linear `head`. Transfer strategies work on these two parts:
freeze the first k blocks, give the backbone a lower learning rate, swap the head.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tl_core.errors import UserError

MODELS: dict[str, Callable[..., "Classifier"]] = {}


def register_model(name: str):
    def add(fn):
        MODELS[name] = fn
        return fn

    return add


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def replace_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.feature_dim, num_classes)


def create_model(name: str, num_classes: int, in_channels: int = 1, **kwargs) -> Classifier:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def model_spec(name: str, num_classes: int, in_channels: int, kwargs: dict) -> dict:
    """What it takes to rebuild a model: stored in every checkpoint beside the state_dict."""
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(kwargs)}


def build_from_spec(spec: dict) -> Classifier:
    return create_model(spec["name"], spec["num_classes"], spec["in_channels"], **spec.get("kwargs", {}))


# Registering the built-in models.
from tl_core.models import small_cnn, tv  # noqa: E402,F401
