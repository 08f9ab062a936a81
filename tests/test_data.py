"""Data sources by URI, the prepare step (manifest, hash, skip) and k-shot sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tl_core import storage
from tl_core.config import PrepareConfig
from tl_core.data import load_prepared, prepare, sample_shots
from tl_core.data.sources import read_source
from tl_core.errors import UserError


def test_sklearn_digits_are_the_real_ones():
    data = read_source("sklearn:digits")
    assert data.train_x.shape == (1797, 1, 8, 8) and data.train_x.dtype == np.uint8
    assert data.classes == [str(i) for i in range(10)]
    assert data.train_x.max() == 255 and data.test_x is None


def test_font_digits_render_every_class_from_many_fonts():
    data = read_source("fonts:digits")
    counts = np.bincount(data.train_y, minlength=10)
    assert data.train_x.shape[1:] == (1, 32, 32)
    assert (counts == counts[0]).all() and counts[0] >= 10 * 40  # at least 10 fonts x 40 variants
    # The glyphs differ between classes: the mean image of a 1 is not the mean image of an 8.
    means = [data.train_x[data.train_y == c].mean(0) for c in range(10)]
    assert np.abs(means[1] - means[8]).mean() > 20


def test_mnist_idx_and_usps_npz(shared_data):
    mnist = read_source(f"idx:{shared_data}/mnist-test")
    assert mnist.train_x.shape == (10000, 1, 28, 28) and mnist.test_x is None  # t10k only: prepare splits it
    usps = read_source(f"npz:{shared_data}/usps/usps_16x16.npz")
    assert usps.train_x.shape == (7291, 1, 16, 16) and usps.test_x.shape == (2007, 1, 16, 16)
    assert usps.train_x.dtype == np.uint8 and usps.train_x.max() > 200


def test_prepare_writes_manifest_and_skips_identical_work(workdir):
    cfg = PrepareConfig(uri="sklearn:digits", image_size=16, seed=3)
    first, reused = prepare(cfg)
    assert not reused
    manifest = json.loads((storage.read_bytes(storage.join(first.path, "manifest.json"))))
    assert manifest["shape"] == [1, 16, 16] and manifest["uri"] == "sklearn:digits" and manifest["seed"] == 3
    assert sum(manifest["counts"]["train"].values()) + sum(manifest["counts"]["test"].values()) == 1797
    listed = [(name, entry) for name, entry in manifest["files"].items()]
    listed += [(entry["name"], entry) for split in ("train", "test") for entry in manifest["shards"][split]]
    assert len(listed) == 4  # two label files, a shard per split (digits are small)
    for name, entry in listed:
        data = storage.read_bytes(storage.join(first.path, name))
        assert storage.sha256_bytes(data) == entry["sha256"] and len(data) == entry["bytes"]
    second, reused = prepare(cfg)
    assert reused and second.path == first.path and second.hash == first.hash
    other, reused = prepare(cfg.model_copy(update={"seed": 4}))
    assert not reused and other.hash != first.hash


def test_written_files_are_as_readable_as_the_umask_allows(tmp_path, monkeypatch):
    # Written through a private temporary file (atomic), yet readable by others under umask 022,
    # as a service under another user reading predictions or checkpoints needs.
    monkeypatch.setattr(storage, "UMASK", 0o022)
    storage.write_bytes(str(tmp_path / "part.parquet"), b"rows")
    assert (tmp_path / "part.parquet").stat().st_mode & 0o777 == 0o644


def test_prepare_class_subset_channels_and_cap(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits", classes=["5", "6", "7"], channels=3, max_per_class=20))
    assert data.classes == ["5", "6", "7"] and data.shape == [3, 8, 8]
    x, y = data.split("train")
    assert set(np.unique(y)) == {0, 1, 2} and np.bincount(y).max() == 20
    assert (x[:, 0] == x[:, 1]).all()  # grey -> RGB repeats the channel


def test_k_shot_sampling_is_seeded_and_disjoint_from_validation():
    y = np.repeat(np.arange(5), 30)
    classes = [str(i) for i in range(5)]
    a, va = sample_shots(y, 3, seed=0, classes=classes, val_per_class=4)
    b, _ = sample_shots(y, 3, seed=0, classes=classes, val_per_class=4)
    c, _ = sample_shots(y, 3, seed=1, classes=classes, val_per_class=4)
    assert (a == b).all() and not (a == c).all()
    assert len(a) == 15 and len(va) == 20 and not set(a) & set(va)
    assert (np.bincount(y[a]) == 3).all()
    with pytest.raises(UserError, match="fewer than --shots 40"):
        sample_shots(y, 40, seed=0, classes=classes)


def _write_imagefolder(root, classes=("a", "b"), per_class=6, size=12):
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            img = (rng.random((size, size)) * 60).astype(np.uint8)
            img[:, i * 4 : i * 4 + 4] = 255  # a class-specific bar
            Image.fromarray(img).save(root / name / f"{j}.png")


def test_imagefolder_local(tmp_path, workdir):
    _write_imagefolder(tmp_path / "imgs")
    data, _ = prepare(PrepareConfig(uri=f"imagefolder:{tmp_path / 'imgs'}", test_fraction=0.5))
    assert data.classes == ["a", "b"] and data.shape == [1, 12, 12]
    assert sum(data.manifest["counts"]["test"].values()) == 6


def test_an_imagefolder_class_folder_that_is_a_symlink_is_read(tmp_path, workdir):
    # The images live elsewhere; the class folder links to them (a shared photo store, a dataset
    # assembled from links). Before, listing skipped the link's files and the class read as empty.
    _write_imagefolder(tmp_path / "store", classes=("a", "b"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a").symlink_to(tmp_path / "store" / "a", target_is_directory=True)
    (tmp_path / "imgs" / "b").symlink_to(tmp_path / "store" / "b", target_is_directory=True)
    data, _ = prepare(PrepareConfig(uri=f"imagefolder:{tmp_path / 'imgs'}", test_fraction=0.5))
    assert data.classes == ["a", "b"]
    assert sum(data.manifest["counts"]["train"].values()) + sum(data.manifest["counts"]["test"].values()) == 12

    # Two links into one folder: refused by name (a loop through links is refused the same way).
    (tmp_path / "twice").mkdir()
    (tmp_path / "twice" / "a").symlink_to(tmp_path / "store" / "a", target_is_directory=True)
    (tmp_path / "twice" / "b").symlink_to(tmp_path / "store" / "a", target_is_directory=True)
    with pytest.raises(UserError, match="linked twice"):
        prepare(PrepareConfig(uri=f"imagefolder:{tmp_path / 'twice'}", test_fraction=0.5))


def test_imagefolder_on_s3_through_boto3(tmp_path, workdir, s3_endpoint):
    import boto3

    _write_imagefolder(tmp_path / "imgs", classes=("cat", "dog", "emu"))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="images")
    for path in sorted((tmp_path / "imgs").rglob("*.png")):
        s3.upload_file(str(path), "images", f"pets/{path.relative_to(tmp_path / 'imgs')}")
    # The prepared dataset goes to S3 too, and reads back from there.
    data, reused = prepare(PrepareConfig(uri="imagefolder:s3://images/pets", output="s3://images/prepared"))
    assert not reused and data.path.startswith("s3://images/prepared/")
    assert data.classes == ["cat", "dog", "emu"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="images", Prefix="prepared/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and len(keys) == 5
    again = load_prepared(data.path)
    assert again.hash == data.hash and (again.split("train")[0] == data.split("train")[0]).all()


def test_omniglot_zip_one_class_per_character_bright_strokes(shared_data):
    raw = read_source(f"omniglot:{shared_data / 'omniglot-small1' / 'images_background_small1.zip'}")
    assert len(raw.classes) == 136 and all(c.count("/") == 1 for c in raw.classes)  # <alphabet>/<character>
    assert raw.train_x.shape == (2720, 1, 105, 105)
    assert np.bincount(raw.train_y).tolist() == [20] * 136
    assert raw.train_x.mean() < 40  # inverted: dark background, bright strokes (as MNIST)
    with pytest.raises(UserError, match="no such file"):
        read_source(f"omniglot:{shared_data / 'missing.zip'}")


def test_class_split_holds_out_whole_classes(workdir):
    data, _ = prepare(PrepareConfig(uri="sklearn:digits", test_split="classes", test_fraction=0.3, seed=1))
    train_classes, test_classes = set(data.split("train")[1]), set(data.split("test")[1])
    assert not train_classes & test_classes
    assert len(test_classes) == 3 and train_classes | test_classes == set(range(10))
    assert len(data.split("train")[1]) + len(data.split("test")[1]) == 1797  # every image kept
    other, _ = prepare(PrepareConfig(uri="sklearn:digits", test_split="classes", test_fraction=0.3, seed=2))
    assert set(other.split("test")[1]) != test_classes  # the seed picks the held-out classes
    with pytest.raises(UserError, match="at least 2 classes"):
        prepare(PrepareConfig(uri="sklearn:digits", classes=["3"], test_split="classes"))
