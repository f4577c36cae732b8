"""Randomized trace estimation: Hutchinson, Hutch++, XTrace and XNysTrace."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from curvops.algorithms._checks import ProbeKind, check_int, check_probe, check_seed
from curvops.algorithms._memory import (
    PRODUCT_COLUMNS,
    plan_block,
    plan_columns,
    qr_workspace_columns,
    resolve_budget,
)
from curvops.algorithms.vectors import Array, Operand, as_operand

DEFAULT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class ScalarEstimate:
    """Randomized estimate of a scalar (trace, squared Frobenius norm).

    Attributes
    ----------
    estimate : float
        The estimate (units of the operator's entries; squared for the Frobenius norm).
    standard_error : float
        Estimated standard deviation of ``estimate`` (0 if exact; NaN if it cannot be
        estimated from a single sample).
    num_matvecs : int
        Operator-vector products used (at most the budget).
    exact : bool
        True if the budget reached ``D`` and the value was computed exactly from ``A e_i``.
    """

    estimate: float
    standard_error: float
    num_matvecs: int
    exact: bool


def check_budget(budget: Any, minimum: int = 1) -> int:
    """Validate a matvec budget.

    Parameters
    ----------
    budget
        Matvec budget.
    minimum
        Smallest allowed budget (default 1).

    Returns
    -------
    int
        The budget.

    Raises
    ------
    TypeError, ValueError
        If it is not an integer ``>= minimum``.
    """
    return check_int(budget, "budget", minimum)


def check_block_size(block_size: int | None) -> int:
    """Validate the probe block size (``None`` -> default 32).

    Parameters
    ----------
    block_size
        Probes per block product, or None.

    Returns
    -------
    int
        The block size.

    Raises
    ------
    TypeError, ValueError
        If it is not an integer ``>= 1``.
    """
    return DEFAULT_BLOCK_SIZE if block_size is None else check_int(block_size, "block_size", 1)


def identity_images(operand: Operand, block_size: int) -> Iterator[tuple[int, int, Array]]:
    """Yield ``(start, stop, A[:, start:stop])`` for consecutive column blocks of ``A``.

    Parameters
    ----------
    operand
        The operator in the vector layer.
    block_size
        Columns per block product.

    Yields
    ------
    tuple
        ``start``, ``stop`` and the ``(D, stop - start)`` product.
    """
    for start in range(0, operand.dim, block_size):
        stop = min(start + block_size, operand.dim)
        yield start, stop, operand.matmat(operand.identity_columns(start, stop))


def probe_images(
    operand: Operand, num_probes: int, kind: str, rng: Any, block_size: int
) -> Iterator[tuple[Array, Array]]:
    """Yield ``(Z, A Z)`` for consecutive ``(D, b)`` blocks of random probes, ``b <= block_size``.

    Parameters
    ----------
    operand
        The operator in the vector layer.
    num_probes
        Probes in total.
    kind
        ``"rademacher"`` or ``"gaussian"``.
    rng
        The operand's generator.
    block_size
        Probes per block product.

    Yields
    ------
    tuple
        The ``(D, b)`` probes and their product.
    """
    for start in range(0, num_probes, block_size):
        probes = operand.probes(min(block_size, num_probes - start), kind, rng)
        yield probes, operand.matmat(probes)


def mean_and_standard_error(samples: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(n)`` (NaN for ``n == 1``).

    Parameters
    ----------
    samples
        ``(n, ...)`` samples along axis 0.

    Returns
    -------
    tuple of float
        The mean and its standard error.
    """
    count = samples.shape[0]
    mean = float(samples.mean())
    if count < 2:
        return mean, math.nan
    return mean, float(samples.std(ddof=1) / math.sqrt(count))


def _exact_trace(operand: Operand, block_size: int) -> ScalarEstimate:
    total = 0.0
    for start, stop, image in identity_images(operand, block_size):
        _, values = operand.diagonal_of_columns(image, start, stop)
        total += operand.sum_over_shards(float(operand.to_host(values).sum()))
    return ScalarEstimate(total, 0.0, operand.num_matvecs, True)


def probe_block_size(
    operand: Operand,
    block_size: int | None,
    memory_budget: float | None,
    per_probe_columns: float,
    what: str,
    fixed_columns: float = 0.0,
) -> int:
    """Probes per block: ``block_size`` if given (``MemoryError`` if it does not fit the memory
    budget), else the default 32 or as many as fit, at least 1 (``MemoryError`` otherwise).

    Parameters
    ----------
    operand
        The operator in the vector layer.
    block_size
        Requested probes per block, or None.
    memory_budget
        Bytes the algorithm may use, or None (half the device's available memory).
    per_probe_columns
        Length-``D`` columns of working memory per probe.
    what
        The call, for the ``MemoryError`` message.
    fixed_columns
        Columns needed whatever the block size (default 0).

    Returns
    -------
    int
        Probes per block.

    Raises
    ------
    MemoryError
        If the requested block, or a single probe, does not fit.
    """
    if block_size is not None:
        check_block_size(block_size)
    return plan_block(
        operand,
        block_size,
        DEFAULT_BLOCK_SIZE,
        memory_budget,
        fixed_columns,
        per_probe_columns,
        what,
        "block_size",
        "a larger memory_budget= if the memory is there",
    )


def _setup(
    A: Any,
    budget: Any,
    probe: str,
    seed: Any,
    block_size: Any,
    dim: Any,
    minimum: int,
    memory_budget: float | None,
    per_probe_columns: float,
    what: str,
    fixed_columns: float = 0.0,
):
    """Operand, budget, probes per block (planned against the memory budget) and generator."""
    operand = as_operand(A, dim)
    budget = check_budget(budget, minimum)
    check_probe(probe)
    block_size = probe_block_size(operand, block_size, memory_budget, per_probe_columns, what, fixed_columns)
    rng = operand.rng(check_seed(seed))
    return operand, budget, block_size, rng


def hutchinson_trace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """Hutchinson's estimator ``tr(A) ~ mean_i z_i^T A z_i`` with ``budget`` random probes.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    budget
        Number of matvecs (= probes), ``>= 1``. If ``budget >= D`` the trace is computed
        exactly from ``A e_i`` with ``D`` matvecs.
    probe
        ``"rademacher"`` (entries +-1, lower variance for diagonally dominant ``A``) or
        ``"gaussian"``.
    seed
        Seed of the probes; same seed and block size give the same result within a backend
        (probes are drawn per block: pass ``block_size`` for results that do not depend on
        the memory available).
    block_size
        Probes per block product ``A @ Z``; working memory ``4 D block_size itemsize`` (the
        probes, their product and the operator's per-column temporaries, see
        ``curvops.algorithms._memory``). Default 32, or as many as fit ``memory_budget``.
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device); ``MemoryError`` before any product, naming the bytes needed, if one probe (or
        the given ``block_size``) does not fit.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is the sample standard deviation of ``z^T A z`` over sqrt(budget).
    """
    operand, budget, block_size, rng = _setup(
        A, budget, probe, seed, block_size, dim, 1, memory_budget, PRODUCT_COLUMNS, "hutchinson_trace"
    )
    if budget >= operand.dim:
        return _exact_trace(operand, block_size)
    samples = np.concatenate(
        [operand.column_dots(z, az) for z, az in probe_images(operand, budget, probe, rng, block_size)]
    )
    mean, error = mean_and_standard_error(samples)
    return ScalarEstimate(mean, error, operand.num_matvecs, False)


def hutchpp_trace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): low-rank sketch plus Hutchinson on the rest.

    With ``s = budget // 3``: ``Q = orth(A S)`` for an ``(D, s)`` random ``S``; the estimate is
    ``tr(Q^T A Q) + mean_j g_j^T (I - QQ^T) A (I - QQ^T) g_j`` over ``budget - 2 s`` probes
    ``g_j``. Unbiased for any ``A``; variance ``O(1/budget^2)`` for PSD ``A`` with decaying
    spectrum. With ``budget < 3`` the sketch is empty and this is Hutchinson.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    probe
        ``"rademacher"`` (default) or ``"gaussian"``, for both the sketch and the probes.
    seed
        Seed of the probes; the same seed gives the same result within a backend (pass
        ``block_size`` for results that do not depend on the memory available).
    block_size
        Probes per block product of the Hutchinson part. Working memory: ``2 s`` columns for
        the sketch (its probes, then ``Q`` in place of ``A S``), then ``s + 7 block_size``
        (``Q``, each block's probes, their deflation and its product), times ``D itemsize``;
        ``block_size`` and the sketch's product blocks are chosen to fit ``memory_budget``.
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device); ``MemoryError`` before any product, naming the bytes needed, if one probe (or
        the given ``block_size``) does not fit.
    dim
        Operator dimension; required only for callables.
    budget
        Total matvecs, ``>= 1``; ``budget >= D`` gives the exact trace with ``D`` matvecs.

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is that of the Hutchinson part given the sketch; since the estimate is
        unbiased conditionally on ``Q``, its square is an unbiased estimate of the total variance.
    """
    sketch_size = check_budget(budget, 1) // 3
    what = f"hutchpp_trace with budget {budget}"
    operand, budget, block_size, rng = _setup(
        A, budget, probe, seed, block_size, dim, 1, memory_budget, 3 + PRODUCT_COLUMNS, what, sketch_size
    )
    if budget >= operand.dim:
        return _exact_trace(operand, block_size)
    step = plan_columns(
        operand,
        resolve_budget(operand, memory_budget),
        2 * sketch_size + qr_workspace_columns(operand, max(sketch_size, 1)),
        PRODUCT_COLUMNS,
        max(sketch_size, 1),
        what,
        "pass a larger memory_budget= if the memory is there, a smaller budget, or use hutchinson_trace",
    )
    sketch = operand.probes(sketch_size, probe, rng)
    basis = blockwise_product(operand, sketch, step)  # A S, overwritten by Q below
    del sketch
    operand.qr_in_place(basis)
    low_rank_trace = 0.0
    for start in range(0, sketch_size, step):
        columns = basis[:, start : start + step]
        low_rank_trace += float(operand.column_dots(columns, operand.matmat(columns)).sum())
    num_probes = budget - 2 * sketch_size
    samples = []
    for start in range(0, num_probes, block_size):
        probes = operand.probes(min(block_size, num_probes - start), probe, rng)
        deflated = operand.project_out_block(basis, probes)
        samples.append(operand.column_dots(deflated, operand.matmat(deflated)))
    mean, error = mean_and_standard_error(np.concatenate(samples))
    return ScalarEstimate(low_rank_trace + mean, error, operand.num_matvecs, False)


def leave_one_out_projectors(triangular: np.ndarray) -> np.ndarray | list[np.ndarray]:
    """Projectors onto ``range(R_{-i})`` (``R`` with column ``i`` removed) for XTrace/XDiag.

    Returns ``S`` ``(s, s)`` with unit columns such that the projector is ``I - s_i s_i^T``
    (``s_i`` = normalized column ``i`` of ``R^{-T}``: orthogonal to every column of ``R`` but
    the ``i``-th), or, if ``R`` is numerically singular (rank of ``A`` below the sketch size),
    the explicit list of ``s x s`` projectors computed by SVD.

    Parameters
    ----------
    triangular
        ``(s, s)`` upper triangular ``R`` of the sketch's QR.

    Returns
    -------
    numpy.ndarray or list of numpy.ndarray
        ``S`` ``(s, s)``, or the ``s`` explicit projectors.
    """
    size = triangular.shape[0]
    singular_values = np.linalg.svd(triangular, compute_uv=False)
    rank_tolerance = size * np.finfo(np.float64).eps * singular_values[0]
    # Beyond cond(R) ~ 1/sqrt(eps) the explicit inverse loses the digits the formula needs.
    if singular_values[-1] > math.sqrt(np.finfo(np.float64).eps) * singular_values[0]:
        inverse_transpose = np.linalg.inv(triangular).T
        return inverse_transpose / np.linalg.norm(inverse_transpose, axis=0)
    projectors = []
    for index in range(size):
        rest = np.delete(triangular, index, axis=1)
        left, values, _ = np.linalg.svd(rest, full_matrices=False)
        span = left[:, values > rank_tolerance]
        projectors.append(span @ span.T)
    return projectors


def jackknife_standard_error(leave_one_out: np.ndarray) -> Any:
    """Jackknife standard error ``sqrt((m - 1) / m * sum_j (f_(-j) - mean_j f_(-j))^2)`` along axis -1.

    ``leave_one_out[..., j]`` is the estimator recomputed without sample ``j`` (``m`` of them).
    Exchangeable estimators (XTrace, XNysTrace, XDiag) average terms that all depend on every
    probe, so the spread of those terms is no error estimate (it misses their positive
    covariance); the jackknife of the whole estimator is. By the Efron-Stein inequality (Efron &
    Stein 1981, Ann. Statist. 9(3)) its expectation is at least the variance of the estimator
    with ``m - 1`` samples times ``(m - 1) / m``, i.e. it errs on the safe side; it overstates
    the variance by the estimator's interactions between probes (second- and higher-order
    terms of its Hoeffding decomposition), which dominate where the error falls faster than
    ``1 / sqrt(m)``. NaN for ``m < 2``.

    Parameters
    ----------
    leave_one_out
        ``(..., m)`` numpy array or torch tensor.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(...)`` standard errors.
    """
    count = leave_one_out.shape[-1]
    if count < 2:
        return leave_one_out[..., 0] * math.nan
    centered = leave_one_out - leave_one_out.sum(-1)[..., None] / count  # numpy or torch
    return ((count - 1) / count * (centered * centered).sum(-1)) ** 0.5


#: Largest ``cond(R)`` for which the leave-two-out formulas use the explicit ``R^{-T}``: their
#: 2 x 2 Gram determinants ``1 - cos^2`` of its unit columns are then at least about
#: ``1 / cond(R)^2`` and keep a relative accuracy of ``eps * cond(R)^2 <= 1e-4`` (plenty for a
#: standard error); beyond it each leave-one-out estimate is recomputed from a QR of ``R_{-j}``.
_PAIR_CONDITION_LIMIT = 1e-2 / math.sqrt(np.finfo(np.float64).eps)


def _condition(triangular: np.ndarray) -> float:
    values = np.linalg.svd(triangular, compute_uv=False)
    return math.inf if values[-1] == 0 else float(values[0] / values[-1])


def _xtrace_samples(
    projected: np.ndarray,
    adjoint: np.ndarray,
    coordinates: np.ndarray,
    triangular: np.ndarray,
    quadratic: np.ndarray,
) -> np.ndarray:
    """The ``s`` exchangeable estimates ``t_i`` from the small matrices ``H = Q^T A Q``,
    ``V = Omega^T A Q``, ``W = Q^T Omega``, ``R`` (all ``(s, s)``) and ``omega_i^T A omega_i``."""
    # With P_i = Q p_i Q^T (p_i the small projector) and a_i = p_i W_i:
    #   tr(P_i A) = tr(p_i H),
    #   omega_i^T (I - P_i) A (I - P_i) omega_i = omega_i^T y_i - a_i^T R_i - V_i a_i + a_i^T H a_i
    # because Q^T A omega_i = Q^T y_i = R_i and omega_i^T A Q = V_i (A need not be symmetric).
    projectors = leave_one_out_projectors(triangular)
    if isinstance(projectors, np.ndarray):
        unit = projectors
        low_rank = np.trace(projected) - np.einsum("ji,jk,ki->i", unit, projected, unit)
        removed = coordinates - unit * np.einsum("ji,ji->i", unit, coordinates)
    else:
        low_rank = np.array([np.sum(p * projected) for p in projectors])
        removed = np.stack([p @ coordinates[:, i] for i, p in enumerate(projectors)], axis=1)
    remainder = (
        quadratic
        - np.einsum("ji,ji->i", removed, triangular)
        - np.einsum("ij,ji->i", adjoint, removed)
        + np.einsum("ji,jk,ki->i", removed, projected, removed)
    )
    return low_rank + remainder


def _xtrace_leave_one_out(
    projected: np.ndarray,
    adjoint: np.ndarray,
    coordinates: np.ndarray,
    triangular: np.ndarray,
    quadratic: np.ndarray,
) -> np.ndarray:
    """XTrace recomputed without probe ``j``, for each ``j``: ``(s,)`` (for the jackknife).

    Without probe ``j``, probe ``i`` is paired with the projector onto the range of ``Y``
    without columns ``i`` and ``j``: ``P_ij = Q (I - Pi_ij) Q^T`` with ``Pi_ij`` the projector
    onto ``span(g_i, g_j)``, ``g`` the columns of ``R^{-T}``. Every term of ``t_i`` then is a
    2 x 2 expression in entries of ``G^T G``, ``G^T H G``, ... (``O(s^3)`` in all).
    """
    size = triangular.shape[1]
    if size < 2:
        return np.full(size, math.nan)
    if size == 2 or _condition(triangular) > _PAIR_CONDITION_LIMIT:
        return _xtrace_leave_one_out_by_qr(projected, adjoint, coordinates, triangular, quadratic)
    inverse_transpose = np.linalg.inv(triangular).T
    g = inverse_transpose / np.linalg.norm(inverse_transpose, axis=0)  # unit columns: scale-free
    gram = g.T @ g
    pair_h = g.T @ projected @ g
    pair_w = g.T @ coordinates  # [k, i] = g_k^T W_i
    pair_r = g.T @ triangular  # diagonal (g_k^T R_i = 0 for k != i), kept for rounding
    adjoint_g = adjoint @ g  # [i, k] = V_i g_k
    left_h = coordinates.T @ projected @ g  # [i, k] = W_i^T H g_k
    right_h = g.T @ projected @ coordinates  # [k, i] = g_k^T H W_i
    base = (
        np.trace(projected)
        + quadratic
        - np.einsum("ji,ji->i", coordinates, triangular)
        - np.einsum("ij,ji->i", adjoint, coordinates)
        + np.einsum("ji,jk,ki->i", coordinates, projected, coordinates)
    )
    # Entries [i, j] for J = (i, j): C = (G_J^T G_J)^{-1}, u = G_J^T W_i, then
    # t_ij = base_i - tr(C N_JJ) + v . (C u) + (C u)^T N_JJ (C u) with
    # v = G_J^T R_i + G_J^T V_i^T - G_J^T H^T W_i - G_J^T H W_i.
    diag = np.diag
    first, second = diag(gram)[:, None], diag(gram)[None, :]
    determinant = first * second - gram**2
    np.fill_diagonal(determinant, 1.0)  # i = j is not a pair; masked below
    c00, c01, c11 = second / determinant, -gram / determinant, first / determinant
    n00, n01, n10, n11 = diag(pair_h)[:, None], pair_h, pair_h.T, diag(pair_h)[None, :]
    u0, u1 = diag(pair_w)[:, None], pair_w.T
    cu0, cu1 = c00 * u0 + c01 * u1, c01 * u0 + c11 * u1
    v0 = (diag(pair_r) + diag(adjoint_g) - diag(left_h) - diag(right_h))[:, None]
    v1 = pair_r.T + adjoint_g - left_h - right_h.T
    pairs = (
        base[:, None]
        - (c00 * n00 + c01 * (n01 + n10) + c11 * n11)
        + v0 * cu0
        + v1 * cu1
        + cu0 * cu0 * n00
        + cu0 * cu1 * (n01 + n10)
        + cu1 * cu1 * n11
    )
    np.fill_diagonal(pairs, 0.0)
    return pairs.sum(0) / (size - 1)


def _xtrace_leave_one_out_by_qr(
    projected: np.ndarray,
    adjoint: np.ndarray,
    coordinates: np.ndarray,
    triangular: np.ndarray,
    quadratic: np.ndarray,
) -> np.ndarray:
    """As ``_xtrace_leave_one_out``, each ``j`` from a QR ``R_{-j} = U T`` (``O(s^4)``):
    in the basis ``Q U`` of ``range(Y_{-j})`` the data are ``U^T H U``, ``V_{-j} U``,
    ``U^T W_{-j}`` and ``T``."""
    size = triangular.shape[1]
    values = np.empty(size)
    for index in range(size):
        keep = np.delete(np.arange(size), index)
        rotation, reduced = np.linalg.qr(triangular[:, keep])
        samples = _xtrace_samples(
            rotation.T @ projected @ rotation,
            adjoint[keep] @ rotation,
            rotation.T @ coordinates[:, keep],
            reduced,
            quadratic[keep],
        )
        values[index] = samples.mean()
    return values


def blockwise_product(operand: Operand, block: Array, step: int, transpose: bool = False) -> Array:
    """``A @ block`` (``A^T @ block`` with ``transpose``) formed ``step`` columns at a time into
    one ``(D, b)`` result (a product of ``b`` columns at once may need ``b`` times an operator's
    per-column working memory).

    Parameters
    ----------
    operand
        The operator in the vector layer.
    block
        ``(D, b)`` block.
    step
        Columns per product.
    transpose
        Multiply by ``A^T`` (default False).

    Returns
    -------
    Array
        ``(D, b)`` product.
    """
    multiply = operand.rmatmat if transpose else operand.matmat
    width = block.shape[1]
    if step >= width:
        return multiply(block)
    result = operand.empty((operand.local_dim, width))
    for start in range(0, width, step):
        result[:, start : start + step] = multiply(block[:, start : start + step])
    return result


def xtrace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """XTrace (Epperly, Tropp, Webber 2024): exchangeable Hutch++ that reuses every sample.

    With ``s = budget // 2`` probes ``Omega`` and ``Y = A Omega``: for each ``i`` the range of
    ``Y`` without column ``i`` serves as low-rank sketch and ``omega_i`` as the Hutchinson probe
    of the remainder, ``t_i = tr(P_i A) + omega_i^T (I - P_i) A (I - P_i) omega_i``; the estimate
    is ``mean_i t_i``. Each ``t_i`` is unbiased because ``P_i`` does not depend on ``omega_i``.
    All ``t_i`` come from ``Y``, ``Q = orth(Y)`` and ``A Q`` at the cost of ``2 s`` matvecs.
    ``A`` need not be symmetric: the products ``Omega^T (A Q)`` supply ``omega_i^T A P_i``.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    seed
        Seed of the probes; the same seed gives the same result within a backend.
    dim
        Operator dimension; required only for callables.
    budget
        Total matvecs, ``>= 2`` (an odd budget leaves one matvec unused); ``budget >= D`` gives
        the exact trace with ``D`` matvecs.
    probe
        ``"gaussian"`` (default, as in the paper) or ``"rademacher"``.
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device). Its working memory is ``(2 s + 4 c) D itemsize`` and the QR's pieces: the
        probes and ``Y`` (overwritten by ``Q``), and products with ``A`` of ``c <= s`` columns
        at a time, ``c`` chosen to fit (see ``curvops.algorithms._memory``).

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is the jackknife standard error (the estimate recomputed without
        each probe ``j``; see ``jackknife_standard_error``), so ``estimate +- 2
        standard_error`` covers the trace at least about 95% of the time. It errs on the safe
        side: the interval is wider than needed (covering nearly always) where the error falls
        fast with the number of probes, as on decaying spectra. The paper's ``std(t_i) /
        sqrt(s)`` is too small: it misses the positive covariance of the ``t_i``, which share
        their probes. NaN for ``s = 1``.

    Raises
    ------
    MemoryError
        Before any product, if even ``c = 1`` does not fit ``memory_budget`` (the message gives
        the bytes needed).
    """
    operand, budget, block_size, rng = _setup(
        A, budget, probe, seed, None, dim, 1, memory_budget, PRODUCT_COLUMNS, "xtrace"
    )
    if budget >= operand.dim:
        return _exact_trace(operand, block_size)
    if budget < 2:
        raise ValueError(f"xtrace needs budget >= 2 (two matvecs per probe), got {budget}")
    num_probes = budget // 2
    step = plan_columns(
        operand,
        resolve_budget(operand, memory_budget),
        2 * num_probes + qr_workspace_columns(operand, num_probes),
        PRODUCT_COLUMNS,
        num_probes,
        f"xtrace with budget {budget}",
        "pass a larger memory_budget= if the memory is there, a smaller budget, or use "
        "hutchinson_trace (memory D x block_size)",
    )
    probes = operand.probes(num_probes, probe, rng)
    basis = blockwise_product(operand, probes, step)  # Y = A Omega, overwritten by Q below
    quadratic = operand.column_dots(probes, basis)  # omega_i^T A omega_i
    triangular = operand.qr_in_place(basis)
    projected = np.empty((num_probes, num_probes))  # H = Q^T A Q
    adjoint = np.empty((num_probes, num_probes))  # V = Omega^T A Q
    for start in range(0, num_probes, step):
        columns = slice(start, start + step)
        basis_images = operand.matmat(basis[:, columns])
        # As (c, s) products transposed: a CPU BLAS is several times slower at (s, D) @ (D, c)
        # with c < s than at (c, D) @ (D, s) for the same numbers.
        projected[:, columns] = operand.inner(basis_images, basis).T
        adjoint[:, columns] = operand.inner(basis_images, probes).T
        del basis_images
    coordinates = operand.inner(basis, probes)  # W = Q^T Omega
    small = (projected, adjoint, coordinates, triangular, quadratic)
    estimate = float(_xtrace_samples(*small).mean())
    error = float(jackknife_standard_error(_xtrace_leave_one_out(*small)))
    return ScalarEstimate(estimate, error, operand.num_matvecs, False)


def xnystrace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    assume_psd: bool = False,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """XNysTrace (Epperly, Tropp, Webber 2024): XTrace with Nyström sketches, for PSD operators.

    With ``m = budget`` probes ``Omega`` and ``Y = A Omega`` (one matvec per probe, half of
    XTrace's), each ``t_i = tr(A_i) + omega_i^T (A - A_i) omega_i`` uses the Nyström
    approximation ``A_i = Y_i (Omega_i^T Y_i)^+ Y_i^T`` built from the other ``m - 1`` probes, so
    ``t_i`` is unbiased; the estimate is ``mean_i t_i``. The Nyström approximation needs ``A``
    positive semi-definite: operators not known to be so are refused.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    seed
        Seed of the probes; the same seed gives the same result within a backend.
    dim
        Operator dimension; required only for callables.
    budget
        Total matvecs ``m >= 2``; ``budget >= D`` gives the exact trace with ``D`` matvecs.
    probe
        ``"gaussian"`` (default, as in the paper) or ``"rademacher"``.
    assume_psd
        Assert that ``A`` is positive semi-definite (unchecked; default False). Otherwise ``A``
        must carry the tag ``is_positive_semidefinite`` (GGN, Fisher, KFAC, EKFAC,
        ``curvops.operators.inverse.assume_psd(A)``).
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device). Its working memory is ``(2 m + 4 c) D itemsize`` and the QR's pieces: the
        probes and ``Y``, and products with ``A`` of ``c <= m`` columns at a time, ``c`` chosen
        to fit.

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is the jackknife standard error (see [`xtrace`][curvops.xtrace]; the paper's
        ``std(t_i) / sqrt(m)`` is too small). Exact to rounding, with ``standard_error ~ 0``,
        when ``rank(A) < m - 1``.

    Raises
    ------
    ValueError
        If ``A`` is not known to be positive semi-definite, or the probes' Gram matrix
        ``Omega^T A Omega`` shows that it is not.
    MemoryError
        Before any product, naming the bytes needed, if the probes do not fit
        ``memory_budget``.
    """
    if not (assume_psd or bool(getattr(A, "is_positive_semidefinite", False))):
        raise ValueError(
            f"xnystrace needs a positive semi-definite operator and {type(A).__name__} is not known "
            "to be one (the Hessian is indefinite in general: use xtrace or hutchpp_trace). If A "
            "is positive semi-definite, pass assume_psd=True."
        )
    operand, budget, block_size, rng = _setup(
        A, budget, probe, seed, None, dim, 1, memory_budget, PRODUCT_COLUMNS, "xnystrace"
    )
    if budget >= operand.dim:
        return _exact_trace(operand, block_size)
    if budget < 2:
        raise ValueError(f"xnystrace needs budget >= 2 (a Nyström sketch of the other probes), got {budget}")
    step = plan_columns(
        operand,
        resolve_budget(operand, memory_budget),
        2 * budget + qr_workspace_columns(operand, budget),
        PRODUCT_COLUMNS,
        budget,
        f"xnystrace with budget {budget}",
        "pass a larger memory_budget= if the memory is there, a smaller budget, or use "
        "hutchinson_trace (memory D x block_size)",
    )
    probes = operand.probes(budget, probe, rng)
    images = blockwise_product(operand, probes, step)
    # A small shift nu keeps the Cholesky factor of Omega^T (A + nu I) Omega well defined when
    # A has (numerically) low rank; it is removed from the estimate exactly (- nu D).
    frobenius = math.sqrt(float(np.sum(operand.column_norms(images) ** 2)))
    shift = math.sqrt(operand.dim) * operand.eps * frobenius
    operand.subtract_scaled_columns_(images, probes, np.full(budget, -shift))  # in place
    gram = operand.inner(probes, images)
    triangular = operand.qr_in_place(images)  # images now hold Q
    cross = operand.inner(images, probes)
    samples, leave_one_out = _xnystrace_samples((gram + gram.T) / 2, triangular, cross)
    estimate = float(samples.mean()) - shift * operand.dim
    error = float(jackknife_standard_error(leave_one_out))
    return ScalarEstimate(estimate, error, operand.num_matvecs, False)


def _xnystrace_samples(
    gram: np.ndarray, triangular: np.ndarray, coordinates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` estimates ``t_i`` of the shifted operator from ``H = Omega^T Y``, ``Y = Q R``
    and ``W = Q^T Omega`` (all ``(m, m)``), and the ``m`` estimates without probe ``j``."""
    # Nystrom: A_hat = Y H^-1 Y^T = B B^T with B = Y C^-1 = Q (R C^-1), H = C^T C. Leaving
    # probe i out removes the rank-one term s_i s_i^T, s_i = Y H^-1 e_i / sqrt((H^-1)_ii)
    # (block inverse of H). A_hat interpolates A on Omega, so omega_i^T (A - A_hat) omega_i = 0
    # and t_i = tr(A_hat) - |s_i|^2 + (omega_i^T s_i)^2.
    try:
        lower = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        raise ValueError(
            "xnystrace: Omega^T A Omega is not positive definite, so A is not positive "
            "semi-definite (or not symmetric); use xtrace or hutchpp_trace"
        ) from None
    inverse_factor = scipy.linalg.solve_triangular(lower, np.eye(lower.shape[0]), lower=True)  # C^-T
    small = triangular @ inverse_factor.T  # R C^-1, so B = Q small
    leave_out = small @ inverse_factor  # R C^-1 C^-T = Q^T Y H^-1
    inverse_diagonal = np.sum(inverse_factor**2, axis=0)  # diag(H^-1)
    interpolation = np.einsum("ji,ji->i", leave_out, coordinates) / np.sqrt(inverse_diagonal)
    low_rank = float(np.sum(small**2))
    samples = low_rank - np.sum(leave_out**2, axis=0) / inverse_diagonal + interpolation**2
    return samples, _xnystrace_leave_one_out(low_rank, inverse_factor, leave_out, interpolation)


def _xnystrace_leave_one_out(
    low_rank: float, inverse_factor: np.ndarray, leave_out: np.ndarray, interpolation: np.ndarray
) -> np.ndarray:
    """XNysTrace recomputed without probe ``j``, for each ``j`` (for the jackknife).

    Without probes ``J = {i, j}`` the Nystrom approximation loses ``Z_J K_JJ^-1 Z_J^T`` with
    ``K = H^-1``, ``Z = Y K`` (block inverse), and ``Z_J^T omega_i = e_1`` (``K H = I``), so
    ``t_ij = tr(A_hat) - tr(K_JJ^-1 Z_J^T Z_J) + (K_JJ^-1)_11``: 2 x 2 expressions in entries
    of ``K`` and ``Z^T Z`` (``Q^T Z`` = ``leave_out`` here).
    """
    size = leave_out.shape[1]
    if size < 2:
        return np.full(size, math.nan)
    inverse = inverse_factor.T @ inverse_factor  # K = H^-1
    scale = np.sqrt(np.diag(inverse))
    correlation = inverse / np.outer(scale, scale)  # unit diagonal: scale-free determinants
    gram = leave_out.T @ leave_out / np.outer(scale, scale)  # Z^T Z, rows and columns / scale
    # With interpolation_i = omega_i^T s_i = (K H)_ii / sqrt(K_ii) = 1 / sqrt(K_ii) up to rounding.
    inverse_scale = interpolation
    squared_sine = 1.0 - correlation**2
    np.fill_diagonal(squared_sine, 1.0)  # i = j is not a pair; masked below
    first, second = np.diag(gram)[:, None], np.diag(gram)[None, :]
    pairs = (
        low_rank
        - (first - 2.0 * correlation * gram + second) / squared_sine
        + (inverse_scale**2)[:, None] / squared_sine
    )
    np.fill_diagonal(pairs, 0.0)
    return pairs.sum(0) / (size - 1)
