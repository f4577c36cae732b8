"""One finiteness test shared by the operators and the algorithms."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (no NaN, no ±Inf).

    One reduction instead of an elementwise mask (``isfinite(x).all()`` writes a mask and
    reads it back, several passes over memory per check, where a sum reads ``x`` once): NaN
    and Inf propagate through a sum, so a finite sum proves every entry finite; only a
    non-finite sum (possibly an overflow of finite entries) is settled elementwise.

    Parameters
    ----------
    tensor : Tensor
        Any shape; floating or complex (integer tensors are always finite).

    Returns
    -------
    bool
        True when no entry is NaN, +Inf or -Inf.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
