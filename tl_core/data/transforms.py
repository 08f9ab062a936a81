"""Image transforms: on uint8 N x C x H x W arrays, resize, channel conversion and class subsets
(preparing data); on float tensors, the training augmentation `random_shift`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tl_core.errors import UserError


def resize(x: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Area averaging when shrinking (as UCI made its 8x8 digits), bilinear when growing."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    shrink = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
    out = F.interpolate(t, size=size, mode="area") if shrink else F.interpolate(
        t, size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have in (3, 4) and channels == 1:
        grey = 0.299 * x[:, 0].astype(np.float32) + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return np.rint(grey)[:, None].astype(np.uint8)
    if have == 4 and channels == 3:
        return x[:, :3]
    raise UserError(f"cannot convert images with {have} channels to {channels}; use channels 1 or 3")


def select_classes(classes: list[str], wanted: list[str], what: str) -> list[int]:
    """Label ids of the wanted classes, given by name or id."""
    ids = []
    for w in wanted:
        w = str(w)
        if w in classes:
            ids.append(classes.index(w))
        elif w.isdigit() and int(w) < len(classes):
            ids.append(int(w))
        else:
            raise UserError(f"{what}: class {w!r} does not exist; its classes are {classes}")
    if len(set(ids)) != len(ids):
        raise UserError(f"{what}: a class is listed twice in {wanted}")
    return ids


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `pixels` in x and y, zero-padded: cheap augmentation for small images."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)).expand(n, c, h, w)
    cols = (dx.view(n, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)).expand(n, c, h, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1).expand(n, c, h, w)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1).expand(n, c, h, w)
    return padded[batch, chan, rows, cols]


# -- photos: image files decoded per epoch, cropped the way ImageNet-style recipes do ----------
EVAL_RESIZE = 256 / 224  # resize the shorter side to size * this, then take the centre size x size


def photo_transform(size: int, train: bool):
    """torchvision.transforms.v2 on uint8 C x H x W tensors: RandomResizedCrop + horizontal flip
    for training, Resize + CenterCrop for evaluation (the seeds' ResNet/VGG recipes)."""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(round(size * EVAL_RESIZE), antialias=True), v2.CenterCrop(size)])


def decode_file(data: bytes, channels: int, name: str) -> torch.Tensor:
    """An image file's bytes -> uint8 C x H x W tensor (PIL, as torchvision's ImageFolder decodes)."""
    from tl_core.data.sources import _decode_image

    pixels = convert_channels(_decode_image(data, name)[None], channels)[0]
    # PIL's pixels come read-only, which torch.from_numpy warns about: torch needs its own copy then.
    return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())


def decode_files(files: list[bytes], channels: int, size: int, train: bool) -> np.ndarray:
    """Image files -> uint8 N x C x size x size: cropped at random (train) or in the centre (eval)."""
    transform = photo_transform(size, train)
    if not files:
        return np.zeros((0, channels, size, size), dtype=np.uint8)
    return torch.stack([transform(decode_file(f, channels, "an image")) for f in files]).numpy()
