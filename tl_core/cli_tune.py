"""`tl tune ...` commands (added to the one `tl` app when imported)."""

from __future__ import annotations

from typing import Optional

import typer

from tl_core.cli import _console, _execute, app


def _trial_line(event: dict, searched: list[str]) -> str:
    params = " ".join(f"{name}={event['config'].get(name)}" for name in searched)
    acc = event["metrics"].get("val_accuracy")
    outcome = "failed" if event["event"] == "error" else f"ended after {event['epochs']} epochs"
    return f"trial {event['trial_id']} {params}: {outcome}" + (f", val accuracy {acc:.3f}" if acc is not None else "")


def show_search(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"search {s['name']} ({s['search']}, {s['scheduler']})", title_style="dim")
    for col in ("trial", "params", "status", "epochs", "val acc"):
        table.add_column(col, no_wrap=True)
    for t in s["trials"]:
        best = t["trial_id"] == s["best_trial"]
        acc = "—" if t["val_accuracy"] is None else f"{t['val_accuracy']:.3f}"
        table.add_row(t["trial_id"] + (" [green]best[/green]" if best else ""),
                      " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()),
                      t["status"], str(t["epochs"]), acc)
    console = Console()
    console.print(table)
    for t in s["trials"]:
        if t["error"]:
            console.print(f"trial {t['trial_id']} failed: {t['error']}", highlight=False)
    console.print(f"best {s['metric']} {s['best_' + s['metric']]:.4f} (test accuracy {s['best_test_accuracy']:.4f}); "
                  f"{s['trial_epochs_total']} trial-epochs in {s['seconds']:.0f}s\n"
                  f"best config {s['best_config_file']}  (tl transfer --config {s['best_config_file']})\n"
                  f"checkpoint {s['best_checkpoint']}  mlflow run {s['run_id']}", highlight=False)


@app.command()
def tune(
    config: str = typer.Option(..., help="YAML: base (a TrainConfig), space, search, scheduler, ... (see examples/)"),
    resume: bool = typer.Option(False, "--resume", help="finish an interrupted search; finished trials are kept"),
    num_samples: Optional[int] = typer.Option(None, help="trials to draw (random, optuna)"),
    scheduler: Optional[str] = typer.Option(None, help="asha (stops poor trials early) or fifo"),
    search: Optional[str] = typer.Option(None, help="random, grid or optuna"),
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once (default 2)"),
    name: Optional[str] = typer.Option(None, help="the search's name (default: strategy and a hash of the search)"),
    storage: Optional[str] = typer.Option(None, help="folder or s3:// for Ray Tune's state (default $TL_WORKDIR/tune)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary as the last line"),
):
    """Search hyperparameters with Ray Tune: every trial runs the training core; ASHA stops poor ones early."""

    def work():
        from tl_core.config import load_config
        from tl_core.tune import SearchConfig, run_search

        cfg = load_config(SearchConfig, config, dict(
            resume=resume or None, num_samples=num_samples, scheduler=scheduler, search=search,
            max_concurrent_trials=max_concurrent, name=name, storage=storage))
        console = _console()

        def on_trial(event: dict) -> None:
            if event["event"] != "result":  # one line per trial, when it ends
                console.print(f"[dim]{_trial_line(event, list(cfg.space))}[/dim]")

        return run_search(cfg, on_trial)

    _execute(work, as_json, show_search)
