"""Shards: a prepared split is a list of Parquet files of bounded size, each checked by sha256.

A shard holds three columns: `image` (binary: the uint8 pixels of one C x H x W image, or an
image file's bytes as they are, JPEG/PNG), `label` (int64) and `index` (int64, the row's
position in its split, so a k-shot selection picks rows by index in any shard). Parquet,
because Ray Data reads it natively (Ray Train workers stream the same files) and a reader can
take one shard at a time: nothing here ever holds more than one shard per reader.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from tl_core import storage
from tl_core.errors import UserError

SHARD_BYTES = 32 * 1024**2  # bounded: a reader holds one shard (two with prefetch) at a time


def shard_name(split: str, number: int) -> str:
    return f"shards/{split}-{number:05d}.parquet"


def table_bytes(images: list[bytes], labels: np.ndarray, index: np.ndarray) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "image": pa.array(images, type=pa.binary()),
        "label": pa.array(labels, type=pa.int64()),
        "index": pa.array(index, type=pa.int64()),
    })
    buf = io.BytesIO()
    # No compression for pixels that are already JPEG/PNG; raw uint8 pixels compress little
    # and decompressing costs every epoch.
    pq.write_table(table, buf, compression="none")
    return buf.getvalue()


@dataclass
class ShardWriter:
    """Collects rows of one split and writes a shard each time `max_bytes` of images are held."""

    folder: str
    split: str
    max_bytes: int | None = None  # default: SHARD_BYTES (read when writing, so tests can lower it)
    entries: list[dict] = field(default_factory=list)
    _images: list[bytes] = field(default_factory=list)
    _labels: list[int] = field(default_factory=list)
    _held: int = 0
    rows: int = 0

    def add(self, image: bytes, label: int) -> None:
        self._images.append(image)
        self._labels.append(int(label))
        self._held += len(image)
        if self._held >= (self.max_bytes or SHARD_BYTES):
            self.flush()

    def flush(self) -> None:
        if not self._images:
            return
        index = np.arange(self.rows, self.rows + len(self._images), dtype=np.int64)
        data = table_bytes(self._images, np.asarray(self._labels, dtype=np.int64), index)
        name = shard_name(self.split, len(self.entries))
        storage.write_bytes(storage.join(self.folder, name), data)
        self.entries.append({"name": name, "rows": len(self._images), "first": self.rows, "bytes": len(data),
                             "sha256": storage.sha256_bytes(data)})
        self.rows += len(self._images)
        self._images, self._labels, self._held = [], [], 0


def verified_table(data: bytes, entry: dict, where: str):
    """A shard's bytes as a pyarrow table, refused by name if they are not what the manifest says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if storage.sha256_bytes(data) != entry["sha256"]:
        raise UserError(f"{where}/{entry['name']} does not match its sha256 in the manifest (corrupt or "
                        "changed since it was prepared): prepare the dataset again")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # Arrow's messages span lines
        raise UserError(f"{where}/{entry['name']} is not a readable Parquet shard ({reason}): prepare the dataset "
                        "again") from None
    missing = sorted({"image", "label", "index"} - set(table.column_names))
    if missing:
        raise UserError(f"{where}/{entry['name']} has no {', '.join(missing)} column: prepare the dataset again")
    return table


def read_shard(folder: str, entry: dict):
    return verified_table(storage.read_bytes(storage.join(folder, entry["name"])), entry, folder)


def select_rows(table, wanted: np.ndarray | None):
    """The rows of a shard's table whose index is in the sorted array `wanted` (all when None)."""
    if wanted is None:
        return table
    return table.take(np.flatnonzero(np.isin(table.column("index").to_numpy(), wanted, assume_unique=True)))


def rows_of(table, wanted: np.ndarray | None) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(images, labels, indices) of a shard's wanted rows (see `select_rows`)."""
    table = select_rows(table, wanted)
    # Copies: Arrow's zero-copy arrays are read-only, and torch wants to own what it wraps.
    labels, index = (np.array(table.column(name).to_numpy(), dtype=np.int64) for name in ("label", "index"))
    return table.column("image").to_pylist(), labels, index


def shards_holding(entries: list[dict], wanted: np.ndarray | None) -> list[dict]:
    """The shards that hold at least one wanted row (all when None): a k-shot selection reads few."""
    if wanted is None:
        return list(entries)
    return [e for e in entries if np.any((wanted >= e["first"]) & (wanted < e["first"] + e["rows"]))]
