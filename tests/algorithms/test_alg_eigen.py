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


def _measure_drift_on_the_cpu(monkeypatch) -> None:
    """Torch operands on the CPU deem passes over the basis cheap, as on an accelerator (every
    row's drift measured each step)."""
    from curvops.algorithms import _operand

    original = _operand.TorchOperand.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.cheap_passes = True

    monkeypatch.setattr(_operand.TorchOperand, "__init__", init)


def _operator(matrix: np.ndarray, backend: str, monkeypatch):
    """``matrix`` for the numpy path, the torch path, or the torch path with measured drift."""
    if backend == "numpy":
        return matrix
    if backend == "torch-measured":
        _measure_drift_on_the_cpu(monkeypatch)
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
    assert np.all(explicit <= tol * result.spectral_norm_estimate * (1 + 1e-6) + 100 * np.sqrt(DIM) * EPS * spectral_norm)
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
def test_lanczos_is_unaffected_by_the_operator_scale(scale, backend, make_spectrum_matrix, monkeypatch):
    """Hessians have norms far from 1 (top eigenvalues of 1e-3 to 1e3 are common). Lanczos keeps
    its new vectors unnormalized with a recorded scale, and stored norms change by about
    ``beta`` per step: they must not drift into over- or underflow over a run of many restarts."""
    rng = np.random.default_rng(31)
    values = np.r_[3.0, 2.9, 2.8, 2.7, 2.6, rng.uniform(-1.0, 2.5, DIM - 5)]
    matrix, _ = make_spectrum_matrix(values * scale, seed=31)
    result = lanczos(_operator(matrix, backend, monkeypatch), k=5, tol=TOL, seed=0, max_basis_size=12)
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
    assert bool(result.converged.all()) and result.num_restarts >= 4
    # Default tol = sqrt(eps32): eigenvalue error <= residual <= 3.5e-4 * ||A||.
    np.testing.assert_allclose(result.eigenvalues.numpy() / scale, [4.0, 3.9, 3.8],
                               atol=np.sqrt(np.finfo(np.float32).eps) * 4 * 1.01)


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
def test_lanczos_at_a_loose_tol_over_many_restarts(seed, which, backend, make_spectrum_matrix, monkeypatch):
    """At tol = 1e-6 (orthogonality level 1e-8) a new vector's norm comes from formulas instead
    of a pass over it where their error allows. Wanted pairs at the edge of a dense bulk (SA, and
    BE's lower half) take 10-40 restarts: the norm errors must not compound over them (they did,
    by about (alpha^2 + beta^2) / beta_next^2 per step, into Ritz values far outside the
    spectrum)."""
    rng = np.random.default_rng(40 + seed)
    values = np.r_[0.98 ** np.arange(30), rng.uniform(-0.02, 0.5, DIM - 30)]
    matrix, _ = make_spectrum_matrix(values, seed=40 + seed)
    result = lanczos(_operator(matrix, backend, monkeypatch), k=5, which=which, tol=1e-6, seed=0, max_basis_size=12)
    assert result.num_restarts >= 10
    _check_loose(matrix, result, 1e-6, which, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_estimate_counts_the_relation_errors_of_kept_ritz_vectors(backend, make_spectrum_matrix, monkeypatch):
    """A kept Ritz vector's relation error (the Gram-Schmidt coefficients removed from the
    vectors it combines, about level * beta) lies partly in discarded directions, so it enters
    each new vector's drift as error / beta_next. Here (BE on a spectrum spread over eight
    decades) converged pairs of the top end meet steps with beta / ||A|| ~ 1e-4: left out of the
    estimate, the drift from them grew unseen (1e-5 per step) until the basis, and the returned
    pairs, were garbage while reported as converged."""
    rng = np.random.default_rng(557)
    values = 10.0 ** -rng.uniform(0, 8, 60) * 9.665518711239552e-4  # (as a random search drew it)
    matrix, _ = make_spectrum_matrix(values, seed=557)
    result = lanczos(_operator(matrix, backend, monkeypatch), k=6, which="BE", tol=1e-6, seed=557, max_basis_size=31)
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
def test_measured_drift_matches_eigh(name, make_spectrum_matrix, monkeypatch):
    """Where passes over the basis are cheap (accelerators) every row's drift is measured in the
    step's one read instead of estimated: the same answers."""
    eigenvalues, which, k, block_size = _spectra()[name]
    matrix, _ = make_spectrum_matrix(eigenvalues, seed=1)
    operator = _operator(matrix, "torch-measured", monkeypatch)
    result = lanczos(operator, k=k, which=which, tol=TOL, seed=0, block_size=block_size)
    check_eigenpairs(matrix, result, TOL, which, k)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_measured_drift_reads_once_per_step(tol, make_spectrum_matrix, monkeypatch):
    """With measured drift a recurrence step makes one read (the stored rows' inner products with
    u, v and w) and no estimate; a Gram-Schmidt update takes its coefficients from that read, so
    only each cycle's first step (the arrow) and DGKS re-passes read again. At tol = 1e-10 the
    read's rounding exceeds 1% of the level (1e-12) relative to the residual: every step falls
    back to the estimate and a measuring pass. The basis stays orthonormal to the level."""
    import curvops.algorithms.eigen as eigen
    from curvops.algorithms import _operand

    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    matrix, _ = make_spectrum_matrix(np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM)), seed=13)
    operator = _operator(matrix, "torch-measured", monkeypatch)
    counts = {"gram": 0, "dots": 0, "predict": 0}
    for owner, name in ((_operand.TorchOperand, "gram"), (_operand.TorchOperand, "dots"), (eigen._Drift, "predict")):
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
    np.testing.assert_allclose(result.eigenvalues.numpy(), [4.0, 3.0, 2.0], atol=np.sqrt(np.finfo(np.float32).eps) * 4 * 1.01)


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


def test_reorthogonalization_update_skipped_when_basis_already_orthogonal(make_spectrum_matrix, monkeypatch):
    """Most steps skip the update pass over the basis; the basis stays orthonormal to the
    documented level, min(sqrt(eps), tol / 100), and the answer is the full-reorthogonalization one."""
    from curvops.algorithms import _operand

    rng = np.random.default_rng(11)
    matrix, _ = make_spectrum_matrix(np.r_[5.0, 4.5, 4.0, 3.8, rng.uniform(-3, 3, DIM - 4)], seed=11)
    updates = []
    original = _operand.TorchOperand.subtract_combination_

    def counting(self, target, coefficients, rows):
        updates.append(rows.shape[0])
        return original(self, target, coefficients, rows)

    monkeypatch.setattr(_operand.TorchOperand, "subtract_combination_", counting)
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
    from curvops.algorithms._operand import as_operand

    operand = as_operand(_ContiguousColumnOperator(torch.eye(DIM, dtype=torch.float64)))
    rows = operand.matmat_rows(torch.ones(block_size, DIM, dtype=torch.float64))
    assert rows.shape == (block_size, DIM) and rows.stride() == (DIM, 1)
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
    and (2, D) row views (cuBLAS rejects some in-place layouts, see _operand._row_layout)."""
    from curvops import HessianOperator

    rng = np.random.default_rng(12)
    values = np.r_[6.0, 5.0, 4.5, 4.0, rng.uniform(-3, 3, DIM - 4)]
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    dense = lanczos(torch.tensor((q * values) @ q.T, device="cuda"), k=4, tol=1e-10, seed=0, block_size=block_size)
    np.testing.assert_allclose(dense.eigenvalues.cpu().numpy(), values[:4], rtol=1e-9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().cuda()
    data = [(torch.randn(16, 6, dtype=torch.float64, device="cuda"), torch.randint(0, 3, (16,), device="cuda"))]
    hessian = HessianOperator(model, torch.nn.CrossEntropyLoss(), data)
    expected = np.sort(np.linalg.eigvalsh(hessian.to_dense().cpu().numpy()))[::-1][:4]
    result = lanczos(hessian, k=4, tol=1e-10, seed=0, block_size=block_size)
    assert result.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(result.eigenvalues.cpu().numpy(), expected, rtol=1e-8, atol=1e-10 * abs(expected[0]))


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
    from curvops.algorithms import _operand

    rng = np.random.default_rng(14)
    # Four outliers converge fast; the fifth sits in a near-cluster and needs many restarts.
    values = np.r_[10.0, 9.0, 8.0, 7.0, 3.0, 2.995, rng.uniform(-1.0, 2.9, DIM - 6)]
    matrix, _ = make_spectrum_matrix(values, seed=14)
    combined = []
    original = _operand.Operand.combine_rows_

    def recording(self, rows, coefficients):
        combined.append(rows.shape[0])
        return original(self, rows, coefficients)

    monkeypatch.setattr(_operand.Operand, "combine_rows_", recording)
    result = lanczos(torch.tensor(matrix), k=5, tol=1e-10, seed=0, max_basis_size=12)
    assert result.num_restarts >= 3
    # Rows recombined: those after the locked ones, and the residual row moved behind them.
    assert combined[0] == 12 + 1 and min(combined) <= 12 + 1 - 4  # the four outliers got locked
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), 1e-12)
    check_eigenpairs(matrix, result, 1e-10, "LA", 5)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_updates_come_in_consecutive_pairs_and_keep_the_level(tol, make_spectrum_matrix, monkeypatch):
    """Partial reorthogonalization: a Gram-Schmidt update triggered by the drift estimate is
    repeated at the next step over at least the same rows (otherwise the previous vector's drift,
    about the level, re-enters the next one at once). The basis, hence the eigenvectors, stays
    orthonormal to the documented level min(sqrt(eps), tol / 100); the pairs match eigh."""
    import curvops.algorithms.eigen as eigen

    rng = np.random.default_rng(13)
    gaussian = rng.standard_normal((DIM, DIM))
    values = np.linalg.eigvalsh((gaussian + gaussian.T) / np.sqrt(2 * DIM))
    matrix, _ = make_spectrum_matrix(values, seed=13)
    steps = []  # [j, rows to measure, forced, rows updated] per step; None between cycles
    original_reach, original_reset, original_begin = eigen._Drift.reach, eigen._Drift.reset, eigen._Drift.begin

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

    monkeypatch.setattr(eigen._Drift, "begin", begin)
    monkeypatch.setattr(eigen._Drift, "reach", reach)
    monkeypatch.setattr(eigen._Drift, "reset", reset)
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
            assert forced and updated == j + 1, step
            cycles += 1
        if follow is not None:  # the second of a pair
            assert forced and updated >= min(follow, j + 1), (steps[index - 1], step)
            pairs += 1
            follow = None
        elif updated:
            follow = updated
    assert cycles >= 3 and pairs >= cycles
    vectors = result.eigenvectors.numpy()
    assert np.abs(vectors.T @ vectors - np.eye(5)).max() <= 10 * min(np.sqrt(EPS), tol / 100)
    check_eigenpairs(matrix, result, tol, "LA", 5)


def _spy_single_steps(monkeypatch):
    """Wrap single-vector Lanczos steps: per step, whether it measured the new vector's norm
    explicitly (Operand.norm) and that vector's true norm afterwards (should be 1)."""
    import curvops.algorithms.eigen as eigen

    records = []
    explicit = [0]
    original_norm, original_step = eigen.Operand.norm, eigen._single_step

    def norm(self, vector):
        explicit[0] += 1
        return original_norm(self, vector)

    def step(operand, views, scales, projection, j, *rest):
        before = explicit[0]
        result = original_step(operand, views, scales, projection, j, *rest)
        new = np.asarray(views.basis[j + 1], dtype=np.float64)
        records.append((explicit[0] > before, float(np.linalg.norm(new) * scales[j + 1])))
        return result

    monkeypatch.setattr(eigen.Operand, "norm", norm)
    monkeypatch.setattr(eigen, "_single_step", step)
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
    operator = _operator(matrix, backend, monkeypatch)
    records = _spy_single_steps(monkeypatch)
    result = lanczos(operator, k=5, tol=1e-6, seed=0, max_basis_size=12)
    from_recurrence = [unit for measured, unit in records if not measured]
    if backend == "torch-measured":
        assert len(from_recurrence) > 0.5 * len(records)
        np.testing.assert_allclose(from_recurrence, 1.0, rtol=0, atol=0.01 * 1e-8)
    else:
        assert records and not from_recurrence
        np.testing.assert_allclose([unit for _, unit in records], 1.0, rtol=0, atol=100 * EPS)
    check_eigenpairs(matrix, result, 1e-6, "LA", 5)


def test_recurrence_norm_not_used_when_rounding_dominates(make_spectrum_matrix, monkeypatch):
    """At tol = 1e-10 (orthogonality level 1e-12) the recurrence's rounding would exceed the
    level: every step measures the norm, and the vectors are unit to rounding."""
    values = np.r_[10.0, 8.0, 6.0, np.linspace(-1.0, 2.0, DIM - 3)]
    matrix, _ = make_spectrum_matrix(values, seed=22)
    operator = _operator(matrix, "torch-measured", monkeypatch)
    records = _spy_single_steps(monkeypatch)
    result = lanczos(operator, k=3, tol=1e-10, seed=0)
    assert records and all(measured for measured, _ in records)
    np.testing.assert_allclose([unit for _, unit in records], 1.0, rtol=0, atol=100 * EPS)
    check_eigenpairs(matrix, result, 1e-10, "LA", 3)


def test_tridiagonal_head_reduces_the_restart_arrow():
    """After a thick restart the kept block ``diag(theta)`` with couplings ``sigma`` to the start
    row is reduced by an orthogonal ``G``: ``G^T diag(theta) G`` tridiagonal and ``G^T sigma =
    c e_p``. Householder reduction is backward stable: errors of a few ``p eps ||M||``."""
    import curvops.algorithms.eigen as eigen

    rng = np.random.default_rng(5)
    projected = np.zeros((14, 14))
    locked, start = 2, 11
    projected[np.arange(start), np.arange(start)] = np.sort(rng.standard_normal(start))[::-1] * 4
    sigma = rng.standard_normal(start - locked) * np.logspace(-12, 0, start - locked)  # converged to not
    projected[start, locked:start] = projected[locked:start, start] = sigma
    rotation, diagonal, off = eigen._tridiagonal_head(projected, locked, start)
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
    assert [part.size for part in eigen._tridiagonal_head(projected, start, start)] == [0, 0, 0]


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
    np.testing.assert_allclose(dense.eigenvalues.numpy(), tridiagonal.eigenvalues.numpy(), rtol=0, atol=100 * EPS * 9)
    overlaps = np.abs(np.sum(dense.eigenvectors.numpy() * tridiagonal.eigenvectors.numpy(), axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-8)
    check_eigenpairs(matrix, tridiagonal, 1e-10, "LA", 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_after_a_small_update_comes_from_the_removed_coefficients(dtype):
    """After Gram-Schmidt removes components ``c`` along orthonormal rows, the norm is
    ``sqrt(||x||^2 - ||c||^2)`` up to the update's rounding: used where that is within 1% of
    the orthogonality level, measured (None) where the bound is larger (float32 at a tight
    level) or more than half the norm was removed (a DGKS re-pass follows)."""
    import curvops.algorithms.eigen as eigen
    from curvops.algorithms import _operand

    dim, reach, level = 3000, 6, 1e-8
    rng = np.random.default_rng(8)
    rows, _ = np.linalg.qr(rng.standard_normal((dim, reach)))
    residual = rng.standard_normal(dim)
    residual -= rows @ (rows.T @ residual)
    operand = _operand.TorchOperand(dim, dtype, torch.device("cpu"), lambda block: block)
    for size, usable in ((1e-8, dtype == torch.float64), (0.9, False)):
        vector = residual + rows @ (size * np.linalg.norm(residual) * rng.standard_normal(reach))
        coefficients = (rows.T @ vector)[:, None]
        norms = eigen._norms_after_update(operand, coefficients, np.array([np.linalg.norm(vector)]), reach, level)
        if not usable:
            assert norms is None
            continue
        measured = np.linalg.norm(vector - rows @ coefficients[:, 0])
        assert abs(norms[0] - measured) <= 0.01 * level * measured


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
    settings = dict(
        k=k, which=str(rng.choice(["LA", "SA", "LM", "BE"])), tol=float(rng.choice([1e-4, 1e-6, 1e-8, 1e-10])),
        block_size=block_size, max_basis_size=int(rng.integers(k + block_size + 1, min(dim, 3 * k + 20))), seed=index,
    )
    return values * 10.0 ** rng.uniform(-6, 6), settings, str(rng.choice(["torch", "numpy"]))


@pytest.mark.parametrize("chunk", range(4))
def test_lanczos_random_configurations_never_return_a_wrong_converged_pair(chunk, make_spectrum_matrix):
    """50 random configurations per chunk (spectra of seven kinds at scales 1e-6..1e6, every
    ``which``, tol 1e-4..1e-10, block sizes 1-3): every pair reported converged has an explicit
    residual within tol and an eigenvalue within that residual of the spectrum; a run that does
    not converge within max_iter warns (hard spectra: clusters at 1e-7, eight decades)."""
    for index in range(50 * chunk, 50 * chunk + 50):
        values, settings, backend = _random_configuration(index)
        matrix, _ = make_spectrum_matrix(values, seed=index)
        operator = torch.tensor(matrix) if backend == "torch" else matrix
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


@pytest.mark.parametrize("chunk", range(2))
def test_lanczos_random_configurations_with_measured_drift(chunk, make_spectrum_matrix, monkeypatch):
    """The random configurations above on the torch path with every row's drift measured."""
    _measure_drift_on_the_cpu(monkeypatch)
    test_lanczos_random_configurations_never_return_a_wrong_converged_pair(chunk, make_spectrum_matrix)
