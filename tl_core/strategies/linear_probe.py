"""`linear-probe` (feature extraction): a frozen pretrained backbone and a new linear head.

The backbone never changes, so the features of the training images are computed once and
cached on disk, keyed by the backbone's sha256 and the images' content hash; the head then
trains on the cached features. A new backbone or new data gives a new key, so a stale cache is
never read.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from tl_core import storage
from tl_core.config import workdir
from tl_core.models import Classifier
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy

FEATURE_BATCH = 512


@torch.no_grad()
def extract_features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i : i + FEATURE_BATCH]) for i in range(0, len(x), FEATURE_BATCH)])


@register_strategy
class LinearProbe(Strategy):
    name = "linear-probe"
    trains_on_images = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone_sha = None
        self.cache_hit: bool | None = None

    def build_model(self, num_classes, in_channels, backbone):
        model, spec = super().build_model(num_classes, in_channels, backbone)
        model.backbone.requires_grad_(False)
        self.backbone_sha = backbone["sha256"]
        return model, spec

    def trainable(self, model: Classifier) -> nn.Module:
        return model.head

    def train_set(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, unlabeled=None):
        return self.cached_features(model, x), y

    def cached_features(self, model: Classifier, x: torch.Tensor) -> torch.Tensor:
        key = storage.sha256_bytes(self.backbone_sha.encode() + storage.sha256_bytes(x.numpy().tobytes()).encode())
        path = storage.join(workdir(), "cache", "features", f"{key[:32]}.pt")
        self.cache_hit = storage.exists(path)
        if self.cache_hit:
            return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)
        features = extract_features(model, x)
        buf = io.BytesIO()
        torch.save(features, buf)
        storage.write_bytes(path, buf.getvalue())
        return features
