"""Transfer strategies as plug-ins: a registry maps a name to a small `Strategy` class.

A strategy decides four things, and the one training core (`tl_core.train.loop.fit`) does the
rest: which model to build from the pretrained backbone, which module and parameter groups the
optimiser trains (with which learning rates), what the training inputs are (images, or cached
features), and the loss of a batch. Adding a strategy is one new module (registering itself in
`_registry.py`), one line below and one test.
"""

from __future__ import annotations

from tl_core.strategies import distill, finetune, linear_probe, multitask, scratch
from tl_core.strategies import domain_adaptation  # dann, mcc
from tl_core.strategies import fewshot  # protonet, maml, episodic-finetune
from tl_core.strategies import setfit, simclr, zero_shot
from tl_core.strategies._registry import STRATEGIES, create_strategy, register_strategy
from tl_core.strategies.base import Strategy

__all__ = [
    "STRATEGIES", "Strategy", "create_strategy", "register_strategy",
    "distill", "domain_adaptation", "fewshot", "finetune", "linear_probe", "multitask", "scratch", "setfit", "simclr", "zero_shot",
]
