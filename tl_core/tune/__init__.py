"""Hyperparameter search with Ray Tune over the one training core (`tl tune`).

    space.py   SearchConfig and its search space, checked before any trial starts
    trial.py   a trial: `fit` with a TuneSession, or a TorchTrainer for multi-worker trials
    search.py  run_search: Tuner / Tuner.restore, trial outcomes, the best config and checkpoint
    record.py  the search in MLflow: parent run, child run per trial, plot of the trials

Ray is imported only when a search runs.
"""

from tl_core.tune.space import DEFAULT_SPACE, SearchConfig

__all__ = ["DEFAULT_SPACE", "SearchConfig", "run_search"]


def run_search(cfg: SearchConfig, on_trial=None) -> dict:
    from tl_core.tune.search import run_search as run

    return run(cfg, on_trial)
