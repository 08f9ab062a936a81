"""Pretrain: a backbone trained from scratch on the source (tl_core.steps.pretrain_step).

Training runs on the Ray cluster named by RAY_ADDRESS when it is set (TrainConfig's runner
"auto"), so the pod only drives it: `workers` Ray Train workers, GPUs where the cluster has them.
"""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def pretrain(data: Input[Dataset], model: str, epochs: int, workers: int,
             checkpoint: Output[Model], metrics: Output[Metrics]):
    """Pretrain `model` on the prepared source; an identical earlier run is reused."""
    from components import artifacts
    from tl_core.config import TrainConfig
    from tl_core.steps import pretrain_step

    result = pretrain_step(TrainConfig(data=artifacts.uri(data), model=model, epochs=epochs, workers=workers))
    artifacts.save(checkpoint, result["checkpoint"], result)
    artifacts.log_metrics(metrics, result["metrics"])
