"""`scratch`: the same architecture from random init, same labels and budget: the baseline."""

from tl_core.strategies._registry import register_strategy
from tl_core.strategies.base import Strategy


@register_strategy
class Scratch(Strategy):
    name = "scratch"
    needs_backbone = False
    streams = True
