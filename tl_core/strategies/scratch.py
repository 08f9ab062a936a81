"""`scratch`: the same architecture from random init, same labels and budget: the baseline.

Where the backbone is a large pretrained encoder with a registered stand-in (`minilm-l6`:
`text_cnn`), the stand-in trains instead, unless `--model` names the architecture.
"""

from tl_core.models import SCRATCH_STAND_INS
from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy


@register_strategy
class Scratch(Strategy):
    name = "scratch"
    needs_backbone = False
    streams = True

    def architecture(self, backbone, shape):
        name, kwargs = super().architecture(backbone, shape)
        if backbone is not None and not self.cfg.model and name in SCRATCH_STAND_INS:
            return SCRATCH_STAND_INS[name], dict(self.cfg.model_kwargs)
        return name, kwargs
