"""Calibration of the standard errors: ``estimate +- 2 standard_error`` covers the truth ~95% of the time.

Every randomized trace and diagonal estimator is run over many seeds on small dense matrices of
known trace and diagonal, with several spectral shapes (flat, decaying, a few large outliers,
indefinite). An honest standard error gives a two-sided 2-sigma coverage of about 95% (a
slightly conservative one more); the test asks for at least ``0.95 - 3 * sqrt(0.95 * 0.05 / n)``
over ``n`` seeds: three binomial standard deviations below the nominal rate, so a calibrated
estimator fails it with probability about 0.1%.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from curvops.algorithms import (
    DiagonalEstimate,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xnystrace,
    xtrace,
)

DIM = 100
BUDGET = 60
NUM_SEEDS = 400
NOMINAL = 0.95
#: Three binomial standard deviations of the coverage over NUM_SEEDS seeds below the nominal rate.
LOWEST_COVERAGE = NOMINAL - 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / NUM_SEEDS)


def _spectrum(shape: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if shape == "flat":
        return 1.0 + 0.1 * rng.uniform(size=DIM)
    if shape == "decaying":
        return 1.0 / np.arange(1, DIM + 1)
    if shape == "outliers":
        return np.r_[50.0, 30.0, 20.0, rng.uniform(0.0, 1.0, DIM - 3)]
    if shape == "indefinite":
        return np.r_[rng.uniform(-1.0, 3.0, DIM - 3), 8.0, 6.0, -4.0]
    raise ValueError(shape)


SHAPES = ("flat", "decaying", "outliers", "indefinite")
PSD_SHAPES = ("flat", "decaying", "outliers")


@pytest.fixture(scope="module")
def matrices(make_spectrum_matrix):
    return {shape: make_spectrum_matrix(_spectrum(shape), seed=11)[0] for shape in SHAPES}


def _coverage(estimates: np.ndarray, errors: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of (seed, entry) pairs with ``|estimate - truth| <= 2 standard_error``."""
    assert np.all(np.isfinite(errors))
    assert np.all(errors > 0)
    return float(np.mean(np.abs(estimates - truth) <= 2 * errors))


TRACE_ESTIMATORS = {
    "hutchinson": hutchinson_trace,
    "hutchpp": hutchpp_trace,
    "xtrace": xtrace,
    "xnystrace": lambda A, budget, seed: xnystrace(A, budget, seed=seed, assume_psd=True),
}


@pytest.mark.parametrize(
    "name, shape",
    [(name, shape) for name in TRACE_ESTIMATORS for shape in (PSD_SHAPES if name == "xnystrace" else SHAPES)],
)
def test_trace_two_standard_errors_cover_the_trace(name, shape, matrices):
    matrix = matrices[shape]
    results = [TRACE_ESTIMATORS[name](matrix, BUDGET, seed=seed) for seed in range(NUM_SEEDS)]
    estimates = np.array([r.estimate for r in results])
    errors = np.array([r.standard_error for r in results])
    coverage = _coverage(estimates, errors, np.trace(matrix))
    assert coverage >= LOWEST_COVERAGE, f"{name} on a {shape} spectrum: coverage {coverage:.3f}"


DIAGONAL_ESTIMATORS: dict[str, Callable[..., DiagonalEstimate]] = {
    "hutchinson_diagonal": hutchinson_diagonal,
    "xdiag": xdiag,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DIAGONAL_ESTIMATORS))
def test_diagonal_two_standard_errors_cover_each_entry(name, shape, matrices):
    # Per-entry coverage averaged over the D entries: entries of one run are dependent, so the
    # average is no more precise than one entry's coverage, and the same binomial bound holds.
    matrix = matrices[shape]
    results = [DIAGONAL_ESTIMATORS[name](matrix, BUDGET, seed=seed) for seed in range(NUM_SEEDS)]
    estimates = np.stack([np.asarray(r.estimate) for r in results])
    errors = np.stack([np.asarray(r.standard_error) for r in results])
    coverage = _coverage(estimates, errors, np.diag(matrix)[None, :])
    assert coverage >= LOWEST_COVERAGE, f"{name} on a {shape} spectrum: coverage {coverage:.3f}"
