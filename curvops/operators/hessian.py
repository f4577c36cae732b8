"""The Hessian of the loss: reverse over forward, double backward or finite differences."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from curvops.operators._checks import (
    FINITE_DIFFERENCES_SEE_VALUES,
    USE_AUTOGRAD,
    refuse_values_hidden_from_reverse_mode,
)
from curvops.operators._forward_ad import (
    ConstantRegions,
    first_unverified_operation,
    own_storage,
    tangent_rules,
)
from curvops.operators._parallel import Sharded
from curvops.operators.base import (
    BatchProduct,
    BatchSumOperator,
    ParamSelection,
    RestartPass,
    document_shared_parameters,
)
from curvops.operators.strategy import ProductStrategy

_METHODS = ("autograd", "finite_difference")

#: Messages of the errors that make reverse over forward unusable for a model: an operation
#: without a forward-mode derivative (the dual forward pass raises), or a tangent rule that
#: cannot be differentiated again (a version-counter error in the backward pass, as torch
#: 2.13's softmax rule gives; softmax is not a verified operation, so this is a safety net).
#: A genuine in-place bug of the model fails double backward the same way and is raised there.
_FORWARD_MODE_FAILURES = ("forward AD", "forward-mode", "jvp", "modified by an inplace operation")


class _UnverifiedOperation(Exception):
    """Reverse over forward met an operation whose forward-mode rule is not verified (its name)."""


@document_shared_parameters
class HessianOperator(BatchSumOperator):
    r"""Hessian ``∇²_θ L`` of the whole-dataset loss as a linear operator (D, D).

    Parameters
    ----------
    {shared_parameters}
    method : {"autograd", "finite_difference"}, optional
        ``"autograd"`` (default): exact products by automatic differentiation. A (D, k)
        block by double backward, one differentiable gradient per batch reused for all k
        columns; a single vector by reverse over forward (one dual forward pass
        keeping the graph of the output and of its tangent ``J v``, one backward pass
        seeded with ``∇²_z ℓ · J v`` at the output and ``∇_z ℓ`` at its tangent), which
        forms fewer matrix products. It is used only while the model runs operations whose
        forward-mode rules are verified to be right when differentiated: curvops' own rules
        for layer norm, RMS norm, softmax, log-softmax and scaled-dot-product attention
        (torch's are wrong or not differentiable), so transformers such as Hugging Face
        GPT-2 and Llama qualify; not batch norm in train mode nor custom
        ``autograd.Function`` classes. Each batch's graph is checked before its first product by
        a plain forward pass (less memory than any product) and again in every product;
        double backward replaces reverse over forward for good where an operation is not
        verified (``strategy.hessian_vector`` chooses; see [`ProductStrategy`][curvops.ProductStrategy]).
        ``"finite_difference"``: central differences of gradients,
        ``Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / (2ε)``; needs no double backward (the
        path for FSDP and for layers without second derivatives) and costs two
        gradient passes per vector. The model is evaluated at ``θ ± εv`` out of place
        (``torch.func.functional_call``): its parameters and their version counters are
        not touched, so a graph built before the product still backpropagates. Under
        FSDP the shards are shifted in place and restored, version counters included.
        Differences of values see what autograd treats as constant: the padding row of an
        embedding is left out of the direction (autograd's Hessian has zero rows and
        columns there), and a model whose forward pass reads the selected parameters
        under ``torch.no_grad()`` or through ``detach()``, or reads a padding row outside
        its embedding (a tied head), is refused with a ``ValueError`` on its first product
        (checked once per batch; not under FSDP).
    fd_eps : float, optional
        Step of the finite differences as a perturbation *norm*, ``‖εv‖``. Default:
        [`finite_difference_step`][curvops.HessianOperator.finite_difference_step],
        ``10 · u^(1/3) · (1 + ‖θ‖/√D)``. Central differences have a truncation error ``O(ε²)`` and a
        rounding error ``O(u/ε)``;
        their relative error is at best ``O(u^(2/3))`` times model constants — in
        float64 about 1e-10 to 1e-8, in float32 1e-4 to 1e-2 (measured on transformer
        LMs: ``benchmarks/results/fd_step_*``; use float64 where accuracy matters).
    strategy : ProductStrategy or "auto", optional
        How ``method="autograd"`` multiplies a single vector (its ``hessian_vector`` field;
        the other fields concern the GGN and Fisher). Default ``"auto"``: reverse over
        forward where verified, else double backward. See [`ProductStrategy`][curvops.ProductStrategy].

    Raises
    ------
    ValueError
        If ``method`` or ``fd_eps`` is invalid, or for the data and model refusals of
        every curvature operator.
    TypeError
        If ``strategy`` is neither a [`ProductStrategy`][curvops.ProductStrategy] nor ``"auto"``.
    NotImplementedError
        If the model is FSDP-sharded and ``method`` is not ``"finite_difference"``.

    Notes
    -----
    {shared_notes}

    Under FSDP2 (``fully_shard``) only ``method="finite_difference"`` works: FSDP
    all-gathers parameters outside autograd, so there is no double backward. Each rank
    perturbs its own parameter shards; FSDP's reduce-scatter returns the gradient shards
    of the global objective, and their difference is the rank's shard of ``Hv``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        method: str = "autograd",
        fd_eps: float | None = None,
        check_deterministic: bool = True,
        strategy: ProductStrategy | str = "auto",
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be a positive number, got {fd_eps!r}")
        self.method = method
        self.fd_eps = fd_eps
        self.strategy = ProductStrategy.from_argument(strategy)
        #: What made reverse over forward unusable for this model: an operation, or running out
        #: of memory (None: nothing yet).
        self._unverified_operation: str | None = None
        #: Batches whose forward pass the finite differences have read for hidden dependences.
        self._structure_checked: set[int] = set()
        #: Batches whose graph a plain forward pass has shown to hold verified operations only.
        self._graph_prechecked: set[int] = set()
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        if isinstance(self.parallel, Sharded) and method != "finite_difference":
            raise NotImplementedError(
                "an FSDP-sharded model has no double backward (FSDP all-gathers the parameters "
                "outside autograd): use HessianOperator(..., method='finite_difference')"
            )

    @property
    def single_vector_method(self) -> str:
        """How the next single-vector product is computed.

        Returns
        -------
        str
            ``"finite_difference"`` (``method="finite_difference"``), ``"double_backward"``
            (chosen by ``strategy``, or for good once reverse over forward met an operation
            whose forward-mode rule is not verified or ran out of memory) or
            ``"reverse_over_forward"``.
        """
        if self.method == "finite_difference":
            return "finite_difference"
        return "reverse_over_forward" if self._uses_reverse_over_forward(1) else "double_backward"

    # ------------------------------------------------------------ per-batch products
    def _uses_reverse_over_forward(self, k: int) -> bool:
        """Whether a product of k columns goes by reverse over forward (see ``ProductStrategy``)."""
        return (
            k == 1
            and self.strategy.hessian_vector != "double_backward"
            and self._unverified_operation is None
        )

    @contextlib.contextmanager
    def _batch_products(self, V: list[Tensor], out: list[Tensor]) -> Iterator[BatchProduct]:
        if self.method == "finite_difference":
            with self._finite_difference_products(V, out) as product:
                yield product
        elif self._uses_reverse_over_forward(V[0].shape[0]):
            yield self._reverse_over_forward_product(V, out)
        else:
            yield self._double_backward_product(V, out)

    def _double_backward_product(self, V: list[Tensor], out: list[Tensor]) -> BatchProduct:
        """``H V`` of one batch: a differentiable gradient, then one backward pass per column."""
        k = V[0].shape[0]

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            with torch.enable_grad():
                value = self.loss.batch_sum(self.forward(inputs), target) * self.scale
                grads = torch.autograd.grad(
                    value, self.params, create_graph=True, allow_unused=True, materialize_grads=True
                )
                # A gradient with no graph (the loss is linear in that parameter) has
                # zero Hessian rows; autograd refuses to differentiate it.
                live = [i for i, g in enumerate(grads) if g.requires_grad]
                if live:
                    for col in range(k):
                        hv = torch.autograd.grad(
                            [grads[i] for i in live],
                            self.params,
                            grad_outputs=[V[i][col] for i in live],
                            retain_graph=col < k - 1,
                            allow_unused=True,
                            materialize_grads=True,
                        )
                        for o, h in zip(out, hv):
                            o[col].add_(h)
            return value.detach()

        return product

    def _reverse_over_forward_product(self, V: list[Tensor], out: list[Tensor]) -> BatchProduct:
        """``H v`` of one batch for one column: ``∇_θ ⟨∇_z ℓ(z), J v⟩`` from a dual forward pass
        that keeps the graph of ``z`` and of ``J v``.

        Raises ``RestartPass`` (the pass then runs again by double backward, and so do
        all later products) where the output graph holds an operation whose forward-mode rule
        is not verified to be right when differentiated, or one without a forward-mode rule,
        or where the product runs out of memory.
        """
        column = [own_storage(v[0]) for v in V]
        prechecked = self._graph_prechecked

        def multiply(index: int, inputs: Any, target: Any) -> Tensor:
            if index not in prechecked:
                self._precheck_graph(inputs)
                prechecked.add(index)
            output, tangent = self._jvp(inputs, column, keep_graph=True, tangent_graph=True)
            unverified = first_unverified_operation(output)
            if unverified is not None:
                raise _UnverifiedOperation(unverified)
            # ∇_θ ⟨∇_z ℓ(z(θ)), J(θ) v⟩ = Jᵀ (∇²_z ℓ · J v) + (∂(J v)/∂θ)ᵀ ∇_z ℓ: one backward pass
            # seeded at the output and at its tangent, with both seeds from the loss in closed
            # form (no graph through the loss, which would hold output-sized tensors).
            detached = output.detach().requires_grad_(True)
            with torch.enable_grad():
                value = self.loss.batch_sum(detached, target) * self.scale
                (gradient,) = torch.autograd.grad(value, detached)
            roots, seeds = [], []
            if output.requires_grad:
                roots.append(output)
                seeds.append(self.loss.output_hvp(detached.detach(), target, tangent.detach()) * self.scale)
            if tangent.requires_grad:
                roots.append(tangent)
                seeds.append(gradient)
            if roots:
                hv = torch.autograd.grad(
                    roots, self.params, grad_outputs=seeds, allow_unused=True, materialize_grads=True
                )
                for o, h in zip(out, hv):
                    o[0].add_(h)
            return value.detach()

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            try:
                return multiply(index, inputs, target)
            except _UnverifiedOperation as unverified:
                self._unverified_operation = str(unverified)
            except torch.cuda.OutOfMemoryError as error:
                # The dual forward holds the graphs of the output and of its tangent: where that
                # does not fit, double backward (the forward's and the gradient's) may. The
                # failed attempt's tensors are freed with the exception, before the restart.
                self._unverified_operation = f"out of memory: {error}"
            except (NotImplementedError, RuntimeError) as error:
                if not any(sign in str(error) for sign in _FORWARD_MODE_FAILURES):
                    raise
                self._unverified_operation = f"{type(error).__name__}: {error}"
            raise RestartPass(self._unverified_operation)

        return product

    def _precheck_graph(self, inputs: Any) -> None:
        """Raise ``_UnverifiedOperation`` if a plain forward pass of the batch (graph kept,
        no tangents, under the same rules) runs an operation whose rule is not verified.

        Its graph is a part of what a product holds (the reverse-over-forward product keeps it
        and the tangent's; double backward keeps it and the gradient's), so a model that
        cannot go by reverse over forward is found without the memory of a product. The
        product still checks its own graph: a data-dependent branch may differ.
        """
        with torch.enable_grad(), fwAD.dual_level(), tangent_rules(differentiated=True):
            output = self.forward(inputs)
        unverified = first_unverified_operation(output)
        del output
        if unverified is not None:
            raise _UnverifiedOperation(unverified)

    @contextlib.contextmanager
    def _finite_difference_products(self, V: list[Tensor], out: list[Tensor]) -> Iterator[BatchProduct]:
        """Central differences of gradients, batch by batch: for each batch, each column and both
        signs one gradient at ``θ ± εv`` (``2k`` gradients per batch, one pass over the data).

        On one process (and under DDP) the gradient is evaluated at new tensors ``θ₀ ± εv``, the
        model untouched; under FSDP the shards are shifted in place and restored on exit. The
        columns are divided by ``2ε`` once the pass is complete.
        """
        k = V[0].shape[0]
        step = self.finite_difference_step()
        sharded = isinstance(self.parallel, Sharded)
        padding = [] if sharded else self._padding_rows()
        V = self._without_padding_rows(V, padding)
        # Per-column step: a perturbation of norm ``step`` along each column.
        norms = [self._global_norm([v[col] for v in V]) for col in range(k)]
        steps = [None if norm == 0.0 else step / norm for norm in norms]
        checked = self._structure_checked

        with self._shifted_parameters() as shift:

            def product(index: int, inputs: Any, target: Any) -> Tensor | None:
                values = []
                for col, eps in enumerate(steps):
                    if eps is None:
                        continue
                    for sign in (1.0, -1.0):
                        at = shift(V, col, sign * eps)
                        if sharded or index in checked:
                            value, grads, _ = self._loss_gradient(inputs, target, self.scale, at=at)
                        else:  # each batch's forward is read once for what autograd does not see
                            regions = ConstantRegions(i for i, _ in padding)
                            value, grads, _ = self._loss_gradient(
                                inputs, target, self.scale, at=at, regions=regions
                            )
                            refuse_values_hidden_from_reverse_mode(
                                regions, index, FINITE_DIFFERENCES_SEE_VALUES.format("the loss"), USE_AUTOGRAD
                            )
                            checked.add(index)
                        for o, g in zip(out, grads):
                            o[col].add_(g, alpha=sign)
                        values.append(value)
                # Non-finite exactly when one of the losses evaluated is (max propagates NaN).
                return torch.stack(values).abs().max() if values else None

            yield product
        for col, eps in enumerate(steps):
            if eps is not None:
                for o in out:
                    o[col].div_(2 * eps)
