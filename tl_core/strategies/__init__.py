"""Transfer strategies as plug-ins: a registry maps a name to a small `Strategy` class.

A strategy decides four things, and the one training core (`tl_core.train.loop.fit`) does the
rest: which model to build from the pretrained backbone, which module and parameter groups the
optimiser trains (with which learning rates), what the training inputs are (images, or cached
features), and the loss of a batch. Adding a strategy is one new module and one test.
"""

from __future__ import annotations

from tl_core.strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(cfg) -> Strategy:
    from tl_core.errors import UserError

    if cfg.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {cfg.strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)


from tl_core.strategies import distill, finetune, linear_probe, multitask, scratch  # noqa: E402,F401
from tl_core.strategies import domain_adaptation  # noqa: E402,F401  (dann, mcc)
from tl_core.strategies import fewshot  # noqa: E402,F401  (protonet, maml, episodic-finetune)
from tl_core.strategies import simclr  # noqa: E402,F401
from tl_core.strategies import zero_shot  # noqa: E402,F401
