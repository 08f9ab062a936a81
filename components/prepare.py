"""Data prep: a data URI -> a prepared dataset (tl_core.steps.prepare_step)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Output

from components import tl_component


@tl_component
def prepare(uri: str, dataset: Output[Dataset], like: Optional[Input[Dataset]] = None, model: str = "",
            text_column: str = "", label_column: str = "", header: bool = True, image_size: int = 0,
            channels: int = 0):
    """Prepare the target `uri` (a text source laid out as `text_column`, `label_column` and
    `header` say, "": the default column; images at `image_size` and `channels`, 0: the target's
    own); with `like`, the source `uri` of a `model` at that
    prepared target's shape, as `tl run` does: nothing where `model` is a packaged encoder, its
    own source."""
    from components import artifacts
    from tl_core.config import ExperimentSettings
    from tl_core.steps import prepare_source, prepare_step

    if like:
        result = prepare_source(ExperimentSettings(source=uri, model=model), artifacts.summary(like))
    else:
        settings = ExperimentSettings(target=uri, text_column=text_column or None, label_column=label_column or None,
                                      header=header, image_size=image_size or None, channels=channels or None)
        result = prepare_step(settings.target_prepare())
    artifacts.save(dataset, result["path"], result)
