"""Each setting declared once (issue 12): the flags of every command are the fields of its config,
`shots` means the same everywhere, and the CLI lists what it can do."""

from __future__ import annotations

import os

import pytest

from tests.conftest import tl, tl_error, tl_json
from tl_core.config import ExperimentConfig, PipelineConfig, TrainConfig, validate
from tl_core.errors import UserError


def flags(command: str) -> set[str]:
    """The flags of `tl <command>`, as click parses them."""
    import typer

    from tl_core.cli import app

    cmd = typer.main.get_command(app)
    for word in command.split():
        cmd = cmd.commands[word]
    return {opt for param in cmd.params for opt in param.opts}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("value, meaning", [("all", None), (-1, None), ("-1", None), (None, None), (0, 0), ("7", 7)])
def test_shots_has_one_meaning(value, meaning):
    assert TrainConfig(data="d", shots=value).shots == meaning
    assert ExperimentConfig(shots=value, strategies=["mcc"]).shots == meaning


def test_a_home_folder_in_a_data_uri_is_expanded(monkeypatch, tmp_path):
    # The shell expands `~/photos`, but leaves `imagefolder:~/photos` as it is (the README's example).
    from tl_core.config import MonitorConfig, PrepareConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    assert PrepareConfig(uri="imagefolder:~/photos").uri == f"imagefolder:{tmp_path}/photos"
    assert ExperimentConfig(target="tsv:~/sst2").target == f"tsv:{tmp_path}/sst2"
    assert MonitorConfig(model="m", data="~/new.npz", reference="npz:~/old.npz").reference == f"npz:{tmp_path}/old.npz"
    assert PrepareConfig(uri="s3://bucket/~photos").uri == "s3://bucket/~photos"


def test_bad_shots_and_labels_a_strategy_cannot_do_without_are_refused():
    with pytest.raises(UserError, match="shots: Input should be greater than or equal to 0"):
        validate(TrainConfig, {"data": "d", "shots": -2})
    # the pipeline's default strategy, auto, chooses on labels
    with pytest.raises(UserError, match="shots 0 gives the target no labels, which auto needs.*dann, mcc"):
        validate(PipelineConfig, {"shots": 0})
    with pytest.raises(UserError, match="auto chooses the strategy itself"):
        validate(PipelineConfig, {"search_space": '{"lr": {"choice": [0.1]}}'})
    with pytest.raises(UserError, match="which linear-probe needs"):
        validate(ExperimentConfig, {"shots": 0})


def test_the_pipeline_sends_all_labels_as_minus_one():
    from pipelines.transfer import arguments

    assert arguments(PipelineConfig(shots="all"))["shots"] == -1
    assert arguments(PipelineConfig(shots=0, strategy="mcc"))["shots"] == 0
    assert PipelineConfig(shots=-1).shots is None  # and -1 comes back as all


def test_every_setting_is_a_flag_with_its_description():
    options = TrainConfig.strategy_options()
    transfer, pretrain = flags("transfer"), flags("pretrain")
    for name, field in TrainConfig.model_fields.items():
        if name != "model_kwargs":  # a mapping: config files only
            assert flag(name) in transfer, name
        assert (flag(name) in pretrain) == (name not in options and name not in ("strategy", "backbone", "model_kwargs"))
    for name in ExperimentConfig.model_fields:
        assert (flag(name) in flags("run")) == (name != "recipes"), name  # recipes: a mapping, config files only
    for name in PipelineConfig.model_fields:
        assert flag(name) in flags("pipeline run")
    help_text = tl("transfer", "--help").stdout.replace("│", " ")
    assert "finetune, setfit: backbone LR = lr * this" in " ".join(help_text.split())  # the field's description
    assert "PydanticUndefined" not in help_text and "manifest.json) (required)" in " ".join(help_text.split())


def test_strategy_options_come_from_the_fields_and_the_baseline_resets_them():
    options = TrainConfig.strategy_options()
    assert options["source_data"] == ["multitask", "dann", "mcc", "simclr"]
    assert {"ways", "episode_shots", "inner_lr", "unseen_classes"} <= set(options)
    cfg = TrainConfig(data="d", strategy="finetune", freeze=2, ways=10, source_data="s", shots=5)
    base = cfg.baseline()
    assert base.strategy == "scratch" and base.freeze == 0 and base.ways == 5 and base.source_data is None
    assert base.shots == 5


@pytest.mark.parametrize("model,strategies", [("efficientnet-lite0", ["linear-probe", "finetune", "distill"]),
                                              ("minilm-l6", ["linear-probe", "finetune", "setfit"])])
def test_every_transfer_states_its_gain_against_tl_runs_scratch_row(model, strategies):
    """`tl transfer`, the pipeline's transfer step, auto and `tl promote` train a transfer's
    baseline as `cfg.baseline()`; `tl run` trains its scratch row with the model's scratch recipe.
    They are one baseline: the same budget (before, a probe of photos had a scratch baseline of 100
    epochs of batch 64 against tl run's 10 of 16, and SetFit's text baseline trained at its lr),
    and for photos the very same run, so the transfer's cached baseline is tl run's."""
    from tl_core.config import ExperimentSettings

    settings = ExperimentSettings(model=model)
    row = settings.transfer("prepared", f"packaged:{model}", "scratch", seed=1).model_dump()
    for strategy in strategies:
        base = settings.transfer("prepared", f"packaged:{model}", strategy, seed=1).baseline().model_dump()
        assert {k: base[k] for k in ("strategy", "epochs", "lr", "batch_size")} == {
            k: row[k] for k in ("strategy", "epochs", "lr", "batch_size")}, strategy
        if model.startswith("efficientnet"):
            assert base == row, strategy
            # tl transfer's baseline, with its own defaults (eval_every 1, augment 0 against tl run's
            # 10 and 1), is tl run's very row, so reused from the cache rather than trained again;
            # tested at the end only, as the networks that tl transfer trains are
            alone = TrainConfig(data="prepared", backbone=f"packaged:{model}", strategy=strategy, seed=1,
                                shots=row["shots"])
            assert alone.baseline().model_dump() == row, strategy
            assert alone.with_recipe().eval_every == (1 if strategy == "linear-probe" else 0), strategy  # cached features
        else:  # text finetunes validate and checkpoint at the end only (recipes.py), which the baseline keeps
            assert {k for k in base if base[k] != row[k]} <= {"eval_every", "checkpoint_every"}, strategy


@pytest.mark.parametrize("flags", [{}, {"epochs": 30}])
def test_auto_validates_tl_runs_own_scratch_row_flags_included(flags):
    """tl run's auto row weighs scratch as tl run's scratch row trains it: by the model's recipe,
    less the shared settings given explicitly (an --epochs 30 reaches both)."""
    from tl_core.auto import candidate_config

    settings = ExperimentConfig(model="efficientnet-lite0", **flags)
    auto = settings.transfer("prepared", "packaged:efficientnet-lite0", "auto", seed=1)
    candidate = candidate_config(auto, "scratch", settings.recipe("scratch"))
    assert candidate == settings.transfer("prepared", "packaged:efficientnet-lite0", "scratch", seed=1)
    assert candidate.epochs == flags.get("epochs", 10)


def test_tl_transfer_trains_with_the_models_recipe_where_no_flag_says_otherwise(workdir):
    """`tl transfer` takes the model's recipe for its strategy (tl_core/recipes.py; small_cnn's
    finetune: the backbone at 0.3x the head's rate), as `tl run` does; a flag wins over it."""
    from tl_core.checkpoints import load_checkpoint

    digits = tl_json("prepare", "sklearn:digits")["path"]
    backbone = tl_json("pretrain", "--data", digits, "--epochs", "1")["checkpoint"]

    def finetuned(*flags) -> dict:
        summary = tl_json("transfer", "--data", digits, "--backbone", backbone, "--strategy", "finetune", "--shots", 2,
                          "--epochs", 1, "--no-baseline", *flags)
        return load_checkpoint(summary["checkpoint"])["config"]

    assert finetuned()["backbone_lr_mult"] == 0.3
    assert finetuned("--backbone-lr-mult", 1)["backbone_lr_mult"] == 1.0


def test_tl_transfer_auto_trains_its_candidates_by_their_recipes_less_the_flags_given():
    """`tl transfer --strategy auto`: each candidate takes its model's recipe (tl_core/recipes.py),
    and a flag wins over it, as in `tl run` and a single strategy's `tl transfer` (before, the
    recipes won: --epochs 3 trained MiniLM's finetune candidate 20 epochs, scratch's 60)."""
    from tl_core.auto import candidate_config, recipe_for
    from tl_core.config import load_config
    from tl_core.recipes import RECIPES

    def candidate(strategy: str, **flags) -> TrainConfig:
        cfg = load_config(TrainConfig, None, {"data": "prepared", "backbone": "packaged:minilm-l6", "strategy": "auto",
                                              **flags})
        return candidate_config(cfg, strategy, recipe_for(cfg, None, strategy))

    for strategy in ("scratch", "finetune", "setfit"):
        recipe = RECIPES["minilm-l6"][strategy]
        assert (candidate(strategy).epochs, candidate(strategy).lr) == (recipe["epochs"], recipe["lr"]), strategy
        told = candidate(strategy, epochs=3)
        assert (told.epochs, told.lr, told.batch_size) == (3, recipe["lr"], recipe["batch_size"]), strategy


def test_a_backbones_architecture_is_read_once_unless_a_promotion_can_move_it(monkeypatch):
    """Recipes follow the backbone's architecture, read once a process (a download for s3:// or
    MLflow); a registry alias or `latest` is read each time: a promotion can point it at another
    network (a process that outlives it took the old network's recipes)."""
    from itertools import cycle

    from tl_core import checkpoints

    reads = []
    networks = cycle(["small_cnn", "efficientnet-lite0"])  # a promotion between every two reads
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda uri: reads.append(uri) or {
        "model_spec": {"name": next(networks)}})
    checkpoints._stored_architecture.cache_clear()
    for uri in ("models:/photos@champion", "models:/photos/latest"):
        assert [checkpoints.architecture_of(uri) for _ in range(2)] == ["small_cnn", "efficientnet-lite0"], uri
    assert checkpoints.architecture_of("models:/photos/3") == checkpoints.architecture_of("models:/photos/3")
    assert reads.count("models:/photos/3") == 1 and checkpoints.architecture_of("packaged:minilm-l6") == "minilm-l6"
    checkpoints._stored_architecture.cache_clear()


def test_transfer_help_lists_every_strategy():
    from tl_core.strategies import STRATEGIES

    text = " ".join(tl("transfer", "--help").stdout.replace("│", " ").split())
    for name in STRATEGIES:
        assert name in text, name


def test_a_bad_flag_value_is_one_error_line(workdir):
    assert "shots" in tl_error("run", "--shots", "some") and "or all" in tl_error("run", "--shots", "some")
    assert "which auto needs" in tl_error("pipeline", "run", "--local", "--shots", "0")


def test_tl_run_recipes_give_each_strategy_its_own_settings_and_nothing_else(workdir, tmp_path):
    cfg = ExperimentConfig(recipes={"linear-probe": {"lr": 0.05}, "scratch": {"epochs": 60}})
    assert cfg.transfer("d", "b", "linear-probe", 0).lr == 0.05
    assert cfg.transfer("d", "b", "finetune", 0).lr == cfg.lr  # no recipe: the shared lr
    assert cfg.transfer("d", "b", "scratch", 0).epochs == 60
    for recipes, expected in [
        # auto (a default row) trains any of its candidates, setfit on text among them; dann is none.
        ("{dann: {lr: 1}}", "recipes has settings for 'dann', which this run does not train: name one of scratch, "
                            "linear-probe, finetune, zero-shot, setfit"),
        ("{finetune: {shots: 3}}", "'shots' is not a setting a recipe can change"),
        ("{finetune: {lr: -1}}", "recipes.finetune.lr: Input should be greater than 0"),
        ("[1, 2]", "recipes: Input should be a valid dictionary"),
    ]:
        file = tmp_path / "recipes.yaml"
        file.write_text(f"recipes: {recipes}\n")
        assert expected in tl_error("run", "--config", file)


def test_a_text_model_trains_each_strategy_with_its_recipe_unless_told_otherwise():
    """Issue 27: `tl run --model minilm-l6` needs no recipe file: the model's default recipes
    (tl_core/recipes.py); a shared setting given explicitly, and a `recipes:` entry, win."""
    from tl_core.recipes import RECIPES

    text = ExperimentConfig(target="tsv:x", model="minilm-l6")
    assert text.recipe("finetune") == RECIPES["minilm-l6"]["finetune"] and text.recipe("linear-probe") == {}
    told = ExperimentConfig(target="tsv:x", model="minilm-l6", epochs=3, recipes={"finetune": {"lr": 0.01}})
    assert "epochs" not in told.recipe("finetune") and told.recipe("finetune")["lr"] == 0.01
    assert told.recipe("finetune")["backbone_lr_mult"] == RECIPES["minilm-l6"]["finetune"]["backbone_lr_mult"]
    assert ExperimentConfig().recipe("finetune") == {"backbone_lr_mult": 0.3}  # the small CNN's one departure
    assert ExperimentConfig().recipe("scratch") == {}  # else the shared settings


def test_ray_trains_state_api_warning_never_reaches_the_terminal(monkeypatch):
    # A local Ray has no dashboard, so Ray Train's placement-group watcher warns once a second
    # through a --workers run. tl's commands have Ray's own log filter drop that line.
    import inspect

    from ray._private.ray_logging import LogDeduplicator
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from tl_core.cli_app import RAY_TRAIN_STATE_API_NOISE, _quiet_libraries

    assert RAY_TRAIN_STATE_API_NOISE in inspect.getsource(placement_group_cleaner)  # the installed Ray's words
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    _quiet_libraries()
    line = ("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
            "Continuing to monitor.")
    batches = LogDeduplicator(5, None, os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]).deduplicate(
        {"ip": "127.0.0.1", "pid": 7, "lines": [line, "epoch 3 done"]})
    assert [kept for batch in batches for kept in batch["lines"]] == ["epoch 3 done"]
