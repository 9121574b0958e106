"""Argument checks the layers share: each returns the value or raises a one-line
TypeError/ValueError that names the argument."""

from __future__ import annotations

import numbers


def positive_int(name: str, value: object) -> int:
    """``value`` as an int, or a one-line TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def positive_float(name: str, value: object) -> float:
    """``value`` as a finite float > 0, or a one-line TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of {type(value).__name__}")
    if not 0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, or a one-line TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of {type(value).__name__}")
    return value
