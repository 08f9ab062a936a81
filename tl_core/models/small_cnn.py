"""A small CNN for 8-32 px images: three conv blocks, global average pooling."""

from __future__ import annotations

from torch import nn

from tl_core.models._registry import register_architecture
from tl_core.models.classifier import Classifier


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # independent of the batch: exact DDP equivalence, tiny per-worker batches
        return nn.GroupNorm(8, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be batch, group or none, not {kind!r}")


def conv_block(c_in: int, c_out: int, norm: str, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register_architecture("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32, norm: str = "batch") -> Classifier:
    backbone = nn.Sequential(
        conv_block(in_channels, width, norm, pool=True),
        conv_block(width, 2 * width, norm, pool=True),
        conv_block(2 * width, 4 * width, norm, pool=False),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    )
    return Classifier(backbone, 4 * width, num_classes)
