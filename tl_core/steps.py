"""The pipeline's steps, one function each: the CLI, the KFP components and `tl run` call these.

    prepare  : PrepareConfig -> prepared dataset (path, hash)
    pretrain : TrainConfig (source, strategy scratch) -> checkpoint
    transfer : TrainConfig (target, a strategy, a backbone) -> checkpoint + metrics vs scratch
    evaluate : checkpoint + prepared dataset -> metrics (+ confusion matrix)
    run      : ExperimentConfig -> all of the above, every strategy against its baseline, one table

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
from tl_core.baselines import TFIDF_LR, tfidf_logistic
from tl_core.config import AUTO, ExperimentConfig, ExperimentSettings, PrepareConfig, SearchSettings, TrainConfig
from tl_core.data import load_prepared, prepare
from tl_core.errors import UserError
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
            "text": data.text,
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
            "reused": result.reused,
        }
        mlflow.set_tags({"tl.data_hash": data.hash, "tl.reused": str(result.reused).lower()})
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


def tfidf_step(data_uri: str, shots, seed: int) -> dict:
    """The TF-IDF + logistic regression baseline on a text dataset, as an MLflow run."""
    with tracking.run(f"baseline {TFIDF_LR} seed={seed}", params={"data": data_uri, "shots": shots, "seed": seed},
                      tags={"tl.step": "baseline", "tl.strategy": TFIDF_LR}) as active:
        row = tfidf_logistic(load_prepared(data_uri), shots, seed)
        tracking.log_metrics({f"test_{k}": v for k, v in row["metrics"].items()})
    return {**row, "checkpoint": None, "run_id": active.info.run_id}


def pretrain_step(cfg: TrainConfig, on_report: Progress | None = None, force: bool = False) -> dict:
    return train_step(cfg, "pretrain", on_report, force)


def transfer_step(cfg: TrainConfig, on_report: Progress | None = None, force: bool = False, baseline: bool = True,
                  recipes: dict[str, dict] | None = None) -> dict:
    """Transfer with `cfg.strategy`, measured against the scratch baseline on the same labels; a
    setting `cfg` was not given (a flag of `tl transfer`, a key of its file) is the model's recipe's
    for the strategy (`TrainConfig.with_recipe`), as `tl run` trains it.
    `recipes`: auto's candidates' (ExperimentSettings.recipe; None: the model's defaults)."""
    from tl_core.config import AUTO
    from tl_core.strategies import STRATEGIES

    if cfg.backbone == AUTO:  # the backbone `tl rank` puts first on these shots, the ranking kept with the run
        from tl_core.rank import with_ranked_backbone

        return with_ranked_backbone(cfg, lambda chosen: transfer_step(chosen, on_report, force, baseline, recipes))
    if cfg.strategy == AUTO:  # a strategy chosen by validation on the labels, then trained (tl_core/auto.py)
        from tl_core.auto import auto_step

        return auto_step(cfg, recipes, on_report, force, baseline)

    cfg = cfg.with_recipe()
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


def summarise(results: list[dict], strategies: list[str], baseline: str = "scratch") -> list[dict]:
    """One row per strategy: mean test accuracy over seeds, gain over the baseline (scratch on the
    same labels; with no labels, the source model as it is), seeds won, seconds."""
    reference = {r["seed"]: r["metrics"]["accuracy"] for r in results if r["strategy"] == baseline}
    rows = []
    for strategy in [baseline, *strategies]:
        runs = [r for r in results if r["strategy"] == strategy]
        accs = [r["metrics"]["accuracy"] for r in runs]
        gains = [r["metrics"]["accuracy"] - reference[r["seed"]] for r in runs]
        rows.append({
            "strategy": strategy,
            "test_accuracy": statistics.mean(accs),
            "test_accuracy_std": statistics.pstdev(accs),
            "gain_over_scratch": statistics.mean(gains),
            "seeds_beating_scratch": sum(g > 0 for g in gains) if strategy != baseline else None,
            "seeds": len(runs),
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "negative_transfer": strategy != baseline and statistics.mean(gains) < 0,
        })
    return rows


def with_teachers_first(strategies: list[str]) -> list[str]:
    """`distill` learns from the same seed's `finetune` model: make sure it is trained first."""
    if "distill" not in strategies:
        return list(strategies)
    rest = [s for s in strategies if s not in ("finetune", "distill")]
    return ["finetune", *rest, "distill"]


SOURCE_ONLY = "source-only"


def source_only(backbone: str, source: dict, target: dict, seeds: list[int]) -> list[dict]:
    """The baseline with no target labels: the source model applied to the target as it is (one
    evaluation, the same for every seed)."""
    if source["classes"] != target["classes"]:
        raise UserError(f"with shots 0 the source needs the target's classes ({', '.join(target['classes'])}), not "
                        f"{', '.join(source['classes'])}: without labels the model keeps the source's classifier")
    ev = evaluate_step(backbone, target["path"])
    return [{"strategy": SOURCE_ONLY, "seed": seed, "metrics": ev["metrics"], "train_seconds": 0.0,
             "checkpoint": backbone, "run_id": ev["run_id"]} for seed in seeds]


def prepare_source(settings: ExperimentSettings, target: dict) -> dict:
    """The source at the target's shape (`target`: prepare_step's summary); a packaged encoder
    (`--model minilm-l6`) is its own source: nothing is prepared, and the summary says so."""
    packaged = settings.packaged_backbone()
    if packaged:
        return {"path": packaged, "packaged": True}
    if target.get("text"):
        raise UserError(f"the target is text, and {settings.model} cannot be pretrained on a source of images for it: "
                        "pass --model minilm-l6 (the packaged encoder is the source)")
    return prepare_step(settings.source_prepare(target["shape"]))


def pretrain_source(settings: ExperimentSettings, source: dict, on_report: Progress | None = None) -> dict:
    """The backbone pretrained on the prepared source; a packaged encoder is pretrained already."""
    if source.get("packaged"):
        return {"checkpoint": source["path"], "metrics": None}
    return pretrain_step(settings.pretrain(source["path"]), on_report)


def prepare_and_pretrain(settings: ExperimentSettings, say: Callable[[str], None] = print,
                         on_report: Progress | None = None) -> tuple[dict, dict, dict]:
    """The target, the source at the target's shape, and the backbone pretrained on the source:
    the first steps of `tl run` and of `tl tune` without a base config, the pipeline's first
    three steps."""
    say(f"preparing the target {settings.target}")
    target = prepare_step(settings.target_prepare())
    packaged = settings.packaged_backbone()
    say(f"the source is the pretrained encoder {packaged}: no source data, no pretraining" if packaged else
        f"preparing the source {settings.source} at the target's shape {target['shape']}")
    source = prepare_source(settings, target)
    if not packaged:
        say(f"pretraining {settings.model} on the source ({source['train_images']} images, "
            f"{settings.pretrain_epochs} epochs)")
    return target, source, pretrain_source(settings, source, on_report)


def search_base(settings: SearchSettings, say: Callable[[str], None] = print) -> dict:
    """The transfer that `tl tune` searches around when its file gives no base: the one `tl run`
    (or the pipeline) would train with these settings, validated after every epoch."""
    target, source, pretrain = prepare_and_pretrain(settings, say)
    return settings.search_base(target["path"], pretrain["checkpoint"], settings.strategy, source["path"])


def run_step(cfg: ExperimentConfig, on_progress: Callable[[str], None] | None = None,
             on_report: Progress | None = None) -> dict:
    """The whole experiment on one machine: prepare, pretrain, transfer with every strategy and
    seed against the baseline, evaluate, one table. The configs come from `cfg`'s methods, the
    ones the pipeline's components call, so both reuse each other's datasets and checkpoints."""
    say = on_progress or (lambda message: None)
    started = time.perf_counter()
    with tracking.run("tl run", params=cfg.model_dump(), tags={"tl.step": "run"}) as parent:
        ranking = None
        if cfg.backbone == AUTO:  # no pretraining: the candidate `tl rank` puts first (tl_core/rank.py)
            from tl_core.rank import ranked_source

            target, source, pretrain, ranking = ranked_source(
                cfg, say, lambda: prepare_step(cfg.target_prepare()))
        else:
            target, source, pretrain = prepare_and_pretrain(cfg, say, on_report)
        strategies = with_teachers_first(cfg.strategies)
        labels = cfg.shots != 0
        baseline = "scratch" if labels else SOURCE_ONLY
        if not labels and source.get("packaged"):
            raise UserError("with shots 0 tl run compares with the source model, and a packaged encoder has no "
                            "classifier of the target's classes: use tl transfer --strategy zero-shot")
        results = [] if labels else source_only(pretrain["checkpoint"], source, target, cfg.seeds)
        text = load_prepared(target["path"]).text
        classic = [TFIDF_LR] if text and labels else []  # the practitioner's baseline, on the same labels
        # a packaged encoder's is no data: the strategies that read data drop it; a ranked candidate has none
        source_data = None if ranking else source["path"]
        choices, recipes = {}, None
        if AUTO in strategies:  # every seed's choice in one search (auto.choose_each), refitted below
            from tl_core.auto import auto_step, choose_each

            autos = [cfg.transfer(target["path"], pretrain["checkpoint"], AUTO, seed, source_data=source_data)
                     for seed in cfg.seeds]
            recipes = cfg.candidate_recipes(autos[0])  # the same for every seed
            choices = dict(zip(cfg.seeds, choose_each(autos, recipes, say)))
        for seed in cfg.seeds:
            done = {}
            if labels:
                say(f"seed {seed}: scratch baseline on {cfg.shots or 'all'} shots per class")
                done["scratch"] = train_step(cfg.transfer(target["path"], pretrain["checkpoint"], "scratch", seed),
                                             "transfer", on_report)
                results.append(done["scratch"])
            if classic:
                say(f"seed {seed}: {TFIDF_LR} on the same labels")
                results.append(tfidf_step(target["path"], cfg.shots, seed))
            reference = next(r for r in results if r["strategy"] == baseline and r["seed"] == seed)
            for strategy in strategies:
                say(f"seed {seed}: {strategy}")
                teacher = done.get("finetune", {}).get("checkpoint")
                run_cfg = cfg.transfer(target["path"], pretrain["checkpoint"], strategy, seed,
                                       source_data=source_data, teacher=teacher)
                if strategy == AUTO:  # the seed's choice (above), refitted on all its labels
                    done[strategy] = auto_step(run_cfg, recipes, on_report, say=say,
                                               scratch_accuracy=reference["metrics"]["accuracy"],
                                               choice=choices[seed])
                else:
                    done[strategy] = train_step(run_cfg, "transfer", on_report,
                                                scratch_accuracy=reference["metrics"]["accuracy"])
                results.append(done[strategy])
        table = summarise(results, [*classic, *strategies], baseline)
        for row in table:
            tracking.log_metrics({f"{row['strategy']}.test_accuracy": row["test_accuracy"],
                                  f"{row['strategy']}.gain_over_scratch": row["gain_over_scratch"]})
        transfers = [row for row in table if row["strategy"] in strategies]  # not the baselines
        best = max(transfers, key=lambda r: r["test_accuracy"], default=None)
        summary = {"source": source, "target": target, "pretrain": pretrain, "table": table, "baseline": baseline,
                   "best_strategy": best["strategy"] if best else None,
                   "best_beats_scratch_on_every_seed": bool(best and best["seeds_beating_scratch"] == best["seeds"]),
                   "auto": [{"seed": r["seed"], **{k: r["auto"][k] for k in ("choice", "reason", "fallback", "candidates")}}
                            for r in results if r["strategy"] == AUTO],
                   "runs": [{k: r[k] for k in ("strategy", "seed", "checkpoint", "run_id")} | {"accuracy": r["metrics"]["accuracy"]} for r in results],
                   **({"rank": ranking} if ranking else {})}
        tracking.log_json(summary, "summary.json")
    return {**summary, "run_id": parent.info.run_id, "seconds": time.perf_counter() - started}
