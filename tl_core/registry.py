"""The MLflow model registry: register a checkpoint, promote it through a gate, roll back.

    register : checkpoint -> a new version of NAME (pyfunc model + checkpoint.pt), alias `challenger`
    promote  : evaluate `challenger` and `champion` on one test split; move `champion` to the
               challenger only if it passes the gate (MLflow's MetricThreshold semantics)
    rollback : move `champion` back to the champion before it

Each function returns a JSON-able summary dict. Decisions and scores are version tags, so the
registry itself is the audit log. MLflow has no compare-and-set on aliases, so promotions and
rollbacks take a lock: a registered model `NAME.promotion-lock`, whose creation is atomic on the
server (a second creator gets RESOURCE_ALREADY_EXISTS).

A decided challenger (promoted or refused) loses the `challenger` alias; one that lost a race
keeps it, as it was never compared with the new champion.

Both are safe to run again after a crash at any point (a KFP step retried): registering a
checkpoint that already has a version waiting to be judged (same sha256, no decision yet) gives
that version back instead of a second one, and promoting the version that is already the
champion by an earlier promotion reports that decision again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tl_core import tracking
from tl_core.checkpoints import load_checkpoint, read_checkpoint_bytes, require_trained
from tl_core.data import load_prepared
from tl_core.errors import UserError
from tl_core.evaluate import evaluate_loaded
from tl_core.strategies import STRATEGIES

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_SECONDS = 60  # a promotion holds the lock for a few registry calls, not the evaluation
LOCK_STALE_SECONDS = 10 * 60  # a lock this old was left by a promotion that crashed
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))  # models-from-code: nothing pickled

# Version tags.
PREVIOUS_CHAMPION = "tl.previous_champion"
ROLLED_BACK = "tl.rolled_back"  # on a version the champion was rolled back from; gone once promoted again
DECISION = "tl.promotion.decision"


# -- MLflow access ---------------------------------------------------------------------------


def _client():
    """An MlflowClient on a tracking server that answers (else a UserError, before any write)."""
    from mlflow import MlflowClient

    tracking.setup()
    return MlflowClient()


@contextlib.contextmanager
def _mlflow_errors(action: str):
    """A failing registry call becomes one line: what failed and what to check."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except (MlflowException, RequestException, OSError) as err:
        message = str(getattr(err, "message", err)).splitlines()[0][:300]
        raise UserError(f"{action} failed ({err.__class__.__name__}: {message}); check the MLflow server "
                        f"({os.environ.get('MLFLOW_TRACKING_URI', 'local store')}) and its artifact store") from err


def _error_code(err) -> str:
    return getattr(err, "error_code", "")


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [m.name for m in client.search_registered_models(max_results=20) if not m.name.endswith(LOCK_SUFFIX)]
        raise UserError(f"no registered model named {name!r} (registered: {', '.join(known) or 'none'}); "
                        f"register one with `tl register --checkpoint URI --name {name}`") from None


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"{name} has no version {version}; list them in the MLflow UI or pick another") from None


# -- register --------------------------------------------------------------------------------


def _git_commit() -> str | None:
    """The commit of the tl_core checkout doing the registering, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def lineage_tags(ckpt: dict, checkpoint_uri: str) -> dict:
    """Where a version came from: data, backbone, strategy, config, code."""
    backbone = ckpt.get("backbone") or {}
    config = ckpt.get("config") or {}
    tags = {
        "tl.checkpoint_uri": checkpoint_uri,
        "tl.checkpoint_sha256": ckpt["sha256"],
        "tl.data_hash": ckpt["data"]["hash"],
        "tl.data_uri": str(ckpt["data"].get("uri", "")),
        "tl.classes": json.dumps(ckpt["data"]["classes"]),
        "tl.architecture": ckpt["model_spec"]["name"],
        "tl.strategy": str(config.get("strategy", "")),
        "tl.backbone_uri": str(backbone.get("uri") or "none"),
        "tl.backbone_sha256": str(backbone.get("sha256") or "none"),
        "tl.config": json.dumps(config, sort_keys=True, default=str),
    }
    commit = _git_commit()
    if commit:
        tags["tl.git_commit"] = commit
    return tags


def _signature(ckpt: dict):
    """Input: raw images of any dtype, layout and size (MLflow's 'any shape' object tensor, since
    a fixed TensorSpec would refuse N x H x W, floats or other sizes). Output: one row per image."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    outputs = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"p_{name}") for name in ckpt["data"]["classes"]]
    if ckpt["data"].get("stored") == "text":  # raw strings in a `text` column
        return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema(outputs))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(object), (-1,))]), outputs=Schema(outputs))


def _input_example(ckpt: dict, data):
    """Two raw uint8 images as training saw them: from the test split when given, else blank
    (texts: two strings)."""
    import numpy as np

    if ckpt["data"].get("stored") == "text":
        import pandas as pd

        from tl_core.data.text import strings_of

        texts = strings_of(data.rows("test", np.arange(2)).arrays()[0]) if data is not None else ["a text", "another"]
        return pd.DataFrame({"text": texts})

    if data is not None:
        return data.rows("test", np.arange(2)).arrays()[0]
    return np.zeros((2, *ckpt["data"]["shape"]), dtype=np.uint8)


def _pip_requirements(ckpt: dict) -> list[str]:
    # Written out, so MLflow does not load the model in a subprocess to infer them. tl-core
    # itself must be installed where the model is served (the wrapper imports it).
    import mlflow
    import numpy
    import pandas
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}",
            "tl-core[text]" if ckpt["data"].get("stored") == "text" else "tl-core"]


def _run_of(checkpoint_uri: str) -> str | None:
    """A checkpoint logged by a tl run (`runs:/RUN_ID/...`) registers into that run."""
    if checkpoint_uri.startswith("runs:/"):
        return checkpoint_uri[len("runs:/") :].split("/")[0] or None
    return None


def _check_name(name: str) -> None:
    if not name or "/" in name or ":" in name or name.endswith(LOCK_SUFFIX):
        raise UserError(f"{name!r} cannot be a model name: it must be non-empty, without '/' or ':', "
                        f"and not end in {LOCK_SUFFIX} (the registry's lock names)")


def _waiting_version(client, name: str, sha256: str):
    """The latest version of `name` holding the checkpoint `sha256` that no promotion has judged yet, or None."""
    with _mlflow_errors(f"looking up the versions of {name}"):
        versions = client.search_model_versions(f"name='{name}'")
    waiting = [v for v in versions if v.tags.get("tl.checkpoint_sha256") == sha256 and DECISION not in v.tags]
    return max(waiting, key=lambda v: int(v.version), default=None)


def register_model(checkpoint_uri: str, name: str, data_uri: str | None = None, run_id: str | None = None) -> dict:
    """Log the checkpoint as an MLflow pyfunc model, register it as a new version of `name`
    with lineage tags, and point the alias `challenger` at it. A version of the same checkpoint
    still waiting to be judged is given back instead (`reused`): registering is safe to retry."""
    import mlflow

    _check_name(name)
    started = time.perf_counter()
    client = _client()  # the server answers, or we stop before logging anything
    ckpt = load_checkpoint(checkpoint_uri)
    require_trained(ckpt, checkpoint_uri)
    strategy = ckpt["config"]["strategy"]
    if not STRATEGIES[strategy].classifies_dataset_classes:
        raise UserError(f"{checkpoint_uri} is a {strategy} model: it does not predict its dataset's classes, and the "
                        "registry serves classifiers only; register a model trained with a classification strategy")
    existing = _waiting_version(client, name, ckpt["sha256"])
    if existing is not None:
        with _mlflow_errors(f"registering {checkpoint_uri} as {name}"):
            client.set_registered_model_alias(name, CHALLENGER, existing.version)
        return {"model": name, "version": int(existing.version), "alias": CHALLENGER, "uri": f"models:/{name}@{CHALLENGER}",
                "model_uri": existing.source, "run_id": existing.run_id, "checkpoint": checkpoint_uri,
                "tags": dict(existing.tags), "metrics": None, "reused": True, "seconds": time.perf_counter() - started}
    data = load_prepared(data_uri) if data_uri else None
    evaluation = evaluate_loaded(ckpt, data, "test", checkpoint_uri) if data else None  # also: classes fit
    tags = lineage_tags(ckpt, checkpoint_uri)
    if evaluation:
        tags.update({"tl.test_accuracy": f"{evaluation.metrics['accuracy']:.6f}", "tl.test_data_hash": data.hash})
    run_id = run_id or _run_of(checkpoint_uri)

    with tempfile.TemporaryDirectory() as folder, _mlflow_errors(f"registering {checkpoint_uri} as {name}"):
        # The checkpoint file itself, not re-serialised: its sha256 tag identifies the artifact.
        local = Path(folder, "checkpoint.pt")
        local.write_bytes(read_checkpoint_bytes(checkpoint_uri))
        run = mlflow.start_run(run_id=run_id) if run_id else tracking.run(f"register {name}", tags={"tl.step": "register"})
        with run as active:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MODEL_CODE, artifacts={"checkpoint": str(local)},
                signature=_signature(ckpt), input_example=_input_example(ckpt, data),
                pip_requirements=_pip_requirements(ckpt),
                metadata={"classes": ckpt["data"]["classes"], "trained_shape": ckpt["data"]["shape"],
                          "input": "raw strings, a `text` column" if ckpt["data"].get("stored") == "text"
                          else "raw images, uint8 or float, N x H x W or N x C x H x W, any size"},
            )
            if evaluation:
                tracking.log_metrics({f"test_{k}": v for k, v in evaluation.metrics.items()})
            # One call creates the version with its tags (and the registered model if new).
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            try:
                client.set_registered_model_alias(name, CHALLENGER, version.version)
            except Exception:
                client.delete_model_version(name, version.version)  # no version without its alias
                raise
    return {"model": name, "version": int(version.version), "alias": CHALLENGER,
            "uri": f"models:/{name}@{CHALLENGER}", "model_uri": info.model_uri, "run_id": active.info.run_id,
            "checkpoint": checkpoint_uri, "tags": tags,
            "metrics": evaluation.metrics if evaluation else None, "reused": False,
            "seconds": time.perf_counter() - started}


# -- the lock --------------------------------------------------------------------------------


@contextlib.contextmanager
def promotion_lock(client, name: str, wait_seconds: float = LOCK_WAIT_SECONDS,
                   stale_seconds: float = LOCK_STALE_SECONDS):
    """Hold `NAME.promotion-lock` (a registered model: its creation is atomic on the server)."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.create_registered_model(lock, tags={"tl.locked_at": str(time.time()), "tl.holder": holder},
                                           description=f"held while a promotion or rollback of {name} moves its aliases")
            break
        except MlflowException as err:
            if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released between our two calls: try again at once
        tags = held.tags
        age = time.time() - float(tags.get("tl.locked_at") or held.creation_timestamp / 1000)
        if age > stale_seconds:
            # Its holder died. (Two waiters can both judge it stale; the window is one call wide.)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise UserError(f"another promotion or rollback of {name} ({tags.get('tl.holder', '?')}) has held the lock "
                            f"for {age:.0f} s; retry later (a lock older than {stale_seconds:.0f} s is taken over)")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


# -- promote and rollback ----------------------------------------------------------------------


def check_gate(candidate: float, champion: float | None, min_accuracy: float, min_absolute_change: float,
               min_relative_change: float) -> tuple[bool, str]:
    """MLflow's own model validation on accuracy: the floor, then (with a champion) at least
    `champion + min_absolute_change` and `champion * (1 + min_relative_change)`. A relative change
    of 0 still means "not worse": a worse model never passes."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    threshold = MetricThreshold(
        threshold=float(min_accuracy),
        min_absolute_change=float(min_absolute_change) if champion is not None and min_absolute_change > 0 else None,
        min_relative_change=float(min_relative_change) if champion is not None else None,
        greater_is_better=True,
    )
    baseline = EvaluationResult({"accuracy": champion}, {}, run_id="") if champion is not None else None
    try:
        mlflow.validate_evaluation_results({"accuracy": threshold}, EvaluationResult({"accuracy": candidate}, {}, run_id=""),
                                           baseline)
    except ModelValidationFailedException as err:
        return False, " ".join(str(err.message).split())
    return True, "passed the floor" + (" and beat the champion" if champion is not None else " (no champion yet)")


def check_gain_over_scratch(score: float, scratch: float | None, min_gain: float) -> tuple[bool, str]:
    """The challenger must beat training the same model from scratch on the same labels by at
    least `min_gain` (default 0: a negative transfer, below scratch, never passes). No scratch
    baseline (a scratch model, or one trained with no target labels): nothing to compare with."""
    if scratch is None:
        return True, ""
    gain = score - scratch
    if gain >= min_gain:
        return True, f"gains {gain:+.4f} over scratch ({scratch:.4f}) on the same labels"
    kind = "negative transfer: " if gain < 0 else ""
    return False, (f"{kind}accuracy {score:.4f} is {gain:+.4f} over scratch ({scratch:.4f}) trained on the same labels, "
                   f"below --min-gain-over-scratch {min_gain:+.4f}")


def _check_thresholds(min_accuracy: float, min_absolute_change: float, min_relative_change: float) -> None:
    if not 0 <= min_accuracy <= 1:
        raise UserError(f"--min-accuracy must be between 0 and 1, not {min_accuracy}")
    if min_absolute_change < 0:
        raise UserError(f"--min-delta must be 0 or more (accuracy points as a fraction), not {min_absolute_change}")
    if not 0 <= min_relative_change <= 1:
        raise UserError(f"--min-relative-delta must be between 0 and 1 (0.02 = 2 % better), not {min_relative_change}")


def _test_accuracy(name: str, version: str, data) -> float:
    return _scored(name, version, data)[0]


def _scored(name: str, version: str, data) -> tuple[float, dict]:
    uri = f"models:/{name}/{version}"
    ckpt = load_checkpoint(uri)
    return evaluate_loaded(ckpt, data, "test", uri).metrics["accuracy"], ckpt


def scratch_accuracy(ckpt: dict, data) -> float | None:
    """The test accuracy, on `data`, of the scratch baseline of the checkpoint's own training: the
    same architecture trained from random init on the same labels (`TrainConfig.baseline`: the run
    `tl transfer` trained beside it, or `tl run`'s scratch row, reused from the training cache
    where its settings agree, else trained now). None where there is none: a scratch model, a
    strategy scored on other tasks, no target labels."""
    from tl_core.config import TrainConfig, validate
    from tl_core.train import train

    cfg = validate(TrainConfig, ckpt["config"])
    if cfg.strategy == "scratch" or cfg.shots == 0 or not STRATEGIES[cfg.strategy].classifies_dataset_classes:
        return None
    try:
        load_prepared(cfg.data)
    except UserError:
        raise UserError(f"the gain over scratch needs the data the model was trained on ({cfg.data}), to train its "
                        "scratch baseline on the same labels: prepare it again there, or pass "
                        "--min-gain-over-scratch=-1 to skip the comparison") from None
    baseline = train(cfg.baseline())
    return evaluate_loaded(baseline.checkpoint, data, "test", baseline.checkpoint_uri).metrics["accuracy"]


def _aliases(client, name: str) -> dict[str, str]:
    """alias -> version, as strings (a SQLite store hands the versions back as ints, a server as strings)."""
    return {alias: str(version) for alias, version in _registered_model(client, name).aliases.items()}


NO_SCRATCH_GATE = -1.0  # --min-gain-over-scratch at or below this: no comparison with scratch


def promote(name: str, data_uri: str, min_accuracy: float = 0.5, min_absolute_change: float = 0.0,
            min_relative_change: float = 0.0, version: int | None = None, min_gain_over_scratch: float = 0.0) -> dict:
    """Evaluate the challenger (or `version`) and the champion on `data_uri`'s test split; move
    `champion` to the challenger only if it passes the gate (the floor, the champion, and its
    scratch baseline on the same labels by `min_gain_over_scratch`) and the champion is still the
    one it was compared with. Decision: promoted, refused (failed the gate) or lost (another
    promotion moved the champion meanwhile)."""
    _check_thresholds(min_accuracy, min_absolute_change, min_relative_change)
    if not -1 <= min_gain_over_scratch <= 1:
        raise UserError(f"--min-gain-over-scratch must be between -1 and 1 (accuracy as a fraction; -1: no comparison "
                        f"with scratch), not {min_gain_over_scratch}")
    started = time.perf_counter()
    client = _client()
    with _mlflow_errors(f"promoting {name}"):
        aliases = _aliases(client, name)
        candidate = str(version) if version is not None else aliases.get(CHALLENGER)
        if candidate is None:
            raise UserError(f"{name} has no {CHALLENGER}: register a model first (`tl register --checkpoint URI "
                            f"--name {name}`) or name a version with --version")
        tags = _version(client, name, candidate).tags
        champion = aliases.get(CHAMPION)
        if candidate == champion and tags.get(DECISION) == "promoted":  # promoted before: say so again
            return {"model": name, "decision": "promoted", "promoted": True, "version": int(candidate),
                    "accuracy": float(tags["tl.promotion.accuracy"]), "champion_version": _or_none(tags, "champion_version"),
                    "champion_accuracy": _or_none(tags, "champion_accuracy", float),
                    "reason": f"already the {CHAMPION} (promoted at {tags.get('tl.promotion.at', '?')})",
                    "champion_now": int(candidate), "data": data_uri, "data_hash": tags.get("tl.promotion.data_hash"),
                    "seconds": time.perf_counter() - started}
        if candidate == champion:
            raise UserError(f"version {candidate} of {name} is already the {CHAMPION}; register a new model to promote")
        data = load_prepared(data_uri)
        # The slow part, outside the lock: both models on the same test split.
        score, ckpt = _scored(name, candidate, data)
        champion_score = _test_accuracy(name, champion, data) if champion else None
        passed, reason = check_gate(score, champion_score, min_accuracy, min_absolute_change, min_relative_change)
        scratch = scratch_accuracy(ckpt, data) if min_gain_over_scratch > NO_SCRATCH_GATE else None
        beats_scratch, against_scratch = check_gain_over_scratch(score, scratch, min_gain_over_scratch)
        if not beats_scratch:  # the first reason a refusal gives: no use promoting what scratch beats
            passed, reason = False, against_scratch + ("" if passed else f"; {reason}")
        elif against_scratch:
            reason = f"{reason}; {against_scratch}"

        with promotion_lock(client, name):
            current = _aliases(client, name).get(CHAMPION)  # re-read under the lock
            if current != champion:
                decision = "lost"
                reason = (f"another promotion made version {current} the {CHAMPION} while this one compared "
                          f"against {champion or 'no champion'}; promote again to compare with it")
            elif passed:
                decision = "promoted"
                # The previous champion first, so a rollback can find it the moment the alias moves.
                client.set_model_version_tag(name, candidate, PREVIOUS_CHAMPION, champion or "none")
                client.set_registered_model_alias(name, CHAMPION, candidate)
                if ROLLED_BACK in _version(client, name, candidate).tags:  # no longer true of the champion
                    client.delete_model_version_tag(name, candidate, ROLLED_BACK)
            else:
                decision = "refused"
            record = {
                DECISION: decision,
                "tl.promotion.reason": reason,
                "tl.promotion.accuracy": f"{score:.6f}",
                "tl.promotion.champion_version": champion or "none",
                "tl.promotion.champion_accuracy": "none" if champion_score is None else f"{champion_score:.6f}",
                "tl.promotion.scratch_accuracy": "none" if scratch is None else f"{scratch:.6f}",
                "tl.promotion.data_hash": data.hash,
                "tl.promotion.gate": json.dumps({"min_accuracy": min_accuracy, "min_absolute_change": min_absolute_change,
                                                 "min_relative_change": min_relative_change,
                                                 "min_gain_over_scratch": min_gain_over_scratch}),
                "tl.promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            for key, value in record.items():
                client.set_model_version_tag(name, candidate, key, value)
            # A decided challenger is no longer waiting; a lost one is (it was never judged against the winner).
            if decision != "lost" and _aliases(client, name).get(CHALLENGER) == candidate:
                client.delete_registered_model_alias(name, CHALLENGER)
    return {"model": name, "decision": decision, "promoted": decision == "promoted", "version": int(candidate),
            "accuracy": score, "champion_version": int(champion) if champion else None,
            "champion_accuracy": champion_score, "scratch_accuracy": scratch, "reason": reason,
            "champion_now": int(candidate) if decision == "promoted" else (int(current) if current else None),
            "data": data_uri, "data_hash": data.hash, "seconds": time.perf_counter() - started}


def _or_none(tags: dict, key: str, kind=int):
    value = tags.get(f"tl.promotion.{key}", "none")
    return None if value == "none" else kind(value)


def rollback(name: str) -> dict:
    """Move `champion` back to the version it replaced (repeat to walk further back)."""
    client = _client()
    with _mlflow_errors(f"rolling back {name}"):
        _registered_model(client, name)
        with promotion_lock(client, name):
            current = _aliases(client, name).get(CHAMPION)
            if current is None:
                raise UserError(f"{name} has no {CHAMPION} to roll back; promote one with `tl promote --model {name}`")
            previous = _version(client, name, current).tags.get(PREVIOUS_CHAMPION, "none")
            if previous == "none":
                raise UserError(f"version {current} was the first {CHAMPION} of {name}: there is nothing to roll back to")
            _version(client, name, previous)
            client.set_registered_model_alias(name, CHAMPION, previous)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            client.set_model_version_tag(name, current, ROLLED_BACK, f"replaced by version {previous} at {now}")
            client.set_model_version_tag(name, previous, "tl.restored", f"champion again after version {current}, at {now}")
    return {"model": name, "champion": int(previous), "rolled_back_from": int(current), "at": now}
