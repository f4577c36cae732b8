"""Randomized diagonal estimation (Hutchinson, XDiag) and squared Frobenius norm estimation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvops.algorithms._operand import Array, ProbeKind
from curvops.algorithms.trace import (
    DEFAULT_BLOCK_SIZE,
    ScalarEstimate,
    _setup,
    identity_images,
    leave_one_out_projectors,
    mean_and_standard_error,
    probe_images,
)


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


def _column_mean_and_error(samples: Array, count: int) -> tuple[Array, Array]:
    """Row-wise mean and standard error of a ``(D, count)`` block of samples (NaN error if 1)."""
    mean = samples.mean(1)
    if count < 2:
        return mean, mean * math.nan
    centered = samples - mean[:, None]
    variance = (centered * centered).sum(1) / (count - 1)
    return mean, (variance / count) ** 0.5


def hutchinson_diagonal(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
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
        Seed of the probes; same seed and block size give the same result within a backend.
    block_size
        Probes per block product (memory ``3 * D * block_size``). Default 32.
    dim
        Operator dimension; required only for callables.
    """
    operand, budget, block_size, rng = _setup(A, budget, probe, seed, block_size, dim, 1)
    if budget >= operand.dim:
        return _exact_diagonal(operand, block_size)
    # Running sums keep memory at O(D * block_size) instead of O(D * budget).
    total = operand.zeros((operand.local_dim,))
    total_squares = operand.zeros((operand.local_dim,))
    for z, az in probe_images(operand, budget, probe, rng, block_size):
        products = z * az
        total = total + products.sum(1)
        total_squares = total_squares + (products * products).sum(1)
    mean = total / budget
    if budget < 2:
        error = mean * math.nan
    else:
        variance = (total_squares - budget * mean * mean) / (budget - 1)
        error = (variance.clip(0.0) / budget) ** 0.5
    return DiagonalEstimate(mean, error, operand.num_matvecs, False)


def xdiag(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    dim: int | None = None,
) -> DiagonalEstimate:
    """XDiag (Epperly, Tropp, Webber 2024): exchangeable low-rank-plus-Hutchinson diagonal estimator.

    With ``s = budget // 2`` probes, ``Y = A Omega`` and ``Q = orth(Y)``: for each ``i``,
    ``d_i = diag(P_i A) + omega_i * ((I - P_i) A omega_i)`` where ``P_i`` projects onto the range
    of ``Y`` without column ``i``; the estimate is ``mean_i d_i``. Each ``d_i`` is unbiased since
    ``P_i`` does not depend on ``omega_i``. Cost ``2 s`` matvecs, memory ``O(D s)``.

    Parameters
    ----------
    A, seed, dim
        As in :func:`hutchinson_diagonal`.
    budget
        Total matvecs, ``>= 2`` (odd budgets leave one unused); ``budget >= D`` is exact.
    probe
        ``"gaussian"`` (default) or ``"rademacher"``.

    Returns
    -------
    DiagonalEstimate
        ``standard_error = std_i(d_i) / sqrt(s)`` per entry (exchangeable, not independent).
    """
    operand, budget, _, rng = _setup(A, budget, probe, seed, None, dim, 1)
    if budget >= operand.dim:
        return _exact_diagonal(operand, DEFAULT_BLOCK_SIZE)
    if budget < 2:
        raise ValueError(f"xdiag needs budget >= 2 (two matvecs per probe), got {budget}")
    num_probes = budget // 2
    probes = operand.probes(num_probes, probe, rng)
    images = operand.matmat(probes)
    basis, triangular = operand.qr(images)
    basis_images = operand.matmat(basis)  # Z = A Q, so Q^T A = Z^T
    projectors = leave_one_out_projectors(triangular)
    if isinstance(projectors, np.ndarray):
        unit = operand.from_host(projectors)
        small_r = projectors.T @ triangular  # row i: s_i^T R
        # (I - P_i) y_i = y_i - Q (R_i - s_i s_i^T R_i)
        kept = operand.from_host(triangular - projectors * np.diag(small_r)[None, :])
        samples = (
            (basis * basis_images).sum(1)[:, None]
            - operand.matmul(basis, unit) * operand.matmul(basis_images, unit)
            + probes * (images - operand.matmul(basis, kept))
        )
    else:
        columns = []
        for index, projector in enumerate(projectors):
            small = operand.from_host(projector)
            low_rank = (operand.matmul(basis, small) * basis_images).sum(1)
            remainder = images[:, index] - operand.matmul(basis, operand.from_host(projector @ triangular[:, index]))
            columns.append(low_rank + probes[:, index] * remainder)
        samples = operand.zeros((operand.local_dim, num_probes))
        for index, column in enumerate(columns):
            samples[:, index] = column
    mean, error = _column_mean_and_error(samples, num_probes)
    return DiagonalEstimate(mean, error, operand.num_matvecs, False)


def hutchinson_squared_frobenius(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """Estimate ``||A||_F^2 = tr(A^T A) ~ mean_i ||A z_i||^2``.

    Parameters
    ----------
    A, probe, seed, block_size, dim
        As in :func:`hutchinson_diagonal`.
    budget
        Number of matvecs, ``>= 1``; ``budget >= D`` gives the exact value (``D`` matvecs).

    Returns
    -------
    ScalarEstimate
        Units: squared operator entries.
    """
    operand, budget, block_size, rng = _setup(A, budget, probe, seed, block_size, dim, 1)
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
