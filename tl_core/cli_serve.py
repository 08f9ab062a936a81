"""`tl serve NAME`: a registered model's champion over HTTP, as a Ray Serve application
(tl_core/serving.py); its flags are the fields of `tl_core.config.ServeConfig`."""

from typing import Optional

import typer

from tl_core.cli_app import AS_JSON, app, execute, with_settings


@app.command()
@with_settings("ServeConfig", argument="name")
def serve(settings: dict, config: Optional[str], as_json: bool = AS_JSON):
    """Serve models:/NAME@champion over HTTP with Ray Serve (a local Ray, or RAY_ADDRESS), batched, following
    the alias: after `tl promote` or `tl rollback` the new champion answers within seconds. POST /predict
    {"image": "<base64 PNG or JPEG>"} or {"text": "..."}; GET /healthz, GET /version. Runs until Ctrl+C."""

    def ready(s: dict) -> None:
        if as_json:
            typer.echo(json_line(s))
        else:
            typer.echo(f"serving models:/{s['model']}@{s['alias']} (version {s['version']}) at {s['predict']} on "
                       f"{'a local Ray' if s['ray'] == 'local' else 'Ray at ' + s['ray']} "
                       f"(GET {s['url']}/healthz, {s['url']}/version); Ctrl+C stops")

    def work():
        from tl_core.config import ServeConfig, load_config
        from tl_core.serving import serve_forever

        return serve_forever(load_config(ServeConfig, config, settings), on_ready=ready)

    execute(work, as_json, lambda s: typer.echo(f"stopped serving models:/{s['model']}@{s['alias']}"))


def json_line(summary: dict) -> str:
    import json

    return json.dumps(summary, default=str)
