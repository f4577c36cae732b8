"""Correctness of lanczos and power_iteration against numpy.linalg.eigh on known spectra."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from curvops.algorithms import lanczos, power_iteration

DIM = 240
EPS = np.finfo(np.float64).eps
TOL = 1e-10


def _measured_drift_operand(matrix: np.ndarray):
    """``matrix`` on the torch path with passes over the basis deemed cheap, as on an accelerator
    (the vector layer's documented ``cheap_passes``): every stored row's drift is measured each
    step instead of estimated."""
    from curvops.algorithms.vectors import as_operand

    operand = as_operand(torch.tensor(matrix))
    operand.cheap_passes = True
    return operand


def _operator(matrix: np.ndarray, backend: str):
    """``matrix`` for the numpy path, the torch path, or the torch path with measured drift."""
    if backend == "numpy":
        return matrix
    if backend == "torch-measured":
        return _measured_drift_operand(matrix)
    return torch.tensor(matrix)


BACKENDS = ["torch", "numpy", "torch-measured"]


def _spectra() -> dict[str, tuple[np.ndarray, str, int, int]]:
    """name -> (eigenvalues, which, k, block_size)."""
    rng = np.random.default_rng(123)
    bulk = rng.uniform(-1.0, 2.0, DIM)
    return {
        "separated": (np.r_[10.0, 8.0, 6.0, 4.0, 3.0, bulk[5:]], "LA", 5, 1),
        "clustered": (np.r_[1.0, 1 - 1e-3, 1 - 2e-3, 1 - 3e-3, rng.uniform(-0.5, 0.9, DIM - 4)], "LA", 4, 1),
        "repeated": (np.r_[5.0, 5.0, 5.0, 4.0, rng.uniform(-3, 3, DIM - 4)], "LA", 4, 3),
        "indefinite_SA": (np.r_[-9.0, -8.0, -7.5, rng.uniform(-5, 5, DIM - 3)], "SA", 3, 1),
        "indefinite_LM": (np.r_[-9.0, 8.5, -7.5, rng.uniform(-5, 5, DIM - 3)], "LM", 3, 1),
        "indefinite_BE": (np.r_[-9.0, 8.5, -7.5, 7.0, rng.uniform(-5, 5, DIM - 4)], "BE", 4, 1),
        "ill_conditioned_psd": (np.logspace(0, -12, DIM), "LA", 5, 1),
        "low_rank": (np.r_[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, np.zeros(DIM - 6)], "LA", 8, 1),
    }


def _reference_order(eigenvalues: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the true eigenvalues lanczos should return, in its documented output order."""
    if which == "LA":
        return np.argsort(-eigenvalues, kind="stable")[:k]
    if which == "SA":
        return np.argsort(eigenvalues, kind="stable")[:k]
    if which == "LM":
        return np.argsort(-np.abs(eigenvalues), kind="stable")[:k]
    ascending = np.argsort(eigenvalues, kind="stable")
    chosen = np.r_[ascending[::-1][: (k + 1) // 2], ascending[: k // 2]]
    return chosen[np.argsort(-eigenvalues[chosen], kind="stable")]


def check_eigenpairs(matrix, result, tol, which, k):
    true_values, true_vectors = np.linalg.eigh(matrix)
    spectral_norm = np.abs(true_values).max()
    values = np.asarray(result.eigenvalues)
    vectors = np.asarray(result.eigenvectors)
    residuals = np.asarray(result.residual_norms)
    reference = true_values[_reference_order(true_values, which, k)]

    # Residuals are recomputed here from the returned pairs (not trusted from the result).
    explicit = np.linalg.norm(matrix @ vectors - vectors * values, axis=0)
    # The result's residuals and ours differ only by rounding in A @ Y (~ sqrt(D) eps ||A||).
    np.testing.assert_allclose(residuals, explicit, rtol=0, atol=100 * np.sqrt(DIM) * EPS * spectral_norm)
    assert np.all(
        explicit
        <= tol * result.spectral_norm_estimate * (1 + 1e-6) + 100 * np.sqrt(DIM) * EPS * spectral_norm
    )
    assert np.all(np.asarray(result.converged))

    # Eigenvalue error <= residual norm (symmetric Bauer-Fike), so with residual <= 1e-10 ||A||
    # every eigenvalue with |lambda| >= 1e-2 ||A|| is within 1e-8 relative; exact zeros (low rank)
    # (eigh returns them at rounding level ~ sqrt(D) eps ||A||) are within the residual bound.
    rounding = 100 * np.sqrt(DIM) * EPS * spectral_norm
    nonzero = np.abs(reference) > rounding
    np.testing.assert_allclose(values[nonzero], reference[nonzero], rtol=1e-8, atol=0)
    assert np.all(np.abs(values[~nonzero]) <= explicit[~nonzero] + 2 * rounding)

    # Eigenvectors: group the true spectrum into clusters (eigenvalues closer than 1e-6 ||A||);
    # Davis-Kahan: ||(I - U_C U_C^T) V_C||_2 <= ||R_C||_F / delta, delta = distance of the computed
    # values to the spectrum outside the cluster. For a simple eigenvalue this is the
    # "equal up to sign" check, for repeated eigenvalues the "same span" check.
    threshold = 1e-6 * spectral_norm
    for position in range(k):
        in_cluster = np.abs(true_values - reference[position]) <= threshold
        members = [p for p in range(k) if abs(reference[p] - reference[position]) <= threshold]
        if members[0] != position:
            continue
        outside = true_values[~in_cluster]
        delta = np.min(np.abs(outside[:, None] - values[members][None, :])) if outside.size else np.inf
        basis = true_vectors[:, in_cluster]
        block = vectors[:, members]
        leakage = np.linalg.norm(block - basis @ (basis.T @ block), 2)
        bound = (np.linalg.norm(explicit[members]) + 100 * np.sqrt(DIM) * EPS * spectral_norm) / delta
        assert leakage <= bound + 1e-12, (position, leakage, bound)
        if len(members) == 1 and in_cluster.sum() == 1:
            reference_vector = true_vectors[:, in_cluster][:, 0]
            sign = np.sign(reference_vector @ block[:, 0])
            assert np.linalg.norm(block[:, 0] - sign * reference_vector) <= 2 * bound + 1e-12


@pytest.mark.parametrize("name", list(_spectra()))
def test_lanczos_matches_eigh(name, make_spectrum_matrix):
    eigenvalues, which, k, block_size = _spectra()[name]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=1)
    result = lanczos(matrix, k=k, which=which, tol=TOL, seed=0, block_size=block_size)
    check_eigenpairs(matrix, result, TOL, which, k)
    assert result.eigenvectors.shape == (DIM, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [2.0**-40, 1e-3, 300.0, 2.0**40])
def test_lanczos_is_unaffected_by_the_operator_scale(scale, backend, make_spectrum_matrix):
    """Hessians have norms far from 1 (top eigenvalues of 1e-3 to 1e3 are common). Lanczos keeps
    its new vectors unnormalized with a recorded scale, and stored norms change by about
    ``beta`` per step: they must not drift into over- or underflow over a run of many restarts."""
    rng = np.random.default_rng(31)
    values = np.r_[3.0, 2.9, 2.8, 2.7, 2.6, rng.uniform(-1.0, 2.5, DIM - 5)]
    matrix, _ = make_spectrum_matrix(values * scale, seed=31)
    result = lanczos(_operator(matrix, backend), k=5, tol=TOL, seed=0, max_basis_size=12)
    assert result.num_restarts >= 5
    check_eigenpairs(matrix, result, TOL, "LA", 5)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_float32_lanczos_is_unaffected_by_the_operator_scale(scale, make_spectrum_matrix):
    """As above in float32, whose exponent range is 8x narrower (vectors are renormalized once
    their stored norm leaves [2**-16, 2**16])."""
    rng = np.random.default_rng(9)
    values = np.r_[4.0, 3.9, 3.8, rng.uniform(-1.0, 3.6, DIM - 3)]
    matrix, _ = make_spectrum_matrix(values * scale, seed=9)
    result = lanczos(torch.tensor(matrix, dtype=torch.float32), k=3, seed=0, max_basis_size=8)
    assert bool(result.converged.all())
    assert result.num_restarts >= 4
    # Default tol = sqrt(eps32): eigenvalue error <= residual <= 3.5e-4 * ||A||.
    np.testing.assert_allclose(
        result.eigenvalues.numpy() / scale, [4.0, 3.9, 3.8], atol=np.sqrt(np.finfo(np.float32).eps) * 4 * 1.01
    )


def _check_loose(matrix, result, tol, which, k):
    """Explicit residuals within ``tol``, each eigenvalue within its residual of the true one
    (symmetric Bauer-Fike; the wanted eigenvalues are simple here) and unit eigenvectors to the
    documented orthogonality level ``min(sqrt(eps), tol / 100)`` (10x for the combination)."""
    true_values = np.linalg.eigvalsh(matrix)
    dim = matrix.shape[0]
    rounding = 100 * np.sqrt(dim) * EPS * np.abs(true_values).max()
    got, vectors = np.asarray(result.eigenvalues), np.asarray(result.eigenvectors)
    explicit = np.linalg.norm(matrix @ vectors - vectors * got, axis=0)
    assert np.all(np.asarray(result.converged))
    assert np.all(explicit <= tol * result.spectral_norm_estimate + rounding)
    reference = true_values[_reference_order(true_values, which, k)]
    assert np.all(np.abs(got - reference) <= explicit + rounding)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=10 * min(np.sqrt(EPS), tol / 100))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["SA", "BE"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_at_a_loose_tol_over_many_restarts(seed, which, backend, make_spectrum_matrix):
    """At tol = 1e-6 (orthogonality level 1e-8) a new vector's norm comes from formulas instead
    of a pass over it where their error allows. Wanted pairs at the edge of a dense bulk (SA, and
    BE's lower half) take 10-40 restarts: the norm errors must not compound over them (they did,
    by about (alpha^2 + beta^2) / beta_next^2 per step, into Ritz values far outside the
    spectrum)."""
    rng = np.random.default_rng(40 + seed)
    values = np.r_[0.98 ** np.arange(30), rng.uniform(-0.02, 0.5, DIM - 30)]
    matrix, _ = make_spectrum_matrix(values, seed=40 + seed)
    result = lanczos(_operator(matrix, backend), k=5, which=which, tol=1e-6, seed=0, max_basis_size=12)
    assert result.num_restarts >= 10
    _check_loose(matrix, result, 1e-6, which, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_estimate_counts_the_relation_errors_of_kept_ritz_vectors(backend, make_spectrum_matrix):
    """A kept Ritz vector's relation error (the Gram-Schmidt coefficients removed from the
    vectors it combines, about level * beta) lies partly in discarded directions, so it enters
    each new vector's drift as error / beta_next. Here (BE on a spectrum spread over eight
    decades) converged pairs of the top end meet steps with beta / ||A|| ~ 1e-4: left out of the
    estimate, the drift from them grew unseen (1e-5 per step) until the basis, and the returned
    pairs, were garbage while reported as converged."""
    rng = np.random.default_rng(557)
    values = 10.0 ** -rng.uniform(0, 8, 60) * 9.665518711239552e-4  # (as a random search drew it)
    matrix, _ = make_spectrum_matrix(values, seed=557)
    result = lanczos(_operator(matrix, backend), k=6, which="BE", tol=1e-6, seed=557, max_basis_size=31)
    _check_loose(matrix, result, 1e-6, "BE", 6)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_block_lanczos_on_a_low_rank_operator(which, backend, make_spectrum_matrix):
    """Block Lanczos (b = 3) on a rank-8 operator: the Krylov space becomes invariant within a
    few blocks. A column whose norm the Gram-Schmidt passes reduce to rounding lies in that
    space and is replaced by a fresh direction (ARPACK's rule: a second pass that again removes
    most of it); normalizing that rounding instead destroyed the basis' orthogonality, and the
    run ended with residuals of 1e150 reported as converged."""
    rng = np.random.default_rng(503)
    values = np.r_[rng.uniform(1.0, 5.0, 8), np.zeros(300 - 8)]
    matrix, _ = make_spectrum_matrix(values, seed=503)
    operator = torch.tensor(matrix) if backend == "torch" else matrix
    result = lanczos(operator, k=4, which=which, tol=1e-8, seed=503, max_basis_size=25, block_size=3)
    _check_loose(matrix, result, 1e-8, which, 4)


@pytest.mark.parametrize("name", list(_spectra()))
def test_measured_drift_matches_eigh(name, make_spectrum_matrix):
    """Where passes over the basis are cheap (accelerators) every row's drift is measured in the
    step's one read instead of estimated: the same answers."""
    eigenvalues, which, k, block_size = _spectra()[name]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=1)
    operator = _operator(matrix, "torch-measured")
    result = lanczos(operator, k=k, which=which, tol=TOL, seed=0, block_size=block_size)
    check_eigenpairs(matrix, result, TOL, which, k)


def test_lanczos_sa_finds_most_negative(make_spectrum_matrix):
    eigenvalues = np.r_[-50.0, -20.0, np.linspace(-1.0, 30.0, DIM - 2)]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=2)
    result = lanczos(matrix, k=2, which="SA", tol=TOL, seed=0)
    np.testing.assert_allclose(result.eigenvalues, [-50.0, -20.0], rtol=1e-8)


def test_block_lanczos_finds_multiplicity_single_vector_can_miss(make_spectrum_matrix):
    # A single-vector Krylov space holds one direction of the eigenvalue 5 (multiplicity 2); once
    # 5 and the isolated 4 converge the vector method stops with [5, 4] (as ARPACK does). A block
    # of size >= multiplicity spans both copies.
    rng = np.random.default_rng(7)
    eigenvalues = np.r_[5.0, 5.0, 4.0, rng.uniform(-3, 3, DIM - 3)]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=3)
    result = lanczos(matrix, k=2, tol=TOL, seed=0, block_size=2)
    check_eigenpairs(matrix, result, TOL, "LA", 2)


def test_thick_restart_bounded_basis(make_spectrum_matrix):
    rng = np.random.default_rng(5)
    eigenvalues = np.r_[3.0, 2.9, 2.8, 2.7, rng.uniform(-2.5, 2.5, DIM - 4)]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=4)
    result = lanczos(matrix, k=4, tol=TOL, seed=0, max_basis_size=10)
    assert result.num_restarts > 0
    check_eigenpairs(matrix, result, TOL, "LA", 4)


def test_looser_tol_stops_earlier_with_residuals_below_tol(make_spectrum_matrix):
    rng = np.random.default_rng(6)
    matrix, _ = make_spectrum_matrix(np.r_[2.0, 1.9, rng.uniform(-1.8, 1.8, DIM - 2)], seed=5)
    loose = lanczos(matrix, k=2, tol=1e-4, seed=0)
    tight = lanczos(matrix, k=2, tol=1e-10, seed=0)
    assert loose.num_matvecs < tight.num_matvecs
    assert np.all(np.asarray(loose.residual_norms) <= 1e-4 * loose.spectral_norm_estimate)


def test_residual_estimates_match_explicit(make_spectrum_matrix):
    matrix, _ = make_spectrum_matrix(np.linspace(-1, 3, DIM), seed=6)
    explicit = lanczos(matrix, k=3, tol=1e-9, seed=0)
    estimated = lanczos(matrix, k=3, tol=1e-9, seed=0, exact_residuals=False)
    assert estimated.num_matvecs == explicit.num_matvecs - 3
    # Under full reorthogonalization the Lanczos relation holds to O(sqrt(m) eps ||A||).
    np.testing.assert_allclose(estimated.residual_norms, explicit.residual_norms, atol=1e-12 * 3)


def test_final_residuals_use_one_block_product(make_spectrum_matrix, torch_native_class):
    matrix, _ = make_spectrum_matrix(np.linspace(-1, 3, DIM), seed=7)
    operator = torch_native_class(matrix)
    lanczos(operator, k=4, tol=1e-8, seed=0, block_size=2)
    assert operator.calls[-1] == (DIM, 4)
    assert set(operator.calls[:-1]) == {(DIM, 2)}


def test_max_iter_exhausted_warns(make_spectrum_matrix):
    matrix, _ = make_spectrum_matrix(np.linspace(-1, 1, DIM), seed=8)
    with pytest.warns(RuntimeWarning, match="converged"):
        result = lanczos(matrix, k=3, tol=1e-12, max_iter=25, seed=0)
    assert result.num_matvecs == 25 + 3
    assert not np.all(result.converged)


def test_float32_torch_converges_to_default_tol(make_spectrum_matrix):
    matrix, _ = make_spectrum_matrix(np.r_[4.0, 3.0, 2.0, np.linspace(-1, 1, DIM - 3)], seed=9)
    result = lanczos(torch.tensor(matrix, dtype=torch.float32), k=3, seed=0)
    assert result.eigenvalues.dtype == torch.float32
    assert bool(result.converged.all())
    # Default tol = sqrt(eps32) ~ 3.5e-4: eigenvalue error <= residual <= 3.5e-4 * 4.
    np.testing.assert_allclose(
        result.eigenvalues.numpy(), [4.0, 3.0, 2.0], atol=np.sqrt(np.finfo(np.float32).eps) * 4 * 1.01
    )


@pytest.mark.parametrize("which_values", [np.r_[10.0, 5.0, 2.5], np.r_[-10.0, 5.0, -2.5]])
def test_power_iteration_with_deflation(which_values, make_spectrum_matrix):
    rng = np.random.default_rng(10)
    eigenvalues = np.r_[which_values, rng.uniform(-1, 1, DIM - 3)]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=10)
    result = power_iteration(matrix, k=3, tol=1e-10, seed=0)
    expected = which_values[np.argsort(-np.abs(which_values))]
    # Eigenvalue error <= residual <= 1e-10 * 10, i.e. <= 1e-9 relative for |lambda| >= 1.
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-8)
    explicit = np.linalg.norm(matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues, axis=0)
    np.testing.assert_allclose(result.residual_norms, explicit, atol=1e-12)
    assert np.all(explicit <= 1e-10 * 10 * (1 + 1e-6))
    assert np.all(result.converged)


def test_power_iteration_nonconvergence_warns(make_spectrum_matrix):
    matrix, _ = make_spectrum_matrix(np.r_[1.0, -1.0, np.linspace(-0.5, 0.5, DIM - 2)], seed=11)
    with pytest.warns(RuntimeWarning):
        result = power_iteration(matrix, k=1, max_iter=50, seed=0)
    assert result.num_matvecs == 50


class _ContiguousColumnOperator:
    """A torch-native user operator whose products are fresh contiguous ``(D, b)`` tensors:
    for b = 1 their transpose has strides (1, 1), which cuBLAS rejects as an in-place target."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.torch_dtype = matrix.dtype
        self.device = matrix.device

    def matmat_torch(self, block: torch.Tensor) -> torch.Tensor:
        return (self.matrix @ block).contiguous()


def _lanczos_on(device: str, block_size: int):
    rng = np.random.default_rng(12)
    values = np.r_[6.0, 5.0, 4.5, 4.0, rng.uniform(-3, 3, DIM - 4)]
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    matrix = torch.tensor((q * values) @ q.T, device=device)
    result = lanczos(_ContiguousColumnOperator(matrix), k=4, tol=1e-10, seed=0, block_size=block_size)
    return result, np.sort(values)[::-1][:4]


@pytest.mark.parametrize("block_size", [1, 2])
def test_products_are_row_stacks_with_standard_strides(block_size):
    from curvops.algorithms.vectors import as_operand

    operand = as_operand(_ContiguousColumnOperator(torch.eye(DIM, dtype=torch.float64)))
    rows = operand.matmat_rows(torch.ones(block_size, DIM, dtype=torch.float64))
    assert rows.shape == (block_size, DIM)
    assert rows.stride() == (DIM, 1)
    result, expected = _lanczos_on("cpu", block_size)
    np.testing.assert_allclose(result.eigenvalues.numpy(), expected, rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_on_cuda_with_contiguous_column_products(block_size):
    result, expected = _lanczos_on("cuda", block_size)
    assert result.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(result.eigenvalues.cpu().numpy(), expected, rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_on_cuda_writes_products_into_its_basis(block_size):
    """On CUDA the products land in basis rows through ``out=`` (a dense tensor's matmul and a
    HessianOperator accumulating there), and the residual is formed in place on those (1, D)
    and (2, D) row views (cuBLAS rejects some in-place layouts, see
    _torch_backend.TorchOperand._row_layout)."""
    from curvops import HessianOperator

    rng = np.random.default_rng(12)
    values = np.r_[6.0, 5.0, 4.5, 4.0, rng.uniform(-3, 3, DIM - 4)]
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    dense = lanczos(
        torch.tensor((q * values) @ q.T, device="cuda"), k=4, tol=1e-10, seed=0, block_size=block_size
    )
    np.testing.assert_allclose(dense.eigenvalues.cpu().numpy(), values[:4], rtol=1e-9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().cuda()
    data = [
        (torch.randn(16, 6, dtype=torch.float64, device="cuda"), torch.randint(0, 3, (16,), device="cuda"))
    ]
    hessian = HessianOperator(model, torch.nn.CrossEntropyLoss(), data)
    expected = np.sort(np.linalg.eigvalsh(hessian.to_dense().cpu().numpy()))[::-1][:4]
    result = lanczos(hessian, k=4, tol=1e-10, seed=0, block_size=block_size)
    assert result.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(
        result.eigenvalues.cpu().numpy(), expected, rtol=1e-8, atol=1e-10 * abs(expected[0])
    )


class _RecordingOperator:
    """A torch-native operator that takes ``out=`` and records every block and destination."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.torch_dtype = matrix.dtype
        self.device = matrix.device
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def matmat_torch(self, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((block.shape[1], out))
        return torch.matmul(self.matrix, block, out=out)


@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_writes_each_krylov_product_into_its_basis(block_size, make_spectrum_matrix):
    """Every Krylov step hands the operator a destination through ``out=``: rows of one basis
    (one storage), never a fresh tensor, ``block_size`` columns each; only the final residual
    block (``k`` columns, exact_residuals) is a fresh product. The answer matches eigh."""
    rng = np.random.default_rng(12)
    values = np.r_[6.0, 5.0, 4.5, 4.0, rng.uniform(-3, 3, DIM - 4)]
    matrix, _ = make_spectrum_matrix(values, seed=12)
    operator = _RecordingOperator(torch.tensor(matrix))
    result = lanczos(operator, k=4, tol=1e-10, seed=0, block_size=block_size)
    krylov, final = operator.calls[:-1], operator.calls[-1]
    assert final == (4, None)
    assert krylov
    assert all(width == block_size and out is not None for width, out in krylov)
    storages = {out.untyped_storage().data_ptr() for _, out in krylov}
    assert len(storages) == 1
    assert result.num_matvecs == sum(width for width, _ in operator.calls)
    check_eigenpairs(matrix, result, 1e-10, "LA", 4)


def test_partial_reorthogonalization_keeps_the_documented_level(make_spectrum_matrix):
    """Partial reorthogonalization (estimated or measured drift) over many restarts on a semicircle
    spectrum (top eigenvalues packed at the edge): the eigenvectors stay orthonormal to the
    documented level min(sqrt(eps), tol / 100) and the pairs match eigh. (How many passes over
    the basis it saves is measured in benchmarks/probe_lanczos_passes.py.)"""
    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    values = np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM))
    matrix, _ = make_spectrum_matrix(values, seed=13)
    for backend in ("torch", "numpy", "torch-measured"):
        for tol in (1e-6, 1e-10):
            result = lanczos(_operator(matrix, backend), k=5, tol=tol, seed=0, max_basis_size=12)
            assert result.num_restarts >= 3
            vectors = np.asarray(result.eigenvectors)
            assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), tol / 100)
            check_eigenpairs(matrix, result, tol, "LA", 5)


def test_locking_keeps_converged_outliers_exact(make_spectrum_matrix):
    """Four outliers converge (and are locked) long before the fifth pair, in a near-cluster,
    which needs many restarts: the locked pairs stay orthonormal to the others and every pair
    matches eigh."""
    rng = np.random.default_rng(14)
    values = np.r_[10.0, 9.0, 8.0, 7.0, 3.0, 2.995, rng.uniform(-1.0, 2.9, DIM - 6)]
    matrix, _ = make_spectrum_matrix(values, seed=14)
    result = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=0, max_basis_size=12)
    assert result.num_restarts >= 3
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), 1e-12)
    check_eigenpairs(matrix, result, 1e-10, "LA", 5)


def test_tridiagonal_check_equals_the_dense_eigensolver(monkeypatch, make_spectrum_matrix):
    """Single-vector Lanczos checks convergence (and restarts) with the tridiagonal eigensolver;
    where that reports a failure it falls back to the dense one. Both give the same run: equal
    matvec counts and restarts, eigenpairs equal to rounding."""
    import scipy.linalg.lapack

    matrix, _ = make_spectrum_matrix(np.r_[np.linspace(9.0, 5.0, 8), np.linspace(-3.0, 3.0, DIM - 8)], seed=6)
    original = scipy.linalg.lapack.dstev
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    def failing(diagonal, off, compute_v=1):
        return np.zeros(diagonal.size), np.zeros((diagonal.size, diagonal.size)), 1

    monkeypatch.setattr(scipy.linalg.lapack, "dstev", counting)
    tridiagonal = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=2, max_basis_size=12)
    assert calls[0] > tridiagonal.num_restarts > 2  # every step's check, and every restart
    monkeypatch.setattr(scipy.linalg.lapack, "dstev", failing)
    dense = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=2, max_basis_size=12)
    assert (dense.num_matvecs, dense.num_restarts) == (tridiagonal.num_matvecs, tridiagonal.num_restarts)
    np.testing.assert_allclose(
        dense.eigenvalues.numpy(), tridiagonal.eigenvalues.numpy(), rtol=0, atol=100 * EPS * 9
    )
    overlaps = np.abs(np.sum(dense.eigenvectors.numpy() * tridiagonal.eigenvectors.numpy(), axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)
    check_eigenpairs(matrix, tridiagonal, 1e-10, "LA", 5)


def _random_configuration(index: int):
    """A spectrum, scale and lanczos settings drawn from ``index`` (the random search that found
    the silent failures fixed in c16d072)."""
    rng = np.random.default_rng(1000 + index)
    dim = int(rng.choice([60, 150]))
    kind = str(rng.choice(["bulk_edge", "outliers", "decay", "goe", "cluster", "indefinite", "low_rank"]))
    if kind == "bulk_edge":
        values = np.r_[0.98 ** np.arange(dim // 8), rng.uniform(-0.02, 0.5, dim - dim // 8)]
    elif kind == "outliers":
        values = np.r_[10.0, 9.0, 8.0, 7.0, 3.0, 2.995, rng.uniform(-1.0, 2.9, dim - 6)]
    elif kind == "decay":
        values = 10.0 ** -rng.uniform(0, 8, dim)
    elif kind == "goe":
        gaussian = rng.standard_normal((dim, dim))
        values = np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * dim))
    elif kind == "cluster":
        values = np.r_[1 + 1e-7 * np.arange(6), rng.uniform(-1.0, 0.9, dim - 6)]
    elif kind == "indefinite":
        values = 3 * rng.standard_normal(dim)
    else:
        values = np.r_[rng.uniform(1.0, 5.0, 8), np.zeros(dim - 8)]
    k = int(rng.integers(1, 8))
    block_size = int(rng.choice([1, 1, 1, 2, 3]))
    settings = {
        "k": k,
        "which": str(rng.choice(["LA", "SA", "LM", "BE"])),
        "tol": float(rng.choice([1e-4, 1e-6, 1e-8, 1e-10])),
        "block_size": block_size,
        "max_basis_size": int(rng.integers(k + block_size + 1, min(dim, 3 * k + 20))),
        "seed": index,
    }
    return values * 10.0 ** rng.uniform(-6, 6), settings, str(rng.choice(["torch", "numpy"]))


def _check_random_configurations(indices: range, make_spectrum_matrix, measured: bool = False) -> None:
    """Every pair reported converged has an explicit residual within tol and an eigenvalue within
    that residual of the spectrum; a run that does not converge within max_iter warns (hard
    spectra: clusters at 1e-7, eight decades)."""
    for index in indices:
        values, settings, backend = _random_configuration(index)
        matrix, _ = make_spectrum_matrix(values, seed=index)
        if backend == "torch":
            operator = _measured_drift_operand(matrix) if measured else torch.tensor(matrix)
        else:
            operator = matrix
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = lanczos(operator, **settings)
        converged = np.asarray(result.converged)
        assert converged.all() or any("converged" in str(w.message) for w in caught), (index, settings)
        assert math.isfinite(result.spectral_norm_estimate), (index, settings)
        true_values = np.linalg.eigvalsh(matrix)
        rounding = 100 * np.sqrt(matrix.shape[0]) * EPS * np.abs(true_values).max()
        got, vectors = np.asarray(result.eigenvalues), np.asarray(result.eigenvectors)
        explicit = np.linalg.norm(matrix @ vectors - vectors * got, axis=0)
        within = explicit <= settings["tol"] * result.spectral_norm_estimate * (1 + 1e-6) + rounding
        assert np.all(within | ~converged), (index, settings, explicit / np.abs(true_values).max())
        distance = np.abs(got[:, None] - true_values[None, :]).min(axis=1)
        assert np.all((distance <= explicit + rounding) | ~converged), (index, settings)


def test_lanczos_random_configurations_sample(make_spectrum_matrix):
    """The first 8 random configurations of the slow tests below, with estimated and with measured
    drift: the default run keeps a sample of their coverage."""
    _check_random_configurations(range(8), make_spectrum_matrix)
    _check_random_configurations(range(8), make_spectrum_matrix, measured=True)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(4))
def test_lanczos_random_configurations_never_return_a_wrong_converged_pair(chunk, make_spectrum_matrix):
    """50 random configurations per chunk (spectra of seven kinds at scales 1e-6..1e6, every
    ``which``, tol 1e-4..1e-10, block sizes 1-3): see :func:`_check_random_configurations`."""
    _check_random_configurations(range(50 * chunk, 50 * chunk + 50), make_spectrum_matrix)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(2))
def test_lanczos_random_configurations_with_measured_drift(chunk, make_spectrum_matrix):
    """The random configurations above on the torch path with every row's drift measured."""
    _check_random_configurations(range(50 * chunk, 50 * chunk + 50), make_spectrum_matrix, measured=True)
