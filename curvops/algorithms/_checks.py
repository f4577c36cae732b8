"""Argument checks shared by the algorithms."""

from __future__ import annotations

import numbers
from typing import Any, Literal

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")


def check_int(value: Any, name: str, minimum: int) -> int:
    """Validate an integer argument ``>= minimum`` (bools rejected).

    Parameters
    ----------
    value
        The argument.
    name
        Its name, for the message.
    minimum
        Smallest allowed value.

    Returns
    -------
    int
        ``value`` as a Python int.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (or is a bool).
    ValueError
        If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_probe(kind: str) -> str:
    """Validate a probe distribution name.

    Parameters
    ----------
    kind
        ``"rademacher"`` or ``"gaussian"``.

    Returns
    -------
    str
        ``kind``.

    Raises
    ------
    ValueError
        For another name.
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {PROBE_KINDS}, got {kind!r}")
    return kind


def check_seed(seed: Any) -> int | None:
    """Validate ``seed``: ``None`` or a non-negative integer.

    Parameters
    ----------
    seed
        The argument.

    Returns
    -------
    int or None
        The seed.

    Raises
    ------
    TypeError, ValueError
        As ``check_int`` with minimum 0.
    """
    if seed is None:
        return None
    return check_int(seed, "seed", 0)
