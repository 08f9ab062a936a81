"""Benchmark: malformed input thrown at `tl prepare`, `tl transfer`, `tl evaluate` and config loading.

    .venv/bin/python bench/fuzz.py                 # seed 0; --seed N for other cases, --sample 20

Writes bench/fuzz.json and bench/fuzz.md. The cases are generated from the seed (rerun with the
same seed, get the same cases) in a fresh temporary folder: truncated and garbled IDX files, npz
files without keys or with wrong dtypes, shapes or NaN, image folders with non-images, empty
classes, one class, huge declared dimensions, zips with `../` members (zip-slip) and zip bombs,
symlink loops, bad YAML, unknown keys and wrong types, unknown URIs, garbled checkpoints and
prepared datasets. A small valid dataset and checkpoint are made first, so `transfer` and
`evaluate` get one bad input at a time.

Each case runs in this process (`tl`'s Typer app through click's CliRunner: importing torch in
300 subprocesses would take many minutes on 2 cores), except the bombs and huge declared sizes,
which run as `tl` processes of their own in SUBPROCESS_MEMORY_GB of address space and at most
CASE_SECONDS (one that hung or ran away in this process would stop the bench). A seeded sample of
the in-process cases, one of each input class at least, runs again as `tl` processes, to show
both give the same verdict. A case passes when:

- `tl` exits with code 2 and prints exactly one line starting with `error:`, which names the
  problem (it contains the offending file, key or URI) and no traceback;
- no file outside the work directory was created, changed or removed (the inputs, a sentinel
  folder beside the work directory, the current folder, TMPDIR), and no zip member escaped to
  where a `../` path points;
- no file stored in the work directory before the case changed (sha256 before and after), and
  no half-written dataset or model was left there;
- it took under CASE_SECONDS and raised the peak memory by under MEMORY_BOUND_MB (this process's
  peak, reset before each case; a `tl` process's peak above that of a `tl` refusing an input at once).

"Mixed sizes and modes" is not malformed: `tl prepare` converts image folders of mixed sizes and
modes by design. Those cases are reported in a row of their own and pass when they are prepared
(exit 0) or refused with one `error:` line, never with a traceback; they are not among the
malformed cases counted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
TL = str(Path(sys.executable).parent / "tl")
COMMAND = ".venv/bin/python bench/fuzz.py"

CASE_SECONDS = 120  # a case still running after this is a failure (a hang)
MEMORY_BOUND_MB = 1024  # a case that raises peak memory by more than this failed to bound it
IN_PROCESS_HEADROOM_GB = 4  # address space this process may take beyond what it maps after setting up
SUBPROCESS_MEMORY_GB = 6  # address-space limit of a `tl` process: it needs 5 (torch and scipy map 3.5 GB)
ISOLATE = True  # a variant run as a `tl` process (see Case.isolate)
BOMB_MB = 1536  # what a zip bomb expands to: past MEMORY_BOUND_MB, so one read whole fails the bound


# -- cases ---------------------------------------------------------------------------------------

@dataclass
class Built:
    """A case's input, made on disk: the `tl` arguments, and what its error line must name."""

    args: list[str]
    mentions: tuple[str, ...]  # the error line names the problem: it contains one of these
    slip_targets: tuple[Path, ...] = ()  # where a zip member's `../` path points: must not exist after


@dataclass
class Case:
    kind: str  # the input class: one row of the report
    name: str  # what is wrong, in a few words
    build: Callable[[], Built]  # makes the input files (only when the case runs) and returns the args
    expect: str = "error"  # "error": malformed, refused; "ok": awkward but valid input
    isolate: bool = False  # a bomb or a huge declared size: run as a `tl` process with bounded memory and time


@dataclass
class Fuzz:
    """Where the cases put their inputs, the valid dataset and checkpoint they garble, the seed."""

    root: Path  # the temporary folder holding all of it
    seed: int
    data: str = ""  # a valid prepared dataset
    checkpoint: str = ""  # a valid checkpoint trained on it

    @property
    def work(self) -> Path:  # TL_WORKDIR: what `tl` stores
        return self.root / "work"

    @property
    def outside(self) -> Path:  # a sentinel folder beside the work directory
        return self.root / "outside"

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    def folder(self, kind: str, number: int) -> Path:
        path = self.root / "inputs" / kind / f"{number:03d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rng(self, kind: str, number: int) -> random.Random:
        return random.Random(f"{self.seed}:{kind}:{number}")


def cases_of(fz: Fuzz, kind: str, variants: list[tuple], expect: str = "error") -> list[Case]:
    """`repeats` cases of each variant (name, make(rng, folder) -> Built, repeats[, isolate]), each
    with its own seeded random numbers and folder."""
    cases = []
    for name, make, repeats, *isolate in variants:
        for _ in range(repeats):
            number = len(cases)

            def build(make=make, number=number) -> Built:
                return make(fz.rng(kind, number), fz.folder(kind, number))

            cases.append(Case(kind, name, build, expect, bool(isolate and isolate[0])))
    return cases


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def garbage(rng: random.Random, size: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(size))


def image_bytes(rng: random.Random, size=(8, 8), mode: str = "L", fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int, colour: int = 0) -> bytes:
    """A PNG whose header declares width x height pixels but holds only a few bytes of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def image_folder(rng: random.Random, root: Path, classes=("a", "b", "c"), per_class: int = 4) -> dict[str, list[Path]]:
    """A valid ImageFolder of small PNGs: {class: its files}."""
    files = {}
    for name in classes:
        files[name] = [write(root / name / f"{i}.png", image_bytes(rng)) for i in range(per_class)]
    return files


# -- IDX -----------------------------------------------------------------------------------------
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def idx_bytes(dims: list[int], data: bytes, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + data


def valid_idx(rng: random.Random, n: int = 30, classes: int = 3, size: int = 8) -> tuple[bytes, bytes]:
    pixels = garbage(rng, n * size * size)
    labels = bytes(i % classes for i in range(n))
    return idx_bytes([n, size, size], pixels), idx_bytes([n], labels)


def idx_cases(fz: Fuzz) -> list[Case]:
    def idx_case(folder: Path, images: bytes | None, labels: bytes | None, mention: str, gz: bool = False) -> Built:
        import gzip

        suffix = ".gz" if gz else ""
        for name, data in ((IMAGES, images), (LABELS, labels)):
            if data is not None:
                write(folder / (name + suffix), gzip.compress(data) if gz else data)
        return Built(["prepare", f"idx:{folder}"], (mention, folder.name))

    def truncated_images(rng, folder):
        images, labels = valid_idx(rng)
        return idx_case(folder, images[: rng.randrange(17, len(images) - 1)], labels, IMAGES)

    def truncated_header(rng, folder):
        images, labels = valid_idx(rng)
        return idx_case(folder, images[: rng.randrange(1, 16)], labels, IMAGES)

    def truncated_labels(rng, folder):
        images, labels = valid_idx(rng)
        return idx_case(folder, images, labels[: rng.randrange(9, len(labels) - 1)], LABELS)

    def wrong_magic(rng, folder):
        images, labels = valid_idx(rng)
        return idx_case(folder, bytes([rng.randrange(1, 256)]) + images[1:], labels, IMAGES)

    def wrong_type(rng, folder):  # IDX type codes of int16, int32, float32, float64: tl reads unsigned bytes
        images, labels = valid_idx(rng)
        return idx_case(folder, images[:2] + bytes([rng.choice([0x0B, 0x0C, 0x0D, 0x0E])]) + images[3:], labels, IMAGES)

    def dimensions(count: int):
        def make(rng, folder):
            images, labels = valid_idx(rng)
            dims = [30, 8, 8, 1, 1][:count] if count <= 5 else [30] + [1] * (count - 1)
            return idx_case(folder, idx_bytes(dims, images[16:]), labels, IMAGES)
        return make

    def huge_count(rng, folder):  # the header declares far more images than the file holds
        images, labels = valid_idx(rng)
        return idx_case(folder, idx_bytes([rng.choice([2**31, 2**32 - 1, 10**9]), 8, 8], images[16:]),
                        idx_bytes([30], labels[8:]), IMAGES)

    def huge_size(rng, folder):  # each image declared larger than any image
        images, labels = valid_idx(rng)
        side = rng.choice([65535, 40000, 2**31])
        return idx_case(folder, idx_bytes([30, side, side], images[16:]), labels, IMAGES)

    def huge_size_gz(rng, folder):
        images, labels = valid_idx(rng)
        return idx_case(folder, idx_bytes([30, 50000, 50000], images[16:]), labels, IMAGES, gz=True)

    def zero_size(rng, folder):
        images, labels = valid_idx(rng)
        dims = rng.choice([[30, 0, 8], [30, 8, 0], [30, 0, 0]])
        return idx_case(folder, idx_bytes(dims, b""), labels, IMAGES)

    def no_images(rng, folder):
        return idx_case(folder, idx_bytes([0, 8, 8], b""), idx_bytes([0], b""), IMAGES)

    def count_mismatch(rng, folder):
        images, labels = valid_idx(rng)
        n = rng.choice([10, 29, 31, 60])
        return idx_case(folder, images, idx_bytes([n], bytes(i % 3 for i in range(n))), LABELS)

    def one_class(rng, folder):
        images, _ = valid_idx(rng)
        return idx_case(folder, images, idx_bytes([30], bytes(30)), "class")

    def sparse_labels(rng, folder):  # labels 0 and 200: classes 1..199 have no image
        images, _ = valid_idx(rng)
        return idx_case(folder, images, idx_bytes([30], bytes(rng.choice([0, 200]) for _ in range(30))), "class")

    def two_channels(rng, folder):  # records of 2 x 8 x 8: no image has 2 channels
        images, labels = valid_idx(rng)
        return idx_case(folder, idx_bytes([30, 2, 8, 8], images[16:] * 2), labels, IMAGES)

    def no_labels_file(rng, folder):
        images, _ = valid_idx(rng)
        return idx_case(folder, images, None, IMAGES)

    def only_labels(rng, folder):
        _, labels = valid_idx(rng)
        return idx_case(folder, None, labels, "idx3")

    def garbled_gz(rng, folder):
        write(folder / (IMAGES + ".gz"), garbage(rng, 200))
        write(folder / (LABELS + ".gz"), garbage(rng, 50))
        return Built(["prepare", f"idx:{folder}"], (IMAGES + ".gz", LABELS + ".gz"))

    def truncated_gz(rng, folder):
        import gzip

        images, labels = valid_idx(rng)
        packed = gzip.compress(images)
        write(folder / (IMAGES + ".gz"), packed[: rng.randrange(12, len(packed) - 4)])
        write(folder / (LABELS + ".gz"), gzip.compress(labels))
        return Built(["prepare", f"idx:{folder}"], (IMAGES + ".gz",))

    def gz_of_garbage(rng, folder):
        import gzip

        _, labels = valid_idx(rng)
        write(folder / (IMAGES + ".gz"), gzip.compress(garbage(rng, 300)))
        write(folder / (LABELS + ".gz"), gzip.compress(labels))
        return Built(["prepare", f"idx:{folder}"], (IMAGES + ".gz",))

    def empty_folder(rng, folder):
        return Built(["prepare", f"idx:{folder}"], (folder.name,))

    def folder_is_a_file(rng, folder):
        images, _ = valid_idx(rng)
        write(folder / IMAGES, images)
        return Built(["prepare", f"idx:{folder / IMAGES}"], (IMAGES,))

    def missing_folder(rng, folder):
        return Built(["prepare", f"idx:{folder / 'nowhere'}"], ("nowhere",))

    return cases_of(fz, "IDX files", [
        ("images file truncated in its data", truncated_images, 6),
        ("images file truncated in its header", truncated_header, 2),
        ("labels file truncated", truncated_labels, 3),
        ("wrong magic number", wrong_magic, 2),
        ("wrong IDX type code (not unsigned bytes)", wrong_type, 2),
        ("0 dimensions declared", dimensions(0), 1),
        ("1-dimensional records", dimensions(2), 1),
        ("5 dimensions declared", dimensions(5), 1),
        ("255 dimensions declared", dimensions(255), 1),
        ("huge image count declared", huge_count, 3, ISOLATE),
        ("huge image size declared", huge_size, 3, ISOLATE),
        ("huge image size declared (gzip)", huge_size_gz, 1, ISOLATE),
        ("a zero-sized dimension", zero_size, 2),
        ("no images at all", no_images, 1),
        ("images and labels counts differ", count_mismatch, 2),
        ("one class", one_class, 1),
        ("labels 0 and 200 only (empty classes)", sparse_labels, 1),
        ("2-channel records", two_channels, 1),
        ("no labels file", no_labels_file, 1),
        ("only a labels file", only_labels, 1),
        ("gzip files of random bytes", garbled_gz, 2),
        ("gzip file truncated", truncated_gz, 3),
        ("gzip of random bytes", gz_of_garbage, 1),
        ("empty folder", empty_folder, 1),
        ("a file instead of a folder", folder_is_a_file, 1),
        ("folder does not exist", missing_folder, 1),
    ])


# -- npz -----------------------------------------------------------------------------------------

def npz_cases(fz: Fuzz) -> list[Case]:
    def npz_case(folder: Path, mention: str = "data.npz", **arrays) -> Built:
        path = folder / "data.npz"
        np.savez(path, **arrays)
        return Built(["prepare", f"npz:{path}"], (mention, "data.npz"))

    def images(rng, n=30, shape=(8, 8), dtype=np.uint8):
        return np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (n, *shape)).astype(dtype)

    def labels(n=30, classes=3):
        return np.arange(n) % classes

    def keys(names):
        def make(rng, folder):
            arrays = {"x": images(rng), "y": labels(), "x_train": images(rng), "y_train": labels(),
                      "images": images(rng), "labels": labels(), "X": images(rng), "Y": labels()}
            return npz_case(folder, **{k: arrays[k] for k in names})
        return make

    def empty_npz(rng, folder):
        path = folder / "data.npz"
        np.savez(path)
        return Built(["prepare", f"npz:{path}"], ("data.npz",))

    def random_bytes(rng, folder):
        path = write(folder / "data.npz", garbage(rng, rng.randrange(1, 2000)))
        return Built(["prepare", f"npz:{path}"], ("data.npz",))

    def truncated(rng, folder):
        buf = io.BytesIO()
        np.savez(buf, x=images(rng), y=labels())
        data = buf.getvalue()
        path = write(folder / "data.npz", data[: rng.randrange(10, len(data) - 1)])
        return Built(["prepare", f"npz:{path}"], ("data.npz",))

    def a_npy_file(rng, folder):
        path = folder / "data.npz"
        with open(path, "wb") as f:
            np.save(f, images(rng))
        return Built(["prepare", f"npz:{path}"], ("data.npz",))

    def object_arrays(which):
        def make(rng, folder):
            x, y = images(rng), labels()
            boxed = np.empty(30, dtype=object)
            boxed[:] = [{"pixels": i} for i in range(30)]
            return npz_case(folder, x=boxed if which == "x" else x, y=boxed if which == "y" else y)
        return make

    def text_arrays(which):
        def make(rng, folder):
            x, y = images(rng), labels()
            words = np.array([rng.choice(["cat", "dog", "bird"]) for _ in range(30)])
            return npz_case(folder, x=np.array([["a"] * 8] * 30) if which == "x" else x, y=words if which == "y" else y)
        return make

    def fractional_labels(rng, folder):
        return npz_case(folder, x=images(rng), y=labels() + 0.5)

    def nan_labels(rng, folder):
        y = labels().astype(float)
        y[rng.randrange(30)] = np.nan
        return npz_case(folder, x=images(rng), y=y)

    def bad_pixels(value):
        def make(rng, folder):
            x = images(rng, dtype=np.float32) / 255
            x[rng.randrange(30), rng.randrange(8), rng.randrange(8)] = value
            return npz_case(folder, x=x, y=labels())
        return make

    def complex_pixels(rng, folder):
        return npz_case(folder, x=images(rng).astype(np.complex64) * 1j, y=labels())

    def shape(dims):
        def make(rng, folder):
            return npz_case(folder, x=np.zeros(dims, np.uint8), y=labels(dims[0]))
        return make

    def no_images(rng, folder):
        return npz_case(folder, x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64))

    def length_mismatch(rng, folder):
        return npz_case(folder, x=images(rng, n=rng.choice([10, 29, 31])), y=labels())

    def one_hot_labels(rng, folder):
        return npz_case(folder, x=images(rng), y=np.eye(3)[labels()])

    def negative_labels(rng, folder):
        return npz_case(folder, x=images(rng), y=labels() - 1)

    def one_class(rng, folder):
        return npz_case(folder, "class", x=images(rng), y=np.zeros(30, np.int64))

    def too_few_class_names(rng, folder):
        return npz_case(folder, "class", x=images(rng), y=labels(), classes=np.array(["only-one"]))

    def object_class_names(rng, folder):
        names = np.empty(3, dtype=object)
        names[:] = [1, {"a": 2}, None]
        return npz_case(folder, x=images(rng), y=labels(), classes=names)

    def declared_shape(dims):
        """x.npy's header declares `dims` but the file holds 64 bytes."""
        def make(rng, folder):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": dims})
            y = io.BytesIO()
            np.save(y, labels())
            path = folder / "data.npz"
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("x.npy", header.getvalue() + bytes(64))
                archive.writestr("y.npy", y.getvalue())
            return Built(["prepare", f"npz:{path}"], ("data.npz", "x.npy"))
        return make

    def a_folder(rng, folder):
        (folder / "data.npz").mkdir()
        return Built(["prepare", f"npz:{folder / 'data.npz'}"], ("data.npz",))

    def missing(rng, folder):
        return Built(["prepare", f"npz:{folder / 'nope.npz'}"], ("nope.npz",))

    return cases_of(fz, "npz files", [
        ("no arrays at all", empty_npz, 1),
        ("only x", keys(["x"]), 1),
        ("only y", keys(["y"]), 1),
        ("keys images/labels", keys(["images", "labels"]), 1),
        ("keys X/Y (upper case)", keys(["X", "Y"]), 1),
        ("x_train without y_train", keys(["x_train", "y"]), 1),
        ("random bytes", random_bytes, 3),
        ("truncated", truncated, 4),
        ("a .npy, not an .npz", a_npy_file, 1),
        ("pickled object images", object_arrays("x"), 1),
        ("pickled object labels", object_arrays("y"), 1),
        ("text images", text_arrays("x"), 1),
        ("text labels", text_arrays("y"), 1),
        ("fractional labels", fractional_labels, 1),
        ("a NaN label", nan_labels, 1),
        ("a NaN pixel", bad_pixels(np.nan), 1),
        ("an infinite pixel", bad_pixels(np.inf), 1),
        ("complex pixels", complex_pixels, 1),
        ("1-D images", shape((30,)), 1),
        ("2-D images", shape((30, 8)), 1),
        ("5-D images", shape((30, 1, 1, 8, 8)), 1),
        ("2-channel images (N x H x W x 2)", shape((30, 8, 8, 2)), 1),
        ("7-channel images (N x 7 x H x W)", shape((30, 7, 8, 8)), 1),
        ("zero-sized images", shape((30, 0, 8)), 1),
        ("no images", no_images, 1),
        ("images and labels counts differ", length_mismatch, 2),
        ("one-hot labels", one_hot_labels, 1),
        ("negative labels", negative_labels, 1),
        ("one class", one_class, 1),
        ("fewer class names than labels", too_few_class_names, 1),
        ("pickled object class names", object_class_names, 1),
        ("huge shape declared in x.npy", declared_shape((10**6, 1000, 1000)), 1, ISOLATE),
        ("huge count declared in x.npy", declared_shape((2**40, 8, 8)), 1, ISOLATE),
        ("shape larger than its bytes", declared_shape((30, 8, 8)), 1),
        ("a folder named .npz", a_folder, 1),
        ("file does not exist", missing, 1),
    ])


# -- image folders -------------------------------------------------------------------------------

def imagefolder_cases(fz: Fuzz) -> list[Case]:
    def with_bad_file(content: Callable[[random.Random], bytes], suffix: str = ".png"):
        """A valid folder and one bad file in a class chosen at random."""
        def make(rng, folder):
            files = image_folder(rng, folder / "images")
            bad = write(folder / "images" / rng.choice(sorted(files)) / f"bad{rng.randrange(100)}{suffix}", content(rng))
            return Built(["prepare", f"imagefolder:{folder / 'images'}"], (bad.name,))
        return make

    def truncated(fmt: str, suffix: str):
        def content(rng):
            data = image_bytes(rng, (rng.randrange(20, 60), rng.randrange(20, 60)), "RGB", fmt)
            return data[: rng.randrange(len(data) // 3, len(data) - 8)]
        return with_bad_file(content, suffix)

    def flipped_png(rng):
        data = bytearray(image_bytes(rng, (16, 16)))
        data[data.find(b"IDAT") + 4 + rng.randrange(4)] ^= 0xFF
        return bytes(data)

    def patched_dims(fmt: str, side: int):
        """An image of 8 x 8 pixels whose header is patched to say side x side."""
        def content(rng):
            data = bytearray(image_bytes(rng, (8, 8), "RGB", fmt))
            if fmt == "BMP":
                data[18:26] = struct.pack("<ii", side, side)
            elif fmt == "JPEG":
                at = data.find(b"\xff\xc0")
                data[at + 5: at + 9] = struct.pack(">HH", side, side)
            elif fmt == "GIF":
                data[6:10] = struct.pack("<HH", side, side)
                at = data.find(b",")  # the image descriptor
                data[at + 5: at + 9] = struct.pack("<HH", side, side)
            return bytes(data)
        return content

    def empty_class(rng, folder):
        image_folder(rng, folder / "images")
        name = rng.choice(["d", "empty", "zz"])
        (folder / "images" / name).mkdir()
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], (f"'{name}'",))

    def class_of_non_images(rng, folder):
        image_folder(rng, folder / "images")
        write(folder / "images" / "notes" / "readme.txt", "not an image")
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("'notes'",))

    def one_class(rng, folder):
        image_folder(rng, folder / "images", classes=(rng.choice(["cat", "only", "a"]),), per_class=6)
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("class",))

    def files_only(rng, folder):
        for i in range(4):
            write(folder / "images" / f"{i}.png", image_bytes(rng))
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("class",))

    def empty_root(rng, folder):
        (folder / "images").mkdir()
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("images",))

    def root_is_a_file(rng, folder):
        path = write(folder / "images.png", image_bytes(rng))
        return Built(["prepare", f"imagefolder:{path}"], ("images.png",))

    def missing_root(rng, folder):
        return Built(["prepare", f"imagefolder:{folder / 'nowhere'}"], ("nowhere",))

    def train_test_classes_differ(rng, folder):
        image_folder(rng, folder / "images" / "train", classes=("a", "b"))
        image_folder(rng, folder / "images" / "test", classes=("a", "c"))
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("different class",))

    def test_split_empty_class(rng, folder):
        image_folder(rng, folder / "images" / "train", classes=("a", "b"))
        image_folder(rng, folder / "images" / "test", classes=("a",))
        (folder / "images" / "test" / "b").mkdir()
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("'b'",))

    text = lambda rng: b"this is not an image\n" * rng.randrange(1, 5)  # noqa: E731
    html = lambda rng: b"<html><body>404 Not Found</body></html>"  # noqa: E731
    return cases_of(fz, "image folders", [
        ("a text file named .png", with_bad_file(text), 3),
        ("random bytes named .jpg", with_bad_file(lambda rng: garbage(rng, rng.randrange(1, 3000)), ".jpg"), 3),
        ("an empty .png", with_bad_file(lambda rng: b""), 2),
        ("an HTML page named .jpeg", with_bad_file(html, ".jpeg"), 1),
        ("a PNG header only", with_bad_file(lambda rng: b"\x89PNG\r\n\x1a\n"), 1),
        ("a truncated PNG", truncated("PNG", ".png"), 4),
        ("a truncated JPEG", truncated("JPEG", ".jpg"), 3),
        ("a PNG with a flipped byte (bad CRC)", with_bad_file(flipped_png), 2),
        ("a PNG declaring 100000 x 100000 px", with_bad_file(lambda rng: png_declaring(100_000, 100_000)), 1, ISOLATE),
        ("a PNG declaring 12000 x 12000 px (under the bomb limit)",
         with_bad_file(lambda rng: png_declaring(12_000, 12_000)), 2, ISOLATE),
        ("an RGB PNG declaring 9000 x 9000 px", with_bad_file(lambda rng: png_declaring(9000, 9000, colour=2)), 1,
         ISOLATE),
        ("a PNG declaring 1 x 200 000 000 px", with_bad_file(lambda rng: png_declaring(1, 200_000_000)), 1, ISOLATE),
        ("a PNG declaring 0 x 0 px", with_bad_file(lambda rng: png_declaring(0, 0)), 1),
        ("a BMP declaring 30000 x 30000 px", with_bad_file(patched_dims("BMP", 30000), ".bmp"), 1, ISOLATE),
        ("a JPEG declaring 65000 x 65000 px", with_bad_file(patched_dims("JPEG", 65000), ".jpg"), 1, ISOLATE),
        ("a GIF declaring 65535 x 65535 px", with_bad_file(patched_dims("GIF", 65535), ".gif"), 1, ISOLATE),
        ("an empty class folder", empty_class, 2),
        ("a class of non-image files", class_of_non_images, 1),
        ("one class", one_class, 2),
        ("images but no class folders", files_only, 1),
        ("an empty folder", empty_root, 1),
        ("a file instead of a folder", root_is_a_file, 1),
        ("folder does not exist", missing_root, 1),
        ("train and test with different classes", train_test_classes_differ, 1),
        ("an empty class in the test split", test_split_empty_class, 1),
    ])


def mixed_images_cases(fz: Fuzz) -> list[Case]:
    """Valid but awkward image folders: mixed sizes and modes, which tl converts by design."""
    modes = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]

    def mixed(sizes: tuple[int, int], formats=("PNG",)):
        def make(rng, folder):
            for label in ("a", "b", "c"):
                for i in range(4):
                    fmt = rng.choice(formats)
                    mode = rng.choice([m for m in modes if fmt == "TIFF" or m not in ("F", "CMYK", "I")])
                    if fmt == "JPEG":
                        mode = rng.choice(["L", "RGB", "CMYK"])
                    side = (rng.randrange(*sizes), rng.randrange(*sizes))
                    suffix = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}[fmt]
                    if fmt == "BMP":
                        mode = rng.choice(["1", "L", "P", "RGB"])
                    write(folder / "images" / label / f"{i}{suffix}", image_bytes(rng, side, mode, fmt))
            return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("images",))
        return make

    return cases_of(fz, "mixed sizes and modes (valid)", [
        ("small images of mixed sizes and modes", mixed((4, 40)), 4),
        ("mixed formats (PNG, JPEG, TIFF, BMP), sizes and modes", mixed((4, 40), ("PNG", "JPEG", "TIFF", "BMP")), 4),
        ("photos and thumbnails mixed (files stored)", mixed((8, 120), ("PNG", "JPEG")), 2),
    ], expect="ok")


# -- zips: Omniglot archives, zip-slip, zip bombs ------------------------------------------------

def omniglot_members(rng: random.Random, alphabets=("Greek", "Latin"), characters=2, images=3) -> dict[str, bytes]:
    return {f"images_background/{a}/character{c:02d}/{i}.png": image_bytes(rng)
            for a in alphabets for c in range(1, characters + 1) for i in range(images)}


def zip_of(path: Path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_first_member(path: Path, local_offset: int, central_offset: int, value: bytes) -> None:
    """Overwrite a field of the first member in both its local header and the central directory."""
    data = bytearray(path.read_bytes())
    data[local_offset: local_offset + len(value)] = value
    central = data.find(b"PK\x01\x02")
    data[central + central_offset: central + central_offset + len(value)] = value
    path.write_bytes(bytes(data))


def zip_cases(fz: Fuzz) -> list[Case]:
    def omniglot(path: Path, mention: str = "") -> Built:
        return Built(["prepare", f"omniglot:{path}"], tuple(m for m in (mention, path.name) if m))

    def not_a_zip(rng, folder):
        return omniglot(write(folder / "omniglot.zip", garbage(rng, rng.randrange(1, 5000))))

    def truncated(rng, folder):
        path = zip_of(folder / "omniglot.zip", omniglot_members(rng))
        data = path.read_bytes()
        return omniglot(write(path, data[: rng.randrange(30, len(data) - 30)]))

    def corrupted_member(rng, folder):  # the directory intact, a member's compressed bytes flipped
        members = omniglot_members(rng)
        path = zip_of(folder / "omniglot.zip", members)
        with zipfile.ZipFile(path) as archive:
            info = archive.infolist()[rng.randrange(len(members))]
        data = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename.encode())
        data[start + rng.randrange(info.compress_size)] ^= 0xFF
        return omniglot(write(path, bytes(data)), info.filename.split("/")[-1])

    def encrypted(rng, folder):  # a member flagged as encrypted: no password to give
        path = zip_of(folder / "omniglot.zip", omniglot_members(rng), zipfile.ZIP_STORED)
        patch_first_member(path, 6, 8, b"\x01\x00")
        return omniglot(path, "encrypted")

    def unknown_method(rng, folder):
        path = zip_of(folder / "omniglot.zip", omniglot_members(rng), zipfile.ZIP_STORED)
        patch_first_member(path, 8, 10, struct.pack("<H", rng.choice([97, 99, 1])))
        return omniglot(path, "compress")

    def no_pngs(rng, folder):
        return omniglot(zip_of(folder / "omniglot.zip", {"a/b/readme.txt": b"hello", "a/b/c.jpg": b"x"}))

    def flat_pngs(rng, folder):
        return omniglot(zip_of(folder / "omniglot.zip", {f"{i}.png": image_bytes(rng) for i in range(4)}))

    def empty_zip(rng, folder):
        return omniglot(zip_of(folder / "omniglot.zip", {}))

    def non_image_member(rng, folder):
        members = omniglot_members(rng)
        bad = rng.choice(sorted(members))
        members[bad] = garbage(rng, 100)
        return omniglot(zip_of(folder / "omniglot.zip", members), bad.split("/")[-1])

    def mixed_sizes(rng, folder):
        members = omniglot_members(rng)
        odd = rng.choice(sorted(members))
        members[odd] = image_bytes(rng, (rng.randrange(9, 30), 8))
        return omniglot(zip_of(folder / "omniglot.zip", members), odd.split("/")[-1])

    def one_class(rng, folder):
        return omniglot(zip_of(folder / "omniglot.zip", omniglot_members(rng, ("Greek",), 1, 6)), "class")

    def missing(rng, folder):
        return omniglot(folder / "nowhere.zip")

    return cases_of(fz, "zip archives", [
        ("random bytes", not_a_zip, 2),
        ("truncated", truncated, 3),
        ("a member's compressed bytes flipped (bad CRC)", corrupted_member, 3),
        ("an encrypted member", encrypted, 1),
        ("an unknown compression method", unknown_method, 2),
        ("no PNG members", no_pngs, 1),
        ("PNGs without alphabet/character folders", flat_pngs, 1),
        ("an empty zip", empty_zip, 1),
        ("a member that is not an image", non_image_member, 2),
        ("images of mixed sizes", mixed_sizes, 1),
        ("one class", one_class, 1),
        ("zip does not exist", missing, 1),
    ])


def zip_slip_cases(fz: Fuzz) -> list[Case]:
    """Members whose paths climb out of where an extractor would put them, towards the sentinel folder."""
    def slip(how: str):
        def make(rng, folder):
            name = f"slip-{folder.name}-{rng.randrange(10**6)}.png"
            target = fz.outside / name
            member = {"up-from-work": f"../outside/{name}",
                      "up-from-data": f"../../../outside/{name}",
                      "inside-then-up": f"images_background/Greek/../../../outside/{name}",
                      "absolute": str(target),
                      "backslashes": f"..\\..\\outside\\{name}"}[how]
            members = omniglot_members(rng)
            members[member] = image_bytes(rng)
            kind = rng.choice(["omniglot", "npz"]) if how != "inside-then-up" else "omniglot"
            if kind == "npz":  # np.load reads members by name too
                buf_x, buf_y = io.BytesIO(), io.BytesIO()
                np.save(buf_x, np.zeros((30, 8, 8), np.uint8))
                np.save(buf_y, np.arange(30) % 3)
                path = zip_of(folder / "data.npz", {"x.npy": buf_x.getvalue(), "y.npy": buf_y.getvalue(),
                                                    member: buf_y.getvalue()})
                args = ["prepare", f"npz:{path}"]
            else:
                path = zip_of(folder / "omniglot.zip", members)
                args = ["prepare", f"omniglot:{path}"]
            targets = (target, (fz.work / member).resolve(), (fz.cwd / member).resolve(),
                       (fz.work / "data" / "x" / member).resolve())
            return Built(args, (member, name), targets)
        return make

    return cases_of(fz, "zip-slip", [
        ("a ../ member (from the work directory)", slip("up-from-work"), 3),
        ("a ../../../ member (from a dataset folder)", slip("up-from-data"), 3),
        ("a member going in, then up", slip("inside-then-up"), 2),
        ("an absolute member path", slip("absolute"), 2),
        ("a ..\\ member (Windows separators)", slip("backslashes"), 2),
    ])


def zip_bomb_cases(fz: Fuzz) -> list[Case]:
    def zeros_member(archive: zipfile.ZipFile, name: str, megabytes: int) -> None:
        with archive.open(name, "w", force_zip64=True) as member:
            block = bytes(16 << 20)
            for _ in range(megabytes // 16):
                member.write(block)

    def one_big_member(rng, folder):
        path = folder / "omniglot.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for name, data in omniglot_members(rng).items():
                archive.writestr(name, data)
            zeros_member(archive, "images_background/Greek/character01/bomb.png", BOMB_MB)
        return Built(["prepare", f"omniglot:{path}"], ("bomb.png", "omniglot.zip"))

    def many_members(rng, folder):
        path = folder / "omniglot.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for i in range(16):
                zeros_member(archive, f"images_background/Greek/character{i:02d}/bomb.png", BOMB_MB // 16)
        return Built(["prepare", f"omniglot:{path}"], ("bomb.png", "omniglot.zip"))

    def npz_bomb(rng, folder):
        path = folder / "data.npz"
        header = io.BytesIO()
        side = int((BOMB_MB * 2**20 / 30) ** 0.5)
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (30, side, side)})
        labels = io.BytesIO()
        np.save(labels, np.arange(30) % 3)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("y.npy", labels.getvalue())
            with archive.open("x.npy", "w", force_zip64=True) as member:
                member.write(header.getvalue())
                left = 30 * side * side
                while left:
                    block = min(left, 16 << 20)
                    member.write(bytes(block))
                    left -= block
        return Built(["prepare", f"npz:{path}"], ("x.npy", "data.npz"))

    def lying_size(rng, folder):  # a member whose header says 100 bytes but expands to 64 MB
        path = folder / "omniglot.zip"
        members = omniglot_members(rng)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
            archive.writestr("images_background/Greek/character01/liar.png", bytes(64 << 20))
        data = bytearray(path.read_bytes())
        last = data.rfind(b"PK\x01\x02")  # the liar's entry in the central directory
        data[last + 24: last + 28] = struct.pack("<I", 100)  # its uncompressed size
        return Built(["prepare", f"omniglot:{write(path, bytes(data))}"], ("liar.png", "omniglot.zip"))

    return cases_of(fz, "zip bombs", [
        (f"one member of {BOMB_MB} MB of zeros", one_big_member, 2, ISOLATE),
        (f"16 members of {BOMB_MB // 16} MB of zeros", many_members, 2, ISOLATE),
        (f"an npz whose x.npy expands to {BOMB_MB} MB", npz_bomb, 2, ISOLATE),
        ("a member whose declared size lies (100 B, holds 64 MB)", lying_size, 2, ISOLATE),
    ])


# -- symlink loops -------------------------------------------------------------------------------

def symlink_cases(fz: Fuzz) -> list[Case]:
    def loop(folder: Path, name: str) -> Path:
        """`name` pointing at `name.other`, which points back."""
        path, other = folder / name, folder / (name + ".other")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(other.name, path)
        os.symlink(path.name, other)
        return path

    def self_loop(folder: Path, name: str) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(name, path)
        return path

    def image_file_loop(rng, folder):
        files = image_folder(rng, folder / "images")
        path = loop(folder / "images" / rng.choice(sorted(files)), f"loop{rng.randrange(100)}.png")
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], (path.name,))

    def folder_loop(rng, folder):  # a subfolder of a class pointing back at the images' root
        files = image_folder(rng, folder / "images")
        link = folder / "images" / rng.choice(sorted(files)) / "again"
        os.symlink("..", link)
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("again",), ())

    def class_loop(rng, folder):  # a class folder that is a link to the images' root
        image_folder(rng, folder / "images")
        os.symlink(".", folder / "images" / "d")
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("images/d",))

    def root_loop(rng, folder):
        path = self_loop(folder, "images")
        return Built(["prepare", f"imagefolder:{path}"], ("images",))

    def dangling(rng, folder):
        files = image_folder(rng, folder / "images")
        link = folder / "images" / rng.choice(sorted(files)) / "gone.png"
        os.symlink(folder / "no-such-file.png", link)
        return Built(["prepare", f"imagefolder:{folder / 'images'}"], ("gone.png",))

    def idx_file_loop(rng, folder):
        _, labels = valid_idx(rng)
        write(folder / LABELS, labels)
        loop(folder, IMAGES)
        return Built(["prepare", f"idx:{folder}"], (IMAGES,))

    def idx_folder_loop(rng, folder):
        return Built(["prepare", f"idx:{self_loop(folder, 'mnist')}"], ("mnist",))

    def npz_loop(rng, folder):
        return Built(["prepare", f"npz:{loop(folder, 'data.npz')}"], ("data.npz",))

    def zip_loop(rng, folder):
        return Built(["prepare", f"omniglot:{loop(folder, 'omniglot.zip')}"], ("omniglot.zip",))

    def config_loop(rng, folder):
        return Built(["prepare", "sklearn:digits", "--config", str(loop(folder, "settings.yaml"))], ("settings.yaml",))

    def data_loop(rng, folder):
        path = self_loop(folder, "dataset")
        return Built(["transfer", "--data", str(path), "--strategy", "scratch", "--epochs", "1", "--no-baseline"],
                     ("dataset",))

    def manifest_loop(rng, folder):
        shutil.copytree(fz.data, folder / "dataset")
        (folder / "dataset" / "manifest.json").unlink()
        loop(folder / "dataset", "manifest.json")
        return Built(["evaluate", "--model", fz.checkpoint, "--data", str(folder / "dataset")], ("manifest.json",))

    def checkpoint_loop(command: str):
        def make(rng, folder):
            path = loop(folder, "checkpoint.pt")
            if command == "evaluate":
                return Built(["evaluate", "--model", str(path), "--data", fz.data], ("checkpoint.pt",))
            return Built(["transfer", "--data", fz.data, "--strategy", "finetune", "--backbone", str(path),
                          "--epochs", "1", "--no-baseline"], ("checkpoint.pt",))
        return make

    return cases_of(fz, "symlink loops", [
        ("an image that is a symlink loop", image_file_loop, 2),
        ("a class subfolder linking back to the root", folder_loop, 1),
        ("a class folder linking to the root", class_loop, 1),
        ("the image folder itself a loop", root_loop, 1),
        ("a dangling image symlink", dangling, 1),
        ("an IDX file that is a loop", idx_file_loop, 1),
        ("an IDX folder that is a loop", idx_folder_loop, 1),
        ("an npz that is a loop", npz_loop, 1),
        ("an Omniglot zip that is a loop", zip_loop, 1),
        ("a config file that is a loop", config_loop, 1),
        ("transfer --data a loop", data_loop, 1),
        ("a manifest that is a loop", manifest_loop, 1),
        ("evaluate --model a loop", checkpoint_loop("evaluate"), 1),
        ("transfer --backbone a loop", checkpoint_loop("transfer"), 1),
    ])


# -- config files --------------------------------------------------------------------------------

def config_cases(fz: Fuzz) -> list[Case]:
    def prepare_with(text: str | bytes, mention: str):
        def make(rng, folder):
            path = write(folder / "settings.yaml", text)
            return Built(["prepare", "sklearn:digits", "--config", str(path)], (mention, "settings.yaml"))
        return make

    def transfer_with(change: dict | Callable[[dict], str], mention: str):
        """A transfer config of the valid dataset with one setting made wrong."""
        def make(rng, folder):
            import yaml

            base = {"data": fz.data, "strategy": "scratch", "epochs": 1, "shots": 2}
            text = change(base) if callable(change) else yaml.safe_dump({**base, **change})
            path = write(folder / "settings.yaml", text)
            return Built(["transfer", "--config", str(path), "--no-baseline"], (mention,))
        return make

    def random_yaml(rng, folder):  # structural garbage made of YAML's own punctuation
        pieces = ["{", "}", "[", "]", ": ", "- ", "&a ", "*a ", "!!", "\t", "'", '"', "?", "|", ">", "%", "@", "`"]
        text = "epochs: 1\n" + "".join(rng.choice(pieces) + rng.choice(["x", "1", "", "\n"]) for _ in range(30))
        path = write(folder / "settings.yaml", text)
        return Built(["prepare", "sklearn:digits", "--config", str(path)], ("settings.yaml",))

    bomb = "model_kwargs:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi"))

    def yaml_bomb(base: dict) -> str:  # 9 ** 9 values from 10 lines
        import yaml

        return yaml.safe_dump(base) + bomb

    typos = ["epoch", "learning_rate", "shot", "batchsize", "strategie", "n_epochs", "optimiser", "lr_rate"]
    wrong = [({"epochs": "ten"}, "epochs"), ({"epochs": 0}, "epochs"), ({"epochs": -3}, "epochs"),
             ({"lr": [1]}, "lr"), ({"lr": -1}, "lr"), ({"lr": "fast"}, "lr"), ({"shots": -5}, "shots"),
             ({"shots": "some"}, "shots"), ({"batch_size": 0}, "batch_size"), ({"strategy": 7}, "strategy"),
             ({"strategy": "magic"}, "magic"), ({"model": "resnet1000"}, "resnet1000"),
             ({"optimizer": "adamm"}, "optimizer"), ({"model_kwargs": [1, 2]}, "model_kwargs"),
             ({"runner": "cloud"}, "runner"), ({"in_memory_mb": -5}, "in_memory_mb"), ({"seed": "x"}, "seed"),
             ({"data": 5}, "data"), ({"data": None}, "data"), ({"amp": "maybe"}, "amp"),
             ({"unseen_classes": "3"}, "unseen_classes"), ({"val_per_class": -1}, "val_per_class")]
    prepare_wrong = [("image_size: 0\n", "image_size"), ("image_size: big\n", "image_size"),
                     ("image_size: 100000\n", "image_size"), ("image_size: 1000000000\n", "image_size"),
                     ("test_fraction: 1.5\n", "test_fraction"), ("test_fraction: 0\n", "test_fraction"),
                     ("classes: {a: 1}\n", "classes"), ("seed: .inf\n", "seed"), ("store: tape\n", "store"),
                     ("test_split: halves\n", "test_split"), ("channels: 7\n", "channels"), ("channels: 0\n", "channels"),
                     ("max_per_class: -1\n", "max_per_class"), ("classes: [0, 0]\n", "twice"),
                     ("classes: [0, 99]\n", "'99'")]
    variants = [
        ("YAML with an unclosed bracket", prepare_with("epochs: [1, 2\nseed: 3\n", "settings.yaml"), 1),
        ("YAML with bad indentation", prepare_with("seed: 1\n  image_size: 8\n bad: 2\n", "settings.yaml"), 1),
        ("YAML with a tab indent", prepare_with("classes:\n\t- 1\n", "settings.yaml"), 1),
        ("YAML with an unterminated string", prepare_with('seed: "1\n', "settings.yaml"), 1),
        ("YAML punctuation garbage", random_yaml, 6),
        ("a binary file (PNG bytes)", prepare_with(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "settings.yaml"), 1),
        ("invalid UTF-8", prepare_with(b"seed: \xff\xfe\xfa\n", "settings.yaml"), 1),
        ("a list, not a mapping", prepare_with("- seed\n- 1\n", "list"), 1),
        ("a number, not a mapping", prepare_with("42\n", "int"), 1),
        ("a string, not a mapping", prepare_with("just words\n", "str"), 1),
        ("config: 5 (a saved run's wrapper around a number)", prepare_with("config: 5\n", "config"), 1),
        ("config: [a list]", prepare_with("config: [1, 2]\n", "config"), 1),
        ("a number as a key", prepare_with("1: 2\n", "1"), 1),
        ("a list as a key", prepare_with("? [a, b]\n: 2\n", "settings.yaml"), 1),
        ("nesting 100 000 deep", prepare_with("seed: " + "[" * 100_000 + "]" * 100_000 + "\n", "settings.yaml"), 1,
         ISOLATE),
        ("a billion-laughs alias bomb", transfer_with(yaml_bomb, "settings.yaml"), 1, ISOLATE),
        ("a Python object tag", prepare_with("seed: !!python/object/apply:os.system [echo hi]\n", "settings.yaml"), 1),
        *[(f"unknown key {t!r}", transfer_with({t: 1}, t), 1) for t in typos],
        ("unknown key in a prepare config", prepare_with("imagesize: 8\n", "imagesize"), 1),
        ("unknown key (a step's name)", prepare_with("prepare: {seed: 1}\n", "prepare"), 1),
        *[(f"wrong value {change}", transfer_with(change, mention), 1) for change, mention in wrong],
        *[(f"wrong value {text.strip()}", prepare_with(text, mention), 1, text.startswith("image_size: 1"))
          for text, mention in prepare_wrong],
        ("no data in a transfer config", transfer_with(lambda base: "strategy: scratch\nepochs: 1\n", "data"), 1),
        ("an empty transfer config", transfer_with(lambda base: "", "data"), 1),
    ]

    def a_folder(rng, folder):
        (folder / "settings.yaml").mkdir()
        return Built(["prepare", "sklearn:digits", "--config", str(folder / "settings.yaml")], ("settings.yaml",))

    def missing(rng, folder):
        return Built(["prepare", "sklearn:digits", "--config", str(folder / "nope.yaml")], ("nope.yaml",))

    variants += [("a folder as the config", a_folder, 1), ("config file does not exist", missing, 1)]
    return cases_of(fz, "config files", variants)


# -- URIs ----------------------------------------------------------------------------------------

def uri_cases(fz: Fuzz) -> list[Case]:
    def prepare(uri: str, mention: str | None = None):
        def make(rng, folder):
            return Built(["prepare", uri], (mention or uri,))
        return make

    def backbone(uri: str, command: str = "transfer"):
        def make(rng, folder):
            if command == "evaluate":
                return Built(["evaluate", "--model", uri, "--data", fz.data], (uri,))
            return Built(["transfer", "--data", fz.data, "--strategy", "finetune", "--backbone", uri, "--epochs", "1",
                          "--no-baseline"], (uri,))
        return make

    def data(uri: str, command: str = "transfer"):
        def make(rng, folder):
            if command == "evaluate":
                return Built(["evaluate", "--model", fz.checkpoint, "--data", uri], (uri,))
            return Built(["transfer", "--data", uri, "--strategy", "scratch", "--epochs", "1", "--no-baseline"], (uri,))
        return make

    run_id = "0123456789abcdef0123456789abcdef"
    return cases_of(fz, "unknown URIs", [
        ("ftp:", prepare("ftp:somewhere/data", "ftp"), 1),
        ("http://", prepare("http://example.com/mnist.npz", "http"), 1),
        ("https://", prepare("https://example.com/mnist.npz", "https"), 1),
        ("file://", prepare("file:///tmp/data.npz", "file"), 1),
        ("a bare s3:// path", prepare("s3://bucket/data", "s3://bucket/data"), 1),
        ("an empty URI", prepare("", "''"), 1),
        ("only a colon", prepare(":", "':'"), 1),
        ("a plain path, no scheme", prepare("mnist", "mnist"), 1),
        ("upper-case scheme", prepare("IDX:mnist", "IDX"), 1),
        ("a Windows path", prepare("C:\\data\\mnist", "C"), 1),
        ("torchvision: unknown dataset", prepare("torchvision:NotADataset", "NotADataset"), 1),
        ("torchvision:MNIST offline", prepare("torchvision:MNIST", "MNIST"), 1),
        ("torchvision: empty name", prepare("torchvision:", "torchvision"), 1),
        ("sklearn:iris", prepare("sklearn:iris", "iris"), 1),
        ("fonts:greek", prepare("fonts:greek", "greek"), 1),
        ("imagefolder:s3:// without a bucket", prepare("imagefolder:s3://", "s3://"), 1),
        ("omniglot:s3:// without a bucket", prepare("omniglot:s3:///x.zip", "s3:///x.zip"), 1),
        ("--backbone runs:/ of no run", backbone(f"runs:/{run_id}/checkpoint"), 1),
        ("--backbone models:/ of no model", backbone("models:/no-such-model/1"), 1),
        ("--backbone models:/ alias of no model", backbone("models:/no-such-model@champion"), 1),
        ("--backbone mlflow-artifacts:/", backbone("mlflow-artifacts:/nothing/here"), 1),
        ("--backbone http://", backbone("http://example.com/checkpoint.pt"), 1),
        ("--backbone s3:// without a bucket", backbone("s3:///checkpoint.pt"), 1),
        ("--backbone ftp:", backbone("ftp:checkpoint.pt"), 1),
        ("evaluate --model runs:/ of no run", backbone(f"runs:/{run_id}/checkpoint", "evaluate"), 1),
        ("evaluate --model models:/ of no model", backbone("models:/no-such-model/3", "evaluate"), 1),
        ("evaluate --model a missing path", backbone("no/such/checkpoint.pt", "evaluate"), 1),
        ("transfer --data a data URI, not a prepared set", data("sklearn:digits"), 1),
        ("transfer --data s3:// without a bucket", data("s3:///data"), 1),
        ("transfer --data runs:/", data(f"runs:/{run_id}/data"), 1),
        ("evaluate --data a missing folder", data("no/such/dataset", "evaluate"), 1),
        ("evaluate --data ftp:", data("ftp:dataset", "evaluate"), 1),
    ])


# -- garbled checkpoints and prepared datasets ---------------------------------------------------

def checkpoint_cases(fz: Fuzz) -> list[Case]:
    def use(path: Path, command: str, mention: str | None = None) -> Built:
        mentions = tuple(m for m in (mention, path.name) if m)
        if command == "evaluate":
            return Built(["evaluate", "--model", str(path), "--data", fz.data], mentions)
        return Built(["transfer", "--data", fz.data, "--strategy", "finetune", "--backbone", str(path), "--epochs", "1",
                      "--shots", "2", "--no-baseline"], mentions)

    def load_valid() -> dict:
        import torch

        return torch.load(fz.checkpoint, weights_only=True)

    def save(obj, path: Path) -> Path:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        return path

    def command_of(rng) -> str:
        return rng.choice(["evaluate", "transfer"])

    def random_bytes(rng, folder):
        return use(write(folder / "checkpoint.pt", garbage(rng, rng.randrange(0, 4000))), command_of(rng))

    def truncated(rng, folder):
        data = Path(fz.checkpoint).read_bytes()
        return use(write(folder / "checkpoint.pt", data[: rng.randrange(1, len(data) - 1)]), command_of(rng))

    def bad_checksum_file(rng, folder):
        shutil.copy(fz.checkpoint, folder / "checkpoint.pt")
        write(folder / "checkpoint.pt.sha256", rng.choice([b"", garbage(rng, 40), b"0" * 64 + b"  checkpoint.pt\n"]))
        return use(folder / "checkpoint.pt", command_of(rng))

    def flipped(rng, folder):
        data = bytearray(Path(fz.checkpoint).read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        write(folder / "checkpoint.pt", bytes(data))
        shutil.copy(fz.checkpoint + ".sha256", folder / "checkpoint.pt.sha256")
        return use(folder / "checkpoint.pt", command_of(rng))

    def not_a_dict(rng, folder):
        import torch

        obj = rng.choice([[1, 2, 3], torch.zeros(3), "checkpoint", 7])
        return use(save(obj, folder / "checkpoint.pt"), command_of(rng))

    def foreign_dict(rng, folder):  # a plain state_dict, as other tools save them
        return use(save(load_valid()["model"], folder / "checkpoint.pt"), command_of(rng))

    def without(key: str, command: str | None = None):
        def make(rng, folder):
            ckpt = load_valid()
            del ckpt[key]
            drawn = command_of(rng)  # drawn even when fixed: the cases after it stay the same
            return use(save(ckpt, folder / "checkpoint.pt"), command or drawn, key)
        return make

    def with_value(key: str, value, mention: str | None = None, command: str | None = None):
        def make(rng, folder):
            ckpt = load_valid()
            ckpt[key] = value(ckpt) if callable(value) else value
            return use(save(ckpt, folder / "checkpoint.pt"), command or command_of(rng), mention or key)
        return make

    def spec(change: dict, mention: str):
        return with_value("model_spec", lambda ckpt: {**ckpt["model_spec"], **change}, mention)

    def data_field(change: dict, mention: str):
        return with_value("data", lambda ckpt: {**ckpt["data"], **change}, mention)

    def wrong_tensor_shapes(rng, folder):
        import torch

        ckpt = load_valid()
        name = rng.choice(sorted(k for k, v in ckpt["model"].items() if v.ndim > 0))
        ckpt["model"][name] = torch.zeros(3, 3, 3)
        return use(save(ckpt, folder / "checkpoint.pt"), command_of(rng), "does not fit")

    def pickled_code(rng, folder):
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {fz.outside / 'pwned'}",))

        return use(write(folder / "checkpoint.pt", pickle.dumps({"format": "tl-checkpoint/1", "x": Payload()})),
                   command_of(rng))

    def a_folder_without(rng, folder):
        (folder / "run").mkdir()
        return use(folder / "run", command_of(rng))

    def a_dataset_as_model(rng, folder):
        return Built(["evaluate", "--model", fz.data, "--data", fz.data], (Path(fz.data).name, "checkpoint.pt"))

    def an_image(rng, folder):
        return use(write(folder / "checkpoint.pt", image_bytes(rng)), command_of(rng))

    def a_zip(rng, folder):
        return use(zip_of(folder / "checkpoint.pt", {"archive/data.pkl": b"junk", "archive/version": b"3"}),
                   command_of(rng))

    return cases_of(fz, "checkpoints", [
        ("random bytes", random_bytes, 3),
        ("truncated (no checksum beside it)", truncated, 3),
        ("a wrong or garbled checksum file", bad_checksum_file, 3),
        ("a flipped bit under its checksum", flipped, 2),
        ("not a dict", not_a_dict, 2),
        ("a bare state_dict", foreign_dict, 1),
        *[(f"no {key!r}", without(key), 1) for key in ("model_spec", "model")],
        # Without config or data it is a bare backbone, which transfer takes (README: wrap a
        # state_dict); evaluate needs what a tl training stores.
        *[(f"no {key!r} (evaluate)", without(key, "evaluate"), 1) for key in ("data", "config")],
        ("model_spec not a dict", with_value("model_spec", "small_cnn"), 1),
        ("an unknown architecture", spec({"name": "resnet1000"}, "resnet1000"), 1),
        ("num_classes -1", spec({"num_classes": -1}, "num_classes"), 1),
        ("in_channels 0", spec({"in_channels": 0}, "in_channels"), 1),
        ("unknown model kwargs", spec({"kwargs": {"wings": 2}}, "wings"), 1),
        ("data without classes", with_value("data", lambda c: {k: v for k, v in c["data"].items() if k != "classes"}),
         1),
        ("data shape of 2 numbers", data_field({"shape": [8, 8]}, "shape"), 1),
        ("data mean of the wrong length", data_field({"mean": [0.1, 0.2, 0.3, 0.4]}, "mean"), 1),
        ("config naming an unknown strategy (evaluate)",
         with_value("config", lambda c: {**c["config"], "strategy": "magic"}, "magic", "evaluate"), 1),
        ("config not a dict", with_value("config", 5), 1),
        ("model weights of the wrong shape", wrong_tensor_shapes, 2),
        ("a pickle that runs code", pickled_code, 1),
        ("a folder without checkpoint.pt", a_folder_without, 1),
        ("a dataset given as the model", a_dataset_as_model, 1),
        ("a PNG", an_image, 1),
        ("a zip that is not a torch file", a_zip, 1),
    ])


def dataset_cases(fz: Fuzz) -> list[Case]:
    """Copies of the valid prepared dataset, each damaged once where the command reads it: evaluate
    reads the test split's shards, transfer the train split's shards and labels."""

    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(fz.data, folder / "dataset"))

    def command_of(rng, only: str | None = None) -> tuple[str, str]:
        command = only or rng.choice(["evaluate", "transfer"])
        return command, "test" if command == "evaluate" else "train"

    def use(path: Path, command: str, mention: str) -> Built:
        if command == "evaluate":
            return Built(["evaluate", "--model", fz.checkpoint, "--data", str(path)], (mention,))
        return Built(["transfer", "--data", str(path), "--strategy", "scratch", "--epochs", "1", "--shots", "2",
                      "--no-baseline"], (mention,))

    def manifest_text(text: str | bytes):
        def make(rng, folder):
            path = copy(folder)
            write(path / "manifest.json", text)
            return use(path, command_of(rng)[0], "manifest.json")
        return make

    def manifest_edit(edit: Callable[[dict, Path, str], None], mention: str, only: str | None = None):
        """edit(manifest, dataset folder, split read) changes the manifest or the split's files."""
        def make(rng, folder):
            path = copy(folder)
            command, split = command_of(rng, only)
            manifest = json.loads((path / "manifest.json").read_text())
            edit(manifest, path, split)
            write(path / "manifest.json", json.dumps(manifest))
            return use(path, command, mention)
        return make

    def set_to(key: str, value):
        return manifest_edit(lambda m, p, split: m.__setitem__(key, value), key)

    def drop(key: str):
        return manifest_edit(lambda m, p, split: m.pop(key), key)

    def forged_labels(labels: Callable[[int], np.ndarray]):
        """labels-train.npy replaced, its sha256 in the manifest updated to match."""
        def edit(manifest, path, split):
            n = sum(e["rows"] for e in manifest["shards"][split])
            buf = io.BytesIO()
            np.save(buf, labels(n), allow_pickle=True)
            write(path / f"labels-{split}.npy", buf.getvalue())
            manifest["files"][f"labels-{split}.npy"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        return edit

    def object_labels(n):
        boxed = np.empty(n, dtype=object)
        boxed[:] = [i % 3 for i in range(n)]
        return boxed

    def forged_shard(table: Callable[[dict], bytes]):
        """The split's first shard replaced, its sha256 in the manifest updated to match."""
        def edit(manifest, path, split):
            entry = manifest["shards"][split][0]
            data = table(entry)
            write(path / entry["name"], data)
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        return edit

    def parquet(columns: dict) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table(columns), buf)
        return buf.getvalue()

    def file_change(change: str, what: str):
        """A shard or the labels of the split read: deleted, truncated or a byte flipped."""
        def make(rng, folder):
            path = copy(folder)
            command, split = command_of(rng, "transfer" if what == "labels" else None)
            manifest = json.loads((path / "manifest.json").read_text())
            target = path / (manifest["shards"][split][0]["name"] if what == "shard" else f"labels-{split}.npy")
            if change == "delete":
                target.unlink()
            elif change == "truncate":
                data = target.read_bytes()
                target.write_bytes(data[: rng.randrange(len(data))])
            else:
                data = bytearray(target.read_bytes())
                data[rng.randrange(len(data))] ^= 0xFF
                target.write_bytes(bytes(data))
            return use(path, command, target.name)
        return make

    def a_file(rng, folder):
        return use(write(folder / "dataset", "not a folder"), command_of(rng)[0], "dataset")

    def checkpoint_folder(rng, folder):
        return use(Path(fz.checkpoint).parent, command_of(rng)[0], Path(fz.checkpoint).parent.name)

    def empty_folder(rng, folder):
        (folder / "dataset").mkdir()
        return use(folder / "dataset", command_of(rng)[0], "dataset")

    def rows_of(entry):
        return {"image": [b"\x00" * 5] * entry["rows"], "label": [0] * entry["rows"],
                "index": list(range(entry["first"], entry["first"] + entry["rows"]))}

    return cases_of(fz, "prepared datasets", [
        ("no manifest.json", empty_folder, 1),
        ("manifest not JSON", manifest_text("{not json"), 1),
        ("manifest of binary bytes", manifest_text(b"\xff\xfe\x00garbage"), 1),
        ("manifest a JSON list", manifest_text("[1, 2, 3]"), 1),
        ("manifest a JSON string", manifest_text('"tl-prepared/2"'), 1),
        ("manifest empty", manifest_text(""), 1),
        ("manifest of an unknown format", set_to("format", "tl-prepared/99"), 1),
        *[(f"manifest without {key!r}", drop(key), 1)
          for key in ("classes", "shape", "shards", "files", "stored", "mean", "std")],
        ("classes a number", set_to("classes", 5), 1),
        ("shape a string", set_to("shape", "8x8"), 1),
        ("shape of 2 numbers", set_to("shape", [8, 8]), 1),
        ("shards a list", set_to("shards", []), 1),
        ("the split read not listed", manifest_edit(lambda m, p, split: m["shards"].pop(split), "shards"), 1),
        ("mean of the wrong length", set_to("mean", [0.5, 0.5]), 1),
        ("stored neither arrays nor files", set_to("stored", "tape"), 1),
        ("a shard deleted", file_change("delete", "shard"), 1),
        ("a shard truncated", file_change("truncate", "shard"), 1),
        ("a shard with a flipped byte", file_change("flip", "shard"), 1),
        ("labels deleted", file_change("delete", "labels"), 1),
        ("labels with a flipped byte", file_change("flip", "labels"), 1),
        ("labels out of range (hashes updated)",
         manifest_edit(forged_labels(lambda n: np.arange(n) % 3 + 50), "labels", "transfer"), 1),
        ("pickled labels (hashes updated)", manifest_edit(forged_labels(object_labels), "labels", "transfer"), 1),
        ("labels of another count (hashes updated)",
         manifest_edit(forged_labels(lambda n: np.arange(n + 7) % 3), "labels", "transfer"), 1),
        ("a shard of random bytes (hashes updated)",
         manifest_edit(forged_shard(lambda entry: b"PAR1" + bytes(200) + b"PAR1"), "parquet"), 1),
        ("a shard without the image column (hashes updated)",
         manifest_edit(forged_shard(lambda entry: parquet({"label": [0] * entry["rows"]})), "image"), 1),
        ("a shard of images of the wrong size (hashes updated)",
         manifest_edit(forged_shard(lambda entry: parquet(rows_of(entry))), "shape"), 1),
        ("a file, not a folder", a_file, 1),
        ("a checkpoint's folder", checkpoint_folder, 1),
    ])


GENERATORS = [idx_cases, npz_cases, imagefolder_cases, mixed_images_cases, zip_cases, zip_slip_cases, zip_bomb_cases,
              symlink_cases, config_cases, uri_cases, checkpoint_cases, dataset_cases]


def make_cases(fz: Fuzz) -> list[Case]:
    """Every case of the seed, in a fixed order (nothing is written until a case is built)."""
    return [case for generate in GENERATORS for case in generate(fz)]


def one_per_kind(cases: list[Case], seed: int, total: int) -> list[Case]:
    """A seeded sample: one case of each input class, then others at random up to `total`."""
    rng = random.Random(f"sample:{seed}")
    kinds = sorted({c.kind for c in cases}, key=[c.kind for c in cases].index)
    picked = [rng.choice([c for c in cases if c.kind == kind]) for kind in kinds]
    rest = [c for c in cases if c not in picked]
    picked += rng.sample(rest, max(0, min(total - len(picked), len(rest))))
    return sorted(picked, key=cases.index)


# -- setting up: the folders and the valid dataset and checkpoint --------------------------------

def make_folders(fz: Fuzz) -> None:
    """work/ (TL_WORKDIR), outside/ (a sentinel folder beside it), cwd/ (the current folder), tmp/
    (TMPDIR) and inputs/, in the run's root folder."""
    for folder in (fz.work, fz.outside, fz.cwd, fz.root / "tmp", fz.root / "inputs"):
        folder.mkdir(parents=True, exist_ok=True)
    write(fz.outside / "keep.txt", "the sentinel: nothing may change here\n")


def environment(fz: Fuzz) -> dict:
    return {"TL_WORKDIR": str(fz.work), "TMPDIR": str(fz.root / "tmp"), "AWS_EC2_METADATA_DISABLED": "true"}


def make_valid_inputs(fz: Fuzz) -> None:
    """A valid prepared dataset (3 digit classes) and a checkpoint pretrained on it for 1 epoch."""
    for args, key in ((["prepare", "sklearn:digits", "--classes", "0,1,2", "--json"], "path"),
                      (["pretrain", "--data", "DATA", "--epochs", "1", "--json"], "checkpoint")):
        out = invoke([fz.data if a == "DATA" else a for a in args])
        if out.exit_code != 0:
            raise RuntimeError(f"tl {' '.join(args)} failed: {out.output[-3000:]}")
        value = json.loads(out.stdout.strip().splitlines()[-1])[key]
        if key == "path":
            fz.data = value
        else:
            fz.checkpoint = value


def invoke(args: list[str]):
    from typer.testing import CliRunner

    from tl_core.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# -- running a case and judging it ---------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException: `except Exception` in the
    code under test must not swallow it)."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


@dataclass
class Outcome:
    exit_code: int | None
    output: str
    seconds: float
    crash: str | None = None  # an exception that escaped `tl` (in-process: the traceback's last line)
    crash_at: str | None = None  # where it was raised, the deepest frame in this project
    peak_mb: float = 0.0  # how far this case raised the peak resident memory

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]

    @property
    def other_lines(self) -> list[str]:
        """What was printed besides the error line and warnings: a refusal says one thing."""
        return [line for line in self.output.splitlines()
                if line.strip() and not line.startswith(("error:", "warning:"))]

    @property
    def traceback(self) -> bool:
        return self.crash is not None or "Traceback" in self.output


def memory_kb(field_name: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, VmSize) in kB; 0 where there is none."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def run_in_process(args: list[str]) -> Outcome:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
    except OSError:  # not Linux, or not allowed: the peak is then this process's, not the case's
        pass
    resident = memory_kb("VmRSS")
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        result = invoke(args)
    except CaseTimeout:
        return Outcome(None, "", time.perf_counter() - started, f"timed out after {CASE_SECONDS} s")
    finally:
        signal.alarm(0)
    outcome = Outcome(result.exit_code, result.output, time.perf_counter() - started,
                      peak_mb=(memory_kb("VmHWM") - resident) / 1024)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        kind, message = type(result.exception), str(result.exception).strip().splitlines()
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        outcome.crash = f"{name}{': ' + message[0] if message else ''}"[:300]
        frames = [f for f in traceback.extract_tb(result.exc_info[2]) if "/tl_core/" in f.filename]
        if frames:
            outcome.crash_at = f"tl_core/{frames[-1].filename.split('/tl_core/')[-1]}:{frames[-1].lineno}"
    return outcome


def limit_this_process() -> None:
    """Cap this process's address space a few GB above what it maps now: a case that tries to
    allocate far more fails with MemoryError (a traceback, counted) instead of taking the machine."""
    limit = memory_kb("VmSize") * 1024 + IN_PROCESS_HEADROOM_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _limit_memory() -> None:
    limit = SUBPROCESS_MEMORY_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


TIME = "/usr/bin/time"  # GNU time: the peak resident memory of a process (-f %M)
PEAK_FILE = "peak-kb.txt"  # where GNU time writes it: the bench's own file, not watched
BASELINE_KB: list[int] = []  # the peak of a `tl` process refusing an input at once (imports alone)


def run_subprocess(args: list[str], fz: Fuzz) -> Outcome:
    """`tl <args>` as a process of its own, in at most SUBPROCESS_MEMORY_GB of address space and
    CASE_SECONDS; its peak memory (where GNU time is here) is counted above a baseline `tl` run's."""
    env = {**os.environ, **environment(fz)}
    peak_file = fz.root / PEAK_FILE
    timed = [TIME, "-f", "%M", "-o", str(peak_file)] if os.path.exists(TIME) else []
    started = time.perf_counter()
    # A session of its own: on a timeout the whole group goes, `tl` with GNU time.
    run = subprocess.Popen([*timed, TL, *args], env=env, cwd=fz.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=_limit_memory, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=CASE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        peak_file.unlink(missing_ok=True)
        return Outcome(None, "", time.perf_counter() - started, f"timed out after {CASE_SECONDS} s")
    output = stderr + stdout
    peak_kb = int(peak_file.read_text().split()[-1]) if timed and peak_file.exists() else 0
    peak_file.unlink(missing_ok=True)
    if timed:  # GNU time's own line about a non-zero exit
        output = "\n".join(line for line in output.splitlines() if not line.startswith("Command exited with"))
    outcome = Outcome(run.returncode, output, time.perf_counter() - started,
                      peak_mb=max(0, peak_kb - (BASELINE_KB[0] if BASELINE_KB else 0)) / 1024)
    if "Traceback" in output:
        # The exception's line: the first unindented line after the last traceback's frames.
        after = output.split("Traceback (most recent call last):")[-1].splitlines()[1:]
        outcome.crash = next((line for line in after if line and not line.startswith(" ")), after[-1] if after else "")[:300]
        frames = re.findall(r'File "[^"]*/(tl_core/[^"]+)", line (\d+)', output)
        outcome.crash_at = f"{frames[-1][0]}:{frames[-1][1]}" if frames else None
    return outcome


def measure_baseline(fz: Fuzz) -> None:
    """The peak memory of `tl` refusing an input before reading anything: imports alone."""
    BASELINE_KB.clear()
    outcome = run_subprocess(["prepare", "no-scheme"], fz)
    BASELINE_KB.append(int(outcome.peak_mb * 1024))  # measured with no baseline yet: its whole peak


# Files every command rewrites by design: the SQLite tracking database, and locks.
LIVE = ("mlflow.db", "mlflow.db-journal", ".lock")


def stored_files(work: Path) -> dict[str, str]:
    """sha256 of every file stored in the work directory."""
    out = {}
    for folder, _, files in os.walk(work):
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not name.endswith(LIVE):
                out[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def outside_files(fz: Fuzz) -> dict[str, tuple]:
    """Every entry outside the work directory, links not followed: (kind, size, mtime) or a link's
    target. (Hashing the inputs' bombs before and after every case would take minutes.)"""
    out = {}
    for folder, dirs, files in os.walk(fz.root):
        if Path(folder) == fz.root:
            dirs.remove("work")
        for name in dirs + files:
            path = Path(folder, name)
            if path == fz.root / PEAK_FILE:
                continue
            info = os.lstat(path)
            if os.path.islink(path):
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():  # by presence: a temporary file made and removed changes a folder's mtime
                out[str(path)] = ("dir",)
            else:
                out[str(path)] = ("file", info.st_size, info.st_mtime_ns)
    return out


def names_the_problem(line: str, mentions: tuple[str, ...]) -> bool:
    """One line that says what is wrong: it names the file, key or URI at fault, and is more than an
    exception's name."""
    text = line[len("error:"):].strip()
    return len(text.split()) >= 5 and any(m.lower() in text.lower() for m in mentions)


def judge(case: Case, built: Built, outcome: Outcome, outside_changed: list[str], stored_changed: list[str],
          left_behind: list[str]) -> dict:
    lines = outcome.error_lines
    refused = outcome.exit_code == 2 and len(lines) == 1 and not outcome.traceback and not outcome.other_lines
    clear = refused and names_the_problem(lines[0], built.mentions)
    slipped = [str(t) for t in built.slip_targets if os.path.lexists(t)]
    memory_ok = outcome.peak_mb <= MEMORY_BOUND_MB
    if case.expect == "ok":
        answered = (outcome.exit_code == 0 or refused) and not outcome.traceback
    else:
        answered = clear
    return {
        "kind": case.kind,
        "case": case.name,
        "expect": case.expect,
        "as_process": case.isolate,
        "args": built.args,
        "exit_code": outcome.exit_code,
        "error_line": lines[0] if len(lines) == 1 else None,
        "error_lines": len(lines),
        "other_lines": outcome.other_lines[:5],
        "names_the_problem": clear,
        "traceback": outcome.crash or ("Traceback in the output" if outcome.traceback else None),
        "raised_at": outcome.crash_at,
        "outside_touched": outside_changed + slipped,
        "stored_changed": stored_changed,
        "left_behind": left_behind,
        "seconds": round(outcome.seconds, 2),
        "peak_mb": round(outcome.peak_mb),
        "passed": answered and not outside_changed and not slipped and not stored_changed and not left_behind
                  and memory_ok,
    }


def run_case(case: Case, fz: Fuzz) -> tuple[dict, Built]:
    """Build the case's input, run it in this process, and judge what happened."""
    built = case.build()
    stored_before, outside_before = stored_files(fz.work), outside_files(fz)
    outcome = run_subprocess(built.args, fz) if case.isolate else run_in_process(built.args)
    stored_after, outside_after = stored_files(fz.work), outside_files(fz)
    stored_changed = sorted(name for name, sha in stored_before.items() if stored_after.get(name) != sha)
    outside_changed = sorted(set(outside_before.items()) ^ set(outside_after.items()))
    new = sorted(set(stored_after) - set(stored_before))
    # A refused input (or a crash) should leave no half-written dataset or model behind.
    failed = case.expect == "error" and outcome.exit_code != 0
    left_behind = [n for n in new if n.split("/")[0] in ("data", "models")] if failed else []
    return judge(case, built, outcome, sorted({p for p, _ in outside_changed}), stored_changed, left_behind), built


def shorten(text: str | None, fz: Fuzz) -> str | None:
    return None if text is None else text.replace(str(fz.root), "<tmp>")


# -- the report ----------------------------------------------------------------------------------

def tally(results: list[dict]) -> dict[str, dict]:
    rows = {}
    for r in results:
        row = rows.setdefault(r["kind"], {"cases": 0, "expect": r["expect"], "exit_2_error_line": 0, "prepared": 0,
                                          "tracebacks": 0, "other_exit": 0, "outside_touched": 0,
                                          "stored_changed": 0, "left_behind": 0, "over_memory": 0, "passed": 0,
                                          "as_processes": 0})
        row["cases"] += 1
        row["as_processes"] += int(r["as_process"])
        row["exit_2_error_line"] += int(r["names_the_problem"])
        row["prepared"] += int(r["exit_code"] == 0)
        row["tracebacks"] += int(bool(r["traceback"]))
        row["other_exit"] += int(r["exit_code"] not in (2,) and not (r["expect"] == "ok" and r["exit_code"] == 0))
        row["outside_touched"] += int(bool(r["outside_touched"]))
        row["stored_changed"] += int(bool(r["stored_changed"]))
        row["left_behind"] += int(bool(r["left_behind"]))
        row["over_memory"] += int(r["peak_mb"] > MEMORY_BOUND_MB)
        row["passed"] += int(r["passed"])
    return rows


def git_commit() -> str:
    """The commit the bench ran on, marked when tl_core has changes not yet committed."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

        changed = git("status", "--porcelain", "--", "tl_core")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the cases (the same seed, the same cases)")
    parser.add_argument("--sample", type=int, default=20, help="in-process cases run again as `tl` processes (0: none)")
    parser.add_argument("--only", default="", help="run only the input classes whose names contain this")
    parser.add_argument("--fresh", action="store_true", help="drop the runs fuzz.json holds (else this run is added)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (for a look at a case)")
    parser.add_argument("--note", default="", help="what this run is, kept with its figures (e.g. the code it ran on)")
    parser.add_argument("--markdown", action="store_true", help="only write fuzz.md again from fuzz.json")
    args = parser.parse_args()
    if args.markdown:
        write_markdown(json.loads((HERE / "fuzz.json").read_text()))
        return

    started = time.perf_counter()
    fz = Fuzz(Path(tempfile.mkdtemp(prefix="tl-bench-fuzz-")).resolve(), args.seed)
    make_folders(fz)
    os.environ.update(environment(fz))
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    tempfile.tempdir = None  # read TMPDIR again
    os.chdir(fz.cwd)
    try:
        make_valid_inputs(fz)
        measure_baseline(fz)
        limit_this_process()
        cases = [c for c in make_cases(fz) if args.only in c.kind]
        results, built = [], {}
        for number, case in enumerate(cases):
            result, built[id(case)] = run_case(case, fz)
            results.append(result)
            mark = "ok " if result["passed"] else "FAIL"
            print(f"{mark} {number:3d} {case.kind}: {case.name}  exit {result['exit_code']}  "
                  f"{result['seconds']:.1f}s  {shorten(result['error_line'] or result['traceback'], fz)}", flush=True)
        cases_seconds = time.perf_counter() - started
        sample = []
        in_process = [c for c in cases if not c.isolate]  # the others ran as `tl` processes already
        for case in one_per_kind(in_process, args.seed, args.sample) if args.sample else []:
            mine = results[cases.index(case)]
            theirs = run_subprocess(built[id(case)].args, fz)
            line = theirs.error_lines[0] if len(theirs.error_lines) == 1 else None
            sample.append({"kind": case.kind, "case": case.name, "in_process_exit": mine["exit_code"],
                           "subprocess_exit": theirs.exit_code, "subprocess_traceback": theirs.traceback,
                           "subprocess_other_lines": theirs.other_lines[:5] if case.expect == "error" else [],
                           "same_error_line": line == mine["error_line"], "seconds": round(theirs.seconds, 1)})
            sample[-1]["match"] = (theirs.exit_code == mine["exit_code"] and sample[-1]["same_error_line"]
                                   and theirs.traceback == bool(mine["traceback"])
                                   and not sample[-1]["subprocess_other_lines"])
            print(f"subprocess {case.kind}: {case.name}: exit {theirs.exit_code}, match {sample[-1]['match']}",
                  flush=True)
    finally:
        os.chdir(HERE)
        if not args.keep:
            shutil.rmtree(fz.root, ignore_errors=True)
        else:
            print(f"kept {fz.root}")
    for r in results:
        r["args"] = [shorten(a, fz) for a in r["args"]]
        r["error_line"] = shorten(r["error_line"], fz)
        r["outside_touched"] = [shorten(p, fz) for p in r["outside_touched"]]
    report_path = HERE / "fuzz.json"
    earlier = [] if args.fresh or not report_path.exists() else json.loads(report_path.read_text()).get("runs", [])
    rows = tally(results)
    malformed = [r for r in results if r["expect"] == "error"]
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "seed": args.seed,
           "only": args.only or None, "note": args.note or None, "malformed_cases": len(malformed),
           "passed": sum(r["passed"] for r in malformed), "tracebacks": sum(bool(r["traceback"]) for r in results),
           "valid_cases": len(results) - len(malformed),
           "sample_matching": sum(s["match"] for s in sample), "sample": len(sample),
           "passed_by_kind": {kind: f"{row['passed']}/{row['cases']}" for kind, row in rows.items()},
           "crashes": sorted({r["traceback"][:120] + (f" (at {r['raised_at']})" if r["raised_at"] else "")
                              for r in results if r["traceback"]}),
           "wall_seconds": round(time.perf_counter() - started), "cases_seconds": round(cases_seconds)}
    report = {"command": COMMAND, "seed": args.seed, "runs": [*earlier, run], "rows": rows, "sample": sample,
              "cases": results}
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report)
    print(json.dumps(run))


def write_markdown(report: dict) -> None:
    run, rows = report["runs"][-1], report["rows"]
    lines = [
        "# Bad input, fuzzed (`bench/fuzz.py`)", "",
        f"`{report['command']}` (seed {report['seed']}; `--seed N` for other cases). {run['malformed_cases']} malformed "
        f"inputs, generated from the seed, thrown at `tl prepare`, `tl transfer`, `tl evaluate` and their config files,",
        "in one fresh work directory holding a valid prepared dataset and checkpoint (which the cases garble).",
        "A case passes when `tl` exits with code 2 and one `error:` line that names the file, key or URI at",
        "fault, shows no traceback, touches nothing outside the work directory (the inputs, a sentinel folder",
        "beside it, the current folder, TMPDIR, where a zip member's `../` path points), changes no file stored",
        "before it (sha256 before and after), leaves no half-written dataset or model behind, and raises the peak",
        f"memory by under {MEMORY_BOUND_MB} MB.", "",
        f"**{run['passed']} of {run['malformed_cases']} malformed cases passed; tracebacks: {run['tracebacks']}.** "
        f"Whole bench {run['wall_seconds']} s on this machine (2 CPU cores): {run['cases_seconds']} s to set up and "
        f"run the cases, the rest the `tl` processes of the sample; commit {run['commit']}, {run['date']}.", "",
        "| input class | cases | exit 2 + an error line naming it | tracebacks | other exit codes | outside touched "
        "| stored files changed | left behind | memory > bound | passed |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, row in rows.items():
        if row["expect"] == "ok":
            continue
        processes = f" ({row['as_processes']} as `tl` processes)" if row["as_processes"] else ""
        lines.append(f"| {kind} | {row['cases']}{processes} | {row['exit_2_error_line']} | {row['tracebacks']} | "
                     f"{row['other_exit']} | {row['outside_touched']} | {row['stored_changed']} | {row['left_behind']} | "
                     f"{row['over_memory']} | {row['passed']} |")
    totals = {k: sum(r[k] for r in rows.values() if r["expect"] == "error") for k in
              ("cases", "exit_2_error_line", "tracebacks", "other_exit", "outside_touched", "stored_changed",
               "left_behind", "over_memory", "passed")}
    lines.append("| **all** | " + " | ".join(f"**{totals[k]}**" for k in totals) + " |")
    lines += ["", "left behind: refused cases that left files in the work directory's data/ or models/ (a",
              "half-written output); such a case fails.", ""]
    for kind, row in rows.items():
        if row["expect"] == "ok":
            lines += [f"Valid but awkward input, **{kind}**: {row['cases']} image folders (modes 1, L, P, RGB, RGBA, LA,",
                      "I;16, I, F, CMYK; PNG, JPEG, TIFF, BMP; 4 to 120 px) that `tl prepare` converts by design: "
                      f"{row['prepared']} prepared, {row['tracebacks']} tracebacks, {row['passed']} passed.", ""]
    lines += ["## Example error lines", ""]
    for kind in rows:
        examples = {r["case"]: r for r in report["cases"] if r["kind"] == kind and r["error_line"]}  # one a variant
        for r in list(examples.values())[:3]:
            lines.append(f"- {kind}, {r['case']}: `{r['error_line'][:240]}`")
    failed = [r for r in report["cases"] if not r["passed"]]
    lines += ["", "## Cases that failed", ""]
    if not failed:
        lines.append("None.")
    for r in failed:
        what = r["traceback"] or r["error_line"] or f"exit {r['exit_code']}"
        where = f" (raised at {r['raised_at']})" if r["raised_at"] else ""
        lines.append(f"- {r['kind']}, {r['case']}: {what}{where}")
    sample = report["sample"]
    lines += ["", f"## The same cases as `tl` subprocesses: {run['sample_matching']} of {run['sample']} match", "",
              "A seeded sample, one case of each input class at least, run again as real `.venv/bin/tl` processes",
              f"(address space limited to {SUBPROCESS_MEMORY_GB} GB): same exit code, same error line, no traceback.", "",
              "| input class | case | exit in process | exit as a process | same error line | seconds |",
              "|---|---|---|---|---|---|"]
    for s in sample:
        lines.append(f"| {s['kind']} | {s['case']} | {s['in_process_exit']} | {s['subprocess_exit']} | "
                     f"{'yes' if s['same_error_line'] else 'no'} | {s['seconds']} |")
    lines += ["", "## Runs", ""]
    for r in report["runs"]:
        lines.append(f"- {r['date']}, commit {r['commit']}, seed {r['seed']}{', only ' + r['only'] if r['only'] else ''}"
                     f"{' (' + r['note'] + ')' if r.get('note') else ''}: "
                     f"{r['passed']}/{r['malformed_cases']} passed, {r['tracebacks']} tracebacks, "
                     f"{r['sample_matching']}/{r['sample']} subprocesses matching, {r['wall_seconds']} s"
                     + (f"; passed by class: {', '.join(f'{k} {v}' for k, v in r['passed_by_kind'].items())}"
                        if r.get("passed_by_kind") and r["passed"] < r["malformed_cases"] else ""))
        if r.get("crashes"):
            lines.append(f"  - the {len(r['crashes'])} distinct exceptions that escaped:")
            lines += [f"    - `{crash}`" for crash in r["crashes"]]
    lines += ["", "Not fuzzed here: typer's own usage errors for command-line flags (an unknown flag, a flag's",
              "wrong type: exit 2 and click's boxed `Error` message, not an `error:` line), files this user",
              "cannot read (the bench runs as root here), and S3 or MLflow servers answering garbage."]
    (HERE / "fuzz.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
