"""The ``Σ_batches Jᵀ M J`` products shared by the GGN and the Fisher: ``OutputSpaceOperator``.

``J`` is the Jacobian of the model output w.r.t. the selected parameters and ``M`` a
symmetric matrix in output space (the loss Hessian for the GGN, a second moment of
output gradients for the Fisher; Schraudolph 2002, "Fast curvature matrix-vector products
for second-order gradient descent"). Per batch: ``J v`` by forward-mode AD (dual tensors),
``M (J v)`` by the subclass, ``Jᵀ (M J v)`` by a backward pass through the kept graph of
one forward pass. How the passes are organised is the operator's
[`ProductStrategy`][curvops.ProductStrategy].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._checks import (
    FINITE_DIFFERENCES_SEE_VALUES,
    USE_AUTOGRAD,
    refuse_values_hidden_from_reverse_mode,
)
from curvops.operators._forward_ad import ConstantRegions, own_storage
from curvops.operators._model import _stashed_gradients
from curvops.operators._parallel import Sharded, local_tensor
from curvops.operators._tangent_propagation import TangentNotCarried, TangentsAlongside
from curvops.operators.base import BatchProduct, BatchSumOperator
from curvops.operators.strategy import ProductStrategy


class OutputSpaceOperator(BatchSumOperator):
    """Base of the operators of the form ``Σ_batches Jᵀ M J`` (GGN and Fisher).

    Subclasses give ``M`` through ``_middle`` (and per-batch data for it through
    ``_middle_context``, computed once for all columns of a block). A ``(D, k)`` block
    shares each batch's forward pass and middle preparation among its columns.
    """

    #: How the products are organised (set by the subclasses' constructors).
    strategy: ProductStrategy = ProductStrategy()
    #: Why carrying ``J v`` alongside the forward pass failed for this model (None: it has not).
    tangent_alongside_refusal: str | None = None
    #: ``"autograd"`` (exact) or ``"finite_difference"`` (``J v`` by central differences).
    method: str = "autograd"

    def _middle_context(self, output: Tensor, target: Any, index: int) -> Any:
        """Per-batch data for ``_middle``, computed once for all columns of a block."""
        return None

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Any) -> Tensor:
        """Apply the output-space matrix ``M`` of the batch sum to ``jv``."""
        raise NotImplementedError

    # ------------------------------------------------------------ strategy
    def _first_tangent_method(self) -> str:
        """How ``J v`` of a block's first column is obtained (an ``output_tangent`` value)."""
        choice = self.strategy.output_tangent
        if choice == "auto":
            if self.device.type == "cpu":
                choice = "dual_forward_with_graph"
            elif self.parallel is None:
                choice = "alongside_forward"
            else:
                choice = "separate_tangent_pass"
        if choice == "alongside_forward" and self.tangent_alongside_refusal is not None:
            return "separate_tangent_pass"
        return choice

    def _forward_with_tangent_alongside(
        self, inputs: Any, column: list[Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """The output, with its graph kept, and ``J v`` carried alongside (see ``TangentsAlongside``).

        None when the forward pass does something the tangent cannot be carried through
        exactly: ``tangent_alongside_refusal`` then says what, and later products use a
        separate tangent pass.
        """
        try:
            with torch.enable_grad(), TangentsAlongside(zip(self.params, column)) as mode:
                output = self.forward(inputs)
            tangent = mode.tangent_of(output)
        except TangentNotCarried as refusal:
            self.tangent_alongside_refusal = str(refusal)
            return None
        return output, torch.zeros_like(output) if tangent is None else tangent

    def _batched_columns(self) -> bool:
        """Whether a block's tangents are one vmapped pass and its ``Jᵀ`` one batched backward."""
        choice = self.strategy.batched_columns
        if choice == "auto":
            return not any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return bool(choice)

    def _tangents(self, inputs: Any, V: list[Tensor], batched: bool) -> list[Tensor]:
        """``J v`` of every column of ``V`` without a graph: one vmapped pass, or one per column."""
        k = V[0].shape[0]
        if k == 0:
            return []
        if k == 1 or not batched:
            return [self._jvp(inputs, [v[col] for v in V], keep_graph=False)[1] for col in range(k)]
        return list(self._jvp_block(inputs, V).unbind(0))

    # ------------------------------------------------------------ per-batch products
    @contextlib.contextmanager
    def _batch_products(self, V: list[Tensor], out: list[Tensor]) -> Iterator[BatchProduct]:
        if isinstance(self.parallel, Sharded) or self.method == "finite_difference":
            with self._shifted_parameters() as shift:
                yield self._finite_difference_batch_product(V, out, shift)
            return
        k = V[0].shape[0]
        method, batched = self._first_tangent_method(), self._batched_columns()
        if k == 1 or batched or method != "dual_forward_with_graph":
            yield self._block_batch_product(V, out, method, batched)
            return
        # Unbatched with the tangent's graph kept: each column as a single product (one kept
        # dual forward per column) is cheaper than sharing one kept graph among the columns.
        singles = [
            self._block_batch_product(
                [v[col : col + 1] for v in V], [o[col : col + 1] for o in out], method, batched
            )
            for col in range(k)
        ]

        def product(index: int, inputs: Any, target: Any) -> Tensor | None:
            losses = [single(index, inputs, target) for single in singles]
            return losses[0]

        yield product

    def _block_batch_product(
        self, V: list[Tensor], out: list[Tensor], method: str, batched: bool
    ) -> BatchProduct:
        """``Jᵀ M J V`` of one batch for the whole block ``V``, added into ``out``.

        ``method`` (an ``output_tangent`` value) says how ``J v`` of the first column is
        obtained; the other columns' tangents come from separate passes without a graph.
        """
        k = V[0].shape[0]
        column = [own_storage(v[0]) for v in V] if method != "separate_tangent_pass" else None
        rest = [v[1:] for v in V]

        def forward_and_tangents(inputs: Any) -> tuple[Tensor, list[Tensor]]:
            if method == "alongside_forward" and self.tangent_alongside_refusal is None:
                assert column is not None
                carried = self._forward_with_tangent_alongside(inputs, column)
                if carried is not None:
                    return carried[0], [carried[1]] + self._tangents(inputs, rest, batched)
            if method == "dual_forward_with_graph":
                assert column is not None
                output, first = self._jvp(inputs, column, keep_graph=True)
                return output, [first] + self._tangents(inputs, rest, batched)
            with torch.enable_grad():
                output = self.forward(inputs)
            return output, self._tangents(inputs, V, batched)

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            output, tangents = forward_and_tangents(inputs)
            primal = output.detach()
            context = self._middle_context(primal, target, index)
            if k > 1 and output.requires_grad and batched:
                # One vmapped backward for all columns: larger matrix products than k passes.
                middles = torch.stack(
                    [self._middle(primal, target, jv, context) * self.scale for jv in tangents]
                )
                grads = torch.autograd.grad(
                    output,
                    self.params,
                    grad_outputs=middles,
                    is_grads_batched=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
                for o, g in zip(out, grads):
                    o.add_(g)
            else:
                for col, jv in enumerate(tangents):
                    # One output-sized middle at a time (LM logits are large).
                    middle = self._middle(primal, target, jv, context) * self.scale
                    grads = self._vjp(output, middle, retain_graph=col < k - 1)
                    for o, g in zip(out, grads):
                        o[col].add_(g)
            with torch.no_grad():
                return self.loss.batch_sum(primal, target) * self.scale

        return product

    def _finite_difference_batch_product(
        self, V: list[Tensor], out: list[Tensor], shift: Callable[[list[Tensor], int, float], Any]
    ) -> BatchProduct:
        """Products with ``J v`` by central differences of the output, ``Jᵀ u`` by backward.

        ``J v ≈ (f(θ + εv) − f(θ − εv)) / 2ε``: two forward passes without a graph (step
        [`finite_difference_step`][curvops.CurvatureOperator.finite_difference_step] as a perturbation norm);
        ``Jᵀ (M J v)`` is a backward pass through the graph of one forward pass at ``θ``, shared by the
        columns. On one process the model is evaluated at ``θ ± εv`` out of place; under FSDP (where
        forward-mode AD does not pass the parameter all-gather) each rank shifts its own
        shards in place (see ``_shifted_parameters``), and the gradient FSDP
        reduce-scatters is the rank's shard of ``Jᵀ u``.

        Differences of values see what reverse mode treats as constant: the padding rows of
        embeddings are left out of the directions (reverse mode gives them no gradient), and
        on one process each batch's first forward pass is watched for parameters read under
        ``torch.no_grad()`` or through ``detach()``, which is refused.
        """
        k = V[0].shape[0]
        step = self.finite_difference_step()
        parallel = self.parallel
        sharded = isinstance(parallel, Sharded)
        padding = [] if sharded else self._padding_rows()
        V = self._without_padding_rows(V, padding)
        norms = [self._global_norm([v[col] for v in V]) for col in range(k)]
        #: Batches whose forward pass was watched for values hidden from reverse mode.
        checked: set[int] = self.__dict__.setdefault("_finite_difference_checked", set())

        def output_at(inputs: Any, col: int, amount: float) -> Tensor:
            at = shift(V, col, amount)
            with torch.no_grad():
                if at is None:  # FSDP: the shards themselves were shifted
                    return self.forward(inputs)
                return self.forward(
                    inputs, replace={**self._detached_parameters(), **dict(zip(self.param_names, at))}
                )

        def forward_with_graph(index: int, inputs: Any) -> Tensor:
            with torch.enable_grad():
                if sharded or index in checked:
                    return self.forward(inputs)
                regions = ConstantRegions(i for i, _ in padding).watch(self.params)
                with regions:
                    output = self.forward(inputs)
                refuse_values_hidden_from_reverse_mode(
                    regions, index, FINITE_DIFFERENCES_SEE_VALUES.format("the model output"), USE_AUTOGRAD
                )
                checked.add(index)
                return output

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            context = None
            output: Tensor | None = None
            for col in range(k):
                if norms[col] == 0.0:
                    continue
                eps = step / norms[col]
                # Accumulated in place: one output-sized buffer (LM logits are large).
                jv = output_at(inputs, col, eps)
                jv.sub_(output_at(inputs, col, -eps))
                if sharded:
                    shift(V, col, 0.0)
                jv.div_(2 * eps)
                if sharded:
                    assert isinstance(parallel, Sharded)
                    with parallel.summed_gradients(), _stashed_gradients(self.model):
                        with torch.enable_grad():
                            output = self.forward(inputs)
                        primal = output.detach()
                        context = self._middle_context(primal, target, index)
                        middle = self._middle(primal, target, jv, context) * self.scale
                        del jv
                        output.backward(middle)
                        for o, p in zip(out, self.params):
                            if p.grad is not None:
                                o[col].add_(local_tensor(p.grad))
                    continue
                if output is None:
                    output = forward_with_graph(index, inputs)
                    context = self._middle_context(output.detach(), target, index)
                middle = self._middle(output.detach(), target, jv, context) * self.scale
                del jv
                for o, g in zip(out, self._vjp(output, middle, retain_graph=True)):
                    o[col].add_(g)
            with torch.no_grad():
                primal = self.forward(inputs) if output is None or sharded else output.detach()
                return self.loss.batch_sum(primal, target) * self.scale

        return product
