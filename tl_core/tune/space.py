"""What a search is: `SearchConfig` (YAML for `tl tune`) and its search space, checked before any trial.

    base:   a TrainConfig (data, strategy, backbone, shots, epochs, ...): every trial starts here
    space:  setting -> spec, one of
              {"loguniform": [lo, hi]}  {"uniform": [lo, hi]}  {"randint": [lo, hi]}  (hi excluded)
              {"choice": [values]}      {"grid": [values]}
    search: random | grid | optuna      scheduler: asha | fifo

Lists of values mean what the search makes of them: `grid` tries every combination of `choice`
and `grid` lists (it refuses continuous ranges), in a shuffled order (see grid_points); `random`
samples `choice` lists and crosses `grid` lists with `num_samples`; `optuna` treats both as
categorical.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from typing import Any, Literal

from pydantic import Field, model_validator

from tl_core import storage
from tl_core.config import StepConfig, TrainConfig, validate, workdir
from tl_core.errors import UserError

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
RANGE_KINDS = ("loguniform", "uniform", "randint")

# The metrics the training core reports every epoch; a search never looks at the test split.
METRICS = {"val_accuracy": "max", "val_loss": "min", "train_loss": "min"}
DEFAULT_VAL_PER_CLASS = 10
DEFAULT_NUM_SAMPLES = 10
# `tl tune` without a space in its file: the learning rate and the weight decay, the two settings
# that matter for every strategy.
DEFAULT_SPACE = {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"choice": [0.0, 1e-4, 1e-3]}}


class SearchConfig(StepConfig):
    """`tl tune`: a hyperparameter search over the training core (named so, not TuneConfig, to
    keep clear of Ray's class of that name)."""

    base: dict = Field(..., description="the TrainConfig every trial starts from")
    space: dict[str, dict[str, Any]] = Field(..., description="setting -> {kind: values}")
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["asha", "fifo"] | None = Field(
        None, description="default: asha for one-process trials, fifo for multi-worker ones (see trial.py)")
    num_samples: int | None = Field(None, ge=1, description=f"trials (random, optuna; default {DEFAULT_NUM_SAMPLES})")
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of one trial (shared by its workers)")
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] | None = Field(None, description="default: max for accuracy, min for losses")
    grace_period: int = Field(1, ge=1, description="asha: epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="asha: 1/rf of the trials go on at each rung")
    sampler_seed: int = Field(0, description="seed of the random and optuna samplers (the trials take base.seed)")
    name: str | None = Field(None, description="default: the strategy and a hash of the search")
    storage: str | None = Field(None, description="folder or s3:// for Ray Tune's state; default $TL_WORKDIR/tune")
    resume: bool = Field(False, description="continue the search of the same name where it stopped")
    # Each report is a round trip from the trial to Tune's driver (about 6 ms here): 100 epochs of a
    # few images cost more in reports than in training. A FIFO search compares trials only at their
    # end and can do without them (auto's, tl_core/auto.py); ASHA stops trials on them.
    epoch_reports: bool = Field(True, description="report every epoch to Tune (off: a one-process trial reports only "
                                                  "its end, with no checkpoint before it; fifo only)")
    # A trial's model is a checkpoint in the search's storage, and the best one is copied and
    # logged to MLflow: 90 to 270 MB a MiniLM trial (its weights, and Adam's state where it trains
    # them). A search whose winner trains again (auto's) needs none of them: a day of auto's text
    # benches left 22 GB of them here. A trial on Ray Train (workers > 1) still keeps its latest
    # checkpoint (num_to_keep=1): it resumes from it when a worker is lost.
    keep_models: bool = Field(True, description="keep each trial's trained model and the best one (off: trials "
                                                "report metrics only; for a search whose choice trains again)")
    # The trials themselves, each a point of the space (every searched setting given): a search of
    # listed candidates (--strategy auto's), run as a grid search runs its points.
    points: list[dict[str, Any]] = Field(default_factory=list, description="trials to run, each a value of every "
                                                                          "searched setting (default: sampled)")

    @model_validator(mode="after")
    def _epoch_reports_off_only_with_fifo(self) -> "SearchConfig":
        if not self.epoch_reports and self.resolved_scheduler() != "fifo":
            raise ValueError(f"epoch_reports false leaves the {self.resolved_scheduler()} scheduler nothing to stop "
                             "trials on: set scheduler fifo, or leave epoch_reports on")
        return self

    def experiment_name(self) -> str:
        if self.name:
            return self.name
        # Settings that do not change which trials run are left out, so a resumed search keeps its name.
        key = self.fingerprint(exclude={"resume", "max_concurrent_trials", "storage", "name", "epoch_reports", "keep_models"})
        return f"{self.base.get('strategy', 'scratch')}-{key[:12]}"

    def storage_uri(self) -> str:
        return self.storage or storage.join(workdir(), "tune")

    def resolved_mode(self) -> str:
        return self.mode or METRICS[self.metric]

    def samples(self) -> int:
        """Trials that random and optuna searches draw (a grid search runs each of its points once)."""
        return self.num_samples or DEFAULT_NUM_SAMPLES

    def resolved_scheduler(self) -> str:
        """ASHA unless trials start worker groups: the V2 Tune + Train pattern with ASHA
        deadlocked on 2 CPUs (../shared/STACK-NOTES.md); FIFO did not."""
        if self.scheduler:
            return self.scheduler
        return "fifo" if self.multi_worker() else "asha"

    def multi_worker(self) -> bool:
        return self.base.get("workers", 1) > 1 or "workers" in self.space


def base_config(cfg: SearchConfig) -> TrainConfig:
    """The TrainConfig every trial starts from. The search needs validation data (ASHA and the
    final choice look at val accuracy, never test), so an unset val_per_class becomes 10."""
    values = dict(cfg.base)
    if not values.get("val_per_class") and not values.get("cv_folds"):  # cv_folds: validated on a fold of the shots
        values["val_per_class"] = DEFAULT_VAL_PER_CLASS
    base = validate(TrainConfig, values)
    if base.eval_every != 1:
        raise UserError(f"base.eval_every is {base.eval_every}: a search compares trials on {cfg.metric} "
                        "after every epoch, leave it at 1")
    # Trials run in Ray's worker processes, in another folder: local paths go there absolute.
    from tl_core.train.ray_runner import _absolute

    return base.model_copy(update={"data": _absolute(base.data), "backbone": _absolute(base.backbone),
                                   "teacher": _absolute(base.teacher), "source_data": _absolute(base.source_data)})


def _check_spec(name: str, spec: Any, search: str) -> tuple[str, list]:
    """(kind, values) of one setting's spec, or a UserError naming what is wrong."""
    where = f"space.{name}"
    if name not in TrainConfig.model_fields:
        close = difflib.get_close_matches(name, TrainConfig.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where}: {name!r} is not a TrainConfig setting{hint}")
    if name in ("eval_every", "data"):
        raise UserError(f"{where}: {name} cannot be searched (every trial must see the same validation data)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise UserError(f"{where}: write one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}, not {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: {kind} needs a non-empty list of values, not {values!r}")
    if kind in RANGE_KINDS:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UserError(f"{where}: {kind} needs [lo, hi] (two numbers), not {values!r}")
        lo, hi = values
        if lo >= hi:
            raise UserError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise UserError(f"{where}: loguniform needs lo > 0 (a log scale), got {lo}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise UserError(f"{where}: randint needs whole numbers, got {values!r}")
        if search == "grid" and kind != "randint":
            raise UserError(f"{where}: a grid search needs a list of values: use {{grid: [...]}} instead of {kind}")
    return kind, values


def _sample_points(kind: str, values: list) -> list:
    """Values that stand for the whole spec when TrainConfig checks it: the ends and a middle."""
    if kind == "uniform":
        return [values[0], (values[0] + values[1]) / 2, values[1]]
    if kind == "loguniform":
        return [values[0], math.sqrt(values[0] * values[1]), values[1]]
    if kind == "randint":
        return [values[0], values[1] - 1]
    return values


def check_space(cfg: SearchConfig, base: TrainConfig) -> dict[str, tuple[str, list]]:
    """Every spec well formed and every value one TrainConfig accepts; {name: (kind, values)}."""
    if not cfg.space:
        raise UserError("space is empty: name at least one setting to search, e.g. lr: {loguniform: [1e-4, 1e-2]}")
    if cfg.metric not in METRICS:
        raise UserError(f"metric {cfg.metric!r}: choose one of {sorted(METRICS)} (a search never looks at test data)")
    if cfg.search == "grid" and (cfg.num_samples or 1) != 1:
        raise UserError("a grid search runs every point once: leave num_samples unset")
    specs = {name: _check_spec(name, spec, cfg.search) for name, spec in cfg.space.items()}
    for point in cfg.points:
        if set(point) != set(specs):
            raise UserError(f"points: {point} must give a value of each searched setting, {sorted(specs)}, and no other")
    for name, (kind, values) in specs.items():
        for value in _sample_points(kind, values):
            try:
                validate(TrainConfig, {**base.model_dump(), name: value})
            except UserError as err:
                raise UserError(f"space.{name}: {value!r} is refused ({err})") from None
    return specs


def max_epochs(base: TrainConfig, specs: dict[str, tuple[str, list]]) -> int:
    """The longest trial's epochs: ASHA's budget per trial."""
    if "epochs" not in specs:
        return base.epochs
    kind, values = specs["epochs"]
    return int(max(values) - (1 if kind == "randint" else 0))


def grid_points(cfg: SearchConfig, specs: dict[str, tuple[str, list]]) -> list[dict]:
    """Every point of a grid search, shuffled (seeded). ASHA lets a trial go on when it is in the
    top 1/rf of the trials that reached the same epoch before it. Fed a grid in its written order
    (lr ascending, say: often the slowest learners first), every newcomer beats the bar and nearly
    every trial is promoted (bench/hpo_asha_vs_grid.py, before this shuffle: 69 % of the grid's
    epochs instead of about a third). A random order is what ASHA assumes."""
    values = [list(range(*v)) if kind == "randint" else v for kind, v in specs.values()]
    points = [dict(zip(specs, combo)) for combo in itertools.product(*values)]
    random.Random(cfg.sampler_seed).shuffle(points)
    return points


def trial_count(cfg: SearchConfig, specs: dict[str, tuple[str, list]]) -> int:
    """How many trials the whole search runs."""
    if cfg.points:
        return len(cfg.points)
    if cfg.search == "grid":
        return math.prod(len(range(*v)) if kind == "randint" else len(v) for kind, v in specs.values())
    if cfg.search == "random":  # `grid` lists are crossed with the samples
        return cfg.samples() * math.prod(len(v) for kind, v in specs.values() if kind == "grid")
    return cfg.samples()


def param_space(cfg: SearchConfig, base: TrainConfig, specs: dict[str, tuple[str, list]]) -> dict:
    """Ray Tune's param_space: the base settings as constants, the searched ones as Tune domains.
    (A grid search's trials are its listed points, which fix every searched setting.)"""
    from ray import tune

    def domain(kind: str, values: list):
        if kind == "loguniform":
            return tune.loguniform(*values)
        if kind == "uniform":
            return tune.uniform(*values)
        if kind == "randint":
            return tune.randint(*values)
        if kind == "grid" and cfg.search == "random":
            return tune.grid_search(values)
        return tune.choice(values)  # choice lists, and grid lists under optuna (which has no grid search)

    return {**base.model_dump(), **{name: domain(kind, values) for name, (kind, values) in specs.items()}}
