"""Compiled curvature products (opt-in): a batch's product as one ``torch.func`` function, compiled.

A model compiled with ``torch.compile`` cannot run the eager products: AOTAutograd has no
double backward (the autograd Hessian fails with "torch.compile with aot_autograd does not
currently support double backward"), and a compiled module has no forward-mode AD (the GGN's
``J v`` fails). What compiles is the whole per-batch product written as a function of the
parameters with ``torch.func`` transforms and run without an autograd graph: dynamo traces
the transforms into one inference graph, which the backend optimises as a whole (fused
elementwise work, no autograd bookkeeping).

- Hessian: forward over reverse, ``H v = ∂/∂t ∇L(θ + t v)`` as ``jvp(grad(L))`` (Pearlmutter
  1994, "Fast exact multiplication by the Hessian"; Griewank & Walther 2008, ch. 5). It
  differentiates torch's *backward* formulas in forward mode, which are right through
  ``layer_norm`` and ``softmax``; reverse over forward (``grad(jvp(L))``) differentiates the
  forward-mode rules, and ``layer_norm``'s is wrong when differentiated (PyTorch issues
  196699 and 196700), so it is not offered here.
- GGN: ``Jᵀ u`` by ``vjp`` of the model, ``J v`` as the transpose of that linear pullback
  (its own vjp; Townsend 2017, "A new trick for calculating Jacobian vector products"), so
  the graph holds one forward pass; the loss Hessian ``∇²_f ℓ (J v)`` by ``jvp(grad(ℓ))`` at
  the output (exact for every loss, custom ones included; Schraudolph 2002, "Fast curvature
  matrix-vector products for second-order gradient descent").

A block of ``k`` columns runs the compiled single-column product ``k`` times (one graph for
every ``k``; for the Hessian, vectorising the columns with ``vmap`` would batch second-order
rules that are wrong through ``layer_norm``, as ``torch.func.hessian`` is). See
``docs/howto/compile.md`` for when compiling pays off and ``benchmarks/bench_compile.py`` for
the measurement.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._checks import refuse_values_hidden_from_reverse_mode
from curvops.operators._forward_ad import ConstantRegions
from curvops.operators._loss import LossSpec
from curvops.operators._model import _attention_with_higher_derivatives, output_tensor
from curvops.operators.base import BatchProduct, ParamSelection, document_shared_parameters
from curvops.operators.ggn import GGNOperator
from curvops.operators.hessian import HessianOperator

__all__ = ["DEFAULT_COMPILE_OPTIONS", "CompiledGGNOperator", "CompiledHessianOperator"]

#: ``torch.compile`` options of the products unless the caller overrides them. Static shapes:
#: ``torch.func.jvp`` cannot make dual tensors of symbolic shape (tracing fails), so each
#: batch shape compiles its own graph. ``fullgraph``: a graph break inside the transforms
#: would run the whole product eagerly (right, but not what compiling was asked for), so it
#: raises instead.
DEFAULT_COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False, "fullgraph": True}

#: ``(primals, tangent, constants, inputs, target) -> (product per selected parameter, scaled loss)``:
#: one batch's curvature times one column, as a pure function of its tensors.
ColumnProduct = Callable[
    [dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Any, Any], tuple[tuple[Tensor, ...], Tensor]
]


def _model_output(model: nn.Module, values: dict[str, Tensor], inputs: Any) -> Tensor:
    """The model's output tensor at the parameter ``values`` (its ``logits``, or a tuple's first tensor)."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    return output_tensor(torch.func.functional_call(model, values, args, kwargs))


def hessian_column_product(model: nn.Module, loss: LossSpec, scale: float) -> ColumnProduct:
    """One batch's Hessian times one column, forward over reverse: ``jvp(grad(L))``.

    Parameters
    ----------
    model : nn.Module
        The (uncompiled) network, evaluated with ``torch.func.functional_call``.
    loss : LossSpec
        The loss, summed over the batch (``LossSpec.batch_sum`` with ``fused=False``: torch
        functions only, which the transforms trace).
    scale : float
        Factor of the batch sum in the whole-dataset objective (``1 / normaliser`` for a mean).

    Returns
    -------
    callable
        ``(primals, tangent, constants, inputs, target) -> (H v per selected parameter, loss)``:
        ``primals`` and ``tangent`` map the selected parameters' names to their values and
        the column's pieces, ``constants`` the other parameters' names to their values.
    """

    def product(
        primals: dict[str, Tensor],
        tangent: dict[str, Tensor],
        constants: dict[str, Tensor],
        inputs: Any,
        target: Any,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        def objective(values: dict[str, Tensor]) -> Tensor:
            return (
                loss.batch_sum(_model_output(model, {**constants, **values}, inputs), target, fused=False)
                * scale
            )

        gradient_and_value = torch.func.jvp(torch.func.grad_and_value(objective), (primals,), (tangent,))
        (_, value), (hv, _) = gradient_and_value[0], gradient_and_value[1]
        return tuple(hv[name] for name in primals), value

    return product


def ggn_column_product(model: nn.Module, loss: LossSpec, scale: float) -> ColumnProduct:
    """One batch's GGN times one column: ``Jᵀ (∇²_f ℓ) J v`` from one forward pass of the model.

    ``vjp`` of the model gives the output and the pullback ``u ↦ Jᵀ u``; ``J v`` is the
    transpose of that linear map applied to ``v`` (the vjp of the pullback, Townsend 2017);
    the loss Hessian at the output is ``jvp(grad(ℓ))``; the pullback of its product is the
    result. ``jvp`` of the model would run the primal forward pass a second time (the traced
    graph does not merge the two); the transpose reuses the one forward pass.

    Parameters
    ----------
    model : nn.Module
        The (uncompiled) network, evaluated with ``torch.func.functional_call``.
    loss : LossSpec
        The loss, summed over the batch (``LossSpec.batch_sum`` with ``fused=False``: torch
        functions only, which the transforms trace).
    scale : float
        Factor of the batch sum in the whole-dataset objective (``1 / normaliser`` for a mean).

    Returns
    -------
    callable
        ``(primals, tangent, constants, inputs, target) -> (G v per selected parameter, loss)``,
        arguments as in ``hessian_column_product``.
    """

    def product(
        primals: dict[str, Tensor],
        tangent: dict[str, Tensor],
        constants: dict[str, Tensor],
        inputs: Any,
        target: Any,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        def output_of(values: dict[str, Tensor]) -> Tensor:
            return _model_output(model, {**constants, **values}, inputs)

        def objective_of_output(output: Tensor) -> Tensor:
            return loss.batch_sum(output, target, fused=False) * scale

        def transposed_jacobian(cotangent: Tensor) -> dict[str, Tensor]:
            return pullback(cotangent)[0]

        forward = torch.func.vjp(output_of, primals)
        output, pullback = forward[0], forward[1]
        # The pullback is linear in its argument: its vjp at any point (zero) is J.
        jacobian = torch.func.vjp(transposed_jacobian, torch.zeros_like(output))[1]
        (output_tangent,) = jacobian(tangent)
        loss_hessian = torch.func.jvp(
            torch.func.grad_and_value(objective_of_output), (output,), (output_tangent,)
        )
        (_, value), (middle, _) = loss_hessian[0], loss_hessian[1]
        (gv,) = pullback(middle)
        return tuple(gv[name] for name in primals), value

    return product


def _refuse_compiled_module(model: nn.Module) -> None:
    """Refuse a ``torch.compile``'d module before anything runs it (its first call compiles)."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        raise ValueError(
            "pass the uncompiled module (model._orig_mod): the operator compiles each batch's "
            "product itself, and a compiled module has no forward-mode AD"
        )


class _CompiledColumns:
    """The per-batch products of a ``BatchSumOperator`` from a compiled ``ColumnProduct``."""

    # Provided by the BatchSumOperator this class is mixed into.
    model: nn.Module
    param_names: list[str]
    params: list[nn.Parameter]
    parallel: Any
    _forward_writes_buffers: Callable[[], bool]
    forward: Callable[..., Tensor]
    _padding_rows: Callable[[], list[tuple[int, int]]]
    _without_padding_rows: Callable[[list[Tensor], list[tuple[int, int]]], list[Tensor]]

    def _compile_columns(
        self, column_product: ColumnProduct, compile_options: Mapping[str, Any] | None
    ) -> None:
        if self.parallel is not None:
            raise NotImplementedError(
                "compiled products run on one process: a DDP/FSDP model is not supported; use the "
                "uncompiled operator"
            )
        if self._forward_writes_buffers():
            raise ValueError(
                "compiled products need a forward pass that writes no buffers: the model has a "
                "batch norm layer in train mode with running statistics (put it in eval mode, or use "
                "the uncompiled operator)"
            )
        if compile_options is not None and not isinstance(compile_options, Mapping):
            raise TypeError(f"compile_options must be a mapping, got {type(compile_options).__name__}")
        #: The ``torch.compile`` keyword arguments the per-batch product was compiled with.
        self.compile_options: dict[str, Any] = {**DEFAULT_COMPILE_OPTIONS, **(compile_options or {})}
        # dynamo caches compiled graphs per code object, at most ``recompile_limit`` (8) per
        # object, and the product's closure (the model) is guarded: a copy of the code per
        # operator gives each operator its own cache, so a process may build any number of
        # operators (one per model or per training checkpoint) without hitting the limit.
        own_code = types.FunctionType(
            column_product.__code__.replace(),
            column_product.__globals__,
            column_product.__name__,
            column_product.__defaults__,
            column_product.__closure__,
        )
        self._column_product = torch.compile(own_code, **self.compile_options)

    def _refuse_values_hidden_from_reverse_mode(self, index: int, inputs: Any, padding: list) -> None:
        """Watch batch ``index``'s eager forward pass once for values reverse mode treats as constant.

        The compiled transforms differentiate through a ``torch.no_grad()`` region, a
        ``detach()`` and an embedding's padding row in forward mode, where autograd's matrix
        treats them as constants: such a model is refused (and the padding rows are left out
        of the directions, as autograd's matrix has zero rows and columns there).
        """
        checked: set[int] = self.__dict__.setdefault("_hidden_values_checked", set())
        if index in checked:
            return
        regions = ConstantRegions(i for i, _ in padding).watch(self.params)
        with torch.enable_grad(), regions:
            self.forward(inputs)
        refuse_values_hidden_from_reverse_mode(
            regions,
            index,
            "the compiled product differentiates through that value in forward mode, and reverse "
            "mode treats it as a constant",
            "Use the uncompiled operator, which is exact here",
        )
        checked.add(index)

    @contextlib.contextmanager
    def _batch_products(self, V: list[Tensor], out: list[Tensor]) -> Iterator[BatchProduct]:
        primals = {name: p.detach() for name, p in zip(self.param_names, self.params)}
        constants = {name: p.detach() for name, p in self.model.named_parameters() if name not in primals}
        k = V[0].shape[0]
        padding = self._padding_rows()
        V = self._without_padding_rows(V, padding)

        def product(index: int, inputs: Any, target: Any) -> Tensor | None:
            self._refuse_values_hidden_from_reverse_mode(index, inputs, padding)
            value = None
            for col in range(k):
                tangent = {name: v[col] for name, v in zip(self.param_names, V)}
                # No autograd graph: the transforms differentiate inside the function, so the
                # backend compiles an inference graph (AOTAutograd has no double backward).
                with torch.no_grad(), _attention_with_higher_derivatives():
                    pieces, loss = self._column_product(primals, tangent, constants, inputs, target)
                for o, piece in zip(out, pieces):
                    o[col].add_(piece)
                value = loss if value is None else value
            return value

        yield product


@document_shared_parameters
class CompiledHessianOperator(_CompiledColumns, HessianOperator):
    """Hessian ``∇²_θ L`` with compiled products: forward over reverse under ``torch.compile``.

    The same matrix as [`HessianOperator`][curvops.HessianOperator] (``method="autograd"``), each batch's
    product ``H v = jvp(grad(L))(θ; v)`` one ``torch.func`` function compiled once and reused
    (see ``curvops.operators.compiled``). Pass the uncompiled model: the operator
    compiles the product, not the module. The first product pays the compilation (seconds to
    minutes); see ``docs/howto/compile.md`` for when that pays off.

    Parameters
    ----------
    {shared_parameters}
    compile_options : mapping, optional
        Keyword arguments of ``torch.compile`` for the per-batch product, over
        ``DEFAULT_COMPILE_OPTIONS`` (``dynamic=False``, ``fullgraph=True``; backend
        inductor), e.g. ``{"mode": "max-autotune-no-cudagraphs"}`` or
        ``{"backend": "aot_eager"}`` (traces without generating kernels: quick to build, for
        checking a model). Every batch shape compiles its own graph, once (dynamo's
        ``recompile_limit``, 8 by default, bounds the number of shapes).

    Raises
    ------
    ValueError
        If the model has a batch norm layer in train mode with running statistics (its
        forward writes buffers), or for the data and model refusals of every curvature
        operator.
    TypeError
        If ``compile_options`` is not a mapping.
    NotImplementedError
        If the model is wrapped in DDP or sharded with FSDP.

    Notes
    -----
    {shared_notes}

    A ``(D, k)`` block costs ``k`` single products (the eager operator shares one double
    backward graph among the columns): for block algorithms on small models the eager
    operator can be faster. A model that reads the selected parameters under
    ``torch.no_grad()`` or through ``detach()`` (forward mode would differentiate through
    them, autograd's Hessian does not) is refused on its first product; each batch's eager
    forward pass is watched once for that.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        check_deterministic: bool = True,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        _refuse_compiled_module(model)
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        self._compile_columns(hessian_column_product(self.model, self.loss, self.scale), compile_options)

    @property
    def single_vector_method(self) -> str:
        """How a single-vector product is computed: always ``"compiled_forward_over_reverse"``.

        Returns
        -------
        str
            ``"compiled_forward_over_reverse"``.
        """
        return "compiled_forward_over_reverse"


@document_shared_parameters
class CompiledGGNOperator(_CompiledColumns, GGNOperator):
    """Generalized Gauss-Newton ``G = c Σ_b J_bᵀ (∇²_f ℓ_b) J_b`` with compiled products.

    The same matrix as [`GGNOperator`][curvops.GGNOperator], each batch's product (``jvp`` of the
    model, ``jvp(grad(ℓ))`` of the loss at the output, ``vjp`` of the model) one
    ``torch.func`` function compiled once and reused (see ``curvops.operators.compiled``).
    Pass the uncompiled model: the operator compiles the product, not the module.

    Parameters
    ----------
    {shared_parameters}
    compile_options : mapping, optional
        Keyword arguments of ``torch.compile`` for the per-batch product, over
        ``DEFAULT_COMPILE_OPTIONS`` (``dynamic=False``, ``fullgraph=True``; backend
        inductor), e.g. ``{"mode": "max-autotune-no-cudagraphs"}`` or
        ``{"backend": "aot_eager"}`` (traces without generating kernels: quick to build, for
        checking a model). Every batch shape compiles its own graph, once (dynamo's
        ``recompile_limit``, 8 by default, bounds the number of shapes).

    Raises
    ------
    ValueError
        If the model has a batch norm layer in train mode with running statistics, or for
        the data and model refusals of every curvature operator.
    TypeError
        If ``compile_options`` is not a mapping.
    NotImplementedError
        If the model is wrapped in DDP or sharded with FSDP.

    Notes
    -----
    {shared_notes}

    A ``(D, k)`` block costs ``k`` single products. A model that reads the selected
    parameters under ``torch.no_grad()`` or through ``detach()`` (forward mode would give
    tangents through them, reverse mode no ``Jᵀ``) is refused on its first product.
    ``fused_head`` is an eager-only option.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        check_deterministic: bool = True,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        _refuse_compiled_module(model)
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        self._compile_columns(ggn_column_product(self.model, self.loss, self.scale), compile_options)
