"""Statistical correctness of the diagonal estimators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from curvops.algorithms import hutchinson_diagonal, xdiag

DIM = 60
NUM_SEEDS = 200
ESTIMATORS = {"hutchinson": hutchinson_diagonal, "xdiag": xdiag}


@pytest.fixture(scope="module")
def matrix(make_spectrum_matrix):
    rng = np.random.default_rng(0)
    return make_spectrum_matrix(np.r_[rng.uniform(-1.0, 2.0, DIM - 2), 6.0, -3.0], seed=4)[0]


def _runs(function, matrix, budget, probe):
    results = [function(matrix, budget, probe=probe, seed=seed) for seed in range(NUM_SEEDS)]
    return np.array([r.estimate for r in results]), np.array([r.standard_error for r in results])


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_diagonal_unbiased(name, probe, matrix):
    estimates, _ = _runs(ESTIMATORS[name], matrix, 10, probe)
    z_scores = (estimates.mean(0) - np.diag(matrix)) / (estimates.std(0, ddof=1) / np.sqrt(NUM_SEEDS))
    # 3-sigma per entry with a Bonferroni correction over the D entries (family-wise 0.27%).
    critical = scipy.stats.norm.ppf(1 - 0.0027 / (2 * DIM))
    assert np.all(np.abs(z_scores) <= critical)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_diagonal_standard_error_calibrated(probe, matrix):
    # Per entry, SE^2 = sample variance / n is unbiased for the estimate's variance. Pooling over
    # entries: the ratio of summed quantities has relative noise at most that of one entry,
    # sqrt((kurtosis - 1) / N) (worst case of fully correlated entries); 4 sigma.
    estimates, errors = _runs(hutchinson_diagonal, matrix, 12, probe)
    ratio = np.sum(np.mean(errors**2, 0)) / np.sum(estimates.var(0, ddof=1))
    kurtosis = np.max(scipy.stats.kurtosis(estimates, axis=0, fisher=False))
    assert abs(ratio - 1) <= 4 * np.sqrt((kurtosis - 1) / NUM_SEEDS)


def test_xdiag_beats_hutchinson_on_decaying_spectrum(make_spectrum_matrix):
    # lambda_i = i^-2 with random eigenvectors: diag(A) is dominated by the top eigenvectors,
    # which the sketch captures exactly; Hutchinson's per-entry variance is ~ ||A e_j||^2 / m.
    size, budget = 200, 40
    decaying = make_spectrum_matrix(1.0 / np.arange(1, size + 1) ** 2, seed=5)[0]
    truth = np.diag(decaying)

    def mse(function):
        return np.mean([np.sum((function(decaying, budget, seed=s).estimate - truth) ** 2) for s in range(20)])

    assert mse(xdiag) < mse(hutchinson_diagonal) / 10


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_exact_at_full_budget(name, matrix):
    result = ESTIMATORS[name](matrix, DIM, seed=0)
    assert result.exact and result.num_matvecs == DIM
    np.testing.assert_allclose(result.estimate, np.diag(matrix), rtol=0, atol=1e-14)
    assert np.all(result.standard_error == 0)


def test_rademacher_exact_for_diagonal_matrix():
    # z_j (D z)_j = D_jj z_j^2 = D_jj for Rademacher z: zero variance.
    diagonal = np.diag(np.linspace(1, 2, 30))
    result = hutchinson_diagonal(diagonal, 5, seed=0)
    np.testing.assert_allclose(result.estimate, np.diag(diagonal), rtol=1e-14)
    np.testing.assert_allclose(result.standard_error, 0, atol=1e-7)


def test_xdiag_rank_deficient_sketch(make_spectrum_matrix):
    # rank 4 < s = 8: every leave-one-out range still spans range(A), so d_i = diag(A) exactly.
    low_rank = make_spectrum_matrix(np.r_[4.0, 3.0, 2.0, 1.0, np.zeros(36)], seed=6)[0]
    result = xdiag(low_rank, 16, seed=0)
    np.testing.assert_allclose(result.estimate, np.diag(low_rank), atol=1e-10)
