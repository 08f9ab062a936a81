from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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
