"""The architecture registry: a name maps to a function that builds a `Classifier`.

Architecture modules (`small_cnn.py`, `tv.py`) register themselves with `@register_architecture`;
`tl_core.models` imports them. (`tl_core.registry.register_model` is another thing: the MLflow
model registry.)
"""

from __future__ import annotations

from typing import Callable

from tl_core.errors import UserError
from tl_core.models.classifier import Classifier

MODELS: dict[str, Callable[..., Classifier]] = {}


def register_architecture(name: str):
    """Decorator: `@register_architecture("small_cnn")` over a function
    `(num_classes, in_channels, **kwargs) -> Classifier`."""

    def add(fn):
        MODELS[name] = fn
        return fn

    return add


def create_model(name: str, num_classes: int, in_channels: int = 1, **kwargs) -> Classifier:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def model_spec(name: str, num_classes: int, in_channels: int, kwargs: dict) -> dict:
    """What it takes to rebuild a model: stored in every checkpoint beside the state_dict."""
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(kwargs)}


def build_from_spec(spec: dict) -> Classifier:
    return create_model(spec["name"], spec["num_classes"], spec["in_channels"], **spec.get("kwargs", {}))
