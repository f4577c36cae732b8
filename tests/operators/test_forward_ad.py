"""The forward-mode rules of ``_forward_ad``: shortcuts and the verified operations.

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

from curvops.operators._forward_ad import (
    CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES,
    DIFFERENTIABLE_TANGENT_RULES,
    first_unverified_operation,
    own_storage,
    tangent_rules,
)

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
            with tangent_rules():
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
    bias = (
        torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    )
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


def _relu_dual(call, x, x_dot, short):
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, x_dot)
        if short:
            with tangent_rules(differentiated=True):
                out = call(dual)
        else:
            out = call(dual)
        return fwAD.unpack_dual(out)


@pytest.mark.parametrize(
    "call",
    [F.relu, torch.relu, torch.Tensor.relu, torch.nn.ReLU()],
    ids=["F.relu", "torch.relu", "Tensor.relu", "nn.ReLU"],
)
def test_relu_shortcut_equals_torch_rule_with_graph(call):
    """Primal, tangent and their gradients w.r.t. the input and its tangent agree with torch's rule."""
    g = torch.Generator().manual_seed(2)
    results = []
    for short in (True, False):
        x = torch.randn(
            6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True
        )
        x_dot = torch.randn(6, 5, generator=g.manual_seed(4), dtype=torch.float64, requires_grad=True)
        primal, tangent = _relu_dual(call, x, x_dot, short)
        seed = torch.linspace(-1, 1, 30, dtype=torch.float64).view(6, 5)
        grads = torch.autograd.grad((primal * seed).sum() + (tangent * seed.flip(0)).sum(), (x, x_dot))
        results.append((primal.detach(), tangent.detach(), grads))
    (p1, t1, g1), (p2, t2, g2) = results
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_relu_shortcut_leaves_inplace_and_tangent_free_calls_to_torch():
    x = torch.randn(4, 3, dtype=torch.float64)
    with fwAD.dual_level(), tangent_rules(differentiated=True):
        assert fwAD.unpack_dual(F.relu(x)).tangent is None  # no tangent: plain relu
        dual = fwAD.make_dual(x.clone(), torch.ones_like(x))
        out = F.relu(dual, inplace=True)  # torch's in-place rule
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, (x > 0).to(x.dtype))


def test_own_storage_copies_only_views_into_larger_buffers():
    block = torch.randn(3, 4, 5)
    whole = torch.randn(4, 5)
    assert own_storage(whole) is whole
    part = own_storage(block[1])
    assert part.data_ptr() != block[1].data_ptr()
    assert torch.equal(part, block[1])
    assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    first = own_storage(block[0])
    assert first.data_ptr() != block.data_ptr()  # offset 0 but the storage holds three
    with fwAD.dual_level():
        # What it is for: make_dual keeps a tangent that owns its storage as it is.
        dual = fwAD.make_dual(torch.zeros(4, 5), whole)
        assert fwAD.unpack_dual(dual).tangent.data_ptr() == whole.data_ptr()


@pytest.mark.parametrize("differentiated", [True, False])
def test_relu_shortcut_only_on_request(differentiated):
    """The shortcut's tangent has no graph through the input; without it torch's rule stays (zeros for x)."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    x_dot = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level(), tangent_rules(differentiated=differentiated):
        tangent = fwAD.unpack_dual(F.relu(fwAD.make_dual(x, x_dot))).tangent
    torch.testing.assert_close(tangent, x_dot * (x > 0))
    g_x, g_dot = torch.autograd.grad(tangent.sum(), (x, x_dot), allow_unused=True)
    torch.testing.assert_close(g_dot, (x > 0).to(x.dtype))
    if differentiated:
        assert g_x is None  # no activation-sized zero gradient formed and added into x's
    else:
        assert g_x is not None
        assert not g_x.any()


def _fd_gradients(f, leaves, seed, eps=1e-6):
    """Gradients of ``⟨seed, J v⟩`` (J v of ``f`` at primals ``leaves[:3]`` along ``leaves[3:]``)
    w.r.t. every leaf, by central differences of forward-mode tangent *values*.

    Values only: torch's rules give right tangents; what is wrong on torch 2.13 is their
    derivative, and also the reverse-mode third derivative of layer_norm (the double-vjp
    trick, ``autograd.functional.jvp(create_graph=True)``, differentiated once more is off
    w.r.t. the input), so neither can be the reference. Error: truncation O(eps²) and
    rounding O(u/eps) ≈ 1e-10 relative in float64.
    """

    def value(ls):
        with torch.no_grad():
            return float((torch.func.jvp(f, tuple(ls[:3]), tuple(ls[3:]))[1] * seed).sum())

    base = [t.detach().clone() for t in leaves]
    grads = []
    for leaf in base:
        g = torch.zeros_like(leaf)
        for j in range(leaf.numel()):
            orig = leaf.view(-1)[j].item()
            leaf.view(-1)[j] = orig + eps
            up = value(base)
            leaf.view(-1)[j] = orig - eps
            down = value(base)
            leaf.view(-1)[j] = orig
            g.view(-1)[j] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def _layer_norm(x, w, b):
    return F.layer_norm(x, (5,), w, b, 1e-5)


def test_torch_layer_norm_rule_is_still_wrong_when_differentiated():
    """Why layer_norm is not a verified operation (LayerNorm models use double backward):
    torch's forward-mode layer_norm rule, differentiated, disagrees with finite differences.
    If a torch release fixes it this test fails: then measure whether reverse over forward
    pays off for transformers before adding it to DIFFERENTIABLE_TANGENT_RULES."""
    g = torch.Generator().manual_seed(6)
    leaves = [
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
        for s in ((3, 4, 5), (5,), (5,), (3, 4, 5), (5,), (5,))
    ]
    x, w, b, xd, wd, bd = leaves
    seed = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    f = _layer_norm
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(
            f(fwAD.make_dual(x, xd), fwAD.make_dual(w, wd), fwAD.make_dual(b, bd))
        ).tangent
    got = torch.autograd.grad((tangent * seed).sum(), x)[0]
    want = _fd_gradients(f, leaves, seed)[0]
    assert float((got - want).norm()) > 1e-3 * float(want.norm())


# ------------------------------------------------------------ operations verified for reverse over forward
DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps
#: float64 products of O(10) terms of magnitude O(1): rounding ≲ 10 eps; a margin of 10³ for
#: the two summation orders. The excluded rules are off by 1e-2 or more.
RTOL = 1e4 * EPS


#: For each entry of DIFFERENTIABLE_TANGENT_RULES, a function of two parameters ``a`` (3, 4)
#: and ``b`` (4, 3) whose graph holds that operation, with both arguments differentiated.
SAMPLES = {
    "AddmmBackward0": lambda a, b: torch.addmm(a[:, :3], a, b),
    "MmBackward0": lambda a, b: a @ b,
    "BmmBackward0": lambda a, b: torch.bmm(a.unsqueeze(0), b.unsqueeze(0)),
    "MvBackward0": lambda a, b: a @ b[:, 0],
    "ConvolutionBackward0": lambda a, b: F.conv2d(a.reshape(1, 2, 2, 3), b.reshape(3, 2, 2, 1)),
    "EmbeddingBackward0": lambda a, b: (
        F.embedding(torch.tensor([[0, 2], [1, 1]]), a, padding_idx=2) * b[0, 0]
    ),
    "TBackward0": lambda a, b: a.t() * b,
    "ViewBackward0": lambda a, b: (a @ b).view(9),
    "ReshapeAliasBackward0": lambda a, b: (a @ b).t().reshape(3, 3, 1),
    "UnsafeViewBackward0": lambda a, b: a.unsqueeze(0) @ b,
    "ExpandBackward0": lambda a, b: (a @ b).expand(2, 3, 3),
    "TransposeBackward0": lambda a, b: (a @ b).transpose(0, 1),
    "PermuteBackward0": lambda a, b: (a @ b).permute(1, 0),
    "SliceBackward0": lambda a, b: (a @ b)[1:],
    "SelectBackward0": lambda a, b: (a @ b)[1],
    "IndexBackward0": lambda a, b: (a @ b)[[0, 2, 2]],
    "UnsqueezeBackward0": lambda a, b: (a @ b).unsqueeze(1),
    "SqueezeBackward0": lambda a, b: (a @ b).unsqueeze(0).squeeze(),
    "SqueezeBackward1": lambda a, b: (a @ b).unsqueeze(0).squeeze(0),
    "CloneBackward0": lambda a, b: (a @ b).clone(),
    "CatBackward0": lambda a, b: torch.cat([a, b.t()]),
    "StackBackward0": lambda a, b: torch.stack([a, b.t()]),
    "SplitBackward0": lambda a, b: (a @ b).split(2, dim=1)[0] * (a @ b).split(2, dim=1)[1][:, :1],
    "SplitWithSizesBackward0": lambda a, b: torch.tanh((a @ b).split([1, 2], dim=0)[1]),
    "UnbindBackward0": lambda a, b: (a @ b).unbind(1)[2] * a[:, 0],
    "AliasBackward0": lambda a, b: (a @ b)[...],
    # a cast (Llama's RMSNorm and softmax cast to float32); the same dtype keeps float64 rounding
    "ToCopyBackward0": lambda a, b: (a @ b).to(DTYPE, copy=True),
    "AddBackward0": lambda a, b: a + b.t(),
    "SubBackward0": lambda a, b: a - b.t(),
    "RsubBackward1": lambda a, b: 1.0 - a @ b,
    "MulBackward0": lambda a, b: a * b.t(),
    # a product by a number as aten's own kernels form it (scaled-dot-product attention's)
    "MulBackward1": lambda a, b: torch.ops.aten.mul.Scalar(a @ b, 0.7),
    "DivBackward0": lambda a, b: a / (2.0 + b.t().exp()),
    "NegBackward0": lambda a, b: -(a @ b),
    "PowBackward0": lambda a, b: (a @ b) ** 3,
    "ExpBackward0": lambda a, b: (a @ b).exp(),
    "LogBackward0": lambda a, b: (1.0 + (a @ b) ** 2).log(),
    "SqrtBackward0": lambda a, b: (1.0 + (a @ b) ** 2).sqrt(),
    "RsqrtBackward0": lambda a, b: (1.0 + (a @ b) ** 2).rsqrt(),
    "TanhBackward0": lambda a, b: torch.tanh(a @ b),
    "SigmoidBackward0": lambda a, b: torch.sigmoid(a @ b),
    "ReluBackward0": lambda a, b: F.relu(a @ b) * (a @ b),
    "GeluBackward0": lambda a, b: F.gelu(a @ b),
    "SiluBackward0": lambda a, b: F.silu(a @ b),
    "WhereBackward0": lambda a, b: torch.where(a > 0, a * b.t(), a.exp()),
    "MaskedFillBackward0": lambda a, b: (a * b.t()).masked_fill(a > 0.5, 0.0),
    "SumBackward0": lambda a, b: (a @ b).tanh().sum() * a,
    "SumBackward1": lambda a, b: (a @ b).tanh().sum(1, keepdim=True) * a,
    "MeanBackward0": lambda a, b: (a @ b).tanh().mean() * a,
    "MeanBackward1": lambda a, b: (a @ b).tanh().mean(0) * b,
    "AvgPool2DBackward0": lambda a, b: F.avg_pool2d((a @ b).tanh().reshape(1, 1, 3, 3), 2, stride=1),
    "MaxPool2DWithIndicesBackward0": lambda a, b: F.max_pool2d(
        (a @ b).tanh().reshape(1, 1, 3, 3), 2, stride=1
    ),
    # conditionally verified: batch norm in eval mode (running statistics)
    "NativeBatchNormBackward0": lambda a, b: F.batch_norm(
        a @ b,
        torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE),
        torch.tensor([0.5, 1.5, 2.0], dtype=DTYPE),
        weight=b[0] + 1,
        bias=b[1],
        training=False,
    ),
}


def _graph_names(output: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


def _hvp_both_ways(
    function, seed: int = 0, shapes: tuple[tuple[int, ...], ...] = ((3, 4), (4, 3))
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``H v`` of ``ℓ(f(a, b, ...)) = Σ w·z + Σ z³/3`` (one parameter per shape) by reverse over
    forward (under tangent_rules, as the Hessian operator runs it) and by double backward; and
    ``z`` of the dual pass."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(shape, generator=g, dtype=DTYPE, requires_grad=True) for shape in shapes]
    directions = [torch.randn(shape, generator=g, dtype=DTYPE) for shape in shapes]

    def loss(z):  # a nonzero gradient w.r.t. z, and a second derivative
        w = torch.linspace(-1.0, 1.0, z.numel(), dtype=DTYPE).view_as(z)
        return (w * z).sum() + (z**3).sum() / 3

    with fwAD.dual_level(), tangent_rules(differentiated=True):
        z, z_dot = fwAD.unpack_dual(function(*map(fwAD.make_dual, leaves, directions)))
    (z_grad,) = torch.autograd.grad(loss(z), z, create_graph=True)
    fast = torch.autograd.grad((z_grad * z_dot).sum(), leaves)

    grads = torch.autograd.grad(loss(function(*leaves)), leaves, create_graph=True)
    exact = torch.autograd.grad(grads, leaves, grad_outputs=directions)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    return flat(fast), flat(exact), z


def test_every_verified_operation_has_a_check():
    structural = {"torch::autograd::AccumulateGrad", "torch::autograd::Identity"}  # leaves, make_dual
    assert set(SAMPLES) == (DIFFERENTIABLE_TANGENT_RULES - structural) | set(
        CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES
    )


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_verified_operation_rule_matches_double_backward(name):
    fast, exact, z = _hvp_both_ways(SAMPLES[name])
    names = _graph_names(z)
    assert name in names, f"the sample does not run {name} (it runs {sorted(names)})"
    assert first_unverified_operation(z) is None
    assert float(exact.norm()) > 0.1
    assert float((fast - exact).norm()) <= RTOL * float(exact.norm())


@pytest.mark.parametrize(
    "name, function",
    [
        # torch's own layer norm (an aten call no rule of tangent_rules sees)
        (
            "NativeLayerNormBackward0",
            lambda a, b: torch.ops.aten.native_layer_norm(a @ b, (3,), None, None, 1e-5)[0],
        ),
        ("NativeBatchNormBackward0", lambda a, b: F.batch_norm(a @ b, None, None, training=True)),
    ],
    ids=["layer_norm", "batch_norm_train"],
)
def test_excluded_operation_rule_is_wrong_when_differentiated(name, function):
    """Why these stay off the list: the same check fails on them (so it can fail)."""
    fast, exact, z = _hvp_both_ways(function)
    assert first_unverified_operation(z) == name
    assert float((fast - exact).norm()) > 1e-3 * float(exact.norm())


# ------------------------------------------------------------ rules replacing torch's when differentiated
def _attention(**options):
    """Scaled-dot-product attention of (query, key, value) on torch's math kernel (the one with a
    double backward on every device), with ``options``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **options)

    return attend


_KEEP = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
_QKV = ((2, 2, 4, 3), (2, 2, 5, 3), (2, 2, 5, 3))

#: name -> (function of the parameters, their shapes, the node torch's primal leaves in the graph).
#: The parameters are the normalised (or attended) tensors themselves: their tangents are the
#: ``ẋ`` of the rules, their gradients the reverse mode through the rules' primal and tangent.
RULES = {
    "layer_norm-1d": (
        lambda x, w, b: F.layer_norm(x, (5,), w, b),
        ((2, 3, 5), (5,), (5,)),
        "NativeLayerNorm",
    ),
    "layer_norm-2d-eps": (
        lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-2),
        ((2, 3, 4), (3, 4), (3, 4)),
        "NativeLayerNorm",
    ),
    "layer_norm-no-affine": (lambda x: F.layer_norm(x, (6,)), ((4, 6),), "NativeLayerNorm"),
    "layer_norm-constant-weight": (
        lambda x, b: F.layer_norm(x, (5,), torch.linspace(0.5, 2.0, 5, dtype=DTYPE), b),
        ((3, 5), (5,)),
        "NativeLayerNorm",
    ),
    "layer_norm-torch": (
        lambda x, w: torch.layer_norm(x, [5], w, None, 1e-5, False),
        ((3, 5), (5,)),
        "NativeLayerNorm",
    ),
    "layer_norm-module-of-product": (
        lambda a, b: torch.nn.LayerNorm(3, dtype=DTYPE)(a @ b),
        ((3, 4), (4, 3)),
        "NativeLayerNorm",
    ),
    # the normalised tensor, weight and bias as functions of the parameters: the tangents are
    # differentiated too
    "layer_norm-affine-of-product": (
        lambda a, b: F.layer_norm(torch.tanh(a @ b), (3,), a[0, :3] + 1.0, b[:3, 0]),
        ((3, 4), (4, 3)),
        "NativeLayerNorm",
    ),
    "layer_norm-2d-of-product": (
        lambda a, b: F.layer_norm((a @ b).expand(2, 3, 3), (3, 3), b[:3] * a[:, :3], None, eps=1e-3),
        ((3, 4), (4, 3)),
        "NativeLayerNorm",
    ),
    "softmax-of-product": (lambda a, b: torch.softmax(a @ b, 0) * a[:, :3], ((3, 4), (4, 3)), "Softmax"),
    "log_softmax-of-product": (lambda a, b: F.log_softmax(b @ a, -1), ((3, 4), (4, 3)), "LogSoftmax"),
    "rms_norm-of-product": (lambda a, b: F.rms_norm(a @ b, (3,), b[1, :]), ((3, 4), (4, 3)), None),
    "attention-of-products": (
        lambda a, b: _attention(is_causal=True)(
            (a @ b).view(1, 1, 3, 3), torch.tanh(a @ b).view(1, 1, 3, 3), (b @ a)[:3, :3].view(1, 1, 3, 3)
        ),
        ((3, 4), (4, 3)),
        "SafeSoftmax",
    ),
    # products with numbers and with tensors that carry no tangent (only x does)
    "scaling-number": (lambda x: torch.tanh(x * 0.5) / 0.3, ((3, 4),), None),
    "scaling-number-first": (lambda x: 0.5 * torch.tanh(2 * x), ((3, 4),), None),
    "scaling-constant-tensor": (
        lambda x: torch.mul(torch.linspace(-1.0, 2.0, 4, dtype=DTYPE), torch.tanh(x)).div(
            torch.linspace(1.0, 2.0, 12, dtype=DTYPE).view(3, 1, 4)
        ),
        ((3, 4),),
        None,
    ),
    "scaling-function-of-the-parameters": (
        lambda a, b: (a @ b) * (b @ a)[:3, :3].detach() / a[0, 0],
        ((3, 4), (4, 3)),
        None,
    ),
    "softmax-F-last": (lambda x: F.softmax(x, dim=-1), ((3, 4, 5),), "Softmax"),
    "softmax-torch-middle": (lambda x: torch.softmax(x, 1), ((3, 4, 5),), "Softmax"),
    "softmax-Tensor-first": (lambda x: x.softmax(0), ((3, 4, 5),), "Softmax"),
    "softmax-dtype": (lambda x: F.softmax(x, -1, dtype=DTYPE), ((4, 5),), "Softmax"),
    "softmax-masked": (
        lambda x: torch.softmax(x.masked_fill(~_KEEP[[0, 2, 3]], float("-inf")), -1),
        ((3, 5),),
        "Softmax",
    ),
    "log_softmax-F-last": (lambda x: F.log_softmax(x, dim=-1), ((3, 4, 5),), "LogSoftmax"),
    "log_softmax-torch-middle": (lambda x: torch.log_softmax(x, 1), ((3, 4, 5),), "LogSoftmax"),
    "log_softmax-Tensor-first": (lambda x: x.log_softmax(dim=0), ((3, 4, 5),), "LogSoftmax"),
    "rms_norm-1d": (lambda x, w: F.rms_norm(x, (5,), w), ((2, 3, 5), (5,)), None),
    "rms_norm-2d-eps": (lambda x, w: F.rms_norm(x, (3, 4), w, eps=1e-2), ((2, 3, 4), (3, 4)), None),
    "rms_norm-no-weight": (lambda x: F.rms_norm(x, (6,)), ((4, 6),), None),
    "attention": (_attention(), _QKV, "SafeSoftmax"),
    "attention-causal-scale": (
        _attention(is_causal=True, scale=0.3),
        ((2, 2, 4, 3), (2, 2, 4, 3), (2, 2, 4, 3)),
        "SafeSoftmax",
    ),
    "attention-bool-mask-empty-row": (_attention(attn_mask=_KEEP), _QKV, "SafeSoftmax"),
    "attention-float-mask": (
        _attention(attn_mask=torch.linspace(-2.0, 1.0, 20, dtype=DTYPE).view(4, 5)),
        _QKV,
        "SafeSoftmax",
    ),
    "attention-gqa": (
        _attention(enable_gqa=True),
        ((1, 4, 4, 3), (1, 2, 5, 3), (1, 2, 5, 3)),
        "SafeSoftmax",
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_matches_double_backward(name, seed):
    """The rules of tangent_rules(differentiated=True) for the operations torch differentiates
    wrongly (layer norm) or not at all (softmax): reverse over forward through them equals
    double backward through torch's own operations, in float64, along random directions."""
    function, shapes, node = RULES[name]
    fast, exact, z = _hvp_both_ways(function, seed=seed, shapes=shapes)
    assert first_unverified_operation(z) is None
    if node is not None:  # the rule ran: torch's fused primal, labelled
        assert f"{node}Backward0" in _graph_names(z)
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(shape, generator=g, dtype=DTYPE) for shape in shapes]
    with fwAD.dual_level(), tangent_rules(differentiated=True):
        primal = function(*leaves)
    torch.testing.assert_close(primal, function(*leaves), rtol=0, atol=0)  # the same primal
    assert float(exact.norm()) > 0.1
    assert float((fast - exact).norm()) <= RTOL * float(exact.norm())


@pytest.mark.parametrize(
    "name, function",
    [
        (
            "NativeLayerNormBackward0",
            lambda a, b: torch.ops.aten.native_layer_norm(a @ b, (3,), b[0], None, 0.0)[0],
        ),
        ("SoftmaxBackward0", lambda a, b: torch.ops.aten._softmax(a @ b, -1, False)),
        ("LogSoftmaxBackward0", lambda a, b: torch.ops.aten._log_softmax(a @ b, 0, False)),
    ],
    ids=["layer_norm", "softmax", "log_softmax"],
)
def test_torch_own_node_of_a_replaced_operation_is_refused(name, function):
    """A call no rule sees (here an aten operation; in a model, a path tangent_rules misses) leaves
    torch's node without the rules' label: refused, though the rules accept the same name."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g, dtype=DTYPE, requires_grad=True)
    b = torch.randn(4, 3, generator=g, dtype=DTYPE, requires_grad=True)
    with fwAD.dual_level(), tangent_rules(differentiated=True):
        z = fwAD.unpack_dual(function(fwAD.make_dual(a, torch.ones_like(a)), b)).primal
    assert first_unverified_operation(z) == name
