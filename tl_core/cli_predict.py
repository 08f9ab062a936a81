"""`tl predict` (batch inference on Ray Data, tl_core/batch.py) and `tl monitor` (drift on the
model's embeddings, tl_core/monitor.py); added to the one `tl` app when imported. Their flags are
the fields of PredictConfig and MonitorConfig (tl_core/config.py)."""

from __future__ import annotations

from typing import Optional

import typer

from tl_core.cli_app import AS_JSON, app, console, execute, with_settings


@app.command()
@with_settings("PredictConfig")
def predict(settings: dict, config: Optional[str], as_json: bool = AS_JSON):
    """Predict every image (or text) of a dataset with a model, on Ray Data (an actor pool), into Parquet:
    id, label, predicted class, probabilities, model version. A rerun keeps the parts already written."""

    def work():
        from tl_core.batch import predict as run_predict
        from tl_core.config import PredictConfig, load_config

        err = console()
        return run_predict(load_config(PredictConfig, config, settings),
                           say=lambda message: err.print(f"[dim]{message}[/dim]", highlight=False))

    def show(s):
        accuracy = f"  accuracy {s['accuracy']:.4f}" if s["accuracy"] is not None else ""
        speed = f"  {s['images_per_s']:.0f} images/s" if s["images_per_s"] else ""
        typer.echo(f"predicted {s['rows']} rows with {s['model']} (version {s['model_version']}) into {s['output']}: "
                   f"{s['parts_predicted']} part(s) predicted, {s['parts_kept']} kept{speed}{accuracy}")
        for note in (s["why_redone"], s["foreign_parts"]):
            if note:
                typer.echo(note)

    execute(work, as_json, show)


@app.command()
@with_settings("MonitorConfig")
def monitor(settings: dict, config: Optional[str], as_json: bool = AS_JSON):
    """Drift of new data from the reference (default: the model's training data) on the model's own
    embeddings: MMD with a permutation p-value, the shift in mean confidence and in the predicted class
    mix; logged to MLflow against the model version. Exit 0: no drift; 1: drift; 2: bad input."""

    def work():
        from tl_core.config import MonitorConfig, load_config
        from tl_core.monitor import monitor as run_monitor

        return run_monitor(load_config(MonitorConfig, config, settings))

    summary = execute(work, as_json, lambda s: typer.echo(s["decision"]))
    if summary["drift"]:
        raise typer.Exit(1)
