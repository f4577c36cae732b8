"""The Hessian of the loss w.r.t. the parameters, by double backward or finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._forward_ad import ConstantRegions, first_unverified_operation, own_storage
from curvops.operators._parallel import Sharded
from curvops.operators.base import CurvatureOperator, ParamSelection

_METHODS = ("autograd", "finite_difference")

#: Messages of the errors that make reverse over forward unusable for a model: an operation
#: without a forward-mode derivative (the dual forward pass raises), or a tangent rule that
#: cannot be differentiated again (a version-counter error in the backward pass, as torch
#: 2.13's softmax rule gives; softmax is not a verified operation, so this is a safety net).
#: A genuine in-place bug of the model fails double backward the same way and is raised there.
_FORWARD_MODE_FAILURES = ("forward AD", "forward-mode", "jvp", "modified by an inplace operation")


class _UnverifiedOperation(Exception):
    """Reverse over forward met an operation whose forward-mode rule is not verified (its name)."""


class HessianOperator(CurvatureOperator):
    """Hessian ``∇²_θ L`` of the whole-dataset loss as a linear operator (D, D).

    Parameters
    ----------
    model, loss_fn, data, params, check_deterministic
        See :class:`~curvops.operators.base.CurvatureOperator`.
    method : {"autograd", "finite_difference"}, optional
        ``"autograd"`` (default): exact products by automatic differentiation. A (D, k)
        block by double backward, one differentiable gradient per batch reused for all k
        columns; a single vector by reverse over forward (one dual forward pass
        keeping the graph of the output and of its tangent ``J v``, one backward pass of
        ``⟨∇_z ℓ, J v⟩``), which forms fewer matrix products; it is used only while the
        model runs operations whose forward-mode rules are verified to be right when
        differentiated (checked on every batch; not ``layer_norm``, ``batch_norm`` in train
        mode or ``softmax`` on torch 2.13), and double backward replaces it for good otherwise.
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
        :meth:`finite_difference_step`, ``10 · u^(1/3) · (1 + ‖θ‖/√D)``. Central
        differences have a truncation error ``O(ε²)`` and a rounding error ``O(u/ε)``;
        their relative error is at best ``O(u^(2/3))`` times model constants — in
        float64 about 1e-10 to 1e-8, in float32 1e-4 to 1e-2 (measured on transformer
        LMs: ``benchmarks/results/fd_step_*``; use float64 where accuracy matters).

    Notes
    -----
    Under FSDP2 (``fully_shard``) only ``method="finite_difference"`` works: FSDP
    all-gathers parameters outside autograd, so there is no double backward. Each rank
    perturbs its own parameter shards; FSDP's reduce-scatter returns the gradient shards
    of the global objective, and their difference is the rank's shard of ``Hv``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
                 data: Iterable[tuple[Any, Any]], *, params: ParamSelection = None,
                 method: str = "autograd", fd_eps: float | None = None,
                 check_deterministic: bool = True) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be a positive number, got {fd_eps!r}")
        self.method = method
        self.fd_eps = fd_eps
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        if isinstance(self.parallel, Sharded) and method != "finite_difference":
            raise NotImplementedError(
                "an FSDP-sharded model has no double backward (FSDP all-gathers the parameters "
                "outside autograd): use HessianOperator(..., method='finite_difference')"
            )

    #: How a single vector (k = 1) is multiplied by ``method="autograd"``. True (default):
    #: reverse over forward, ``Hv = ∇_θ ⟨∇_z ℓ(z), J v⟩`` from one dual forward pass that
    #: keeps the graph of the output ``z`` and of its tangent ``J v``, then one backward
    #: pass (fewer matrix products than double backward: it never forms the gradient's
    #: weight products). Measured faster and no larger than double backward: 2-core CPU,
    #: MLP 784-256-256-10 2.13 vs 2.52 gradients, small CNN 1.86 vs 2.69; H200, MLP
    #: 784-2048-2048-10 2.27 vs 2.86, CNN 1.99 vs 3.73 at 642 vs 818 MiB peak
    #: (``benchmarks/results/matvec_*``, ``reverse_over_forward_*``). False: double
    #: backward. Blocks (k > 1) always use double backward: one differentiable gradient per
    #: batch serves all k columns.
    #:
    #: Reverse over forward differentiates torch's forward-mode rules, and some of those are
    #: not right when differentiated (``layer_norm``'s and train-mode ``batch_norm``'s: a
    #: Hessian 15-25% off with no error), so it is right only by construction: every
    #: batch's output graph is checked, before its backward pass, to hold only operations
    #: whose rules are verified
    #: (:func:`~curvops.operators._forward_ad.first_unverified_operation`). On the
    #: first other operation, or a forward-mode pass that raises (an operation without a
    #: forward-mode rule), the operator switches to double backward for good and recomputes
    #: the product. The check is structural, so no data can fool it.
    _reverse_over_forward: bool = True

    def _use_reverse_over_forward(self, k: int) -> bool:
        return k == 1 and self._reverse_over_forward and self.__dict__.get("_forward_mode_verdict") is not False

    def _products(self, V, only=None):
        if self.method == "finite_difference":
            return self._finite_difference_products(V, only)
        if self._use_reverse_over_forward(V[0].shape[0]):
            try:
                result = self._reverse_over_forward_products(V, only)
            except _UnverifiedOperation:
                pass
            except (NotImplementedError, RuntimeError) as error:
                if not any(sign in str(error) for sign in _FORWARD_MODE_FAILURES):
                    raise
            else:
                self._forward_mode_verdict = True
                return result
            # The model runs an operation whose forward-mode rule is unverified or missing.
            self._forward_mode_verdict = False
        return self._double_backward_products(V, only)

    def _double_backward_products(self, V, only):
        out = self._zeros_like_block(V[0].shape[0])
        losses, loss_batches = [], []
        k = V[0].shape[0]
        for index, inputs, target in self._batches(only):
            with torch.enable_grad():
                value = self.loss.batch_sum(self.forward(inputs), target) * self.scale
                grads = torch.autograd.grad(value, self.params, create_graph=True,
                                            allow_unused=True, materialize_grads=True)
                # A gradient with no graph (the loss is linear in that parameter) has
                # zero Hessian rows; autograd refuses to differentiate it.
                live = [i for i, g in enumerate(grads) if g.requires_grad]
                if live:
                    for col in range(k):
                        hv = torch.autograd.grad(
                            [grads[i] for i in live], self.params,
                            grad_outputs=[V[i][col] for i in live],
                            retain_graph=col < k - 1, allow_unused=True, materialize_grads=True,
                        )
                        for o, h in zip(out, hv):
                            o[col].add_(h)
            losses.append(value.detach())
            loss_batches.append(index)
        return out, losses, loss_batches

    def _reverse_over_forward_products(self, V, only):
        out = self._zeros_like_block(1)
        losses, loss_batches = [], []
        column = [own_storage(v[0]) for v in V]
        for index, inputs, target in self._batches(only):
            output, tangent = self._jvp(inputs, column, keep_graph=True, tangent_graph=True)
            unverified = first_unverified_operation(output)
            if unverified is not None:
                raise _UnverifiedOperation(unverified)
            with torch.enable_grad():
                value = self.loss.batch_sum(output, target) * self.scale
                if output.requires_grad:
                    (output_grad,) = torch.autograd.grad(value, output, create_graph=True)
                    directional = (output_grad * tangent).sum()  # ⟨∇_z ℓ, J v⟩ = ∇_θ L · v
                    if directional.requires_grad:
                        hv = torch.autograd.grad(directional, self.params, allow_unused=True,
                                                 materialize_grads=True)
                        for o, h in zip(out, hv):
                            o[0].add_(h)
            losses.append(value.detach())
            loss_batches.append(index)
        return out, losses, loss_batches

    def _padding_rows(self) -> list[tuple[int, int]]:
        """(index into ``params``, row) of the padding row of every selected embedding weight."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return [(index[id(m.weight)], m.padding_idx) for m in self.model.modules()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None and id(m.weight) in index]

    def _finite_difference_products(self, V, only):
        k = V[0].shape[0]
        out = self._zeros_like_block(k)
        losses, loss_batches = [], []
        step = self.finite_difference_step()
        sharded = isinstance(self.parallel, Sharded)
        padding = [] if sharded else self._padding_rows()
        if padding:
            # Autograd gives an embedding's padding row no gradient: its rows and columns of the
            # Hessian are zero. Differences of gradients along it would see the row's real
            # effect on the other gradients, so the direction leaves it out (then H_fd = P H P
            # with P zeroing those rows, which is autograd's H where nothing else reads them).
            V = [v.clone() if any(i == j for j, _ in padding) else v for i, v in enumerate(V)]
            for i, row in padding:
                V[i][:, row] = 0
        checked = self.__dict__.setdefault("_structure_checked", set())
        with self._shifted_parameters() as shift:
            for col in range(k):
                norm = self._global_norm([v[col] for v in V])
                if norm == 0.0:
                    continue
                eps = step / norm
                for sign in (1.0, -1.0):
                    # One process: the gradient at new tensors θ₀ ± εv, the model untouched;
                    # FSDP: θ shifted in place (at is None).
                    at = shift(V, col, sign * eps)
                    for index, inputs, target in self._batches(only):
                        if sharded or index in checked:
                            value, grads, _ = self._loss_gradient(inputs, target, self.scale, at=at)
                        else:  # each batch's forward is read once for what autograd does not see
                            regions = ConstantRegions(i for i, _ in padding)
                            value, grads, _ = self._loss_gradient(inputs, target, self.scale, at=at,
                                                                  regions=regions)
                            self._refuse_hidden_dependence(regions, index)
                            checked.add(index)
                        for o, g in zip(out, grads):
                            o[col].add_(g, alpha=sign)
                        losses.append(value)
                        loss_batches.append(index)
                for o in out:
                    o[col].div_(2 * eps)
        return out, losses, loss_batches

    def _refuse_hidden_dependence(self, regions: ConstantRegions, index: int) -> None:
        """Refuse finite differences where autograd treats a parameter-dependent value as constant."""
        fix = ("finite differences differentiate the loss's values, and autograd's Hessian treats that "
               "value as a constant: the two differ (and the finite-difference matrix is not "
               "symmetric). Use method='autograd', which is exact here")
        if regions.found is not None:
            raise ValueError(
                f"batch {index}: the model's forward calls {regions.found} without gradients (under "
                f"torch.no_grad() or detach()) on a tensor that depends on the selected parameters; {fix}"
            )
        if regions.padding_weight_used_elsewhere:
            raise ValueError(
                f"batch {index}: an embedding weight with padding_idx is also read outside the "
                f"embedding (tied to an output head?): its padding row gets a gradient from that "
                f"use only; {fix}, or leave that weight out of params"
            )
