"""Each bad input gives one clear line naming the problem and the fix, exit code 2, and nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tl_core.cli import app


@pytest.fixture(scope="module")
def work(module_workdir):
    return module_workdir


def tl(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_error(code: int, output: str, *fragments: str):
    assert code == 2, output
    assert "Traceback" not in output
    line = [line for line in output.splitlines() if line.startswith("error: ")]
    assert line, output
    for fragment in fragments:
        assert fragment in line[0], line[0]


@pytest.fixture(scope="module")
def digits(work):
    code, out = tl("prepare", "sklearn:digits", "--json")
    assert code == 0, out
    import json

    return json.loads(out.strip().splitlines()[-1])["path"]


@pytest.fixture(scope="module")
def tiny_backbone(work, digits):
    import json

    code, out = tl("pretrain", "--data", digits, "--epochs", "1", "--json")
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])["checkpoint"]


def test_unknown_uri_scheme(work):
    assert_error(*tl("prepare", "ftp:somewhere"), "unknown data scheme 'ftp'", "sklearn")
    assert_error(*tl("prepare", "just-a-path"), "no known data scheme")


def test_missing_path(work):
    assert_error(*tl("prepare", f"npz:{work}/nope.npz"), "does not exist")
    assert_error(*tl("prepare", f"imagefolder:{work}/nope"), "is not a folder")
    assert_error(*tl("transfer", "--data", f"{work}/nowhere", "--strategy", "scratch"), "not a prepared dataset", "tl prepare")


def test_corrupt_image_and_empty_class(work, tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png at all")
    assert_error(*tl("prepare", f"imagefolder:{tmp_path / 'imgs'}"), "broken.png", "corrupt")
    (tmp_path / "imgs" / "b" / "broken.png").unlink()
    assert_error(*tl("prepare", f"imagefolder:{tmp_path / 'imgs'}"), "class 'b' has no images")


def test_fewer_images_than_shots(work, digits):
    assert_error(*tl("transfer", "--data", digits, "--strategy", "scratch", "--shots", "500"), "fewer than --shots 500")


def test_label_out_of_range(work, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 7]),
             classes=np.array(["a", "b", "c"]))
    assert_error(*tl("prepare", f"npz:{tmp_path / 'bad.npz'}"), "label 7", "out of range for 3 classes")


def test_channel_mismatch(work, digits, tiny_backbone):
    code, out = tl("prepare", "sklearn:digits", "--channels", "3", "--json")
    assert code == 0, out
    rgb = out.strip().splitlines()[-1].split('"path": "')[1].split('"')[0]
    assert_error(*tl("transfer", "--data", rgb, "--strategy", "finetune", "--backbone", tiny_backbone),
                 "1-channel", "--channels 1")


def test_checkpoint_whose_head_does_not_fit(work, tiny_backbone):
    code, out = tl("prepare", "sklearn:digits", "--classes", "0,1,2", "--json")
    assert code == 0, out
    three = out.strip().splitlines()[-1].split('"path": "')[1].split('"')[0]
    assert_error(*tl("evaluate", "--model", tiny_backbone, "--data", three), "10 classes", "3")


def test_not_a_checkpoint_and_unknown_strategy(work, digits, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert_error(*tl("transfer", "--data", digits, "--strategy", "finetune", "--backbone", tmp_path / "junk.pt"),
                 "not a readable checkpoint")
    assert_error(*tl("transfer", "--data", digits, "--strategy", "magic"), "unknown strategy 'magic'")
    assert_error(*tl("transfer", "--data", digits, "--strategy", "finetune"), "needs a pretrained backbone")


def test_failed_prepare_leaves_nothing_behind(work, tmp_path):
    before = sorted((work / "work" / "data").iterdir()) if (work / "work" / "data").exists() else []
    np.savez(tmp_path / "bad2.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 9]),
             classes=np.array(["a", "b", "c"]))
    assert tl("prepare", f"npz:{tmp_path / 'bad2.npz'}")[0] == 2
    after = sorted((work / "work" / "data").iterdir()) if (work / "work" / "data").exists() else []
    assert before == after
