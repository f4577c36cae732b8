"""The generalized Gauss-Newton matrix ``Jᵀ H_loss J``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from curvops.operators.base import OutputSpaceOperator


class GGNOperator(OutputSpaceOperator):
    """Generalized Gauss-Newton ``G = c Σ_b J_bᵀ (∇²_f ℓ_b) J_b`` as a linear operator (D, D).

    ``J_b`` is the Jacobian of the model output of batch ``b`` w.r.t. the selected
    parameters and ``∇²_f ℓ_b`` the Hessian of the batch's loss sum w.r.t. that output;
    ``c`` is ``1 / normaliser`` for mean losses and 1 for sum losses. The loss Hessian
    is applied in closed form for the built-in losses — cross-entropy
    ``a (diag(p) − p pᵀ)`` per position (never materialised; ``a`` folds in class
    weights, label smoothing and ``ignore_index``), MSE ``2I``, BCE-with-logits
    ``σ(1 − σ)`` (times weights) — and by double backward w.r.t. the output for custom
    losses. The GGN is symmetric positive semi-definite for convex losses.

    Parameters
    ----------
    model, loss_fn, data, params, check_deterministic
        See :class:`~curvops.operators.base.CurvatureOperator`.
    """

    @property
    def is_positive_semidefinite(self) -> bool:
        """True for the built-in losses, which are convex in the output; unknown for custom ones."""
        return self.loss.kind != "custom"

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Any) -> Tensor:
        return self.loss.output_hvp(output, target, jv)
