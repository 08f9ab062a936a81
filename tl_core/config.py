"""One config object per step, flowing unchanged from CLI to KFP component to Ray worker.

Each config is a pydantic model: loaded from YAML (`--config FILE`), overridden by CLI flags,
serialised as JSON into KFP parameters and Ray's `train_loop_config`, logged to MLflow as
params, and saved beside the step's outputs so any result can be rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from tl_core.errors import UserError


def workdir() -> str:
    """The one folder every run writes under (`TL_WORKDIR`, default ./tl-work); local or s3://."""
    return os.environ.get("TL_WORKDIR", "tl-work")


class StepConfig(BaseModel):
    # Unknown keys are an error, so a typo in a YAML file or a search space does not pass silently.
    model_config = ConfigDict(extra="forbid")

    def fingerprint(self, exclude: set[str] | None = None) -> str:
        """A short content hash of the settings that change the step's output."""
        payload = json.dumps(self.model_dump(exclude=exclude or set()), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def class_name(value):
    """Class names may be written as numbers in YAML (`classes: [0, 1]`), as they are on the command line."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


ClassName = Annotated[str, BeforeValidator(class_name)]


def expand_home(uri: str) -> str:
    """A `~` in a data URI is the home folder, as in a path: a shell expands `~/photos`, but leaves
    `imagefolder:~/photos` as it is."""
    scheme, sep, rest = uri.partition(":")
    if sep and rest.startswith("~"):
        return f"{scheme}:{os.path.expanduser(rest)}"
    return os.path.expanduser(uri)


DataURI = Annotated[str, AfterValidator(expand_home)]


class PrepareConfig(StepConfig):
    """Turn a data URI into a prepared dataset (tensors + manifest)."""

    uri: DataURI = Field(..., description="data URI: sklearn:digits, fonts:digits, idx:DIR, npz:FILE, imagefolder:DIR "
                                      "(or s3://...), torchvision:NAME, omniglot:ZIP; text: tsv:, csv:, jsonl: a "
                                      "FILE or a DIR with train.* and test.*")
    classes: list[ClassName] | None = Field(None, description="keep only these classes (names or label ids)")
    # At most 4096 px a side: larger than any model here takes, and a few bytes of YAML must not
    # ask for terabytes.
    image_size: int | None = Field(None, ge=1, le=4096, description="resize images to SIZE x SIZE (photos: crop "
                                                                   "them to it, default 224)")
    channels: int | None = Field(None, ge=1, le=3, description="convert to 1 (grey) or 3 (RGB) channels")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="held-out share when the source has no test split")
    test_split: Literal["images", "classes"] = Field(
        "images", description="images: hold out images of every class; classes: hold out whole classes (few-shot "
        "episodes on classes never seen in training), test_fraction of them")
    max_per_class: int | None = Field(None, ge=1, description="cap the training images of each class")
    store: Literal["auto", "arrays", "files"] = Field(
        "auto", description="arrays: uint8 pixels; files: image files as they are, decoded and cropped each epoch "
        "(photos); auto: files for image folders of images larger than 64 px")
    text_column: str | None = Field(None, description="text sources: the text column (default: text, or "
                                                      "sentence); a number from 0 with --no-header")
    label_column: str | None = Field(None, description="text sources: the label column (default: label); a number "
                                                       "from 0 with --no-header")
    header: bool = Field(True, description="text sources: the first row names the columns (--no-header: it does "
                                           "not; text is column 0, label column 1)")
    seed: int = Field(0, description="seed of the train/test split")
    output: str | None = Field(None, description="folder (local or s3://) for prepared datasets")


# -- using a model: batch predictions and drift (tl predict, tl monitor; tl_core/batch.py, monitor.py) --

MODEL_URI_HELP = ("the model: a tl checkpoint (path, s3://, runs:/), a registry version models:/NAME/3 or an alias "
                  "models:/NAME@champion (resolved once to its version)")
DATA_URI_HELP = ("a prepared dataset, or any data URI tl prepare reads (idx:DIR, npz:FILE, imagefolder:DIR, tsv:..., "
                 "...), prepared first; images are brought to the model's size and channels")
Split = Literal["all", "train", "test"]


class PredictConfig(StepConfig):
    """`tl predict`: a model's predictions on a dataset, as Parquet, with Ray Data."""

    model: str = Field(..., description=MODEL_URI_HELP)
    data: DataURI = Field(..., description=DATA_URI_HELP)
    output: str = Field(..., min_length=1, description="folder (local or s3://) of the predictions: a Parquet part per "
                        "shard of the data, predictions.json written last; a rerun keeps the parts already there")
    split: Split = Field("all", description="the split(s) of the data to predict")
    batch_size: int = Field(512, ge=1, le=65536, description="images an actor predicts at once")
    actors: int = Field(1, ge=1, le=1024, description="Ray Data actors, each holding the model (one Ray CPU each, "
                        "a share where the Ray has fewer; torch's threads: the node's cores shared among them)")
    # A text source's layout, declared where `tl prepare` reads it.
    text_column: str | None = PrepareConfig.model_fields["text_column"]
    label_column: str | None = PrepareConfig.model_fields["label_column"]
    header: bool = PrepareConfig.model_fields["header"]


class MonitorConfig(StepConfig):
    """`tl monitor`: how far new data has moved from the reference, on the model's own embeddings."""

    model: str = PredictConfig.model_fields["model"]
    data: DataURI = Field(..., description="the new data: " + DATA_URI_HELP)
    reference: DataURI | None = Field(None, description="the data to compare with: " + DATA_URI_HELP + "; default: the "
                                  "data the model was trained on (its checkpoint names it)")
    data_split: Split = Field("all", description="the split(s) of the new data to draw from")
    reference_split: Split = Field("train", description="the split(s) of the reference to draw from")
    sample_size: int = Field(500, ge=20, le=20000, description="images drawn at random from each side")
    permutations: int = Field(500, ge=20, le=100000, description="permutations behind the MMD's p-value")
    alpha: float = Field(0.01, gt=0, lt=1, description="drift when the MMD's permutation p-value is below this")
    seed: int = Field(0, description="seed of the samples and the permutations")
    text_column: str | None = PrepareConfig.model_fields["text_column"]
    label_column: str | None = PrepareConfig.model_fields["label_column"]
    header: bool = PrepareConfig.model_fields["header"]


SHOTS_HELP = "labelled images per class: N, 0 for none (dann, mcc learn from unlabeled images), or all (also -1)"


def shots_value(value):
    """`shots` has one meaning everywhere: N labels per class, 0 none, all (or -1, or None) every label."""
    if value in ("all", -1, "-1", None):
        return None
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"{value!r} is not a number of shots: give N (0 or more), or all")
    return value


# `shots` as every config, CLI flag and pipeline parameter takes it; None stands for "all".
# (A text option on the command line, for "all".)
Shots = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(shots_value),
                  Field(description=SHOTS_HELP, json_schema_extra={"cli_type": "text"})]


def strategy_option(default, description: str, strategies: tuple[str, ...], **constraints):
    """A setting only some strategies read. The scratch baseline resets these to their defaults,
    so one baseline serves every strategy trained on the same labels."""
    return Field(default, description=description, json_schema_extra={"strategies": list(strategies)}, **constraints)


AUTO = "auto"  # --strategy auto: chosen among strategies by validation on the labels (tl_core/auto.py)
FEW_SHOT = ("protonet", "maml", "episodic-finetune")
FINETUNES = ("finetune", "setfit")  # setfit is finetune with a pair loss: the same schedule of blocks and LRs
HEAD_INIT = ("linear-probe", *FINETUNES)  # a new head that --head-init may start (source, descriptions)
HEAD_SOLVED = ("linear-probe", "setfit")  # a linear head on fixed features: solved, not trained (strategies/logistic.py)
# What a tl run recipe may not change: what makes its runs comparable (the same data, labels and
# seeds) and what tl run wires itself (the backbone, the source, distill's teacher).
RECIPE_FIXED = ("data", "strategy", "backbone", "shots", "seed", "source_data", "teacher")
# The shared training settings a model's recipe may set (tl_core/recipes.py): the pipeline sends
# one not given as 0, which its steps read as "the recipe's" (ExperimentSettings.of_step).
BY_RECIPE = ("epochs", "lr", "batch_size")


class TrainConfig(StepConfig):
    """One training run: pretraining (strategy `scratch` on the source) or a transfer to a target."""

    data: str = Field(..., description="a prepared dataset (folder with manifest.json)")
    strategy: str = Field("scratch", description="transfer strategy")
    model: str | None = Field(None, description="architecture; default: the backbone's, else small_cnn")
    model_kwargs: dict = Field(default_factory=dict, description="keyword arguments of the architecture (YAML only)")
    backbone: str | None = Field(None, description="pretrained checkpoint: path, s3://, runs:/ or models:/; auto: the "
                                 "candidate `tl rank` ranks first on these shots (the ranking is logged with the run)")
    shots: Shots = None
    val_per_class: int = Field(0, ge=0, description="held-out validation images per class from the train pool")
    # --strategy auto's candidates: validated within the labels they were given, never on more.
    cv_folds: int = Field(0, ge=0, description="validate on one of this many stratified folds of the labelled shots "
                          "and train on the others (0: no folds); the test split is then never read")
    cv_fold: int = Field(0, ge=0, description="with --cv-folds: the fold validated on (0 .. cv_folds - 1)")
    seed: int = Field(0, description="seed of the labels drawn, the initialisation and the batches")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size, split across workers")
    optimizer: Literal["adam", "adamw", "sgd", "lbfgs"] = Field("adam", description="lbfgs: full-batch quasi-Newton")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    augment: int = Field(0, ge=0, description="random shift of up to N pixels per training image")
    # Strategy options: each strategy reads the ones that name it.
    backbone_lr_mult: float = strategy_option(1.0, "backbone LR = lr * this", FINETUNES, ge=0)
    freeze: int = strategy_option(0, "freeze the first N backbone blocks", FINETUNES, ge=0)
    head_warmup_epochs: int = strategy_option(0, "train only the new head for the first N epochs", FINETUNES, ge=0)
    unfreeze_every: int = strategy_option(0, "gradual unfreezing: one more block from the top every N epochs",
                                          FINETUNES, ge=0)
    l2sp_alpha: float = strategy_option(0.0, "L2-SP: pull the backbone towards its pretrained weights", ("finetune",), ge=0)
    l2sp_beta: float = strategy_option(0.0, "L2-SP: L2 on the new head", ("finetune",), ge=0)
    head_init: Literal["auto", "random", "source", "descriptions"] = strategy_option(
        "auto", "source: the new head starts as the backbone's own head, where it was trained on labels of the "
        "target's classes (matched by name); descriptions: as the zero-shot classifier, each class's weights its "
        "description's embedding (from --attributes, else the data's descriptions.yaml, else the class names); auto: "
        "finetune from the source's head where it fits; else descriptions where the data has a descriptions file or "
        "is text whose class names are words (not digits or ids); else random (bench/source_head.md)", HEAD_INIT)
    head_prior: float = strategy_option(0.05, "with --head-init source or descriptions: pull the head towards its "
                                        "start, head_prior/2 * ||W - W_start||^2", HEAD_INIT, ge=0)
    head_solver: Literal["optimum", "epochs"] = strategy_option(
        "optimum", "optimum: the linear head on the frozen features solved to the optimum of L2-regularised logistic "
        "regression (L-BFGS; C by k-fold cross-validation on the labels; no lr or epochs; setfit: refitted so at the "
        "end); epochs: trained by --optimizer for --epochs", HEAD_SOLVED)
    head_c: float | None = strategy_option(None, "with --head-solver optimum: the inverse strength C of the L2 "
                                           "penalty, scikit-learn's LogisticRegression's C (default: its 1, or with a "
                                           "descriptions file that file's zero-shot head as it is, unless 5-fold "
                                           "cross-validation on the labels shows a C better)",
                                           HEAD_SOLVED, gt=0)
    teacher: str | None = strategy_option(None, "the teacher's checkpoint (trained on the target classes)", ("distill",))
    temperature: float = strategy_option(4.0, "softmax temperature T of the soft labels", ("distill",), gt=0)
    alpha: float = strategy_option(0.7, "weight of the soft-label term (1 - alpha on hard labels)", ("distill",), ge=0, le=1)
    use_unlabeled: bool = strategy_option(False, "also learn the teacher's soft labels on unlabeled target images",
                                          ("distill",))
    source_data: str | None = strategy_option(None, "the prepared source dataset trained alongside",
                                              ("multitask", "dann", "mcc", "simclr"))
    source_weight: float = strategy_option(1.0, "weight of the source task's loss", ("multitask",), ge=0)
    adapt_weight: float = strategy_option(1.0, "weight of the domain-adaptation loss", ("dann", "mcc"), ge=0)
    mcc_temperature: float = strategy_option(2.5, "softmax temperature of the class-confusion term", ("mcc",), gt=0)
    contrastive_temperature: float = strategy_option(0.5, "temperature tau of the NT-Xent loss", ("simclr",), gt=0)
    projection_dim: int = strategy_option(64, "output size of the projection head", ("simclr",), ge=1)
    ways: int = strategy_option(5, "classes per episode (N-way)", FEW_SHOT, ge=2)
    episode_shots: int = strategy_option(1, "labelled support images per class in an episode (K-shot)", FEW_SHOT, ge=1)
    episode_queries: int = strategy_option(5, "query images per class in an episode", FEW_SHOT, ge=1)
    episodes_per_epoch: int = strategy_option(100, "training episodes per epoch", FEW_SHOT, ge=1)
    eval_episodes: int = strategy_option(300, "test episodes (fixed by the seed) behind an accuracy", FEW_SHOT, ge=1)
    inner_steps: int = strategy_option(5, "gradient steps on an episode's support set", ("maml",), ge=1)
    inner_lr: float = strategy_option(0.4, "learning rate of the inner steps", ("maml",), gt=0)
    first_order: bool = strategy_option(False, "drop second-order terms (FOMAML), cheaper", ("maml",))
    attributes: str | None = strategy_option(None, "class descriptions file: `glyphs:` (images; default: each "
                                             "class name's printed glyph), `descriptions:` (text, a sentence per "
                                             "class; default: the class names), or `attributes:` signatures "
                                             "(direct attribute prediction, e.g. seven_segment.yaml)",
                                             ("zero-shot", *HEAD_INIT))
    unseen_classes: list[ClassName] = strategy_option([], "classes never seen with labels (by descriptions: "
                                                      "default every class)", ("zero-shot",))
    # Where and how it runs.
    in_memory_mb: int = Field(2048, ge=0, description="hold training images in memory up to this many MB (as "
                              "float32); a larger training set, unlabeled pool or source task streams from its shards")
    workers: int = Field(1, ge=1, description="Ray Train workers; 1 runs in this process (unless RAY_ADDRESS is set)")
    runner: Literal["auto", "local", "ray"] = "auto"
    max_failures: int = Field(2, ge=-1, description="on Ray Train: restart the workers this many times after one "
                              "(or its node) is lost, from the last checkpoint (-1: always)")
    use_gpu: bool | None = Field(None, description="default: use GPUs where the worker has one")
    amp: bool = Field(True, description="mixed precision on GPU")
    eval_every: int = Field(1, ge=0, description="validate every N epochs (0: only at the end)")
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N epochs (0: only at the end)")
    output: str | None = Field(None, description="checkpoint folder (local or s3://; default: under the work directory)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from tl_core.strategies import STRATEGIES

        if name not in STRATEGIES and name != AUTO:
            raise ValueError(f"unknown strategy {name!r}; choose one of {sorted([*STRATEGIES, AUTO])}")
        return name

    @model_validator(mode="after")
    def _folds(self) -> "TrainConfig":
        if self.cv_folds == 1 or (self.cv_folds and self.cv_fold >= self.cv_folds):
            raise ValueError(f"cv_fold {self.cv_fold} of cv_folds {self.cv_folds}: cv_folds is 0 or at least 2, and "
                             "cv_fold one of 0 .. cv_folds - 1")
        if self.cv_folds and self.val_per_class:
            raise ValueError("cv_folds validates on the labelled shots themselves: leave val_per_class at 0")
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        from tl_core.models import MODELS

        if name is not None and name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
        return name

    @classmethod
    def strategy_options(cls) -> dict[str, list[str]]:
        """{setting: the strategies that read it}, from the fields' metadata."""
        return {name: field.json_schema_extra["strategies"] for name, field in cls.model_fields.items()
                if isinstance(field.json_schema_extra, dict) and "strategies" in field.json_schema_extra}

    def architecture(self) -> str:
        """The network this run trains: `model`, else its backbone's."""
        if self.model:
            return self.model
        from tl_core.checkpoints import architecture_of

        return architecture_of(self.backbone)

    def model_recipe(self, strategy: str, given: frozenset[str] | set[str] = frozenset()) -> dict:
        """The settings this run's model trains `strategy` with by default (tl_core/recipes.py; {}:
        the shared ones, as where no model or backbone is named), less those in `given`."""
        from tl_core.recipes import default_recipe

        return default_recipe(self.architecture(), strategy, given) if self.model or self.backbone else {}

    def recipe(self, strategy: str) -> dict:
        """The model's recipe for `strategy` in the settings this run was not given (a flag, a key
        of the config file), which win over it, as they do in `tl run` (ExperimentSettings.recipe)."""
        return self.model_recipe(strategy, self.model_fields_set)

    def with_recipe(self) -> "TrainConfig":
        """This run with its model's recipe for its strategy in every setting not given: what `tl
        run` trains the strategy with."""
        return self.model_copy(update=self.recipe(self.strategy))

    def baseline(self, recipe: dict | None = None) -> "TrainConfig":
        """The scratch baseline of this run: the same data, labels, seed and architecture, the
        strategy's own settings at their defaults, and the training budget of the model's scratch
        recipe (tl_core/recipes.py) where it has one, else this run's. The recipe is what `tl run`'s
        scratch row trains, so `tl transfer`, the pipeline's transfer step, auto and `tl promote`'s
        gate state a gain against the same baseline as `tl run`, and reuse its cached run where
        the settings agree: on photos 10 epochs of batch 16, not a linear probe's 100 of batch 64.
        `recipe`: the scratch settings instead of the model's (tl run's, where its flags win)."""
        fields = TrainConfig.model_fields
        defaults = {name: fields[name].get_default(call_default_factory=True) for name in self.strategy_options()}
        recipe = self.model_recipe("scratch") if recipe is None else recipe
        return self.model_copy(update={"strategy": "scratch", "output": None, **defaults, **recipe})

    def resolved_runner(self) -> str:
        if self.runner != "auto":
            return self.runner
        return "ray" if self.workers > 1 or os.environ.get("RAY_ADDRESS") else "local"


class ExperimentSettings(StepConfig):
    """What `tl run`, `tl tune` and the pipeline share: the data, the model and the training budget.
    Its methods build every step's config from these settings, so the same settings give the
    same configs, and so the same cached datasets and checkpoints, whoever runs them."""

    source: DataURI = Field("fonts:digits", description="source data URI to pretrain on")
    target: DataURI = Field("sklearn:digits", description="target data URI to transfer to")
    model: str = Field("small_cnn", description="architecture of the backbone")
    shots: Shots = 5
    pretrain_epochs: int = Field(15, ge=1, description="epochs of pretraining on the source")
    # The same defaults as one training run's: declared there, read here.
    pretrain_lr: float = Field(TrainConfig.model_fields["lr"].default, gt=0, description="learning rate of pretraining")
    epochs: int = Field(100, ge=1, description="transfer epochs")
    lr: float = Field(TrainConfig.model_fields["lr"].default, gt=0, description="transfer learning rate")
    batch_size: int = Field(TrainConfig.model_fields["batch_size"].default, ge=1,
                            description="global batch size, split across workers")
    augment: int = Field(1, ge=0, description="random shift of up to N pixels per training image")
    workers: int = Field(TrainConfig.model_fields["workers"].default, ge=1, description="Ray Train workers per training run")
    # Photos at 224 px cost minutes an epoch on 2 cores; a smaller size makes a quick first run.
    image_size: int | None = Field(None, ge=1, description="image size of both datasets (default: the target's own)")
    channels: int | None = Field(None, ge=1, le=3, description="1 or 3 channels (default: the target's own)")
    # How the target's text is laid out (text sources), declared where `tl prepare` reads it.
    text_column: str | None = PrepareConfig.model_fields["text_column"]
    label_column: str | None = PrepareConfig.model_fields["label_column"]
    header: bool = PrepareConfig.model_fields["header"]

    _model = field_validator("model")(TrainConfig._known_model.__func__)

    def packaged_backbone(self) -> str | None:
        """`packaged:MODEL` where the model's pretrained weights ship in a package (the text
        encoder, the ImageNet network): then that is the source, and nothing is pretrained."""
        from tl_core.checkpoints import PACKAGED, packaged_models

        return PACKAGED + self.model if self.model in packaged_models() else None

    def target_prepare(self) -> PrepareConfig:
        return PrepareConfig(uri=self.target, image_size=self.image_size, channels=self.channels,
                             text_column=self.text_column, label_column=self.label_column, header=self.header)

    def source_prepare(self, target_shape: list[int]) -> PrepareConfig:
        """The source at the target's shape: a backbone takes the images it will be transferred to."""
        return PrepareConfig(uri=self.source, image_size=target_shape[-1], channels=target_shape[0])

    def pretrain(self, source_data: str) -> TrainConfig:
        return TrainConfig(data=source_data, strategy="scratch", model=self.model, epochs=self.pretrain_epochs,
                           lr=self.pretrain_lr, batch_size=self.batch_size, augment=self.augment,
                           workers=self.workers, eval_every=5)

    def recipe(self, strategy: str) -> dict:
        """The settings of `strategy`'s runs that differ from the shared ones: the model's default
        recipe (tl_core/recipes.py), less the shared settings given explicitly (a flag, a config
        file's top level, a pipeline parameter other than 0), which win over it."""
        from tl_core.recipes import default_recipe

        return default_recipe(self.model, strategy, self.model_fields_set)

    def candidate_recipes(self, cfg: TrainConfig) -> dict[str, dict]:
        """`--strategy auto`'s candidates for `cfg`, each with its `recipe`."""
        from tl_core.auto import candidate_names

        return {s: self.recipe(s) for s in candidate_names(cfg)}

    @classmethod
    def of_step(cls, **values) -> "ExperimentSettings":
        """The settings a pipeline step was given: one of BY_RECIPE sent as 0 was not given (KFP
        has no None), so the model's recipe for the strategy, else the shared default, fills it."""
        return cls(**{k: v for k, v in values.items() if k not in BY_RECIPE or v})

    def transfer(self, target_data: str, backbone: str, strategy: str, seed: int = 0, source_data: str | None = None,
                 teacher: str | None = None, **settings) -> TrainConfig:
        """A transfer of `backbone` to the target with `strategy`'s recipe (`recipe`); the source goes
        to the strategies that read it."""
        from tl_core.checkpoints import PACKAGED

        if strategy not in TrainConfig.strategy_options()["source_data"] or str(source_data).startswith(PACKAGED):
            source_data = None  # a packaged encoder is the source, with no source data
        if strategy == "distill":
            settings = {"teacher": teacher, "use_unlabeled": True, **settings}
        return TrainConfig(**{"data": target_data, "backbone": backbone, "strategy": strategy, "shots": self.shots,
                              "seed": seed, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                              "augment": self.augment, "workers": self.workers, "eval_every": 10,
                              "checkpoint_every": 10, "source_data": source_data, **self.recipe(strategy),
                              **settings})

    def search_base(self, target_data: str, backbone: str, strategy: str, source_data: str | None = None) -> dict:
        """The transfer a search (`tl tune`, the pipeline's HPO step) starts from: the one above,
        validated after every epoch, as the search compares trials."""
        if strategy == AUTO:
            raise UserError("a search tunes one strategy's settings, and auto chooses the strategy itself: name the "
                            "strategy to search (e.g. --strategy finetune), or drop the search")
        cfg = self.transfer(target_data, backbone, strategy, source_data=source_data)
        return cfg.model_copy(update={"eval_every": 1}).model_dump()


class ExperimentConfig(ExperimentSettings):
    """`tl run`: the whole experiment, source -> pretrain -> transfer (every strategy) vs a baseline:
    scratch on the same labels, or with shots 0 the source model as it is."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="seeds, one transfer of each strategy each")
    backbone: Literal["auto"] | None = Field(None, description="auto: no --source pretraining; the backbone is the "
                                             "candidate tl rank puts first on the target's shots of the first seed "
                                             "(the ranking is logged with the run)")
    # auto by default: the row a user can take without knowing which strategy suits the task; its
    # choice is one Ray Tune search over the candidates (tl_core/auto.py), 13 s of the demo's 34.
    strategies: list[str] = Field(default_factory=lambda: ["linear-probe", "finetune", AUTO],
                                  description="strategies besides the baseline (auto: the one chosen by validation "
                                              "on the labels)")
    # One learning rate rarely suits every strategy (a linear head on cached features wants far
    # more than a fine-tuned encoder), so a --config file may give each its own settings.
    recipes: dict[str, dict] = Field(default_factory=dict, description="per-strategy training settings over the "
                                     "shared ones (YAML only), e.g. {linear-probe: {lr: 0.05}, finetune: {lr: 0.001, "
                                     "backbone_lr_mult: 0.05}}; scratch: the baseline's")

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, names: list[str]) -> list[str]:
        from tl_core.strategies import STRATEGIES

        unknown = [n for n in names if n not in STRATEGIES and n != AUTO]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {sorted([*STRATEGIES, AUTO])}")
        other_tasks = [n for n in names if n != AUTO and not STRATEGIES[n].classifies_dataset_classes]
        if other_tasks:
            raise ValueError(f"strategy {other_tasks[0]!r} does not classify the target's classes (few-shot episodes or "
                             "zero-shot), so tl run cannot compare it with scratch: run it with tl transfer")
        return [n for n in names if n != "scratch"]  # scratch is always the baseline

    @model_validator(mode="after")
    def _strategies_for_no_labels(self) -> "ExperimentConfig":
        if self.shots == 0:
            adapting = TrainConfig.strategy_options()["adapt_weight"]
            other = [n for n in self.strategies if n not in adapting]
            if other:
                raise ValueError(f"shots 0 gives the target no labels, which {other[0]} needs: choose strategies "
                                 f"that adapt to unlabeled images ({', '.join(adapting)}), or give shots > 0")
        return self

    @model_validator(mode="after")
    def _recipes_are_training_settings(self) -> "ExperimentConfig":
        from tl_core.strategies import STRATEGIES

        from tl_core.auto import CANDIDATES

        candidates = CANDIDATES if AUTO in self.strategies else ()  # auto trains whichever it picks
        trained = [s for s in dict.fromkeys(["scratch", *self.strategies, *candidates]) if s != AUTO]
        for strategy, recipe in self.recipes.items():
            if strategy not in trained:
                raise ValueError(f"recipes has settings for {strategy!r}, which this run does not train: name one of "
                                 f"{', '.join(trained)}")
            unknown = [k for k in recipe if k not in TrainConfig.model_fields or k in RECIPE_FIXED]
            if unknown:
                raise ValueError(f"recipes.{strategy}: {unknown[0]!r} is not a setting a recipe can change (tl run sets "
                                 f"{', '.join(RECIPE_FIXED)} the same for every strategy)")
            try:
                TrainConfig(data="-", strategy=strategy, **recipe)  # each value checked as a training run checks it
            except ValidationError as err:
                first = err.errors()[0]
                raise ValueError(f"recipes.{strategy}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return self

    def recipe(self, strategy: str) -> dict:
        """The model's default recipe (less the shared settings given explicitly), overridden
        setting by setting by the config file's `recipes:`."""
        return {**super().recipe(strategy), **self.recipes.get(strategy, {})}


class SearchSettings(ExperimentSettings):
    """`tl tune` with no base config in its file: the experiment whose transfer it searches."""

    strategy: str = Field("finetune", description="transfer strategy")

    _strategy = field_validator("strategy")(TrainConfig._known_strategy.__func__)


class PipelineConfig(SearchSettings):
    """The KFP pipeline's parameters (pipelines/transfer.py): validated here before a run is
    compiled, sent or scheduled."""

    # A scheduled retraining job cannot know the best strategy for the labels it will have: by
    # default it chooses by validation on them (tl_core/auto.py).
    strategy: str = Field(AUTO, description="transfer strategy; auto: chosen by validation on the labels")

    search_space: str = Field("", description='HPO search space, JSON: {"lr": {"loguniform": [1e-4, 1e-2]}}; '
                                              '"" skips HPO')
    num_samples: int = Field(8, ge=1, description="HPO trials")
    min_accuracy: float = Field(0.5, ge=0, le=1, description="promotion floor on the target's test accuracy")
    min_delta: float = Field(0.0, ge=0, description="promotion: beat the champion by at least this much accuracy")
    model_name: str = Field("tl-transfer", pattern=r"^[^/:]+$", description="registered model name")
    # The source pretraining still runs: its checkpoint is one candidate beside the registry's versions,
    # the packaged backbones and the work directory's pretrainings (tl_core/rank.py).
    backbone: Literal["auto"] | None = Field(None, description="auto: the transfer step trains from the candidate "
                                             "tl rank puts first on the target's shots (this run's pretrained "
                                             "source among them); the ranking is logged with the run")
    # The loop: the first step measures drift of the target's data now (the newest snapshot) from the
    # champion's training data (tl_core/monitor.py); without drift the run trains nothing.
    force_retrain: bool = Field(False, description="retrain, gate and promote even when the monitor finds no drift "
                                "(a run with no champion yet always trains)")

    @field_validator("search_space")
    @classmethod
    def _search_space(cls, text: str) -> str:
        if not text.strip():
            return ""
        try:
            space = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(space, dict) or not space:
            raise ValueError('must be a JSON object of settings, e.g. {"lr": {"loguniform": [1e-4, 1e-2]}}')
        unknown = sorted(set(space) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"{unknown} are not TrainConfig settings")
        return json.dumps(space, sort_keys=True)  # the search checks the distributions themselves

    @model_validator(mode="after")
    def _auto_searches_itself(self) -> "PipelineConfig":
        if self.strategy == AUTO and self.search_space:
            raise ValueError("--search-space tunes one strategy's settings, and auto chooses the strategy itself: "
                             "name a strategy (--strategy finetune) or drop --search-space")
        return self

    @model_validator(mode="after")
    def _ranking_needs_labels_and_no_search(self) -> "PipelineConfig":
        if self.backbone == AUTO and self.shots == 0:
            raise ValueError("--backbone auto ranks the candidates on the target's labels, and shots 0 gives none: "
                             "give --shots N (N >= 1), or drop --backbone auto")
        if self.backbone == AUTO and self.search_space:
            raise ValueError("--search-space tunes a transfer of the pretrained source, and --backbone auto chooses "
                             "the backbone after the search: drop one of them")
        return self

    @model_validator(mode="after")
    def _labels_for_the_strategy(self) -> "PipelineConfig":
        adapting = TrainConfig.strategy_options()["adapt_weight"]
        if self.shots == 0 and self.strategy not in adapting:
            raise ValueError(f"shots 0 gives the target no labels, which {self.strategy} needs: use a strategy that "
                             f"adapts to unlabeled images ({', '.join(adapting)}), or shots > 0")
        return self


class RankConfig(StepConfig):
    """`tl rank`: candidate source models scored for a target before any training (tl_core/rank.py)."""

    target: DataURI = Field(..., description="the target: a prepared dataset, or a data URI tl prepare reads (prepared "
                        "first); only its labelled training shots are read, never its test split")
    shots: Shots = 10
    seed: int = Field(0, description="seed of the shots, as a transfer with this seed draws them")
    candidates: list[str] | None = Field(None, description="candidate backbones (path, s3://, runs:/, models:/, "
                                         "packaged:NAME); default: the registry's versions, the packaged backbones "
                                         "and the work directory's pretrain checkpoints that fit the target")
    text_column: str | None = PrepareConfig.model_fields["text_column"]
    label_column: str | None = PrepareConfig.model_fields["label_column"]
    header: bool = PrepareConfig.model_fields["header"]


class ServeConfig(StepConfig):
    """`tl serve NAME`: the model an alias of NAME points to, served over HTTP as a Ray Serve
    application (tl_core/serving.py). The settings marked "reloaded" are the deployment's
    user_config: changed on a running application through the deployment's `user_config` (a Serve
    config file or a RayService's serveConfigV2, `deployments: [{name: model, user_config:
    ...}]`), every replica applies them in `reconfigure` without a restart. Changed in the
    application's `args` instead, they are part of Serve's code version: the replicas are replaced."""

    name: str = Field(..., pattern=r"^[^/:]+$", description="registered model name: serves models:/NAME@ALIAS and "
                                                            "follows the alias when it moves (reloaded)")
    alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$", description="the alias served and followed (reloaded)")
    host: str = Field("127.0.0.1", min_length=1, description="address the HTTP proxy listens on (0.0.0.0: every "
                                                             "interface)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    replicas: int = Field(1, ge=1, le=64, description="replicas of the model, one Ray CPU each")
    max_batch_size: int = Field(16, ge=1, le=1024, description="requests answered by one forward pass at most "
                                                               "(@serve.batch; reloaded)")
    batch_wait_s: float = Field(0.005, ge=0, le=1, description="seconds a batch waits to fill before it runs "
                                                               "(@serve.batch; reloaded)")
    poll_s: float = Field(1.0, ge=0.1, le=9, description="seconds between two looks at the alias: a promotion or "
                                                         "rollback is served within about this plus a load (reloaded)")
    max_body_bytes: int = Field(8 * 1024**2, ge=1024, le=1024**3, description="a request body larger than this is "
                                "refused with 413 (reloaded)")


def load_config(cls: type[StepConfig], path: str | None, overrides: dict) -> StepConfig:
    """Build a config from an optional YAML/JSON file, then CLI flags (flags win)."""
    values = read_config_file(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(cls, values)


def read_config_file(path: str | None) -> dict:
    """The settings in a YAML/JSON file ({} without one), or a UserError saying what is wrong."""
    values: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path} does not exist (or is not a file): check the path")
        try:
            values = yaml.safe_load(file.read_bytes()) or {}  # bytes: YAML finds the encoding, refuses bad bytes
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
        except RecursionError:  # PyYAML builds nested lists by recursion
            raise UserError(f"config file {path} nests too deeply to be settings: write them out plainly") from None
        if isinstance(values, dict):
            values = values.get("config", values)  # accept a saved run's {"config": {...}} too
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
        odd = [key for key in values if not isinstance(key, str)]
        if odd:
            raise UserError(f"config file {path}: {odd[0]!r} is not the name of a setting (keys are names such as "
                            "epochs or lr)")
        if count_values(values, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise UserError(f"config file {path} expands to more than {MAX_CONFIG_VALUES} values (YAML aliases "
                            "repeating each other, a 'billion laughs'): write the settings out plainly")
    return values


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line: what it found and where (its own message spans several)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem and mark:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


MAX_CONFIG_VALUES = 100_000  # far more than any settings file: a few aliases can expand past memory


def count_values(value, limit: int) -> int:
    """The values in a loaded YAML document, an alias counted each time it is used; stops past `limit`
    (an alias that contains itself makes the document endless)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return count


def validate(cls: type[StepConfig], values: dict) -> StepConfig:
    try:
        return cls(**values)
    except ValidationError as err:
        # A validator's ValueError reads "Value error, <ours>" in pydantic's words: ours alone.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise UserError(f"invalid {cls.__name__}: {problems}") from None
