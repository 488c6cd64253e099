"""Reading request values, the same way for every setting of every method.

One notion of unset: None is unset; so is a sub-message's 0 / "" / false / [] when it
came over the wire, as proto3 cannot tell those from a field never set (top-level
request parameters are `optional` on the wire and keep their zeros). One parser per
kind of value, each naming the field and what would be accepted. A wrong type raises
`WrongType`, which is both a TypeError and a ValueError: the runtime answers either
with INVALID_ARGUMENT, and Python callers may catch either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum
from typing import Any

from caikit.core import DataObjectBase


class WrongType(TypeError, ValueError):
    """A request value of the wrong type."""


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def message_fields(message: Any, valid: Iterable[str], field: str) -> dict[str, Any]:
    """A request's sub-message (a dataobject off the wire, or a dict from Python) as
    {name: value} for the fields it sets. A dict may only name fields in `valid`."""
    valid = list(valid)
    if message is None:
        return {}
    if isinstance(message, dict):
        unknown = sorted(set(message) - set(valid))
        if unknown:
            raise ValueError(f"`{field}` has unknown field(s) {unknown}; valid fields are {valid}.")
        return {name: value for name, value in message.items() if value is not None}
    if not isinstance(message, DataObjectBase):
        raise WrongType(
            f"`{field}` must be a {field} message or a dict, got {type(message).__name__}."
        )
    values = {name: getattr(message, name, None) for name in valid}
    return {name: value for name, value in values.items() if not unset_on_the_wire(value)}


def unset_on_the_wire(value: Any) -> bool:
    """What a proto3 field holds when it was never set."""
    return (
        value is None
        or (not isinstance(value, bool) and value in (0, "", [], ()))
        or value is False
    )


def described(value: Any) -> str:
    """A value as an error message quotes it; a sub-message's 0 may mean "unset"."""
    return "0 (or unset)" if value == 0 and not isinstance(value, bool) else _shown(value)


def integer(value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(
            f"`{field}` must be an integer, got {type(value).__name__} {_shown(value)}."
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"`{field}` must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{field}` must be <= {maximum}, got {_shown(value, 40)}.")
    return value


def number(
    value: Any,
    field: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number in the interval from `low` to `high` (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrongType(f"`{field}` must be a number, got {type(value).__name__} {_shown(value)}.")
    if not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number, got {value}.")
    below = value < low or (low_open and value == low)
    above = value > high or (high_open and value == high)
    if below or above:
        raise ValueError(
            f"`{field}` must be {_interval(low, high, low_open, high_open)}, got {value:g}."
        )
    return float(value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise WrongType(f"`{field}` must be true or false, got {_shown(value)}.")
    return value


def choice(value: Any, field: str, options: Iterable[str]) -> str:
    """One of `options` (lower case), given in any case."""
    options = list(options)
    if not isinstance(value, str) or value.lower() not in options:
        raise ValueError(f"`{field}` must be one of {options}, got {_shown(value)}.")
    return value.lower()


def member(value: Any, enum_type: type[Enum], field: str, aliases: dict[str, str] | None = None):
    """A member of `enum_type`, given as itself or by name (any case, or an alias)."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        name = (aliases or {}).get(name, name)
        if name in enum_type.__members__:
            return enum_type[name]
    valid = list(enum_type.__members__) + list(aliases or {})
    raise ValueError(f"`{field}` must be one of {valid}, got {_shown(value)}.")
