"""Randomized diagonal estimation (Hutchinson, XDiag) and squared Frobenius norm estimation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curvops.algorithms._checks import ProbeKind
from curvops.algorithms._memory import PRODUCT_COLUMNS, plan_columns, qr_workspace_columns, resolve_budget
from curvops.algorithms.trace import (
    _PAIR_CONDITION_LIMIT,
    ScalarEstimate,
    _condition,
    _setup,
    blockwise_product,
    identity_images,
    jackknife_standard_error,
    leave_one_out_projectors,
    mean_and_standard_error,
    probe_images,
)
from curvops.algorithms.vectors import Array


@dataclass(frozen=True)
class DiagonalEstimate:
    """Randomized estimate of ``diag(A)``.

    Array fields are torch tensors on the operator's device/dtype on the torch path, numpy
    arrays otherwise.

    Attributes
    ----------
    estimate : (D,) array
        Estimated diagonal.
    standard_error : (D,) array
        Per-entry estimated standard deviation of ``estimate`` (0 if exact, NaN if it cannot be
        estimated from a single sample).
    num_matvecs : int
        Operator-vector products used.
    exact : bool
        True if the budget reached ``D`` and the diagonal was read off ``A e_i`` exactly.
    """

    estimate: Array
    standard_error: Array
    num_matvecs: int
    exact: bool


def _exact_diagonal(operand: Any, block_size: int) -> DiagonalEstimate:
    diagonal = operand.zeros((operand.local_dim,))
    for start, stop, image in identity_images(operand, block_size):
        rows, values = operand.diagonal_of_columns(image, start, stop)
        diagonal[rows] = values
    return DiagonalEstimate(diagonal, operand.zeros((operand.local_dim,)), operand.num_matvecs, True)


def hutchinson_diagonal(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> DiagonalEstimate:
    """Hutchinson-type diagonal estimator ``diag(A) ~ mean_i z_i * (A z_i)`` (Bekas et al. 2007).

    Unbiased for Rademacher and Gaussian probes (``E[z_r z_c] = delta_rc``); Rademacher has
    lower variance (exact for diagonal ``A``).

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    budget
        Number of matvecs, ``>= 1``; ``budget >= D`` reads the diagonal exactly (``D`` matvecs).
    probe
        ``"rademacher"`` or ``"gaussian"``.
    seed
        Seed of the probes; same seed and block size give the same result within a backend
        (pass ``block_size`` for results that do not depend on the memory available).
    block_size
        Probes per block product; working memory ``(4 + 7 block_size) D itemsize`` (the
        running sums and results; per probe its product, the operator's temporaries and three
        elementwise products). Default 32, or as many as fit ``memory_budget``.
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device); ``MemoryError`` before any product, naming the bytes needed, if one probe (or
        the given ``block_size``) does not fit.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    DiagonalEstimate
        The estimate ``(D,)``, its standard error per entry, the matvecs used and whether it is
        exact.
    """
    operand, budget, block_size, rng = _setup(
        A,
        budget,
        probe,
        seed,
        block_size,
        dim,
        1,
        memory_budget,
        PRODUCT_COLUMNS + 3,
        "hutchinson_diagonal",
        4,
    )
    if budget >= operand.dim:
        return _exact_diagonal(operand, block_size)
    # Running sums keep memory at O(D * block_size) instead of O(D * budget). They are sums of
    # deviations from the first block's mean: sum(x^2) - n mean^2 of the raw samples cancels
    # catastrophically when the spread is small next to the diagonal (a nearly diagonal A).
    total = operand.zeros((operand.local_dim,))
    total_squares = operand.zeros((operand.local_dim,))
    shift = None
    for z, az in probe_images(operand, budget, probe, rng, block_size):
        products = z * az
        if shift is None:
            shift = products.mean(1)
        deviations = products - shift[:, None]
        total = total + deviations.sum(1)
        total_squares = total_squares + (deviations * deviations).sum(1)
    mean = shift + total / budget
    if budget < 2:
        error = mean * math.nan
    else:
        variance = (total_squares - total * total / budget) / (budget - 1)
        error = (variance.clip(0.0) / budget) ** 0.5
    return DiagonalEstimate(mean, error, operand.num_matvecs, False)


def xdiag(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    symmetric: bool = False,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> DiagonalEstimate:
    """XDiag (Epperly, Tropp, Webber 2024): exchangeable low-rank-plus-Hutchinson diagonal estimator.

    With ``s = budget // 2`` probes, ``Y = A Omega`` and ``Q = orth(Y)``: for each ``i``,
    ``d_i = diag(P_i A) + omega_i * ((I - P_i) A omega_i)`` where ``P_i`` projects onto the range
    of ``Y`` without column ``i``; the estimate is ``mean_i d_i``. Each ``d_i`` is unbiased since
    ``P_i`` does not depend on ``omega_i``, for any square ``A``. ``diag(P_i A)`` needs
    ``Q^T A = (A^T Q)^T``: products with ``A^T``, or with ``A`` itself when ``A`` is symmetric.
    Cost ``2 s`` matvecs, memory ``O(D s)``.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    budget
        Total matvecs, ``>= 2`` (odd budgets leave one unused); ``budget >= D`` is exact.
    probe
        ``"gaussian"`` (default) or ``"rademacher"``.
    seed
        Seed of the probes; the same seed gives the same result within a backend.
    symmetric
        Assert that ``A`` is symmetric (unchecked; default False): ``A Q`` then stands for
        ``A^T Q``. Otherwise the ``s`` products ``A^T Q`` are taken from the operator: the
        transpose of a numpy/scipy/torch matrix, ``rmatmat`` of a scipy ``LinearOperator``, or
        ``A`` itself for operators tagged ``is_symmetric`` (curvops curvature operators).
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device). Working memory ``(3 s + 4 c) D itemsize`` plus pieces of rows: the probes,
        ``Q`` (in place of ``Y``) and ``A^T Q``, and products of ``c <= s`` columns at a time,
        ``c`` chosen to fit (an ill-conditioned sketch, ``cond(R) > 6.7e5``, needs ``2 s`` more
        columns and ``O(D s^3)`` work for its jackknife).
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    DiagonalEstimate
        ``standard_error`` is the per-entry jackknife standard error (the estimate recomputed
        without each probe; see ``curvops.algorithms.trace.jackknife_standard_error``).

    Raises
    ------
    ValueError
        If ``A`` is neither known to be symmetric nor offers products with ``A^T`` (a callable,
        a torch-native operator without the tag): pass ``symmetric=True`` if it is symmetric.
    MemoryError
        Before any product, if even ``c = 1`` does not fit ``memory_budget`` (the message gives
        the bytes needed).
    """
    operand, budget, block_size, rng = _setup(
        A, budget, probe, seed, None, dim, 1, memory_budget, PRODUCT_COLUMNS, "xdiag"
    )
    if budget >= operand.dim:
        return _exact_diagonal(operand, block_size)
    if budget < 2:
        raise ValueError(f"xdiag needs budget >= 2 (two matvecs per probe), got {budget}")
    symmetric = bool(symmetric) or operand.symmetric
    if not symmetric and operand.transpose_product is None:
        raise ValueError(
            f"xdiag needs products with A^T, and {type(A).__name__} is neither known to be "
            "symmetric nor offers them (the symmetric formula is biased for a non-symmetric A): "
            "pass symmetric=True if A is symmetric, or a matrix / LinearOperator with rmatmat"
        )
    num_probes = budget // 2
    step = plan_columns(
        operand,
        resolve_budget(operand, memory_budget),
        3 * num_probes + qr_workspace_columns(operand, num_probes) + _piece_columns(operand, num_probes),
        PRODUCT_COLUMNS,
        num_probes,
        f"xdiag with budget {budget}",
        "pass a larger memory_budget= if the memory is there, a smaller budget, or use "
        "hutchinson_diagonal (memory D x block_size)",
    )
    probes = operand.probes(num_probes, probe, rng)
    basis = blockwise_product(operand, probes, step)  # Y = A Omega, overwritten by Q below
    triangular = operand.qr_in_place(basis)
    if symmetric:
        transposed = blockwise_product(operand, basis, step)  # A^T Q = A Q
    else:
        try:
            transposed = blockwise_product(operand, basis, step, transpose=True)
        except NotImplementedError as failure:
            raise ValueError(
                f"xdiag needs products with A^T and the operator's rmatmat failed ({failure}): pass "
                "symmetric=True if A is symmetric"
            ) from None
    mean, error = _xdiag_from_sketch(operand, basis, transposed, probes, triangular)
    return DiagonalEstimate(mean, error, operand.num_matvecs, False)


def _xdiag_from_sketch(
    operand: Any, basis: Array, transposed: Array, probes: Array, triangular: np.ndarray
) -> tuple[Array, Array]:
    """XDiag's estimate and per-entry jackknife error from ``Q``, ``Z = A^T Q``, ``Omega``, ``R``.

    With unit columns ``s_i`` of ``R^{-T}`` (``I - s_i s_i^T`` projects onto ``range(R_{-i})``),
    ``(I - P_i) y_i = Q s_i (s_i^T R_i)`` since ``Y = Q R``, and ``diag(P_i A) = rowsum(Q * Z) -
    (Q s_i) * (Z s_i)``. Without probe ``j``, probe ``i`` uses the projector removing
    ``span(s_i, s_j)``: 2 x 2 inverses ``C_ij`` of ``S^T S``, whose sums over ``i`` are products
    of ``(D, s)`` blocks with ``(s, s)`` matrices. Every entry depends only on its own rows of
    ``Q``, ``Z``, ``Omega``: computed in pieces of rows.
    """
    size = triangular.shape[0]
    if size < 2 or _condition(triangular) > _PAIR_CONDITION_LIMIT:
        return _xdiag_by_qr(operand, basis, transposed, probes, triangular)
    inverse_transpose = np.linalg.inv(triangular).T
    unit = inverse_transpose / np.linalg.norm(inverse_transpose, axis=0)
    cosines = unit.T @ unit
    squared_sine = 1.0 - cosines**2
    np.fill_diagonal(squared_sine, 1.0)
    c00 = 1.0 / squared_sine  # C_ij = [[1, -cos], [-cos, 1]] / (1 - cos^2) for unit s_i, s_j
    c01 = -cosines / squared_sine
    np.fill_diagonal(c00, 0.0)  # i = j is not a pair
    np.fill_diagonal(c01, 0.0)
    c11_sums = c00.sum(0)
    scales = np.einsum("ji,ji->i", unit, triangular)  # s_i^T R_i
    # Each piece is worked in float64 whatever the working dtype: the coefficients C_ij grow
    # like 1 / (1 - cos^2), up to cond(R)^2, and would amplify float32 rounding.
    unit_b, c00_b, c01_b, scales_b, c11_b = (
        _float64_like(basis, x) for x in (unit, c00, c01, scales, c11_sums)
    )
    mean = operand.zeros((operand.local_dim,))
    error = operand.zeros((operand.local_dim,))
    step = _row_step(size)
    for start in range(0, operand.local_dim, step):
        rows = slice(start, start + step)
        q, z, omega = (_float64_like(basis, x[rows]) for x in (basis, transposed, probes))
        qs, zs = q @ unit_b, z @ unit_b
        weighted = omega * scales_b - zs  # omega_i (s_i^T R_i) - Z s_i
        mean[rows] = (q * z).sum(1) + (qs * weighted).sum(1) / size
        # E[r, j] = sum_{i != j} (d_ij[r] - rowsum(Q * Z)[r]): the leave-j-out sum of corrections.
        pairs = (qs * weighted) @ c00_b - (qs @ c01_b) * zs + qs * (weighted @ c01_b) - qs * zs * c11_b
        error[rows] = jackknife_standard_error(pairs / (size - 1))
    return mean, error


def _float64_like(reference: Array, array: Any) -> Array:
    """``array`` (host numpy or a backend piece) in float64, on ``reference``'s backend and device."""
    if isinstance(reference, torch.Tensor):
        return torch.as_tensor(array).to(device=reference.device, dtype=torch.float64)
    return np.asarray(array, dtype=np.float64)


def _row_step(size: int) -> int:
    """Rows per piece of XDiag's per-entry work: about 2**20 entries in each ``(rows, s)`` temporary."""
    return max(1, (1 << 20) // max(size, 1))


def _piece_columns(operand: Any, size: int) -> float:
    """Columns of memory of the ten float64 ``(rows, s)`` temporaries of one piece of XDiag's
    per-entry work (see ``_row_step``) and its two ``(D,)`` results."""
    return 10 * min(size, (1 << 20) / operand.local_dim) * 8 / operand.itemsize + 2


def _xdiag_by_qr(
    operand: Any, basis: Array, transposed: Array, probes: Array, triangular: np.ndarray
) -> tuple[Array, Array]:
    """XDiag for an ill-conditioned or singular ``R``: the leave-one-out projectors by SVD and each
    jackknife value from a QR ``R_{-j} = U T`` (the sketch of the other probes in the basis
    ``Q U``). ``O(D s^3)`` work (``O(D s^4)`` when ``R`` is numerically singular)."""
    size = triangular.shape[0]
    mean = _xdiag_samples_mean(operand, basis, transposed, probes, triangular)
    if size < 2:
        return mean, mean * math.nan
    leave_one_out = []
    for index in range(size):
        keep = np.delete(np.arange(size), index)
        rotation, reduced = np.linalg.qr(triangular[:, keep])
        rotation_b = operand.from_host(rotation)
        leave_one_out.append(
            _xdiag_samples_mean(
                operand,
                operand.matmul(basis, rotation_b),
                operand.matmul(transposed, rotation_b),
                probes[:, keep.tolist()],
                reduced,
            )
        )
    stacked = operand.zeros((operand.local_dim, size))
    for index, values in enumerate(leave_one_out):
        stacked[:, index] = values
    return mean, jackknife_standard_error(stacked)


def _xdiag_samples_mean(
    operand: Any, basis: Array, transposed: Array, probes: Array, triangular: np.ndarray
) -> Array:
    """``mean_i d_i`` with the leave-one-out projectors of ``leave_one_out_projectors``."""
    size = triangular.shape[0]
    projectors = leave_one_out_projectors(triangular)
    total = (basis * transposed).sum(1) * size
    for index in range(size):
        if isinstance(projectors, np.ndarray):
            direction = operand.from_host(projectors[:, index : index + 1])
            qs = operand.matmul(basis, direction)[:, 0]
            scale = float(projectors[:, index] @ triangular[:, index])
            total = total - qs * operand.matmul(transposed, direction)[:, 0] + probes[:, index] * qs * scale
        else:
            complement = np.eye(size) - projectors[index]
            small = operand.from_host(complement)
            total = total - (operand.matmul(basis, small) * transposed).sum(1)
            remainder = operand.matmul(basis, operand.from_host(complement @ triangular[:, index]))
            total = total + probes[:, index] * remainder
    return total / size


def hutchinson_squared_frobenius(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """Estimate ``||A||_F^2 = tr(A^T A) ~ mean_i ||A z_i||^2``.

    Parameters
    ----------
    A
        Square ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    probe
        ``"rademacher"`` (default) or ``"gaussian"``.
    seed
        Seed of the probes; the same seed gives the same result within a backend (probes are drawn per block:
        pass ``block_size`` for results that do not depend on the memory available).
    block_size
        Probes per block product; working memory ``4 D block_size itemsize``. Default 32, or
        as many as fit ``memory_budget``.
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device); ``MemoryError`` before any product, naming the bytes needed, if one probe (or
        the given ``block_size``) does not fit.
    dim
        Operator dimension; required only for callables.
    budget
        Number of matvecs, ``>= 1``; ``budget >= D`` gives the exact value (``D`` matvecs).

    Returns
    -------
    ScalarEstimate
        Units: squared operator entries.
    """
    operand, budget, block_size, rng = _setup(
        A,
        budget,
        probe,
        seed,
        block_size,
        dim,
        1,
        memory_budget,
        PRODUCT_COLUMNS,
        "hutchinson_squared_frobenius",
    )
    if budget >= operand.dim:
        total = 0.0
        for _, _, image in identity_images(operand, block_size):
            total += float(np.sum(operand.column_norms(image) ** 2))
        return ScalarEstimate(total, 0.0, operand.num_matvecs, True)
    samples = np.concatenate(
        [operand.column_norms(az) ** 2 for _, az in probe_images(operand, budget, probe, rng, block_size)]
    )
    mean, error = mean_and_standard_error(samples)
    return ScalarEstimate(mean, error, operand.num_matvecs, False)
