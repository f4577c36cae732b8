"""lanczos and power_iteration answer right or refuse clearly (issue 26): block sizes whose
Krylov space fills the whole space, tolerances without meaning, operators of extreme norm.

Every check is against numpy.linalg.eigh of the same matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from curvops.algorithms import lanczos, power_iteration
from tests.algorithms.test_alg_eigen import _reference_order

EPS = np.finfo(np.float64).eps
WHICH = ("LA", "SA", "LM", "BE")


def _check_result(matrix, result, tol, which, k, scale=1.0, estimates=False):
    """Every pair reported converged is right; returns the flags.

    ``matrix`` is the operator divided by ``scale`` (so that this check's own arithmetic neither
    over- nor underflows). A converged pair's explicit residual is within ``tol`` times the
    reported norm estimate, plus the rounding of this check's product (``100 sqrt(D) eps
    ||A||``, a safety factor on the summation bound); with ``estimates`` (residuals not computed
    explicitly) 1% more, the estimates' documented accuracy at the kept orthogonality level
    ``tol / 100``. Its eigenvalue is within that residual (plus rounding) of the wanted true
    one (symmetric Bauer-Fike; the spectra here have no repeated eigenvalues, and unit vectors).
    """
    true_values = np.linalg.eigvalsh(matrix)
    norm = np.abs(true_values).max()
    rounding = 100 * np.sqrt(matrix.shape[0]) * EPS * norm
    values = np.asarray(result.eigenvalues, dtype=np.float64) / scale
    vectors = np.asarray(result.eigenvectors, dtype=np.float64)
    converged = np.asarray(result.converged)
    assert values.shape == (k,)
    assert vectors.shape == (matrix.shape[0], k)
    assert converged.shape == (k,)
    explicit = np.linalg.norm(matrix @ vectors - vectors * values, axis=0)
    allowed = tol * result.spectral_norm_estimate / scale * (1.01 if estimates else 1 + 1e-6) + rounding
    assert np.all((explicit <= allowed) | ~converged), (explicit / norm, converged)
    reference = true_values[_reference_order(true_values, which, k)]
    assert np.all((np.abs(values - reference) <= explicit + rounding) | ~converged), (values, reference)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=10 * min(np.sqrt(EPS), tol / 100))
    return converged


def _spectrum(size: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues of distinct magnitudes (gaps >= 0.4, no ties for LM) and random signs."""
    magnitudes = np.arange(size) + 0.5 + 0.3 * rng.random(size)
    return rng.permutation(magnitudes) * rng.choice([-1.0, 1.0], size)


def _matrix(values: np.ndarray, rng: np.random.Generator, diagonal: bool) -> np.ndarray:
    if diagonal:  # the case of the issue: a diagonal matrix, exactly invariant coordinate subspaces
        return np.diag(values)
    q, _ = np.linalg.qr(rng.standard_normal((values.size, values.size)))
    matrix = (q * values) @ q.T
    return (matrix + matrix.T) / 2


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_every_block_size_finds_the_top_of_diag_1_to_10(backend):
    """Block sizes whose Krylov space fills the space (b * steps near D): no basis row may lie
    past the D available directions (normalized rounding noise there gives Ritz values of
    order 1e153, and a norm estimate that calls them converged). The answer is 10 and 9, to
    the default tol."""
    values = np.arange(1.0, 11.0)
    matrix = np.diag(values)
    operator = torch.tensor(matrix) if backend == "torch" else matrix
    for block_size in range(1, 9):  # k + block_size <= D = 10
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converged: no warning
            result = lanczos(operator, k=2, block_size=block_size, seed=0)
        converged = _check_result(matrix, result, np.sqrt(EPS), "LA", 2)
        assert converged.all(), block_size
        # Eigenvalue error <= residual <= sqrt(eps) * 10.
        np.testing.assert_allclose(
            np.asarray(result.eigenvalues), [10.0, 9.0], rtol=0, atol=np.sqrt(EPS) * 10
        )


@pytest.mark.parametrize("size", [30, 41])
def test_block_lanczos_with_a_basis_as_large_as_the_space(size):
    """max_basis_size = D with block_size > 1: a cycle's basis and residual block would need
    more than D orthonormal vectors, so the basis must leave room for the residual block."""
    rng = np.random.default_rng(size)
    matrix = _matrix(_spectrum(size, rng), rng, diagonal=False)
    for block_size in range(2, 9):
        for which in WHICH:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # converged: no warning
                result = lanczos(
                    matrix,
                    k=3,
                    which=which,
                    block_size=block_size,
                    max_basis_size=size,
                    seed=block_size,
                    tol=1e-10,
                )
            assert _check_result(matrix, result, 1e-10, which, 3).all(), (block_size, which)


def test_block_size_beyond_d_minus_k_is_refused_with_the_fix():
    matrix = np.diag(np.arange(1.0, 11.0))
    with pytest.raises(ValueError, match=r"k \+ block_size <= D.*block_size <= 8"):
        lanczos(matrix, k=2, block_size=9)


@pytest.mark.parametrize("tol", [1.0, 10.0, np.inf, np.nan, 0.0, -1e-3])
def test_tol_outside_the_unit_interval_is_refused(tol):
    """tol is a relative residual tolerance: at tol >= 1 every unit vector with its Rayleigh
    quotient meets it (tol=10 calls 9.19 and 6.74 the top of diag(1..10)), so it is refused
    with the valid range, as are NaN, 0 and negative values."""
    matrix = np.diag(np.arange(1.0, 11.0))
    with pytest.raises(ValueError, match=r"tol .*relative residual tolerance.*\(0, 1\)"):
        lanczos(matrix, k=2, tol=tol, seed=0)
    with pytest.raises(ValueError, match=r"tol .*relative residual tolerance.*\(0, 1\)"):
        power_iteration(matrix, k=2, tol=tol, seed=0)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_operators_of_extreme_norm(scale, backend):
    """At norm 1e200 squared norms overflow (1e400), at 1e-200 they underflow to 0 and read as
    breakdowns (wrong pairs called converged; power_iteration's 0.0 at 1e200). Both methods are
    scale-free: the same pairs as at norm 1, to tol."""
    rng = np.random.default_rng(5)
    base = _matrix(_spectrum(40, rng), rng, diagonal=False)
    operator = torch.tensor(base * scale) if backend == "torch" else base * scale
    tol = 1e-10
    for block_size in (1, 2):
        result = lanczos(operator, k=3, which="LM", tol=tol, block_size=block_size, seed=0)
        assert _check_result(base, result, tol, "LM", 3, scale=scale).all()
    result = power_iteration(operator, k=2, tol=1e-6, seed=0, max_iter=5000)
    assert _check_result(base, result, 1e-6, "LM", 2, scale=scale).all()


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_start_vectors_of_extreme_scale(scale):
    """The start vector's scale does not matter: entries of 1e-200 square to 0 (not a zero
    vector), and a norm of 1e200 squared is infinite (dividing by it is no normalization).
    Started at an eigenvector, power iteration is done after one product; lanczos from a scaled
    v0 gives the pairs it gives from v0 itself."""
    rng = np.random.default_rng(6)
    values = _spectrum(30, rng)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    matrix = (q * values) @ q.T
    top = int(np.argmax(np.abs(values)))
    result = power_iteration(matrix, k=1, tol=1e-8, v0=q[:, top] * scale, seed=0)
    assert result.num_matvecs == 1
    assert _check_result(matrix, result, 1e-8, "LM", 1).all()
    v0 = rng.standard_normal(30)
    result = lanczos(matrix, k=2, tol=1e-10, v0=v0 * scale, seed=0)
    assert _check_result(matrix, result, 1e-10, "LA", 2).all()
    unscaled = lanczos(matrix, k=2, tol=1e-10, v0=v0, seed=0)
    # Both converged to 1e-10 ||A||: the eigenvalues agree to twice that.
    np.testing.assert_allclose(
        result.eigenvalues, unscaled.eigenvalues, rtol=0, atol=2e-10 * np.abs(values).max()
    )


@pytest.mark.slow
def test_small_spaces_never_report_a_wrong_converged_pair():
    """Every block size 1..D, k = 1..min(D - 1, 4), every ``which``, torch and numpy, D = 2..12:
    a pair reported converged is right (residual and eigenvalue, against eigh), a run with an
    unconverged pair warns, and block sizes with k + block_size > D are refused. Tolerances
    1e-4..1e-12 and the residual estimates (exact_residuals=False) alternate over the runs."""
    tolerances = (1e-4, 1e-8, 1e-12)
    run = 0
    for size in range(2, 13):
        rng = np.random.default_rng(size)
        values = _spectrum(size, rng)
        matrix = _matrix(values, rng, diagonal=size % 2 == 0)
        for block_size in range(1, size + 1):
            for k in range(1, min(size - 1, 4) + 1):
                for which in WHICH:
                    for backend in ("torch", "numpy"):
                        run += 1
                        operator = torch.tensor(matrix) if backend == "torch" else matrix
                        settings = {
                            "k": k,
                            "which": which,
                            "block_size": block_size,
                            "seed": run,
                            "tol": tolerances[run % 3],
                            "exact_residuals": run % 5 != 0,
                        }
                        if k + block_size > size:
                            with pytest.raises(ValueError, match="block_size"):
                                lanczos(operator, **settings)
                            continue
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            result = lanczos(operator, **settings)
                        converged = _check_result(
                            matrix,
                            result,
                            settings["tol"],
                            which,
                            k,
                            estimates=not settings["exact_residuals"],
                        )
                        warned = any("converged" in str(w.message) for w in caught)
                        assert converged.all() or warned, settings
