"""The `tl` command line: one subcommand per pipeline step, plus `tl run` for all of them.

Every subcommand takes `--config FILE` (YAML; flags override it) and `--json` (the last stdout
line is then one JSON object: paths, run ids, metrics, seconds). Bad input prints one line
`error: ...` and exits with code 2. Heavy imports (torch, mlflow, ray) happen inside the
commands so `tl --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Optional

import typer

app = typer.Typer(help="Transfer learning on one laptop or a Ray cluster, tracked in MLflow.", no_args_is_help=False,
                  add_completion=False, pretty_exceptions_enable=False)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it is imported
    for name in ("alembic", "mlflow", "ray", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"


def _execute(work, as_json: bool, show):
    """Run a step; print its summary (human or JSON); turn UserError into one line and exit 2."""
    from tl_core.errors import UserError

    _quiet_libraries()
    try:
        summary = work()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    else:
        show(summary)
    return summary


def _epoch_progress(total: int | None, label: str):
    """A callback that draws a progress bar over epochs from the training core's reports."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=_console(), transient=True)
    task = progress.add_task(label, total=total, info="")

    def on_report(metrics: dict) -> None:
        if not progress.live.is_started:
            progress.start()
        acc = next((f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith("_accuracy")), "")
        progress.update(task, completed=metrics.get("epoch", 0) + 1, info=f"loss {metrics.get('train_loss', 0):.3f} {acc}")
        if total and metrics.get("epoch", 0) + 1 >= total:
            progress.stop()

    return on_report


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@app.command()
def prepare(
    uri: str = typer.Argument(..., help="sklearn:digits, fonts:digits, idx:DIR, npz:FILE, imagefolder:DIR|s3://..., "
                                         "torchvision:NAME, omniglot:ZIP"),
    classes: Optional[str] = typer.Option(None, help="keep these classes, comma-separated names or ids"),
    image_size: Optional[int] = typer.Option(None, help="resize to SIZE x SIZE"),
    channels: Optional[int] = typer.Option(None, help="1 (grey) or 3 (RGB)"),
    test_fraction: Optional[float] = typer.Option(None, help="held-out share when the source has no test split"),
    test_split: Optional[str] = typer.Option(None, help="images (default) or classes: hold out whole classes for "
                                                         "few-shot episodes on unseen classes"),
    max_per_class: Optional[int] = typer.Option(None, help="cap training images per class"),
    seed: Optional[int] = typer.Option(None),
    output: Optional[str] = typer.Option(None, help="folder for prepared datasets (local or s3://)"),
    config: Optional[str] = typer.Option(None, help="YAML file of settings"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary as the last line"),
):
    """Prepare a dataset: tensors + manifest with a content hash (skipped when it already exists)."""

    def work():
        from tl_core.config import PrepareConfig, load_config
        from tl_core.steps import prepare_step

        cfg = load_config(PrepareConfig, config, dict(uri=uri, classes=_split(classes), image_size=image_size,
                                                       channels=channels, test_fraction=test_fraction,
                                                       test_split=test_split, max_per_class=max_per_class, seed=seed, output=output))
        return prepare_step(cfg)

    _execute(work, as_json, lambda s: typer.echo(
        f"{'reused' if s['reused'] else 'prepared'} {s['path']}  classes={len(s['classes'])} shape={s['shape']} "
        f"train={s['train_images']} test={s['test_images']} hash={s['hash'][:12]}"))


def _train_command(step: str, overrides: dict, config, force: bool, baseline: bool, as_json: bool):
    def work():
        from tl_core.config import TrainConfig, load_config
        from tl_core.steps import pretrain_step, transfer_step

        cfg = load_config(TrainConfig, config, overrides)
        progress = None if cfg.resolved_runner() == "ray" else _epoch_progress(cfg.epochs, f"{step} {cfg.strategy}")
        if step == "pretrain":
            return pretrain_step(cfg, progress, force)
        return transfer_step(cfg, progress, force, baseline)

    def show(s):
        m = s["metrics"]
        line = (f"{s['strategy']}: test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  "
                f"{'(reused) ' if s['cached'] else ''}{s['seconds']:.1f}s\ncheckpoint {s['checkpoint']}  mlflow run {s['run_id']}")
        if "gain_over_scratch" in s:
            line += f"\ngain over scratch {100 * s['gain_over_scratch']:+.1f} points (scratch {s['scratch_accuracy']:.4f})"
            if s["negative_transfer"]:
                line += "  NEGATIVE TRANSFER: below scratch"
        typer.echo(line)

    _execute(work, as_json, show)


DATA = typer.Option(None, help="prepared dataset folder (from tl prepare)")
COMMON = dict(
    model=typer.Option(None, help="architecture (default: the backbone's, else small_cnn)"),
    shots=typer.Option(None, help="labelled images per class (default: all)"),
    seed=typer.Option(None), epochs=typer.Option(None), lr=typer.Option(None), batch_size=typer.Option(None),
    optimizer=typer.Option(None, help="adam, adamw, sgd or lbfgs (full-batch)"), weight_decay=typer.Option(None),
    augment=typer.Option(None, help="random shifts of up to N pixels"),
    val_per_class=typer.Option(None, help="validation images per class held out of the train pool"),
    workers=typer.Option(None, help="Ray Train workers (1 runs in this process unless RAY_ADDRESS is set)"),
    runner=typer.Option(None, help="auto, local or ray"),
    output=typer.Option(None, help="checkpoint folder (default: under the work directory)"),
    config=typer.Option(None, help="YAML file of settings (flags override it)"),
    force=typer.Option(False, help="train again even if an identical run's checkpoint exists"),
    as_json=typer.Option(False, "--json", help="print one JSON summary as the last line"),
)


@app.command()
def pretrain(
    data: Optional[str] = DATA, model: Optional[str] = COMMON["model"], shots: Optional[int] = COMMON["shots"],
    seed: Optional[int] = COMMON["seed"], epochs: Optional[int] = COMMON["epochs"], lr: Optional[float] = COMMON["lr"],
    batch_size: Optional[int] = COMMON["batch_size"], optimizer: Optional[str] = COMMON["optimizer"],
    weight_decay: Optional[float] = COMMON["weight_decay"], augment: Optional[int] = COMMON["augment"],
    val_per_class: Optional[int] = COMMON["val_per_class"], workers: Optional[int] = COMMON["workers"],
    runner: Optional[str] = COMMON["runner"], output: Optional[str] = COMMON["output"],
    config: Optional[str] = COMMON["config"], force: bool = COMMON["force"], as_json: bool = COMMON["as_json"],
):
    """Pretrain a backbone on a source dataset (all its labels, random init)."""
    overrides = dict(data=data, strategy="scratch", model=model, shots=shots, seed=seed, epochs=epochs, lr=lr,
                     batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, augment=augment,
                     val_per_class=val_per_class, workers=workers, runner=runner, output=output)
    _train_command("pretrain", overrides, config, force, False, as_json)


@app.command()
def transfer(
    data: Optional[str] = DATA,
    strategy: Optional[str] = typer.Option(None, help="scratch, linear-probe, finetune, ..."),
    backbone: Optional[str] = typer.Option(None, help="pretrained checkpoint: path, s3://, runs:/ or models:/"),
    model: Optional[str] = COMMON["model"], shots: Optional[int] = COMMON["shots"],
    seed: Optional[int] = COMMON["seed"], epochs: Optional[int] = COMMON["epochs"], lr: Optional[float] = COMMON["lr"],
    batch_size: Optional[int] = COMMON["batch_size"], optimizer: Optional[str] = COMMON["optimizer"],
    weight_decay: Optional[float] = COMMON["weight_decay"], augment: Optional[int] = COMMON["augment"],
    backbone_lr_mult: Optional[float] = typer.Option(None, help="finetune: backbone LR = lr * this"),
    freeze: Optional[int] = typer.Option(None, help="finetune: freeze the first N backbone blocks"),
    head_warmup_epochs: Optional[int] = typer.Option(None, help="finetune: train only the head for N epochs first"),
    unfreeze_every: Optional[int] = typer.Option(None, help="finetune: unfreeze one more block every N epochs"),
    l2sp_alpha: Optional[float] = typer.Option(None, help="finetune: L2-SP pull towards the pretrained weights"),
    l2sp_beta: Optional[float] = typer.Option(None, help="finetune: L2-SP weight decay of the new head"),
    teacher: Optional[str] = typer.Option(None, help="distill: teacher checkpoint trained on the target classes"),
    temperature: Optional[float] = typer.Option(None, help="distill: temperature T"),
    alpha: Optional[float] = typer.Option(None, help="distill: weight of the soft-label term"),
    use_unlabeled: Optional[bool] = typer.Option(None, "--use-unlabeled/--labelled-only",
                                                 help="distill: learn soft labels on the unlabeled train pool too"),
    source_data: Optional[str] = typer.Option(None, help="multitask, dann, mcc, simclr: prepared source dataset"),
    source_weight: Optional[float] = typer.Option(None, help="multitask: weight of the source loss"),
    adapt_weight: Optional[float] = typer.Option(None, help="dann, mcc: weight of the adaptation loss"),
    mcc_temperature: Optional[float] = typer.Option(None, help="mcc: temperature of the class-confusion term"),
    contrastive_temperature: Optional[float] = typer.Option(None, help="simclr: NT-Xent temperature tau"),
    projection_dim: Optional[int] = typer.Option(None, help="simclr: projection head output size"),
    ways: Optional[int] = typer.Option(None, help="few-shot: classes per episode (N-way)"),
    episode_shots: Optional[int] = typer.Option(None, help="few-shot: support images per class (K-shot)"),
    episode_queries: Optional[int] = typer.Option(None, help="few-shot: query images per class"),
    episodes_per_epoch: Optional[int] = typer.Option(None, help="few-shot: training episodes per epoch"),
    eval_episodes: Optional[int] = typer.Option(None, help="few-shot: test episodes behind an accuracy"),
    inner_steps: Optional[int] = typer.Option(None, help="maml: inner gradient steps"),
    inner_lr: Optional[float] = typer.Option(None, help="maml: inner learning rate"),
    first_order: Optional[bool] = typer.Option(None, "--first-order/--second-order", help="maml: first-order (FOMAML)"),
    attributes: Optional[str] = typer.Option(None, help="zero-shot: class descriptions file (default: seven-segment)"),
    unseen_classes: Optional[str] = typer.Option(None, help="zero-shot: classes never seen with labels, comma-separated"),
    val_per_class: Optional[int] = COMMON["val_per_class"], workers: Optional[int] = COMMON["workers"],
    runner: Optional[str] = COMMON["runner"], output: Optional[str] = COMMON["output"],
    config: Optional[str] = COMMON["config"], force: bool = COMMON["force"],
    baseline: bool = typer.Option(True, help="also train the scratch baseline on the same labels and report the gain"),
    as_json: bool = COMMON["as_json"],
):
    """Transfer a pretrained backbone to a target dataset with a strategy, measured against scratch."""
    overrides = dict(
        data=data, strategy=strategy, backbone=backbone, model=model, shots=shots, seed=seed, epochs=epochs, lr=lr,
        batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, augment=augment,
        backbone_lr_mult=backbone_lr_mult, freeze=freeze, head_warmup_epochs=head_warmup_epochs,
        unfreeze_every=unfreeze_every, l2sp_alpha=l2sp_alpha, l2sp_beta=l2sp_beta, teacher=teacher,
        temperature=temperature, alpha=alpha, use_unlabeled=use_unlabeled, source_data=source_data,
        source_weight=source_weight, adapt_weight=adapt_weight, mcc_temperature=mcc_temperature,
        contrastive_temperature=contrastive_temperature, projection_dim=projection_dim, ways=ways,
        episode_shots=episode_shots, episode_queries=episode_queries, episodes_per_epoch=episodes_per_epoch,
        eval_episodes=eval_episodes, inner_steps=inner_steps, inner_lr=inner_lr, first_order=first_order,
        attributes=attributes, unseen_classes=_split(unseen_classes), val_per_class=val_per_class, workers=workers, runner=runner, output=output)
    _train_command("transfer", overrides, config, force, baseline, as_json)


@app.command()
def evaluate(
    model: str = typer.Option(..., help="checkpoint: path, s3://, runs:/ or models:/"),
    data: str = typer.Option(..., help="prepared dataset folder"),
    split: str = typer.Option("test", help="train or test"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary as the last line"),
):
    """Evaluate a checkpoint on a prepared dataset: accuracy, macro-F1, per-class accuracy, ECE, confusion matrix."""

    def work():
        from tl_core.errors import UserError
        from tl_core.steps import evaluate_step

        if split not in ("train", "test"):
            raise UserError(f"--split must be train or test, not {split!r}")
        return evaluate_step(model, data, split)

    def show(s):
        m = s["metrics"]
        typer.echo(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  "
                   f"loss {m['loss']:.4f}  n={m['n']}  mlflow run {s['run_id']}")

    _execute(work, as_json, show)


def show_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['source']['path']} -> {summary['target']['path']}", title_style="dim")
    for col in ("strategy", "test acc %", "vs scratch", "seeds won", "train s", ""):
        table.add_column(col, justify="left" if col in ("strategy", "") else "right", no_wrap=True)
    for row in summary["table"]:
        gain = "—" if row["strategy"] == "scratch" else f"{100 * row['gain_over_scratch']:+.1f}"
        won = "—" if row["seeds_beating_scratch"] is None else f"{row['seeds_beating_scratch']}/{row['seeds']}"
        flag = "[red]negative transfer[/red]" if row["negative_transfer"] else ""
        if row["strategy"] == summary["best_strategy"] and not row["negative_transfer"]:
            flag = "[green]best[/green]"
        table.add_row(row["strategy"], f"{100 * row['test_accuracy']:.1f} ± {100 * row['test_accuracy_std']:.1f}",
                      gain, won, f"{row['train_seconds']:.1f}", flag)
    console = Console()
    if not console.is_terminal:
        console = Console(width=110)  # piped or logged: do not squeeze the table to 80 columns
    console.print(table)
    console.print(f"pretrained backbone {summary['pretrain']['checkpoint']} (source test accuracy "
                  f"{summary['pretrain']['metrics']['accuracy']:.3f}); MLflow parent run {summary['run_id']}; "
                  f"{summary['seconds']:.0f}s in all")


@app.command()
def run(
    source: Optional[str] = typer.Option(None, help="source data URI (default fonts:digits, rendered from matplotlib's fonts)"),
    target: Optional[str] = typer.Option(None, help="target data URI (default sklearn:digits)"),
    shots: Optional[int] = typer.Option(None, help="labelled target images per class (default 5)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default 0,1,2)"),
    strategies: Optional[str] = typer.Option(None, help="comma-separated strategies besides scratch"),
    model: Optional[str] = typer.Option(None), image_size: Optional[int] = typer.Option(None),
    channels: Optional[int] = typer.Option(None), epochs: Optional[int] = typer.Option(None),
    pretrain_epochs: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    workers: Optional[int] = typer.Option(None), config: Optional[str] = COMMON["config"],
    as_json: bool = COMMON["as_json"],
):
    """The whole pipeline: prepare, pretrain on the source, transfer to the target with every strategy and
    the scratch baseline on the same labels, evaluate, print one table. With no arguments it runs on data
    that ships inside the dependencies."""

    def work():
        from tl_core.config import RunConfig, load_config
        from tl_core.steps import run_step

        cfg = load_config(RunConfig, config, dict(
            source=source, target=target, shots=shots, model=model, image_size=image_size, channels=channels,
            epochs=epochs, pretrain_epochs=pretrain_epochs, lr=lr, workers=workers,
            seeds=[int(s) for s in _split(seeds)] if seeds else None, strategies=_split(strategies)))
        console = _console()
        return run_step(cfg, on_progress=lambda message: console.print(f"[dim]{message}[/dim]"))

    _execute(work, as_json, show_table)


# Command groups that live in modules of their own add themselves to `app` when imported.
from tl_core import cli_pipeline, cli_registry, cli_tune  # noqa: E402,F401


def main() -> None:  # pragma: no cover - `python -m tl_core.cli`
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
