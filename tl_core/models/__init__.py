"""Models by name: `create_model(name, num_classes, in_channels, **kwargs)`.

Every model is a `Classifier`: a `backbone` (an `nn.Sequential` of blocks ending in a flat
feature vector) and a replaceable linear `head`. Transfer strategies work on these two parts:
freeze the first k blocks, give the backbone a lower learning rate, swap the head.

The registry is `_registry.py`; each architecture module registers itself there, and importing
this package imports them all (a new architecture: one module, one line below).
"""

from __future__ import annotations

from tl_core.models import efficientnet, small_cnn, text, tv  # the built-in architectures register themselves
from tl_core.models._registry import (
    INPUT_STATS, MODELS, PACKAGED, SCRATCH_STAND_INS, Packaged, build_from_spec, create_model, defaults_for_shape, model_spec, register_architecture,
)
from tl_core.models.classifier import Classifier
from tl_core.models.predict import predict_logits

__all__ = [
    "INPUT_STATS", "MODELS", "PACKAGED", "SCRATCH_STAND_INS", "Classifier", "Packaged", "build_from_spec", "create_model", "defaults_for_shape", "model_spec", "predict_logits", "register_architecture",
    "efficientnet", "small_cnn", "text", "tv",
]
