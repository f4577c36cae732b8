"""Inverse-curvature products against ``numpy.linalg.solve`` on the dense damped matrix.

Tolerances come from the requested solver tolerance and the conditioning:

- The solvers promise (and verify with one extra product) a true residual
  ``‖b − (A + δI) x‖ ≤ rtol·‖b‖`` with the operator's own products. The dense reference
  ``A_d`` differs from those products by float64 rounding only (~1e-15 relative), so
  against ``A_d``: ``‖r_d‖ ≤ rtol·‖b‖ + SLACK·‖A_d + δI‖·‖x‖`` (SLACK = 1e-12).
- Hence the forward error is bounded by the smallest singular value ``σ_min`` of
  ``A_d + δI``: ``‖x − x*‖ ≤ ‖r_d‖ / σ_min``. Both bounds are checked with a 1.01 factor
  for the rounding of the norms themselves; a wrong solve (wrong operator, wrong
  damping, stale column) misses them by orders of magnitude.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from curvops import GGNOperator, HessianOperator
from curvops.algorithms.solve import SolverWarning, cg
from curvops.operators.inverse import InverseOperator, TaggedOperator, assume_psd, inverse, tag
from tests.operators.cases import CASES

RTOL = 1e-8
SLACK = 1e-12
CASE_IDS = ["mlp_tanh-ce_mean", "cnn_bn_eval-ce_mean"]


def _case(case_id):
    return next(c for c in CASES if c.id == case_id)


_PROBLEMS: dict = {}


def _problem(case_id):
    """Operators and their dense matrices for one case, built once per test session."""
    if case_id not in _PROBLEMS:
        model, loss_fn, data = _case(case_id).make()
        G = GGNOperator(model, loss_fn, data)
        H = HessianOperator(model, loss_fn, data)
        Gd, Hd = G.to_dense().numpy(), H.to_dense().numpy()
        _PROBLEMS[case_id] = {
            "id": case_id,
            "model": model,
            "loss_fn": loss_fn,
            "data": data,
            "G": G,
            "H": H,
            "Gd": 0.5 * (Gd + Gd.T),
            "Hd": 0.5 * (Hd + Hd.T),
        }
    return _PROBLEMS[case_id]


@pytest.fixture(params=CASE_IDS)
def problem(request):
    """Every case: for the cheap solves (CG, MINRES, eigh)."""
    return _problem(request.param)


@pytest.fixture
def mlp():
    """One case: for the expensive ones (LSMR's ~κ² iterations, Neumann's ~κ terms) and bad input."""
    return _problem(CASE_IDS[0])


def _rhs(dim, k=3, seed=0):
    return torch.randn(dim, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _check_solution(dense, damping, B, X, rtol=RTOL):
    """Residual and forward-error bounds of the module docstring, column by column."""
    A = dense + damping * np.eye(dense.shape[0])
    B, X = np.asarray(B), np.asarray(X)
    B2, X2 = (B[:, None], X[:, None]) if B.ndim == 1 else (B, X)
    ref = np.linalg.solve(A, B2)
    sigma_min = np.abs(np.linalg.eigvalsh(A)).min()
    norm_A = np.abs(np.linalg.eigvalsh(A)).max()
    for j in range(B2.shape[1]):
        r = np.linalg.norm(B2[:, j] - A @ X2[:, j])
        bound = 1.01 * rtol * np.linalg.norm(B2[:, j]) + SLACK * norm_A * np.linalg.norm(X2[:, j])
        assert r <= bound, f"column {j}: residual {r:.3e} > {bound:.3e}"
        err = np.linalg.norm(X2[:, j] - ref[:, j])
        assert err <= 1.01 * bound / sigma_min, f"column {j}: error {err:.3e} > {bound / sigma_min:.3e}"


def _indefinite_damping(dense):
    """δ = 5% of λ_max, nudged so that A + δI stays indefinite but well away from singular."""
    evals = np.linalg.eigvalsh(dense)
    lam = evals.max()
    for frac in (0.05, 0.07, 0.03, 0.1):
        delta = frac * lam
        if np.abs(evals + delta).min() >= 1e-4 * lam:
            assert (evals + delta).min() < 0, "test premise: the damped Hessian is indefinite"
            return delta
    raise AssertionError("no well-conditioned damping found")


# ------------------------------------------------------------------ correctness
def test_ggn_cg(problem):
    G, Gd = problem["G"], problem["Gd"]
    delta = 1e-3 * np.linalg.eigvalsh(Gd).max()
    inv = inverse(G, delta, "cg", rtol=RTOL)
    B = _rhs(G.shape[0])
    X = inv @ B
    _check_solution(Gd, delta, B, X)
    info = inv.last_info
    assert info.all_converged
    assert info.method == "cg"
    assert info.iterations.shape == (3,)
    assert (info.relative_residuals <= RTOL).all()
    assert info.num_matvecs >= info.iterations.sum()
    # a vector gives the column of the block solve (independent recurrences)
    _check_solution(Gd, delta, B[:, 1], inv @ B[:, 1])


def test_hessian_minres(problem):
    H, Hd = problem["H"], problem["Hd"]
    delta = _indefinite_damping(Hd)
    inv = inverse(H, delta, "minres", rtol=RTOL)
    B = _rhs(H.shape[0], k=2)
    _check_solution(Hd, delta, B, inv @ B)
    assert inv.last_info.all_converged
    assert not inv.is_positive_semidefinite
    assert inv.is_symmetric


def test_hessian_lsmr(mlp):
    H, Hd = mlp["H"], mlp["Hd"]
    delta = _indefinite_damping(Hd)
    inv = inverse(H, delta, "lsmr", rtol=RTOL)
    B = _rhs(H.shape[0], k=2)
    _check_solution(Hd, delta, B, inv @ B)
    assert inv.last_info.all_converged


def test_eigh_and_with_damping(problem):
    H, Hd = problem["H"], problem["Hd"]
    delta = _indefinite_damping(Hd)
    inv = inverse(H, delta, "eigh")
    B = _rhs(H.shape[0])
    _check_solution(Hd, delta, B, inv @ B, rtol=1e-12)
    other = inv.with_damping(2 * delta + 1e-3)
    _check_solution(Hd, 2 * delta + 1e-3, B, other @ B, rtol=1e-12)
    assert other._eigh is inv._eigh  # the decomposition is reused, not recomputed


def test_neumann_ggn(mlp):
    G, Gd = mlp["G"], mlp["Gd"]
    delta = 0.2 * np.linalg.eigvalsh(Gd).max()  # κ ≤ 6: a few dozen terms
    inv = inverse(G, delta, "neumann", rtol=RTOL)
    B = _rhs(G.shape[0], k=2)
    _check_solution(Gd, delta, B, inv @ B)
    assert inv.last_info.all_converged
    assert inv.scale > 0


def _block_diagonal_inverse(dense, delta, numels):
    """Exact inverse of the per-parameter diagonal blocks of A + δI (a block-Jacobi preconditioner)."""
    P = np.zeros_like(dense)
    start = 0
    for n in numels:
        sl = slice(start, start + n)
        P[sl, sl] = np.linalg.inv(dense[sl, sl] + delta * np.eye(n))
        start += n
    return torch.from_numpy(0.5 * (P + P.T))


def test_preconditioned_cg_block_jacobi(mlp):
    G, Gd = mlp["G"], mlp["Gd"]
    delta = 1e-4 * np.linalg.eigvalsh(Gd).max()
    P = _block_diagonal_inverse(Gd, delta, G.param_numels)
    B = _rhs(G.shape[0])
    pre = inverse(G, delta, "cg", rtol=RTOL, preconditioner=P)
    X = pre @ B
    _check_solution(Gd, delta, B, X)
    assert pre.last_info.all_converged
    # No claim that block-Jacobi saves iterations: the GGN here has rank ≤ 30 < D, so
    # without preconditioning its damped spectrum is one cluster at δ plus 30 values, and
    # the block inverses spread that cluster out (seen: 154 vs 41 iterations).
    # the exact inverse as preconditioner: one iteration
    exact = torch.from_numpy(np.linalg.inv(Gd + delta * np.eye(Gd.shape[0])))
    one = inverse(G, delta, "cg", rtol=RTOL, preconditioner=exact)
    _check_solution(Gd, delta, B, one @ B)
    assert one.last_info.iterations.max() <= 2


@pytest.mark.parametrize("method", ["minres", "lsmr"])
def test_preconditioned_hessian(mlp, method):
    H, Hd = mlp["H"], mlp["Hd"]
    delta = _indefinite_damping(Hd)
    # An SPD approximation of |A + δI|⁻¹ (eigenvalues perturbed by factors in [1, 3]): the
    # preconditioned spectrum spans a factor 3, so the solve is short but not trivial.
    evals, V = np.linalg.eigh(Hd + delta * np.eye(Hd.shape[0]))
    factors = 1 + 2 * np.random.default_rng(3).random(len(evals))
    P = torch.from_numpy((V * (factors / np.abs(evals))) @ V.T)
    inv = inverse(H, delta, method, rtol=RTOL, preconditioner=0.5 * (P + P.T))
    B = _rhs(H.shape[0], k=2)
    _check_solution(Hd, delta, B, inv @ B)
    assert inv.last_info.all_converged
    assert inv.last_info.iterations.max() < 60


def test_kfac_preconditioned_cg():
    from curvops.operators import kfac

    model, loss_fn, data = _case("mlp_tanh-ce_mean").make()
    G = GGNOperator(model, loss_fn, data)
    Gd = G.to_dense().numpy()
    Gd = 0.5 * (Gd + Gd.T)
    delta = 1e-3 * np.linalg.eigvalsh(Gd).max()
    P = kfac.KFACOperator(model, loss_fn, data).inverse(delta)
    inv = inverse(G, delta, "cg", rtol=RTOL, preconditioner=P)
    B = _rhs(G.shape[0])
    _check_solution(Gd, delta, B, inv @ B)
    assert inv.last_info.all_converged
    # KFAC is itself PSD-tagged: CG on KFAC + δI is allowed and exact against its own inverse
    K = kfac.KFACOperator(model, loss_fn, data)
    Kd = K.to_dense().numpy()
    _check_solution(0.5 * (Kd + Kd.T), delta, B, inverse(K, delta, "cg", rtol=RTOL) @ B)


class _Recording(sla.LinearOperator):
    """Dense SPD matrix with the torch-native protocol, recording every block product's width."""

    def __init__(self, matrix):
        super().__init__(dtype=np.float64, shape=matrix.shape)
        self.M = torch.as_tensor(matrix)
        self.device, self.torch_dtype = torch.device("cpu"), torch.float64
        self.is_symmetric, self.is_positive_semidefinite = True, True
        self.widths = []

    def matmat_torch(self, X):
        self.widths.append(X.shape[1])
        return self.M @ X

    def _matvec(self, x):
        return self.M.numpy() @ x


def test_block_columns_advance_together_and_freeze():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    A = (Q * np.logspace(-2, 0, 40)) @ Q.T
    A = 0.5 * (A + A.T)
    op = _Recording(A)
    B = torch.zeros(40, 3, dtype=torch.float64)
    B[:, 0] = torch.from_numpy(Q[:, 5])  # an eigenvector: CG converges in one step
    B[:, 1] = torch.from_numpy(rng.standard_normal(40))  # generic: needs many steps
    inv = inverse(op, 0.0, "cg", rtol=1e-10)
    X = inv @ B
    _check_solution(A, 0.0, B, X, rtol=1e-10)
    info = inv.last_info
    assert info.iterations[0] == 1
    assert info.iterations[1] > 5
    assert info.iterations[2] == 0
    # one block product per iteration: the zero column never enters, the converged one leaves
    # after its first step; then one verification product of both at the end of the round
    assert op.widths == [2] + [1] * (info.iterations[1] - 1) + [2]
    assert sum(op.widths) == info.num_matvecs == info.iterations.sum() + 2


def test_numpy_scipy_and_tagged_operators():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((30, 30))
    S = M @ M.T / 30  # SPD
    B = rng.standard_normal((30, 2))
    # a dense numpy array: symmetric by inspection, PSD only by assertion
    with pytest.raises(ValueError, match="positive semi-definite"):
        inverse(S, 0.1, "cg")
    inv = inverse(S, 0.1, "cg", assume_psd=True, rtol=RTOL)
    X = inv @ B  # numpy in, numpy out
    assert isinstance(X, np.ndarray)
    _check_solution(S, 0.1, B, X)
    # a scipy LinearOperator is not known to be symmetric until tagged
    L = sla.aslinearoperator(S)
    with pytest.raises(ValueError, match="symmetric"):
        inverse(L, 0.1, "minres")
    _check_solution(S, 0.1, B, inverse(tag(L, symmetric=True), 0.1, "minres", rtol=RTOL) @ B)
    _check_solution(S, 0.1, B, inverse(assume_psd(L), 0.1, "cg", rtol=RTOL) @ B)
    T = assume_psd(torch.from_numpy(S))
    assert isinstance(T, TaggedOperator)
    assert T.is_positive_semidefinite
    assert T.is_symmetric
    assert np.allclose(T @ B, S @ B)


def test_tags_and_scipy_eigsh_on_the_inverse(problem):
    G, H, Gd = problem["G"], problem["H"], problem["Gd"]
    delta = 1e-2 * np.linalg.eigvalsh(Gd).max()
    invG = inverse(G, delta, "eigh")
    assert isinstance(invG, InverseOperator)
    assert invG.is_symmetric
    assert invG.is_positive_semidefinite
    assert not inverse(H, 1.0, "minres").is_positive_semidefinite
    # the inverse is a scipy LinearOperator: scipy composes it (numpy in, numpy out) and its
    # smallest eigenvalue is 1 / (λ_max(G) + δ) (the largest, 1/δ, is multiple: G is singular)
    D = Gd.shape[0]
    dense_inv = np.linalg.inv(Gd + delta * np.eye(D))
    assert np.allclose(
        (2.0 * invG).matmat(np.eye(D)), 2.0 * dense_inv, rtol=1e-10, atol=1e-10 * np.abs(dense_inv).max()
    )
    low = sla.eigsh(invG, k=1, which="SA", return_eigenvectors=False, tol=1e-12)[0]
    assert abs(low - 1 / (np.linalg.eigvalsh(Gd).max() + delta)) <= 1e-8 * low
    assert invG.T is invG
    assert invG.H is invG


def test_float32_cg_keeps_dtype():
    model, loss_fn, data = _case("mlp_tanh-ce_mean").make()
    model = model.float()
    data = [(x.float(), y) for x, y in data]
    G = GGNOperator(model, loss_fn, data)
    b = torch.randn(G.shape[0])
    inv = inverse(G, 1e-2, "cg", rtol=1e-4)
    x = inv @ b
    assert x.dtype == torch.float32
    assert inv.last_info.all_converged
    assert float((b - (G @ x + 1e-2 * x)).norm() / b.norm()) <= 1.01e-4


# ------------------------------------------------------------------ bad input
def test_cg_refuses_the_hessian(mlp):
    with pytest.raises(ValueError, match="minres"):
        inverse(mlp["H"], 1.0, "cg")
    with pytest.raises(ValueError, match="positive semi-definite"):
        inverse(mlp["H"], 1.0, "neumann")


def test_bad_arguments(mlp):
    G = mlp["G"]
    D = G.shape[0]
    with pytest.raises(ValueError, match="damping must be >= 0"):
        inverse(G, -1e-3)
    with pytest.raises(ValueError, match="damping"):
        inverse(G, float("nan"))
    with pytest.raises(ValueError, match="method"):
        inverse(G, 1.0, "qr")
    with pytest.raises(ValueError, match="rtol and atol"):
        inverse(G, 1.0, rtol=0.0) @ torch.ones(D, dtype=torch.float64)
    with pytest.raises(ValueError, match="maxiter"):
        inverse(G, 1.0, maxiter=0) @ torch.ones(D, dtype=torch.float64)
    with pytest.raises(ValueError, match="preconditioner"):
        inverse(G, 1.0, "neumann", preconditioner=torch.eye(D, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        inverse(G, 1.0, preconditioner=torch.eye(D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="symmetric=False"):
        tag(G, symmetric=False, positive_semidefinite=True)


def test_wrong_shapes(mlp):
    G = mlp["G"]
    D = G.shape[0]
    inv = inverse(G, 1.0)
    with pytest.raises(ValueError, match="shape"):
        inv @ torch.ones(D + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        inv @ torch.ones(D, 2, 2, dtype=torch.float64)
    # numpy in goes through scipy's LinearOperator.matvec, which checks the shape itself.
    with pytest.raises(ValueError, match="dimension mismatch"):
        inv @ np.ones(D - 1)
    with pytest.raises(TypeError, match="dtype"):
        inv @ torch.ones(D, dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        inv.solve(torch.ones(D, 2, dtype=torch.float64), x0=torch.ones(D, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        inverse(torch.ones(3, 4, dtype=torch.float64), 1.0, "minres")


def test_non_convergence_warns_with_the_residual(mlp):
    G, Gd = mlp["G"], mlp["Gd"]
    delta = 1e-4 * np.linalg.eigvalsh(Gd).max()
    inv = inverse(G, delta, "cg", rtol=1e-12, maxiter=3)
    B = _rhs(G.shape[0], k=2)
    with pytest.warns(SolverWarning, match=r"did not converge.*relative residual [0-9.e+-]+ .*> rtol=1e-12"):
        X = inv @ B
    info = inv.last_info
    assert not info.converged.any()
    assert (info.iterations == 3).all()
    # the reported residual is the true one
    A = Gd + delta * np.eye(Gd.shape[0])
    true = np.linalg.norm(B.numpy() - A @ X.numpy(), axis=0)
    assert np.allclose(info.residual_norms, true, rtol=1e-8)
    # warn=False silences the warning but the report still says so
    quiet = inverse(G, delta, "cg", rtol=1e-12, maxiter=3, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet @ B
    assert not quiet.last_info.all_converged


def test_ggn_cholesky(problem):
    G, Gd = problem["G"], problem["Gd"]
    delta = 1e-3 * np.linalg.eigvalsh(Gd).max()
    inv = inverse(G, delta, "cholesky")
    B = _rhs(G.shape[0])
    # A direct solve: backward stable, residual at rounding level (rtol 1e-12 leaves only SLACK).
    _check_solution(Gd, delta, B, inv @ B, rtol=1e-12)
    _check_solution(Gd, delta, B[:, 0], inv @ B[:, 0], rtol=1e-12)
    info = inv.last_info
    assert info.method == "cholesky"
    assert info.num_matvecs == 0
    assert info.all_converged
    assert inv._cholesky is not None
    assert inv.is_positive_semidefinite
    # The Hessian is indefinite in general: refused, with the advice to use MINRES/LSMR.
    with pytest.raises(ValueError, match="needs a positive semi-definite operator.*minres"):
        inverse(problem["H"], delta, "cholesky")


def test_runtime_failures():
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    indefinite = (Q * np.linspace(-1, 1, 20)) @ Q.T
    b = torch.from_numpy(rng.standard_normal(20))
    # a false PSD assertion is caught by the curvature test, not silently "solved"
    with pytest.raises(ValueError, match="non-positive curvature"):
        inverse(torch.from_numpy(indefinite), 0.0, "cg", assume_psd=True) @ b
    spd = torch.from_numpy((Q * np.linspace(0.1, 1, 20)) @ Q.T)
    with pytest.raises(ValueError, match="preconditioner is not positive definite"):
        inverse(spd, 0.0, "cg", assume_psd=True, preconditioner=-torch.eye(20, dtype=torch.float64)) @ b
    with pytest.raises(FloatingPointError, match="diverges"):
        inverse(spd, 0.0, "neumann", assume_psd=True, scale=5.0) @ b
    singular = torch.from_numpy((Q * np.r_[np.zeros(5), np.linspace(0.1, 1, 15)]) @ Q.T)
    with pytest.raises(ValueError, match="singular"):
        inverse(singular, 0.0, "eigh") @ b
    with pytest.raises(ValueError, match="max_dim"):
        inverse(spd, 0.1, "eigh", max_dim=10) @ b
    with pytest.raises(ValueError, match="max_dim"):
        inverse(spd, 0.1, "cholesky", assume_psd=True, max_dim=10) @ b
    # a false PSD assertion is caught by the factorisation, not silently "solved"
    with pytest.raises(ValueError, match="not positive definite"):
        inverse(torch.from_numpy(indefinite), 0.1, "cholesky", assume_psd=True) @ b
    # the pure solver rejects NaN right-hand sides
    with pytest.raises(ValueError, match="NaN"):
        cg(lambda X: spd @ X, torch.full((20,), float("nan"), dtype=torch.float64))
