"""Transfer: the pretrained backbone to the target with a strategy, against a scratch baseline
on the same labels (tl_core.steps.transfer_step). Runs on Ray when RAY_ADDRESS is set."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def transfer(data: Input[Dataset], backbone: Input[Model], strategy: str, shots: int, epochs: int, lr: float,
             workers: int, tuned: str, checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train on `shots` labelled images per class (0: all). `tuned`: the HPO step's best config
    (JSON), which overrides the settings given here; "{}" keeps them."""
    import json

    from components import artifacts
    from tl_core.config import TrainConfig
    from tl_core.steps import transfer_step

    settings = dict(strategy=strategy, shots=shots or None, epochs=epochs, lr=lr, workers=workers) | json.loads(tuned)
    result = transfer_step(TrainConfig(**settings | dict(data=artifacts.uri(data), backbone=artifacts.uri(backbone))))
    artifacts.save(checkpoint, result["checkpoint"], result)
    gain = {k: v for k, v in result.items() if k in ("scratch_accuracy", "gain_over_scratch")}  # not for scratch
    artifacts.log_metrics(metrics, result["metrics"] | gain)
