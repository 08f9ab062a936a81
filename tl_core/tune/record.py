"""A finished search in MLflow: one parent run, one child run per trial, logged from the driver
after the search from Tune's results (trial processes never talk to MLflow)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tl_core import tracking

STYLE = {"completed": "-", "stopped": "--", "failed": ":"}


def plot_trials(trials: list, metric: str, path: str, title: str = "", best_id: str | None = None) -> None:
    """The metric against the epoch for every trial: completed solid, stopped early dashed,
    failed dotted, the best one thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for trial in trials:
        points = [(h["epoch"] + 1, h[metric]) for h in trial.history if metric in h]
        if points:  # a trial that reported only its end (epoch_reports off) is a point
            ax.plot(*zip(*points), STYLE[trial.status], lw=0.9, alpha=0.8, marker="o" if len(points) == 1 else None)
    for status, style in STYLE.items():  # one legend entry per status, not per trial
        count = sum(t.status == status for t in trials)
        if count:
            ax.plot([], [], style, color="grey", label=f"{status} ({count})")
    for trial in trials:
        if trial.trial_id == best_id:
            points = [(h["epoch"] + 1, h[metric]) for h in trial.history if metric in h]
            ax.plot(*zip(*points), "-", color="black", lw=2.2, label="best", marker="o" if len(points) == 1 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def record_search(cfg, summary: dict, trials: list, best_yaml: str, checkpoint: bytes | None) -> str:
    """Log the search; returns the parent run's id. `checkpoint`: the best trial's model (None: the
    search kept none, SearchConfig.keep_models)."""
    import mlflow

    name = summary["name"]
    tags = {"tl.step": "tune", "tl.search": cfg.search, "tl.scheduler": summary["scheduler"], "tl.storage": summary["storage"]}
    with tracking.run(f"tune {name}", params=cfg.model_dump(exclude={"resume"}), tags=tags) as parent:
        for trial in trials:
            child_tags = {"tl.step": "tune-trial", "tl.trial_id": trial.trial_id, "tl.trial_status": trial.status,
                          "tl.best": str(trial.trial_id == summary["best_trial"]).lower()}
            if trial.error:
                child_tags["tl.error"] = trial.error[:5000]
            with tracking.run(f"trial {trial.trial_id}", params=trial.config, tags=child_tags):
                if trial.history:
                    tracking.log_history(trial.history)  # the curve: one point per epoch
                # The final test metrics (val_* are already in the curve's last point).
                tracking.log_metrics({"epochs": trial.epochs, **{k: v for k, v in trial.metrics.items()
                                                                  if k.startswith("test_")}})
        totals = ("best_val_accuracy", f"best_{cfg.metric}", "best_test_accuracy", "trials_completed", "trials_stopped",
                  "trials_failed", "trial_epochs_total", "seconds")
        tracking.log_metrics({k: summary[k] for k in totals if summary.get(k) is not None})
        mlflow.set_tag("tl.best_trial", summary["best_trial"])
        tracking.log_bytes(best_yaml.encode(), "best.yaml")
        if checkpoint is not None:
            tracking.log_bytes(checkpoint, "checkpoint.pt", artifact_path="checkpoint")
        with tempfile.TemporaryDirectory() as folder:
            plot = str(Path(folder, "trials.png"))
            plot_trials(trials, cfg.metric, plot, f"{name}: {cfg.search} search, {summary['scheduler']}",
                        best_id=summary["best_trial"])
            mlflow.log_artifact(plot)
        tracking.log_json(summary, "search.json")
    return parent.info.run_id
