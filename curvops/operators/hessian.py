"""The Hessian of the loss w.r.t. the parameters, by double backward or finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

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
        ``u^(1/3) · (1 + ‖θ‖)`` with ``u`` the unit roundoff of the parameters' dtype
        and ``‖θ‖`` the norm of the selected parameters. Central differences have a
        truncation error ``O(ε²)`` and a rounding error ``O(u/ε)``; the cube root
        balances the two, so the relative error of ``Hv`` is ``O(u^(2/3))`` —
        about 1e-11 in float64, 1e-5 in float32 — times constants of the model
        (third derivatives along ``v``, conditioning of the gradient). Scaling by
        ``1 + ‖θ‖`` makes the step relative to the parameters' magnitude.
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

    def finite_difference_step(self) -> float:
        """The perturbation norm ``‖εv‖`` used by ``method="finite_difference"``."""
        if self.fd_eps is not None:
            return float(self.fd_eps)
        unit_roundoff = float(torch.finfo(self.torch_dtype).eps) / 2
        theta_norm = float(torch.linalg.vector_norm(self.parameter_vector()))
        return unit_roundoff ** (1 / 3) * (1.0 + theta_norm)

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
        saved = [p.detach().clone() for p in self.params]
        try:
            for col in range(k):
                norm = torch.linalg.vector_norm(torch.cat([v[col].reshape(-1) for v in V]))
                if float(norm) == 0.0:
                    continue
                eps = step / norm
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for p, p0, v in zip(self.params, saved, V):
                            p.copy_(p0 + (sign * eps) * v[col])
                    for index, inputs, target in self._batches(only):
                        with torch.enable_grad():
                            value = self.loss.batch_sum(self.forward(inputs), target) * self.scale
                            grads = torch.autograd.grad(value, self.params, allow_unused=True,
                                                        materialize_grads=True)
                        for o, g in zip(out, grads):
                            o[col].add_(g, alpha=sign)
                        losses.append(value.detach())
                        loss_batches.append(index)
                for o in out:
                    o[col].div_(2 * eps)
        finally:
            with torch.no_grad():
                for p, p0 in zip(self.params, saved):
                    p.copy_(p0)
        return out, losses, loss_batches
