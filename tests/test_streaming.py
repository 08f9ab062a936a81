"""Prepared data as shards, streamed: prepare in bounded memory, train without holding a split,
refuse corrupt shards by name, photos cropped on the fly, training straight from s3://."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tl_error
from tl_core.config import PrepareConfig, TrainConfig
from tl_core.data import prepare
from tl_core.data import shards
from tl_core.data.prepare import Rows
from tl_core.train.loop import fit
from tl_core.train.session import LocalSession

SHARD_BYTES = 64 * 40  # 40 digits of 8 x 8 per shard: digits' train split becomes ~32 shards


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", SHARD_BYTES)


@pytest.fixture
def rows_held(monkeypatch):
    """The most decoded rows any read of a prepared split held at once, over the whole test."""
    seen = {"max": 0}
    original_chunk, original_arrays = Rows.chunk_of, Rows.arrays

    def chunk_of(self, entry, train=False):
        out = original_chunk(self, entry, train)
        seen["max"] = max(seen["max"], len(out[1]))
        return out

    def arrays(self, train=False):
        x, y = original_arrays(self, train)
        seen["max"] = max(seen["max"], len(y))
        return x, y

    monkeypatch.setattr(Rows, "chunk_of", chunk_of)
    monkeypatch.setattr(Rows, "arrays", arrays)
    return seen


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dims = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big")
                                                        + labels.astype(np.uint8).tobytes())


def test_prepare_writes_bounded_shards_that_read_back_exactly(tmp_path, workdir, small_shards, rows_held):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (3000, 8, 8), dtype=np.uint8), rng.integers(0, 5, 3000)
    write_idx(tmp_path / "idx", images, labels)
    data, _ = prepare(PrepareConfig(uri=f"idx:{tmp_path / 'idx'}", test_fraction=0.2))
    entries = data.manifest["shards"]["train"]
    assert len(entries) > 10 and all(e["rows"] <= 40 for e in entries)
    assert data.manifest["stored"] == "arrays" and data.shape == [1, 8, 8]
    # Streamed through in chunks, the splits hold exactly the source's images, split by label.
    rows_held["max"] = 0
    seen = np.zeros(3000, dtype=int)
    for split in ("train", "test"):
        for x, y in data.rows(split).chunks():
            for image, label in zip(x, y):
                match = np.flatnonzero((images.reshape(3000, -1) == image.reshape(-1)).all(1))
                assert len(match) == 1 and labels[match[0]] == label
                seen[match[0]] += 1
    assert (seen == 1).all()
    assert rows_held["max"] <= 40  # one shard at a time
    # The statistics computed a chunk at a time equal those of the whole train split.
    x, _ = data.split("train")
    assert np.allclose(data.manifest["mean"], [x.mean() / 255], atol=1e-6)
    assert np.allclose(data.manifest["std"], [(x / 255).std()], atol=1e-5)


def test_training_streams_without_holding_a_split(workdir, small_shards, rows_held):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    train_rows = sum(data.manifest["counts"]["train"].values())
    cfg = TrainConfig(data=data.path, shots=None, epochs=4, batch_size=32, lr=3e-3, in_memory_mb=0)
    rows_held["max"] = 0
    ckpt = fit(cfg, LocalSession(use_gpu=False))
    assert ckpt["metrics"]["streamed"] == 1.0 and ckpt["metrics"]["rows_seen_worker0"] == train_rows
    assert rows_held["max"] <= 40, "a path read more than one shard's rows at once"
    assert ckpt["metrics"]["test_accuracy"] > 0.8  # and it learnt
    # The same run in memory (a small set's fast path) reads the whole split at once and learns as well.
    in_memory = fit(cfg.model_copy(update={"in_memory_mb": 2048}), LocalSession(use_gpu=False))
    assert "streamed" not in in_memory["metrics"] and rows_held["max"] == train_rows
    assert abs(in_memory["metrics"]["test_accuracy"] - ckpt["metrics"]["test_accuracy"]) < 0.06


def test_linear_probe_features_are_computed_and_cached_chunk_by_chunk(workdir, small_shards, rows_held):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    backbone = fit(TrainConfig(data=data.path, epochs=1), LocalSession(use_gpu=False))
    path = str(workdir / "backbone.pt")
    from tl_core.checkpoints import save_checkpoint

    save_checkpoint(backbone, path)
    cfg = TrainConfig(data=data.path, strategy="linear-probe", backbone=path, epochs=5, in_memory_mb=0)
    rows_held["max"] = 0
    first = fit(cfg, LocalSession(use_gpu=False))
    second = fit(cfg, LocalSession(use_gpu=False))
    assert first["metrics"]["feature_cache_hit"] == 0.0 and second["metrics"]["feature_cache_hit"] == 1.0
    assert rows_held["max"] <= 40
    parts = list((workdir / "cache" / "features").glob("*/0*.pt"))
    # one cache file per shard: of the training rows, and of the test split (scored on its features)
    assert len(parts) == len(data.manifest["shards"]["train"]) + len(data.manifest["shards"]["test"])
    assert first["metrics"]["test_accuracy"] == second["metrics"]["test_accuracy"]


def test_unlabeled_pools_stream_with_their_labels_hidden(workdir, small_shards, rows_held):
    """distill and dann learn from the pool's unlabeled images too: a pool larger than memory
    streams whole, the shots with their labels and the rest labelled UNLABELED."""
    from tl_core.checkpoints import save_checkpoint
    from tl_core.data.prepare import UNLABELED

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    pool = data.rows("train", np.arange(100), unlabeled=np.arange(10, 100))
    y = np.concatenate([chunk_y for _, chunk_y in pool.chunks()])
    assert (y[10:] == UNLABELED).all() and (y[:10] == data.labels("train")[:10]).all() and (pool.labels() == y).all()

    train_rows = sum(data.manifest["counts"]["train"].values())
    teacher = fit(TrainConfig(data=data.path, shots=None, epochs=4, lr=3e-3), LocalSession(use_gpu=False))
    save_checkpoint(teacher, str(workdir / "teacher.pt"))
    rows_held["max"] = 0
    cfg = TrainConfig(data=data.path, strategy="distill", teacher=str(workdir / "teacher.pt"), use_unlabeled=True,
                      shots=5, epochs=3, lr=3e-3, in_memory_mb=0)
    m = fit(cfg, LocalSession(use_gpu=False))["metrics"]
    assert m["streamed"] == 1.0 and m["rows_seen_worker0"] == train_rows  # 50 shots and the unlabeled rest
    assert rows_held["max"] <= 40 and m["test_accuracy"] > 0.7  # the teacher's soft labels on all of them
    # dann holds its few shots (the extra labelled batch) and a sample for batch norm; the pool streams.
    cfg = TrainConfig(data=data.path, strategy="dann", source_data=data.path, shots=5, epochs=2, in_memory_mb=0)
    m = fit(cfg, LocalSession(use_gpu=False))["metrics"]
    assert m["streamed"] == 1.0 and m["rows_seen_worker0"] == train_rows and m["test_accuracy"] > 0.2


def test_few_shot_episodes_stream_the_same_episodes(workdir, small_shards, rows_held):
    """Larger than memory, protonet's and maml's episodes are read from the shards an episode at a
    time (--in-memory-mb 0) and are the very episodes of the in-memory path: the same model."""
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    for strategy in ("protonet", "maml"):
        cfg = TrainConfig(data=data.path, strategy=strategy, shots=None, epochs=2, ways=5, episode_shots=1,
                          episode_queries=5, episodes_per_epoch=20, eval_episodes=20)
        in_memory = fit(cfg, LocalSession(use_gpu=False))
        rows_held["max"] = 0
        streamed = fit(cfg.model_copy(update={"in_memory_mb": 0}), LocalSession(use_gpu=False))
        assert "streamed" not in in_memory["metrics"] and streamed["metrics"]["streamed"] == 1.0
        assert streamed["metrics"]["rows_seen_worker0"] == 20 * 5 * (1 + 5)  # the last epoch's episodes
        for key, value in in_memory["model"].items():
            assert torch.equal(value, streamed["model"][key]), f"{strategy}: {key} differs"
        assert streamed["metrics"]["test_accuracy"] == in_memory["metrics"]["test_accuracy"]
        if strategy == "protonet":  # scored on features embedded a shard at a time (maml adapts on images)
            assert rows_held["max"] <= 40, "a path read more than one shard's rows at once"


def test_the_source_task_streams_beside_the_target(workdir, small_shards, rows_held):
    """multitask, dann, mcc and simclr draw source batches beside the target's: a source larger than
    memory streams, pass after pass, every row once a pass, one shard held at a time."""
    from tl_core.strategies.base import SourcePool

    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    labels = data.labels("train")
    pool = SourcePool(TrainConfig(data=data.path, source_data=data.path, in_memory_mb=0, batch_size=32), "dann")
    assert pool.streamed and pool.x is None
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # two whole passes, drawn in uneven batches
        drawn = [pool.draw(n, generator, torch.device("cpu"))[1] for n in (50,) * (len(labels) // 50)]
        drawn.append(pool.draw(len(labels) % 50, generator, torch.device("cpu"))[1])
        assert sorted(torch.cat(drawn).tolist()) == sorted(labels.tolist())
    in_memory = SourcePool(TrainConfig(data=data.path, source_data=data.path), "dann")
    assert not in_memory.streamed and len(in_memory.y) == len(labels)

    from tl_core.strategies.simclr import SimCLR

    simclr = SimCLR(TrainConfig(data=data.path, strategy="simclr", source_data=data.path, in_memory_mb=0))
    simclr.stream_set(None, data.rows("train", np.arange(100)), data.normalise)
    assert simclr.source_share == 1.0  # a source 14x the target: one source image beside each target image, not 14

    for strategy in ("multitask", "simclr"):
        rows_held["max"] = 0
        cfg = TrainConfig(data=data.path, strategy=strategy, source_data=data.path, shots=5, epochs=2, augment=0,
                          in_memory_mb=0)
        m = fit(cfg, LocalSession(use_gpu=False))["metrics"]
        assert m["streamed"] == 1.0 and m["source_streamed"] == 1.0 and rows_held["max"] <= 40, strategy


def test_a_corrupt_shard_is_refused_by_name(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    shard = Path(data.path, data.manifest["shards"]["test"][0]["name"])
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    line = tl_error("transfer", "--data", data.path, "--strategy", "scratch", "--epochs", "1")
    assert "test-00000.parquet does not match its sha256" in line and "prepare the dataset again" in line


def test_a_truncated_shard_or_a_manifest_whose_hashes_lie_is_refused(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits"))
    shard = Path(data.path, data.manifest["shards"]["train"][0]["name"])
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    line = tl_error("transfer", "--data", data.path, "--strategy", "scratch", "--epochs", "1")
    assert "train-00000.parquet does not match its sha256" in line
    shard.write_bytes(whole)
    manifest_path = Path(data.path, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["labels-train.npy"]["sha256"] = "0" * 64  # the labels file is intact; the manifest lies
    manifest_path.write_text(json.dumps(manifest))
    line = tl_error("transfer", "--data", data.path, "--strategy", "scratch", "--epochs", "1")
    assert "labels-train.npy does not match its sha256 in the manifest" in line


def test_a_dataset_of_the_old_format_says_prepare_again(tmp_path, workdir):
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "tl-prepared/1", "uri": "sklearn:digits"}))
    line = tl_error("transfer", "--data", str(old), "--strategy", "scratch")
    assert "older tl" in line and "prepare it again with `tl prepare sklearn:digits`" in line


def test_training_streams_straight_from_s3(workdir, s3_endpoint, small_shards):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="streamed")
    data, _ = prepare(PrepareConfig(uri="sklearn:digits", output="s3://streamed/prepared"))
    ckpt = fit(TrainConfig(data=data.path, shots=None, epochs=2, in_memory_mb=0), LocalSession(use_gpu=False))
    assert ckpt["metrics"]["streamed"] == 1.0 and ckpt["metrics"]["test_accuracy"] > 0.7
    assert not list(Path(workdir).rglob("*.parquet"))  # no local copy of the shards was made


@pytest.mark.slow
def test_photos_are_kept_as_files_and_cropped_for_resnet18_at_224(workdir, shared_data, tmp_path):
    data, _ = prepare(PrepareConfig(uri=f"imagefolder:{shared_data / 'hymenoptera'}"))
    assert data.photos and data.shape == [3, 224, 224] and data.classes == ["ants", "bees"]
    assert sum(data.manifest["counts"]["test"].values()) == 153  # val/ is the test split
    x, y = data.rows("test", np.arange(4)).arrays()
    assert x.shape == (4, 3, 224, 224) and x.dtype == np.uint8
    train = data.rows("train", np.arange(8))
    a, b = train.decode(_images(train), train=True), train.decode(_images(train), train=True)
    assert a.shape == (8, 3, 224, 224) and not np.array_equal(a, b)  # new random crops each time
    cfg = TrainConfig(data=data.path, model="resnet18", shots=4, epochs=1, batch_size=8, augment=1)
    ckpt = fit(cfg, LocalSession(use_gpu=False))
    assert ckpt["model_spec"]["kwargs"] == {"small_input": False}  # the ImageNet stem, chosen by the image size
    assert ckpt["metrics"]["streamed"] == 1.0 and ckpt["data"]["shape"] == [3, 224, 224]
    assert 0.0 <= ckpt["metrics"]["test_accuracy"] <= 1.0


def _images(rows) -> list[bytes]:
    entry = rows.shards()[0]
    images, _, _ = shards.rows_of(shards.read_shard(rows.data.path, entry), rows.indices)
    return images

