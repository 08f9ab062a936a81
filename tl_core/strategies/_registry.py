"""The strategy registry: a name maps to a `Strategy` class.

Each strategy module registers its classes with `@register_strategy`; `tl_core.strategies`
imports them all.
"""

from __future__ import annotations

from tl_core.errors import UserError
from tl_core.strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(cfg) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {cfg.strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg)
