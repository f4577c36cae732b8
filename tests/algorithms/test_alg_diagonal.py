"""Statistical correctness of the diagonal estimators."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats
import torch

from curvops.algorithms import DiagonalEstimate, hutchinson_diagonal, xdiag

DIM = 60
NUM_SEEDS = 200
ESTIMATORS: dict[str, Callable[..., DiagonalEstimate]] = {"hutchinson": hutchinson_diagonal, "xdiag": xdiag}


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
        return np.mean(
            [np.sum((function(decaying, budget, seed=s).estimate - truth) ** 2) for s in range(20)]
        )

    assert mse(xdiag) < mse(hutchinson_diagonal) / 10


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_exact_at_full_budget(name, matrix):
    result = ESTIMATORS[name](matrix, DIM, seed=0)
    assert result.exact
    assert result.num_matvecs == DIM
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


@pytest.fixture(scope="module")
def nonsymmetric_matrix():
    # curvlinops' test matrix for its diagonal estimators: entries uniform on [0, 1).
    return torch.rand(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()


@pytest.mark.parametrize("form", ["numpy", "scipy", "torch"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_diagonal_unbiased_on_nonsymmetric_matrix(name, form, nonsymmetric_matrix, operator_form):
    operator = operator_form(nonsymmetric_matrix, form)
    estimates, _ = _runs(ESTIMATORS[name], operator, 10, "gaussian")
    z_scores = (estimates.mean(0) - np.diag(nonsymmetric_matrix)) / (
        estimates.std(0, ddof=1) / np.sqrt(NUM_SEEDS)
    )
    critical = scipy.stats.norm.ppf(1 - 0.0027 / (2 * nonsymmetric_matrix.shape[0]))  # as above
    assert np.all(np.abs(z_scores) <= critical)


def test_xdiag_refuses_operator_without_transpose(nonsymmetric_matrix, make_spectrum_matrix):
    # A callable offers no A^T product and no symmetry tag: refused before any product.
    calls = []

    def product(vector):
        calls.append(1)
        return nonsymmetric_matrix @ vector

    with pytest.raises(ValueError, match="symmetric=True"):
        xdiag(product, 10, seed=0, dim=30)
    assert not calls
    # symmetric=True asserts symmetry: then A Q stands for A^T Q and the result is that of
    # the matrix itself (same probes, same products up to rounding).
    symmetric = make_spectrum_matrix(np.linspace(-1.0, 2.0, 30), seed=8)[0]
    asserted = xdiag(lambda vector: symmetric @ vector, 10, seed=0, dim=30, symmetric=True)
    reference = xdiag(symmetric, 10, seed=0)
    np.testing.assert_allclose(asserted.estimate, reference.estimate, rtol=1e-10, atol=1e-12)
    assert asserted.num_matvecs == 10


@pytest.mark.parametrize("symmetric", [True, False])
def test_xdiag_jackknife_matches_recomputation_without_each_probe(
    symmetric, make_spectrum_matrix, nonsymmetric_matrix
):
    # Estimate and per-entry jackknife error equal XDiag written out with dense projectors, on
    # the probes and on the probes without probe j (float64; 1e-9 relative leaves room for the
    # conditioning of R).
    matrix = make_spectrum_matrix(1.0 / np.arange(1, 31), seed=10)[0] if symmetric else nonsymmetric_matrix
    budget, seed = 12, 3
    result = xdiag(matrix, budget, seed=seed)
    probes = np.random.default_rng(seed).standard_normal((30, budget // 2))

    def plain_xdiag(omega):
        y = matrix @ omega
        total = np.zeros(30)
        for i in range(omega.shape[1]):
            basis = np.linalg.qr(np.delete(y, i, 1))[0]
            projector = basis @ basis.T
            total += np.diag(projector @ matrix) + omega[:, i] * ((np.eye(30) - projector) @ y[:, i])
        return total / omega.shape[1]

    leave_one_out = np.stack([plain_xdiag(np.delete(probes, j, 1)) for j in range(budget // 2)])
    count = leave_one_out.shape[0]
    expected = np.sqrt((count - 1) / count * np.sum((leave_one_out - leave_one_out.mean(0)) ** 2, 0))
    scale = np.abs(np.diag(matrix)).max()
    np.testing.assert_allclose(result.estimate, plain_xdiag(probes), rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(result.standard_error, expected, rtol=1e-9, atol=1e-12 * scale)


def test_hutchinson_diagonal_error_of_nearly_diagonal_float32_matrix():
    # diag 1000 and off-diagonal entries ~1e-3: each sample is 1000 plus a spread of ~5e-3, so
    # sum(x^2) - n mean^2 in float32 (rounding ~0.06 n) would swamp the variance (~3e-5 n). The
    # float64 run sees the same Rademacher probes; float32 rounding of 1000 (6e-5) against the
    # ~5e-3 spread leaves the standard errors within a few percent, so 10% is a safe bound.
    rng = np.random.default_rng(12)
    off = 1e-3 * rng.standard_normal((30, 30))
    matrix = np.diag(np.full(30, 1000.0)) + (off + off.T) / 2 - np.diag(np.diag(off))
    single = hutchinson_diagonal(torch.as_tensor(matrix, dtype=torch.float32), 20, seed=0)
    double = hutchinson_diagonal(torch.as_tensor(matrix, dtype=torch.float64), 20, seed=0)
    assert torch.all(double.standard_error > 0)
    np.testing.assert_allclose(single.standard_error.double(), double.standard_error, rtol=0.1)
