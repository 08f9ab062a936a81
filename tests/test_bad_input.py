"""Each bad input gives one clear line naming the problem and the fix, exit code 2, and nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tl, tl_error, tl_json


@pytest.fixture(scope="module")
def work(module_workdir):
    return module_workdir


def assert_error(line: str, *fragments: str):
    """`line`: the one `error:` line of a failed command (tl_error)."""
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def digits(work):
    return tl_json("prepare", "sklearn:digits")["path"]


@pytest.fixture(scope="module")
def tiny_backbone(work, digits):
    return tl_json("pretrain", "--data", digits, "--epochs", "1")["checkpoint"]


def test_unknown_uri_scheme(work):
    assert_error(tl_error("prepare", "ftp:somewhere"), "unknown data scheme 'ftp'", "sklearn")
    assert_error(tl_error("prepare", "just-a-path"), "no known data scheme")


def test_missing_path(work):
    assert_error(tl_error("prepare", f"npz:{work}/nope.npz"), "does not exist")
    assert_error(tl_error("prepare", f"imagefolder:{work}/nope"), "is not a folder")
    assert_error(tl_error("transfer", "--data", f"{work}/nowhere", "--strategy", "scratch"), "not a prepared dataset", "tl prepare")


def test_corrupt_image_and_empty_class(work, tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png at all")
    assert_error(tl_error("prepare", f"imagefolder:{tmp_path / 'imgs'}"), "broken.png", "corrupt")
    (tmp_path / "imgs" / "b" / "broken.png").unlink()
    assert_error(tl_error("prepare", f"imagefolder:{tmp_path / 'imgs'}"), "class 'b' has no images")


def test_fewer_images_than_shots(work, digits):
    assert_error(tl_error("transfer", "--data", digits, "--strategy", "scratch", "--shots", "500"), "fewer than --shots 500")


def test_label_out_of_range(work, tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 7]),
             classes=np.array(["a", "b", "c"]))
    assert_error(tl_error("prepare", f"npz:{tmp_path / 'bad.npz'}"), "label 7", "out of range for 3 classes")


def test_channel_mismatch(work, digits, tiny_backbone):
    rgb = tl_json("prepare", "sklearn:digits", "--channels", "3")["path"]
    assert_error(tl_error("transfer", "--data", rgb, "--strategy", "finetune", "--backbone", tiny_backbone),
                 "1-channel", "--channels 1")


def test_checkpoint_whose_head_does_not_fit(work, tiny_backbone):
    three = tl_json("prepare", "sklearn:digits", "--classes", "0,1,2")["path"]
    assert_error(tl_error("evaluate", "--model", tiny_backbone, "--data", three), "10 classes", "3")


def test_not_a_checkpoint_and_unknown_strategy(work, digits, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert_error(tl_error("transfer", "--data", digits, "--strategy", "finetune", "--backbone", tmp_path / "junk.pt"),
                 "not a readable checkpoint")
    assert_error(tl_error("transfer", "--data", digits, "--strategy", "magic"), "unknown strategy 'magic'")
    assert_error(tl_error("transfer", "--data", digits, "--strategy", "finetune"), "needs a pretrained backbone")


def test_a_damaged_checkpoint_is_refused_by_name(work, digits, tiny_backbone, tmp_path):
    """tl writes a checkpoint's sha256 beside it: a flipped byte or a truncated copy is never loaded."""
    import shutil
    from pathlib import Path

    for damage in ("flip", "truncate"):
        folder = tmp_path / damage
        folder.mkdir()
        for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
            shutil.copy(Path(tiny_backbone).parent / name, folder / name)
        raw = bytearray((folder / "checkpoint.pt").read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0x01  # inside the weights: torch.load alone would not notice
        else:
            raw = raw[: len(raw) - 100]
        (folder / "checkpoint.pt").write_bytes(bytes(raw))
        line = tl_error("transfer", "--data", digits, "--strategy", "finetune", "--backbone", folder / "checkpoint.pt")
        assert_error(line, f"checkpoint {folder / 'checkpoint.pt'} is corrupt", "does not match checkpoint.pt.sha256")
        assert_error(tl_error("evaluate", "--model", folder / "checkpoint.pt", "--data", digits), "is corrupt")


def test_a_damaged_copy_without_its_sha256_file_is_refused_by_the_digest_inside(work, digits, tiny_backbone, tmp_path):
    """MLflow's copy of a logged checkpoint (mlartifacts/<run>/artifacts/checkpoint/checkpoint.pt)
    has no .sha256 beside it: the checkpoint carries its own digest."""
    from pathlib import Path

    logged = [p for p in (work / "work").rglob("checkpoint.pt") if "artifacts" in p.parts
              and not p.with_name("checkpoint.pt.sha256").exists()]
    assert logged, "the pretrain run logged no checkpoint to MLflow"
    raw = bytearray(logged[0].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(bytes(raw))
    line = tl_error("evaluate", "--model", damaged, "--data", digits)
    assert_error(line, f"checkpoint {damaged} is corrupt", "do not match the sha256 it carries")
    assert "Traceback" not in tl("evaluate", "--model", logged[0], "--data", digits).output  # the copy itself is whole

    # A checkpoint from before checkpoints carried a digest loads, with a warning.
    import torch

    from tl_core.checkpoints import INTEGRITY, load_checkpoint

    old = torch.load(Path(tiny_backbone), weights_only=True)
    del old[INTEGRITY]
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="carries no integrity digest"):
        assert load_checkpoint(str(tmp_path / "old.pt"))["model_spec"] == old["model_spec"]


def test_failed_prepare_leaves_nothing_behind(work, tmp_path):
    before = sorted((work / "work" / "data").iterdir()) if (work / "work" / "data").exists() else []
    np.savez(tmp_path / "bad2.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 9]),
             classes=np.array(["a", "b", "c"]))
    assert tl("prepare", f"npz:{tmp_path / 'bad2.npz'}").exit_code == 2
    after = sorted((work / "work" / "data").iterdir()) if (work / "work" / "data").exists() else []
    assert before == after


def test_a_path_the_file_system_refuses_is_one_error_line_before_any_work(work, digits, tiny_backbone, tmp_path,
                                                                          monkeypatch):
    """An --output or a TL_WORKDIR that cannot be a folder (a file is there, or a folder above it
    cannot be made) is named with the fix, before anything is predicted or prepared, and the file
    in the way is left as it was. An OSError that names no path is a fault, not bad input: raised."""
    from tl_core.cli_app import execute

    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    predict = ("predict", "--model", tiny_backbone, "--data", digits, "--output")
    assert_error(tl_error(*predict, blocker), f"error: {blocker}: File exists", "a file is where a folder must be")
    assert_error(tl_error(*predict, blocker / "parts"), f"{blocker / 'parts'}: Not a directory", "move the file")
    monkeypatch.setenv("TL_WORKDIR", str(blocker))
    assert_error(tl_error("prepare", "sklearn:digits"), f"error: {blocker}", "a file is where a folder must be")
    assert blocker.read_text() == "kept"

    def refused():
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        execute(refused, False, print)


@pytest.mark.parametrize("args, fragment", [
    (["transfer", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["transfer", "--no-such-flag"], "No such option: --no-such-flag"),
    (["prepare"], "Missing argument 'uri'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_a_usage_error_of_the_tl_command_is_one_error_line(args, fragment):
    """Usage errors (caught by Typer before any step runs) are bad input too: the `tl` command
    itself, not only its steps, prints one `error:` line naming --help, and exits 2."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).parent / "tl"), *args], capture_output=True, text=True, timeout=120)
    command = " ".join(["tl", *args[:1]]) if args[0] != "no-such-command" else "tl"
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert fragment in lines[0] and lines[0].endswith(f": see `{command} --help`")
