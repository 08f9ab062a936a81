from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import servers

# The pytest-xdist workers share the cores (pyproject's addopts), and so do the `tl` processes and
# Ray workers they start, which inherit this. PyTorch's default, a thread a core with OpenMP's
# threads spinning while they wait, made a small CNN beside one busy process 2x slower (9.9 s
# against 4.8 s with PASSIVE, bench/omp_wait.md): threads that sleep while they wait, as in the image.
# (One thread a process, faster in that bench, made the whole suite no faster: 20.5 min at
# 2a3199f, and moved test_zero_shot's accuracy under its floor.)
# Read when torch loads OpenMP, so set before any test imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# -- the `tl` CLI in this process (tests import these: `from tests.conftest import tl, tl_json, tl_error`) --


def tl(*args):
    """Run `tl <args>` in this process; returns click's Result (exit_code, output, stdout)."""
    from typer.testing import CliRunner

    from tl_core.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def tl_json(*args) -> dict:
    """Run `tl <args> --json`, which must succeed; returns its JSON summary (the last line)."""
    result = tl(*args, "--json")
    assert result.exit_code == 0, result.output[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tl_error(*args) -> str:
    """Run a command that must fail as bad input: exit 2, one `error:` line, no traceback; returns that line."""
    result = tl(*args)
    assert result.exit_code == 2, result.output[-5000:]
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo (MNIST test split, USPS, Omniglot): CI has it too."""
    if not (SHARED_DATA / "usps" / "usps_16x16.npz").is_file():
        pytest.fail(f"{SHARED_DATA} is missing: clone the project beside ../shared (see README)")
    return SHARED_DATA


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh TL_WORKDIR (and so a fresh SQLite MLflow store) for one test."""
    monkeypatch.setenv("TL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "work"


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory, request) -> Path:
    """One TL_WORKDIR (and SQLite MLflow store) shared by a whole module: creating one costs seconds.
    Returns the folder that holds it (TL_WORKDIR is <it>/work)."""
    root = tmp_path_factory.mktemp(request.module.__name__.split(".")[-1])
    mp = pytest.MonkeyPatch()
    mp.setenv("TL_WORKDIR", str(root / "work"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for the whole session; boto3 reaches it through AWS_ENDPOINT_URL."""
    logs = tmp_path_factory.mktemp("moto")
    with servers.moto_s3(logs) as url:
        saved = {k: os.environ.get(k) for k in [*servers.S3_ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(servers.S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = url
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
