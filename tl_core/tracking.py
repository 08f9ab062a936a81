"""MLflow tracking: every step is a run; `tl run` nests them under one parent.

With no `MLFLOW_TRACKING_URI`, tracking is SQLite plus a local artifact folder in the work
directory (no server to start). Point `MLFLOW_TRACKING_URI` at a server to share runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from tl_core import storage
from tl_core.config import workdir
from tl_core.errors import UserError

EXPERIMENT = "tl"
MAX_PARAM_LENGTH = 500


def _bounded_retries() -> None:
    # MLflow retries an unreachable server for minutes by default (7 retries, backoff factor 2).
    # 4 retries with factor 1 wait 0 + 2 + 4 + 8 s (plus jitter): a server that restarts within
    # about 10 s is ridden out, one that stays down fails in under half a minute.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def setup() -> str:
    """Point MLflow at the tracking store and experiment; returns the tracking URI."""
    import mlflow

    _bounded_retries()
    name = os.environ.get("TL_EXPERIMENT", EXPERIMENT)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    location = None  # a tracking server decides where artifacts go
    turns = contextlib.nullcontext()
    if not uri:
        # SQLite needs a local file: with an s3:// work directory it stays in ./tl-work while
        # the artifacts go to S3 beside the other outputs.
        folder = Path("tl-work" if storage.is_s3(workdir()) else workdir()).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        location = storage.join(workdir(), "mlartifacts") if storage.is_s3(workdir()) else (folder / "mlartifacts").as_uri()
        # Two processes opening a new SQLite store at once race in its schema migration: take turns.
        turns = storage.exclusive(str(folder / "mlflow.db"))
    mlflow.set_tracking_uri(uri)
    try:
        with turns:
            if mlflow.get_experiment_by_name(name) is None:
                _create_experiment(name, location)
            mlflow.set_experiment(name)
    except Exception as err:
        raise UserError(
            f"cannot reach the MLflow tracking store {uri} ({err.__class__.__name__}: {str(err)[:160]}); "
            "start the server or fix MLFLOW_TRACKING_URI"
        ) from err
    return uri


def _create_experiment(name: str, location: str | None) -> None:
    """Create the experiment; losing a race with another process that just created it is fine."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def flat_params(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def server_unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is the tracking server not answering, after MLflow's retries."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError, Timeout

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (ConnectionError, Timeout)):
            return True
        # What MLflow's REST client raises once its retries are spent.
        if isinstance(err, MlflowException) and ("Max retries exceeded" in err.message or "timed out" in err.message):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


@contextlib.contextmanager
def run(name: str, params: dict | None = None, tags: dict | None = None):
    """Start an MLflow run (nested under the active one, if any). If the tracking server stops
    answering inside it, the step ends with one error line; what it already stored (checkpoints,
    prepared data) stays, and the same command run again later reuses it."""
    import mlflow

    uri = setup()
    try:
        with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None, tags=tags or {}) as active:
            if params:
                mlflow.log_params(flat_params(params))
            yield active
    except Exception as err:
        if isinstance(err, UserError) or not server_unreachable(err):
            raise  # an error line already (from this run or one nested in it), or not the server
        raise UserError(
            f"the MLflow tracking server {uri} stopped answering during {name!r}; what this step stored is kept: "
            "run the same command again when the server is back, and finished work is reused"
        ) from err


def log_metrics(metrics: dict, step: int | None = None) -> None:
    import mlflow

    numeric = {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_history(history: list[dict]) -> None:
    """Per-epoch metrics in one batch (one round trip, not one per value)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, int(entry["epoch"]))
        for entry in history
        for key, value in entry.items()
        if key != "epoch" and isinstance(value, (int, float))
    ]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics per batch
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def log_bytes(data: bytes, name: str, artifact_path: str | None = None) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, name)
        path.write_bytes(data)
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_json(obj, name: str) -> None:
    log_bytes(json.dumps(obj, indent=2, default=str).encode(), name)
