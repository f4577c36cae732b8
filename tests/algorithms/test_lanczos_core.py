"""The Lanczos core (curvops.algorithms.lanczos_core) against numpy.linalg.eigh on known spectra.

The recurrence's invariants are checked on the basis it builds: ``T = Q^T A Q`` (tridiagonal,
block tridiagonal for a block start), ``Q`` orthonormal to the policy's level, the Lanczos
relation ``A Q^T = Q^T T + q_next^T B e^T``, breakdown on an invariant Krylov space, and the
extreme Ritz values of ``T`` against the exact eigenvalues.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from curvops.algorithms._torch_backend import TorchOperand
from curvops.algorithms.lanczos_core import (
    FullReorthogonalization,
    LanczosState,
    PartialReorthogonalization,
    start_block,
    tridiagonal_head,
    tridiagonalize_probes,
)
from curvops.algorithms.reorthogonalization import norms_after_update
from curvops.algorithms.vectors import as_operand

DIM = 120
EPS = np.finfo(np.float64).eps


def _matrix(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def _run(matrix: np.ndarray, backend: str, width: int, steps: int, orthogonality: float, seed: int = 0):
    operand = as_operand(torch.tensor(matrix) if backend == "torch" else matrix)
    rng = operand.rng(seed)
    state = LanczosState(operand, steps, width, rng, orthogonality)
    state.basis[:width] = start_block(operand, None, width, rng)
    coupling, stop = state.extend(0, steps)
    rows = np.asarray(state.basis[: stop + width], dtype=np.float64) * state.scales[: stop + width, None]
    return state, coupling, stop, rows


SEPARATED = np.r_[10.0, 8.0, 6.0, np.linspace(-1.0, 2.0, DIM - 3)]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("width", [1, 3])
def test_projection_is_q_transpose_a_q_and_the_lanczos_relation_holds(width, backend):
    """Full reorthogonalization (level 0): Q orthonormal, T = Q A Q^T and
    A Q^T = Q^T T + Q_next^T B E^T, all to rounding; T is (block) tridiagonal."""
    matrix = _matrix(SEPARATED)
    steps = 10 * width
    state, coupling, stop, rows = _run(matrix, backend, width, steps, orthogonality=0.0)
    assert stop == steps
    scale = np.linalg.norm(matrix, 2)
    basis, following = rows[:stop], rows[stop : stop + width]
    assert np.abs(rows @ rows.T - np.eye(stop + width)).max() <= 100 * math.sqrt(DIM) * EPS
    projected = state.projected[:stop, :stop]
    np.testing.assert_allclose(projected, basis @ matrix @ basis.T, atol=100 * math.sqrt(DIM) * EPS * scale)
    band = np.abs(np.subtract.outer(np.arange(stop), np.arange(stop))) > 2 * width - 1
    assert np.all(projected[band] == 0.0)
    residual = matrix @ basis.T - basis.T @ projected
    residual[:, stop - width :] -= following.T @ coupling
    assert np.abs(residual).max() <= 100 * math.sqrt(DIM) * EPS * scale


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_partial_reorthogonalization_keeps_the_level_and_the_ritz_values(backend):
    """Simon's partial reorthogonalization at sqrt(eps): the basis stays orthonormal to about that
    level (semi-orthogonality), and the extreme Ritz values are the eigenvalues to rounding."""
    matrix = _matrix(SEPARATED, seed=1)
    level = math.sqrt(EPS)
    state, _, stop, rows = _run(matrix, backend, 1, 60, orthogonality=level)
    assert isinstance(state.policy, PartialReorthogonalization)
    assert np.abs(rows @ rows.T - np.eye(stop + 1)).max() <= 10 * level
    theta = np.linalg.eigvalsh(state.projected[:stop, :stop])
    np.testing.assert_allclose(theta[::-1][:3], [10.0, 8.0, 6.0], rtol=0, atol=1e3 * EPS * 10.0)
    np.testing.assert_allclose(theta[0], -1.0, rtol=0, atol=1e-6)


def test_block_steps_use_full_reorthogonalization():
    state, _, _, _ = _run(_matrix(SEPARATED), "numpy", 2, 8, orthogonality=0.0)
    assert isinstance(state.policy, FullReorthogonalization)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_breakdown_continues_with_an_orthogonal_direction_and_zero_coupling(backend):
    """Three distinct eigenvalues (a diagonal matrix: products without rounding): the Krylov space
    of any start is invariant after three steps. The coupling to the fourth vector is exactly 0,
    and the fourth vector is a fresh direction orthogonal to the first three."""
    matrix = np.diag(np.repeat([3.0, 1.0, -2.0], DIM // 3))
    state, _, stop, rows = _run(matrix, backend, 1, 6, orthogonality=0.0)
    assert stop == 6
    assert state.projected[3, 2] == 0.0
    assert state.projected[2, 3] == 0.0
    np.testing.assert_allclose(np.linalg.eigvalsh(state.projected[:3, :3]), [-2.0, 1.0, 3.0], atol=1e-12)
    assert np.abs(rows @ rows.T - np.eye(stop + 1)).max() <= 100 * math.sqrt(DIM) * EPS


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_probe_tridiagonals_give_the_spectrum_and_stop_at_an_invariant_space(backend):
    """SLQ's batched recurrences: D steps give T with the eigenvalues of A for every probe; a
    matrix with three distinct eigenvalues stops every probe after three steps (breakdown rule
    BREAKDOWN_FACTOR * eps * ||T||; a diagonal matrix, whose products are exact), with those three
    eigenvalues as nodes."""
    dim = 30
    eigenvalues = np.linspace(-1.0, 4.0, dim)
    matrix = _matrix(eigenvalues, seed=3)
    operand = as_operand(torch.tensor(matrix) if backend == "torch" else matrix)
    starts = operand.probes(4, "rademacher", operand.rng(0))
    tridiagonals = tridiagonalize_probes(operand, starts, dim)
    assert tridiagonals.lengths.tolist() == [dim] * 4
    for probe in range(4):
        theta = scipy.linalg.eigvalsh_tridiagonal(
            tridiagonals.alphas[probe], tridiagonals.betas[probe, : dim - 1]
        )
        np.testing.assert_allclose(theta, eigenvalues, atol=1e-10)

    matrix = np.diag(np.repeat([3.0, 1.0, -2.0], 10))
    operand = as_operand(torch.tensor(matrix) if backend == "torch" else matrix)
    starts = operand.probes(4, "gaussian", operand.rng(1))
    tridiagonals = tridiagonalize_probes(operand, starts, 10)
    assert tridiagonals.lengths.tolist() == [3] * 4
    assert operand.num_matvecs == 4 * 3
    for probe in range(4):
        theta = scipy.linalg.eigvalsh_tridiagonal(
            tridiagonals.alphas[probe, :3], tridiagonals.betas[probe, :2]
        )
        np.testing.assert_allclose(theta, [-2.0, 1.0, 3.0], atol=1e-12)


def test_tridiagonal_head_reduces_the_restart_arrow():
    """After a thick restart the kept block ``diag(theta)`` with couplings ``sigma`` to the start
    row is reduced by an orthogonal ``G``: ``G^T diag(theta) G`` tridiagonal and ``G^T sigma =
    c e_p``. Householder reduction is backward stable: errors of a few ``p eps ||M||``."""
    rng = np.random.default_rng(5)
    projected = np.zeros((14, 14))
    locked, start = 2, 11
    projected[np.arange(start), np.arange(start)] = np.sort(rng.standard_normal(start))[::-1] * 4
    sigma = rng.standard_normal(start - locked) * np.logspace(-12, 0, start - locked)  # converged to not
    projected[start, locked:start] = projected[locked:start, start] = sigma
    rotation, diagonal, off = tridiagonal_head(projected, locked, start)
    p = start - locked
    theta = np.diag(projected.diagonal()[locked:start])
    scale = np.abs(theta).max() + np.linalg.norm(sigma)
    tol = 10 * (p + 1) * EPS * scale
    assert np.abs(rotation.T @ rotation - np.eye(p)).max() <= 10 * (p + 1) * EPS
    tridiagonal = np.diag(diagonal) + np.diag(off[:-1], 1) + np.diag(off[:-1], -1)
    assert np.abs(rotation.T @ theta @ rotation - tridiagonal).max() <= tol
    expected = np.zeros(p)
    expected[-1] = off[-1]
    assert np.abs(rotation.T @ sigma - expected).max() <= tol
    assert abs(abs(off[-1]) - np.linalg.norm(sigma)) <= tol
    # Every kept row locked: nothing to reduce.
    assert [part.size for part in tridiagonal_head(projected, start, start)] == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_after_a_small_update_comes_from_the_removed_coefficients(dtype):
    """After Gram-Schmidt removes components ``c`` along orthonormal rows, the norm is
    ``sqrt(||x||^2 - ||c||^2)`` up to the update's rounding: used where that is within 1% of
    the orthogonality level, measured (None) where the bound is larger (float32 at a tight
    level) or more than half the norm was removed (a DGKS re-pass follows)."""
    dim, reach, level = 3000, 6, 1e-8
    rng = np.random.default_rng(8)
    rows, _ = np.linalg.qr(rng.standard_normal((dim, reach)))
    residual = rng.standard_normal(dim)
    residual -= rows @ (rows.T @ residual)
    operand = TorchOperand(dim, dtype, torch.device("cpu"), lambda block: block)
    for size, usable in ((1e-8, dtype == torch.float64), (0.9, False)):
        vector = residual + rows @ (size * np.linalg.norm(residual) * rng.standard_normal(reach))
        coefficients = (rows.T @ vector)[:, None]
        norms = norms_after_update(operand, coefficients, np.array([np.linalg.norm(vector)]), reach, level)
        if not usable:
            assert norms is None
            continue
        measured = np.linalg.norm(vector - rows @ coefficients[:, 0])
        assert abs(norms[0] - measured) <= 0.01 * level * measured
