"""`tl pipeline ...`: the transfer pipeline on Kubeflow Pipelines (added to the one `tl` app
when imported). The work is in `pipelines.launch`; these commands parse flags and print."""

from typing import Optional

import typer

from tl_core.cli_app import AS_JSON, execute, app, with_settings

pipeline_app = typer.Typer(help="The transfer pipeline on Kubeflow Pipelines: compile, run locally, submit, schedule.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

HOST = typer.Option(..., help="KFP endpoint, e.g. http://localhost:8080 (a port-forward of ml-pipeline-ui)")
EXPERIMENT = typer.Option("tl", help="KFP experiment to put the run(s) in")
CACHE = typer.Option(True, "--cache/--no-cache", help="--no-cache: KFP's cache off for every step")
SERVICE_ACCOUNT = typer.Option(None, help="Kubernetes service account of the pipeline pods (default: KFP's)")


def pipeline_config(settings: dict, config: str | None):
    """The validated pipeline parameters (tl_core.config.PipelineConfig): flags over --config over
    defaults; validated inside the command, so a bad value is one `error:` line."""
    from tl_core.config import PipelineConfig, load_config

    return load_config(PipelineConfig, config, settings)


@pipeline_app.command("compile")
def compile_(output: str = typer.Option("tl-transfer-pipeline.yaml", help="YAML file to write"),
             cache: bool = CACHE, as_json: bool = AS_JSON):
    """Write the pipeline as KFP YAML; its image is TL_IMAGE (default tl-core:0.1.0)."""

    def work():
        from pipelines.launch import compile_pipeline

        return compile_pipeline(output, cache)

    execute(work, as_json, lambda s: typer.echo(f"wrote {s['output']} (pipeline {s['pipeline']}, image {s['image']})"))


@pipeline_app.command()
@with_settings("PipelineConfig")
def run(settings: dict, config: Optional[str], local: bool = typer.Option(False, "--local", help="run every step on this machine (kfp.local)"),
        root: Optional[str] = typer.Option(None, help="folder for kfp.local's outputs (default: TL_WORKDIR/kfp)"),
        runner: str = typer.Option("subprocess", help="subprocess: each step a process here; docker: each step a "
                                                      "container of --image, as a cluster runs it"),
        image: Optional[str] = typer.Option(None, help="the steps' image with --runner docker (default: TL_IMAGE, "
                                                       "else tl-core:0.1.0)"),
        as_json: bool = AS_JSON):
    """Run the whole pipeline on this machine: each step a subprocess, training in-process or on
    the Ray cluster in RAY_ADDRESS, tracking in MLFLOW_TRACKING_URI (default: TL_WORKDIR's store)."""

    def work():
        import os

        if image:  # the steps' image is read when they are defined, on the import below
            os.environ["TL_IMAGE"] = image
        from pipelines.launch import run_local
        from tl_core.errors import UserError

        if not local:
            raise UserError("`tl pipeline run` runs on this machine: add --local (to run on a KFP endpoint: "
                            "`tl pipeline submit --host URL`)")
        return run_local(pipeline_config(settings, config), root, runner, image)

    def show(s):
        if s["accuracy"] is None:  # the monitor found no drift: nothing was trained
            typer.echo(f"{s['model']}: {s['decision']}\nsteps' outputs in {s['pipeline_root']}; {s['seconds']:.0f}s")
            return
        typer.echo(f"{s['model']} version {s['version']}: test accuracy {s['accuracy']:.4f}; {s['decision']}\n"
                   f"steps' outputs in {s['pipeline_root']}; {s['seconds']:.0f}s")

    execute(work, as_json, show)


@pipeline_app.command()
@with_settings("PipelineConfig")
def submit(settings: dict, config: Optional[str], host: str = HOST, experiment: str = EXPERIMENT, cache: bool = CACHE,
           service_account: Optional[str] = SERVICE_ACCOUNT, as_json: bool = AS_JSON):
    """Send one run of the pipeline to a KFP endpoint."""

    def work():
        from pipelines.launch import submit as submit_run

        return submit_run(pipeline_config(settings, config), host, experiment, cache, service_account)

    execute(work, as_json, lambda s: typer.echo(f"submitted run {s['run_id']}: {s['url']}"))


@pipeline_app.command()
@with_settings("PipelineConfig")
def schedule(settings: dict, config: Optional[str], cron: str = typer.Option(..., help="when, in UTC: crontab '0 3 * * 1' or KFP's six fields"),
             name: str = typer.Option(..., help="the recurring run's name: scheduling the same name again updates it"),
             host: str = HOST, experiment: str = EXPERIMENT, cache: bool = CACHE,
             service_account: Optional[str] = SERVICE_ACCOUNT, as_json: bool = AS_JSON):
    """Create or update, by name, a recurring run of the pipeline (idempotent: the same settings
    change nothing; new ones replace the old recurring run without stopping a run in flight)."""

    def work():
        from pipelines.launch import schedule as schedule_run

        return schedule_run(pipeline_config(settings, config), host, name, cron, experiment, cache, service_account)

    def show(s):
        kept = [r["recurring_run_id"] for r in s["retired"] if not r["deleted"]]
        typer.echo(f"{s['action']}: {s['name']} ({s['recurring_run_id']}) runs at '{s['cron']}'"
                   + (f"; disabled, deleted by a later call once idle: {', '.join(kept)}" if kept else ""))

    execute(work, as_json, show)
