"""The ``Σ_batches Jᵀ M J`` products shared by the GGN and the Fisher: :class:`OutputSpaceOperator`.

``J`` is the Jacobian of the model output w.r.t. the selected parameters and ``M`` a
symmetric matrix in output space (the loss Hessian for the GGN, a second moment of
output gradients for the Fisher; Schraudolph 2002, "Fast curvature matrix-vector products
for second-order gradient descent"). Per batch: ``J v`` by forward-mode AD (dual tensors),
``M (J v)`` by the subclass, ``Jᵀ (M J v)`` by a backward pass through the kept graph of
one forward pass. How the passes are organised is the operator's
:class:`~curvops.operators.strategy.ProductStrategy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._forward_ad import own_storage
from curvops.operators._model import _stashed_gradients
from curvops.operators._parallel import Sharded, local_tensor
from curvops.operators.base import BatchProduct, BatchSumOperator
from curvops.operators.strategy import ProductStrategy


class OutputSpaceOperator(BatchSumOperator):
    """Base of the operators of the form ``Σ_batches Jᵀ M J`` (GGN and Fisher).

    Subclasses give ``M`` through :meth:`_middle` (and per-batch data for it through
    :meth:`_middle_context`, computed once for all columns of a block). A ``(D, k)`` block
    shares each batch's forward pass and middle preparation among its columns.
    """

    #: How the products are organised (set by the subclasses' constructors).
    strategy: ProductStrategy = ProductStrategy()

    def _middle_context(self, output: Tensor, target: Any, index: int) -> Any:
        """Per-batch data for :meth:`_middle`, computed once for all columns of a block."""
        return None

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Any) -> Tensor:
        """Apply the output-space matrix ``M`` of the batch sum to ``jv``."""
        raise NotImplementedError

    # ------------------------------------------------------------ strategy
    def _tangent_with_graph(self) -> bool:
        """Whether ``J v`` of the first column comes from the dual forward that keeps the graph."""
        choice = self.strategy.output_tangent
        if choice == "auto":
            return self.device.type == "cpu"
        return choice == "dual_forward_with_graph"

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
        if isinstance(self.parallel, Sharded):
            with self._shifted_parameters() as shift:
                yield self._sharded_batch_product(V, out, shift)
            return
        k = V[0].shape[0]
        with_graph, batched = self._tangent_with_graph(), self._batched_columns()
        if k == 1 or batched or not with_graph:
            yield self._block_batch_product(V, out, with_graph, batched)
            return
        # Unbatched with the tangent's graph kept: each column as a single product (one kept
        # dual forward per column) is cheaper than sharing one kept graph among the columns.
        singles = [
            self._block_batch_product(
                [v[col : col + 1] for v in V], [o[col : col + 1] for o in out], with_graph, batched
            )
            for col in range(k)
        ]

        def product(index: int, inputs: Any, target: Any) -> Tensor | None:
            losses = [single(index, inputs, target) for single in singles]
            return losses[0]

        yield product

    def _block_batch_product(
        self, V: list[Tensor], out: list[Tensor], with_graph: bool, batched: bool
    ) -> BatchProduct:
        """``Jᵀ M J V`` of one batch for the whole block ``V``, added into ``out``."""
        k = V[0].shape[0]
        column = [own_storage(v[0]) for v in V] if with_graph else None
        rest = [v[1:] for v in V]

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            if column is not None:
                output, first = self._jvp(inputs, column, keep_graph=True)
                tangents = [first] + self._tangents(inputs, rest, batched)
            else:
                with torch.enable_grad():
                    output = self.forward(inputs)
                tangents = self._tangents(inputs, V, batched)
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

    def _sharded_batch_product(
        self, V: list[Tensor], out: list[Tensor], shift: Callable[[list[Tensor], int, float], Any]
    ) -> BatchProduct:
        """Products under FSDP: ``J v`` by central differences of the output, ``Jᵀ u`` by backward.

        Forward-mode AD does not pass through FSDP's parameter all-gather, so ``J v`` is
        ``(f(θ + εv) − f(θ − εv)) / 2ε`` (two forward passes, each rank perturbing its own
        shards; step :meth:`finite_difference_step`); ``Jᵀ (M J v)`` is a backward pass whose
        gradient FSDP reduce-scatters into the rank's shard. ``shift`` moves the shards (see
        :meth:`_shifted_parameters`); they are back at ``θ`` after every column.
        """
        k = V[0].shape[0]
        step = self.finite_difference_step()
        norms = [self._global_norm([v[col] for v in V]) for col in range(k)]
        parallel = self.parallel
        assert isinstance(parallel, Sharded)

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            context = None
            primal = None
            for col in range(k):
                if norms[col] == 0.0:
                    continue
                eps = step / norms[col]
                # Accumulated in place: one output-sized buffer (LM logits are large).
                shift(V, col, eps)
                with torch.no_grad():
                    jv = self.forward(inputs)
                shift(V, col, -eps)
                with torch.no_grad():
                    jv.sub_(self.forward(inputs))
                shift(V, col, 0.0)
                jv.div_(2 * eps)
                with parallel.summed_gradients(), _stashed_gradients(self.model):
                    with torch.enable_grad():
                        output = self.forward(inputs)
                    primal = output.detach()
                    if context is None:
                        context = self._middle_context(primal, target, index)
                    middle = self._middle(primal, target, jv, context) * self.scale
                    output.backward(middle)
                    for o, p in zip(out, self.params):
                        if p.grad is not None:
                            o[col].add_(local_tensor(p.grad))
            with torch.no_grad():
                primal = self.forward(inputs) if primal is None else primal
                return self.loss.batch_sum(primal, target) * self.scale

        return product
