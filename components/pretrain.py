"""Pretrain: a backbone trained from scratch on the source (tl_core.steps.pretrain_step).

Training runs on the Ray cluster named by RAY_ADDRESS when it is set (TrainConfig's runner
"auto"), so the pod only drives it: `workers` Ray Train workers, GPUs where the cluster has them.
"""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def pretrain(data: Input[Dataset], model: str, pretrain_epochs: int, pretrain_lr: float, batch_size: int, augment: int,
             workers: int, checkpoint: Output[Model], metrics: Output[Metrics]):
    """Pretrain `model` on the prepared source, configured as `tl run` does; an identical earlier
    run (of either) is reused. A packaged encoder is pretrained already: it is passed on."""
    from components import artifacts
    from tl_core.config import ExperimentSettings
    from tl_core.steps import pretrain_source

    settings = ExperimentSettings.of_step(model=model, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
                                          batch_size=batch_size, augment=augment, workers=workers)
    result = pretrain_source(settings, {**artifacts.summary(data), "path": artifacts.uri(data)})
    artifacts.save(checkpoint, result["checkpoint"], result)
    artifacts.log_metrics(metrics, result["metrics"] or {})
