"""Checks of explainer options, shared by every method.

Each check returns the value in its plain Python type or raises :class:`methods.errors.MethodError`
worded ``"<option> must be <requirement>, got <value>"``, so a bad ``--steps 0`` and a bad ``mask_batch=2.5``
read alike. Booleans are never taken for numbers (``True`` is no step count); ``optional=True`` lets
``None`` through where the option may be left unset.

:class:`Option` declares one option once, next to its method: the registry, the scripts' flags, the checks
and the run identity are read from it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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


def positive_real(name: str, value) -> float:
    """A finite real number > 0 (a stabiliser)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        _refuse(name, "a positive number", value)
    return float(value)


def non_negative_real(name: str, value) -> float:
    """A finite real number >= 0 (a stabiliser that may be switched off)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        _refuse(name, "a non-negative number", value)
    return float(value)


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


def boolean_from_text(text: str) -> bool | str:
    """A true/false flag's text (``--clip-biases false``): true, false, yes, no, on, off, 1 or 0 as a bool;
    any other text is returned as it is, for the option's :func:`flag` check to refuse with its name."""
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    return words.get(str(text).strip().lower(), text)


def choice(name: str, value, choices: Sequence[str], optional: bool = False) -> str | None:
    """One of ``choices`` (compared as given; callers lower-case first where case does not matter)."""
    if value is None and optional:
        return None
    if value not in choices:
        _refuse(name, f"one of {', '.join(choices)}", value, optional)
    return value


@dataclass(frozen=True)
class Option:
    """One method option, declared once next to its method and registered with it (``register(...,
    options=(...))``).

    name: the builder's keyword. flag: the scripts' flag (``--masks``). default: the value when not given (the
    class's keyword default reads it). check: ``check(name, value) -> value`` or MethodError, one of the checks
    above (the class calls :meth:`validate`). help: what it is, with the paper's symbol. type, nargs: argparse's
    for one word and for several. parse: turns the flag's text into the value where type alone cannot (words
    or numbers). shown: the default as the help shows it, where the value alone would not say it.
    """

    name: str
    flag: str
    default: object
    check: Callable[[str, object], object]
    help: str
    type: Callable[[str], object] = str
    nargs: str | None = None
    parse: Callable[[object], object] | None = None
    shown: str | None = None

    @property
    def dest(self) -> str:
        """The argparse attribute of :attr:`flag`."""
        return self.flag.lstrip("-").replace("-", "_")

    def validate(self, value):
        """``value`` in its plain type, or MethodError naming the option."""
        return self.check(self.name, value)

    def from_flag(self, value):
        """The builder value of the flag's parsed ``value``."""
        return self.parse(value) if self.parse is not None else value

    def default_text(self) -> str:
        """The default as the help shows it."""
        if self.shown is not None:
            return self.shown
        if isinstance(self.default, (tuple, list)):
            return " ".join(str(v) for v in self.default)
        return str(self.default)
