"""Stochastic Lanczos quadrature: nodes, moments, Wasserstein accuracy, evaluation and export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse.linalg
import scipy.stats

from curvops.algorithms import SpectralDensity, spectral_density

EPS = np.finfo(np.float64).eps


def test_full_steps_nodes_are_eigenvalues(make_spectrum_matrix):
    eigenvalues = np.linspace(-2.0, 5.0, 40) ** 3 / 25
    matrix = make_spectrum_matrix(eigenvalues, seed=0)[0]
    result = spectral_density(matrix, num_probes=3, lanczos_steps=60, seed=0)
    assert result.nodes.shape == (3, 40)  # steps capped at D
    scale = np.abs(eigenvalues).max()
    for nodes, weights in zip(result.nodes, result.weights):
        # Full Krylov space: T is similar to A; eigenvalues agree to O(sqrt(D) eps ||A||).
        np.testing.assert_allclose(np.sort(nodes), np.sort(eigenvalues), atol=100 * np.sqrt(40) * EPS * scale)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_quadrature_moments_exact_per_probe(make_spectrum_matrix):
    # Gauss quadrature with m nodes integrates polynomials of degree <= 2m - 1 exactly:
    # sum_j w_j theta_j^p = u^T A^p u for the normalized probe u (recorded from the first product).
    matrix = make_spectrum_matrix(np.linspace(-1.0, 1.0, 120), seed=1)[0]
    seen = []

    def record(block):
        seen.append(block.copy())
        return matrix @ block

    operator = scipy.sparse.linalg.LinearOperator(
        matrix.shape, matvec=lambda v: matrix @ v, matmat=record, dtype=float
    )
    steps = 6
    result = spectral_density(operator, num_probes=4, lanczos_steps=steps, seed=1)
    probes = seen[0]
    np.testing.assert_allclose(np.linalg.norm(probes, axis=0), 1.0, atol=1e-14)
    power = np.eye(120)
    for order in range(2 * steps):
        expected = np.einsum("ip,ij,jp->p", probes, power, probes)
        # Entries of A^p are <= 1 in magnitude here; rounding in the recurrence ~ m eps.
        np.testing.assert_allclose(result.probe_moments(order), expected, atol=1e-12)
        power = power @ matrix


def test_moments_match_normalized_traces(make_spectrum_matrix):
    rng = np.random.default_rng(2)
    eigenvalues = np.r_[rng.uniform(-0.5, 1.0, 97), 4.0, 3.0, -2.0]
    matrix = make_spectrum_matrix(eigenvalues, seed=2)[0]
    result = spectral_density(matrix, num_probes=200, lanczos_steps=5, seed=0)
    for order in range(1, 5):
        estimate, error = result.moment(order)
        truth = np.mean(eigenvalues**order)
        # Each probe moment is unbiased for tr(A^p)/D; mean over 200 probes within 3.5 standard
        # errors (3 sigma with a Bonferroni correction over the 4 moments tested).
        assert abs(estimate - truth) <= 3.5 * error


def _wasserstein(result, eigenvalues):
    return scipy.stats.wasserstein_distance(result.nodes.ravel(), eigenvalues, result.weights.ravel())


def test_wasserstein_small_and_shrinks_with_probes(make_spectrum_matrix):
    size, steps = 300, 30
    rng = np.random.default_rng(3)
    eigenvalues = np.r_[rng.standard_normal(size - 5) * 0.3, 10.0, 8.0, 6.0, 5.0, -3.0]
    matrix = make_spectrum_matrix(eigenvalues, seed=3)[0]
    width = eigenvalues.max() - eigenvalues.min()
    few = np.mean([_wasserstein(spectral_density(matrix, 2, steps, seed=s), eigenvalues) for s in range(5)])
    many = np.mean([_wasserstein(spectral_density(matrix, 40, steps, seed=s), eigenvalues) for s in range(5)])
    # Bound: m-node Gauss quadrature is exact to degree 2m - 1, so by Jackson's theorem each
    # probe's rule is within pi L / (4 m) of its weighted spectral measure in W1; averaging P
    # probes leaves a CDF error with standard deviation <= sqrt(2 F (1 - F) / (P D)) <=
    # sqrt(1 / (2 P D)) per point, i.e. W1 <= L sqrt(1 / (2 P D)) in expectation; 4x that as
    # the statistical margin.
    bound = np.pi * width / (4 * steps) + 4 * width * np.sqrt(1 / (2 * 40 * size))
    assert many <= bound
    # The sampling part shrinks like 1/sqrt(P): 20x more probes -> ~4.5x smaller; require 2x.
    assert many < few / 2


def test_evaluate_density_band_and_log(make_spectrum_matrix):
    eigenvalues = np.linspace(0.0, 2.0, 50)
    matrix = make_spectrum_matrix(eigenvalues, seed=4)[0]
    result = spectral_density(matrix, num_probes=6, lanczos_steps=12, seed=0)
    assert result.default_sigma() == pytest.approx(0.01 * np.ptp(result.nodes[result.weights > 0]))
    curve = result.evaluate(num_points=2000)
    # Grid covers +-5 sigma beyond the nodes: missing Gaussian mass ~6e-7; trapezoid error
    # with sigma / spacing ~ 10 points per sigma is far below 1e-4.
    assert np.trapezoid(curve.density, curve.grid) == pytest.approx(1.0, abs=1e-4)
    assert curve.per_probe.shape == (6, 2000)
    np.testing.assert_allclose(curve.density, curve.per_probe.mean(0))
    assert np.all(curve.lower <= curve.density)
    assert np.all(curve.density <= curve.upper)
    logged = result.evaluate(num_points=2000, log_scale=True)
    floor = 1e-12 * curve.density.max()
    np.testing.assert_allclose(logged.density, np.log10(np.maximum(curve.density, floor)))
    with pytest.raises(ValueError, match="sigma must be positive, got 0.0"):
        result.evaluate(sigma=0.0)


def test_json_round_trip(tmp_path, make_spectrum_matrix):
    matrix = make_spectrum_matrix(np.linspace(-1.0, 1.0, 30), seed=5)[0]
    result = spectral_density(matrix, num_probes=3, lanczos_steps=8, seed=7)
    path = tmp_path / "slq.json"
    text = result.to_json(str(path))
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert data["seed"] == 7
    assert data["dim"] == 30
    restored = SpectralDensity.from_json(text)
    np.testing.assert_array_equal(restored.nodes, result.nodes)
    np.testing.assert_array_equal(restored.weights, result.weights)
    assert restored.num_matvecs == result.num_matvecs == 24
    with pytest.raises(
        ValueError, match=r"not a curvops\.spectral_density/1 record \(format='something else'\)"
    ):
        SpectralDensity.from_dict({"format": "something else"})


def test_plot_draws_density_and_band(make_spectrum_matrix):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    matrix = make_spectrum_matrix(np.r_[np.linspace(0.0, 1.0, 37), 5.0, 8.0, 9.0], seed=6)[0]
    result = spectral_density(matrix, num_probes=4, lanczos_steps=10, seed=0)
    ax = result.plot(label="A")
    assert len(ax.lines) == 1
    assert ax.get_yscale() == "log"
    assert len(ax.collections) == 1
    ax = result.plot(log_scale=False, band=False)
    assert ax.get_yscale() == "linear"
    assert len(ax.collections) == 0
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.slow
def test_import_does_not_import_matplotlib():
    code = "import sys, curvops.algorithms; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invariant_krylov_space_stops_early():
    # Diagonal with 3 distinct values: every Krylov space has dimension <= 3, so each probe
    # breaks down after 3 steps; its remaining slots carry zero weight.
    matrix = np.diag(np.repeat([1.0, 2.0, 3.0], 10))
    result = spectral_density(matrix, num_probes=2, lanczos_steps=10, seed=0)
    assert result.num_matvecs == 2 * 3
    for nodes, weights in zip(result.nodes, result.weights):
        np.testing.assert_allclose(np.sort(nodes[:3]), [1.0, 2.0, 3.0], atol=1e-12)
        np.testing.assert_allclose(weights[3:], 0.0)
        assert weights.sum() == pytest.approx(1.0)
