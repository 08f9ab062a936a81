"""The architecture registry: a name maps to a function that builds a `Classifier`.

Architecture modules (`small_cnn.py`, `tv.py`, `text.py`, `efficientnet.py`) register themselves with
`@register_architecture`;
`tl_core.models` imports them. (`tl_core.registry.register_model` is another thing: the MLflow
model registry.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tl_core.errors import UserError
from tl_core.models.classifier import Classifier

MODELS: dict[str, Callable[..., Classifier]] = {}
# Keyword arguments an architecture takes by the input's shape [C, H, W] unless a config sets them.
SHAPE_DEFAULTS: dict[str, Callable[[list[int]], dict]] = {}
# The architecture the scratch baseline trains in place of a large pretrained one (a 22 M
# parameter encoder from random init on a few labels is no baseline anyone would run).
SCRATCH_STAND_INS: dict[str, str] = {}


@dataclass(frozen=True)
class Packaged:
    """Pretrained weights that an installed package ships: the backbone `packaged:NAME`, built
    with `weights="packaged"` (see `tl_core.checkpoints`). `weights_file()` gives the file whose
    sha256 identifies the backbone (and keys its feature caches); `in_channels` is what it reads."""

    weights_file: Callable[[], Path]
    in_channels: int


PACKAGED: dict[str, Packaged] = {}
# Per-channel mean and std (of pixels in [0, 1]) that a pretrained network's inputs must be
# normalised with: training, evaluation and the served model then use these, not the dataset's own.
INPUT_STATS: dict[str, dict] = {}


def register_architecture(name: str, shape_defaults: Callable[[list[int]], dict] | None = None,
                          scratch_stand_in: str | None = None, packaged: Packaged | None = None,
                          input_stats: dict | None = None):
    """Decorator: `@register_architecture("small_cnn")` over a function
    `(num_classes, in_channels, **kwargs) -> Classifier`; `shape_defaults(shape)` gives the
    keyword arguments that depend on the input's shape (e.g. a stem for small images);
    `scratch_stand_in` names the model the scratch baseline trains instead of this one;
    `packaged`: its pretrained weights come with a package; `input_stats`: {"mean", "std"} its
    inputs are normalised with."""

    def add(fn):
        MODELS[name] = fn
        if shape_defaults is not None:
            SHAPE_DEFAULTS[name] = shape_defaults
        if scratch_stand_in is not None:
            SCRATCH_STAND_INS[name] = scratch_stand_in
        if packaged is not None:
            PACKAGED[name] = packaged
        if input_stats is not None:
            INPUT_STATS[name] = input_stats
        return fn

    return add


def defaults_for_shape(name: str, shape: list[int]) -> dict:
    """The keyword arguments architecture `name` takes for inputs of `shape` when nothing says otherwise."""
    return SHAPE_DEFAULTS[name](shape) if name in SHAPE_DEFAULTS else {}


def create_model(name: str, num_classes: int, in_channels: int = 1, **kwargs) -> Classifier:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:  # the arguments checked against the architecture's signature, not found by a TypeError inside it
        inspect.signature(MODELS[name]).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as err:
        raise UserError(f"model {name} does not take these arguments ({err}): fix model_kwargs") from None
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def model_spec(name: str, num_classes: int, in_channels: int, kwargs: dict) -> dict:
    """What it takes to rebuild a model: stored in every checkpoint beside the state_dict."""
    return {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(kwargs)}


def build_from_spec(spec: dict) -> Classifier:
    return create_model(spec["name"], spec["num_classes"], spec["in_channels"], **spec.get("kwargs", {}))
