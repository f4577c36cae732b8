"""Forward-mode AD through the model, with rules torch gets wasteful or wrong.

torch's forward-AD rules for ``linear`` and the convolutions materialise the missing
tangent of an input that carries none (the data entering the first layer) as an expanded
zero tensor and multiply it with the weight: one full matrix product per such layer, plus,
when the graph is kept, its backward. On an MLP 784-256-256-10 that is a third of a
gradient per forward. :func:`tangent_shortcuts` routes these layers to the two products
that are needed: ``f(x, W)`` for the primal and ``f(x, Ẇ) (+ ḃ)`` for the tangent.

With ``differentiated=True`` (the tangent is differentiated afterwards: the
reverse-over-forward Hessian product) relu's rule is replaced too: torch's
``threshold_backward(ẋ, x, 0)``, differentiated, returns an activation-sized zero tensor for
``x`` that is then added into its gradient. Here the tangent is
``threshold_backward(ẋ, relu(x).detach(), 0)``: the same values, with no graph through ``x``
(relu's second derivative is zero almost everywhere: the same product). On an H200 the
first version of this rule (``ẋ · 1[relu(x) > 0]``) made the product 9-10% faster and the
CNN's peak 15% lower; without a graph torch's rule is already right.

Not replaced, on purpose: torch 2.13's ``layer_norm`` rule, differentiated, gives Hessian
products 25% off with no error, and its ``softmax`` rule cannot be differentiated at all.
Correct replacements in differentiable primitives (tried 2026-12-02, in the history) let a GPT-2 take reverse
over forward, but it measured slower there than double backward (H200, fp32: 3.85 vs 3.28
gradients, 13.8 vs 10.7 GiB), so such models keep failing the Hessian operator's one-time
check and use double backward.
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
_RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu})


def _split(t: Any) -> tuple[Any, Any]:
    """(primal, tangent or None) of a tensor; (t, None) for anything else (a missing bias)."""
    if not torch.is_tensor(t):
        return t, None
    return tuple(fwAD.unpack_dual(t))


def _linear_like(func, args, kwargs):
    x_primal, x_tangent = _split(args[0])
    if x_tangent is not None:
        return NotImplemented
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    w_primal, w_tangent = _split(weight)
    b_primal, b_tangent = _split(bias)
    if w_tangent is None:
        return NotImplemented
    rest = args[3:]
    options = {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
    primal = func(x_primal, w_primal, b_primal, *rest, **options)
    tangent = func(x_primal, w_tangent, b_tangent, *rest, **options)
    return fwAD.make_dual(primal, tangent)


def _relu(func, args, kwargs):
    if len(args) != 1 or kwargs.get("inplace", False):
        return NotImplemented
    x_primal, x_tangent = _split(args[0])
    if x_tangent is None:
        return NotImplemented
    primal = torch.relu(x_primal)
    # torch's own formula with the primal detached: the tangent's graph then runs through
    # ẋ alone (its backward is threshold_backward again). A float-by-bool mask product costs
    # ~8x as much on the CPU (the bool mask is cast to a float copy first).
    return fwAD.make_dual(primal, torch.ops.aten.threshold_backward(x_tangent, primal.detach(), 0))


class _TangentShortcuts(TorchFunctionMode):
    def __init__(self, differentiated: bool) -> None:
        super().__init__()
        self.rules = {f: _linear_like for f in _LAYERS}
        if differentiated:
            self.rules.update({f: _relu for f in _RELUS})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.rules.get(func)
        if rule is not None and args and torch.is_tensor(args[0]):
            # The mode is off while its handler runs: the rules' calls are torch's own.
            result = rule(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger buffer.

    ``fwAD.make_dual`` copies a tangent that does not own exactly its storage into a fresh
    zero-filled buffer, at every call; copying once per product, before the loop over
    batches, avoids one allocation, fill and copy of the parameter per batch.
    """
    if t.storage_offset() == 0 and t.is_contiguous() and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def tangent_shortcuts(differentiated: bool = False) -> Iterator[None]:
    """Within a ``fwAD.dual_level()``: linear and convolution layers whose input has no tangent skip the zero-tangent product.

    Parameters
    ----------
    differentiated : bool, optional
        The tangent will be differentiated (reverse over forward): also replace relu's
        rule (module docstring). Without a graph torch's rule is cheaper. Default False.
    """
    with _TangentShortcuts(differentiated):
        yield
