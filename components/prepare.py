"""Data prep: a data URI -> a prepared dataset (tl_core.steps.prepare_step)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Output

from components import tl_component


@tl_component
def prepare(uri: str, dataset: Output[Dataset], like: Optional[Input[Dataset]] = None):
    """Prepare `uri`; with `like`, at that dataset's image shape (the source at the target's)."""
    from components import artifacts
    from tl_core.config import PrepareConfig
    from tl_core.steps import prepare_step

    shape = artifacts.summary(like)["shape"] if like else [None, None]
    result = prepare_step(PrepareConfig(uri=uri, channels=shape[0], image_size=shape[-1]))
    artifacts.save(dataset, result["path"], result)
