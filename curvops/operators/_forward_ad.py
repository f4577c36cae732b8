"""Forward-mode AD through the model without wasted products on tangent-free inputs.

torch's forward-AD rules for ``linear`` and the convolutions materialise the missing
tangent of an input that carries none (the data entering the first layer) as an expanded
zero tensor and multiply it with the weight: one full matrix product per such layer, plus,
when the graph is kept, its backward. On an MLP 784-256-256-10 that is a third of a
gradient per forward. :func:`tangent_shortcuts` routes these layers to the two products
that are needed: ``f(x, W)`` for the primal and ``f(x, Ẇ) (+ ḃ)`` for the tangent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LAYERS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})


def _split(t: Any) -> tuple[Any, Any]:
    """(primal, tangent or None) of a tensor; (t, None) for anything else (a missing bias)."""
    if not torch.is_tensor(t):
        return t, None
    primal, tangent = fwAD.unpack_dual(t)
    return primal, tangent


class _TangentShortcuts(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LAYERS and args and torch.is_tensor(args[0]):
            x_primal, x_tangent = _split(args[0])
            if x_tangent is None:
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                w_primal, w_tangent = _split(weight)
                b_primal, b_tangent = _split(bias)
                if w_tangent is not None:
                    rest = args[3:]
                    options = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
                    # The mode is off while its handler runs: these calls are torch's own.
                    primal = func(x_primal, w_primal, b_primal, *rest, **options)
                    tangent = func(x_primal, w_tangent, b_tangent, *rest, **options)
                    return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


@contextlib.contextmanager
def tangent_shortcuts() -> Iterator[None]:
    """Within a ``fwAD.dual_level()``: linear and convolution layers whose input has no tangent skip the zero-tangent product."""
    with _TangentShortcuts():
        yield
