"""Dense reference curvature matrices, built independently of ``curvops``.

Everything here uses plain ``torch.autograd.grad`` only: no ``torch.func``, no ``vmap``, no
``is_grads_batched``. On this torch (2.13) ``torch.func.hessian`` / ``jacrev(jacrev(...))`` and
batched double backward return a wrong, non-symmetric weight/input cross block through
``layer_norm``, ``batch_norm`` (training) and ``instance_norm``; plain double backward is right
(``/work/shared/reference/anchors.md``; ``test_references.py`` re-demonstrates it).

The objective
-------------
All references describe the **whole-dataset** objective, computed by concatenating every batch
into one (dict inputs key-wise) and calling the user's ``loss_fn`` once with its own
reduction::

    L(θ) = loss_fn(model(X_all), y_all) = c · Σ_t ℓ_t(θ)

Normaliser ``c`` and loss terms ``ℓ_t`` (used by the empirical Fisher; checked inside
:func:`loss_terms` against ``loss_fn`` itself):

- ``CrossEntropyLoss`` with class-index targets: a term is one output *position*, i.e. one row
  ``output[n, :, d1, ...]`` over the class dimension 1 (every token of a sequence is a term).
  Positions whose target equals ``ignore_index`` are not terms. ``mean``: ``c = 1 / Σ_t w[y_t]``
  over counted positions (``w`` = class ``weight``, all ones by default, so ``c = 1 / #counted
  targets``); ``sum``: ``c = 1``. With probability targets every position is a term and
  ``mean`` has ``c = 1 / #positions``.
- ``MSELoss`` and ``BCEWithLogitsLoss``: a term is one *sample* ``n`` (all its output elements
  summed, ``pos_weight`` / ``weight`` included). ``mean``: ``c = 1 / output.numel()`` (mean over
  every element, as torch does); ``sum``: ``c = 1``.

Matrices (D × D, D = Σ numel of ``params``; parameters in the order given, each flattened
row-major, i.e. the order of :func:`to_vector`):

- :func:`dense_hessian`      ∇²_θ L
- :func:`dense_ggn`          Jᵀ H_out J, J = ∂ vec(f)/∂θ on the concatenated data, H_out = ∂²L/∂vec(f)²
- :func:`dense_empirical_fisher`  c Σ_t ∇_θ ℓ_t ∇_θ ℓ_tᵀ (for (N, C) outputs equal to
  curvlinops' ``EFLinearOperator``; for MSE/BCE with extra output dimensions curvlinops uses
  per-position terms instead, which differs)

The Monte-Carlo Fisher has no separate reference: its expectation is the GGN (for these
exponential-family losses), so its tests compare against :func:`dense_ggn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.operators.cases import LossWithReduction, call_model

Inputs = Tensor | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# float64 unit roundoff u = 2^-53 ≈ 1.1e-16
UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2

# Relative asymmetry allowed in a double-backward Hessian. H_ij and H_ji come from different
# backward paths, so they differ by rounding only: each is a sum of K products accumulated
# through the graph, error ≲ γ_K · Σ|products| ≈ K·u·(cancellation factor)·max|H|. For these
# models K ≲ 10³ and the cancellation factor ≲ 10², giving ≲ 10⁵·u ≈ 1e-11; 1e-10 leaves a 10×
# margin while any real asymmetry (a wrong cross block is O(max|H|)) is ≥ 1e-3.
HESSIAN_SYMMETRY_RTOL = 1e-10


# --------------------------------------------------------------------------- vectors
def to_vector(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` flattened row-major into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def from_vector(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split ``vec`` into tensors shaped like ``like`` (inverse of :func:`to_vector`).

    Raises
    ------
    ValueError
        If ``vec`` is not 1-D with ``Σ numel(like)`` entries.
    """
    sizes = [t.numel() for t in like]
    if vec.ndim != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"expected a vector of {sum(sizes)} entries, got shape {tuple(vec.shape)}")
    return [v.reshape(t.shape) for v, t in zip(vec.split(sizes), like)]


def num_params(params: Sequence[Tensor]) -> int:
    """D = total number of entries of ``params``."""
    return sum(p.numel() for p in params)


def _flat_grad(out: Tensor, params: Sequence[Tensor], *, create_graph: bool = False) -> Tensor:
    """∂out/∂params as one vector; zeros for parameters ``out`` does not depend on."""
    if not out.requires_grad:  # e.g. a gradient entry that is constant in θ
        return torch.zeros(num_params(params), dtype=out.dtype)
    grads = torch.autograd.grad(
        out, list(params), retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return to_vector([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


# --------------------------------------------------------------------------- data
@overload
def concat_batches(data: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]: ...
@overload
def concat_batches(data: Sequence[Batch]) -> Batch: ...
def concat_batches(data: Sequence[Batch]) -> Batch:
    """Concatenate all batches into one along dimension 0 (dict inputs key-wise)."""
    xs = [x for x, _ in data]
    ys = torch.cat([y for _, y in data])
    first = xs[0]
    if isinstance(first, Mapping):
        dicts = [x for x in xs if isinstance(x, Mapping)]
        assert len(dicts) == len(xs), "all batches need dict inputs when the first has them"
        keys = list(first.keys())
        assert all(set(x.keys()) == set(keys) for x in dicts), "all batches need the same input keys"
        return {k: torch.cat([x[k] for x in dicts]) for k in keys}, ys
    tensors = [x for x in xs if isinstance(x, Tensor)]
    assert len(tensors) == len(xs), "all batches need tensor inputs when the first has them"
    return torch.cat(tensors), ys


def whole_dataset_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[Batch]) -> Tensor:
    """The objective of the whole data set: ``loss_fn`` called once on all batches concatenated.

    With ``reduction="mean"`` this is the exact mean over the whole data set (for
    cross-entropy with ``ignore_index``: normalised by the counted targets of *all* batches),
    which is NOT the average of per-batch means when batches differ in size or in counted
    targets.
    """
    x, y = concat_batches(data)
    return loss_fn(call_model(model, x), y)


# --------------------------------------------------------------------------- Hessian
def dense_hessian(
    model: nn.Module, loss_fn: LossFn, data: Sequence[Batch], params: Sequence[Tensor]
) -> Tensor:
    """Dense Hessian ∇²_θ L of :func:`whole_dataset_loss`, (D, D).

    One ``create_graph`` backward for g = ∇_θ L, then row i = ∇_θ (g · e_i) by a plain second
    backward, i = 1..D. Asserts symmetry to ``HESSIAN_SYMMETRY_RTOL`` (relative to max |H|).
    """
    params = list(params)
    loss = whole_dataset_loss(model, loss_fn, data)
    g = _flat_grad(loss, params, create_graph=True)
    H = torch.stack([_flat_grad(g[i], params) for i in range(g.numel())])
    scale = H.abs().max().clamp_min(torch.finfo(H.dtype).tiny)
    asym = (H - H.T).abs().max()
    assert asym <= HESSIAN_SYMMETRY_RTOL * scale, (
        f"dense Hessian not symmetric: max|H-Hᵀ| = {asym:.3e}, max|H| = {scale:.3e}"
    )
    return H


# --------------------------------------------------------------------------- GGN
def model_jacobian(
    model: nn.Module, data: Sequence[Batch], params: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Output on the concatenated data and its Jacobian J = ∂ vec(f)/∂θ, (M, D), row by row.

    ``vec`` flattens the whole output row-major (M = output.numel()).
    """
    x, _ = concat_batches(data)
    out = call_model(model, x)
    flat = out.reshape(-1)
    J = torch.stack([_flat_grad(flat[m], params) for m in range(flat.numel())])
    return out.detach(), J


def loss_output_hessian(loss_fn: LossFn, output: Tensor, targets: Tensor) -> Tensor:
    """H_out = ∂² loss_fn(f, y) / ∂vec(f)², (M, M), by plain double backward at ``f = output``."""
    z = output.detach().clone().requires_grad_(True)
    gz = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)[0].reshape(-1)
    return torch.stack([_flat_grad(gz[m], [z]) for m in range(gz.numel())])


def dense_ggn(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[Batch],
    params: Sequence[Tensor],
    *,
    return_factors: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Dense generalised Gauss-Newton G = Jᵀ H_out J of :func:`whole_dataset_loss`, (D, D).

    J is the model Jacobian on the concatenated data (:func:`model_jacobian`), H_out the
    Hessian of the whole-dataset loss w.r.t. the whole flattened output
    (:func:`loss_output_hessian`), so the loss normaliser ``c`` sits inside H_out.

    Parameters
    ----------
    return_factors : bool
        Also return ``J`` (M, D) and ``H_out`` (M, M).
    """
    _, y = concat_batches(data)
    out, J = model_jacobian(model, data, params)
    H_out = loss_output_hessian(loss_fn, out, y)
    G = J.T @ H_out @ J
    G = 0.5 * (G + G.T)  # J.T @ (H J) is symmetric up to rounding of the matmul order only
    return (G, J, H_out) if return_factors else G


# --------------------------------------------------------------------------- empirical Fisher
def loss_terms(loss_fn: LossWithReduction, output: Tensor, targets: Tensor) -> tuple[Tensor, float]:
    """Loss terms ℓ_t and normaliser c with ``loss_fn(output, targets) == c · Σ_t ℓ_t``.

    Returns
    -------
    terms : Tensor
        1-D, one entry per loss term (see the module docstring for what a term is); ignored
        cross-entropy positions are left out.
    c : float
        ``1 / normaliser`` for ``reduction="mean"``, ``1.0`` for ``"sum"``.

    Raises
    ------
    NotImplementedError
        For losses other than CrossEntropyLoss / MSELoss / BCEWithLogitsLoss, or CE with both
        class weights and label smoothing.
    """
    reduction = loss_fn.reduction
    if reduction not in ("mean", "sum"):
        raise NotImplementedError(f"reduction {reduction!r}")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.is_floating_point():  # class probabilities: every position is a term
            per = F.cross_entropy(
                output,
                targets,
                weight=loss_fn.weight,
                reduction="none",
                label_smoothing=loss_fn.label_smoothing,
            )
            terms = per.reshape(-1)
            normaliser = float(terms.numel())
        else:
            if loss_fn.weight is not None and loss_fn.label_smoothing > 0:
                raise NotImplementedError("CE with both class weights and label smoothing")
            per = F.cross_entropy(
                output,
                targets,
                weight=loss_fn.weight,
                ignore_index=loss_fn.ignore_index,
                reduction="none",
                label_smoothing=loss_fn.label_smoothing,
            )
            counted = (targets != loss_fn.ignore_index).reshape(-1)
            terms = per.reshape(-1)[counted]
            if loss_fn.weight is None:
                normaliser = float(counted.sum())
            else:
                normaliser = float(loss_fn.weight[targets.reshape(-1)[counted]].sum())
    elif isinstance(loss_fn, nn.MSELoss):
        per = F.mse_loss(output, targets, reduction="none")
        terms = per.reshape(per.shape[0], -1).sum(1)
        normaliser = float(per.numel())
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        per = F.binary_cross_entropy_with_logits(
            output, targets, weight=loss_fn.weight, pos_weight=loss_fn.pos_weight, reduction="none"
        )
        terms = per.reshape(per.shape[0], -1).sum(1)
        normaliser = float(per.numel())
    else:
        raise NotImplementedError(f"no loss-term convention for {type(loss_fn).__name__}")
    c = 1.0 / normaliser if reduction == "mean" else 1.0

    # the convention must reproduce the user's loss; summation order differs, so allow the
    # rounding of a sum of n terms: |error| ≤ n·u·Σ|terms| (γ_n bound), ×10 margin
    with torch.no_grad():
        expected = loss_fn(output, targets)
        got = c * terms.sum()
        bound = (
            10 * max(terms.numel(), 1) * UNIT_ROUNDOFF * c * terms.abs().sum()
            + torch.finfo(output.dtype).tiny
        )
        assert (got - expected).abs() <= bound, (
            f"loss-term convention broken: c·Σℓ_t = {got.item()!r} vs loss {expected.item()!r}"
        )
    return terms, c


def dense_empirical_fisher(
    model: nn.Module, loss_fn: LossWithReduction, data: Sequence[Batch], params: Sequence[Tensor]
) -> Tensor:
    """Dense empirical Fisher c Σ_t ∇_θ ℓ_t ∇_θ ℓ_tᵀ, (D, D), by a plain loop over loss terms.

    Terms and ``c`` as in :func:`loss_terms`, over the concatenated data.
    """
    x, y = concat_batches(data)
    out = call_model(model, x)
    terms, c = loss_terms(loss_fn, out, y)
    D = num_params(params)
    F_ = torch.zeros(D, D, dtype=out.dtype)
    for t in range(terms.numel()):
        g = _flat_grad(terms[t], params)
        F_.add_(torch.outer(g, g))
    return c * F_


# --------------------------------------------------------------------------- finite differences
@torch.no_grad()
def _shift_(params: Sequence[Tensor], direction: Sequence[Tensor], alpha: float) -> None:
    for p, d in zip(params, direction):
        p.add_(d, alpha=alpha)


def whole_dataset_gradient(
    model: nn.Module, loss_fn: LossFn, data: Sequence[Batch], params: Sequence[Tensor]
) -> Tensor:
    """∇_θ L of :func:`whole_dataset_loss` as one vector."""
    return _flat_grad(whole_dataset_loss(model, loss_fn, data), params)


def finite_difference_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[Batch],
    params: Sequence[Tensor],
    v: Tensor,
    eps: float,
) -> Tensor:
    """Central difference (∇L(θ + εv) - ∇L(θ - εv)) / (2ε) ≈ ∇²L(θ) v.

    Error: truncation ε²/6 · ∂³L[v, v, ·] plus rounding ≈ u·|∇L|·κ/ε (κ: growth of the
    gradient's own rounding error), so ε ≈ u^(1/3)·scale minimises it. The parameters are
    restored exactly afterwards (copied back, not shifted back, so no rounding drift).
    """
    params = list(params)
    direction = from_vector(v.to(params[0].dtype), params)
    saved = [p.detach().clone() for p in params]
    try:
        _shift_(params, direction, eps)
        g_plus = whole_dataset_gradient(model, loss_fn, data, params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        _shift_(params, direction, -eps)
        g_minus = whole_dataset_gradient(model, loss_fn, data, params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return (g_plus - g_minus) / (2 * eps)


def finite_difference_hessian(
    model: nn.Module, loss_fn: LossFn, data: Sequence[Batch], params: Sequence[Tensor], eps: float
) -> Tensor:
    """All D columns of the Hessian by :func:`finite_difference_hvp` on unit vectors (not symmetrised)."""
    D = num_params(params)
    eye = torch.eye(D, dtype=params[0].dtype)
    return torch.stack(
        [finite_difference_hvp(model, loss_fn, data, params, eye[i], eps) for i in range(D)], dim=1
    )


__all__ = [
    "HESSIAN_SYMMETRY_RTOL",
    "UNIT_ROUNDOFF",
    "concat_batches",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "finite_difference_hessian",
    "finite_difference_hvp",
    "from_vector",
    "loss_output_hessian",
    "loss_terms",
    "model_jacobian",
    "num_params",
    "to_vector",
    "whole_dataset_gradient",
    "whole_dataset_loss",
]
