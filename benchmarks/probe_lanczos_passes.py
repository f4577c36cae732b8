"""Passes over the Lanczos basis: measurements of partial reorthogonalization's savings.

These were tests that counted private calls (Gram-Schmidt passes, drift estimates, rows
recombined at restarts, norms measured); they pin how the work is done, not its result, so they
live here as measurements. The results they guard (orthogonality level, eigenpairs against eigh)
are tested through the public API in tests/algorithms/test_alg_eigen.py.

Run: ``python -m pytest -q benchmarks/probe_lanczos_passes.py -p no:cacheprovider``
(each check prints nothing on success; a failure shows the counts).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops.algorithms import lanczos
from tests.algorithms.conftest import spectrum_matrix
from tests.algorithms.test_alg_eigen import BACKENDS, DIM, EPS, _check_loose, _operator, check_eigenpairs


@pytest.fixture
def make_spectrum_matrix():
    return spectrum_matrix


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_measured_drift_reads_once_per_step(tol, make_spectrum_matrix, monkeypatch):
    """With measured drift a recurrence step makes one read (the stored rows' inner products with
    u, v and w) and no estimate; a Gram-Schmidt update takes its coefficients from that read, so
    only each cycle's first step (the arrow) and DGKS re-passes read again. At tol = 1e-10 the
    read's rounding exceeds 1% of the level (1e-12) relative to the residual: every step falls
    back to the estimate and a measuring pass. The basis stays orthonormal to the level."""
    from curvops.algorithms import _torch_backend
    from curvops.algorithms import lanczos_core as core

    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    matrix, _ = make_spectrum_matrix(np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM)), seed=13)
    operator = _operator(matrix, "torch-measured")
    counts = {"gram": 0, "dots": 0, "predict": 0}
    for owner, name in (
        (_torch_backend.TorchOperand, "gram"),
        (_torch_backend.TorchOperand, "dots"),
        (core.PartialReorthogonalization, "predict"),
    ):
        original = getattr(owner, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    result = lanczos(operator, k=5, tol=tol, seed=0, max_basis_size=12)
    steps, cycles = result.num_matvecs - 5, result.num_restarts + 1
    assert counts["gram"] == steps
    if tol == 1e-6:
        assert counts["predict"] == cycles
        assert counts["dots"] <= cycles + 0.1 * steps
    else:
        assert counts["predict"] == steps
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), tol / 100)
    _check_loose(matrix, result, tol, "LA", 5)


def test_reorthogonalization_update_skipped_when_basis_already_orthogonal(make_spectrum_matrix, monkeypatch):
    """Most steps skip the update pass over the basis; the basis stays orthonormal to the
    documented level, min(sqrt(eps), tol / 100), and the answer is the full-reorthogonalization one."""
    from curvops.algorithms import _torch_backend

    rng = np.random.default_rng(11)
    matrix, _ = make_spectrum_matrix(np.r_[5.0, 4.5, 4.0, 3.8, rng.uniform(-3, 3, DIM - 4)], seed=11)
    updates = []
    original = _torch_backend.TorchOperand.subtract_combination_

    def counting(self, target, coefficients, rows):
        updates.append(rows.shape[0])
        return original(self, target, coefficients, rows)

    monkeypatch.setattr(_torch_backend.TorchOperand, "subtract_combination_", counting)
    result = lanczos(torch.tensor(matrix), k=4, tol=1e-8, seed=0, max_basis_size=12)
    steps = result.num_matvecs - 4
    # Per step: one update with the known couplings (<= 2 rows after the first step of a cycle,
    # every kept row at its first step) plus one over the whole basis unless skipped.
    assert len(updates) < 1.5 * steps
    assert result.num_restarts > 0
    vectors = result.eigenvectors.numpy()
    level = min(np.sqrt(EPS), 1e-10)
    # Ritz vectors V s inherit the basis' orthogonality (up to sqrt(m) for the combination).
    assert np.abs(vectors.T @ vectors - np.eye(4)).max() <= 10 * level
    check_eigenpairs(matrix, result, 1e-8, "LA", 4)


def test_drift_estimate_skips_passes_without_losing_orthogonality(make_spectrum_matrix, monkeypatch):
    """Single-vector Lanczos measures only the rows whose estimated drift nears the level: many
    steps form no inner products with the stored basis beyond the three-term recurrence's. On a
    semicircle spectrum (top eigenvalues packed at the edge, many restarts) the pairs still
    match eigh and stay orthonormal."""
    import curvops.algorithms.eigen as eigen

    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    values = np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM))
    matrix, _ = make_spectrum_matrix(values, seed=13)
    passes = []
    original = eigen.Operand.inner

    def counting(self, left, right):
        if left.ndim == 2 and left.shape[1] > 1:  # rows of the stored basis, not a norm's dot
            passes.append(left.shape[1])
        return original(self, left, right)

    # Only the Gram-Schmidt passes go through Operand.inner; the recurrence's inner products
    # (u, v and w against the product w) go through Operand.dots, not a pass over the basis.
    monkeypatch.setattr(eigen.Operand, "inner", counting)
    result = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=0, max_basis_size=12)
    steps = result.num_matvecs - 5
    assert result.num_restarts >= 5
    assert len(passes) < 0.9 * steps  # some steps skip the pass entirely
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), 1e-12)
    check_eigenpairs(matrix, result, 1e-10, "LA", 5)


def test_converged_pairs_are_locked_and_restarts_shrink(make_spectrum_matrix, monkeypatch):
    """Wanted pairs converged to rounding are locked: later restarts recombine only the rows after
    them. The answer (eigenpairs vs eigh, orthonormality) is unchanged."""
    from curvops.algorithms import vectors

    rng = np.random.default_rng(14)
    # Four outliers converge fast; the fifth sits in a near-cluster and needs many restarts.
    values = np.r_[10.0, 9.0, 8.0, 7.0, 3.0, 2.995, rng.uniform(-1.0, 2.9, DIM - 6)]
    matrix, _ = make_spectrum_matrix(values, seed=14)
    combined = []
    original = vectors.Operand.combine_rows_

    def recording(self, rows, coefficients):
        combined.append(rows.shape[0])
        return original(self, rows, coefficients)

    monkeypatch.setattr(vectors.Operand, "combine_rows_", recording)
    result = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=0, max_basis_size=12)
    assert result.num_restarts >= 3
    # Rows recombined: those after the locked ones, and the residual row moved behind them.
    assert combined[0] == 12 + 1
    assert min(combined) <= 12 + 1 - 4
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), 1e-12)
    check_eigenpairs(matrix, result, 1e-10, "LA", 5)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_updates_come_in_consecutive_pairs_and_keep_the_level(tol, make_spectrum_matrix, monkeypatch):
    """Partial reorthogonalization: a Gram-Schmidt update triggered by the drift estimate is
    repeated at the next step over at least the same rows (otherwise the previous vector's drift,
    about the level, re-enters the next one at once). The basis, hence the eigenvectors, stays
    orthonormal to the documented level min(sqrt(eps), tol / 100); the pairs match eigh."""
    from curvops.algorithms import lanczos_core as core

    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    values = np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM))
    matrix, _ = make_spectrum_matrix(values, seed=13)
    steps = []  # [j, rows to measure, forced, rows updated] per step; None between cycles
    original_reach, original_reset, original_begin = (
        core.PartialReorthogonalization.reach,
        core.PartialReorthogonalization.reset,
        core.PartialReorthogonalization.begin,
    )

    def begin(self, start):
        steps.append(None)
        return original_begin(self, start)

    def reach(self, j, predicted, level):
        rows, forced = original_reach(self, j, predicted, level)
        steps.append([j, rows, forced, 0])
        return rows, forced

    def reset(self, rows):
        steps[-1][3] = rows
        return original_reset(self, rows)

    monkeypatch.setattr(core.PartialReorthogonalization, "begin", begin)
    monkeypatch.setattr(core.PartialReorthogonalization, "reach", reach)
    monkeypatch.setattr(core.PartialReorthogonalization, "reset", reset)
    result = lanczos(torch.tensor(matrix), k=5, tol=tol, seed=0, max_basis_size=12)
    assert result.num_restarts >= 3
    pairs, cycles, follow = 0, 0, None
    for index, step in enumerate(steps):
        if step is None:
            follow = None  # the last step of a cycle has no successor in it
            continue
        j, rows, forced, updated = step
        if steps[index - 1] is None and index > 1:
            # After a restart the cycle's first step updates every row (the arrow touches them all).
            assert forced, step
            assert updated == j + 1, step
            cycles += 1
        if follow is not None:  # the second of a pair
            assert forced, (steps[index - 1], step)
            assert updated >= min(follow, j + 1), (steps[index - 1], step)
            pairs += 1
            follow = None
        elif updated:
            follow = updated
    assert cycles >= 3
    assert pairs >= cycles
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), tol / 100)
    check_eigenpairs(matrix, result, tol, "LA", 5)


def _spy_single_steps(monkeypatch):
    """Wrap single-vector Lanczos steps: per step, whether it measured the new vector's norm
    explicitly (Operand.norm) and that vector's true norm afterwards (should be 1)."""
    import curvops.algorithms.eigen as eigen
    from curvops.algorithms import lanczos_core as core

    records = []
    explicit = [0]
    original_norm, original_step = eigen.Operand.norm, core.LanczosState._single_step

    def norm(self, vector):
        explicit[0] += 1
        return original_norm(self, vector)

    def step(state, j, start):
        before = explicit[0]
        result = original_step(state, j, start)
        new = np.asarray(state.basis[j + 1], dtype=np.float64)
        records.append((explicit[0] > before, float(np.linalg.norm(new) * state.scales[j + 1])))
        return result

    monkeypatch.setattr(eigen.Operand, "norm", norm)
    monkeypatch.setattr(core.LanczosState, "_single_step", step)
    return records


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrence_norm_is_exact_where_used(backend, make_spectrum_matrix, monkeypatch):
    """Where passes are cheap (an accelerator) and its rounding allows (tol = 1e-6: orthogonality
    level 1e-8), a step's residual norm comes from the three-term recurrence on the step's Gram
    matrix instead of a pass over the vector: on most steps here, and every new Lanczos vector
    still has unit norm to far below the level (the recurrence's error bound is 1% of it). On a
    CPU (torch, numpy) every norm is measured, and the vectors are unit to rounding. The pairs
    match eigh to the tolerance."""
    rng = np.random.default_rng(21)
    values = np.r_[10.0, 8.0, 6.0, 4.0, 3.0, rng.uniform(-1.0, 2.0, DIM - 5)]
    matrix, _ = make_spectrum_matrix(values, seed=21)
    operator = _operator(matrix, backend)
    records = _spy_single_steps(monkeypatch)
    result = lanczos(operator, k=5, tol=1e-6, seed=0, max_basis_size=12)
    from_recurrence = [unit for measured, unit in records if not measured]
    if backend == "torch-measured":
        assert len(from_recurrence) > 0.5 * len(records)
        np.testing.assert_allclose(from_recurrence, 1.0, rtol=0, atol=0.01 * 1e-8)
    else:
        assert records
        assert not from_recurrence
        np.testing.assert_allclose([unit for _, unit in records], 1.0, rtol=0, atol=100 * EPS)
    check_eigenpairs(matrix, result, 1e-6, "LA", 5)


def test_recurrence_norm_not_used_when_rounding_dominates(make_spectrum_matrix, monkeypatch):
    """At tol = 1e-10 (orthogonality level 1e-12) the recurrence's rounding would exceed the
    level: every step measures the norm, and the vectors are unit to rounding."""
    values = np.r_[10.0, 8.0, 6.0, np.linspace(-1.0, 2.0, DIM - 3)]
    matrix, _ = make_spectrum_matrix(values, seed=22)
    operator = _operator(matrix, "torch-measured")
    records = _spy_single_steps(monkeypatch)
    result = lanczos(operator, k=3, tol=1e-10, seed=0)
    assert records
    assert all(measured for measured, _ in records)
    np.testing.assert_allclose([unit for _, unit in records], 1.0, rtol=0, atol=100 * EPS)
    check_eigenpairs(matrix, result, 1e-10, "LA", 3)
