"""Checks of explainer options, shared by every method.

Each check returns the value in its plain Python type or raises :class:`methods.errors.MethodError`
worded ``"<option> must be <requirement>, got <value>"``, so a bad ``--steps 0`` and a bad ``mask_batch=2.5``
read alike. Booleans are never taken for numbers (``True`` is no step count); ``optional=True`` lets
``None`` through where the option may be left unset.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

from methods.errors import MethodError


def _refuse(name: str, requirement: str, value, optional: bool = False):
    raise MethodError(f"{name} must be {requirement}{' or None' if optional else ''}, got {value!r}")


def integer(name: str, value) -> int:
    """Any integer (a seed)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        _refuse(name, "an integer", value)
    return int(value)


def positive_int(name: str, value, optional: bool = False) -> int | None:
    """An integer >= 1 (a count or a batch size)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        _refuse(name, "a positive integer", value, optional)
    return int(value)


def positive_ints(name: str, values) -> tuple[int, ...]:
    """A non-empty iterable of integers >= 1 (not a string), as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        _refuse(name, "a non-empty sequence of positive integers", values)
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in values):
        _refuse(name, "a non-empty sequence of positive integers", values)
    return tuple(int(v) for v in values)


def in_interval(name: str, value, low: float = 0.0, high: float = 1.0, *, open_low: bool = False,
                open_high: bool = False) -> float:
    """A real number in the interval from ``low`` to ``high``, each end open or closed (a probability:
    (0, 1]; a pixel value: [0, 1]). NaN and strings are refused."""
    inside = (not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
              and (value > low if open_low else value >= low) and (value < high if open_high else value <= high))
    if not inside:
        _refuse(name, f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}", value)
    return float(value)


def flag(name: str, value) -> bool:
    """True or False (nothing else that merely tests true)."""
    if not isinstance(value, bool):
        _refuse(name, "True or False", value)
    return value


def choice(name: str, value, choices: Sequence[str], optional: bool = False) -> str | None:
    """One of ``choices`` (compared as given; callers lower-case first where case does not matter)."""
    if value is None and optional:
        return None
    if value not in choices:
        _refuse(name, f"one of {', '.join(choices)}", value, optional)
    return value
