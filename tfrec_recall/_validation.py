"""Argument checks shared by every constructor: errors name the argument and the value received."""
from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(name: str, value, minimum: int = 1) -> int:
    """``value`` must be an integer >= ``minimum`` (message: "NAME must be an integer >= MIN, got VALUE")."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_positive_int(name: str, value) -> int:
    """``value`` must be an integer >= 1 (message: "NAME must be a positive integer, got VALUE")."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def require_finite_nonnegative(name: str, value) -> float:
    """``value`` must be a finite real number >= 0, not a bool (message: "NAME must be a finite number >= 0,
    got VALUE")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def require_finite_positive(name: str, value) -> float:
    """``value`` must be a finite real number > 0, not a bool (message: "NAME must be a finite number > 0,
    got VALUE")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def require_dropout(name: str, value) -> float:
    """``value`` must be a real number in [0, 1), not a bool (message: "NAME must be in [0, 1), got VALUE")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
