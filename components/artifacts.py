"""What flows between the steps: small artifacts that point at the real outputs.

A step's output artifact (a Dataset or a Model) holds the step's JSON summary, and its `uri`
entry names where the output itself lives: a prepared dataset folder or a checkpoint, local or
s3://, under TL_WORKDIR. The next step reads that location and nothing else, so no tensors
travel through KFP's artifact store.
"""

from __future__ import annotations

import json
from pathlib import Path


def save(artifact, uri: str, summary: dict) -> None:
    artifact.metadata["uri"] = uri  # shown beside the artifact in the KFP UI
    Path(artifact.path).write_text(json.dumps({"uri": uri, "summary": summary}, default=str))


def _read(artifact) -> dict:
    return json.loads(Path(artifact.path).read_text())


def uri(artifact) -> str:
    return _read(artifact)["uri"]


def summary(artifact) -> dict:
    return _read(artifact)["summary"]


def log_metrics(metrics, values: dict) -> None:
    """Numeric entries of a step's metrics into a KFP Metrics artifact (per-class ones included)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name.replace("/", "."), float(value))
