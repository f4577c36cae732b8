"""Statistical correctness of the trace and squared-Frobenius estimators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from curvops.algorithms import hutchinson_squared_frobenius, hutchinson_trace, hutchpp_trace, xtrace

DIM = 80
NUM_SEEDS = 300
ESTIMATORS = {"hutchinson": hutchinson_trace, "hutchpp": hutchpp_trace, "xtrace": xtrace}


@pytest.fixture(scope="module")
def indefinite_matrix(make_spectrum_matrix):
    rng = np.random.default_rng(0)
    return make_spectrum_matrix(np.r_[rng.uniform(-1.0, 3.0, DIM - 3), 8.0, 6.0, -4.0], seed=1)[0]


def _runs(function, matrix, budget, probe):
    results = [function(matrix, budget, probe=probe, seed=seed) for seed in range(NUM_SEEDS)]
    estimates = np.array([r.estimate for r in results])
    errors = np.array([r.standard_error for r in results])
    assert all(r.num_matvecs <= budget and not r.exact for r in results)
    return estimates, errors


def _variance_ratio_bound(estimates, errors):
    """4-sigma bound for |mean(SE^2) / var(estimates) - 1| from the sampling noise of both sides.

    The sample variance over N runs has relative standard deviation sqrt((kurtosis - 1) / N)
    (kurtosis estimated from the runs); mean(SE^2) has relative standard deviation
    std(SE^2) / (mean(SE^2) sqrt(N)). The two are independent-ish, so add in quadrature.
    """
    count = estimates.size
    kurtosis = scipy.stats.kurtosis(estimates, fisher=False)
    squared = errors**2
    relative = np.sqrt((kurtosis - 1) / count + squared.var() / (squared.mean() ** 2 * count))
    return 4 * relative


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_trace_estimators_unbiased(name, probe, indefinite_matrix):
    truth = np.trace(indefinite_matrix)
    estimates, _ = _runs(ESTIMATORS[name], indefinite_matrix, 12, probe)
    # Mean of N independent runs: standard error std / sqrt(N); 3 standard errors as required.
    assert abs(estimates.mean() - truth) <= 3 * estimates.std(ddof=1) / np.sqrt(NUM_SEEDS)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", ["hutchinson", "hutchpp"])
def test_trace_standard_error_calibrated(name, probe, indefinite_matrix):
    # For Hutchinson SE^2 = sample variance / n is unbiased for Var(estimate); for Hutch++ the
    # same holds conditionally on the sketch, hence also unconditionally (the estimator is
    # conditionally unbiased, so E[Var(.|Q)] is the whole variance).
    estimates, errors = _runs(ESTIMATORS[name], indefinite_matrix, 15, probe)
    ratio = np.mean(errors**2) / estimates.var(ddof=1)
    assert abs(ratio - 1) <= _variance_ratio_bound(estimates, errors)


def test_xtrace_error_estimate_conservative_and_right_order(indefinite_matrix):
    # The jackknife variance is biased upwards (Efron-Stein), by about Var(s - 1 probes) /
    # Var(s probes) here: never below the variance beyond the ratio's sampling noise, and within
    # a factor 2 in standard deviation (test_estimator_calibration checks the coverage).
    estimates, errors = _runs(xtrace, indefinite_matrix, 16, "gaussian")
    ratio = np.mean(errors**2) / estimates.var(ddof=1)
    assert ratio >= 1 - _variance_ratio_bound(estimates, errors)
    assert np.sqrt(ratio) <= 2.0


def test_jackknife_matches_recomputation_without_each_probe(make_spectrum_matrix):
    # The closed-form leave-one-out values equal XTrace / XNysTrace run on the probes
    # without probe j, built here from dense products (float64: agreement to ~1e-12 relative;
    # 1e-9 leaves room for the conditioning of R on this decaying spectrum).
    from curvops.algorithms.trace import xnystrace

    values = 1.0 / np.arange(1, 41) ** 1.5
    matrix = make_spectrum_matrix(values, seed=9)[0]
    budget, seed = 12, 5
    result = xtrace(matrix, budget, seed=seed)
    probes = np.random.default_rng(seed).standard_normal((40, budget // 2))

    def plain_xtrace(omega):
        y = matrix @ omega
        total = 0.0
        for i in range(omega.shape[1]):
            basis = np.linalg.qr(np.delete(y, i, 1))[0]
            projector = basis @ basis.T
            rest = omega[:, i] - projector @ omega[:, i]
            total += np.trace(projector @ matrix) + rest @ matrix @ rest
        return total / omega.shape[1]

    leave_one_out = np.array([plain_xtrace(np.delete(probes, j, 1)) for j in range(budget // 2)])
    count = leave_one_out.size
    expected = np.sqrt((count - 1) / count * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    assert result.estimate == pytest.approx(plain_xtrace(probes), rel=1e-9)
    assert result.standard_error == pytest.approx(expected, rel=1e-9)

    def plain_xnystrace(omega):
        y = matrix @ omega
        total = 0.0
        for i in range(omega.shape[1]):
            rest_y, rest_omega = np.delete(y, i, 1), np.delete(omega, i, 1)
            nystrom = rest_y @ np.linalg.solve(rest_omega.T @ rest_y, rest_y.T)
            total += np.trace(nystrom) + omega[:, i] @ (matrix - nystrom) @ omega[:, i]
        return total / omega.shape[1]

    probes = np.random.default_rng(seed).standard_normal((40, budget))
    result = xnystrace(matrix, budget, seed=seed, assume_psd=True)
    leave_one_out = np.array([plain_xnystrace(np.delete(probes, j, 1)) for j in range(budget)])
    count = leave_one_out.size
    expected = np.sqrt((count - 1) / count * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    # The Nystrom shift (sqrt(D) eps ||Y||_F) moves the values by ~1e-14 relative.
    assert result.estimate == pytest.approx(plain_xnystrace(probes), rel=1e-9)
    assert result.standard_error == pytest.approx(expected, rel=1e-7)


def test_low_rank_methods_beat_hutchinson_on_decaying_spectrum(make_spectrum_matrix):
    # lambda_i = i^-2: Hutchinson's variance is ~2 ||A||_F^2 / m ~ 2.2 / m, while the sketch of
    # size m/3 (Hutch++) or m/2 (XTrace) leaves a tail ||A - A_r||_F^2 ~ 1 / (3 r^3) ~ 4e-5 for
    # r = 20: a variance ratio of order 1e4. Requiring a 10x smaller mean squared error over 40
    # seeds is far inside that margin.
    size, budget = 300, 60
    matrix = make_spectrum_matrix(1.0 / np.arange(1, size + 1) ** 2, seed=2)[0]
    truth = np.trace(matrix)

    def mse(function):
        return np.mean([(function(matrix, budget, seed=seed).estimate - truth) ** 2 for seed in range(40)])

    baseline = mse(hutchinson_trace)
    assert mse(hutchpp_trace) < baseline / 10
    assert mse(xtrace) < baseline / 10


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("extra", [0, 7])
def test_exact_at_full_budget(name, extra, indefinite_matrix):
    result = ESTIMATORS[name](indefinite_matrix, DIM + extra, seed=0)
    assert result.exact
    assert result.standard_error == 0.0
    assert result.num_matvecs == DIM
    assert result.estimate == pytest.approx(np.trace(indefinite_matrix), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_same_seed_same_result(name, indefinite_matrix):
    first = ESTIMATORS[name](indefinite_matrix, 20, seed=3)
    again = ESTIMATORS[name](indefinite_matrix, 20, seed=3)
    other = ESTIMATORS[name](indefinite_matrix, 20, seed=4)
    assert first == again
    assert first.estimate != other.estimate


def test_xtrace_rank_deficient_sketch_exact(make_spectrum_matrix):
    # rank 5 < s = 10 probes: R is singular and the projector fallback is used; the range of
    # Y without any one column still contains range(A), so every t_i equals tr(A) exactly.
    matrix = make_spectrum_matrix(np.r_[5.0, 4.0, 3.0, 2.0, 1.0, np.zeros(55)], seed=3)[0]
    result = xtrace(matrix, 20, seed=0)
    assert result.estimate == pytest.approx(15.0, rel=1e-9)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_squared_frobenius_unbiased_and_calibrated(probe, indefinite_matrix):
    truth = np.sum(indefinite_matrix**2)
    results = [
        hutchinson_squared_frobenius(indefinite_matrix, 10, probe=probe, seed=s) for s in range(NUM_SEEDS)
    ]
    estimates = np.array([r.estimate for r in results])
    errors = np.array([r.standard_error for r in results])
    assert abs(estimates.mean() - truth) <= 3 * estimates.std(ddof=1) / np.sqrt(NUM_SEEDS)
    ratio = np.mean(errors**2) / estimates.var(ddof=1)
    assert abs(ratio - 1) <= _variance_ratio_bound(estimates, errors)
    exact = hutchinson_squared_frobenius(indefinite_matrix, DIM, seed=0)
    assert exact.exact
    assert exact.estimate == pytest.approx(truth, rel=1e-12)


def test_single_probe_standard_error_is_nan(indefinite_matrix):
    assert np.isnan(hutchinson_trace(indefinite_matrix, 1, seed=0).standard_error)


# ---------------------------------------------------------------------------- XNysTrace
@pytest.fixture(scope="module")
def psd_decaying_matrix(make_spectrum_matrix):
    return make_spectrum_matrix(1.0 / np.arange(1, DIM + 1) ** 1.5, seed=21)[0]


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_xnystrace_unbiased_and_beats_xtrace_on_psd(probe, psd_decaying_matrix):
    from curvops.algorithms import xnystrace

    truth = np.trace(psd_decaying_matrix)
    results = [
        xnystrace(psd_decaying_matrix, 12, probe=probe, seed=s, assume_psd=True) for s in range(NUM_SEEDS)
    ]
    estimates = np.array([r.estimate for r in results])
    assert all(r.num_matvecs == 12 and not r.exact for r in results)
    assert abs(estimates.mean() - truth) <= 3 * estimates.std(ddof=1) / np.sqrt(NUM_SEEDS)
    # One matvec per probe: at equal budget, twice XTrace's probes, and a smaller spread on a
    # PSD decaying spectrum (the paper's motivating case).
    others = np.array(
        [xtrace(psd_decaying_matrix, 12, probe=probe, seed=s).estimate for s in range(NUM_SEEDS)]
    )
    assert estimates.std() < others.std()
    errors = np.array([r.standard_error for r in results])
    # The jackknife standard error: conservative (Efron-Stein), and of the right order.
    assert 0.8 < np.sqrt(np.mean(errors**2)) / estimates.std() < 4


def test_xnystrace_exact_when_rank_below_budget(make_spectrum_matrix):
    from curvops.algorithms import xnystrace

    values = np.r_[np.arange(6, 0, -1.0), np.zeros(DIM - 6)]
    matrix = make_spectrum_matrix(values, seed=22)[0]
    result = xnystrace(matrix, 10, seed=0, assume_psd=True)
    # Every leave-one-out sketch spans the range: each t_i is the trace, up to the shift's rounding.
    assert abs(result.estimate - values.sum()) <= 1e-9 * values.sum()
    assert result.standard_error <= 1e-9 * values.sum()
    exact = xnystrace(matrix, DIM, seed=0, assume_psd=True)
    assert exact.exact
    assert abs(exact.estimate - values.sum()) <= 1e-12 * values.sum()


def test_xnystrace_refuses_operators_not_known_psd(indefinite_matrix):
    import torch
    from torch import nn

    from curvops import GGNOperator, HessianOperator
    from curvops.algorithms import xnystrace
    from curvops.operators.inverse import assume_psd

    with pytest.raises(ValueError, match="not known to be"):
        xnystrace(indefinite_matrix, 10, seed=0)  # a dense array carries no tag
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    hessian = HessianOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match="Hessian is indefinite"):
        xnystrace(hessian, 10, seed=0)
    ggn = GGNOperator(model, nn.CrossEntropyLoss(), data)
    dense = ggn.to_dense().numpy()
    estimate = xnystrace(ggn, 10, seed=0).estimate  # tagged PSD: accepted
    assert abs(estimate - np.trace(dense)) <= 0.5 * np.trace(dense)
    # Asserting PSD for an indefinite matrix is caught when Omega^T A Omega is not PD.
    with pytest.raises(ValueError, match="not positive"):
        xnystrace(assume_psd(-np.eye(DIM)), 10, seed=0)


@pytest.mark.parametrize("form", ["numpy", "scipy", "torch"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_trace_estimators_unbiased_on_nonsymmetric_matrix(name, form, operator_form):
    # curvlinops' test matrix (entries uniform on [0, 1)): the estimators hold for any square A.
    import torch

    matrix = torch.rand(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    estimates, _ = _runs(ESTIMATORS[name], operator_form(matrix, form), 10, "gaussian")
    assert abs(estimates.mean() - np.trace(matrix)) <= 3 * estimates.std(ddof=1) / np.sqrt(NUM_SEEDS)
