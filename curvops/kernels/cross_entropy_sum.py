"""Batch-sum softmax cross-entropy whose double backward runs through ``cross_entropy_hvp``.

``cross_entropy_sum(logits, target, ...)`` equals
``F.cross_entropy(logits, target, ..., reduction="sum")`` (hard or probability targets,
``ignore_index``, class weights, label smoothing, class dimension 1), and is twice
differentiable w.r.t. the logits:

- the loss is a custom ``torch.autograd.Function`` whose backward returns
  ``g · (a p − b)`` through a second Function (``p = softmax(z)`` per row, ``b`` the
  per-row target weights, ``a = Σ_k b_k``; see below);
- the backward of that second Function w.r.t. the logits is the loss-Hessian product
  ``g · a (diag p − p pᵀ) U``, computed by the fused kernel
  [`curvops.kernels.cross_entropy_hvp`][curvops.kernels.cross_entropy_hvp] (Triton on CUDA).

So in a Hessian-vector product by double backward (``autograd.grad`` of the gradient
with ``create_graph=True``) the loss-Hessian term is one kernel call, and the only
(N, V) tensors the loss adds are the gradient w.r.t. the logits (needed by the
backward) and the kernel's output. ``F.cross_entropy``'s own double backward goes
through ``log_softmax``/``nll_loss`` and keeps several (N, V) intermediates.

Every row's loss is ``ℓ_r = −Σ_k b_rk log p_rk`` with

- hard targets: ``b_r = α_r e_{t_r} + β_r w``, ``α_r = valid_r (1 − ε) w_{t_r}``,
  ``β_r = valid_r ε / C`` (``w`` the class weights, all ones without them);
- probability targets: ``b_r = w ⊙ ((1 − ε) q_r + ε / C)``;

hence ``∇_z ℓ_r = a_r p_r − b_r`` and ``∇²_z ℓ_r = a_r (diag p_r − p_r p_rᵀ)`` with
``a_r = Σ_k b_rk``: exactly torch's definitions of the smoothed, weighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from curvops.kernels.cross_entropy_hvp import cross_entropy_hvp

__all__ = ["cross_entropy_sum", "ce_row_weights", "CERowWeights"]

# Rows per chunk are chosen so that an accumulation-dtype temporary of a chunk holds at
# most this many elements (64 MiB in float32): bounds the extra memory of low-precision
# logits, whose float32 softmax would otherwise be a full (N, V) float32 copy.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class CERowWeights:
    """Per-row target weights ``b_r`` of cross-entropy in factored form, accumulation dtype.

    Attributes
    ----------
    a : Tensor (R,)
        ``Σ_k b_rk``: the row's loss-Hessian coefficient.
    alpha : Tensor (R,) or None
        Hard targets: weight of the target class (``b_r = α_r e_t + β_r w``).
    target : Tensor (R,) or None
        Hard targets: class index per row, ignored rows set to 0 (``alpha`` is 0 there).
    beta : Tensor (R,) or None
        Hard targets with label smoothing: weight of the spread-out part.
    class_weight : Tensor (C,) or None
        The class weights ``w`` (None: all ones).
    dense : Tensor (R, C) or None
        Probability targets: ``b`` itself.
    """

    a: Tensor
    alpha: Tensor | None = None
    target: Tensor | None = None
    beta: Tensor | None = None
    class_weight: Tensor | None = None
    dense: Tensor | None = None

    def dot(self, z: Tensor) -> Tensor:
        """``Σ_k b_rk z_rk`` per row.

        Parameters
        ----------
        z : Tensor, shape (R, C)
            A chunk of the same rows as these weights.

        Returns
        -------
        Tensor, shape (R,)
            In the accumulation dtype (that of ``a``).
        """
        acc = self.a.dtype
        if self.dense is not None:
            return (self.dense * z.to(acc)).sum(dim=1)
        alpha, target = self._hard()
        out = alpha * z.gather(1, target.unsqueeze(1)).squeeze(1).to(acc)
        if self.beta is not None:
            spread = z.to(acc).sum(dim=1) if self.class_weight is None else z.to(acc) @ self.class_weight
            out = out + self.beta * spread
        return out

    def _hard(self) -> tuple[Tensor, Tensor]:
        """``(alpha, target)`` of hard targets (set together by ``ce_row_weights``)."""
        if self.alpha is None or self.target is None:
            raise ValueError("CERowWeights holds neither dense nor hard targets")
        return self.alpha, self.target

    def rows(self, sl: slice) -> CERowWeights:
        """The same weights restricted to some rows.

        Parameters
        ----------
        sl : slice
            The rows to keep.

        Returns
        -------
        CERowWeights
            Views of this object's per-row tensors (the class weights are shared).
        """

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sl]

        return CERowWeights(
            a=self.a[sl],
            alpha=cut(self.alpha),
            target=cut(self.target),
            beta=cut(self.beta),
            class_weight=self.class_weight,
            dense=cut(self.dense),
        )

    def subtract_from(self, out: Tensor, scale: Tensor) -> None:
        """``out −= scale_r · b_r`` in place.

        Parameters
        ----------
        out : Tensor, shape (R, C)
            In the accumulation dtype; updated in place.
        scale : Tensor, shape (R,)
            Per-row factors.
        """
        if self.dense is not None:
            out.sub_(scale.unsqueeze(1) * self.dense)
            return
        alpha, target = self._hard()
        out.scatter_add_(1, target.unsqueeze(1), (-(scale * alpha)).unsqueeze(1))
        if self.beta is not None:
            spread = scale * self.beta
            if self.class_weight is None:
                out.sub_(spread.unsqueeze(1))
            else:
                out.addr_(spread, self.class_weight, alpha=-1.0)


def ce_row_weights(
    logits2d: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> CERowWeights:
    """Factored per-row target weights of ``F.cross_entropy`` for (R, C) logits.

    Parameters
    ----------
    logits2d : Tensor (R, C)
        Logits, classes last (only shape, dtype and device are used).
    target : Tensor
        Class indices (R,) (integer) or probabilities (R, C) (floating).
    weight, ignore_index, label_smoothing
        As in ``torch.nn.functional.cross_entropy``.

    Returns
    -------
    CERowWeights
        In float32 (float64 for float64 logits): ``dense`` for probability targets,
        ``alpha``/``target`` (and ``beta``, ``class_weight`` with label smoothing) for
        class indices.

    Raises
    ------
    ValueError
        If a counted class index is outside ``[0, C)`` (torch raises there too).
    """
    acc = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
    rows, num_classes = logits2d.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.to(device=logits2d.device, dtype=acc)
    if target.is_floating_point():
        q = target.to(acc)
        if eps:
            q = q * (1 - eps) + eps / num_classes
        dense = q if w is None else q * w
        return CERowWeights(a=dense.sum(dim=1), dense=dense)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
    if rows and bool(((t < 0) | (t >= num_classes)).any()):
        raise ValueError(
            f"cross-entropy target out of range [0, {num_classes}) (and not ignore_index={ignore_index})"
        )
    validf = valid.to(acc)
    wt = validf if w is None else validf * w[t]
    alpha = wt * (1 - eps)
    if not eps:
        return CERowWeights(a=alpha, alpha=alpha, target=t)
    beta = validf * (eps / num_classes)
    total = float(num_classes) if w is None else w.sum()
    return CERowWeights(a=alpha + beta * total, alpha=alpha, target=t, beta=beta, class_weight=w)


def _chunk_rows(z: Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(z.shape[1], 1))


def _row_lse(z: Tensor, acc: torch.dtype) -> Tensor:
    """Per-row logsumexp in the accumulation dtype, chunked over rows."""
    step = _chunk_rows(z)
    return (
        torch.cat([torch.logsumexp(z[i : i + step].to(acc), dim=1) for i in range(0, z.shape[0], step)])
        if z.shape[0]
        else z.new_zeros(0, dtype=acc)
    )


def _gradient(z: Tensor, g: Tensor, rw: CERowWeights) -> Tensor:
    """``g · (a p − b)`` of shape and dtype of ``z``."""
    acc = rw.a.dtype
    scale = g.to(acc) * rw.a
    if z.dtype == acc:
        # One (R, C) tensor: the output, built in place.
        out = torch.softmax(z, dim=1)
        out.mul_(scale.unsqueeze(1))
        rw.subtract_from(out, g.to(acc).expand_as(rw.a))
        return out
    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    step = _chunk_rows(z)
    for i in range(0, z.shape[0], step):
        sl = slice(i, i + step)
        part = torch.softmax(z[sl], dim=1, dtype=acc)
        part.mul_(scale[sl].unsqueeze(1))
        rw.rows(sl).subtract_from(part, g.to(acc).expand_as(rw.a[sl]))
        out[sl].copy_(part)
    return out


def _gradient_dot(z: Tensor, u: Tensor, rw: CERowWeights) -> Tensor:
    """``Σ (a p − b) ⊙ u`` (a scalar, accumulation dtype), chunked over rows."""
    acc = rw.a.dtype
    total = torch.zeros((), dtype=acc, device=z.device)
    step = _chunk_rows(z)
    for i in range(0, z.shape[0], step):
        sl = slice(i, i + step)
        p = torch.softmax(z[sl], dim=1, dtype=acc)
        part = rw.rows(sl)
        total = total + (part.a * (p * u[sl].to(acc)).sum(dim=1)).sum() - part.dot(u[sl]).sum()
    return total


class _CrossEntropySum(torch.autograd.Function):
    """``Σ_r (a_r lse(z_r) − Σ_k b_rk z_rk)``; backward through ``_CrossEntropyGrad``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, rw: CERowWeights) -> Tensor:
        acc = rw.a.dtype
        lse = _row_lse(z, acc)
        value = (rw.a * lse).sum() - rw.dot(z).sum()
        ctx.save_for_backward(z)
        ctx.rw = rw
        return value.to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        (z,) = ctx.saved_tensors
        return _CrossEntropyGrad.apply(z, g, ctx.rw), None


class _CrossEntropyGrad(torch.autograd.Function):
    """``g · (a p − b)``; its backward w.r.t. ``z`` is the fused loss-Hessian product."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, g: Tensor, rw: CERowWeights) -> Tensor:
        ctx.save_for_backward(z, g)
        ctx.rw = rw
        return _gradient(z, g, rw)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        z, g = ctx.saved_tensors
        rw: CERowWeights = ctx.rw
        grad_z = grad_g = None
        if ctx.needs_input_grad[0]:
            coeff = g.to(rw.a.dtype) * rw.a
            grad_z = cross_entropy_hvp(z, u.to(z.dtype), weight=coeff, reduction="sum")
        if ctx.needs_input_grad[1]:
            grad_g = _gradient_dot(z, u, rw).to(g.dtype).reshape(g.shape)
        return grad_z, grad_g, None


def _classes_last(x: Tensor) -> Tensor:
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _outside_plain_autograd(logits: Tensor) -> bool:
    """Dual tensors (forward AD) and torch.func transforms: the Functions define neither jvp nor vmap."""
    import torch.autograd.forward_ad as fwAD

    if fwAD.unpack_dual(logits).tangent is not None:
        return True
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(logits)
    except AttributeError:  # pragma: no cover - old torch
        return False


def cross_entropy_sum(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(..., reduction="sum")`` with a fused-kernel double backward.

    Parameters
    ----------
    logits : Tensor
        ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (classes in dimension 1), floating.
    target : Tensor
        Class indices (integer, the shape of ``logits`` without dimension 1) or class
        probabilities (floating, the shape of ``logits``).
    weight, ignore_index, label_smoothing
        As in ``torch.nn.functional.cross_entropy``.

    Returns
    -------
    Tensor
        0-d, dtype of ``logits``: the summed loss. Differentiable twice w.r.t.
        ``logits``; a third derivative raises (``once_differentiable``).

    Notes
    -----
    Falls back to ``F.cross_entropy`` itself where the custom Functions cannot run:
    logits that carry a forward-mode tangent (dual tensors) or that are wrapped by a
    ``torch.func`` transform (vmap, grad, jvp). Logits with more than two dimensions
    are moved to classes-last rows, which costs one (N, C) copy (torch's own
    ``log_softmax`` over dimension 1 allocates as much). Arithmetic is in float32
    (float64 for float64 logits), whatever the logits' dtype, as ``F.cross_entropy``
    does under autocast.
    """
    if _outside_plain_autograd(logits) or not logits.is_floating_point():
        return F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=ignore_index,
            reduction="sum",
            label_smoothing=label_smoothing,
        )
    z = _classes_last(logits)
    t = _classes_last(target) if target.is_floating_point() else target.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match logits of shape {tuple(logits.shape)}"
        )
    rw = ce_row_weights(z, t, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return _CrossEntropySum.apply(z, rw)
