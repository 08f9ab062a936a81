"""`run_search`: a Ray Tune search over the training core, recorded in MLflow.

    check the config and the space  ->  Tuner (new) or Tuner.restore (--resume)  ->  fit
    ->  every trial described (completed, stopped early by ASHA, failed with its error)
    ->  the best completed trial's config (best.yaml) and checkpoint copied under the work dir
    ->  one MLflow parent run with a child run per trial (record.py)

Everything Tune keeps (trial results, checkpoints, the searcher's state) lives under
`<storage>/<name>`, local or s3://: that is what an interrupted search resumes from.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from tl_core import storage
from tl_core.config import TrainConfig, workdir
from tl_core.errors import UserError
from tl_core.train.session import CHECKPOINT_FILE
from tl_core.tune.space import SearchConfig, base_config, check_space, grid_points, max_epochs, param_space, trial_count
from tl_core.tune.trial import trainable

Listener = Callable[[dict], None]
_listener: Listener | None = None  # who hears of trial events in this process (see TrialEvents)


class SearchInterrupted(UserError):
    """The search stopped before every trial finished (Ctrl+C, SIGUSR1, a lost driver)."""


class TrialEvents(tune.Callback):
    """Tells this process's listener of each trial's reports and end. It holds no state on purpose:
    Tune pickles its callbacks with the search, and a resumed search must not call the listener
    of the run it resumes (a progress printer of another process, a test's interrupter)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._tell("result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._tell("complete", trial, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._tell("error", trial, trial.last_result)

    @staticmethod
    def _tell(event: str, trial, result: dict | None) -> None:
        if _listener is not None:
            result = result or {}
            _listener({"event": event, "trial_id": trial.trial_id, "config": trial.config,
                       "epochs": result.get("training_iteration", 0), "metrics": result})


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"  # short: the default name spells out every parameter


@dataclass
class Trial:
    """One trial as the search ended: what it tried, how far it went, how well it did."""

    trial_id: str
    config: dict
    params: dict
    status: str  # completed | stopped (by the scheduler) | failed
    epochs: int
    metrics: dict
    error: str | None = None
    history: list[dict] = field(default_factory=list)

    def summary(self, metric: str) -> dict:
        out = {"trial_id": self.trial_id, "params": self.params, "status": self.status, "epochs": self.epochs,
               "val_accuracy": self.metrics.get("val_accuracy"), "error": self.error}
        if "val_correct" in self.metrics:  # a candidate of auto: which held-out labels it got right
            out["val_correct"] = self.metrics["val_correct"]
        if metric != "val_accuracy":
            out[metric] = self.metrics.get(metric)
        if self.status == "completed":
            out["test_accuracy"] = self.metrics.get("test_accuracy")
        return out


def one_line_error(err: BaseException | None) -> str | None:
    """`FloatingPointError: the loss became nan...` rather than a remote traceback: the last line of
    the error's text that names an exception (Ray wraps a trial's exception in a RayTaskError, and a
    worker's in a WorkerGroupError), else the error's type and first line."""
    if err is None:
        return None
    cause = getattr(err, "cause", None) or err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    if named:
        return named[-1]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".strip()


def history_of(result) -> list[dict]:
    """The trial's per-epoch metrics as the training core reported them (one row per epoch; a
    resumed trial may have reported an epoch twice: the later one wins)."""
    df = result.metrics_dataframe
    if df is None or df.empty or "epoch" not in df:
        return []
    keep = [c for c in df.columns if c not in AUTO_RESULT_KEYS and not c.startswith("config/")]
    rows: dict[int, dict] = {}
    for row in df[keep].to_dict("records"):
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)}
        values["epoch"] = int(values["epoch"])
        rows[values["epoch"]] = values
    return [rows[e] for e in sorted(rows)]


def describe(result, searched: list[str]) -> Trial:
    config = dict(result.config)
    history = history_of(result)
    epochs = history[-1]["epoch"] + 1 if history else 0
    if result.error is not None:
        status = "failed"
    else:
        status = "completed" if epochs >= config["epochs"] else "stopped"
    return Trial(trial_id=Path(result.path).name.removeprefix("trial-"), config=config,
                 params={name: config[name] for name in searched}, status=status, epochs=epochs,
                 metrics=dict(result.metrics or {}), error=one_line_error(result.error), history=history)


def pick_best(trials: list[Trial], metric: str, mode: str) -> Trial:
    """The best trial that ran its whole budget (its checkpoint is a finished model); ties go to
    the lower validation loss, then to the earlier trial."""
    completed = [t for t in trials if t.status == "completed" and t.metrics.get(metric) is not None]
    if not completed:
        errors = sorted({t.error for t in trials if t.error})
        raise UserError(f"no trial of the search finished its epochs ({len(trials)} trials"
                        + (f"; first error: {errors[0]}" if errors else "") + "): widen the space or fix the base config")
    sign = 1 if mode == "max" else -1
    return max(completed, key=lambda t: (sign * t.metrics[metric], -t.metrics.get("val_loss", 0.0)))


def checkpoint_bytes(result, filesystem) -> bytes:
    ckpt = result.checkpoint
    if ckpt is None and result.metrics.get("checkpoint_path"):  # a multi-worker trial: Ray Train's own checkpoint
        ckpt = tune.Checkpoint(result.metrics["checkpoint_path"], filesystem=filesystem)
    if ckpt is None:
        raise RuntimeError(f"trial {result.path} finished without a checkpoint")
    with ckpt.as_directory() as folder:
        return Path(folder, CHECKPOINT_FILE).read_bytes()


def make_tuner(cfg: SearchConfig, base: TrainConfig, specs: dict, storage_path: str, filesystem, fn) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tl_core.tune.resume import ResumableSearchGenerator, ResumableVariantGenerator

    if cfg.resolved_scheduler() == "asha" and cfg.multi_worker():
        warnings.warn("ASHA with multi-worker trials deadlocked on a 2-CPU machine (STACK-NOTES): "
                      "use scheduler: fifo unless the cluster has CPUs to spare", stacklevel=3)
    if cfg.resolved_scheduler() == "asha":
        budget = max_epochs(base, specs)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=budget,
                                  grace_period=min(cfg.grace_period, budget), reduction_factor=cfg.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    # Both searchers take the concurrency limit themselves, and restore in agreement with the trials (resume.py).
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=cfg.sampler_seed)
        if cfg.max_concurrent_trials:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent_trials)
        search_alg = ResumableSearchGenerator(searcher)
    else:
        points = cfg.points or (grid_points(cfg, specs) if cfg.search == "grid" else None)
        search_alg = ResumableVariantGenerator(points_to_evaluate=points, max_concurrent=cfg.max_concurrent_trials or 0,
                                               random_state=cfg.sampler_seed)
    return tune.Tuner(
        fn,
        param_space=param_space(cfg, base, specs),
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.resolved_mode(), scheduler=scheduler, search_alg=search_alg,
            num_samples=trial_count(cfg, specs) if cfg.search == "grid" or cfg.points else cfg.samples(),
            trial_dirname_creator=_trial_dirname,
            reuse_actors=True,  # one process runs trial after trial: torch is imported once, not per trial
        ),
        run_config=tune.RunConfig(
            name=cfg.experiment_name(), storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=0),  # a failed trial is recorded, not retried
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[TrialEvents()], verbose=0,
        ),
    )


def check_saved_trials(experiment_path: str, filesystem, name: str) -> None:
    """Refuse, in one line, a saved search whose trial list cannot be read. Tune copies that file to
    storage in place, so a driver killed during the copy leaves it empty or cut short (CI's
    killed-driver test once did); Tune then logs that it failed to restore, starts from no trials,
    and its searcher fails deep inside Ray. The folder is left as it is."""
    import json

    from ray.train._internal.storage import get_fs_and_path
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    fs, path = get_fs_and_path(experiment_path, storage_filesystem=filesystem)
    newest = _find_newest_experiment_checkpoint(path, fs=fs)  # the very file Tune.restore reads
    if newest is None:
        return  # not Tune's layout: Tune says what it misses
    with fs.open_input_stream(newest) as f:
        data = f.readall()
    try:
        json.loads(data)
    except ValueError:
        raise UserError(f"the saved trials of the search {name} ({newest}) are empty or cut short: its driver was "
                        "stopped while Tune was saving them, and the search cannot resume from them. Its finished "
                        "trials' results and checkpoints are still in that folder; run the search again under "
                        "another name") from None


# Ray Tune's error for a trial whose latest checkpoint, as its saved state names it, is gone.
CHECKPOINT_GONE = "does not exist on storage anymore"


def run_search(cfg: SearchConfig, on_trial: Listener | None = None) -> dict:
    """Run (or resume) the search; returns a JSON-able summary. `on_trial` hears of every trial's
    reports ({"event": "result"}) and end ("complete" or "error")."""
    global _listener
    from tl_core.ray_cluster import init_ray, storage_for
    from tl_core.train.ray_runner import preflight
    from tl_core.tune.record import record_search

    started = time.perf_counter()
    base = base_config(cfg)
    specs = check_space(cfg, base)
    preflight(base)  # data, shots + validation images, backbone, strategy: fail here, not in every trial
    name = cfg.experiment_name()

    # Tune saves its state each time trials have checkpointed num_to_keep times, i.e. often here,
    # and warns about it every time; that state is what a resumed search starts from.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints its header and paths even at verbose=0; TrialEvents reports instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray()
    storage_path, filesystem = storage_for(cfg.storage_uri())
    fn = trainable(cfg.cpus_per_trial, storage_path, filesystem, cfg.epoch_reports, cfg.keep_models)
    experiment_path = f"{storage_path.rstrip('/')}/{name}"  # as Ray sees it: absolute, or bucket/key with a filesystem
    experiment_uri = storage.join(cfg.storage_uri(), name) if storage.is_s3(cfg.storage_uri()) else experiment_path
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if resumed and not cfg.resume:
        raise UserError(f"a search named {name} already exists in {cfg.storage_uri()}: add --resume to finish it "
                        "(finished trials are kept), or set another name")
    if resumed:  # finished trials stay as they are; unfinished ones go on from their latest checkpoint
        check_saved_trials(experiment_path, filesystem, name)
        tuner = tune.Tuner.restore(experiment_path, fn, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=filesystem)
    else:
        tuner = make_tuner(cfg, base, specs, storage_path, filesystem, fn)

    _listener = on_trial
    try:
        results = tuner.fit()
        # Tune's saved state can name a checkpoint it has deleted since: a search killed after a
        # trial's newest checkpoint pushed out its oldest (num_to_keep) and before the state that
        # no longer names it was saved (Ray forces that save only after the deletion). Such a trial
        # fails to restore; it trains again from its start, finished trials are kept (restart_errored
        # also reruns a trial that had failed before the interruption: it fails again the same way).
        restarted = sum(1 for r in results if r.error and CHECKPOINT_GONE in str(r.error))
        if restarted:
            results = tune.Tuner.restore(experiment_path, fn, resume_unfinished=True, resume_errored=False,
                                         restart_errored=True, storage_filesystem=filesystem).fit()
    finally:
        _listener = None

    # A trial that ended on its own or by the scheduler's decision has a last result marked done;
    # one cut short by an interruption has not (Tune stops it too, but it resumes next time). One
    # that ran all its epochs has ended too: killed between its last epoch and Tune's record of
    # its end, it resumes from its last checkpoint with nothing left to train and reports nothing.
    trials = [describe(result, list(specs)) for result in results]
    expected = trial_count(cfg, specs)
    ended = sum(1 for r, t in zip(results, trials) if t.status != "stopped" or (r.metrics or {}).get("done"))
    if ended < expected:
        raise SearchInterrupted(f"the search {name} stopped with {ended} of {expected} trials finished: run it again "
                                "with --resume to finish it (finished trials are kept)")

    best = pick_best(trials, cfg.metric, cfg.resolved_mode())
    best_result = next(r for r, t in zip(results, trials) if t is best)
    best_config = TrainConfig(**best.config)
    out = storage.join(workdir(), "models", f"tune-{name}")
    best_yaml = yaml.safe_dump(best_config.model_dump(), sort_keys=False)
    ckpt = checkpoint_bytes(best_result, filesystem) if cfg.keep_models else None
    storage.write_bytes(storage.join(out, "best.yaml"), best_yaml.encode())
    if ckpt is not None:
        storage.write_bytes(storage.join(out, CHECKPOINT_FILE), ckpt)

    summary = {
        "name": name,
        "storage": experiment_uri,
        "resumed": resumed,
        "search": cfg.search,
        "scheduler": cfg.resolved_scheduler(),
        "metric": cfg.metric,
        "best_trial": best.trial_id,
        "best_params": best.params,
        "best_config": best_config.model_dump(),
        "best_config_file": storage.join(out, "best.yaml"),
        "best_checkpoint": storage.join(out, CHECKPOINT_FILE) if ckpt is not None else None,
        "best_val_accuracy": best.metrics.get("val_accuracy"),
        f"best_{cfg.metric}": best.metrics.get(cfg.metric),
        "best_test_accuracy": best.metrics.get("test_accuracy"),
        "trials": [t.summary(cfg.metric) for t in trials],
        "trials_completed": sum(t.status == "completed" for t in trials),
        "trials_stopped": sum(t.status == "stopped" for t in trials),
        "trials_failed": sum(t.status == "failed" for t in trials),
        "trial_epochs_total": sum(t.epochs for t in trials),
        "trials_restarted": restarted,  # resumed trials whose checkpoint Tune had deleted (above)
    }
    summary["seconds"] = time.perf_counter() - started
    summary["run_id"] = record_search(cfg, summary, trials, best_yaml, ckpt)
    return summary
