"""Data prep: a data URI in, a prepared dataset out (Parquet shards + manifest.json).

A prepared dataset is a folder (local or s3://) holding, per split (`train`, `test`), shards of
at most 32 MB (`shards/train-00000.parquet`..., see `shards.py`) and its labels
(`labels-train.npy`), and `manifest.json`: source URI, settings, class names and counts, image
shape, normalisation statistics, seed, each file's sha256 and size, and a content hash of it
all. Small images are stored as their uint8 pixels ("arrays"); photos as their JPEG/PNG files
("files"), decoded and cropped to `shape` on the fly each epoch; texts as their UTF-8 bytes ("text",
see `text.py`). `tl prepare` streams: it reads
the source's labels first, decides the splits from them, then reads, converts and writes the
images a chunk at a time, computing the statistics as it goes, so its memory does not grow with
the number of images. The manifest is written last: a folder with a manifest is complete. The
folder's name carries a hash of the settings and of the source's content: preparing the same
data with the same settings again is skipped.

Readers take a split's rows shard by shard (`Rows.chunks`) or, for small selections, whole
(`Rows.arrays`); training decides by size (see `tl_core.train.loop`).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tl_core import storage
from tl_core.config import PrepareConfig, workdir
from tl_core.data.shards import ShardWriter, read_shard, rows_of, shards_holding
from tl_core.data.sources import Source, open_source, unreadable_image
from tl_core.data.text import bytes_rows, is_text_uri, open_text
from tl_core.data.transforms import convert_channels, decode_files, resize, select_classes
from tl_core.errors import UserError

FORMAT = "tl-prepared/2"
SPLITS = ("train", "test")
PHOTO_SIZE = 224  # what photos are cropped to unless --image-size says otherwise
STATS_SIZE = 64  # photos' statistics are taken on a JPEG draft this small (a fast, close estimate)
RESIZE_BYTES = 64 * 2**20  # images resized at once, as float32
UNLABELED = -1  # the label of a training image whose label is not used (strategies that learn from unlabeled images)


@dataclass
class PreparedDataset:
    """A prepared dataset: its manifest, and its splits read on demand (nothing is loaded here)."""

    path: str
    manifest: dict
    _labels: dict = field(default_factory=dict, repr=False)  # split -> labels, read once

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def shape(self) -> list[int]:
        return self.manifest["shape"]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def photos(self) -> bool:
        """Images stored as files, decoded and cropped on the fly (else uint8 pixel arrays)."""
        return self.manifest["stored"] == "files"

    @property
    def text(self) -> bool:
        """Texts (UTF-8 bytes), which a model's first block tokenises (see `tl_core.data.text`)."""
        return self.manifest["stored"] == "text"

    def normalise(self, x: np.ndarray) -> torch.Tensor:
        """uint8 images -> float tensor scaled by this dataset's mean and std."""
        return normalise(x, self.manifest)

    def normalised_as(self, stats: dict | None) -> "PreparedDataset":
        """This dataset with its images normalised by `stats` ({"mean", "std"}: a pretrained
        network's own, `tl_core.models.INPUT_STATS`) instead of its own statistics; itself where
        `stats` is None. Only the normalisation changes (not the hash): a checkpoint trained on it
        records these statistics, so evaluation and the served model normalise as training did."""
        if stats is None or self.text:
            return self
        return PreparedDataset(self.path, {**self.manifest, "mean": list(stats["mean"]), "std": list(stats["std"])},
                               self._labels)

    def labels(self, split: str) -> np.ndarray:
        """All labels of a split (8 bytes an image), without reading an image."""
        if split in self._labels:
            return self._labels[split]
        name = f"labels-{split}.npy"
        data = storage.read_bytes(storage.join(self.path, name))
        if storage.sha256_bytes(data) != self.manifest["files"][name]["sha256"]:
            raise UserError(f"{self.path}/{name} does not match its sha256 in the manifest: prepare the dataset again")
        try:
            labels = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:  # pickled objects, a damaged header
            raise UserError(f"{self.path}/{name} is not an array of labels ({err}): prepare the dataset again") from None
        rows, k = sum(entry["rows"] for entry in self.manifest["shards"][split]), len(self.classes)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != rows or (
                labels.size and (labels.min() < 0 or labels.max() >= k)):
            raise UserError(f"{self.path}/{name} does not hold {rows} labels in 0..{k - 1} as the manifest says: "
                            "prepare the dataset again")
        self._labels[split] = labels
        return self._labels[split]

    def rows(self, split: str, indices: np.ndarray | None = None, unlabeled: np.ndarray | None = None) -> "Rows":
        """The rows `indices` (sorted; None: all) of a split, read when asked for; those in
        `unlabeled` come with the label UNLABELED (a pool of shots and unlabeled images)."""
        return Rows(self, split, None if indices is None else np.asarray(indices, dtype=np.int64),
                    None if unlabeled is None else np.asarray(unlabeled, dtype=np.int64))

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole split in memory: uint8 images (photos at their eval crop) and labels."""
        return self.rows(name).arrays()


class Rows:
    """Some rows of a split, read shard by shard (`chunks`), or all at once when known to be small
    (`arrays`); the labels of the rows in `unlabeled` read as UNLABELED."""

    def __init__(self, data: PreparedDataset, split: str, indices: np.ndarray | None,
                 unlabeled: np.ndarray | None = None):
        self.data, self.split, self.indices, self.unlabeled = data, split, indices, unlabeled

    def __len__(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return sum(e["rows"] for e in self.data.manifest["shards"][self.split])

    def labels(self) -> np.ndarray:
        y = self.data.labels(self.split)
        return hide_labels(y if self.indices is None else y[self.indices], self.indices, self.unlabeled)

    def float_bytes(self) -> int:
        """Bytes these rows take as a float32 tensor: what holding them in memory costs."""
        return len(self) * math.prod(self.data.shape) * 4

    def shards(self) -> list[dict]:
        return shards_holding(self.data.manifest["shards"][self.split], self.indices)

    def decode(self, images: list[bytes], train: bool = False) -> np.ndarray:
        """A shard's image column -> uint8 N x C x H x W (photos cropped: at random when training)."""
        return decode_images(images, self.data.manifest, train)

    def chunk_of(self, entry: dict, train: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 images, labels, indices) of these rows in one shard."""
        images, labels, index = rows_of(read_shard(self.data.path, entry), self.indices)
        return self.decode(images, train), hide_labels(labels, index, self.unlabeled), index

    def chunks(self, train: bool = False):
        """(uint8 images, labels) shard by shard, in index order: one shard held at a time."""
        for entry in self.shards():
            x, y, _ = self.chunk_of(entry, train)
            yield x, y

    def arrays(self, train: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """All these rows at once: for selections known to be small (k shots, a validation set)."""
        parts = list(self.chunks(train))
        if not parts:
            return np.zeros((0, *self.data.shape), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.arrays()
        return self.data.normalise(x), torch.from_numpy(y)


def hide_labels(labels: np.ndarray, index: np.ndarray | None, unlabeled: np.ndarray | None) -> np.ndarray:
    """`labels` of the rows `index` (None: all), with those of the rows in `unlabeled` set to UNLABELED."""
    if unlabeled is None or not len(unlabeled):
        return labels
    index = np.arange(len(labels)) if index is None else index
    return np.where(np.isin(index, unlabeled), UNLABELED, labels)


def decode_images(images: list[bytes], manifest: dict, train: bool = False) -> np.ndarray:
    """The image column of a shard -> uint8 N x C x H x W as the manifest's `shape` says."""
    channels, height, width = manifest["shape"]
    if manifest["stored"] == "files":
        return decode_files(images, channels, height, train)
    if manifest["stored"] == "text":
        return bytes_rows(images, width)
    pixels = bytearray().join(images)
    if len(pixels) != len(images) * channels * height * width:
        raise UserError(f"a shard of {manifest['uri']} holds {len(pixels)} bytes of {len(images)} images, where the "
                        f"manifest's shape {manifest['shape']} makes {len(images) * channels * height * width}: "
                        "prepare the dataset again")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(len(images), channels, height, width)


def normalise(x: np.ndarray, stats: dict) -> torch.Tensor:
    """uint8 images -> float tensor scaled by `stats`' per-channel mean and std: a dataset's
    manifest, or a checkpoint's `data` dict (to feed a model as its training data was). Texts'
    bytes go to the model as they are: its first block tokenises them."""
    if stats.get("stored") == "text":
        return torch.from_numpy(np.ascontiguousarray(x)) if not isinstance(x, torch.Tensor) else x
    mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["std"]).view(1, -1, 1, 1)
    if not isinstance(x, torch.Tensor):  # Ray Data hands out read-only arrays
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    return (x.float() / 255.0 - mean) / std


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)  # .npy bytes are deterministic (unlike .npz timestamps)
    return buf.getvalue()


def _canonical_hash(obj: dict) -> str:
    return storage.sha256_bytes(json.dumps(obj, sort_keys=True).encode())


def _slug(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", uri.split("/")[-1] if "/" in uri else uri).strip("-").lower()[:40]


# -- deciding the splits from the labels alone ----------------------------------------------
# A plan maps each output split to parts (source split, sorted source rows, their new labels);
# the images are read afterwards, in that order.
Plan = dict[str, list[tuple[str, np.ndarray, np.ndarray]]]


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


def plan_splits(source: Source, cfg: PrepareConfig) -> tuple[list[str], Plan]:
    """Class subset, test split and per-class cap, decided on labels: which source rows go where."""
    rng = np.random.default_rng(cfg.seed)
    classes = source.classes
    # Per source split: the rows kept and their labels.
    kept = {split: (np.arange(len(y)), y.astype(np.int64)) for split, y in source.labels.items()}
    if cfg.classes:
        keep = select_classes(classes, cfg.classes, cfg.uri)
        relabel = np.full(len(classes), -1)
        relabel[keep] = np.arange(len(keep))
        kept = {split: (rows[np.isin(y, keep)], relabel[y[np.isin(y, keep)]]) for split, (rows, y) in kept.items()}
        classes = [classes[i] for i in keep]
    if len(classes) < 2:
        raise UserError(f"{cfg.uri} has {len(classes)} class {classes}; a classifier needs at least 2 classes: add one"
                        + (" or list more with --classes" if cfg.classes else ""))
    counts = np.bincount(kept["train"][1], minlength=len(classes))
    if (counts == 0).any():
        missing = classes[int(np.flatnonzero(counts == 0)[0])]
        raise UserError(f"{cfg.uri}: class {missing!r} has no training images; add images or drop the class with --classes")

    if cfg.test_split == "classes":
        # Hold out whole classes: the test split has every image of test_fraction of the classes
        # (the source's own test images join their classes), the train split every image of the
        # others, so few-shot episodes on the test split only see classes never trained on.
        n_test = min(max(int(round(cfg.test_fraction * len(classes))), 1), len(classes) - 1)
        test_classes = rng.permutation(len(classes))[:n_test]
        plan: Plan = {"train": [], "test": []}
        for split, (rows, y) in kept.items():
            held = np.isin(y, test_classes)
            plan["train"].append((split, rows[~held], y[~held]))
            plan["test"].append((split, rows[held], y[held]))
    elif "test" not in kept:
        rows, y = kept["train"]
        train_idx, test_idx = _stratified_split(y, cfg.test_fraction, rng)
        plan = {"train": [("train", rows[train_idx], y[train_idx])], "test": [("train", rows[test_idx], y[test_idx])]}
    else:
        plan = {split: [(split, *kept[split])] for split in SPLITS}
    if cfg.max_per_class:
        y = np.concatenate([labels for _, _, labels in plan["train"]])
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[: cfg.max_per_class]
                                       for c in range(len(classes))]))
        plan["train"] = _unconcat(plan["train"], keep)
    return classes, plan


def _unconcat(parts, keep: np.ndarray):
    """The parts' rows at positions `keep` of their concatenation, as parts again."""
    out, offset = [], 0
    for split, rows, y in parts:
        mine = keep[(keep >= offset) & (keep < offset + len(rows))] - offset
        out.append((split, rows[mine], y[mine]))
        offset += len(rows)
    return out


# -- writing ---------------------------------------------------------------------------------
class _Stats:
    """Per-channel mean and std of pixel values in [0, 1], accumulated a chunk at a time."""

    def __init__(self, channels: int):
        self.sum, self.sumsq, self.count = np.zeros(channels), np.zeros(channels), 0

    def add(self, x: np.ndarray) -> None:  # uint8 N x C x H x W
        pixels = x.astype(np.float64) / 255.0
        self.sum += pixels.sum(axis=(0, 2, 3))
        self.sumsq += (pixels**2).sum(axis=(0, 2, 3))
        self.count += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.sum / max(self.count, 1)
        std = np.sqrt(np.maximum(self.sumsq / max(self.count, 1) - mean**2, 0))
        return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


def _photo_draft(data: bytes, channels: int, name: str) -> np.ndarray:
    """A photo decoded at about STATS_SIZE px (JPEG decodes at 1/2..1/8 scale for this): for statistics,
    and to find now, by name, a photo that training could not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L" if channels == 1 else "RGB", (STATS_SIZE, STATS_SIZE))
            img = img.convert("L" if channels == 1 else "RGB")
            img.thumbnail((STATS_SIZE, STATS_SIZE))
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # truncated, corrupt
        raise unreadable_image(name, err) from None
    return arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]


def _write_split(source: Source, parts, out: str, split: str, shape: list[int], stats: _Stats | None) -> ShardWriter:
    writer = ShardWriter(out, split)
    channels, height, width = shape
    for source_split, rows, labels in parts:
        done = 0
        for chunk in source.read(source_split, rows):
            if source.kind == "text":
                for text in chunk:
                    writer.add(text, labels[done])
                    done += 1
                continue
            if source.kind == "files":
                for data, name in chunk:
                    draft = _photo_draft(data, channels, name)  # test photos too: all must decode
                    if stats:
                        stats.add(draft)
                    writer.add(data, labels[done])
                    done += 1
                continue
            # Channels first, then the train split's size, then --image-size (as for whole arrays),
            # a few images at a time: --image-size can make a chunk of small images a thousand times larger.
            x = convert_channels(chunk, channels)
            step = max(1, RESIZE_BYTES // (4 * channels * max(height * width, math.prod(x.shape[2:]))))
            for start in range(0, len(x), step):
                piece = resize(resize(x[start : start + step], source.shape["train"][1:]), (height, width))
                if stats:
                    stats.add(piece)
                for image in piece:
                    writer.add(image.tobytes(), labels[done])
                    done += 1
    writer.flush()
    return writer


DESCRIPTIONS_FILE = "descriptions.yaml"
PATH_SCHEMES = ("tsv", "csv", "jsonl", "idx", "npz", "imagefolder", "omniglot")  # URIs that name a local path


def descriptions_beside(uri: str) -> dict | None:
    """The class descriptions file that travels with the data (None: there is none):
    descriptions.yaml in the data folder, or beside the data file. Its content is part of the
    prepared dataset (in the manifest and the hash): every strategy that can use class
    descriptions then does, with no flag (see zero_shot.descriptions_of)."""
    scheme, _, location = uri.partition(":")
    if scheme not in PATH_SCHEMES or not location or storage.is_s3(location):
        return None
    path = Path(location)
    file = (path if path.is_dir() else path.parent) / DESCRIPTIONS_FILE
    if not file.is_file():
        return None
    from tl_core.strategies.zero_shot import read_descriptions_file  # (zero_shot reads prepared data)

    return read_descriptions_file(str(file))


def check_descriptions(descriptions: dict, classes: list[str], uri: str) -> None:
    described = descriptions.get("descriptions")
    if isinstance(described, dict):
        missing = [c for c in classes if c not in {str(k) for k in described}]
        if missing:
            raise UserError(f"the {DESCRIPTIONS_FILE} beside {uri} describes no class {missing}: add them under "
                            f"`descriptions:` (the classes are {classes}), or remove the file")


def prepare(cfg: PrepareConfig) -> tuple[PreparedDataset, bool]:
    """Prepare the dataset; returns it and whether an existing identical one was reused."""
    if is_text_uri(cfg.uri):
        if cfg.image_size or cfg.channels or cfg.store != "auto":
            raise UserError(f"{cfg.uri} is text: --image-size, --channels and --store are for images; drop them")
        source = open_text(cfg.uri, cfg.text_column, cfg.label_column, cfg.header)
    else:
        source = open_source(cfg.uri, cfg.store)
    settings = cfg.model_dump(exclude={"output"})
    descriptions = descriptions_beside(cfg.uri)
    identity = {"settings": settings, "source": source.fingerprint, "format": FORMAT}
    key = _canonical_hash({**identity, **({"descriptions": descriptions} if descriptions else {})})[:12]
    out = storage.join(cfg.output or storage.join(workdir(), "data"), f"{_slug(cfg.uri)}-{key}")
    if storage.exists(storage.join(out, "manifest.json")):
        return load_prepared(out), True

    classes, plan = plan_splits(source, cfg)
    if descriptions:
        check_descriptions(descriptions, classes, cfg.uri)
    if source.kind == "text":
        shape = list(source.shape["train"])  # one row of UTF-8 bytes, as long as the longest text
    elif source.kind == "files":
        shape = [cfg.channels or 3, cfg.image_size or PHOTO_SIZE, cfg.image_size or PHOTO_SIZE]
    else:
        channels, height, width = source.shape["train"]
        shape = [cfg.channels or channels, cfg.image_size or height, cfg.image_size or width]
    stats = _Stats(shape[0])
    files, shards, counts = {}, {}, {}
    try:
        for split in SPLITS:
            writer = _write_split(source, plan[split], out, split, shape, stats if split == "train" else None)
            labels = np.concatenate([y for _, _, y in plan[split]]).astype(np.int64)
            data = _npy_bytes(labels)
            storage.write_bytes(storage.join(out, f"labels-{split}.npy"), data)
            files[f"labels-{split}.npy"] = {"bytes": len(data), "sha256": storage.sha256_bytes(data)}
            shards[split] = writer.entries
            counts[split] = {c: int(n) for c, n in zip(classes, np.bincount(labels, minlength=len(classes)))}
    except BaseException:  # an image found bad half-way, Ctrl-C
        _remove_unfinished(out)
        raise
    mean, std = ([0.0], [1.0]) if source.kind == "text" else stats.result()  # texts are not scaled
    manifest = {
        "format": FORMAT,
        "uri": cfg.uri,
        "settings": settings,
        "source_sha256": source.fingerprint,
        "classes": classes,
        "counts": counts,
        "stored": source.kind,
        "shape": shape,
        "mean": mean,
        "std": std,
        "seed": cfg.seed,
        "files": files,
        "shards": shards,
        **({"descriptions": descriptions} if descriptions else {}),
    }
    manifest["hash"] = _canonical_hash(manifest)
    storage.write_bytes(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return PreparedDataset(out, manifest), False


def _remove_unfinished(out: str) -> None:
    """Remove a dataset folder that a prepare stopped half-way left without its manifest: a folder
    is complete or absent. Local folders only (storage has no delete for s3://; a rerun overwrites)."""
    if not storage.is_s3(out) and not Path(out, "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)


def load_manifest(uri: str) -> dict:
    """A prepared dataset's manifest alone (classes, shape, counts...), without reading its images."""
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise UserError(f"{uri} is not a prepared dataset (no manifest.json): run `tl prepare` first")
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
    except ValueError as err:
        raise UserError(f"{manifest_uri} is not valid JSON ({err}): prepare the dataset again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_uri} holds a JSON {type(manifest).__name__}, not a manifest: prepare the dataset again")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{uri} was prepared by an older tl (format {manifest.get('format')!r}, this one reads "
                        f"{FORMAT!r}): prepare it again with `tl prepare {manifest.get('uri', 'URI')}`")
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{manifest_uri} is damaged ({problem}): prepare the dataset again")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's structure, if anything: the readers index it without looking."""
    kinds = {"classes": list, "shape": list, "stored": str, "mean": list, "std": list, "files": dict, "shards": dict,
             "counts": dict, "hash": str}
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    shape = manifest["shape"]
    if len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
        return f"shape {shape} is not [channels, height, width]"
    if len(manifest["mean"]) != shape[0] or len(manifest["std"]) != shape[0]:
        return f"mean and std do not have one value per channel of shape {shape}"
    if manifest["stored"] not in ("arrays", "files", "text"):
        return f"stored is {manifest['stored']!r}, not 'arrays', 'files' or 'text'"
    for split in SPLITS:
        entries = manifest["shards"].get(split)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and {"name", "rows", "first", "sha256"} <= set(e)
                                                    for e in entries):
            return f"the {split} split's shards are not listed"
        if not isinstance(manifest["files"].get(f"labels-{split}.npy"), dict):
            return f"labels-{split}.npy is not listed"
    return None


def load_prepared(uri: str) -> PreparedDataset:
    """A prepared dataset (local or s3://): its manifest now, its shards (each checked against
    its sha256) when read."""
    return PreparedDataset(uri, load_manifest(uri))


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

