"""Krylov and series solvers for symmetric systems ``A X = B`` with block right-hand sides.

Every solver works against a function that multiplies a torch block, ``matmul(X) -> A X``
for ``X`` of shape (D, c), and keeps all length-D arithmetic in torch on the device of
``B``; per iteration only one (c,)-sized vector of column norms (and breakdown flags)
goes to the host, to decide which columns continue.

Block right-hand sides (D, k) run as k *independent* recurrences advanced together: one
block product per iteration for all columns still running, and a column is removed from
the working block as soon as it converges (so converged columns cost nothing).

Stopping and verification
-------------------------
Column ``j`` converges when ``‖b_j − A x_j‖₂ ≤ rtol·‖b_j‖₂ + atol``. The recurrences
track a residual estimate; when a column's estimate meets the target its *true*
residual is computed with one extra block product. If the true residual misses the
target (rounding drift, preconditioned norms), the solve restarts from ``x_j`` on the
true residual (iterative refinement), as long as the previous round at least halved the
residual and iterations remain. A column that still misses the target is reported as not
converged with its true residual, and [`SolverWarning`][curvops.SolverWarning] is issued (``warn=True``).

Cost: ``iterations + rounds`` block products per column (LSMR: ``2·iterations +
rounds``), plus one preconditioner application per iteration where used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvops._finite import all_finite

MatMul = Callable[[Tensor], Tensor]
METHODS: tuple[str, ...] = ("cg", "minres", "lsmr", "neumann")

# A restart (refinement round) is only worth its extra products if the previous round
# reduced the true residual at least this much; otherwise the solve is at its rounding floor.
_REFINE_FACTOR = 0.5
_REFINE_AIM = 0.1
_MAX_ROUNDS = 10
# Neumann iterates whose residual grows past this multiple of the initial one diverge.
_DIVERGENCE_FACTOR = 1e3


class SolverWarning(RuntimeWarning):
    """A solve stopped before reaching its tolerance."""


@dataclass(frozen=True)
class SolveInfo:
    """Report of one (block) solve.

    Attributes
    ----------
    method : str
        The solver used.
    iterations : (k,) int ndarray
        Iterations per column (Krylov steps or Neumann terms, summed over refinement rounds).
    residual_norms : (k,) float64 ndarray
        True final residual ``‖b_j − A x_j‖₂`` per column (computed, not estimated).
    relative_residuals : (k,) float64 ndarray
        ``residual_norms / ‖b_j‖₂`` (0 for zero right-hand sides).
    converged : (k,) bool ndarray
        Whether the column met ``rtol·‖b_j‖ + atol``.
    num_matvecs : int
        Operator-vector products used (a block product of c columns counts c).
    rounds : int
        Refinement rounds (1 if the first recurrence met the target).
    rtol, atol : float
        The tolerances requested.
    """

    method: str
    iterations: np.ndarray
    residual_norms: np.ndarray
    relative_residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    rounds: int
    rtol: float
    atol: float

    @property
    def all_converged(self) -> bool:
        """Whether every column converged."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line: method, columns converged, iterations and worst relative residual.

        Returns
        -------
        str
            The summary, e.g. for a log.
        """
        rel = self.relative_residuals
        worst = float(rel.max()) if rel.size else 0.0
        its = self.iterations
        return (
            f"{self.method}: {int(self.converged.sum())}/{self.converged.size} converged, "
            f"iterations {int(its.min()) if its.size else 0}..{int(its.max()) if its.size else 0}, "
            f"max relative residual {worst:.3g} (rtol {self.rtol:g}, atol {self.atol:g}), "
            f"{self.num_matvecs} matvecs"
        )


# ============================================================== public solvers
def cg(
    matmul: MatMul,
    B: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: MatMul | None = None,
    x0: Tensor | None = None,
    warn: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """Conjugate gradients for a symmetric positive definite ``A``, block right-hand sides.

    Parameters
    ----------
    matmul : callable
        ``X (D, c) -> A X``; A must be symmetric positive definite.
    B : Tensor
        Right-hand sides, (D,) or (D, k).
    rtol, atol : float, optional
        Stop column j at ``‖b_j − A x_j‖ ≤ rtol·‖b_j‖ + atol`` (defaults 1e-6, 0).
    maxiter : int, optional
        Iterations per column (default ``min(10·D, 1000)``).
    preconditioner : callable, optional
        ``R (D, c) -> M R`` with ``M ≈ A⁻¹`` symmetric positive definite.
    x0 : Tensor, optional
        Initial guess, same shape as ``B`` (default zeros).
    warn : bool, optional
        Issue [`SolverWarning`][curvops.SolverWarning] for columns that did not converge (default True).

    Returns
    -------
    X : Tensor
        Solutions, same shape as ``B``.
    info : SolveInfo

    Raises
    ------
    ValueError
        If the recurrence meets non-positive curvature ``pᵀAp ≤ 0`` (A is not positive
        definite) or ``rᵀMr ≤ 0`` (the preconditioner is not).
    """
    return _solve(
        "cg",
        _cg_core,
        matmul,
        B,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        x0=x0,
        warn=warn,
    )


def minres(
    matmul: MatMul,
    B: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: MatMul | None = None,
    x0: Tensor | None = None,
    warn: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """MINRES (Paige & Saunders 1975) for a symmetric, possibly indefinite ``A``.

    The preconditioner must be symmetric positive definite. The recurrence's residual
    estimate is in the ``M``-norm when preconditioned; the final check is always on the true
    2-norm residual.

    Parameters
    ----------
    matmul : callable
        ``X (D, c) -> A X``; A must be symmetric.
    B : Tensor
        Right-hand sides, (D,) or (D, k).
    rtol, atol : float, optional
        Stop column j at ``‖b_j − A x_j‖ ≤ rtol·‖b_j‖ + atol`` (defaults 1e-6, 0).
    maxiter : int, optional
        Iterations per column (default ``min(10·D, 1000)``).
    preconditioner : callable, optional
        ``R (D, c) -> M R`` with ``M ≈ A⁻¹`` symmetric positive definite.
    x0 : Tensor, optional
        Initial guess, same shape as ``B`` (default zeros).
    warn : bool, optional
        Issue [`SolverWarning`][curvops.SolverWarning] for columns that did not converge (default True).

    Returns
    -------
    X : Tensor
        Solutions, same shape as ``B``.
    info : SolveInfo
        Per-column convergence, iterations, residuals and the matvec count.
    """
    return _solve(
        "minres",
        _minres_core,
        matmul,
        B,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        x0=x0,
        warn=warn,
    )


def lsmr(
    matmul: MatMul,
    B: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: MatMul | None = None,
    x0: Tensor | None = None,
    warn: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """LSMR (Fong & Saunders 2011) for a symmetric ``A``: min ‖b − A x‖ by Golub-Kahan bidiagonalisation.

    Two sequential products per iteration (``A`` and ``Aᵀ = A``); converges like MINRES
    on ``A²``, so slower than MINRES on well-posed symmetric systems, but monotone in
    ``‖Aᵀr‖`` and meaningful for singular inconsistent systems. A preconditioner ``M``
    (symmetric positive definite) is applied from the right: ``A M y = b``, ``x = M y``,
    so the residual stays the true one.

    Parameters
    ----------
    matmul : callable
        ``X (D, c) -> A X``; A must be symmetric.
    B : Tensor
        Right-hand sides, (D,) or (D, k).
    rtol, atol : float, optional
        Stop column j at ``‖b_j − A x_j‖ ≤ rtol·‖b_j‖ + atol`` (defaults 1e-6, 0).
    maxiter : int, optional
        Iterations per column (default ``min(10·D, 1000)``).
    preconditioner : callable, optional
        ``R (D, c) -> M R`` with ``M ≈ A⁻¹`` symmetric positive definite.
    x0 : Tensor, optional
        Initial guess, same shape as ``B`` (default zeros).
    warn : bool, optional
        Issue [`SolverWarning`][curvops.SolverWarning] for columns that did not converge (default True).

    Returns
    -------
    X : Tensor
        Solutions, same shape as ``B``.
    info : SolveInfo
        Per-column convergence, iterations, residuals and the matvec count.
    """
    return _solve(
        "lsmr",
        _lsmr_core,
        matmul,
        B,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        x0=x0,
        warn=warn,
    )


def neumann(
    matmul: MatMul,
    B: Tensor,
    *,
    scale: float,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    x0: Tensor | None = None,
    warn: bool = True,
) -> tuple[Tensor, SolveInfo]:
    """Truncated Neumann series ``x = α Σ_j (I − αA)^j b``.

    Converges iff every eigenvalue of ``A`` lies in ``(0, 2/α)``, at the rate
    ``max_i |1 − αλ_i|``: ``1 − αλ_min`` for ``α = 1/λ_max``, i.e. about
    ``κ·ln(1/rtol)`` terms, versus ``√κ·ln(2/rtol)`` for CG. The residual after the j-th
    term is the next term itself, so the stopping test is exact and free.

    Parameters
    ----------
    matmul : callable
        ``X (D, c) -> A X``; every eigenvalue of A must lie in ``(0, 2/α)``.
    B : Tensor
        Right-hand sides, (D,) or (D, k).
    scale : float
        ``α > 0``; take ``1/λ_max`` (or slightly less).
    rtol, atol : float, optional
        Stop column j at ``‖b_j − A x_j‖ ≤ rtol·‖b_j‖ + atol`` (defaults 1e-6, 0).
    maxiter : int, optional
        Terms of the series per column (default ``min(10·D, 1000)``).
    x0 : Tensor, optional
        Initial guess, same shape as ``B`` (default zeros).
    warn : bool, optional
        Issue [`SolverWarning`][curvops.SolverWarning] for columns that did not converge (default True).

    Returns
    -------
    X : Tensor
        Solutions, same shape as ``B``.
    info : SolveInfo
        Per-column convergence, iterations, residuals and the matvec count.

    Raises
    ------
    FloatingPointError
        If the series diverges (``scale`` too large or ``A`` not positive definite).
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")

    def core(mm, pc, R0, target, budget):
        return _neumann_core(mm, float(scale), R0, target, budget)

    return _solve(
        "neumann",
        core,
        matmul,
        B,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        preconditioner=None,
        x0=x0,
        warn=warn,
    )


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolveInfo]]] = {
    "cg": cg,
    "minres": minres,
    "lsmr": lsmr,
    "neumann": neumann,
}


# ============================================================== driver
class _Counter:
    """Wraps ``matmul`` to count columns multiplied."""

    def __init__(self, matmul: MatMul) -> None:
        self.matmul = matmul
        self.count = 0

    def __call__(self, X: Tensor) -> Tensor:
        self.count += X.shape[1]
        out = self.matmul(X)
        if out.shape != X.shape:
            raise ValueError(
                f"the operator returned shape {tuple(out.shape)} for a block of shape {tuple(X.shape)}"
            )
        return out


def _colnorm(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X, dim=0)


def _coldot(X: Tensor, Y: Tensor) -> Tensor:
    return (X * Y).sum(0)


def _host(*tensors: Tensor) -> list[np.ndarray]:
    """Bring several (c,) tensors to the host in one transfer (one device synchronisation)."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors]).cpu().numpy()
    return list(stacked)


def _check_tolerances(rtol: float, atol: float, maxiter: int | None, dim: int) -> int:
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a non-negative number, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: no solve can meet that; give one a positive value")
    if maxiter is None:
        return min(10 * dim, 1000)
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")
    return maxiter


def _solve(name, core, matmul, B, *, rtol, atol, maxiter, preconditioner, x0, warn):
    if getattr(matmul, "sharding", None) is not None:
        raise NotImplementedError(
            f"{name} on an FSDP-sharded operator is not supported (its inner products would need "
            "all-reduces); DDP operators work"
        )
    if not torch.is_tensor(B):
        raise TypeError(f"B must be a torch tensor, got {type(B).__name__}")
    if B.dim() not in (1, 2):
        raise ValueError(f"B must have shape (D,) or (D, k), got {tuple(B.shape)}")
    if not B.dtype.is_floating_point:
        raise TypeError(f"B must be real floating point, got {B.dtype}")
    if not all_finite(B):
        raise ValueError("B contains NaN or Inf")
    vector = B.dim() == 1
    B2 = B.unsqueeze(1) if vector else B
    D, k = B2.shape
    maxiter = _check_tolerances(rtol, atol, maxiter, D)
    mm = _Counter(matmul)

    if x0 is None:
        X = torch.zeros_like(B2)
        R = B2.clone()
    else:
        if not torch.is_tensor(x0) or tuple(x0.shape) != tuple(B.shape):
            raise ValueError(
                f"x0 must be a tensor of shape {tuple(B.shape)}, got "
                f"{tuple(x0.shape) if torch.is_tensor(x0) else type(x0).__name__}"
            )
        X = (x0.unsqueeze(1) if vector else x0).to(B2).clone()
        R = B2 - mm(X)
    bnorm, rnorm = _host(_colnorm(B2), _colnorm(R))
    target = rtol * bnorm + atol
    iterations = np.zeros(k, dtype=np.int64)
    active = rnorm > target
    rounds = 0
    while active.any() and rounds < _MAX_ROUNDS:
        rounds += 1
        idx = np.nonzero(active)[0]
        tidx = torch.as_tensor(idx, device=B2.device)
        budget = maxiter - iterations[idx]
        # A refinement round exists because the recurrence's estimate was optimistic:
        # aim below the target so as not to land on its edge again.
        aim = target[idx] if rounds == 1 else _REFINE_AIM * target[idx]
        dX, its = core(mm, preconditioner, R[:, tidx], aim, budget)
        iterations[idx] += its
        Xi = X[:, tidx] + dX
        X[:, tidx] = Xi
        # The true residual: recurrences drift from it in floating point.
        Ri = B2[:, tidx] - mm(Xi)
        R[:, tidx] = Ri
        (new,) = _host(_colnorm(Ri))
        improved = new <= _REFINE_FACTOR * rnorm[idx]
        rnorm[idx] = new
        active[idx] = (new > target[idx]) & (iterations[idx] < maxiter) & improved

    converged = rnorm <= target
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(bnorm > 0, rnorm / np.where(bnorm > 0, bnorm, 1.0), 0.0)
    info = SolveInfo(
        method=name,
        iterations=iterations,
        residual_norms=rnorm,
        relative_residuals=relative,
        converged=converged,
        num_matvecs=mm.count,
        rounds=rounds,
        rtol=float(rtol),
        atol=float(atol),
    )
    if warn and not info.all_converged:
        bad = np.nonzero(~converged)[0]
        worst = bad[np.argmax(relative[bad])]
        warnings.warn(
            f"{name} did not converge for {bad.size} of {k} right-hand side(s): relative residual "
            f"{relative[worst]:.3g} (column {worst}, {iterations[worst]} iterations) > rtol={rtol:g} "
            f"(atol={atol:g}, maxiter={maxiter}). Raise maxiter, increase the damping, precondition, "
            "or loosen rtol (in float32 relative residuals below ~1e-5·cond are rounding noise).",
            SolverWarning,
            stacklevel=3,
        )
    X = X.squeeze(1) if vector else X
    return X, info


class _Block:
    """Per-column state of c independent recurrences; finished columns leave the block.

    ``state`` holds tensors whose *last* axis is the column axis ((D, c) or (c,)).
    """

    def __init__(self, D: int, c: int, like: Tensor) -> None:
        self.cols = np.arange(c)
        self.solution = torch.zeros(D, c, dtype=like.dtype, device=like.device)
        self.iterations = np.zeros(c, dtype=np.int64)

    def retire(self, done: np.ndarray, x: Tensor, it: int, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Store the solutions of the ``done`` columns and drop them from ``state``."""
        if not done.any():
            return state
        sel = np.nonzero(done)[0]
        dev = x.device
        self.solution[:, torch.as_tensor(self.cols[sel], device=dev)] = x[:, torch.as_tensor(sel, device=dev)]
        self.iterations[self.cols[sel]] = it
        keep = np.nonzero(~done)[0]
        self.cols = self.cols[keep]
        kidx = torch.as_tensor(keep, device=dev)
        return {name: t[..., kidx] for name, t in state.items()}


def _apply_pc(preconditioner: MatMul | None, R: Tensor) -> Tensor:
    if preconditioner is None:
        return R
    Z = preconditioner(R)
    if not torch.is_tensor(Z) or Z.shape != R.shape:
        returned = tuple(Z.shape) if torch.is_tensor(Z) else type(Z).__name__
        raise ValueError(f"the preconditioner returned {returned} for a block of shape {tuple(R.shape)}")
    return Z


# ============================================================== cores
# A core solves A dX = R0 from dX = 0 until each column's residual estimate meets
# target[j] or its budget[j] of iterations is spent; it returns (dX, iterations).


def _cg_core(mm, pc, R0, target, budget):
    D, c = R0.shape
    block = _Block(D, c, R0)
    Z = _apply_pc(pc, R0)
    s = {"x": torch.zeros_like(R0), "r": R0.clone(), "p": Z.clone(), "rz": _coldot(R0, Z)}
    s["rnorm"] = _colnorm(R0)
    bad_curv = torch.zeros(c, dtype=R0.dtype, device=R0.device)
    it = 0
    while True:
        rnorm, rz, curv = _host(s["rnorm"], s["rz"], bad_curv)
        if (curv < 0).any():
            j = int(np.argmax(curv < 0))
            raise ValueError(
                f"CG met non-positive curvature pᵀAp / ‖p‖² = {curv[j]:.3g} at iteration {it}: the "
                "operator (with its damping) is not positive definite. Use method='minres' (or "
                "'lsmr') for indefinite operators such as the Hessian, or increase the damping."
            )
        if pc is not None and (rz <= 0).any() and it == 0:
            raise ValueError("the preconditioner is not positive definite: rᵀMr ≤ 0")
        done = (rnorm <= target[block.cols]) | (it >= budget[block.cols]) | (rz <= 0)
        s = block.retire(done, s["x"], it, s)
        if block.cols.size == 0:
            break
        p = s["p"]
        Ap = mm(p)
        pAp = _coldot(p, Ap)
        # Relative to ‖p‖² so that the test is scale-free; > 0 for any PD operator.
        tiny = torch.finfo(p.dtype).tiny
        bad_curv = torch.where(pAp > 0, torch.zeros_like(pAp), pAp / _coldot(p, p).clamp_min(tiny))
        alpha = torch.where(pAp > 0, s["rz"] / pAp.clamp_min(tiny), torch.zeros_like(pAp))
        s["x"] = s["x"] + alpha * p
        r = s["r"] - alpha * Ap
        z = _apply_pc(pc, r)
        rz_new = _coldot(r, z)
        beta = rz_new / s["rz"]
        s["p"] = z + beta * p
        s["r"], s["rz"], s["rnorm"] = r, rz_new, _colnorm(r)
        it += 1
    return block.solution, block.iterations


def _minres_core(mm, pc, R0, target, budget):
    D, c = R0.shape
    eps = torch.finfo(R0.dtype).eps
    tiny = torch.finfo(R0.dtype).tiny
    block = _Block(D, c, R0)
    y = _apply_pc(pc, R0)
    beta1_sq = _coldot(R0, y)
    (b1,) = _host(beta1_sq)
    if (b1 < 0).any():
        raise ValueError("the preconditioner is not positive definite: rᵀMr < 0")
    beta1 = beta1_sq.clamp_min(0).sqrt()
    zeros = torch.zeros_like(beta1)
    # The estimate phibar is ‖r‖ in the M-norm when preconditioned: stop on the same
    # relative reduction that the 2-norm target asks for (the driver verifies the result).
    r0norm = _colnorm(R0)
    s = {
        "x": torch.zeros_like(R0),
        "r1": R0.clone(),
        "r2": R0.clone(),
        "y": y,
        "w": torch.zeros_like(R0),
        "w2": torch.zeros_like(R0),
        "beta": beta1,
        "oldb": zeros.clone(),
        "dbar": zeros.clone(),
        "epsln": zeros.clone(),
        "phibar": beta1.clone(),
        "cs": -torch.ones_like(beta1),
        "sn": zeros.clone(),
        "ratio": beta1 / r0norm.clamp_min(tiny),
    }
    it = 0
    while True:
        phibar_host, beta_host, ratio_host = _host(s["phibar"], s["beta"], s["ratio"])
        if (beta_host < 0).any():
            raise ValueError("the preconditioner is not positive definite: rᵀMr < 0")
        tgt = target[block.cols] * ratio_host
        done = (phibar_host <= tgt) | (it >= budget[block.cols]) | (beta_host <= 0)
        s = block.retire(done, s["x"], it, s)
        if block.cols.size == 0:
            break
        beta = s["beta"]
        v = s["y"] / beta
        y = mm(v)
        if it > 0:
            y = y - (beta / s["oldb"]) * s["r1"]
        alfa = _coldot(v, y)
        y = y - (alfa / beta) * s["r2"]
        r1, r2 = s["r2"], y
        y = _apply_pc(pc, r2)
        oldb = beta
        beta_sq = _coldot(r2, y)
        # Negative only through a non-PD preconditioner (checked on the host next round);
        # clamp so that the sqrt stays finite until then.
        beta = torch.where(beta_sq < 0, -torch.ones_like(beta_sq), beta_sq.clamp_min(0).sqrt())
        betap = beta.clamp_min(0)
        oldeps = s["epsln"]
        delta = s["cs"] * s["dbar"] + s["sn"] * alfa
        gbar = s["sn"] * s["dbar"] - s["cs"] * alfa
        epsln = s["sn"] * betap
        dbar = -s["cs"] * betap
        gamma = torch.hypot(gbar, betap).clamp_min(eps)
        cs, sn = gbar / gamma, betap / gamma
        phi = cs * s["phibar"]
        w1, w2 = s["w2"], s["w"]
        w = (v - oldeps * w1 - delta * w2) / gamma
        s.update(
            x=s["x"] + phi * w,
            r1=r1,
            r2=r2,
            y=y,
            w=w,
            w2=w2,
            beta=beta,
            oldb=oldb,
            dbar=dbar,
            epsln=epsln,
            phibar=sn * s["phibar"],
            cs=cs,
            sn=sn,
        )
        it += 1
    return block.solution, block.iterations


def _lsmr_core(mm, pc, R0, target, budget):
    D, c = R0.shape
    eps = torch.finfo(R0.dtype).eps
    tiny = torch.finfo(R0.dtype).tiny

    def A(V):  # right-preconditioned operator A M
        return mm(_apply_pc(pc, V))

    def At(U):  # its transpose M A (A and M symmetric)
        return _apply_pc(pc, mm(U))

    def safe_div(X, d):
        return X / torch.where(d > 0, d, torch.ones_like(d))

    block = _Block(D, c, R0)
    beta = _colnorm(R0)
    u = safe_div(R0, beta)
    v = At(u)
    alpha = _colnorm(v)
    v = safe_div(v, alpha)
    ones, zeros = torch.ones_like(beta), torch.zeros_like(beta)
    s = {
        "y": torch.zeros_like(R0),
        "u": u,
        "v": v,
        "h": v.clone(),
        "hbar": torch.zeros_like(R0),
        "alpha": alpha,
        "zetabar": alpha * beta,
        "alphabar": alpha.clone(),
        "rho": ones.clone(),
        "rhobar": ones.clone(),
        "cbar": ones.clone(),
        "sbar": zeros.clone(),
        "betadd": beta.clone(),
        "betad": zeros.clone(),
        "rhodold": ones.clone(),
        "tautildeold": zeros.clone(),
        "thetatilde": zeros.clone(),
        "zeta": zeros.clone(),
        "normA2": alpha * alpha,
        "normr": beta.clone(),
        "normar": (alpha * beta).abs(),
    }
    it = 0
    while True:
        normr_host, normar_host, normA2_host = _host(s["normr"], s["normar"], s["normA2"])
        # normar = ‖(AM)ᵀ r‖ ≈ 0 with r ≠ 0: a least-squares point of a singular system.
        stalled = normar_host <= 10 * eps * np.sqrt(normA2_host) * normr_host
        done = (normr_host <= target[block.cols]) | (it >= budget[block.cols]) | stalled
        # Store x = M y for the retiring columns.
        if done.any():
            s = block.retire(done, _apply_pc(pc, s["y"]) if pc is not None else s["y"], it, s)
        if block.cols.size == 0:
            break
        u = A(s["v"]) - s["alpha"] * s["u"]
        beta = _colnorm(u)
        u = safe_div(u, beta)
        v = At(u) - beta * s["v"]
        alpha = _colnorm(v)
        v = safe_div(v, alpha)
        # No damping inside LSMR (it is part of A): alphahat = alphabar, chat = 1, shat = 0.
        alphabar = s["alphabar"]
        rhoold = s["rho"]
        rho = torch.hypot(alphabar, beta).clamp_min(tiny)
        cc, ss = alphabar / rho, beta / rho
        thetanew = ss * alpha
        alphabar = cc * alpha
        rhobarold, zetaold = s["rhobar"], s["zeta"]
        thetabar = s["sbar"] * rho
        rhobar = torch.hypot(s["cbar"] * rho, thetanew).clamp_min(tiny)
        cbar = s["cbar"] * rho / rhobar
        sbar = thetanew / rhobar
        zeta = cbar * s["zetabar"]
        zetabar = -sbar * s["zetabar"]
        hbar = s["h"] - (thetabar * rho / (rhoold * rhobarold)) * s["hbar"]
        y = s["y"] + (zeta / (rho * rhobar)) * hbar
        h = v - (thetanew / rho) * s["h"]
        # Estimate ‖r‖ (Fong & Saunders, section 5.2).
        betaacute = s["betadd"]
        betahat = cc * betaacute
        betadd = -ss * betaacute
        thetatildeold = s["thetatilde"]
        rhotildeold = torch.hypot(s["rhodold"], thetabar).clamp_min(tiny)
        ctildeold, stildeold = s["rhodold"] / rhotildeold, thetabar / rhotildeold
        thetatilde = stildeold * rhobar
        rhodold = (ctildeold * rhobar).clamp_min(tiny)
        betad = -stildeold * s["betad"] + ctildeold * betahat
        tautildeold = (zetaold - thetatildeold * s["tautildeold"]) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        normr = torch.sqrt((betad - taud) ** 2 + betadd**2)
        normA2 = s["normA2"] + beta * beta + alpha * alpha
        s.update(
            y=y,
            u=u,
            v=v,
            h=h,
            hbar=hbar,
            alpha=alpha,
            zetabar=zetabar,
            alphabar=alphabar,
            rho=rho,
            rhobar=rhobar,
            cbar=cbar,
            sbar=sbar,
            betadd=betadd,
            betad=betad,
            rhodold=rhodold,
            tautildeold=tautildeold,
            thetatilde=thetatilde,
            zeta=zeta,
            normA2=normA2,
            normr=normr,
            normar=zetabar.abs(),
        )
        it += 1
    return block.solution, block.iterations


def _neumann_core(mm, scale, R0, target, budget):
    D, c = R0.shape
    block = _Block(D, c, R0)
    # After adding the term V_j, the residual b − A x is exactly the next term V_{j+1}.
    s = {"x": scale * R0, "v": R0 - scale * mm(R0), "r0": _colnorm(R0)}
    s["vnorm"] = _colnorm(s["v"])
    it = 1
    while True:
        vnorm, r0h = _host(s["vnorm"], s["r0"])
        finite = np.isfinite(vnorm)
        if (~finite).any() or (vnorm > _DIVERGENCE_FACTOR * r0h).any():
            raise FloatingPointError(
                f"the Neumann series diverges (residual grew to "
                f"{np.nanmax(np.where(finite, vnorm / r0h, np.inf)):.3g}× "
                f"the initial one after {it} terms): scale={scale:g} is too large (it must be < 2/λ_max) "
                "or the operator with its damping is not positive definite"
            )
        done = (vnorm <= target[block.cols]) | (it >= budget[block.cols])
        s = block.retire(done, s["x"], it, s)
        if block.cols.size == 0:
            break
        v = s["v"]
        s["x"] = s["x"] + scale * v
        s["v"] = v - scale * mm(v)
        s["vnorm"] = _colnorm(s["v"])
        it += 1
    return block.solution, block.iterations
