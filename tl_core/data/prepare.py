"""Data prep: a data URI in, a prepared dataset out (image/label arrays + manifest.json).

A prepared dataset is a folder (local or s3://) holding `train_x.npy`, `train_y.npy`,
`test_x.npy`, `test_y.npy` (uint8 images N x C x H x W, int64 labels) and `manifest.json`
(source URI, settings, class names and counts, shape, normalisation statistics, seed, the
sha256 of each file and a content hash of it all). The manifest is written last, so a folder
with a manifest is complete. The folder's name carries a hash of the settings and of the
source's content: preparing the same data with the same settings again is skipped.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from tl_core import storage
from tl_core.config import PrepareConfig, workdir
from tl_core.data.sources import RawData, read_source
from tl_core.data.transforms import convert_channels, resize, select_classes
from tl_core.errors import UserError

FORMAT = "tl-prepared/1"
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


@dataclass
class PreparedDataset:
    path: str
    manifest: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def shape(self) -> list[int]:
        return self.manifest["shape"]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    def normalise(self, x: np.ndarray) -> torch.Tensor:
        """uint8 images -> float tensor scaled by this dataset's mean and std."""
        return normalise(x, self.manifest)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"{name}_x"], self.arrays[f"{name}_y"]


def normalise(x: np.ndarray, stats: dict) -> torch.Tensor:
    """uint8 images -> float tensor scaled by `stats`' per-channel mean and std: a dataset's
    manifest, or a checkpoint's `data` dict (to feed a model as its training data was)."""
    mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["std"]).view(1, -1, 1, 1)
    return (torch.from_numpy(x).float() / 255.0 - mean) / std


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)  # .npy bytes are deterministic (unlike .npz timestamps)
    return buf.getvalue()


def _canonical_hash(obj: dict) -> str:
    return storage.sha256_bytes(json.dumps(obj, sort_keys=True).encode())


def _slug(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", uri.split("/")[-1] if "/" in uri else uri).strip("-").lower()[:40]


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _class_split(x, y, tx, ty, num_classes: int, cfg: PrepareConfig, rng: np.random.Generator):
    """Hold out whole classes: the test split has every image of test_fraction of the classes,
    the train split every image of the others, so few-shot episodes on the test split only see
    classes never trained on. Labels keep their dataset ids."""
    if num_classes < 2:
        raise UserError(f"{cfg.uri}: --test-split classes needs at least 2 classes, it has {num_classes}")
    if tx is not None:  # the source's own test images join their classes
        x, y = np.concatenate([x, convert_channels(resize(tx, x.shape[-2:]), x.shape[1])]), np.concatenate([y, ty])
    n_test = min(max(int(round(cfg.test_fraction * num_classes)), 1), num_classes - 1)
    test_classes = rng.permutation(num_classes)[:n_test]
    held_out = np.isin(y, test_classes)
    return x[~held_out], y[~held_out], x[held_out], y[held_out]


def build_arrays(raw: RawData, cfg: PrepareConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class subset, test split, per-class cap, channels, size: the whole transformation."""
    rng = np.random.default_rng(cfg.seed)
    classes = raw.classes
    x, y, tx, ty = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    if cfg.classes:
        keep = select_classes(classes, cfg.classes, cfg.uri)
        relabel = np.full(len(classes), -1)
        relabel[keep] = np.arange(len(keep))
        mask = np.isin(y, keep)
        x, y = x[mask], relabel[y[mask]]
        if ty is not None:
            tmask = np.isin(ty, keep)
            tx, ty = tx[tmask], relabel[ty[tmask]]
        classes = [classes[i] for i in keep]
    counts = np.bincount(y, minlength=len(classes))
    if (counts == 0).any():
        missing = classes[int(np.flatnonzero(counts == 0)[0])]
        raise UserError(f"{cfg.uri}: class {missing!r} has no training images; add images or drop the class with --classes")
    if cfg.test_split == "classes":
        x, y, tx, ty = _class_split(x, y, tx, ty, len(classes), cfg, rng)
    elif tx is None:
        train_idx, test_idx = _stratified_split(y, cfg.test_fraction, rng)
        x, y, tx, ty = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    if cfg.max_per_class:
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: cfg.max_per_class] for c in range(len(classes))])
        keep.sort()
        x, y = x[keep], y[keep]
    if cfg.channels:
        x, tx = convert_channels(x, cfg.channels), convert_channels(tx, cfg.channels)
    if tx.shape[1:] != x.shape[1:]:
        tx = resize(convert_channels(tx, x.shape[1]), x.shape[-2:])
    if cfg.image_size:
        x, tx = resize(x, cfg.image_size), resize(tx, cfg.image_size)
    arrays = {"train_x": x, "train_y": y.astype(np.int64), "test_x": tx, "test_y": ty.astype(np.int64)}
    return arrays, classes


def prepare(cfg: PrepareConfig) -> tuple[PreparedDataset, bool]:
    """Prepare the dataset; returns it and whether an existing identical one was reused."""
    raw = read_source(cfg.uri)
    source_hash = storage.sha256_bytes(
        b"".join(storage.sha256_bytes(a.tobytes()).encode() for a in (raw.train_x, raw.train_y, raw.test_x, raw.test_y) if a is not None)
        + json.dumps(raw.classes).encode()
    )
    settings = cfg.model_dump(exclude={"output"})
    key = _canonical_hash({"settings": settings, "source": source_hash})[:12]
    out = storage.join(cfg.output or storage.join(workdir(), "data"), f"{_slug(cfg.uri)}-{key}")
    if storage.exists(storage.join(out, "manifest.json")):
        return load_prepared(out), True

    arrays, classes = build_arrays(raw, cfg)
    files = {f"{name}.npy": _npy_bytes(arrays[name]) for name in ARRAYS}
    pixels = arrays["train_x"].astype(np.float64) / 255.0
    manifest = {
        "format": FORMAT,
        "uri": cfg.uri,
        "settings": settings,
        "source_sha256": source_hash,
        "classes": classes,
        "counts": {
            split: {c: int(n) for c, n in zip(classes, np.bincount(arrays[f"{split}_y"], minlength=len(classes)))}
            for split in ("train", "test")
        },
        "shape": list(arrays["train_x"].shape[1:]),
        "mean": [round(float(v), 6) for v in pixels.mean(axis=(0, 2, 3))],
        "std": [round(max(float(v), 1e-3), 6) for v in pixels.std(axis=(0, 2, 3))],
        "seed": cfg.seed,
        "files": {name: storage.sha256_bytes(data) for name, data in files.items()},
    }
    manifest["hash"] = _canonical_hash(manifest)
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    storage.write_bytes(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return PreparedDataset(out, manifest, arrays), False


def load_manifest(uri: str) -> dict:
    """A prepared dataset's manifest alone (classes, shape, counts...), without reading its images."""
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise UserError(f"{uri} is not a prepared dataset (no manifest.json): run `tl prepare` first")
    manifest = json.loads(storage.read_bytes(manifest_uri))
    if manifest.get("format") != FORMAT:
        raise UserError(f"{uri}: manifest format {manifest.get('format')!r} is not {FORMAT!r}; prepare it again")
    return manifest


def load_prepared(uri: str) -> PreparedDataset:
    """Read a prepared dataset (local or s3://) and check every file against its sha256."""
    manifest = load_manifest(uri)
    arrays = {}
    for name in ARRAYS:
        data = storage.read_bytes(storage.join(uri, f"{name}.npy"))
        if storage.sha256_bytes(data) != manifest["files"][f"{name}.npy"]:
            raise UserError(f"{uri}/{name}.npy does not match its sha256 in the manifest: prepare the dataset again")
        arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
    return PreparedDataset(uri, manifest, arrays)


def sample_shots(y: np.ndarray, shots: int | None, seed: int, classes: list[str], val_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `shots` labelled images per class (all if None) and of a validation set.

    The same (shots, seed) always picks the same images, so every strategy and the scratch
    baseline see exactly the same labels.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == label))
        need = (shots or 0) + val_per_class
        if shots is not None and len(idx) < need:
            raise UserError(
                f"class {name!r} has {len(idx)} training images, fewer than --shots {shots}"
                + (f" + {val_per_class} validation" if val_per_class else "")
                + ": lower --shots or add images"
            )
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class : val_per_class + shots] if shots is not None else idx[val_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))

