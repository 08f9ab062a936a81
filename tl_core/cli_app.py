"""The one `tl` Typer app and what its command modules share: running a step with one `error:`
line for bad input, and options generated from the settings' pydantic models.

Each setting is declared once, as a field of a config in `tl_core.config` (type, default,
constraints, description). `with_settings` turns those fields into the command's flags, with the
description as help text, so a new setting reaches the CLI, the YAML files and the pipeline
without being written again. Command modules (cli.py, cli_tune.py, cli_pipeline.py,
cli_registry.py) import this module; none imports another.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import typing
import warnings
from typing import Optional

import typer
from click.core import Context
from typer.core import TyperCommand

app = typer.Typer(help="Transfer learning on one laptop or a Ray cluster, tracked in MLflow.", no_args_is_help=False,
                  add_completion=False, pretty_exceptions_enable=False)

AS_JSON = typer.Option(False, "--json", help="print one JSON summary as the last line")
CONFIG = typer.Option(None, help="YAML file of settings (flags override it)")


def console():
    from rich.console import Console

    return Console(stderr=True)


def table_console(width: int):
    """Stdout for a result table: `width` columns when piped or logged (rich would squeeze the
    table to 80), the terminal's own width otherwise."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=width)


RAY_TRAIN_STATE_API_NOISE = "Failed to query Ray Train Controller actor state"


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it is imported
    # Against a tracking server MLflow prints two lines ("View run ...") at the end of every run:
    # 48 for the demo's `tl run`. tl prints the runs it made.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow draws a progress bar for each download of a registered model's files (register,
    # promote, predict, monitor), and Ray colours the prefix of its processes' lines: on a
    # terminal only, as tl's own epoch bar, not into a log.
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Ray Train's placement-group watcher asks a state API that a local Ray (no dashboard) does not
    # run, and says so about once a second through a --workers run. Ray reads this as it is imported.
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_TRAIN_STATE_API_NOISE)
    for name in ("alembic", "mlflow", "ray", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"


def execute(work, as_json: bool, show):
    """Run a step; print its summary (human or JSON); turn UserError, and a path the file system
    refused (a TL_WORKDIR or --output that cannot be written), into one line and exit 2."""
    from tl_core.errors import UserError, path_error

    _quiet_libraries()
    try:
        summary = work()
    except (UserError, OSError) as err:
        refused = err if isinstance(err, UserError) else path_error(err)
        if refused is None:  # an OSError of no path: a fault, not bad input
            raise
        typer.echo(f"error: {refused}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    else:
        show(summary)
    return summary


def split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# -- options from the settings' fields ----------------------------------------------------------

def _cli_type(field) -> type:
    """bool, int or float where the field is one of those (or None); text for everything else,
    which pydantic then parses (lists come comma-separated)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if extra.get("cli_type") == "text" or _is_list(field):
        return str
    kinds = [k for k in typing.get_args(field.annotation) or (field.annotation,) if k is not type(None)]
    if len(kinds) == 1 and kinds[0] in (bool, int, float):
        return kinds[0]
    return str


def _is_list(field) -> bool:
    kinds = (field.annotation, *typing.get_args(field.annotation))
    return any(k is list or typing.get_origin(k) is list for k in kinds)


def _help(field) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    text = field.description or ""
    if extra.get("strategies"):
        text = f"{', '.join(extra['strategies'])}: {text}"
    choices = [a for k in typing.get_args(field.annotation) or (field.annotation,)
               if typing.get_origin(k) is typing.Literal for a in typing.get_args(k)]
    if choices:
        text += (", " if text else "") + " | ".join(map(str, choices))
    if _is_list(field):
        text += " (comma-separated)"
    if field.is_required():  # here or in the --config file
        text += " (required)"
    return text


def _default(field) -> str | bool:
    """The default as help shows it (the option's own default is None: "not given"); none where required."""
    if field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    if default in (None, "", [], {}):
        return False
    return ",".join(map(str, default)) if isinstance(default, list) else str(default)


def settings_parameters(cls, exclude=(), argument: str | None = None) -> list[inspect.Parameter]:
    """One keyword parameter (a typer option, or the positional `argument`) per field of `cls`."""
    params = []
    for name, field in cls.model_fields.items():
        if name in exclude or typing.get_origin(field.annotation) is dict or field.annotation is dict:
            continue  # dicts (model_kwargs, a search's base and space) come from --config files only
        kind = _cli_type(field)
        if name == argument:
            default = typer.Argument(..., help=field.description)
            params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                                            default=default))
            continue
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                                        default=typer.Option(None, *decls, help=_help(field),
                                                                     show_default=_default(field))))
    return params


def with_settings(*classes, exclude=(), argument: str | None = None, config: bool = True):
    """Give a command one option per field of the config classes (a class, or the name of one in
    `tl_core.config`; a field of two classes is one option). The command gets `settings`, a dict
    of the flags given (lists split, None left out), and `config` (the --config file) unless
    config=False."""
    from tl_core import config as configs

    classes = [getattr(configs, c) if isinstance(c, str) else c for c in classes]
    fields = {}
    for cls in reversed(classes):
        fields.update(cls.model_fields)

    def decorate(command):
        extra, seen = [], set(exclude)
        for cls in classes:
            extra += settings_parameters(cls, seen, argument)
            seen |= set(cls.model_fields)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command).parameters.values()
               if p.name not in ("settings", "config")]
        if config:
            own.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                         default=CONFIG))
        names = [p.name for p in extra]
        positional = [p for p in extra if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            for param, value in zip(positional, args):
                kwargs[param.name] = value
            settings = {}
            for name in names:
                value = kwargs.pop(name)
                if value is not None:
                    settings[name] = split(value) if _is_list(fields[name]) else value
            return command(settings=settings, **kwargs)

        wrapper.__signature__ = inspect.Signature(positional + own + [p for p in extra if p not in positional])
        return wrapper

    return decorate


class StrategiesInHelp(TyperCommand):
    """Lists every registered strategy in `--strategy`'s help, and only when help is shown:
    importing the strategies imports torch, which `tl --help` should not wait for."""

    def format_help(self, ctx: Context, formatter) -> None:
        from tl_core.strategies import STRATEGIES

        for param in self.params:
            if param.name in ("strategy", "strategies") and "one of" not in (param.help or ""):
                param.help = f"{param.help}; one of: {', '.join(STRATEGIES)}"
        super().format_help(ctx, formatter)
