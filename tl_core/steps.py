"""The pipeline's steps, one function each: the CLI, the KFP components and `tl run` call these.

    prepare  : PrepareConfig -> prepared dataset (path, hash)
    pretrain : TrainConfig (source, strategy scratch) -> checkpoint
    transfer : TrainConfig (target, a strategy, a backbone) -> checkpoint + metrics vs scratch
    evaluate : checkpoint + prepared dataset -> metrics (+ confusion matrix)
    run      : RunConfig -> all of the above, every strategy against scratch, one table

Each step is an MLflow run and returns a JSON-able summary dict.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from tl_core import storage, tracking
from tl_core.config import PrepareConfig, RunConfig, TrainConfig
from tl_core.data import load_prepared, prepare
from tl_core.evaluate import (
    Evaluation,
    evaluate_checkpoint,
    evaluate_loaded,
    negative_transfer,
    plot_confusion,
    plot_curves,
)
from tl_core.train import train

Progress = Callable[[dict], None]


def prepare_step(cfg: PrepareConfig) -> dict:
    started = time.perf_counter()
    with tracking.run(f"prepare {cfg.uri}", params=cfg.model_dump(), tags={"tl.step": "prepare"}) as active:
        data, reused = prepare(cfg)
        counts = data.manifest["counts"]
        summary = {
            "path": data.path,
            "hash": data.hash,
            "classes": data.classes,
            "shape": data.shape,
            "train_images": sum(counts["train"].values()),
            "test_images": sum(counts["test"].values()),
            "reused": reused,
        }
        tracking.log_metrics({"train_images": summary["train_images"], "test_images": summary["test_images"]})
        tracking.log_json(data.manifest, "manifest.json")
        import mlflow

        mlflow.set_tags({"tl.data_hash": data.hash, "tl.reused": str(reused).lower()})
    return {**summary, "run_id": active.info.run_id, "seconds": time.perf_counter() - started}


def _log_evaluation(ev: Evaluation, title: str) -> None:
    import mlflow

    tracking.log_metrics({f"test_{k}": v for k, v in ev.metrics.items()})
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder, "confusion_matrix.png"))
        plot_confusion(ev, path, title)
        mlflow.log_artifact(path)


def train_step(cfg: TrainConfig, step: str, on_report: Progress | None = None, force: bool = False,
               scratch_accuracy: float | None = None) -> dict:
    """Train (or reuse an identical earlier run), evaluate on the test split, log it all."""
    import mlflow

    name = f"{step} {cfg.strategy} seed={cfg.seed}" + (f" shots={cfg.shots}" if cfg.shots else "")
    tags = {"tl.step": step, "tl.strategy": cfg.strategy, "tl.backbone": cfg.backbone or ""}
    with tracking.run(name, params=cfg.model_dump(), tags=tags) as active:
        result = train(cfg, on_report=on_report, force=force)
        ckpt = result.checkpoint
        data = load_prepared(cfg.data)
        ev = evaluate_loaded(ckpt, data, "test", result.checkpoint_uri)
        tracking.log_history(ckpt["history"])
        tracking.log_metrics({k: v for k, v in ckpt["metrics"].items() if not k.startswith("test_")})
        _log_evaluation(ev, name)
        with tempfile.TemporaryDirectory() as folder:
            curves = str(Path(folder, "learning_curves.png"))
            plot_curves(ckpt["history"], curves, name)
            mlflow.log_artifact(curves)
        # A copy in MLflow, so `runs:/<run_id>/checkpoint` works as a --backbone anywhere.
        tracking.log_bytes(storage.read_bytes(result.checkpoint_uri), "checkpoint.pt", artifact_path="checkpoint")
        tracking.log_json(cfg.model_dump(), "config.json")
        summary = {
            "step": step,
            "strategy": cfg.strategy,
            "seed": cfg.seed,
            "shots": cfg.shots,
            "checkpoint": result.checkpoint_uri,
            "checkpoint_sha256": ckpt.get("sha256"),
            "metrics": ev.metrics,
            "train_seconds": ckpt["metrics"]["train_seconds"],
            "cached": result.cached,
        }
        mlflow.set_tags({"tl.data_hash": data.hash, "tl.cached": str(result.cached).lower()})
        if scratch_accuracy is not None:
            gain = ev.metrics["accuracy"] - scratch_accuracy
            negative = negative_transfer(ev.metrics["accuracy"], scratch_accuracy)
            summary.update({"scratch_accuracy": scratch_accuracy, "gain_over_scratch": gain, "negative_transfer": negative})
            tracking.log_metrics({"scratch_accuracy": scratch_accuracy, "gain_over_scratch": gain})
            mlflow.set_tag("negative_transfer", str(negative).lower())
            if negative:
                warnings.warn(
                    f"negative transfer: {cfg.strategy} scores {ev.metrics['accuracy']:.3f}, below scratch "
                    f"({scratch_accuracy:.3f}) on the same labels",
                    stacklevel=2,
                )
    return {**summary, "run_id": active.info.run_id, "seconds": result.seconds}


def pretrain_step(cfg: TrainConfig, on_report: Progress | None = None, force: bool = False) -> dict:
    return train_step(cfg, "pretrain", on_report, force)


def transfer_step(cfg: TrainConfig, on_report: Progress | None = None, force: bool = False, baseline: bool = True) -> dict:
    """Transfer with `cfg.strategy`, measured against the scratch baseline on the same labels."""
    from tl_core.strategies import STRATEGIES

    # No scratch baseline where it cannot be trained (no labels) or scores something else than
    # the strategy does (few-shot episodes, zero-shot); those report against their own baselines.
    comparable = STRATEGIES[cfg.strategy].classifies_dataset_classes and cfg.shots != 0
    if cfg.strategy == "scratch" or not baseline or not comparable:
        return train_step(cfg, "transfer", on_report, force)
    scratch = train_step(cfg.baseline(), "transfer", on_report)
    result = train_step(cfg, "transfer", on_report, force, scratch_accuracy=scratch["metrics"]["accuracy"])
    return {**result, "baseline": scratch}


def evaluate_step(model_uri: str, data_uri: str, split: str = "test") -> dict:
    started = time.perf_counter()
    with tracking.run(f"evaluate {Path(model_uri).parent.name or model_uri}", params={"model": model_uri, "data": data_uri, "split": split},
                      tags={"tl.step": "evaluate"}) as active:
        ev = evaluate_checkpoint(model_uri, data_uri, split)
        _log_evaluation(ev, f"{model_uri} on {split}")
        tracking.log_json({"classes": ev.classes, "confusion": ev.confusion.tolist()}, "confusion_matrix.json")
    return {"model": model_uri, "data": data_uri, "split": split, "metrics": ev.metrics,
            "confusion": ev.confusion.tolist(), "classes": ev.classes, "run_id": active.info.run_id,
            "seconds": time.perf_counter() - started}


def summarise(results: list[dict], strategies: list[str]) -> list[dict]:
    """One row per strategy: mean test accuracy over seeds, gain over scratch, seeds won, seconds."""
    scratch = {r["seed"]: r["metrics"]["accuracy"] for r in results if r["strategy"] == "scratch"}
    rows = []
    for strategy in ["scratch", *strategies]:
        runs = [r for r in results if r["strategy"] == strategy]
        accs = [r["metrics"]["accuracy"] for r in runs]
        gains = [r["metrics"]["accuracy"] - scratch[r["seed"]] for r in runs]
        rows.append({
            "strategy": strategy,
            "test_accuracy": statistics.mean(accs),
            "test_accuracy_std": statistics.pstdev(accs),
            "gain_over_scratch": statistics.mean(gains),
            "seeds_beating_scratch": sum(g > 0 for g in gains) if strategy != "scratch" else None,
            "seeds": len(runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "negative_transfer": strategy != "scratch" and statistics.mean(gains) < 0,
        })
    return rows


def with_teachers_first(strategies: list[str]) -> list[str]:
    """`distill` learns from the same seed's `finetune` model: make sure it is trained first."""
    if "distill" not in strategies:
        return list(strategies)
    rest = [s for s in strategies if s not in ("finetune", "distill")]
    return ["finetune", *rest, "distill"]


def strategy_inputs(strategy: str, source: dict, done: dict[str, dict]) -> dict:
    """What a strategy needs beyond the common settings inside `tl run`."""
    if strategy in ("multitask", "dann", "mcc", "simclr"):
        return {"source_data": source["path"]}
    if strategy == "distill":
        return {"teacher": done["finetune"]["checkpoint"], "use_unlabeled": True}
    return {}


def run_step(cfg: RunConfig, on_progress: Callable[[str], None] | None = None, on_report: Progress | None = None) -> dict:
    """The whole pipeline on one machine: prepare, pretrain, transfer with every strategy and
    seed against scratch, evaluate, one table."""
    say = on_progress or (lambda message: None)
    started = time.perf_counter()
    with tracking.run("tl run", params=cfg.model_dump(), tags={"tl.step": "run"}) as parent:
        say(f"preparing the target {cfg.target}")
        target = prepare_step(PrepareConfig(uri=cfg.target, image_size=cfg.image_size, channels=cfg.channels))
        say(f"preparing the source {cfg.source} at the target's shape {target['shape']}")
        source = prepare_step(PrepareConfig(uri=cfg.source, image_size=target["shape"][-1], channels=target["shape"][0]))
        say(f"pretraining {cfg.model} on the source ({source['train_images']} images, {cfg.pretrain_epochs} epochs)")
        pretrain = pretrain_step(TrainConfig(
            data=source["path"], strategy="scratch", model=cfg.model, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
            batch_size=cfg.batch_size, augment=cfg.augment, workers=cfg.workers, eval_every=5,
        ), on_report)
        strategies = with_teachers_first(cfg.strategies)
        results = []
        for seed in cfg.seeds:
            common = dict(data=target["path"], backbone=pretrain["checkpoint"], shots=cfg.shots, seed=seed,
                          epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, augment=cfg.augment,
                          workers=cfg.workers, eval_every=10, checkpoint_every=10)
            say(f"seed {seed}: scratch baseline on {cfg.shots} shots per class")
            scratch = train_step(TrainConfig(strategy="scratch", **common), "transfer", on_report)
            results.append(scratch)
            done = {"scratch": scratch}
            for strategy in strategies:
                say(f"seed {seed}: {strategy}")
                done[strategy] = train_step(TrainConfig(strategy=strategy, **common, **strategy_inputs(strategy, source, done)),
                                            "transfer", on_report, scratch_accuracy=scratch["metrics"]["accuracy"])
                results.append(done[strategy])
        table = summarise(results, strategies)
        for row in table:
            tracking.log_metrics({f"{row['strategy']}.test_accuracy": row["test_accuracy"],
                                  f"{row['strategy']}.gain_over_scratch": row["gain_over_scratch"]})
        best = max(table[1:], key=lambda r: r["test_accuracy"], default=None)
        summary = {"source": source, "target": target, "pretrain": pretrain, "table": table,
                   "best_strategy": best["strategy"] if best else None,
                   "best_beats_scratch_on_every_seed": bool(best and best["seeds_beating_scratch"] == best["seeds"]),
                   "runs": [{k: r[k] for k in ("strategy", "seed", "checkpoint", "run_id")} | {"accuracy": r["metrics"]["accuracy"]} for r in results]}
        tracking.log_json(summary, "summary.json")
    return {**summary, "run_id": parent.info.run_id, "seconds": time.perf_counter() - started}
