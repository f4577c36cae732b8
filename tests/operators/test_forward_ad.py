"""The forward-mode shortcut for layers whose input carries no tangent.

Checked against torch's own forward-mode rules (the same primal and tangent, also as
functions of the parameters: the reverse-over-forward Hessian differentiates the tangent)
and for what it is for: one matrix product fewer per such layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from curvops.operators._forward_ad import tangent_shortcuts

LAYERS = {
    "linear": (F.linear, (5, 7), (4, 7), {}),
    "conv1d": (F.conv1d, (4, 3, 3), (2, 3, 9), {"padding": 1}),
    "conv2d": (F.conv2d, (4, 3, 3, 3), (2, 3, 6, 6), {"stride": 2}),
    "conv3d": (F.conv3d, (2, 3, 2, 2, 2), (1, 3, 4, 4, 4), {"dilation": 1}),
}


def _dual_call(func, weight, bias, x, options, short, input_tangent=None):
    g = torch.Generator().manual_seed(1)
    w_dot = torch.randn(weight.shape, generator=g, dtype=weight.dtype)
    b_dot = None if bias is None else torch.randn(bias.shape, generator=g, dtype=bias.dtype)
    with fwAD.dual_level():
        w = fwAD.make_dual(weight, w_dot)
        b = None if bias is None else fwAD.make_dual(bias, b_dot)
        xin = x if input_tangent is None else fwAD.make_dual(x, input_tangent)
        if short:
            with tangent_shortcuts():
                out = func(xin, w, b, **options)
        else:
            out = func(xin, w, b, **options)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_shortcut_equals_torch_rule_with_graph(name, with_bias):
    func, w_shape, x_shape, options = LAYERS[name]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    params = [weight] + ([bias] if with_bias else [])
    results = []
    for short in (True, False):
        primal, tangent = _dual_call(func, weight, bias, x, options, short)
        seed_p = torch.ones_like(primal)
        seed_t = torch.linspace(-1, 1, tangent.numel(), dtype=torch.float64).view_as(tangent)
        # Both outputs as differentiable functions of the parameters.
        grads = torch.autograd.grad((primal * seed_p).sum() + (primal * tangent * seed_t).sum(), params)
        results.append((primal.detach(), tangent.detach(), grads))
    (p1, t1, g1), (p2, t2, g2) = results
    torch.testing.assert_close(p1, p2, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(t1, t2, rtol=1e-13, atol=1e-13)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_inputs_with_a_tangent_keep_torch_rule():
    """A layer inside the network (its input has a tangent) is left to torch unchanged."""
    func, w_shape, x_shape, options = LAYERS["linear"]
    weight = torch.randn(w_shape, dtype=torch.float64)
    x = torch.randn(x_shape, dtype=torch.float64)
    x_dot = torch.randn(x_shape, dtype=torch.float64)
    short = _dual_call(func, weight, None, x, options, True, input_tangent=x_dot)
    plain = _dual_call(func, weight, None, x, options, False, input_tangent=x_dot)
    torch.testing.assert_close(short[1], plain[1], rtol=1e-13, atol=1e-13)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_shortcut_drops_the_zero_tangent_product():
    weight = torch.randn(5, 7, dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64)
    counts = {}
    for short in (True, False):
        with _CountMatmuls() as counter:
            _dual_call(F.linear, weight, None, x, {}, short)
        counts[short] = counter.count
    assert counts[True] == 2  # the primal x Wᵀ and the tangent x Ẇᵀ, nothing else
    # torch 2.13's own rule also multiplies an expanded zero input tangent (3 products).
    assert counts[False] >= counts[True]
