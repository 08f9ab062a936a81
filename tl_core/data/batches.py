"""Batches for the training core.

From tensors already in memory: `ShuffledBatches` gives plain mini-batches; `Episodes` gives
few-shot episodes (N classes, K support + Q query images each); a strategy picks one with
`Strategy.batches`. Streamed from a prepared dataset's shards: `StreamedBatches` in this
process; on Ray Train, `RayDataBatches` over the worker's `get_dataset_shard` (see
`tl_core.train.ray_data`).
"""

from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np
import torch

from tl_core.errors import UserError


class ShuffledBatches:
    """Mini-batches of tensors already in memory, for one worker of `world_size`.

    Each epoch draws a new permutation from (seed, epoch), the same on every worker, and each
    worker takes its own shard of it, padded so all shards are equally long, as PyTorch's
    DistributedSampler does (DDP needs the same number of steps on every worker). A batch is
    one indexing operation, not a Python call per image: for small images and cached features
    a DataLoader's per-item collation cost more than the training step.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> torch.Tensor:
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        per_worker = math.ceil(len(order) / self.world_size)
        padded = torch.cat([order, order])[: per_worker * self.world_size]  # padding repeats the first indices
        return padded[self.rank :: self.world_size]

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.y) / self.world_size) / self.batch_size)

    def __iter__(self):
        shard = self.shard()
        for start in range(0, len(shard), self.batch_size):
            idx = shard[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


class Episodes:
    """N-way K-shot episodes from the images `x` with labels `y`.

    An episode picks `ways` classes among those in `y`, then `shots` support and `queries` query
    images of each, all different. It is one batch laid out as

        x = [support of class 0..N-1 (K each), query of class 0..N-1 (Q each)]
        y = episode labels 0..N-1 in the same order (not the dataset's labels)

    so `split_episode` recovers the parts. Episodes only ever draw from the (x, y) they are
    given: pass the train split to train and the test split (classes never trained on, with
    `tl prepare --test-split classes`) to evaluate. Each epoch's episodes come from (seed,
    epoch), and every worker takes its own share of them.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ways: int, shots: int, queries: int, episodes: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.x, self.ways, self.shots, self.queries = x, ways, shots, queries
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.episodes = math.ceil(episodes / world_size)
        labels = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        need = shots + queries
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.by_class = {c: idx for c, idx in self.by_class.items() if len(idx) >= need}
        if len(self.by_class) < ways:
            raise UserError(
                f"a {ways}-way {shots}-shot episode with {queries} queries needs {ways} classes with at least {need} "
                f"images each; these images have only {len(self.by_class)}: lower --ways, --episode-shots or "
                "--episode-queries"
            )
        self.classes = sorted(self.by_class)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.episodes

    def episode_indices(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image indices of one episode (support then query) and the dataset classes it uses."""
        classes = rng.choice(self.classes, self.ways, replace=False)
        picks = [rng.choice(self.by_class[int(c)], self.shots + self.queries, replace=False) for c in classes]
        support = np.concatenate([p[: self.shots] for p in picks])
        query = np.concatenate([p[self.shots :] for p in picks])
        return np.concatenate([support, query]), classes

    def episode_labels(self) -> torch.Tensor:
        ways = torch.arange(self.ways)
        return torch.cat([ways.repeat_interleave(self.shots), ways.repeat_interleave(self.queries)])

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        labels = self.episode_labels()
        for _ in range(self.episodes):
            idx, _ = self.episode_indices(rng)
            yield self.x[torch.from_numpy(idx)], labels


def split_episode(x: torch.Tensor, y: torch.Tensor, ways: int, shots: int) -> tuple[torch.Tensor, ...]:
    """(support_x, support_y, query_x, query_y) of a batch laid out by `Episodes`."""
    n = ways * shots
    return x[:n], y[:n], x[n:], y[n:]


def waited(loader, get):
    """`get()`, its seconds added to the loader's `wait_seconds`: how long training waited for input."""
    start = time.perf_counter()
    item = get()
    loader.wait_seconds += time.perf_counter() - start
    return item


class StreamedEpisodes(Episodes):
    """Episodes whose images stay in their shards (`rows`, a `Rows` of a prepared split): drawn
    from the labels exactly as `Episodes` draws them (the same seed gives the same episodes), then
    read a block at a time: the rows of as many next episodes as `block_rows` holds, one shard at
    a time, keeping only those rows (photos cropped anew, at random with `augment`)."""

    def __init__(self, rows, normalise, ways: int, shots: int, queries: int, episodes: int, seed: int,
                 rank: int = 0, world_size: int = 1, augment: bool = False, block_rows: int = 4096):
        super().__init__(None, rows.labels(), ways, shots, queries, episodes, seed, rank, world_size)
        self.rows, self.normalise, self.augment = rows, normalise, augment
        self.block_episodes = max(1, block_rows // (ways * (shots + queries)))
        self.rows_seen, self.bytes_seen, self.wait_seconds = 0, 0, 0.0

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images of some of these rows (positions in `rows`), sorted by row, and their row numbers."""
        wanted = np.unique(positions if self.rows.indices is None else self.rows.indices[positions])
        x, _ = self.rows.data.rows(self.rows.split, wanted).arrays(train=self.augment)
        return x, wanted

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        labels = self.episode_labels()
        self.rows_seen, self.bytes_seen, self.wait_seconds = 0, 0, 0.0
        left = self.episodes
        while left:
            block = [self.episode_indices(rng)[0] for _ in range(min(left, self.block_episodes))]
            left -= len(block)
            x, wanted = waited(self, lambda: self.read(np.concatenate(block)))
            self.bytes_seen += x.nbytes
            for positions in block:
                rows = positions if self.rows.indices is None else self.rows.indices[positions]
                self.rows_seen += len(rows)
                yield self.normalise(x[np.searchsorted(wanted, rows)]), labels


class StreamedBatches:
    """Mini-batches streamed from the shards of `rows` (a `Rows` of a prepared dataset), for one
    worker of `world_size`: at most `prefetch` + 1 shards are held at once, read and decoded by
    a background thread while the model trains on the previous one.

    Each epoch visits the shards in a new order from (seed, epoch) and the rows of each in a new
    order (a shuffle buffer of one shard, with the carry of the last); each worker takes every
    `world_size`-th shard. Photos are cropped and flipped at random (`augment`) when decoded.
    """

    def __init__(self, rows, normalise, batch_size: int, seed: int, augment: bool, rank: int = 0,
                 world_size: int = 1, prefetch: int = 1):
        self.rows, self.normalise, self.batch_size, self.augment = rows, normalise, batch_size, augment
        self.seed, self.rank, self.world_size, self.prefetch = seed, rank, world_size, prefetch
        self.epoch, self.rows_seen, self.bytes_seen, self.wait_seconds = 0, 0, 0, 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.rows) / self.world_size) / self.batch_size)

    def _read(self, shards: list[dict], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for entry in shards:
                if stop.is_set():
                    return
                out.put(self.rows.chunk_of(entry, train=self.augment))
        except BaseException as err:  # re-raised in the training thread
            out.put(err)
        out.put(None)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = self.rows.shards()
        mine = [shards[i] for i in rng.permutation(len(shards))][self.rank :: self.world_size]
        chunks: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._read, args=(mine, chunks, stop), daemon=True)
        reader.start()
        self.rows_seen, self.bytes_seen, self.wait_seconds = 0, 0, 0.0
        carry_x, carry_y = None, None
        try:
            while (item := waited(self, chunks.get)) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, _ = item
                self.bytes_seen += x.nbytes
                order = rng.permutation(len(y))
                x, y = x[order], y[order]
                if carry_x is not None:
                    x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
                full = len(y) - len(y) % self.batch_size
                for start in range(0, full, self.batch_size):
                    self.rows_seen += self.batch_size
                    yield self.normalise(x[start : start + self.batch_size]), torch.from_numpy(y[start : start + self.batch_size])
                carry_x, carry_y = x[full:], y[full:]
            if carry_y is not None and len(carry_y):
                self.rows_seen += len(carry_y)
                yield self.normalise(carry_x), torch.from_numpy(carry_y)
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    chunks.get_nowait()
                except queue.Empty:
                    reader.join(0.05)


class RayDataBatches:
    """Mini-batches of one Ray Train worker's share of a Ray Data dataset (`get_dataset_shard`):
    Ray Data reads, checks and decodes the shards on the cluster's CPUs and splits the rows
    equally among the workers (equal step counts, as DDP needs); each epoch re-executes the
    dataset, so photos get new random crops."""

    def __init__(self, shard, normalise, batch_size: int, steps: int, seed: int):
        self.shard, self.normalise, self.batch_size, self.steps, self.seed = shard, normalise, batch_size, steps, seed
        self.epoch, self.rows_seen, self.bytes_seen, self.wait_seconds, self.indices_seen = 0, 0, 0, 0.0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.rows_seen, self.bytes_seen, self.wait_seconds, self.indices_seen = 0, 0, 0.0, []
        batches = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                               local_shuffle_buffer_size=4 * self.batch_size,
                                               local_shuffle_seed=self.seed * 1000 + self.epoch))
        while (batch := waited(self, lambda: next(batches, None))) is not None:
            self.rows_seen += len(batch["y"])
            self.bytes_seen += batch["x"].nbytes
            self.indices_seen.append(batch["index"])
            yield self.normalise(batch["x"]), torch.from_numpy(batch["y"])
