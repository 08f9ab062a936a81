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
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class PrepareConfig(StepConfig):
    """Turn a data URI into a prepared dataset (tensors + manifest)."""

    uri: str
    classes: list[str] | None = Field(None, description="keep only these classes (names or label ids)")
    image_size: int | None = Field(None, description="resize images to SIZE x SIZE")
    channels: int | None = Field(None, description="convert to 1 (grey) or 3 (RGB) channels")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="held-out share when the source has no test split")
    test_split: Literal["images", "classes"] = Field(
        "images", description="images: hold out images of every class; classes: hold out whole classes (few-shot "
        "episodes on classes never seen in training), test_fraction of them")
    max_per_class: int | None = Field(None, description="cap the training images of each class")
    seed: int = 0
    output: str | None = Field(None, description="folder (local or s3://) for prepared datasets")


class TrainConfig(StepConfig):
    """One training run: pretraining (strategy `scratch` on the source) or a transfer to a target."""

    data: str = Field(..., description="a prepared dataset (folder with manifest.json)")
    strategy: str = "scratch"
    model: str | None = Field(None, description="architecture; default: the backbone's, else small_cnn")
    model_kwargs: dict = Field(default_factory=dict)
    backbone: str | None = Field(None, description="pretrained checkpoint: path, s3://, runs:/ or models:/")
    shots: int | None = Field(None, ge=0, description="labelled images per class; None = all; 0 = none (domain "
                              "adaptation and self-supervised pretraining learn from unlabeled images)")
    val_per_class: int = Field(0, ge=0, description="held-out validation images per class from the train pool")
    seed: int = 0
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size, split across workers")
    optimizer: Literal["adam", "adamw", "sgd", "lbfgs"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    augment: int = Field(0, ge=0, description="random shift of up to N pixels per training image")
    # Strategy options (each strategy reads the ones it uses).
    backbone_lr_mult: float = Field(1.0, ge=0, description="backbone LR = lr * this (finetune)")
    freeze: int = Field(0, ge=0, description="freeze the first N backbone blocks (finetune)")
    head_warmup_epochs: int = Field(0, ge=0, description="train only the new head for the first N epochs (finetune)")
    unfreeze_every: int = Field(0, ge=0, description="gradual unfreezing: one more block from the top every N epochs (finetune)")
    l2sp_alpha: float = Field(0.0, ge=0, description="L2-SP: pull the backbone towards its pretrained weights (finetune)")
    l2sp_beta: float = Field(0.0, ge=0, description="L2-SP: L2 on the new head (finetune)")
    teacher: str | None = Field(None, description="distill: the teacher's checkpoint (trained on the target classes)")
    temperature: float = Field(4.0, gt=0, description="distill: softmax temperature T of the soft labels")
    alpha: float = Field(0.7, ge=0, le=1, description="distill: weight of the soft-label term (1 - alpha on hard labels)")
    use_unlabeled: bool = Field(False, description="distill: also learn the teacher's soft labels on unlabeled target images")
    source_data: str | None = Field(None, description="multitask, dann, mcc, simclr: the prepared source dataset trained alongside")
    source_weight: float = Field(1.0, ge=0, description="multitask: weight of the source task's loss")
    adapt_weight: float = Field(1.0, ge=0, description="dann, mcc: weight of the domain-adaptation loss")
    mcc_temperature: float = Field(2.5, gt=0, description="mcc: softmax temperature of the class-confusion term")
    contrastive_temperature: float = Field(0.5, gt=0, description="simclr: temperature tau of the NT-Xent loss")
    projection_dim: int = Field(64, ge=1, description="simclr: output size of the projection head")
    ways: int = Field(5, ge=2, description="protonet, maml, episodic-finetune: classes per episode (N-way)")
    episode_shots: int = Field(1, ge=1, description="few-shot: labelled support images per class in an episode (K-shot)")
    episode_queries: int = Field(5, ge=1, description="few-shot: query images per class in an episode")
    episodes_per_epoch: int = Field(100, ge=1, description="few-shot: training episodes per epoch")
    eval_episodes: int = Field(300, ge=1, description="few-shot: test episodes (fixed by the seed) behind an accuracy")
    inner_steps: int = Field(5, ge=1, description="maml: gradient steps on an episode's support set")
    inner_lr: float = Field(0.4, gt=0, description="maml: learning rate of the inner steps")
    first_order: bool = Field(False, description="maml: drop second-order terms (FOMAML), cheaper")
    attributes: str | None = Field(None, description="zero-shot: class descriptions file (default: seven-segment digits)")
    unseen_classes: list[str] = Field(default_factory=list, description="zero-shot: classes never seen with labels")
    # Where and how it runs.
    workers: int = Field(1, ge=1, description="Ray Train workers; 1 runs in this process")
    runner: Literal["auto", "local", "ray"] = "auto"
    use_gpu: bool | None = Field(None, description="None: use GPUs where the worker has one")
    amp: bool = Field(True, description="mixed precision on GPU")
    eval_every: int = Field(1, ge=0, description="validate every N epochs (0: only at the end)")
    checkpoint_every: int = Field(1, ge=0, description="checkpoint every N epochs (0: only at the end)")
    output: str | None = Field(None, description="checkpoint folder (local or s3://)")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from tl_core.strategies import STRATEGIES

        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
        return name

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        from tl_core.models import MODELS

        if name is not None and name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
        return name

    # Settings that only some strategies read: the scratch baseline resets them, so one
    # baseline serves every strategy trained on the same labels.
    STRATEGY_OPTIONS: ClassVar[tuple[str, ...]] = (
        "backbone_lr_mult", "freeze", "head_warmup_epochs", "unfreeze_every", "l2sp_alpha", "l2sp_beta",
        "teacher", "temperature", "alpha", "use_unlabeled", "source_data", "source_weight", "adapt_weight",
        "mcc_temperature", "contrastive_temperature", "projection_dim", "inner_steps", "inner_lr", "first_order",
        "attributes", "unseen_classes",
    )

    def baseline(self) -> "TrainConfig":
        """The scratch baseline for this run: same data, labels, budget and architecture."""
        defaults = {name: TrainConfig.model_fields[name].get_default(call_default_factory=True) for name in self.STRATEGY_OPTIONS}
        return self.model_copy(update={"strategy": "scratch", "output": None, **defaults})

    def resolved_runner(self) -> str:
        if self.runner != "auto":
            return self.runner
        return "ray" if self.workers > 1 or os.environ.get("RAY_ADDRESS") else "local"


class RunConfig(StepConfig):
    """`tl run`: the whole pipeline, source -> pretrain -> transfer (every strategy) vs scratch."""

    source: str = "fonts:digits"
    target: str = "sklearn:digits"
    shots: int = Field(5, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    strategies: list[str] = Field(default_factory=lambda: ["linear-probe", "finetune"])
    model: str = "small_cnn"
    image_size: int | None = Field(None, description="default: the target's own size")
    channels: int | None = None
    pretrain_epochs: int = 15
    pretrain_lr: float = 1e-3
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    augment: int = 1
    workers: int = 1

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, names: list[str]) -> list[str]:
        from tl_core.strategies import STRATEGIES

        unknown = [n for n in names if n not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {sorted(STRATEGIES)}")
        other_tasks = [n for n in names if not STRATEGIES[n].classifies_dataset_classes]
        if other_tasks:
            raise ValueError(f"strategy {other_tasks[0]!r} does not classify the target's classes (few-shot episodes or "
                             "zero-shot), so tl run cannot compare it with scratch: run it with tl transfer")
        return [n for n in names if n != "scratch"]  # scratch is always the baseline


def load_config(cls: type[StepConfig], path: str | None, overrides: dict) -> StepConfig:
    """Build a config from an optional YAML/JSON file, then CLI flags (flags win)."""
    values: dict = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path} does not exist: check the path")
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
        values = values.get("config", values)  # accept a saved run's {"config": {...}} too
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(cls, values)


def validate(cls: type[StepConfig], values: dict) -> StepConfig:
    try:
        return cls(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise UserError(f"invalid {cls.__name__}: {problems}") from None
