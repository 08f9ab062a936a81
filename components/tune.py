"""HPO: search transfer settings around a base config with Ray Tune (tl_core.tune.run_search, as `tl tune`)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def tune(data: Input[Dataset], backbone: Input[Model], source: Input[Dataset], strategy: str, model: str, shots: int,
         epochs: int, lr: float, batch_size: int, augment: int, workers: int, search_space: str, num_samples: int,
         metrics: Output[Metrics]) -> str:
    """Search `search_space` (JSON: setting -> {"loguniform": [lo, hi]} | {"choice": [...]} | ...)
    around the transfer config `tl run` would train; returns the best config (TrainConfig JSON)."""
    import json

    from components import artifacts
    from tl_core.config import ExperimentSettings
    from tl_core.tune import SearchConfig, run_search

    settings = ExperimentSettings.of_step(model=model, shots=shots, epochs=epochs, lr=lr, batch_size=batch_size,
                                          augment=augment, workers=workers)
    base = settings.search_base(artifacts.uri(data), artifacts.uri(backbone), strategy, artifacts.uri(source))
    # resume: a retried step finishes the search it started (finished trials kept), or gives back
    # the result of one that had finished.
    result = run_search(SearchConfig(base=base, space=json.loads(search_space), num_samples=num_samples, resume=True))
    metrics.log_metric("best_val_accuracy", float(result["best_val_accuracy"]))
    return json.dumps(result["best_config"])
