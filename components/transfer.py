"""Transfer: the pretrained backbone to the target with a strategy, against a scratch baseline
on the same labels (tl_core.steps.transfer_step). Runs on Ray when RAY_ADDRESS is set."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import tl_component


@tl_component
def transfer(data: Input[Dataset], backbone: Input[Model], source: Input[Dataset], strategy: str, model: str,
             shots: int, epochs: int, lr: float, batch_size: int, augment: int, workers: int, tuned: str,
             backbone_choice: str, checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train on `shots` labelled images per class (0: none, for dann and mcc; -1: all), configured
    as `tl run` does (`model`'s recipe for the strategy where `epochs`, `lr` or `batch_size` is 0);
    the source goes to the strategies that train on it. `tuned`: the HPO step's
    best config (a whole TrainConfig, JSON) to train instead; "{}" for none. `backbone_choice`
    "auto": from the candidate `tl rank` puts first, `backbone` one of them; "": from `backbone`."""
    import json

    from components import artifacts
    from tl_core.config import AUTO, ExperimentSettings, TrainConfig
    from tl_core.rank import with_ranked_backbone
    from tl_core.steps import transfer_step

    best = json.loads(tuned)
    settings = ExperimentSettings.of_step(model=model, shots=shots, epochs=epochs, lr=lr, batch_size=batch_size,
                                          augment=augment, workers=workers)
    cfg = TrainConfig(**best) if best else settings.transfer(
        artifacts.uri(data), artifacts.uri(backbone), strategy, source_data=artifacts.uri(source))
    # auto's candidates each with its recipe, less the settings given (as tl run's auto row)
    recipes = settings.candidate_recipes(cfg) if cfg.strategy == AUTO else None
    if backbone_choice == AUTO:
        result = with_ranked_backbone(cfg, lambda chosen: transfer_step(chosen, recipes=recipes),
                                      also=[artifacts.uri(backbone)])
    else:
        result = transfer_step(cfg, recipes=recipes)
    artifacts.save(checkpoint, result["checkpoint"], result)
    gain = {k: v for k, v in result.items() if k in ("scratch_accuracy", "gain_over_scratch")}  # not for scratch
    artifacts.log_metrics(metrics, result["metrics"] | gain)
