"""The ImageNet-pretrained backbone `packaged:efficientnet-lite0` (issue 28): the key mapping, the
offline load, agreement with an independent reading of the packaged weights, and a transfer on
a photo folder laid out otherwise than hymenoptera, with the network denied."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tl_core.errors import UserError
from tl_core.models import INPUT_STATS, create_model
from tl_core.models.efficientnet import NAME, map_packaged_keys, timm_network, weights_file

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera"
IMAGENET_ANT, IMAGENET_BEE = 310, 309  # ImageNet-1k class ids ("ant, emmet, pismire", "bee")

needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason="the shared hymenoptera photos are not here")


@pytest.fixture(scope="module")
def packaged_state() -> dict:
    return torch.load(weights_file(), map_location="cpu", weights_only=True)


def test_the_packaged_keys_map_onto_every_key_of_timms_network(packaged_state):
    net = timm_network(packaged=False)
    stages = [len(stage) for stage in net.blocks]
    mapped = map_packaged_keys(packaged_state, stages)
    expected = net.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    # The flat block list is regrouped by stage; a block without an expansion conv has two convs.
    assert mapped["blocks.0.0.conv_pw.weight"] is packaged_state["_blocks.0._project_conv.weight"]
    assert mapped["blocks.1.0.conv_pw.weight"] is packaged_state["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.0.conv_pwl.weight"] is packaged_state["_blocks.1._project_conv.weight"]
    assert mapped["blocks.6.0.bn3.running_var"] is packaged_state["_blocks.15._bn2.running_var"]
    assert mapped["bn2.weight"] is packaged_state["_bn1.weight"]  # the head's batch norm, not a block's
    assert mapped["classifier.bias"] is packaged_state["_fc.bias"]
    with pytest.raises(UserError, match="no place for"):
        map_packaged_keys({**packaged_state, "_blocks.16._bn0.weight": torch.zeros(1)}, stages)


def test_it_loads_offline_and_refuses_what_it_cannot_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tl_core.checkpoints import load_checkpoint, storage

    backbone = load_checkpoint(f"packaged:{NAME}")
    assert backbone["model_spec"]["in_channels"] == 3
    assert backbone["sha256"] == storage.sha256_bytes(weights_file().read_bytes())  # what keys the feature caches
    assert INPUT_STATS[NAME] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(UserError, match="--channels 3"):
        create_model(NAME, 2, in_channels=1)
    with pytest.raises(UserError, match="use 'packaged'"):
        create_model(NAME, 2, in_channels=3, weights="IMAGENET1K_V1")


# -- an independent reading of the packaged weights ------------------------------------------
# EfficientNet-Lite0 as TensorFlow defines it, written from its block list: the packaged
# state_dict read under its own names, with no timm and no key mapping. Each stage's first
# block has the stage's stride: blocks 'r1_s1 r2_s2 r2_s2 r3_s2 r3_s1 r4_s2 r1_s1'.
BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def reference_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    def conv(x, name, stride=1, groups=1):
        w = state[name + ".weight"]
        k, (h, wd) = w.shape[-1], x.shape[-2:]
        ph = max((math.ceil(h / stride) - 1) * stride + k - h, 0)  # TensorFlow's "SAME" padding
        pw = max((math.ceil(wd / stride) - 1) * stride + k - wd, 0)
        return F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), w, stride=stride, groups=groups)

    def bn(x, name):
        return F.batch_norm(x, state[name + ".running_mean"], state[name + ".running_var"], state[name + ".weight"],
                            state[name + ".bias"], training=False, eps=1e-3)

    x = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    for b, stride in enumerate(BLOCK_STRIDES):
        p, inputs = f"_blocks.{b}.", x
        if p + "_expand_conv.weight" in state:
            x = F.relu6(bn(conv(x, p + "_expand_conv"), p + "_bn0"))
        x = F.relu6(bn(conv(x, p + "_depthwise_conv", stride, groups=x.shape[1]), p + "_bn1"))
        x = bn(conv(x, p + "_project_conv"), p + "_bn2")
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def small_crops(files: list[Path], size: int) -> torch.Tensor:
    """Photos decoded at a JPEG draft near `size` (fast), centre-cropped, in [-1, 1]."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
            left, top = (img.width - size) // 2, (img.height - size) // 2
            out.append(torch.frombuffer(bytearray(img.crop((left, top, left + size, top + size)).tobytes()),
                                        dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1))
    return (torch.stack(out).float() / 255 - 0.5) / 0.5


@needs_photos
@pytest.mark.timeout(180)  # 22 s on an idle 2-core machine
@torch.no_grad()
def test_the_mapped_network_agrees_with_the_packaged_weights_read_directly(packaged_state):
    # Every other image of hymenoptera (199 of 398: JPEGs, one GIF), at 112 px to keep it quick:
    # the same top-1 ImageNet class from the timm network with mapped keys as from the
    # independent reading above.
    files = sorted(PHOTOS.glob("*/*/*.*"))[::2]
    assert len(files) == 199
    x = small_crops(files, 112)
    model = create_model(NAME, 1000, in_channels=3, weights="packaged").eval()
    ours = torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])
    theirs = torch.cat([reference_logits(packaged_state, x[i : i + 64]) for i in range(0, len(x), 64)])
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean().item() == 1.0
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-3)
    # And the ImageNet head names the very class, ant or bee, out of 1000 for many photos even at
    # 112 px (0.45 measured; chance is 0.001): the weights are the trained ones, read as trained.
    truth = torch.tensor([IMAGENET_ANT if f.parent.name == "ants" else IMAGENET_BEE for f in files])
    assert (ours.argmax(1) == truth).float().mean().item() > 0.3


# -- a transfer on another photo folder, with the network denied ----------------------------
DENY_NETWORK = """
import socket
_connect = socket.socket.connect
def _local_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"network denied by the test: {address}")
    return _connect(self, address)
socket.socket.connect = _local_only
"""


@needs_photos
@pytest.mark.timeout(400)  # 36 s here
def test_tl_run_transfers_from_the_packaged_backbone_on_a_folder_of_another_layout(tmp_path):
    # One folder, no train/val split, classes in another order and name: tl prepare splits it,
    # stratified. Few photos at 64 px: the point is the path, not the accuracy.
    folder = tmp_path / "insects"
    for cls, source in (("bee", "bees"), ("ant", "ants")):
        (folder / cls).mkdir(parents=True)
        for photo in sorted((PHOTOS / "val" / source).glob("*.jpg"))[:10]:
            shutil.copy(photo, folder / cls / photo.name)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(DENY_NETWORK)
    env = {**os.environ, "TL_WORKDIR": str(tmp_path / "work"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "tl"), "run", "--target", f"imagefolder:{folder}", "--model", NAME,
         "--shots", "3", "--seeds", "0", "--epochs", "3", "--image-size", "64", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=380)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["pretrain"]["checkpoint"] == f"packaged:{NAME}"
    assert summary["target"]["classes"] == ["ant", "bee"] and summary["target"]["shape"] == [3, 64, 64]
    rows = {row["strategy"]: row for row in summary["table"]}
    assert set(rows) == {"scratch", "linear-probe", "finetune"}
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows.values())
    # Trained on inputs normalised as the network was, whatever the folder's own statistics.
    probe = next(r for r in summary["runs"] if r["strategy"] == "linear-probe")
    ckpt = torch.load(io.BytesIO(Path(probe["checkpoint"]).read_bytes()), weights_only=True)
    assert ckpt["data"]["mean"] == [0.5] * 3 and ckpt["data"]["std"] == [0.5] * 3
    assert ckpt["model_spec"]["name"] == NAME and ckpt["backbone"]["uri"] == f"packaged:{NAME}"
