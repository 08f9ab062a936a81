"""HPO: search transfer settings around a base config with Ray Tune (tl_core.tune.run_search, as `tl tune`)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def tune(data: Input[Dataset], backbone: Input[Model], strategy: str, shots: int, epochs: int, lr: float,
         workers: int, search_space: str, num_samples: int, metrics: Output[Metrics]) -> str:
    """Search `search_space` (JSON: setting -> {"loguniform": [lo, hi]} | {"choice": [...]} | ...)
    around the base transfer config; returns the best config (TrainConfig JSON)."""
    import json

    from components import artifacts
    from tl_core.tune import SearchConfig, run_search

    base = dict(data=artifacts.uri(data), backbone=artifacts.uri(backbone), strategy=strategy, shots=shots or None,
                epochs=epochs, lr=lr, workers=workers)
    result = run_search(SearchConfig(base=base, space=json.loads(search_space), num_samples=num_samples))
    metrics.log_metric("best_val_accuracy", float(result["best_val_accuracy"]))
    return json.dumps(result["best_config"])
