"""Input forms (torch-native, scipy, numpy, torch), backends, reproducibility and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from curvops import algorithms as alg

DIM = 50
FORMS = ("numpy", "scipy", "torch", "torch_native")
TORCH_FORMS = ("torch", "torch_native")
ESTIMATORS = (
    alg.hutchinson_trace,
    alg.hutchpp_trace,
    alg.xtrace,
    alg.hutchinson_diagonal,
    alg.xdiag,
    alg.hutchinson_squared_frobenius,
)


@pytest.fixture(scope="module")
def matrix(make_spectrum_matrix):
    rng = np.random.default_rng(0)
    return make_spectrum_matrix(np.r_[6.0, 5.0, -4.0, rng.uniform(-2.0, 2.0, DIM - 3)], seed=0)[0]


@pytest.fixture(scope="module")
def start_vector():
    return np.random.default_rng(1).standard_normal(DIM)


def _is_torch(array) -> bool:
    return isinstance(array, torch.Tensor)


@pytest.mark.parametrize("form", FORMS)
def test_lanczos_same_across_forms(form, matrix, start_vector, operator_form, numpy_of):
    reference = alg.lanczos(matrix, k=3, which="LM", tol=1e-12, v0=start_vector)
    result = alg.lanczos(operator_form(matrix, form), k=3, which="LM", tol=1e-12, v0=start_vector)
    assert _is_torch(result.eigenvectors) == (form in TORCH_FORMS)
    assert _is_torch(result.eigenvalues) == (form in TORCH_FORMS)
    # Same start vector, same arithmetic up to rounding order: agreement to ~1e3 eps ||A||.
    np.testing.assert_allclose(numpy_of(result.eigenvalues), reference.eigenvalues, atol=1e-12)
    vectors = numpy_of(result.eigenvectors)
    signs = np.sign(np.sum(vectors * reference.eigenvectors, axis=0))
    np.testing.assert_allclose(vectors * signs, reference.eigenvectors, atol=1e-9)
    assert result.num_matvecs == reference.num_matvecs


@pytest.mark.parametrize("form", FORMS)
def test_power_iteration_same_across_forms(form, matrix, start_vector, operator_form, numpy_of):
    reference = alg.power_iteration(matrix, k=2, tol=1e-9, v0=start_vector)
    result = alg.power_iteration(operator_form(matrix, form), k=2, tol=1e-9, v0=torch.as_tensor(start_vector))
    np.testing.assert_allclose(numpy_of(result.eigenvalues), reference.eigenvalues, rtol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("function", ESTIMATORS, ids=lambda f: f.__name__)
def test_exact_estimates_same_across_forms(function, form, matrix, operator_form, numpy_of):
    reference = function(matrix, DIM, seed=0)
    result = function(operator_form(matrix, form), DIM, seed=0)
    np.testing.assert_allclose(
        numpy_of(result.estimate), numpy_of(reference.estimate), rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("function", ESTIMATORS, ids=lambda f: f.__name__)
def test_seeded_estimates_same_within_backend(function, matrix, operator_form, numpy_of):
    # Probes come from a numpy Generator (numpy path) or a torch Generator (torch path): the
    # same seed reproduces the result within a backend, whatever the operator's form.
    for forms in (("numpy", "scipy"), TORCH_FORMS):
        first, second = (function(operator_form(matrix, form), 20, seed=5) for form in forms)
        np.testing.assert_allclose(
            numpy_of(first.estimate), numpy_of(second.estimate), rtol=1e-12, atol=1e-12
        )
        assert first.num_matvecs == second.num_matvecs


@pytest.mark.parametrize("form", FORMS)
def test_spectral_density_same_across_forms(form, matrix, operator_form):
    reference = alg.spectral_density(matrix, num_probes=2, lanczos_steps=DIM, seed=0)
    result = alg.spectral_density(operator_form(matrix, form), num_probes=2, lanczos_steps=DIM, seed=0)
    # Full Krylov space: nodes are the eigenvalues whatever the probes.
    np.testing.assert_allclose(np.sort(result.nodes, axis=1), np.sort(reference.nodes, axis=1), atol=1e-12)
    seeded = alg.spectral_density(operator_form(matrix, form), num_probes=2, lanczos_steps=5, seed=3)
    again = alg.spectral_density(operator_form(matrix, form), num_probes=2, lanczos_steps=5, seed=3)
    np.testing.assert_array_equal(seeded.nodes, again.nodes)


def test_callable_with_dim_runs_in_numpy(matrix, start_vector):
    result = alg.lanczos(lambda v: matrix @ v, k=2, dim=DIM, tol=1e-12, v0=start_vector)
    reference = alg.lanczos(matrix, k=2, tol=1e-12, v0=start_vector)
    assert isinstance(result.eigenvectors, np.ndarray)
    np.testing.assert_allclose(result.eigenvalues, reference.eigenvalues, rtol=1e-12)
    estimate = alg.hutchinson_trace(lambda v: matrix @ v, DIM, dim=DIM)
    assert estimate.estimate == pytest.approx(np.trace(matrix), rel=1e-12)


def test_float32_torch_native_keeps_dtype(matrix, torch_native_class):
    operator = torch_native_class(matrix, dtype=torch.float32)
    result = alg.lanczos(operator, k=2, seed=0)
    assert result.eigenvectors.dtype == torch.float32
    diagonal = alg.hutchinson_diagonal(operator, 10, seed=0)
    assert diagonal.estimate.dtype == torch.float32
    assert diagonal.estimate.shape == (DIM,)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((3, 4)), ValueError),  # non-square
        (np.zeros(5), ValueError),  # not 2-D
        (torch.zeros(3, 4), ValueError),
        (np.zeros((3, 3), dtype=complex), TypeError),
        ("not an operator", TypeError),
    ],
)
def test_bad_operator(bad, error):
    with pytest.raises(error):
        alg.lanczos(bad, k=1)
    with pytest.raises(error):
        alg.hutchinson_trace(bad, 2)


def test_callable_without_dim(matrix):
    with pytest.raises(ValueError, match="dim"):
        alg.lanczos(lambda v: matrix @ v, k=2)
    with pytest.raises(ValueError, match="dim"):
        alg.spectral_density(lambda v: matrix @ v)
    with pytest.raises(ValueError, match="dim"):
        alg.lanczos(matrix, k=2, dim=DIM + 1)


@pytest.mark.parametrize("k", [DIM, DIM + 1, 0])
def test_lanczos_bad_k(k, matrix):
    with pytest.raises(ValueError, match="k"):
        alg.lanczos(matrix, k=k)


def test_power_iteration_k_limits(matrix):
    with pytest.raises(ValueError, match=rf"power_iteration needs k <= D \(got k={DIM + 1}, D={DIM}\)"):
        alg.power_iteration(matrix, k=DIM + 1)
    with pytest.raises(TypeError):
        alg.power_iteration(matrix, k=1.5)


@pytest.mark.parametrize("which", ["XX", "la", None])
def test_lanczos_bad_which(which, matrix):
    with pytest.raises(ValueError, match="which"):
        alg.lanczos(matrix, k=2, which=which)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"tol": 0.0},
            r"tol is a relative residual tolerance .* must lie in \(0, 1\), e\.g\. 1e-6; got 0\.0",
        ),
        (
            {"tol": -1.0},
            r"tol is a relative residual tolerance .* must lie in \(0, 1\), e\.g\. 1e-6; got -1\.0",
        ),
        # k=3 with the default block_size=1: the basis must hold k + block_size = 4 vectors.
        ({"max_basis_size": 2}, "max_basis_size must be >= 4, got 2"),
        ({"max_basis_size": DIM + 1}, f"max_basis_size must be <= D={DIM}, got {DIM + 1}"),
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
    ],
)
def test_lanczos_bad_options(kwargs, message, matrix):
    with pytest.raises(ValueError, match=message):
        alg.lanczos(matrix, k=3, **kwargs)


@pytest.mark.parametrize("function", ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("budget", [0, -3])
def test_budget_below_one(function, budget, matrix):
    with pytest.raises(ValueError, match="budget"):
        function(matrix, budget)


@pytest.mark.parametrize("function", ESTIMATORS, ids=lambda f: f.__name__)
def test_bad_probe_and_budget_type(function, matrix):
    with pytest.raises(ValueError, match="probe"):
        function(matrix, 4, probe="uniform")
    with pytest.raises(TypeError, match="budget"):
        function(matrix, 4.0)


def test_exchangeable_estimators_need_two_matvecs(matrix):
    for function in (alg.xtrace, alg.xdiag):
        with pytest.raises(ValueError, match="budget >= 2"):
            function(matrix, 1)


@pytest.mark.parametrize(
    "v0", [np.ones(DIM - 1), np.ones((DIM, 2)), torch.ones(DIM + 1), np.zeros(DIM), np.full(DIM, np.nan)]
)
def test_bad_v0(v0, matrix):
    with pytest.raises(ValueError, match="v0"):
        alg.lanczos(matrix, k=2, v0=v0)
    with pytest.raises(ValueError, match="v0"):
        alg.power_iteration(matrix, k=1, v0=v0)


def test_spectral_density_bad_sizes(matrix):
    with pytest.raises(ValueError, match="num_probes"):
        alg.spectral_density(matrix, num_probes=0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        alg.spectral_density(matrix, lanczos_steps=0)


@pytest.mark.parametrize("form", FORMS)
def test_non_finite_operator_output(form, matrix, operator_form):
    broken = matrix.copy()
    broken[3, 3] = np.nan
    operator = operator_form(broken, form)
    for call in (
        lambda: alg.lanczos(operator, k=2),
        lambda: alg.power_iteration(operator, k=1),
        lambda: alg.hutchinson_trace(operator, 4),
        lambda: alg.xdiag(operator, 4),
        lambda: alg.spectral_density(operator, num_probes=2, lanczos_steps=3),
    ):
        with pytest.raises(FloatingPointError, match="NaN/Inf"):
            call()


def test_callable_wrong_output_size(matrix):
    with pytest.raises(ValueError, match="shape"):
        alg.hutchinson_trace(lambda v: np.ones(DIM + 1), 3, dim=DIM)


def test_result_dataclasses_are_frozen(matrix):
    result = alg.hutchinson_trace(matrix, 3, seed=0)
    with pytest.raises(AttributeError):
        result.estimate = 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lanczos_non_finite_product_mid_run(bad, block_size, backend, matrix):
    """Lanczos checks its products through alpha = v^T A v instead of a separate pass: a
    product that turns NaN/Inf in one entry at a later step still raises the clear error."""
    calls = [0]

    def apply(vector):
        calls[0] += 1
        out = matrix @ np.asarray(vector)
        if calls[0] >= 7:
            out = out.copy()
            out[11] = bad
        return torch.as_tensor(out) if backend == "torch" else out

    if backend == "torch":

        class Native:
            shape = (DIM, DIM)
            torch_dtype = torch.float64
            device = torch.device("cpu")

            def matmat_torch(self, block):
                return torch.stack([apply(block[:, i].numpy()) for i in range(block.shape[1])], 1)

        operator = Native()
    else:
        operator = scipy.sparse.linalg.LinearOperator((DIM, DIM), matvec=apply, dtype=np.float64)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        alg.lanczos(operator, k=3, block_size=block_size, seed=0, tol=1e-12)
    assert calls[0] >= 7


def test_lanczos_overflowing_alpha_is_reported(matrix):
    """A finite product whose v^T A v overflows is not called a NaN/Inf product."""
    # Entries near the float64 maximum: finite, but their sum over D = 50 entries is not.
    with pytest.raises(FloatingPointError, match="overflowed"):
        alg.lanczos(lambda v: 1.5e308 * np.sign(v), k=2, seed=0, dim=DIM)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_lanczos_non_finite_final_residual_product(bad, matrix):
    """The final (D, k) product of the explicit residuals is checked through the residual norms
    (no separate pass): NaN/Inf there still raises the clear error."""

    class Native:
        shape = (DIM, DIM)
        torch_dtype = torch.float64
        device = torch.device("cpu")

        def matmat_torch(self, block):
            out = torch.as_tensor(matrix) @ block
            if block.shape[1] == 3:  # only the final residual block has k = 3 columns
                out[5, 1] = bad
            return out

    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        alg.lanczos(Native(), k=3, seed=0, tol=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_lanczos_non_finite_product_written_into_out(bad, matrix):
    """A torch-native operator that writes its product into the basis row Lanczos hands it
    (``out=``) skips the operand's own checks (the buffer is Lanczos'); NaN/Inf written there
    mid-run still raises the clear error, through the step's inner products."""

    class Native:
        shape = (DIM, DIM)
        torch_dtype = torch.float64
        device = torch.device("cpu")
        calls = 0

        def matmat_torch(self, block, out=None):
            Native.calls += 1
            result = torch.matmul(torch.as_tensor(matrix), block, out=out)
            if Native.calls >= 6:
                result[7, 0] = bad
            return result

    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        alg.lanczos(Native(), k=3, seed=0, tol=1e-12)
    assert Native.calls >= 6
