"""`tl tune ...` commands (added to the one `tl` app when imported)."""

from __future__ import annotations

from typing import Optional


from tl_core.cli_app import AS_JSON, StrategiesInHelp, app, console, execute, with_settings
from tl_core.tune.space import SearchConfig


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
                  f"checkpoint {s['best_checkpoint'] or 'none (keep_models: false)'}  mlflow run {s['run_id']}", highlight=False)


@app.command(cls=StrategiesInHelp)
@with_settings(SearchConfig, "SearchSettings")
def tune(settings: dict, config: Optional[str], as_json: bool = AS_JSON):
    """Search hyperparameters with Ray Tune: every trial runs the training core; ASHA stops poor ones early.
    The search starts from the transfer that `tl run` would train with --source, --target, --strategy,
    --shots... (default: a small search on the embedded digits), or from a whole `base` in --config."""

    def work():
        from tl_core.config import SearchSettings, read_config_file, validate
        from tl_core.errors import UserError
        from tl_core.steps import search_base
        from tl_core.tune import DEFAULT_SPACE, run_search

        values = read_config_file(config) | settings  # flags win
        experiment = {k: values.pop(k) for k in list(values) if k in SearchSettings.model_fields}
        base = values.get("base") or {}
        err_console = console()
        if "data" not in base:  # no base, or settings to change in the experiment's
            built = search_base(validate(SearchSettings, experiment), say=lambda m: err_console.print(f"[dim]{m}[/dim]"))
            values["base"] = {**built, **base}
            values.setdefault("space", DEFAULT_SPACE)
        elif experiment:
            raise UserError(f"{next(iter(experiment))} describes the experiment to search, but {config}'s `base` names "
                            "its own data: drop one or the other")
        cfg = validate(SearchConfig, values)

        def on_trial(event: dict) -> None:
            if event["event"] != "result":  # one line per trial, when it ends
                err_console.print(f"[dim]{_trial_line(event, list(cfg.space))}[/dim]")

        return run_search(cfg, on_trial)

    execute(work, as_json, show_search)
