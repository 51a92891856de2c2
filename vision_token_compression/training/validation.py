"""Checks of a run's settings, each error naming the command-line flag, the value and what is allowed.

Config dataclasses call these from ``__post_init__``, so a bad value stops a run before anything
expensive happens (CLIP loading, feature caching, the first step). The flag of a field is its name
with dashes (``sinkhorn_epsilon`` → ``--sinkhorn-epsilon``); the field is named too, for Python callers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def flag(field: str) -> str:
    """``--sinkhorn-epsilon (sinkhorn_epsilon)``: the command-line flag of a config field, and the field."""
    return f"--{field.replace('_', '-')} ({field})"


def _fail(field: str, value: Any, allowed: str, hint: str = "") -> None:
    raise ValueError(f"{flag(field)} must be {allowed}, got {value!r}.{' ' + hint if hint else ''}")


def check_int(field: str, value: Any, minimum: int | None = None, maximum: int | None = None, *,
              hint: str = "") -> None:
    """``value`` is an int (not a bool) in ``[minimum, maximum]`` (either bound may be None)."""
    if minimum is None:
        allowed = "an integer" if maximum is None else f"an integer ≤ {maximum}"
    else:
        allowed = f"an integer ≥ {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, allowed, hint)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(field, value, allowed, hint)


def check_number(
    field: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite real number (int or float, not a bool) within the given bounds."""
    if high == math.inf:
        allowed = f"a finite number {'>' if low_open else '≥'} {low:g}"
    else:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, allowed, hint)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        _fail(field, value, allowed, hint)


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        _fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_text(field: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is a non-empty string or path (or None when ``optional``)."""
    if optional and value is None:
        return
    if not (isinstance(value, str) or hasattr(value, "__fspath__")) or not str(value):
        _fail(field, value, "a non-empty path or name" + (" (or unset)" if optional else ""))
