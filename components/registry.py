"""Register and promote: the MLflow model registry (tl_core.registry), one component each, so
the pipeline can put its gate between them."""

from kfp.dsl import Dataset, Input, Model

from components import tl_component


@tl_component
def register(model: Input[Model], data: Input[Dataset], model_name: str) -> int:
    """Register the checkpoint as a new version of `model_name` (alias `challenger`, lineage
    tags, test metrics on `data`); returns the version number."""
    from components import artifacts
    from tl_core.registry import register_model

    return register_model(artifacts.uri(model), model_name, artifacts.uri(data))["version"]


@tl_component
def promote(model_name: str, version: int, data: Input[Dataset], min_accuracy: float, min_delta: float) -> str:
    """Move `champion` to `version` if it reaches `min_accuracy` and beats the champion by
    `min_delta` on `data`'s test split (both scored now, the decision recorded on the version);
    returns the decision: promoted, refused or lost."""
    from components import artifacts
    from tl_core import registry

    return registry.promote(model_name, artifacts.uri(data), min_accuracy, min_delta, version=version)["decision"]
