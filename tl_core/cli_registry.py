"""`tl register`, `tl promote`, `tl rollback`: the MLflow model registry commands (issue 5).

They talk to the tracking server in `MLFLOW_TRACKING_URI` (or the work directory's local store).
"""

from typing import Optional

import typer

from tl_core.cli_app import execute, app

AS_JSON = typer.Option(False, "--json", help="print one JSON summary as the last line")


@app.command()
def register(
    checkpoint: str = typer.Option(..., help="tl checkpoint: path, s3://, runs:/ or models:/"),
    name: str = typer.Option(..., help="registered model name"),
    data: Optional[str] = typer.Option(None, help="prepared dataset: check the model fits it, log its test metrics, "
                                                  "take the input example from it"),
    run_id: Optional[str] = typer.Option(None, help="log the model into this MLflow run (default: the checkpoint's "
                                                    "run for runs:/ URIs, else a new run)"),
    as_json: bool = AS_JSON,
):
    """Register a checkpoint as a new model version (pyfunc on raw images) with the alias `challenger`."""

    def work():
        from tl_core.registry import register_model

        return register_model(checkpoint, name, data, run_id)

    execute(work, as_json, lambda s: typer.echo(
        f"{'already registered' if s['reused'] else 'registered'} {s['model']} version {s['version']} as {s['alias']} "
        f"({s['uri']})"
        + (f"  test accuracy {s['metrics']['accuracy']:.4f}" if s["metrics"] else "")))


@app.command()
def promote(
    model: str = typer.Option(..., help="registered model name"),
    data: str = typer.Option(..., help="prepared dataset: both models are scored on its test split"),
    min_accuracy: float = typer.Option(0.5, help="absolute floor: the challenger's accuracy must reach this"),
    min_delta: float = typer.Option(0.0, help="challenger accuracy >= champion + this"),
    min_relative_delta: float = typer.Option(0.0, help="challenger accuracy >= champion * (1 + this)"),
    version: Optional[int] = typer.Option(None, help="promote this version instead of the challenger"),
    min_gain_over_scratch: float = typer.Option(
        0.0, help="challenger accuracy >= its scratch baseline (the same model from random init, trained on the same "
                  "labels) + this; the default 0 never promotes a negative transfer; -1: no comparison"),
    as_json: bool = AS_JSON,
):
    """Move `champion` to the challenger if it passes the floor, beats its scratch baseline and beats the
    champion; print the decision."""

    def work():
        from tl_core.registry import promote as promote_model

        return promote_model(model, data, min_accuracy, min_delta, min_relative_delta, version, min_gain_over_scratch)

    def show(s):
        against = (f"champion v{s['champion_version']} {s['champion_accuracy']:.4f}" if s["champion_version"]
                   else "no champion")
        typer.echo(f"{s['decision']}: {s['model']} v{s['version']} accuracy {s['accuracy']:.4f} vs {against}; "
                   f"{s['reason']}")

    execute(work, as_json, show)


@app.command()
def rollback(
    model: str = typer.Option(..., help="registered model name"),
    as_json: bool = AS_JSON,
):
    """Move `champion` back to the version it replaced."""

    def work():
        from tl_core.registry import rollback as rollback_model

        return rollback_model(model)

    execute(work, as_json, lambda s: typer.echo(
        f"rolled back {s['model']}: champion is version {s['champion']} again (was {s['rolled_back_from']})"))
