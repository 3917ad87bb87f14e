"""Helpers the config sections use to check themselves: every failure is a :class:`ConfigError`."""
from __future__ import annotations

import math

from ..errors import ConfigError


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def finite(value: float, key: str, *, low: float = 0.0) -> None:
    need(math.isfinite(value) and value >= low, f"{key} must be a finite number >= {low:g}, got {value}")
