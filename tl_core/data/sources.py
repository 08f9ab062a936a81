"""Data sources by URI. Each reader returns a `RawData`: uint8 images N x C x H x W, int64 labels.

| URI                     | what                                                              |
|-------------------------|-------------------------------------------------------------------|
| `sklearn:digits`        | scikit-learn's 1797 real 8x8 handwritten digits (ships with it)   |
| `fonts:digits`          | digits rendered from the fonts matplotlib ships (synthetic)       |
| `fonts:letters`         | capital letters A-Z, rendered the same way                        |
| `idx:DIR`               | MNIST-style IDX files (`*-images-idx3-ubyte[.gz]`, `*-labels-...`) |
| `npz:FILE`              | `x_train/y_train/x_test/y_test` or `x/y` arrays                    |
| `imagefolder:DIR`       | DIR/<class>/<image> or DIR/{train,test}/<class>/<image>; DIR may be s3:// |
| `torchvision:NAME`      | a torchvision dataset (MNIST, FashionMNIST, CIFAR10, USPS...): downloads |
| `omniglot:ZIP`          | an Omniglot zip (`images_*/<alphabet>/<character>/*.png`); ZIP may be s3:// |
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tl_core import storage
from tl_core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class RawData:
    train_x: np.ndarray  # uint8, N x C x H x W
    train_y: np.ndarray  # int64, values in [0, len(classes))
    classes: list[str]
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None


def read_source(uri: str) -> RawData:
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme == "s3":
        raise UserError(
            f"{uri!r} has no known data scheme: write sklearn:digits, fonts:digits, idx:DIR, npz:FILE, "
            "imagefolder:DIR (local or s3://) or torchvision:NAME"
        )
    readers = {
        "sklearn": read_sklearn,
        "fonts": read_fonts,
        "idx": read_idx,
        "npz": read_npz,
        "imagefolder": read_imagefolder,
        "torchvision": read_torchvision,
        "omniglot": read_omniglot,
    }
    if scheme not in readers:
        raise UserError(f"unknown data scheme {scheme!r} in {uri!r}: use one of {', '.join(sorted(readers))}")
    data = readers[scheme](rest)
    check_labels(data, uri)
    return data


def check_labels(data: RawData, uri: str) -> None:
    k = len(data.classes)
    for split, y in (("train", data.train_y), ("test", data.test_y)):
        if y is None:
            continue
        if y.size and (y.min() < 0 or y.max() >= k):
            bad = int(y[(y < 0) | (y >= k)][0])
            raise UserError(
                f"{uri}: label {bad} in the {split} split is out of range for {k} classes "
                f"(labels must be 0..{k - 1}); fix the labels or list the class names"
            )
    if len(data.train_x) != len(data.train_y):
        raise UserError(f"{uri}: {len(data.train_x)} images but {len(data.train_y)} labels; they must match")


def as_uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    """Bring N x H x W, N x H x W x C or N x C x H x W arrays of any range to uint8 N x C x H x W."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise UserError(f"{what}: images must be N x H x W or N x H x W x C, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{what}: images contain NaN or infinite values; clean the data")
    high = float(x.max()) if x.size else 1.0
    scale = 255.0 if high <= 1.0 else 255.0 / high  # [0,1] floats or integer counts (e.g. 0..16)
    return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


def read_sklearn(name: str) -> RawData:
    if name != "digits":
        raise UserError(f"sklearn:{name} is not available: only sklearn:digits ships with scikit-learn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images  # 0..16 counts of a 4x4 block of a 32x32 bitmap
    return RawData(
        train_x=as_uint8_images(x * (255.0 / 16.0) / 255.0, "sklearn:digits"),
        train_y=digits.target.astype(np.int64),
        classes=[str(c) for c in digits.target_names],
    )


def read_omniglot(location: str) -> RawData:
    """Omniglot's handwritten characters: one class per `<alphabet>/<character>` folder.

    The drawings are black strokes on white; they are inverted to bright strokes on black, as
    MNIST's digits are. Few-shot use holds out whole characters: `tl prepare --test-split classes`.
    """
    import zipfile

    if not storage.exists(location):
        raise UserError(f"omniglot:{location}: no such file; give the path of an Omniglot zip such as "
                        "images_background_small1.zip")
    try:
        archive = zipfile.ZipFile(io.BytesIO(storage.read_bytes(location)))
    except zipfile.BadZipFile as err:
        raise UserError(f"omniglot:{location} is not a zip file ({err}): give an Omniglot zip") from None
    by_class: dict[str, list[str]] = {}
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) >= 3 and Path(name).suffix.lower() == ".png":
            by_class.setdefault("/".join(parts[-3:-1]), []).append(name)
    if not by_class:
        raise UserError(f"omniglot:{location}: no <alphabet>/<character>/*.png images in the zip")
    classes = sorted(by_class)
    images, labels = [], []
    for label, name in enumerate(classes):
        for member in sorted(by_class[name]):
            images.append(255 - _decode_image(archive.read(member), f"{location}:{member}"))
            labels.append(label)
    return RawData(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def read_fonts(name: str) -> RawData:
    from tl_core.data.fonts import render_characters

    charsets = {"digits": "0123456789", "letters": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    if name not in charsets:
        raise UserError(f"fonts:{name} is unknown: use fonts:digits or fonts:letters")
    x, y = render_characters(charsets[name])
    return RawData(train_x=x, train_y=y, classes=list(charsets[name]))


def _read_idx_file(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as err:
            raise UserError(f"{path} is not a valid gzip file ({err}); download it again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; expected MNIST's IDX format")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


def read_idx(folder: str) -> RawData:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"idx:{folder}: folder does not exist; point it at the folder with the IDX files")
    splits = {}
    for images in sorted(root.glob("*images-idx3-ubyte*")):
        prefix = images.name.split("-images-")[0]
        labels = sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
        if not labels:
            raise UserError(f"idx:{folder}: {images.name} has no matching {prefix}-labels-idx1-ubyte file")
        x, y = _read_idx_file(images), _read_idx_file(labels[0]).astype(np.int64)
        if len(x) != len(y):
            raise UserError(f"idx:{folder}: {len(x)} images but {len(y)} labels in {prefix}")
        splits[prefix] = (x, y)
    if not splits:
        raise UserError(f"idx:{folder}: no *-images-idx3-ubyte[.gz] files found")
    # MNIST names its splits train and t10k; with one pair only, prepare makes the test split.
    train = splits.pop("train", None)
    test = splits.pop("t10k", None)
    if train is None:
        train, test = test, None
    classes = [str(i) for i in range(int(max(train[1].max(), (test or train)[1].max())) + 1)]
    return RawData(
        as_uint8_images(train[0], folder), train[1], classes,
        None if test is None else as_uint8_images(test[0], folder), None if test is None else test[1],
    )


def read_npz(file: str) -> RawData:
    path = Path(file)
    if not path.is_file():
        raise UserError(f"npz:{file}: file does not exist; check the path")
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except Exception as err:
        raise UserError(f"npz:{file} is not a readable .npz file ({err})") from err
    if {"x_train", "y_train"} <= keys:
        x, y = arrays["x_train"], arrays["y_train"]
        tx, ty = (arrays["x_test"], arrays["y_test"]) if {"x_test", "y_test"} <= keys else (None, None)
    elif {"x", "y"} <= keys:
        x, y, tx, ty = arrays["x"], arrays["y"], None, None
    else:
        raise UserError(f"npz:{file} must hold x_train/y_train[/x_test/y_test] or x/y; it has {sorted(keys)}")
    y = np.asarray(y).astype(np.int64).reshape(-1)
    ty = None if ty is None else np.asarray(ty).astype(np.int64).reshape(-1)
    if "classes" in keys:
        classes = [str(c) for c in arrays["classes"]]
    else:
        top = int(max(y.max(), ty.max() if ty is not None else 0))
        classes = [str(i) for i in range(top + 1)]
    return RawData(
        as_uint8_images(x, f"npz:{file}"), y, classes,
        None if tx is None else as_uint8_images(tx, f"npz:{file}"), ty,
    )


def _decode_image(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {name} is corrupt or unreadable ({err}); remove or replace it") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_class_folders(root: str, files: list[str], where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    by_class: dict[str, list[str]] = {}
    if not storage.is_s3(root) and Path(root).is_dir():  # S3 has no empty folders; local disks do
        by_class = {d.name: [] for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".")}
    for rel in files:
        parts = rel.split("/")
        if len(parts) >= 2:
            entry = by_class.setdefault(parts[0], [])
            if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
                entry.append(rel)
    if not by_class:
        raise UserError(f"imagefolder:{where}: no class folders found; expected {where}/<class>/<image>")
    classes = sorted(by_class)
    empty = [c for c in classes if not by_class[c]]
    if empty:
        raise UserError(f"imagefolder:{where}: class {empty[0]!r} has no images; add images or remove the folder")
    images, labels = [], []
    for label, name in enumerate(classes):
        for rel in by_class[name]:
            images.append(_decode_image(storage.read_bytes(storage.join(root, rel)), storage.join(root, rel)))
            labels.append(label)
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        # Mixed sizes or modes: bring all to the largest channel count and the most common size.
        from tl_core.data.transforms import resize

        channels = max(s[0] for s in shapes)
        size = max(shapes, key=lambda s: sum(img.shape == s for img in images))[1:]
        images = [resize(np.repeat(img, channels // img.shape[0], 0)[None], size)[0] for img in images]
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def read_imagefolder(location: str) -> RawData:
    files = storage.list_files(location)
    if not files:
        raise UserError(f"imagefolder:{location}: the folder is empty or does not exist")
    tops = {f.split("/")[0] for f in files if "/" in f}
    if {"train", "test"} <= tops:
        train = [f.split("/", 1)[1] for f in files if f.startswith("train/")]
        test = [f.split("/", 1)[1] for f in files if f.startswith("test/")]
        x, y, classes = _read_class_folders(storage.join(location, "train"), train, location + "/train")
        tx, ty, test_classes = _read_class_folders(storage.join(location, "test"), test, location + "/test")
        if test_classes != classes:
            raise UserError(f"imagefolder:{location}: train and test have different class folders")
        return RawData(x, y, classes, tx, ty)
    x, y, classes = _read_class_folders(location, files, location)
    return RawData(x, y, classes)


def read_torchvision(name: str) -> RawData:
    import torchvision.datasets as tvd

    from tl_core.config import workdir

    cls = getattr(tvd, name, None)
    if cls is None:
        raise UserError(f"torchvision:{name} is not a torchvision dataset (e.g. MNIST, FashionMNIST, CIFAR10, USPS)")
    root = os.environ.get("TL_TORCHVISION_ROOT", os.path.join(workdir(), "torchvision"))
    try:
        train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as err:
        raise UserError(
            f"torchvision:{name} is not in {root} and could not be downloaded ({err.__class__.__name__}); "
            f"on a machine without a network, copy the files there or set TL_TORCHVISION_ROOT"
        ) from err

    def arrays(ds):
        x, y = np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
        return as_uint8_images(x, f"torchvision:{name}"), y

    (x, y), (tx, ty) = arrays(train), arrays(test)
    classes = [str(c) for c in getattr(train, "classes", [])] or [str(i) for i in range(int(y.max()) + 1)]
    return RawData(x, y, classes, tx, ty)
