"""The Hessian of the loss w.r.t. the parameters, by double backward or finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._forward_ad import own_storage
from curvops.operators._parallel import Sharded
from curvops.operators.base import CurvatureOperator, ParamSelection

_METHODS = ("autograd", "finite_difference")

#: Messages of the errors that make reverse over forward unusable for a model: an operation
#: without a forward-mode derivative, or one whose forward-mode rule cannot be differentiated
#: again (torch 2.13: the tangent rules of softmax and log_softmax reuse an ``exp`` output in
#: place, so attention fails in the backward pass with a version-counter error). A genuine
#: in-place bug of the model fails double backward the same way and is raised there.
_FORWARD_MODE_FAILURES = ("forward AD", "forward-mode", "jvp", "modified by an inplace operation")


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
        ``⟨∇_z ℓ, J v⟩``), which forms fewer matrix products; it is checked once against
        double backward, which replaces it where torch's forward-mode rules are wrong
        when differentiated (``layer_norm`` on torch 2.13).
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
    #: not right when differentiated: on torch 2.13 ``layer_norm``'s gives a Hessian 25% off
    #: (its tangent treats the saved statistics as constants), and softmax's fails outright.
    #: So before its first use the operator checks it against double backward on the first
    #: batch with a seeded random vector, and uses double backward for good if the two
    #: disagree beyond ``10 · √u`` relative or the forward-mode pass raises. (Transformers
    #: fail it; with both rules rewritten, GPT-2 measured slower by reverse over forward
    #: anyway: ``benchmarks/results/lm_h200_2026-12-02.md``.)
    _reverse_over_forward: bool = True

    def _use_reverse_over_forward(self, k: int) -> bool:
        return k == 1 and self._reverse_over_forward and self.__dict__.get("_forward_mode_verdict") is not False

    def _products(self, V, only=None):
        if self.method == "finite_difference":
            return self._finite_difference_products(V, only)
        if self._use_reverse_over_forward(V[0].shape[0]) and self._reverse_over_forward_agrees():
            return self._reverse_over_forward_products(V, only)
        return self._double_backward_products(V, only)

    def _reverse_over_forward_agrees(self) -> bool:
        """Whether reverse over forward matches double backward on this model (checked once)."""
        verdict = self.__dict__.get("_forward_mode_verdict")
        if verdict is None:
            generator = torch.Generator(device=self.device).manual_seed(0)
            probe = [torch.randn((1, *s), generator=generator, dtype=self.torch_dtype, device=self.device)
                     for s in self.param_shapes]
            first = {0}
            try:
                fast = self._reverse_over_forward_products(probe, first)[0]
            except (NotImplementedError, RuntimeError) as error:
                if not any(sign in str(error) for sign in _FORWARD_MODE_FAILURES):
                    raise
                verdict = False
            else:
                exact = self._double_backward_products(probe, first)[0]
                difference = self._global_norm([a - b for a, b in zip(fast, exact)])
                scale = self._global_norm(exact)
                tolerance = 10.0 * float(torch.finfo(self.torch_dtype).eps) ** 0.5
                verdict = bool(difference <= tolerance * scale)
            self._forward_mode_verdict = verdict
        return verdict

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
