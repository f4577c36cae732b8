"""``J v`` carried alongside the forward pass that keeps the graph: ``TangentsAlongside``.

The GGN and Fisher products ``Jᵀ M J v`` need the model output ``z`` with its autograd graph
(for ``Jᵀ``) and the tangent ``J v``. Forward-mode AD through dual tensors gives both in one
pass, but with the graph kept it also records the tangent computations and keeps every
saved activation's tangent alive until the backward pass; a separate tangent pass avoids
that at the price of computing the primal forward twice. This mode computes each tangent
next to the primal operation that keeps the graph, from the primal's own inputs, without
recording it (Pearlmutter 1994, "Fast exact multiplication by the Hessian": the R-operator
propagated alongside the forward pass):

- bilinear operations (``linear``, the matrix products, the convolutions, the embedding) by
  their product rule, ``d(A B) = dA B + A dB``: the primal product is not computed twice;
- every other operation by torch's own forward-mode rule on detached inputs, under
  ``torch.no_grad()`` (the rule recomputes the primal of that one operation, which is cheap
  for the elementwise, normalisation and shape operations that remain). The rules are not
  differentiated here, so the forward-mode rules that are wrong when differentiated
  (``layer_norm``, ``batch_norm``) give the right first-order tangent.

A tangent lives as long as the Python object of its primal: the saved tensors of the graph
are packed as detached aliases, so the graph does not keep the objects (and their tangents)
alive.

The mode follows the semantics of ``tangent_rules`` (and
of reverse mode): results computed with gradients disabled or by ``detach`` carry no tangent,
and an embedding's padding rows carry none. It refuses, by raising ``TangentNotCarried``
so that the caller falls back to a separate tangent pass, what it cannot carry exactly: an
in-place operation on a tensor that carries a tangent (views of it would keep stale tangents)
and any tensor entering an operation whose autograd node the mode did not see created (a
custom ``autograd.Function`` runs its forward with gradients disabled and would silently
drop the tangent).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


class TangentNotCarried(RuntimeError):
    """The forward pass did something ``TangentsAlongside`` cannot carry a tangent through."""


_DETACHES = frozenset({torch.Tensor.detach, torch.detach})
_DATA_GETTER = torch.Tensor.data.__get__  # type: ignore[attr-defined]
_IN_PLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
    }
)
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm})
_MATMULS = _MATMULS | {torch.Tensor.mm, torch.Tensor.bmm}
_CONVOLUTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d})


def _is_in_place(func: Any, kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS or "out" in kwargs


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    if term is None:
        return total
    return term if total is None else total + term


class _TangentStore:
    """Tangents keyed by their primal tensor's identity, dropped when the primal's object dies."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Tensor]] = {}

    def get(self, primal: Tensor) -> Tensor | None:
        entry = self._entries.get(id(primal))
        return entry[1] if entry is not None and entry[0]() is primal else None

    def set(self, primal: Tensor, tangent: Tensor) -> None:
        key, entries = id(primal), self._entries

        def forget(ref: weakref.ref) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(primal, forget), tangent)

    def __len__(self) -> int:
        return len(self._entries)


def _tensor_arguments(args: tuple, kwargs: dict) -> list[Tensor] | None:
    """The tensors among the arguments, one level of list/tuple deep; None for deeper nesting."""
    found: list[Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif type(a) is list or type(a) is tuple:
            for b in a:
                if isinstance(b, Tensor):
                    found.append(b)
                elif isinstance(b, (list, tuple, dict)):
                    return None
        elif isinstance(a, (list, tuple, dict)) and not isinstance(a, torch.Size):
            return None
    return found


def _map_arguments(f: Callable[[Tensor], Any], args: tuple, kwargs: dict, flat: bool) -> tuple[tuple, dict]:
    """``f`` applied to every tensor argument (``flat``: as found by ``_tensor_arguments``)."""
    if not flat:
        return tree_map(lambda t: f(t) if isinstance(t, Tensor) else t, (args, kwargs))

    def one(a: Any) -> Any:
        if isinstance(a, Tensor):
            return f(a)
        if type(a) is list or type(a) is tuple:
            return type(a)(f(b) if isinstance(b, Tensor) else b for b in a)
        return a

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _flat_outputs(result: Any) -> list[Any]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, tuple) and all(not isinstance(r, (list, tuple, dict)) for r in result):
        return list(result)
    return tree_flatten(result)[0]


class TangentsAlongside(TorchFunctionMode):
    """A forward pass that keeps the autograd graph and carries tangents alongside, unrecorded.

    Use as a context manager around one forward pass run with gradients enabled; afterwards
    ``tangent_of`` gives the tangent of any tensor the pass returned. The tangents are
    computed without a graph (they are not differentiated).

    Parameters
    ----------
    tangents : iterable of (Tensor, Tensor)
        Pairs ``(parameter, tangent)``: the leaves the forward pass reads and their
        directions, each tangent shaped like its parameter.
    """

    def __init__(self, tangents: Iterable[tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self._tangents = _TangentStore()
        for leaf, tangent in tangents:
            self._tangents.set(leaf, tangent.detach())
        #: Autograd nodes created by the operations this mode saw (their outputs' ``grad_fn``).
        self._seen_nodes: set[Any] = set()
        self._exits: list[Callable[[], None]] = []

    # ------------------------------------------------------------ context
    def __enter__(self) -> TangentsAlongside:
        level = fwAD.dual_level()
        level.__enter__()
        # Saved tensors as detached aliases (same storage and version counter): the graph then
        # does not keep the primal objects, hence their tangents, alive.
        hooks = torch.autograd.graph.saved_tensors_hooks(_detached_alias, _same)
        hooks.__enter__()
        self._exits = [lambda: level.__exit__(None, None, None), lambda: hooks.__exit__(None, None, None)]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for close in reversed(self._exits):
            close()
        self._exits = []

    def tangent_of(self, tensor: Tensor) -> Tensor | None:
        """The tangent carried for ``tensor`` (None: it does not depend on the parameters).

        Raises
        ------
        TangentNotCarried
            If ``tensor`` came out of an operation the mode did not see.
        """
        self._check_seen(tensor)
        return self._tangents.get(tensor)

    # ------------------------------------------------------------ dispatch
    def _check_seen(self, tensor: Tensor) -> None:
        node = tensor.grad_fn
        if node is not None and node not in self._seen_nodes:
            raise TangentNotCarried(
                f"a tensor produced by {node.name()}, an operation computed out of sight of torch "
                "functions (a custom autograd.Function?)"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            # A no-grad region: constants for reverse mode, so no tangent either.
            return func(*args, **kwargs)
        inputs = _tensor_arguments(args, kwargs)
        flat = inputs is not None
        if inputs is None:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        tangents = self._tangents
        carried = False
        for t in inputs:
            self._check_seen(t)
            carried = carried or tangents.get(t) is not None
        if carried and _is_in_place(func, kwargs):
            raise TangentNotCarried(
                f"the in-place operation {getattr(func, '__name__', func)} on a tensor that carries a tangent"
            )
        result = func(*args, **kwargs)
        outputs = _flat_outputs(result)
        any_tensor = False
        for out in outputs:
            if isinstance(out, Tensor):
                any_tensor = True
                if out.grad_fn is not None:
                    self._seen_nodes.add(out.grad_fn)
        if not carried or not any_tensor or func in _DETACHES or func == _DATA_GETTER:
            return result  # no tangent in; or shape, dtype and device queries; or detached
        with torch.no_grad():
            computed = self._tangent(func, args, kwargs, outputs, flat)
        for out, tangent in zip(outputs, computed):
            if isinstance(out, Tensor) and tangent is not None:
                if tangent.dtype != out.dtype:
                    tangent = tangent.to(out.dtype)
                if tangent.shape != out.shape:
                    tangent = tangent.expand(out.shape)  # a broadcast operand's tangent
                tangents.set(out, tangent)
        return result

    # ------------------------------------------------------------ rules
    def _split(self, t: Any) -> tuple[Any, Tensor | None]:
        """(detached primal, tangent or None) of an argument; (t, None) for a non-tensor."""
        if not isinstance(t, Tensor):
            return t, None
        return t.detach(), self._tangents.get(t)

    def _tangent(self, func: Any, args: tuple, kwargs: dict, outputs: list, flat: bool) -> list:
        rule = _RULES.get(func)
        if rule is not None and flat:
            tangent = rule(self, func, args, kwargs)
            if tangent is not NotImplemented:
                return _flat_outputs(tangent) if isinstance(tangent, tuple) else [tangent]
        return self._by_forward_mode(func, args, kwargs, len(outputs), flat)

    def _by_forward_mode(self, func: Any, args: tuple, kwargs: dict, n_outputs: int, flat: bool) -> list:
        """Tangents of the outputs by torch's forward-mode rule of ``func`` on detached duals."""
        tangents = self._tangents

        def dual(t: Tensor) -> Tensor:
            tangent = tangents.get(t)
            primal = t.detach()
            return primal if tangent is None else fwAD.make_dual(primal, tangent)

        dual_args, dual_kwargs = _map_arguments(dual, args, kwargs, flat)
        dual_result = _flat_outputs(func(*dual_args, **dual_kwargs))
        if len(dual_result) != n_outputs:
            raise TangentNotCarried(f"{getattr(func, '__name__', func)} returned a different structure twice")
        return [fwAD.unpack_dual(o).tangent if isinstance(o, Tensor) else None for o in dual_result]


def _detached_alias(t: Tensor) -> Tensor:
    return t.detach()


def _same(t: Tensor) -> Tensor:
    return t


# ---------------------------------------------------------------- product rules
def _linear(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    if not args:
        return NotImplemented
    x, dx = mode._split(args[0])
    w, dw = mode._split(args[1] if len(args) > 1 else kwargs.get("weight"))
    b, db = mode._split(args[2] if len(args) > 2 else kwargs.get("bias"))
    rest = args[3:]
    options = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    if dw is None and db is not None:
        return NotImplemented  # a moving bias alone: rare, left to the forward-mode rule
    tangent = None if dx is None else func(dx, w, None, *rest, **options)
    if dw is not None:
        tangent = _add(tangent, func(x, dw, db, *rest, **options))
    return tangent


def _matmul(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    if len(args) != 2 or kwargs:
        return NotImplemented
    a, da = mode._split(args[0])
    b, db = mode._split(args[1])
    tangent = None if da is None else func(da, b)
    return _add(tangent, None if db is None else func(a, db))


def _addmm(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """``addmm(c, a, b) = c + a b`` (Hugging Face's ``Conv1D``), with ``beta = alpha = 1`` only."""
    if len(args) != 3 or kwargs:
        return NotImplemented
    c, dc = mode._split(args[0])
    a, da = mode._split(args[1])
    b, db = mode._split(args[2])
    tangent = None if da is None else torch.mm(da, b)
    tangent = _add(tangent, None if db is None else torch.mm(a, db))
    if dc is not None:
        if tangent is None:
            return NotImplemented
        tangent = tangent + dc
    return tangent


def _embedding(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """Linear in the weight; padding rows carry no tangent (reverse mode gives them no gradient)."""
    indices = args[0]
    weight, dweight = mode._split(args[1] if len(args) > 1 else kwargs.get("weight"))
    if dweight is None or isinstance(indices, Tensor) and mode._tangents.get(indices) is not None:
        return NotImplemented
    padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
    tangent = F.embedding(indices, dweight)
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += weight.shape[0]  # as F.embedding normalises it
        tangent = tangent.masked_fill((indices == padding_idx).unsqueeze(-1), 0)
    return tangent


def _linear_in_first(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Any:
    """Operations linear in their first argument alone (shapes, selections, casts, sums)."""
    x, dx = mode._split(args[0])
    for a in (*args[1:], *kwargs.values()):
        if isinstance(a, Tensor) and mode._tangents.get(a) is not None:
            return NotImplemented
    if dx is None:
        return NotImplemented
    return func(dx, *args[1:], **kwargs)


def _sum(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Any:
    """``a + alpha b`` and ``a - alpha b`` (also reflected: ``b + a``, ``b - a``)."""
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        return NotImplemented
    name = getattr(func, "__name__", "")
    a, da = mode._split(args[0])
    b, db = mode._split(args[1])
    alpha = kwargs.get("alpha", 1)
    negate_b = name in ("sub", "__sub__")
    if name == "__rsub__":  # b - a
        da = None if da is None else -da
    elif db is not None:
        db = db * (-alpha if negate_b else alpha) if (negate_b or alpha != 1) else db
    return _add(da, db)


def _product(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Any:
    """``a b`` elementwise: ``da b + a db``."""
    if len(args) != 2 or kwargs:
        return NotImplemented
    a, da = mode._split(args[0])
    b, db = mode._split(args[1])
    tangent = None if da is None else da * b
    return _add(tangent, None if db is None else a * db)


def _quotient(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Any:
    """``a / b`` with a constant ``b``: ``da / b``."""
    if len(args) != 2 or kwargs:
        return NotImplemented
    a, da = mode._split(args[0])
    b, db = mode._split(args[1])
    if db is not None or da is None:
        return NotImplemented
    return da / b


def _concatenation(mode: TangentsAlongside, func: Any, args: tuple, kwargs: dict) -> Any:
    """``cat``/``stack``: the tangents in the same arrangement, zeros for constant pieces."""
    pieces = args[0] if args else kwargs.get("tensors")
    if not isinstance(pieces, (list, tuple)):
        return NotImplemented
    tangents = []
    for t in pieces:
        tangent = mode._tangents.get(t) if isinstance(t, Tensor) else None
        tangents.append(torch.zeros_like(t) if tangent is None else tangent)
    return func(tangents, *args[1:], **{k: v for k, v in kwargs.items() if k != "tensors"})


def _methods(*names: str) -> list[Any]:
    """The torch functions and Tensor methods of these names that exist."""
    found = []
    for name in names:
        for owner in (torch, torch.Tensor):
            f = getattr(owner, name, None)
            if f is not None:
                found.append(f)
    return found


_LINEAR_IN_FIRST = _methods(
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "transpose",
    "swapaxes",
    "permute",
    "contiguous",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "expand",
    "expand_as",
    "__getitem__",
    "split",
    "chunk",
    "unbind",
    "narrow",
    "select",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "sum",
    "mean",
    "flip",
    "roll",
    "repeat",
    "movedim",
    "__neg__",
    "neg",
)
_RULES: dict[Any, Callable[..., Any]] = {
    F.linear: _linear,
    torch.addmm: _addmm,
    F.embedding: _embedding,
    **dict.fromkeys(_MATMULS, _matmul),
    **dict.fromkeys(_CONVOLUTIONS, _linear),
    **dict.fromkeys(_LINEAR_IN_FIRST, _linear_in_first),
    **dict.fromkeys(_methods("add", "__add__", "__radd__", "sub", "__sub__", "__rsub__"), _sum),
    **dict.fromkeys(_methods("mul", "__mul__", "__rmul__", "multiply"), _product),
    **dict.fromkeys(_methods("div", "__truediv__", "true_divide"), _quotient),
    **dict.fromkeys(_methods("cat", "concat", "concatenate", "stack"), _concatenation),
}
