"""Forward-mode AD through the model, with rules torch gets wasteful or wrong.

torch's forward-AD rules for ``linear`` and the convolutions materialise the missing
tangent of an input that carries none (the data entering the first layer) as an expanded
zero tensor and multiply it with the weight: one full matrix product per such layer, plus,
when the graph is kept, its backward (see benchmarks/results/flop_bounds_*).
:func:`tangent_rules` routes these layers to the two products that are needed: ``f(x, W)``
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
196700), softmax's reuses an output in place (the backward pass fails). So that product runs
only through operations on :data:`DIFFERENTIABLE_TANGENT_RULES`, whose rules are verified
against double backward in float64 (``tests/operators/test_forward_ad.py``), and the
Hessian operator checks every batch's graph with :func:`first_unverified_operation`. A
structural check, not a comparison of numbers: no data can fool it (a first batch whose
loss gradient is zero made any comparison of the two products agree).
"""

from __future__ import annotations

import contextlib
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
#: computed under :func:`tangent_rules`, is right when differentiated: reverse over forward
#: gives exactly double backward's Hessian product through them. Each is checked against
#: double backward in float64 (``tests/operators/test_forward_ad.py``); an
#: operation is added here only with such a check. Not here, on purpose: ``layer_norm``,
#: ``batch_norm``, ``group_norm``, ``instance_norm`` (rules wrong when differentiated),
#: ``softmax``/``log_softmax`` (rules not differentiable), in-place updates of views
#: (``CopySlices``: the operation inside is not known) and custom ``autograd.Function``\ s.
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
        # elementwise
        "AddBackward0",
        "SubBackward0",
        "RsubBackward1",
        "MulBackward0",
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

    Verified: the operations of :data:`DIFFERENTIABLE_TANGENT_RULES`, and those of
    :data:`CONDITIONALLY_DIFFERENTIABLE_TANGENT_RULES` whose predicate holds.

    Parameters
    ----------
    output : Tensor
        A model output computed with the graph kept (the primal of a dual forward pass).

    Returns
    -------
    str or None
        The autograd node's name (e.g. ``"NativeLayerNormBackward0"``), or None when every
        operation between the parameters and ``output`` has a verified rule. A region run
        without gradients adds no nodes: :func:`tangent_rules` gives it no tangent either.
    """
    stack = [output.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name not in DIFFERENTIABLE_TANGENT_RULES:
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
        The tangent will be differentiated (reverse over forward): also replace relu's
        rule. Without a graph torch's rule is cheaper. Default False.
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

    After the pass, :attr:`found` names the first call without gradients or ``detach()`` that
    took a tensor carrying a graph and returned a tensor (None if there was none), and
    :attr:`padding_weight_used_elsewhere` whether a watched embedding weight was also read by
    another call (a weight tied to an output head: its padding row then does get a gradient,
    from the head).

    Parameters
    ----------
    padding_params : sequence of int
        Positions, in the evaluation point passed to :meth:`watch`, of the embedding weights
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
