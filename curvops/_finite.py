"""One finiteness test shared by the operators and the algorithms."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (no NaN, no ±Inf).

    One reduction instead of an elementwise mask (on a CPU ``isfinite(x).all()`` costs four
    passes, about 0.25 ms for 270k floats, per check): NaN and Inf propagate through a sum,
    so a finite sum proves every entry finite; only a non-finite sum (possibly an overflow of
    finite entries) is settled elementwise.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
