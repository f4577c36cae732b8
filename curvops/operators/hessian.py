"""The Hessian of the loss w.r.t. the parameters, by double backward or finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._parallel import Sharded
from curvops.operators.base import CurvatureOperator, ParamSelection

_METHODS = ("autograd", "finite_difference")


class HessianOperator(CurvatureOperator):
    """Hessian ``∇²_θ L`` of the whole-dataset loss as a linear operator (D, D).

    Parameters
    ----------
    model, loss_fn, data, params, check_deterministic
        See :class:`~curvops.operators.base.CurvatureOperator`.
    method : {"autograd", "finite_difference"}, optional
        ``"autograd"`` (default): Hessian-vector products by double backward; a (D, k)
        block reuses one differentiable gradient per batch for all k columns.
        ``"finite_difference"``: central differences of gradients,
        ``Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / (2ε)``; needs no double backward (the
        path for FSDP and for layers without second derivatives) and costs two
        gradient passes per vector.
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

    def _products(self, V, only=None):
        if self.method == "finite_difference":
            return self._finite_difference_products(V, only)
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

    def _finite_difference_products(self, V, only):
        k = V[0].shape[0]
        out = self._zeros_like_block(k)
        losses, loss_batches = [], []
        step = self.finite_difference_step()
        with self._shifted_parameters() as shift:
            for col in range(k):
                norm = self._global_norm([v[col] for v in V])
                if norm == 0.0:
                    continue
                eps = step / norm
                for sign in (1.0, -1.0):
                    shift(V, col, sign * eps)
                    for index, inputs, target in self._batches(only):
                        value, grads, _ = self._loss_gradient(inputs, target, self.scale)
                        for o, g in zip(out, grads):
                            o[col].add_(g, alpha=sign)
                        losses.append(value)
                        loss_batches.append(index)
                for o in out:
                    o[col].div_(2 * eps)
        return out, losses, loss_batches
