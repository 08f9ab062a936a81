"""`linear-probe` (feature extraction): a frozen pretrained backbone and a new linear head.

The backbone never changes, so the features of the training images are computed once and
cached on disk, keyed by the backbone's sha256 and the images' identity (their bytes, or for
streamed sets the dataset's content hash and the rows taken); the head then trains on the
cached features. Features are computed, written and read a chunk at a time (one file per
chunk, a `done` marker last), so a split larger than memory never is in memory as images. A
new backbone or new data gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import io
from typing import Iterable

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
    streams = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone_sha = None
        self.cache_hit: bool | None = None

    def build_model(self, num_classes, shape, backbone):
        model, spec = super().build_model(num_classes, shape, backbone)
        model.backbone.requires_grad_(False)
        self.backbone_sha = backbone["sha256"]
        return model, spec

    def trainable(self, model: Classifier) -> nn.Module:
        return model.head

    def train_set(self, model: Classifier, x: torch.Tensor, y: torch.Tensor, unlabeled=None):
        chunks = (x[i : i + FEATURE_BATCH * 8] for i in range(0, len(x), FEATURE_BATCH * 8))
        features, self.cache_hit = self.cached_features(model, storage.sha256_bytes(x.numpy().tobytes()), chunks)
        return features, y

    def stream_set(self, model: Classifier, rows, normalise):
        features, self.cache_hit = self.rows_features(model, rows, normalise)
        return features, torch.from_numpy(rows.labels())

    def test_input(self, model: Classifier, rows, normalise):
        # The backbone never changes, so the test images' features are cached like the training
        # images' and each evaluation scores the head alone: photos are not decoded and run
        # through the network again at every evaluation, nor for every seed.
        features, _ = self.rows_features(model, rows, normalise)
        return model.head, [(features, torch.from_numpy(rows.labels()))]

    def rows_features(self, model: Classifier, rows, normalise) -> tuple[torch.Tensor, bool]:
        chunks = (normalise(x) for x, _ in rows.chunks())
        identity = f"{rows.data.hash}/{rows.split}/{storage.sha256_bytes(rows.indices.tobytes()) if rows.indices is not None else 'all'}"
        return self.cached_features(model, storage.sha256_bytes(identity.encode()), chunks)

    def cached_features(self, model: Classifier, images_key: str,
                        chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The features of the images that `chunks` yield (normalised), from the cache or computed
        and cached chunk by chunk; and whether they came from the cache."""
        key = storage.sha256_bytes(self.backbone_sha.encode() + images_key.encode())
        folder = storage.join(workdir(), "cache", "features", key[:32])
        done = storage.join(folder, "done")
        if storage.exists(done):
            parts = int(storage.read_bytes(done))
            return torch.cat([torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, f"{i:05d}.pt"))),
                                         weights_only=True) for i in range(parts)]), True
        features = []
        for i, x in enumerate(chunks):
            features.append(extract_features(model, x))
            buf = io.BytesIO()
            torch.save(features[-1], buf)
            storage.write_bytes(storage.join(folder, f"{i:05d}.pt"), buf.getvalue())
        storage.write_bytes(done, str(len(features)).encode())  # last: a folder with `done` is complete
        return torch.cat(features), False
