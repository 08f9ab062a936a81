"""torchvision backbones (ResNet-18/34/50, MobileNet-V3) with a stem fit for small inputs.

`weights="IMAGENET1K_V1"` (or any torchvision weights name, or "DEFAULT") loads ImageNet weights
from the `TORCH_HOME` cache or the network; where neither has them the error says so. For
inputs of 8-64 px (`small_input=True`, the default for such inputs) the stem keeps full resolution:
the first conv gets stride 1 and the max-pool goes (pretrained kernels are kept); larger inputs
(photos at 224 px) get torchvision's own stem. Grey images: the first conv's
pretrained kernels are summed over RGB, so one channel sees what three saw.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tl_core.errors import UserError
from tl_core.models._registry import register_architecture
from tl_core.models.classifier import Classifier


def _load_torchvision(builder, weights: str | None, name: str) -> nn.Module:
    if weights is None:
        return builder(weights=None)
    try:
        return builder(weights=weights)
    except Exception as err:  # no network and no cache: a URLError deep inside torch.hub
        cache = os.environ.get("TORCH_HOME", "~/.cache/torch")
        raise UserError(
            f"ImageNet weights {weights!r} for {name} are not in the TORCH_HOME cache ({cache}) and could not be "
            f"downloaded ({err.__class__.__name__}); copy them into that cache, or use --backbone with a checkpoint "
            f"of your own (tl pretrain), or drop weights"
        ) from err


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int, stride: int, small_kernel: bool) -> nn.Conv2d:
    """A new first conv for `in_channels` inputs and `stride`, keeping pretrained kernels where it can."""
    kernel = 3 if small_kernel else conv.kernel_size[0]
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride=stride, padding=kernel // 2, bias=conv.bias is not None)
    if not small_kernel:
        with torch.no_grad():
            w = conv.weight
            if in_channels == 1:
                w = w.sum(dim=1, keepdim=True)
            elif in_channels != w.shape[1]:
                w = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
            new.weight.copy_(w)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _resnet(builder, name, num_classes, in_channels, weights=None, small_input=True) -> Classifier:
    net = _load_torchvision(builder, weights, name)
    # Without pretrained weights a small input gets a 3x3 stem (as CIFAR ResNets); with them the
    # 7x7 kernels stay and only the stride changes.
    if small_input or in_channels != 3:
        net.conv1 = _adapt_first_conv(net.conv1, in_channels, 1 if small_input else 2, small_input and weights is None)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, nn.Identity() if small_input else net.maxpool)
    backbone = nn.Sequential(stem, net.layer1, net.layer2, net.layer3, net.layer4, nn.Sequential(net.avgpool, nn.Flatten()))
    return Classifier(backbone, net.fc.in_features, num_classes)


def _mobilenet(builder, name, num_classes, in_channels, weights=None, small_input=True) -> Classifier:
    net = _load_torchvision(builder, weights, name)
    first = net.features[0][0]
    if small_input or in_channels != 3:
        net.features[0][0] = _adapt_first_conv(first, in_channels, 1 if small_input else 2, small_kernel=False)
    blocks = list(net.features)
    backbone = nn.Sequential(*blocks, nn.Sequential(net.avgpool, nn.Flatten()))
    return Classifier(backbone, blocks[-1].out_channels, num_classes)


SMALL_INPUT_PX = 64


def _stem_for(shape: list[int]) -> dict:
    return {"small_input": shape[-1] <= SMALL_INPUT_PX}


def _register():
    # torchvision is imported when one of these is built, not when they are registered: every
    # `tl` command imports the registry, and most (the digits, the text models) never need it.
    for name, make in [
        ("resnet18", _resnet),
        ("resnet34", _resnet),
        ("resnet50", _resnet),
        ("mobilenet_v3_small", _mobilenet),
        ("mobilenet_v3_large", _mobilenet),
    ]:
        def factory(num_classes, in_channels=3, weights=None, small_input=True, _n=name, _m=make):
            import torchvision.models as tvm

            return _m(getattr(tvm, _n), _n, num_classes, in_channels, weights=weights, small_input=small_input)

        register_architecture(name, shape_defaults=_stem_for)(factory)


_register()
