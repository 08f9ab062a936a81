"""`tl pipeline ...`: the transfer pipeline on Kubeflow Pipelines (added to the one `tl` app
when imported). The work is in `pipelines.launch`; these commands parse flags and print."""

import functools
import inspect
from typing import Optional

import typer

from tl_core.cli import _execute, app

pipeline_app = typer.Typer(help="The transfer pipeline on Kubeflow Pipelines: compile, run locally, submit, schedule.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

AS_JSON = typer.Option(False, "--json", help="print one JSON summary as the last line")
HOST = typer.Option(..., help="KFP endpoint, e.g. http://localhost:8080 (a port-forward of ml-pipeline-ui)")
EXPERIMENT = typer.Option("tl", help="KFP experiment to put the run(s) in")
CACHE = typer.Option(True, "--cache/--no-cache", help="--no-cache: KFP's cache off for every step")
SERVICE_ACCOUNT = typer.Option(None, help="Kubernetes service account of the pipeline pods (default: KFP's)")

# The pipeline's parameters (pipelines.transfer.PipelineConfig), as flags of run, submit and
# schedule: flags override --config (YAML), which overrides the defaults.
PARAMS = {
    "source": (str, "source data URI (default fonts:digits)"),
    "target": (str, "target data URI (default sklearn:digits)"),
    "model": (str, "backbone architecture (default small_cnn)"),
    "strategy": (str, "transfer strategy (default finetune)"),
    "shots": (int, "labelled target images per class, 0 for all (default 5)"),
    "pretrain_epochs": (int, "default 15"),
    "epochs": (int, "transfer epochs (default 100)"),
    "lr": (float, "transfer learning rate (default 0.001)"),
    "workers": (int, "Ray Train workers per training run (default 1)"),
    "search_space": (str, 'HPO space as JSON, e.g. \'{"lr": {"loguniform": [1e-4, 1e-2]}}\' (default: no HPO)'),
    "num_samples": (int, "HPO trials (default 8)"),
    "min_accuracy": (float, "promote only at or above this test accuracy (default 0.5)"),
    "min_delta": (float, "... and at least this much above the champion's (default 0)"),
    "model_name": (str, "registered model name (default tl-transfer)"),
    "config": (str, "YAML file of pipeline parameters (flags override it)"),
}


def with_pipeline_params(command):
    """Give `command` the pipeline's parameters as options; it receives the validated
    PipelineConfig as `cfg`."""
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                               default=typer.Option(None, help=text)) for name, (kind, text) in PARAMS.items()]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command).parameters.values()
           if p.name != "cfg"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in PARAMS}

        def cfg():  # validated inside the command, so a bad value is one `error:` line
            from pipelines.transfer import PipelineConfig
            from tl_core.config import load_config

            return load_config(PipelineConfig, values.pop("config"), values)

        return command(cfg=cfg, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + extra)
    return wrapper


@pipeline_app.command("compile")
def compile_(output: str = typer.Option("tl-transfer-pipeline.yaml", help="YAML file to write"),
             cache: bool = CACHE, as_json: bool = AS_JSON):
    """Write the pipeline as KFP YAML; its image is TL_IMAGE (default tl-core:0.1.0)."""

    def work():
        from pipelines.launch import compile_pipeline

        return compile_pipeline(output, cache)

    _execute(work, as_json, lambda s: typer.echo(f"wrote {s['output']} (pipeline {s['pipeline']}, image {s['image']})"))


@pipeline_app.command()
@with_pipeline_params
def run(cfg, local: bool = typer.Option(False, "--local", help="run every step on this machine (kfp.local)"),
        root: Optional[str] = typer.Option(None, help="folder for kfp.local's outputs (default: TL_WORKDIR/kfp)"),
        as_json: bool = AS_JSON):
    """Run the whole pipeline on this machine: each step a subprocess, training in-process or on
    the Ray cluster in RAY_ADDRESS, tracking in MLFLOW_TRACKING_URI (default: TL_WORKDIR's store)."""

    def work():
        from pipelines.launch import run_local
        from tl_core.errors import UserError

        if not local:
            raise UserError("`tl pipeline run` runs on this machine: add --local (to run on a KFP endpoint: "
                            "`tl pipeline submit --host URL`)")
        return run_local(cfg(), root)

    def show(s):
        typer.echo(f"{s['model']} version {s['version']}: test accuracy {s['accuracy']:.4f}; {s['decision']}\n"
                   f"steps' outputs in {s['pipeline_root']}; {s['seconds']:.0f}s")

    _execute(work, as_json, show)


@pipeline_app.command()
@with_pipeline_params
def submit(cfg, host: str = HOST, experiment: str = EXPERIMENT, cache: bool = CACHE,
           service_account: Optional[str] = SERVICE_ACCOUNT, as_json: bool = AS_JSON):
    """Send one run of the pipeline to a KFP endpoint."""

    def work():
        from pipelines.launch import submit as submit_run

        return submit_run(cfg(), host, experiment, cache, service_account)

    _execute(work, as_json, lambda s: typer.echo(f"submitted run {s['run_id']}: {s['url']}"))


@pipeline_app.command()
@with_pipeline_params
def schedule(cfg, cron: str = typer.Option(..., help="when, in UTC: crontab '0 3 * * 1' or KFP's six fields"),
             name: str = typer.Option(..., help="the recurring run's name: scheduling the same name again updates it"),
             host: str = HOST, experiment: str = EXPERIMENT, cache: bool = CACHE,
             service_account: Optional[str] = SERVICE_ACCOUNT, as_json: bool = AS_JSON):
    """Create or update, by name, a recurring run of the pipeline (idempotent: the same settings
    change nothing; new ones replace the old recurring run without stopping a run in flight)."""

    def work():
        from pipelines.launch import schedule as schedule_run

        return schedule_run(cfg(), host, name, cron, experiment, cache, service_account)

    def show(s):
        kept = [r["recurring_run_id"] for r in s["retired"] if not r["deleted"]]
        typer.echo(f"{s['action']}: {s['name']} ({s['recurring_run_id']}) runs at '{s['cron']}'"
                   + (f"; disabled, deleted by a later call once idle: {', '.join(kept)}" if kept else ""))

    _execute(work, as_json, show)
