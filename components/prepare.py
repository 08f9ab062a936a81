"""Data prep: a data URI -> a prepared dataset (tl_core.steps.prepare_step)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Output

from components import tl_component


@tl_component
def prepare(uri: str, dataset: Output[Dataset], like: Optional[Input[Dataset]] = None):
    """Prepare the target `uri`; with `like`, prepare the source `uri` at that dataset's shape, as
    `tl run` does."""
    from components import artifacts
    from tl_core.config import ExperimentSettings
    from tl_core.steps import prepare_step

    if like:
        cfg = ExperimentSettings(source=uri).source_prepare(artifacts.summary(like)["shape"])
    else:
        cfg = ExperimentSettings(target=uri).target_prepare()
    result = prepare_step(cfg)
    artifacts.save(dataset, result["path"], result)
