"""Drift (`tl monitor`): how far new data has moved from the data the model was trained on,
measured on the model's own embeddings.

    statistic : MMD^2 (maximum mean discrepancy, the unbiased estimator of Gretton et al. 2012)
                between the backbone's features of `sample_size` images drawn at random from each
                side, with a Gaussian kernel whose bandwidth is the median distance of the pooled
                sample (the median heuristic)
    p-value   : the share of `permutations` random relabellings of the pooled sample whose MMD^2
                is at least the observed one ((1 + count) / (1 + permutations)): no distributional
                assumption; a reviewer can recompute it from the logged embeddings' sample seed
    decision  : drift when p < alpha (default 0.01)
    beside it : the model's mean confidence on each side and its shift, the predicted class mix on
                each side and the total variation distance between the two mixes

Each side is a prepared dataset or any source `tl prepare` reads (prepared at the model's size),
one split or both; the reference defaults to the data the model was trained on. Only the drawn
rows are read (the shards holding them, one at a time), so memory does not grow with the data.
The result is an MLflow run tagged with the model and its version (`tl.model_version`), its
metrics also logged to the registered version's logged model, and the version's tag
`tl.monitor.last` holds the latest decision.
"""

from __future__ import annotations

import json
import time

import numpy as np

from tl_core import tracking
from tl_core.batch import model_input, resolve_data, resolve_model
from tl_core.config import MonitorConfig
from tl_core.errors import UserError

EMBED_BATCH = 512


def sample_rows(data, split: str, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{split: sorted row indices}: `size` rows drawn without replacement from the chosen split(s)."""
    splits = ("train", "test") if split == "all" else (split,)
    counts = {s: sum(e["rows"] for e in data.manifest["shards"][s]) for s in splits}
    total = sum(counts.values())
    if total < 2:
        raise UserError(f"{data.path} has {total} row(s) in {split}: a drift test needs at least 2 a side; give more data")
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    out, offset = {}, 0
    for s in splits:
        mine = chosen[(chosen >= offset) & (chosen < offset + counts[s])] - offset
        if len(mine):
            out[s] = mine
        offset += counts[s]
    return out


def embed(model, ckpt: dict, data, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(features, class probabilities) of the model on the rows, a shard at a time."""
    import torch

    from tl_core.data.shards import read_shard, rows_of

    features, probs = [], []
    with torch.inference_mode():
        for split, wanted in rows.items():
            for entry in data.rows(split, wanted).shards():
                images, _, _ = rows_of(read_shard(data.path, entry), wanted)
                for start in range(0, len(images), EMBED_BATCH):
                    x = model_input(images[start:start + EMBED_BATCH], data.manifest, ckpt["data"])
                    f = model.features(x)
                    features.append(f.float().flatten(1).numpy())
                    probs.append(torch.softmax(model.head(f).float(), dim=1).numpy())
    return np.concatenate(features).astype(np.float64), np.concatenate(probs)


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator) -> dict:
    """MMD^2 (unbiased) between samples x and y with a Gaussian kernel of median-heuristic
    bandwidth, and its permutation p-value."""
    z = np.concatenate([x, y])
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
    n = len(z)
    upper = d2[np.triu_indices(n, k=1)]
    median = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    k = np.exp(-d2 / median)  # bandwidth: 2 sigma^2 = the median squared distance
    np.fill_diagonal(k, 0.0)
    m = len(x)
    total = k.sum()

    def mmd2(masks: np.ndarray) -> np.ndarray:
        """MMD^2 of each column of `masks` (n x P, 1 for the rows taken as the first sample): the
        kernel sums within and across the two samples, one matrix product for every column."""
        ka = k @ masks
        within_a = np.einsum("ip,ip->p", masks, ka)
        across = ka.sum(axis=0) - within_a
        within_b = total - within_a - 2 * across
        na, nb = m, n - m
        return within_a / (na * (na - 1)) + within_b / (nb * (nb - 1)) - 2 * across / (na * nb)

    first = np.zeros(n)
    first[:m] = 1.0
    observed = float(mmd2(first[:, None])[0])
    at_least = 0
    for start in range(0, permutations, 100):  # 100 relabellings at a time
        masks = np.stack([rng.permutation(first) for _ in range(min(100, permutations - start))], axis=1)
        at_least += int(np.sum(mmd2(masks) >= observed))
    return {"mmd2": observed, "p_value": (1 + at_least) / (1 + permutations), "bandwidth_sq": median,
            "permutations": permutations}


def class_mix(probs: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(probs.argmax(axis=1), minlength=k) / max(len(probs), 1)


def monitor(cfg: MonitorConfig) -> dict:
    """The drift test and its neighbours (see the module); logged to MLflow against the model."""
    from tl_core.checkpoints import load_state
    from tl_core.models import build_from_spec

    started = time.perf_counter()
    ckpt, model_info = resolve_model(cfg.model)
    reference_uri = cfg.reference or ckpt["config"].get("data")
    if not reference_uri:
        raise UserError(f"{cfg.model} does not name the data it was trained on: pass --reference")
    try:
        reference = resolve_data(reference_uri, ckpt, cfg.text_column, cfg.label_column, cfg.header)
    except UserError as err:
        if cfg.reference:
            raise
        raise UserError(f"the data {cfg.model} was trained on cannot be read here ({err}): pass --reference") from None
    data = resolve_data(cfg.data, ckpt, cfg.text_column, cfg.label_column, cfg.header)
    model = build_from_spec(ckpt["model_spec"])
    load_state(model, ckpt["model"], cfg.model)
    model.eval()
    rng = np.random.default_rng(cfg.seed)
    ref_rows = sample_rows(reference, cfg.reference_split, cfg.sample_size, rng)
    new_rows = sample_rows(data, cfg.data_split, cfg.sample_size, rng)
    ref_f, ref_p = embed(model, ckpt, reference, ref_rows)
    new_f, new_p = embed(model, ckpt, data, new_rows)
    test = mmd_permutation_test(ref_f, new_f, cfg.permutations, rng)
    classes = list(ckpt["data"]["classes"])
    ref_mix, new_mix = class_mix(ref_p, len(classes)), class_mix(new_p, len(classes))
    drift = test["p_value"] < cfg.alpha
    summary = {
        "model": model_info["uri"], "model_version": model_info["model_version"], "model_sha256": model_info["sha256"],
        "reference": reference.path, "reference_split": cfg.reference_split, "data": data.path,
        "data_split": cfg.data_split, "data_hash": data.hash, "reference_hash": reference.hash,
        "reference_images": len(ref_f), "data_images": len(new_f), "embedding_dim": int(ref_f.shape[1]),
        **test, "alpha": cfg.alpha, "drift": bool(drift),
        "mean_confidence_reference": float(ref_p.max(axis=1).mean()),
        "mean_confidence_data": float(new_p.max(axis=1).mean()),
        "class_mix_reference": dict(zip(classes, map(float, ref_mix))),
        "class_mix_data": dict(zip(classes, map(float, new_mix))),
        "class_mix_tvd": float(0.5 * np.abs(ref_mix - new_mix).sum()),
    }
    summary["confidence_shift"] = summary["mean_confidence_data"] - summary["mean_confidence_reference"]
    summary["decision"] = (
        f"drift: MMD^2 {test['mmd2']:.4f}, p {test['p_value']:.4f} < alpha {cfg.alpha} on the model's embeddings "
        if drift else
        f"no drift: MMD^2 {test['mmd2']:.4f}, p {test['p_value']:.4f} >= alpha {cfg.alpha} on the model's embeddings ")
    summary["decision"] += (f"({len(ref_f)} reference vs {len(new_f)} new images); mean confidence "
                            f"{summary['mean_confidence_reference']:.3f} -> {summary['mean_confidence_data']:.3f}, "
                            f"class mix moved {summary['class_mix_tvd']:.3f} (total variation)")
    metrics = {k: summary[k] for k in ("mmd2", "p_value", "mean_confidence_reference", "mean_confidence_data",
                                      "confidence_shift", "class_mix_tvd")}
    metrics["drift"] = float(drift)
    run_id, logged_model = _log(cfg, model_info, summary, metrics)
    return {**summary, "run_id": run_id, "logged_model_id": logged_model, "seconds": time.perf_counter() - started}


def _log(cfg: MonitorConfig, model_info: dict, summary: dict, metrics: dict) -> tuple[str, str | None]:
    """An MLflow run tagged with the model version; for a registered version, its metrics also on
    the version's logged model and its decision in the version's tag `tl.monitor.last`. Returns
    the run's id and the logged model's (None: no registered version)."""
    import mlflow

    tags = {"tl.step": "monitor", "tl.model_uri": model_info["uri"], "tl.model_version": model_info["model_version"],
            "tl.data_hash": summary["data_hash"], "tl.drift": str(summary["drift"]).lower()}
    if model_info["name"]:
        tags["tl.model_name"] = model_info["name"]
    model_id = None
    with tracking.run(f"monitor {model_info['model_version']}", params=cfg.model_dump(), tags=tags) as active:
        tracking.log_metrics(metrics)
        tracking.log_json(summary, "monitor.json")
        if model_info["name"]:
            client = mlflow.MlflowClient()
            version = client.get_model_version(model_info["name"], str(model_info["version"]))
            model_id = getattr(version, "model_id", None) or (  # a SQLite store leaves it in the source
                version.source[len("models:/"):] if str(version.source).startswith("models:/m-") else None)
            if model_id:  # MLflow 3: metrics of a logged model, shown on the version's page
                mlflow.log_metrics({f"monitor.{k}": v for k, v in metrics.items()}, model_id=model_id)
            client.set_model_version_tag(model_info["name"], str(model_info["version"]), "tl.monitor.last", json.dumps(
                {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "drift": summary["drift"],
                 "p_value": summary["p_value"], "mmd2": summary["mmd2"], "data_hash": summary["data_hash"],
                 "run_id": active.info.run_id}))
    return active.info.run_id, model_id if model_info["name"] else None


# -- the retraining loop (the pipeline's first step, components/monitor.py) ----------------------

NO_DRIFT = "no-drift"  # the one decision after which the scheduled pipeline trains nothing


def retraining_decision(model_name: str, data: str, force: bool = False, text_column: str | None = None,
                        label_column: str | None = None, header: bool = True) -> dict:
    """Whether the scheduled pipeline retrains: the monitor of `models:/NAME@champion` on the
    newest data (what `data` holds now) against the data the champion was trained on.
    decision: "drift", "forced" (no drift, but `force`), "no-champion" (nothing to compare with:
    train the first one) or "no-drift" (train nothing)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tl_core.registry import CHAMPION

    tracking.setup()
    try:
        champion = MlflowClient().get_registered_model(model_name).aliases.get(CHAMPION)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"cannot read the registered model {model_name} ({err.__class__.__name__}: "
                            f"{str(err)[:200]}); check the MLflow server") from err
        champion = None
    if champion is None:
        return {"decision": "no-champion", "retrain": True, "monitor": None,
                "reason": f"{model_name} has no {CHAMPION} yet: nothing to measure drift against, training the first one"}
    result = monitor(MonitorConfig(model=f"models:/{model_name}@{CHAMPION}", data=data, text_column=text_column,
                                   label_column=label_column, header=header))
    decision = "drift" if result["drift"] else "forced" if force else NO_DRIFT
    reason = result["decision"] + {"drift": "; retraining", "forced": "; retraining anyway (forced)",
                                   NO_DRIFT: "; nothing retrained"}[decision]
    return {"decision": decision, "retrain": decision != NO_DRIFT, "monitor": result, "reason": reason}
