"""Forward-mode AD through the model, with rules torch gets wasteful or wrong.

torch's forward-AD rules for ``linear`` and the convolutions materialise the missing
tangent of an input that carries none (the data entering the first layer) as an expanded
zero tensor and multiply it with the weight: one full matrix product per such layer, plus,
when the graph is kept, its backward (see benchmarks/results/flop_bounds_*).
``tangent_rules`` routes these layers to the two products that are needed: ``f(x, W)``
for the primal and ``f(x, Ẇ) (+ ḃ)`` for the tangent.

With ``differentiated=True`` (the tangent is differentiated afterwards: the
reverse-over-forward Hessian product) relu's rule is replaced too: torch's
``threshold_backward(ẋ, x, 0)``, differentiated, returns an activation-sized zero tensor for
``x`` that is then added into its gradient. Here the tangent is
``threshold_backward(ẋ, relu(x).detach(), 0)``: the same values, with no graph through ``x``
(relu's second derivative is zero almost everywhere: the same product), so the product does
less work and holds less memory (see benchmarks/results/reverse_over_forward_*). Without a
graph torch's rule is already right.

Two rules make forward mode the exact adjoint of reverse mode (``J v`` of the GGN,
Fisher and Jacobian operators against their ``Jᵀ u``), where torch's rules differ:

- an ``nn.Embedding`` with ``padding_idx``: reverse mode gives the padding row zero gradient,
  torch's forward rule differentiates it. Here the output rows at padding positions are
  detached, so both modes treat them as constants (Hugging Face's Llama sets
  ``padding_idx=pad_token_id``: padded language-model batches hit this).
- a region of the forward pass run under ``torch.no_grad()`` (or ``inference_mode``):
  reverse mode treats its outputs as constants, forward mode propagates tangents through it.
  Here every torch function called while gradients are disabled returns detached outputs
  (``detach`` drops the tangent in forward mode and in ``torch.func.jvp`` alike). The
  tangent passes therefore run with gradients enabled, on detached parameters.

Reverse over forward (the Hessian product) differentiates the tangent rules, and some of
torch's are wrong when differentiated: ``layer_norm``'s and ``batch_norm``'s treat their saved
statistics as constants (Hessian products silently wrong; PyTorch issues 196699 and
196700), softmax's reuses an output in place (the backward pass fails). With
``differentiated=True`` this module's own rules replace them for ``layer_norm``, ``rms_norm``,
``softmax``, ``log_softmax`` and ``scaled_dot_product_attention`` (its math kernel, with the
softmax rule): the primal is torch's operation (reverse over forward differentiates it once,
where torch is right), the tangent is written so that its reverse mode is right, and the
primal's autograd node is labelled as the rule's (``_mark``). Every transformer built
from these (Hugging Face GPT-2 and Llama, eager or SDPA attention) then runs reverse over
forward.

That product runs only through operations on ``DIFFERENTIABLE_TANGENT_RULES``, whose rules
are verified against double backward in float64 (``tests/operators/test_forward_ad.py``), and
through nodes labelled by a rule here; the Hessian operator checks every batch's graph with
``first_unverified_operation``. A structural check, not a comparison of numbers: no data
can fool it (a first batch whose loss gradient is zero made any comparison of the two products
agree); torch's own ``NativeLayerNormBackward0`` (a call no rule sees) is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

_LAYERS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})
_RELUS = frozenset({F.relu, torch.relu, torch.Tensor.relu})
_MULTIPLICATIONS = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul})
_DIVISIONS = frozenset({torch.Tensor.__truediv__, torch.Tensor.div, torch.div})
_LAYER_NORMS = frozenset({F.layer_norm, torch.layer_norm})
_SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})
_LOG_SOFTMAXES = frozenset({F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax})


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
    # ẋ alone (its backward is threshold_backward again). A float-by-bool mask product would
    # first cast the mask to a float copy.
    return fwAD.make_dual(primal, torch.ops.aten.threshold_backward(x_tangent, primal.detach(), 0))


def _scaling(func, args, kwargs):
    """``x · c`` or ``x / c`` where only ``x`` carries a tangent (``c`` a number or a tensor
    without one): the tangent ``ẋ · c`` (``ẋ / c``). torch's rule also forms ``x · ċ`` for the
    zero tangent of ``c`` and materialises it at ``x``'s size before adding it."""
    if len(args) != 2 or kwargs:  # out=, rounding_mode=, ...
        return NotImplemented
    x, other = args
    multiply = func in _MULTIPLICATIONS
    if multiply and torch.is_tensor(other) and _split(x)[1] is None:
        x, other = other, x  # c · x
    x_primal, x_tangent = _split(x)
    if x_tangent is None:
        return NotImplemented
    if torch.is_tensor(other):
        if _split(other)[1] is not None:
            return NotImplemented
    elif isinstance(other, bool) or not isinstance(other, (int, float)):
        return NotImplemented
    operation = torch.mul if multiply else torch.div
    return fwAD.make_dual(operation(x_primal, other), operation(x_tangent, other))


def _embedding(func, args, kwargs):
    padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
    if padding_idx is None:
        return NotImplemented
    indices = args[0]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if padding_idx < 0:
        padding_idx += weight.shape[0]  # as F.embedding normalises it
    output = func(*args, **kwargs)
    padded = (indices == padding_idx).unsqueeze(-1)
    # Reverse mode's zero gradient for the padding row, in forward mode: constant rows there.
    return torch.where(padded, output.detach(), output)


#: Key under which ``_mark`` labels an autograd node (``Node.metadata``) made by a rule of
#: this module: the node's tangent was computed by that rule, not by torch's forward-mode rule.
_RULE_MARK = "curvops_tangent_rule"


def _mark(t: Tensor) -> Tensor:
    """Label the autograd node that made ``t`` as made by a differentiable rule of this module.

    The primal of a normalization or softmax is torch's own fused operation (its reverse mode is
    right: reverse over forward differentiates the primal once), so its node carries torch's
    name; the label tells ``first_unverified_operation`` that the tangent beside it came
    from a rule below, and a node of the same name without it (torch's rule) is still refused.
    """
    node: Any = t.grad_fn
    if node is not None:
        node.metadata[_RULE_MARK] = True
    return t


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """A call's argument given by position or by keyword."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _normalized_dims(normalized_shape: Any) -> tuple[int, ...]:
    """The trailing dimensions a layer or RMS norm reduces over."""
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return tuple(range(-count, 0))


def _affine_tangent(
    normalized: Tensor, normalized_tangent: Tensor | None, weight: Any, bias: Any
) -> Tensor | None:
    """Tangent of ``x̂ · w + b`` from that of ``x̂``: ``ẋ̂ · w + x̂ · ẇ + ḃ`` (absent terms left out)."""
    w_primal, w_tangent = _split(weight)
    _, b_tangent = _split(bias)
    terms = []
    if normalized_tangent is not None:
        terms.append(normalized_tangent if w_primal is None else normalized_tangent * w_primal)
    if w_tangent is not None:
        terms.append(normalized * w_tangent)
    if b_tangent is not None:
        terms.append(b_tangent.expand_as(normalized))
    if not terms:
        return None
    tangent = terms[0]
    for term in terms[1:]:
        tangent = tangent + term
    return tangent


def _dual_or_primal(primal: Tensor, tangent: Tensor | None) -> Tensor:
    return primal if tangent is None else fwAD.make_dual(primal, tangent)


class _LayerNormTangent(torch.autograd.Function):
    """Tangent of layer norm, ``ẏ = ṅ · w + x̂ · ẇ + ḃ`` with ``ṅ = r · b``, ``b = a − x̂ k``,
    ``a = ẋ − mean(ẋ)``, ``k = mean(a ⊙ x̂)``, ``x̂ = (x − μ) · r``, ``r = (σ² + ε)^(-1/2)``,
    holding ``x`` (the primal's input, already held for its backward), ``ẋ`` and the
    statistics; written out of torch operations it would hold five activation-sized tensors.

    Backward, for the gradient ``G`` of ``ẏ`` and ``H = G ⊙ w`` (means and inner products
    ``⟨·,·⟩`` over the normalised dimensions, ``n`` elements; ``P(u) = u − mean(u) −
    x̂ mean(u ⊙ x̂)``, symmetric): ``∂/∂ẋ = r P(H)``; ``∂/∂x = −(r²/n)(⟨H, b⟩ x̂ + ⟨H, x̂⟩ b)
    − r² k P(H) + r P(G ⊙ ẇ)`` (the derivative of ``r`` and ``x̂`` through ``σ²`` and ``μ``);
    ``∂/∂w = Σ G ⊙ ṅ``, ``∂/∂ẇ = Σ G ⊙ x̂``, ``∂/∂ḃ = Σ G`` over the other dimensions. Reverse
    over forward differentiates a tangent once, so the backward itself is not differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        x_tangent: Tensor | None,
        weight: Tensor | None,
        w_tangent: Tensor | None,
        b_tangent: Tensor | None,
        dims: tuple[int, ...],
        eps: float,
    ) -> Tensor | None:
        variance, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        rstd = torch.rsqrt(variance + eps)
        ctx.save_for_backward(x, x_tangent, weight, w_tangent, mean, rstd)
        ctx.dims = dims
        ctx.has_bias_tangent = b_tangent is not None
        normalized = (x - mean) * rstd
        tangent = None
        if x_tangent is not None:
            tangent = _LayerNormTangent._normalized_tangent(normalized, x_tangent, rstd, dims)[0]
            if weight is not None:
                tangent = tangent * weight
        if w_tangent is not None:
            term = normalized * w_tangent
            tangent = term if tangent is None else tangent + term
        if b_tangent is not None:
            tangent = b_tangent.expand_as(x) if tangent is None else tangent + b_tangent
        return tangent

    @staticmethod
    def _normalized_tangent(
        normalized: Tensor, x_tangent: Tensor, rstd: Tensor, dims: tuple[int, ...]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(``ṅ = r b``, ``b``, ``k``)."""
        centred = x_tangent - x_tangent.mean(dim=dims, keepdim=True)
        k = (centred * normalized).mean(dim=dims, keepdim=True)
        b = centred - normalized * k
        return rstd * b, b, k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x_tangent, weight, w_tangent, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        normalized = (x - mean) * rstd
        leading = tuple(range(grad.dim() - len(dims)))  # the dimensions w, ẇ, ḃ are broadcast over

        def project(u: Tensor) -> Tensor:
            u = u - u.mean(dim=dims, keepdim=True)
            return u - normalized * (u * normalized).mean(dim=dims, keepdim=True)

        grads: list[Tensor | None] = [None] * 7
        h = grad if weight is None else grad * weight
        if x_tangent is not None:
            n_tangent, b, k = _LayerNormTangent._normalized_tangent(normalized, x_tangent, rstd, dims)
            if ctx.needs_input_grad[1]:
                grads[1] = rstd * project(h)
            if ctx.needs_input_grad[2]:
                grads[2] = (grad * n_tangent).sum(leading)
            if ctx.needs_input_grad[0]:
                count = normalized[(0,) * len(leading)].numel()
                square = rstd * rstd
                grads[0] = -(square / count) * (
                    (h * b).sum(dim=dims, keepdim=True) * normalized
                    + (h * normalized).sum(dim=dims, keepdim=True) * b
                ) - square * k * project(h)
        if w_tangent is not None:
            if ctx.needs_input_grad[0]:
                term = rstd * project(grad * w_tangent)
                grads[0] = term if grads[0] is None else grads[0] + term
            if ctx.needs_input_grad[3]:
                grads[3] = (grad * normalized).sum(leading)
        if ctx.has_bias_tangent and ctx.needs_input_grad[4]:
            grads[4] = grad.sum(leading)
        return tuple(grads)


def _layer_norm(func, args, kwargs):
    """Layer norm (Ba et al. 2016) with a tangent that is right when differentiated.

    ``x̂ = (x − μ) · r`` with ``r = (σ² + ε)^(-1/2)``, so ``ẋ̂ = r · (ẋ − mean(ẋ) − x̂ · mean(ẋ · x̂))``
    (the derivative of ``r`` through ``σ²`` included: torch's rule holds ``μ`` and ``r``
    constant when differentiated), and ``ẏ = ẋ̂ · w + x̂ · ẇ + ḃ`` (``_LayerNormTangent``).
    The primal is torch's fused operation.
    """
    x_primal, x_tangent = _split(args[0])
    normalized_shape = _argument(args, kwargs, 1, "normalized_shape")
    weight = _argument(args, kwargs, 2, "weight")
    bias = _argument(args, kwargs, 3, "bias")
    eps = _argument(args, kwargs, 4, "eps", 1e-5)
    w_primal, w_tangent = _split(weight)
    b_primal, b_tangent = _split(bias)
    primal = _mark(F.layer_norm(x_primal, normalized_shape, w_primal, b_primal, eps))
    if x_tangent is None and w_tangent is None and b_tangent is None:
        return primal
    dims = _normalized_dims(normalized_shape)
    tangent = _LayerNormTangent.apply(x_primal, x_tangent, w_primal, w_tangent, b_tangent, dims, eps)
    return fwAD.make_dual(primal, tangent)


def _rms_norm(func, args, kwargs):
    """RMS norm (Zhang & Sennrich 2019): ``x̂ = x · r``, ``r = (mean(x²) + ε)^(-1/2)``, so
    ``ẋ̂ = r · (ẋ − x̂ · mean(ẋ · x̂))`` and ``ẏ = ẋ̂ · w + x̂ · ẇ``.

    The primal is written out too (as torch's composite computes it), sharing ``r`` and ``x̂``
    with the tangent: where torch runs a fused kernel its node has no verified rule, and where
    it runs the composite its nodes are those below.
    """
    x_primal, x_tangent = _split(args[0])
    normalized_shape = _argument(args, kwargs, 1, "normalized_shape")
    weight = _argument(args, kwargs, 2, "weight")
    eps = _argument(args, kwargs, 3, "eps")
    w_primal, w_tangent = _split(weight)
    if eps is None:
        eps = torch.finfo(x_primal.dtype).eps  # F.rms_norm's default
    dims = _normalized_dims(normalized_shape)
    rstd = torch.rsqrt(x_primal.pow(2).mean(dim=dims, keepdim=True) + eps)
    normalized = x_primal * rstd
    primal = normalized if w_primal is None else normalized * w_primal
    normalized_tangent = None
    if x_tangent is not None:
        projection = (x_tangent * normalized).mean(dim=dims, keepdim=True)
        normalized_tangent = rstd * (x_tangent - normalized * projection)
    return _dual_or_primal(primal, _affine_tangent(normalized, normalized_tangent, weight, None))


def _softmax_arguments(func, args, kwargs) -> tuple[Any, Any]:
    """(dim, dtype) of a softmax or log-softmax call (``F.``, ``torch.`` or ``Tensor.``)."""
    dim = _argument(args, kwargs, 1, "dim")
    # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax(input, dim, dtype)
    position = 3 if func in (F.softmax, F.log_softmax) else 2
    return dim, _argument(args, kwargs, position, "dtype")


def _cast(t: Tensor | None, dtype: Any) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _softmax(func, args, kwargs):
    """Softmax with the tangent ``ṡ = s ⊙ (ẋ − Σ_dim s ⊙ ẋ)``, a new tensor (torch's rule writes
    into its result in place, which cannot be differentiated); primal by torch's operation."""
    dim, dtype = _softmax_arguments(func, args, kwargs)
    if dim is None:  # the deprecated implicit dimension: torch picks it
        return NotImplemented
    x_primal, x_tangent = _split(args[0])
    primal = _mark(torch.softmax(x_primal, dim, dtype=dtype))
    return _dual_or_primal(primal, _softmax_tangent(primal, _cast(x_tangent, dtype), dim))


class _SoftmaxTangent(torch.autograd.Function):
    """``ṡ = s ⊙ (ẋ − c)``, ``c = Σ_dim s ⊙ ẋ``, holding ``s`` (the primal's, already held for its
    backward), ``ẋ`` and ``c``; the composite would also hold ``ẋ − c``, an attention-sized tensor.

    Backward, for the gradient ``G`` of ``ṡ``: ``∂/∂ẋ = s ⊙ (G − Σ s ⊙ G)`` (softmax's own
    Jacobian, symmetric) and ``∂/∂s = G ⊙ (ẋ − c) − ẋ ⊙ Σ s ⊙ G``. Reverse over forward
    differentiates a tangent once, so the backward itself is not differentiable.
    """

    @staticmethod
    def forward(ctx: Any, probabilities: Tensor, x_tangent: Tensor, dim: int) -> Tensor:
        weighted = (probabilities * x_tangent).sum(dim, keepdim=True)  # c
        ctx.save_for_backward(probabilities, x_tangent, weighted)
        ctx.dim = dim
        return (x_tangent - weighted).mul_(probabilities)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        probabilities, x_tangent, weighted = ctx.saved_tensors
        projected = (probabilities * grad).sum(ctx.dim, keepdim=True)  # Σ s ⊙ G
        grad_tangent = grad_probabilities = None
        if ctx.needs_input_grad[1]:
            grad_tangent = (grad - projected).mul_(probabilities)
        if ctx.needs_input_grad[0]:
            grad_probabilities = (x_tangent - weighted).mul_(grad).sub_(x_tangent * projected)
        return grad_probabilities, grad_tangent, None


def _softmax_tangent(probabilities: Tensor, x_tangent: Tensor | None, dim: int) -> Tensor | None:
    if x_tangent is None:
        return None
    return _SoftmaxTangent.apply(probabilities, x_tangent, dim)


def _log_softmax(func, args, kwargs):
    """Log-softmax with the tangent ``ẋ − Σ_dim softmax(x) ⊙ ẋ``; primal by torch's operation."""
    dim, dtype = _softmax_arguments(func, args, kwargs)
    if dim is None:
        return NotImplemented
    x_primal, x_tangent = _split(args[0])
    primal = _mark(torch.log_softmax(x_primal, dim, dtype=dtype))
    x_tangent = _cast(x_tangent, dtype)
    if x_tangent is None:
        return primal
    return fwAD.make_dual(primal, x_tangent - (primal.exp() * x_tangent).sum(dim, keepdim=True))


def _safe_softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax whose rows of ``-inf`` only are zero (as scaled-dot-product attention's math kernel),
    with the tangent of ``_softmax`` (zero on such rows: ``s = 0`` there)."""
    x_primal, x_tangent = _split(x)
    primal = _mark(getattr(torch, "_safe_softmax", torch.softmax)(x_primal, dim))
    return _dual_or_primal(primal, _softmax_tangent(primal, x_tangent, dim))


def _scaled_dot_product_attention(func, args, kwargs):
    """``F.scaled_dot_product_attention`` as its math kernel (Vaswani et al. 2017), with the
    softmax of ``_safe_softmax``: torch's math kernel calls its own softmax inside, whose
    rule cannot be differentiated. Dropout (training) is left to torch."""
    query, key, value = args[0], _argument(args, kwargs, 1, "key"), _argument(args, kwargs, 2, "value")
    attn_mask = _argument(args, kwargs, 3, "attn_mask")
    dropout_p = _argument(args, kwargs, 4, "dropout_p", 0.0)
    is_causal = _argument(args, kwargs, 5, "is_causal", False)
    scale = kwargs.get("scale")
    enable_gqa = kwargs.get("enable_gqa", False)
    if dropout_p != 0.0 or (attn_mask is not None and _split(attn_mask)[1] is not None):
        return NotImplemented
    factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    # Both factors scaled by √scale, as torch's math kernel does (the same rounding).
    scores = (query * factor) @ (key.transpose(-2, -1) * factor)
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return _safe_softmax(scores, -1) @ value


def _detached(result: Any) -> Any:
    return tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, result)


class _TangentRules(TorchFunctionMode):
    def __init__(self, differentiated: bool, shortcuts: bool) -> None:
        super().__init__()
        self.rules: dict[Any, Callable[..., Any]] = {F.embedding: _embedding}
        if shortcuts:
            self.rules.update(dict.fromkeys(_LAYERS, _linear_like))
            if differentiated:
                self.rules.update(dict.fromkeys(_RELUS, _relu))
                self.rules.update(dict.fromkeys(_MULTIPLICATIONS | _DIVISIONS, _scaling))
        if differentiated:
            # Rules that torch gets wrong (or not differentiable) when differentiated; taken on
            # every call, tangent or not, so that each of these nodes in the graph is marked.
            self.rules.update(dict.fromkeys(_LAYER_NORMS, _layer_norm))
            self.rules.update(dict.fromkeys(_SOFTMAXES, _softmax))
            self.rules.update(dict.fromkeys(_LOG_SOFTMAXES, _log_softmax))
            self.rules[F.scaled_dot_product_attention] = _scaled_dot_product_attention
            if hasattr(F, "rms_norm"):
                self.rules[F.rms_norm] = _rms_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The mode is off while its handler runs: the rules' calls are torch's own, and a
        # no-grad region is handled by its outermost torch call.
        if not torch.is_grad_enabled():
            return _detached(func(*args, **kwargs))
        rule = self.rules.get(func)
        if rule is not None and args and torch.is_tensor(args[0]):
            result = rule(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)


#: Autograd nodes (``grad_fn.name()``) of the operations whose forward-mode rule, as
#: computed under ``tangent_rules``, is right when differentiated: reverse over forward
#: gives exactly double backward's Hessian product through them. Each is checked against
#: double backward in float64 (``tests/operators/test_forward_ad.py``); an
#: operation is added here only with such a check. Not here, on purpose: ``layer_norm``,
#: ``batch_norm``, ``group_norm``, ``instance_norm`` (torch's rules wrong when
#: differentiated), ``softmax``/``log_softmax`` (torch's rules not differentiable): the first
#: and the last two pass only with the label of this module's rules (``_mark``); in-place
#: updates of views (``CopySlices``: the operation inside is not known) and custom
#: ``autograd.Function``\ s.
DIFFERENTIABLE_TANGENT_RULES = frozenset(
    {
        # the parameters (leaves) and their dual views (``fwAD.make_dual``)
        "torch::autograd::AccumulateGrad",
        "torch::autograd::Identity",
        # products
        "AddmmBackward0",
        "MmBackward0",
        "BmmBackward0",
        "MvBackward0",
        "ConvolutionBackward0",
        "EmbeddingBackward0",
        # shapes and selections
        "TBackward0",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsafeViewBackward0",
        "ExpandBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "IndexBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "CloneBackward0",
        "CatBackward0",
        "StackBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "AliasBackward0",
        "ToCopyBackward0",
        # elementwise
        "AddBackward0",
        "SubBackward0",
        "RsubBackward1",
        "MulBackward0",
        "MulBackward1",
        "DivBackward0",
        "NegBackward0",
        "PowBackward0",
        "ExpBackward0",
        "LogBackward0",
        "SqrtBackward0",
        "RsqrtBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "ReluBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "WhereBackward0",
        "MaskedFillBackward0",
        # reductions and pooling
        "SumBackward0",
        "SumBackward1",
        "MeanBackward0",
        "MeanBackward1",
        "AvgPool2DBackward0",
        "MaxPool2DWithIndicesBackward0",
    }
)

#: Operations whose rule is verified for some arguments only: a predicate on the autograd
#: node. Batch norm in eval mode normalises by the running statistics, constants: its rule
#: is an affine map's. In train mode it normalises by batch statistics, and the rule is wrong.
CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES: dict[str, Callable[[Any], bool]] = {
    "NativeBatchNormBackward0": lambda node: not node._saved_training,
}


def first_unverified_operation(output: Tensor) -> str | None:
    """The first operation in the autograd graph of ``output`` whose forward-mode rule is not verified.

    Verified: the operations of ``DIFFERENTIABLE_TANGENT_RULES``, those of
    ``CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES`` whose predicate holds, and the nodes
    of the primals of this module's own rules (labelled by them: layer norm, softmax,
    log-softmax, attention).

    Parameters
    ----------
    output : Tensor
        A model output computed with the graph kept (the primal of a dual forward pass).

    Returns
    -------
    str or None
        The autograd node's name (e.g. ``"NativeLayerNormBackward0"``), or None when every
        operation between the parameters and ``output`` has a verified rule. A region run
        without gradients adds no nodes: ``tangent_rules`` gives it no tangent either.
    """
    stack: list[Any] = [output.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name not in DIFFERENTIABLE_TANGENT_RULES and not node.metadata.get(_RULE_MARK, False):
            verified = CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES.get(name)
            if verified is None or not verified(node):
                return name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return None


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger buffer.

    ``fwAD.make_dual`` copies a tangent that does not own exactly its storage into a fresh
    zero-filled buffer, at every call; copying once per product, before the loop over
    batches, avoids one allocation, fill and copy of the parameter per batch.
    """
    if (
        t.storage_offset() == 0
        and t.is_contiguous()
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def tangent_rules(differentiated: bool = False, shortcuts: bool = True) -> Iterator[None]:
    """Forward-mode rules of this module, for a forward pass with tangents (module docstring).

    Always: padding rows of embeddings and regions run without gradients carry no tangent,
    as in reverse mode (the pass itself must run with gradients enabled).

    Parameters
    ----------
    differentiated : bool, optional
        The tangent will be differentiated (reverse over forward): also replace the rules
        of relu and of products and quotients by numbers or tensors without a tangent (with
        ``shortcuts``; without a graph torch's rules cost less), layer norm,
        RMS norm, softmax, log-softmax and scaled-dot-product attention (torch's are wrong
        or not differentiable when differentiated). Default False.
    shortcuts : bool, optional
        Linear and convolution layers whose input has no tangent skip the zero-tangent
        product (default True). Within a ``fwAD.dual_level()`` only: ``torch.func.jvp``'s
        tangents are not visible to these rules.
    """
    with _TangentRules(differentiated, shortcuts):
        yield


class ConstantRegions(TorchFunctionMode):
    """Records where a forward pass hides a dependence on the parameters from reverse mode.

    Reverse mode treats as constants the results of torch calls made without gradients, of
    ``detach()``, and an embedding's padding row; their values still move with the
    parameters. Derivatives of values (finite differences) then see what autograd's do not:
    a finite-difference Hessian of such a model is not autograd's Hessian (nor symmetric).

    After the pass, ``found`` names the first call without gradients or ``detach()`` that
    took a tensor carrying a graph and returned a tensor (None if there was none), and
    ``padding_weight_used_elsewhere`` whether a watched embedding weight was also read by
    another call (a weight tied to an output head: its padding row then does get a gradient,
    from the head).

    Parameters
    ----------
    padding_params : sequence of int
        Positions, in the evaluation point passed to ``watch``, of the embedding weights
        with a ``padding_idx``.
    """

    _DETACHES = frozenset({torch.Tensor.detach, torch.detach})

    def __init__(self, padding_params: Any = ()) -> None:
        super().__init__()
        self.padding_params = list(padding_params)
        self.found: str | None = None
        self.padding_weight_used_elsewhere = False
        self.watched: set[int] = set()

    def watch(self, point: Any) -> ConstantRegions:
        """Set the tensors the forward pass runs on (one per selected parameter); returns self."""
        self.watched = {id(point[i]) for i in self.padding_params}
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not any(torch.is_tensor(r) for r in tree_leaves(result)):
            return result  # shape, dtype and device queries
        inputs = [t for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        hidden = not torch.is_grad_enabled() or func in self._DETACHES
        if self.found is None and hidden and any(t.requires_grad for t in inputs):
            self.found = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if self.watched and func is not F.embedding and any(id(t) in self.watched for t in inputs):
            self.padding_weight_used_elsewhere = True
        return result
