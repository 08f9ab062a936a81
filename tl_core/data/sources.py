"""Data sources by URI, opened for streaming (`open_source`): labels whole, images in chunks.

`idx:` and `imagefolder:` stream: `tl prepare` never holds more than a chunk of their images,
so preparing 10 000 or 1 000 000 images takes the same memory. The small built-in sets and
`npz:` (one array file), `torchvision:` and `omniglot:` (a zip) are read whole by `read_source`
(a `RawData`: uint8 images N x C x H x W, int64 labels) and then served in chunks the same way.

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
import hashlib
import io
import json
import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

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


CHUNK = 2048  # images per chunk of a streamed source
FILES_CHUNK = 256  # image files per chunk (photos: megabytes each)
SMALL_IMAGE = 64  # imagefolders of images up to this many pixels a side are stored as arrays


@dataclass
class Source:
    """A source opened for streaming. `labels[split]` are whole (8 bytes an image); `read(split,
    rows)` yields the images of the sorted `rows` of a split in chunks: uint8 N x C x H x W
    arrays (`kind` "arrays"), or `(file bytes, name)` lists of image files kept encoded ("files":
    photos, decoded per epoch at the size the model wants). `shape` is the train split's C x H x W
    (arrays only); `fingerprint` a hash of the source's content."""

    classes: list[str]
    labels: dict[str, np.ndarray]
    read: Callable[[str, np.ndarray], Iterator]
    kind: str
    fingerprint: str
    shape: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def open_source(uri: str, store: str = "auto") -> Source:
    """The source of a data URI, streaming where its format allows (see the module's docstring)."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "idx" and sep:
        return open_idx(rest, uri)
    if scheme == "imagefolder" and sep:
        return open_imagefolder(rest, uri, store)
    return source_from_raw(read_source(uri))


def source_from_raw(raw: RawData) -> Source:
    arrays = {"train": (raw.train_x, raw.train_y)}
    if raw.test_x is not None:
        arrays["test"] = (raw.test_x, raw.test_y)
    fingerprint = storage.sha256_bytes(
        b"".join(storage.sha256_bytes(a.tobytes()).encode() for a in (raw.train_x, raw.train_y, raw.test_x, raw.test_y)
                 if a is not None) + json.dumps(raw.classes).encode())

    def read(split: str, rows: np.ndarray):
        for start in range(0, len(rows), CHUNK):
            yield arrays[split][0][rows[start : start + CHUNK]]

    return Source(raw.classes, {s: y for s, (_, y) in arrays.items()}, read, "arrays", fingerprint,
                  {s: tuple(x.shape[1:]) for s, (x, _) in arrays.items()})


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
    if x.shape[1] not in (1, 3, 4):
        raise UserError(f"{what}: images must have 1, 3 or 4 channels (grey, RGB, RGBA), got shape {x.shape}")
    if 0 in x.shape[2:]:
        raise UserError(f"{what}: images of shape {x.shape[1:]} have no pixels")
    if x.dtype.kind not in "biuf":
        raise UserError(f"{what}: images must be arrays of numbers, not {x.dtype}")
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


# -- archives (Omniglot zips, npz files): read whole, in memory, never extracted ----------------
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
BOMB_RATIO = 200  # a member that expands more than this many times (and past BOMB_BYTES) is a zip bomb;
BOMB_BYTES = 64 * 2**20  # images and arrays of real data compress a few times, zeros a thousand


def check_archive(archive: zipfile.ZipFile, where: str) -> None:
    """Refuse, before reading a byte of it, what no dataset archive holds: member paths that climb
    out of the archive (zip-slip: tl never extracts, but such an archive was made to attack),
    encrypted members or compression Python cannot read, and zip bombs (a member expanding far
    beyond its compressed size, or more in all than half this machine's memory: tl reads these
    archives whole)."""
    total = 0
    for info in archive.infolist():
        name, parts = info.filename, info.filename.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or parts[0].endswith(":"):
            raise UserError(f"{where}: member {name!r} has a path outside the archive (a zip-slip attack); tl "
                            "refuses such archives: rebuild it with relative paths")
        if info.flag_bits & 0x1:
            raise UserError(f"{where}: member {name!r} is encrypted; give an archive without a password")
        if info.compress_type not in READABLE_METHODS:
            raise UserError(f"{where}: member {name!r} is compressed with method {info.compress_type}, which tl cannot "
                            "read; rebuild the archive with deflate")
        if info.file_size > BOMB_BYTES and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise UserError(f"{where}: member {name!r} expands {info.file_size // max(info.compress_size, 1)}-fold to "
                            f"{info.file_size / 2**20:.0f} MB (a zip bomb); tl refuses it")
        total += info.file_size
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > memory // 2:
        raise UserError(f"{where} expands to {total / 2**30:.1f} GB, more than half this machine's memory "
                        f"({memory / 2**30:.1f} GB), and is read whole: split it, or use idx: or imagefolder:, which stream")


def read_member(archive: zipfile.ZipFile, name: str, where: str) -> bytes:
    """A member's bytes; a damaged member (bad CRC, broken deflate stream, cut short) is named."""
    import zlib

    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise UserError(f"{where}: member {name!r} is damaged ({err}); download the archive again") from None


def read_omniglot(location: str) -> RawData:
    """Omniglot's handwritten characters: one class per `<alphabet>/<character>` folder.

    The drawings are black strokes on white; they are inverted to bright strokes on black, as
    MNIST's digits are. Few-shot use holds out whole characters: `tl prepare --test-split classes`.
    """
    if not storage.exists(location):
        raise UserError(f"omniglot:{location}: no such file; give the path of an Omniglot zip such as "
                        "images_background_small1.zip")
    try:
        archive = zipfile.ZipFile(io.BytesIO(storage.read_bytes(location)))
    except zipfile.BadZipFile as err:
        raise UserError(f"omniglot:{location} is not a zip file ({err}): give an Omniglot zip") from None
    check_archive(archive, f"omniglot:{location}")
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
            image = _decode_image(read_member(archive, member, f"omniglot:{location}"), f"{location}:{member}")
            if images and image.shape != images[0].shape:  # Omniglot's drawings are all 105 x 105 px
                raise UserError(f"omniglot:{location}: {member} is {image.shape[2]} x {image.shape[1]} px with "
                                f"{image.shape[0]} channel(s), the images before it {images[0].shape[2]} x "
                                f"{images[0].shape[1]} with {images[0].shape[0]}: give a zip of images of one size")
            images.append(255 - image)
            labels.append(label)
    return RawData(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def read_fonts(name: str) -> RawData:
    from tl_core.data.fonts import render_characters

    charsets = {"digits": "0123456789", "letters": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    if name not in charsets:
        raise UserError(f"fonts:{name} is unknown: use fonts:digits or fonts:letters")
    x, y = render_characters(charsets[name])
    return RawData(train_x=x, train_y=y, classes=list(charsets[name]))


MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit: no image tl reads is larger
READ_BYTES = 64 * 2**20  # an IDX file is read at most this much at a time


class IdxFile:
    """One IDX file (gzip or not), read front to back in chunks: its header first, then
    `records(rows)` yields the sorted rows' records, never holding more than a chunk."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with self._open() as f:
                head = f.read(4)
                if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                    raise UserError(f"{path} is not an IDX file of unsigned bytes; expected MNIST's IDX format")
                header = f.read(4 * head[3])
        except (OSError, EOFError) as err:  # not gzip after all, a damaged stream, a symlink loop
            raise UserError(f"{path} cannot be read as an IDX file ({err}); download it again") from None
        if len(header) < 4 * head[3]:
            raise UserError(f"{path} is truncated inside its header; download it again")
        self.dims = [int.from_bytes(header[i : i + 4], "big") for i in range(0, len(header), 4)]
        self.offset = 4 + len(header)
        self.record = math.prod(self.dims[1:])
        # A header is trusted only as far as the file bears it out: a few bytes may declare terabytes.
        if not self.dims or 0 in self.dims[1:] or self.record > 4 * MAX_PIXELS:
            raise UserError(f"{path}: its header declares dimensions {self.dims}, which no IDX file of images has; "
                            "download it again")
        if path.suffix != ".gz" and path.stat().st_size < self.offset + self.dims[0] * self.record:
            raise UserError(f"{path} is truncated: its header declares {self.dims} ({self.offset + self.dims[0] * self.record} "
                            f"bytes), the file has {path.stat().st_size}; download it again")

    def _open(self):
        if self.path.suffix != ".gz":
            return open(self.path, "rb")
        return gzip.open(self.path, "rb")

    def records(self, rows: np.ndarray, chunk: int = CHUNK) -> Iterator[np.ndarray]:
        """The records of the sorted `rows`, `chunk` rows of the file at a time."""
        n = self.dims[0]
        chunk = max(1, min(chunk, READ_BYTES // self.record))  # large records: fewer per read
        try:
            with self._open() as f:
                f.seek(self.offset)  # gzip files seek forward by decompressing
                for start in range(0, n, chunk):
                    count = min(chunk, n - start)
                    raw = f.read(count * self.record)
                    if len(raw) < count * self.record:
                        raise UserError(f"{self.path} is truncated: header says {self.dims}, the file ends at record "
                                        f"{start + len(raw) // max(self.record, 1)}; download it again")
                    lo, hi = np.searchsorted(rows, [start, start + count])
                    if hi > lo:
                        block = np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.dims[1:])
                        yield block[rows[lo:hi] - start]
                    if hi == len(rows):
                        return
        except (OSError, EOFError) as err:  # a damaged gzip stream
            raise UserError(f"{self.path} is not a valid gzip file ({err}); download it again") from err

    def read_all(self) -> np.ndarray:
        out = np.concatenate(list(self.records(np.arange(self.dims[0]))) or [np.zeros((0, *self.dims[1:]), np.uint8)])
        return out.reshape(self.dims)


def _idx_pairs(folder: str) -> dict[str, tuple[IdxFile, np.ndarray]]:
    """{split: (its images file, its labels)}: MNIST names its splits train and t10k; with one pair
    only, that is the train split (prepare makes the test split)."""
    root = Path(folder)
    if root.is_file():
        raise UserError(f"idx:{folder} is a file; point idx: at the folder that holds the IDX files")
    if not root.is_dir():
        raise UserError(f"idx:{folder}: folder does not exist; point it at the folder with the IDX files")
    pairs = {}
    for images in sorted(root.glob("*images-idx3-ubyte*")):
        prefix = images.name.split("-images-")[0]
        labels = sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
        if not labels:
            raise UserError(f"idx:{folder}: {images.name} has no matching {prefix}-labels-idx1-ubyte file")
        x, y = IdxFile(images), IdxFile(labels[0]).read_all().astype(np.int64).reshape(-1)
        if len(x.dims) not in (3, 4):
            raise UserError(f"idx:{folder}: {images.name} holds {len(x.dims) - 1}-dimensional records, not images")
        if x.dims[0] == 0:
            raise UserError(f"idx:{folder}: {images.name} holds no images")
        if x.dims[0] != len(y):
            raise UserError(f"idx:{folder}: {x.dims[0]} images but {len(y)} labels in {prefix}")
        pairs[prefix] = (x, y)
    if not pairs:
        raise UserError(f"idx:{folder}: no *-images-idx3-ubyte[.gz] files found")
    train, test = pairs.pop("train", None), pairs.pop("t10k", None)
    if train is None:
        train, test = test, None
    return {"train": train, **({"test": test} if test else {})}


def _idx_classes(labels: dict[str, np.ndarray]) -> list[str]:
    return [str(i) for i in range(int(max(y.max() for y in labels.values() if y.size)) + 1)]


def open_idx(folder: str, uri: str) -> Source:
    pairs = _idx_pairs(folder)
    labels = {split: y for split, (_, y) in pairs.items()}
    digest = hashlib.sha256()
    for split, (x, y) in pairs.items():
        digest.update(split.encode() + y.tobytes())
        with open(x.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)

    def read(split: str, rows: np.ndarray):
        for block in pairs[split][0].records(rows):
            yield as_uint8_images(block, folder)

    shapes = {s: as_uint8_images(np.zeros((1, *x.dims[1:]), np.uint8), folder).shape[1:] for s, (x, _) in pairs.items()}
    source = Source(_idx_classes(labels), labels, read, "arrays", digest.hexdigest(), shapes)
    check_labels(RawData(np.empty(len(labels["train"])), labels["train"], source.classes, None, labels.get("test")), uri)
    return source


def read_idx(folder: str) -> RawData:
    pairs = _idx_pairs(folder)
    arrays = {split: (as_uint8_images(x.read_all(), folder), y) for split, (x, y) in pairs.items()}
    test = arrays.get("test", (None, None))
    return RawData(*arrays["train"], _idx_classes({s: y for s, (_, y) in arrays.items()}), *test)


def as_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Labels as int64 class ids; text, fractions, NaN or objects are refused, not cast to garbage."""
    y = np.asarray(y).reshape(-1)
    whole = y.dtype.kind in "biu" or (y.dtype.kind == "f" and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all()))
    if not whole:
        raise UserError(f"{what}: labels must be whole numbers (class ids 0, 1, ...), got {y.dtype} values such as "
                        f"{y[:3].tolist()}; map them to ids and list the names in a `classes` array")
    return y.astype(np.int64)


def read_npz_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz. Each .npy header is checked against its member's size before it is read:
    np.load allocates whatever a header declares (a terabyte in a 1 kB file) before finding it is not there."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{where} is not a readable .npz file ({err}); save it with numpy.savez") from None
    arrays = {}
    with archive:
        check_archive(archive, where)
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                    held = info.file_size - f.tell()
                if dtype.hasobject:
                    raise UserError(f"{where}: array {name!r} holds Python objects, which tl does not unpickle; "
                                    "save arrays of numbers")
                declared = math.prod(shape) * dtype.itemsize
                if declared != held:
                    raise UserError(f"{where}: array {name!r} declares shape {shape} of {dtype} ({declared} bytes) but "
                                    f"holds {held} bytes; save it again")
                with archive.open(info) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as err:
                raise UserError(f"{where}: array {name!r} cannot be read ({err}); save it again") from None
    return arrays


def read_npz(file: str) -> RawData:
    path, where = Path(file), f"npz:{file}"
    if path.is_dir():
        raise UserError(f"{where} is a folder; give the path of an .npz file")
    if not path.is_file():
        raise UserError(f"{where}: file does not exist; check the path")
    arrays = read_npz_arrays(path, where)
    keys = set(arrays)
    if {"x_train", "y_train"} <= keys:
        x, y = arrays["x_train"], arrays["y_train"]
        tx, ty = (arrays["x_test"], arrays["y_test"]) if {"x_test", "y_test"} <= keys else (None, None)
    elif {"x", "y"} <= keys:
        x, y, tx, ty = arrays["x"], arrays["y"], None, None
    else:
        raise UserError(f"{where} must hold x_train/y_train[/x_test/y_test] or x/y; it has {sorted(keys)}")
    y = as_labels(y, where)
    ty = None if ty is None else as_labels(ty, where)
    if not y.size:
        raise UserError(f"{where} holds no images")
    if "classes" in keys:
        classes = [str(c) for c in arrays["classes"]]
    else:
        top = int(max(y.max(), ty.max() if ty is not None and ty.size else 0))
        classes = [str(i) for i in range(top + 1)]
    return RawData(
        as_uint8_images(x, where), y, classes,
        None if tx is None else as_uint8_images(tx, where), ty,
    )


GREY_MODES = ("1", "L", "I", "I;16", "F")


def unreadable_image(name: str, err: Exception) -> UserError:
    """The error for an image Pillow cannot open or decode (truncated, not an image, a decompression bomb)."""
    from PIL import UnidentifiedImageError

    # Pillow's own message would show the repr of the in-memory file it was given
    reason = "not an image format Pillow knows" if isinstance(err, UnidentifiedImageError) else str(err)
    return UserError(f"image {name} is corrupt or unreadable ({reason}); remove or replace it")


def _decode_image(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if img.mode in GREY_MODES else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise unreadable_image(name, err) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _image_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(channels, height, width) of an image file from its header, without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return (1 if img.mode in GREY_MODES else 3), img.height, img.width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise unreadable_image(name, err) from None


def _class_files(root: str, files: list[str], where: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders under `root` and its image files (path below root, label)."""
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
    return classes, [(rel, label) for label, name in enumerate(classes) for rel in by_class[name]]


def _check_links(location: str) -> None:
    """Refuse symlinks that lead nowhere (broken, or a loop) or back up the tree (a folder loop): the
    listing skips them without a word, so the images they were meant to hold would go missing."""
    root = Path(location)
    if storage.is_s3(location) or not root.is_dir():
        return
    for path in root.rglob("*"):  # rglob does not follow links to folders, so a loop ends here
        if not path.is_symlink():
            continue
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            raise UserError(f"imagefolder:{location}: {path} is a broken symlink or a symlink loop; remove it or "
                            "point it at an image") from None
        if target.is_dir() and (target == path.parent.resolve() or target in path.parent.resolve().parents):
            raise UserError(f"imagefolder:{location}: {path} links back to {target}, a folder above it (a loop); "
                            "remove the link")


def _imagefolder_splits(location: str) -> tuple[list[str], dict[str, list[str]]]:
    """Classes and {split: image URIs in label order}; DIR/{train,test|val}/<class>/ has both splits."""
    _check_links(location)
    files = storage.list_files(location)
    if not files:
        raise UserError(f"imagefolder:{location}: the folder is empty or does not exist")
    tops = {f.split("/")[0] for f in files if "/" in f}
    held_out = "test" if "test" in tops else "val"
    if {"train", held_out} <= tops:
        found = {}
        for split, folder in (("train", "train"), ("test", held_out)):
            below = [f.split("/", 1)[1] for f in files if f.startswith(folder + "/")]
            found[split] = _class_files(storage.join(location, folder), below, f"{location}/{folder}")
        if found["train"][0] != found["test"][0]:
            raise UserError(f"imagefolder:{location}: train and {held_out} have different class folders")
        classes = found["train"][0]
        return classes, {split: [(storage.join(location, folder, rel), label) for rel, label in found[split][1]]
                         for split, folder in (("train", "train"), ("test", held_out))}
    classes, images = _class_files(location, files, location)
    return classes, {"train": [(storage.join(location, rel), label) for rel, label in images]}


def open_imagefolder(location: str, uri: str, store: str = "auto") -> Source:
    """An ImageFolder, streamed. One pass reads every file once for the content hash and each
    image's header (size, channels; no pixels decoded); `read` then reads them again a chunk at a
    time. Photos (larger than SMALL_IMAGE px a side, or `store="files"`) are kept encoded."""
    classes, splits = _imagefolder_splits(location)
    digest, headers = hashlib.sha256(json.dumps(classes).encode()), {}
    for split, images in splits.items():
        for image_uri, label in images:
            data = storage.read_bytes(image_uri)
            digest.update(f"{split}/{label}/{image_uri[len(location):]}/{storage.sha256_bytes(data)}".encode())
            headers[image_uri] = _image_header(data, image_uri)
    train_headers = [headers[u] for u, _ in splits["train"]]
    largest = max(max(h[1:]) for h in headers.values())
    kind = "files" if store == "files" or (store == "auto" and largest > SMALL_IMAGE) else "arrays"
    # Arrays of mixed sizes or modes: the most channels and the most common size of the train split.
    channels = max(h[0] for h in train_headers)
    size = Counter(h[1:] for h in train_headers).most_common(1)[0][0]

    def read(split: str, rows: np.ndarray):
        from tl_core.data.transforms import resize

        images, step = splits[split], CHUNK if kind == "arrays" else FILES_CHUNK
        for start in range(0, len(rows), step):
            chunk = [images[i][0] for i in rows[start : start + step]]
            if kind == "files":
                yield [(storage.read_bytes(u), u) for u in chunk]
                continue
            decoded = [_decode_image(storage.read_bytes(u), u) for u in chunk]
            yield np.stack([resize(np.repeat(img, channels // img.shape[0], 0)[None], size)[0] for img in decoded])

    return Source(classes, {split: np.asarray([label for _, label in images], dtype=np.int64)
                            for split, images in splits.items()},
                  read, kind, digest.hexdigest(), {split: (channels, *size) for split in splits} if kind == "arrays" else {})


def read_imagefolder(location: str) -> RawData:
    source = open_imagefolder(location, f"imagefolder:{location}", store="arrays")
    arrays = {split: np.concatenate(list(source.read(split, np.arange(len(y))))) for split, y in source.labels.items()}
    test = (arrays["test"], source.labels["test"]) if "test" in arrays else (None, None)
    return RawData(arrays["train"], source.labels["train"], source.classes, *test)


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
