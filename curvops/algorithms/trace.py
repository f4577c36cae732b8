"""Randomized trace estimation: Hutchinson, Hutch++, XTrace and XNysTrace."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import scipy.linalg

from curvops.algorithms._operand import (
    Array,
    Operand,
    ProbeKind,
    as_operand,
    check_int,
    check_probe,
    check_seed,
)

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
    """Validate a matvec budget."""
    return check_int(budget, "budget", minimum)


def check_block_size(block_size: int | None) -> int:
    """Validate the probe block size (``None`` -> default 32)."""
    return DEFAULT_BLOCK_SIZE if block_size is None else check_int(block_size, "block_size", 1)


def identity_images(operand: Operand, block_size: int) -> Iterator[tuple[int, int, Array]]:
    """Yield ``(start, stop, A[:, start:stop])`` for consecutive column blocks of ``A``."""
    for start in range(0, operand.dim, block_size):
        stop = min(start + block_size, operand.dim)
        yield start, stop, operand.matmat(operand.identity_columns(start, stop))


def probe_images(
    operand: Operand, num_probes: int, kind: str, rng: Any, block_size: int
) -> Iterator[tuple[Array, Array]]:
    """Yield ``(Z, A Z)`` for consecutive ``(D, b)`` blocks of random probes, ``b <= block_size``."""
    for start in range(0, num_probes, block_size):
        probes = operand.probes(min(block_size, num_probes - start), kind, rng)
        yield probes, operand.matmat(probes)


def mean_and_standard_error(samples: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(n)`` (NaN for ``n == 1``)."""
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


def _setup(A: Any, budget: Any, probe: str, seed: Any, block_size: Any, dim: Any, minimum: int):
    operand = as_operand(A, dim)
    budget = check_budget(budget, minimum)
    check_probe(probe)
    block_size = check_block_size(block_size)
    rng = operand.rng(check_seed(seed))
    return operand, budget, block_size, rng


def hutchinson_trace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    block_size: int | None = None,
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
        Seed of the probes; same seed and block size give the same result within a backend.
    block_size
        Probes per block product ``A @ Z`` (memory ``D * block_size``). Default 32.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is the sample standard deviation of ``z^T A z`` over sqrt(budget).
    """
    operand, budget, block_size, rng = _setup(A, budget, probe, seed, block_size, dim, 1)
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
    dim: int | None = None,
) -> ScalarEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): low-rank sketch plus Hutchinson on the rest.

    With ``s = budget // 3``: ``Q = orth(A S)`` for an ``(D, s)`` random ``S``; the estimate is
    ``tr(Q^T A Q) + mean_j g_j^T (I - QQ^T) A (I - QQ^T) g_j`` over ``budget - 2 s`` probes
    ``g_j``. Unbiased for any ``A``; variance ``O(1/budget^2)`` for PSD ``A`` with decaying
    spectrum. With ``budget < 3`` the sketch is empty and this is Hutchinson.

    Parameters
    ----------
    A, probe, seed, block_size, dim
        As in :func:`hutchinson_trace`; ``probe`` is used for both the sketch and the probes.
    budget
        Total matvecs, ``>= 1``; ``budget >= D`` gives the exact trace with ``D`` matvecs.

    Returns
    -------
    ScalarEstimate
        ``standard_error`` is that of the Hutchinson part given the sketch; since the estimate is
        unbiased conditionally on ``Q``, its square is an unbiased estimate of the total variance.
    """
    operand, budget, block_size, rng = _setup(A, budget, probe, seed, block_size, dim, 1)
    if budget >= operand.dim:
        return _exact_trace(operand, block_size)
    sketch_size = budget // 3
    basis = operand.qr(operand.matmat(operand.probes(sketch_size, probe, rng)))[0]
    low_rank_trace = float(operand.column_dots(basis, operand.matmat(basis)).sum())
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


def xtrace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    dim: int | None = None,
) -> ScalarEstimate:
    """XTrace (Epperly, Tropp, Webber 2024): exchangeable Hutch++ that reuses every sample.

    With ``s = budget // 2`` probes ``Omega`` and ``Y = A Omega``: for each ``i`` the range of
    ``Y`` without column ``i`` serves as low-rank sketch and ``omega_i`` as the Hutchinson probe
    of the remainder, ``t_i = tr(P_i A) + omega_i^T (I - P_i) A (I - P_i) omega_i``; the estimate
    is ``mean_i t_i``. Each ``t_i`` is unbiased because ``P_i`` does not depend on ``omega_i``.
    All ``t_i`` come from ``Y``, ``Q = orth(Y)`` and ``A Q`` at the cost of ``2 s`` matvecs.

    Parameters
    ----------
    A, seed, dim
        As in :func:`hutchinson_trace`.
    budget
        Total matvecs, ``>= 2`` (an odd budget leaves one matvec unused); ``budget >= D`` gives
        the exact trace with ``D`` matvecs.
    probe
        ``"gaussian"`` (default, as in the paper) or ``"rademacher"``.

    Returns
    -------
    ScalarEstimate
        ``standard_error = std(t_i) / sqrt(s)`` (the paper's error estimate; ``t_i`` are
        exchangeable, not independent). NaN for ``s = 1``.
    """
    operand, budget, _, rng = _setup(A, budget, probe, seed, None, dim, 1)
    if budget >= operand.dim:
        return _exact_trace(operand, DEFAULT_BLOCK_SIZE)
    if budget < 2:
        raise ValueError(f"xtrace needs budget >= 2 (two matvecs per probe), got {budget}")
    num_probes = budget // 2
    probes = operand.probes(num_probes, probe, rng)
    images = operand.matmat(probes)
    basis, triangular = operand.qr(images)
    projected = operand.inner(basis, operand.matmat(basis))
    projected = (projected + projected.T) / 2  # Q^T A Q, symmetric up to rounding
    coordinates = operand.inner(basis, probes)  # W = Q^T Omega
    quadratic = operand.column_dots(probes, images)  # omega_i^T A omega_i
    samples = _xtrace_samples(projected, coordinates, triangular, quadratic)
    mean, error = mean_and_standard_error(samples)
    return ScalarEstimate(mean, error, operand.num_matvecs, False)


def _xtrace_samples(
    projected: np.ndarray, coordinates: np.ndarray, triangular: np.ndarray, quadratic: np.ndarray
) -> np.ndarray:
    """The ``s`` exchangeable estimates ``t_i`` from the small ``(s, s)`` matrices H, W, R."""
    # With P_i = Q p_i Q^T (p_i the small projector) and a_i = p_i W_i:
    #   tr(P_i A) = tr(p_i H),
    #   omega_i^T (I - P_i) A (I - P_i) omega_i = omega_i^T y_i - 2 a_i^T R_i + a_i^T H a_i
    # because Q^T A omega_i = Q^T y_i = R_i.
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
        - 2.0 * np.einsum("ji,ji->i", removed, triangular)
        + np.einsum("ji,jk,ki->i", removed, projected, removed)
    )
    return low_rank + remainder


def xnystrace(
    A: Any,
    budget: int,
    *,
    probe: ProbeKind = "gaussian",
    seed: int | None = None,
    assume_psd: bool = False,
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
    A, seed, dim
        As in :func:`hutchinson_trace`.
    budget
        Total matvecs ``m >= 2``; ``budget >= D`` gives the exact trace with ``D`` matvecs.
    probe
        ``"gaussian"`` (default, as in the paper) or ``"rademacher"``.
    assume_psd
        Assert that ``A`` is positive semi-definite (unchecked; default False). Otherwise ``A``
        must carry the tag ``is_positive_semidefinite`` (GGN, Fisher, KFAC, EKFAC,
        ``curvops.operators.inverse.assume_psd(A)``).

    Returns
    -------
    ScalarEstimate
        ``standard_error = std(t_i) / sqrt(m)`` (the paper's error estimate). Exact to
        rounding, with ``standard_error ~ 0``, when ``rank(A) < m``.

    Raises
    ------
    ValueError
        If ``A`` is not known to be positive semi-definite, or the probes' Gram matrix
        ``Omega^T A Omega`` shows that it is not.
    """
    if not (assume_psd or bool(getattr(A, "is_positive_semidefinite", False))):
        raise ValueError(
            f"xnystrace needs a positive semi-definite operator and {type(A).__name__} is not known "
            "to be one (the Hessian is indefinite in general: use xtrace or hutchpp_trace). If A "
            "is positive semi-definite, pass assume_psd=True."
        )
    operand, budget, _, rng = _setup(A, budget, probe, seed, None, dim, 1)
    if budget >= operand.dim:
        return _exact_trace(operand, DEFAULT_BLOCK_SIZE)
    if budget < 2:
        raise ValueError(f"xnystrace needs budget >= 2 (a Nyström sketch of the other probes), got {budget}")
    probes = operand.probes(budget, probe, rng)
    images = operand.matmat(probes)
    # A small shift nu keeps the Cholesky factor of Omega^T (A + nu I) Omega well defined when
    # A has (numerically) low rank; it is removed from the estimate exactly (- nu D).
    frobenius = math.sqrt(float(np.sum(operand.column_norms(images) ** 2)))
    shift = math.sqrt(operand.dim) * operand.eps * frobenius
    images = images + shift * probes
    basis, triangular = operand.qr(images)
    gram = operand.inner(probes, images)
    samples = _xnystrace_samples((gram + gram.T) / 2, triangular, operand.inner(basis, probes))
    mean, error = mean_and_standard_error(samples - shift * operand.dim)
    return ScalarEstimate(mean, error, operand.num_matvecs, False)


def _xnystrace_samples(gram: np.ndarray, triangular: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """The ``m`` estimates ``t_i`` of the shifted operator from ``H = Omega^T Y``, ``Y = Q R``
    and ``W = Q^T Omega`` (all ``(m, m)``)."""
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
    leave_out /= np.sqrt(np.sum(inverse_factor**2, axis=0))  # columns / sqrt(diag(H^-1))
    interpolation = np.einsum("ji,ji->i", leave_out, coordinates)
    return float(np.sum(small**2)) - np.sum(leave_out**2, axis=0) + interpolation**2
