"""Extremal eigenpairs of symmetric operators: thick-restart Lanczos and deflated power iteration."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import scipy.linalg

from curvops.algorithms._checks import check_int, check_seed
from curvops.algorithms.lanczos_core import (
    BREAKDOWN_FACTOR,
    LanczosState,
    PartialReorthogonalization,
    random_orthogonal,
    start_block,
    tridiagonal_head,
    unit_columns,
)
from curvops.algorithms.vectors import Array, Operand, as_operand

Which = Literal["LA", "SA", "LM", "BE"]
WHICH_OPTIONS: tuple[str, ...] = ("LA", "SA", "LM", "BE")

# A wanted Ritz pair whose residual is below min(_LOCK * tol, 1000 eps) * ||A|| at a restart is
# locked: kept as it is, its coupling to the residual dropped. Each other pair's residual then
# differs from its estimate by at most the largest locked residual (the locked vectors are
# orthonormal), which the convergence test subtracts from its threshold.
_LOCK = 0.01


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Array fields are torch tensors on the operator's device/dtype when the algorithm ran on
    the torch path, numpy arrays otherwise.

    Attributes
    ----------
    eigenvalues : (k,) array
        Ritz values, ordered by the ``which`` criterion (see [`lanczos`][curvops.lanczos]).
    eigenvectors : (D, k) array
        Unit-norm Ritz vectors; column ``i`` belongs to ``eigenvalues[i]``. From
        [`lanczos`][curvops.lanczos] orthonormal to about ``min(sqrt(eps), tol / 100)`` (the basis'
        orthogonality), not to rounding.
    residual_norms : (k,) array
        ``||A v_i - lambda_i v_i||_2`` of each returned pair (same units as the eigenvalues).
    converged : (k,) bool array
        Whether ``residual_norms[i] <= tol * spectral_norm_estimate``.
    num_matvecs : int
        Operator-vector products used in total (a ``(D, b)`` block product counts ``b``).
    num_restarts : int
        Restarts performed (0 for power iteration).
    spectral_norm_estimate : float
        Largest ``|Ritz value|`` seen, a lower bound on ``||A||_2`` used to scale ``tol``.
    """

    eigenvalues: Array
    eigenvectors: Array
    residual_norms: Array
    converged: Array
    num_matvecs: int
    num_restarts: int
    spectral_norm_estimate: float


def _check_which(which: str) -> Which:
    if which not in WHICH_OPTIONS:
        raise ValueError(f"which must be one of {WHICH_OPTIONS}, got {which!r}")
    return cast(Which, which)


def _check_tol(tol: float | None, operand: Operand) -> float:
    if tol is None:
        return math.sqrt(operand.eps)
    tol = float(tol)
    # A residual of ||A|| or more bounds nothing: every unit vector with its Rayleigh quotient
    # meets it, so a pair "converged" to such a tol says nothing about the eigenvalues.
    if not 0.0 < tol < 1.0:
        raise ValueError(
            f"tol is a relative residual tolerance (a pair converges when ||A v - lambda v|| <= "
            f"tol * ||A||), so it must lie in (0, 1), e.g. 1e-6; got {tol}"
        )
    return tol


def _select(theta: Any, which: str, count: int) -> list[int]:
    """Indices of the ``count`` Ritz values preferred by ``which``, in output order (a stable
    ordering: ties keep index order). ``theta`` is a sequence or a numpy array of floats."""
    # Python's sort on host floats: this runs after every Lanczos step, where numpy's per-call
    # overhead (several microseconds in-run, after a product) costs more than sorting ~20 floats.
    values = theta.tolist() if isinstance(theta, np.ndarray) else theta
    indices = range(len(values))
    if which == "LA":
        order = sorted(indices, key=values.__getitem__, reverse=True)  # reverse keeps ties in order
    elif which == "SA":
        order = sorted(indices, key=values.__getitem__)
    elif which == "LM":
        order = sorted(indices, key=lambda index: abs(values[index]), reverse=True)
    else:  # BE: ceil(count/2) from the top, floor(count/2) from the bottom (as ARPACK)
        ascending = sorted(indices, key=values.__getitem__)
        num_top = (count + 1) // 2
        chosen = ascending[::-1][:num_top] + ascending[: count - num_top]
        return sorted(chosen, key=values.__getitem__, reverse=True)
    return order[:count]


def _num_kept(k: int, basis_size: int, num_converged: int) -> int:
    """How many Ritz vectors a thick restart keeps.

    The k wanted ones plus one extra per converged wanted pair, up to half of the free slots:
    ARPACK's ``nev + min(nconv, np / 2)`` (keeping converged directions stops them from
    re-entering the search). A larger cap restarts more often for few matvecs saved; with half
    the matvec count stays at most ARPACK's from the same start (docs/benchmarks.md#lanczos).
    """
    free = basis_size - k
    return min(k + min(num_converged, free // 2), basis_size - 1)


def lanczos(
    A: Any,
    k: int = 6,
    *,
    which: Which = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    max_basis_size: int | None = None,
    block_size: int = 1,
    v0: Any = None,
    seed: int | None = None,
    exact_residuals: bool = True,
    dim: int | None = None,
) -> EigenResult:
    """``k`` extremal eigenpairs of a symmetric operator by thick-restart (block) Lanczos.

    Lanczos with reorthogonalization (known couplings subtracted first, then classical
    Gram-Schmidt with a DGKS re-pass) that keeps the basis orthogonal to
    ``min(sqrt(eps), tol / 100)``: semi-orthogonality, with which the Ritz values are accurate
    to rounding (Simon 1984); the returned eigenvectors are orthonormal to about that level.
    For ``block_size = 1`` the drift of each new vector from every stored one is estimated by
    Simon's recurrence (generalised to thick restarts) and only the rows near that level are
    measured and removed, from two consecutive vectors (partial reorthogonalization; also the
    first two of each cycle after a restart, which resets the drift), so most steps read none
    of the stored basis; on an accelerator, where such a pass costs less than the estimate's
    host time, every row's drift is measured in the step's one read instead (where its rounding
    allows: at tolerances above about ``1e-8``). The per-step convergence check solves the
    tridiagonal projected problem (the kept block of a restart is reduced to tridiagonal form
    once). The recurrence and both reorthogonalization policies are those of
    ``curvops.algorithms.lanczos_core``. Thick restarts
    (Wu and Simon 2000): the basis never holds more than ``max_basis_size + block_size``
    vectors of length ``D``; at a restart the wanted Ritz vectors and some of their neighbours
    are kept and the recurrence continues from the residual block. Wanted pairs converged to
    ``min(tol / 100, 1000 eps)`` are locked (``block_size = 1``): later restarts leave them as
    they are. With ``block_size = b > 1`` every step applies ``A`` to a ``(D, b)`` block in
    one block product. A cycle holds at most ``D`` vectors, its basis and the residual block:
    where ``max_basis_size + b > D`` the basis is ``D - b`` vectors if that is at least the
    default size, else (small ``D``) ``A`` is applied to the whole standard basis instead,
    ``b`` columns at a time (``D`` products, about one such cycle), and its eigenpairs are
    exact to rounding. Operators of any norm within the dtype's range are handled alike: where the
    first product is far from 1 in size, every product is scaled by a power of two (exact) and
    the results scaled back.

    Parameters
    ----------
    A
        Symmetric ``(D, D)`` operator: curvops/torch-native operator or dense torch tensor
        (torch path, on its device/dtype), scipy ``LinearOperator``/sparse matrix/numpy array
        (numpy path), or callable ``v -> A v`` with ``dim=D`` (numpy path, float64).
    k
        Number of eigenpairs, ``1 <= k < D``.
    which
        ``"LA"`` largest algebraic (output descending), ``"SA"`` smallest algebraic (output
        ascending, most negative first), ``"LM"`` largest magnitude (output by descending
        ``|lambda|``), ``"BE"`` both ends: ``ceil(k/2)`` largest and ``floor(k/2)`` smallest
        (output descending). Default ``"LA"``.
    tol
        Relative residual tolerance in ``(0, 1)`` (``ValueError`` otherwise: a residual of
        ``||A||`` bounds nothing): pair ``i`` is converged when
        ``||A v_i - lambda_i v_i|| <= tol * ||A||_est`` (backward error: ``(lambda_i, v_i)`` is
        an exact eigenpair of ``A + E`` with ``||E|| <= tol ||A||``; the eigenvalue error is at
        most the residual norm). ``||A||_est`` is the largest ``|Ritz value|``. Default
        ``sqrt(eps)`` of the working dtype (1.5e-8 in float64, 3.5e-4 in float32).
        Iteration stops on residuals only, never on eigenvalue change. Below about
        ``sqrt(D) eps`` the residuals' rounding may not meet it: the pairs are then reported
        not converged, with a warning.
    max_iter
        Maximum number of matvecs in the Lanczos steps (the final residual block is extra).
        Default ``max(1000, 50 * max_basis_size)``. Not applied to the ``D`` products of the
        whole-space case (``block_size > 1`` and small ``D``, see above).
    max_basis_size
        Basis vectors between restarts (ARPACK's ``ncv``), ``k + block_size <= m <= D``.
        Default ``min(D, max(2 k + 1, 20, k + 2 block_size))`` (``eigsh``'s default for b = 1).
        With ``block_size > 1`` at most ``D - block_size`` are used (see above).
    block_size
        Lanczos block size ``b >= 1``. A single-vector Krylov space (b = 1, default, as ARPACK)
        contains one direction per eigenvalue: further copies of a repeated eigenvalue appear
        only through rounding and can be missed when the other wanted pairs converge first.
        Use ``b >=`` the expected multiplicity to find them reliably.
    v0
        Start vector ``(D,)`` or start block ``(D, b)`` (numpy or torch); default Gaussian from
        ``seed``. Unused in the whole-space case (see above).
    seed
        Seed for the start block and for breakdown restarts. The same seed gives the same
        result within a backend (numpy, or torch on a given device); ``None`` draws fresh
        entropy.
    exact_residuals
        If True (default), ``residual_norms`` are computed explicitly as the column norms of
        ``A Y - Y diag(lambda)`` with one block product (``k`` extra matvecs). If False, the
        Lanczos estimates ``||B_m S_{m,i}||`` are returned, which agree to ``O(eps ||A||)``
        under full reorthogonalization.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    EigenResult
        A ``RuntimeWarning`` is issued if some pair did not converge within ``max_iter``.
    """
    operand = as_operand(A, dim)
    which = _check_which(which)
    k, width, basis_size, default_basis_size = _check_sizes(operand.dim, k, block_size, max_basis_size)
    tol = _check_tol(tol, operand)
    max_steps = max(1000, 50 * basis_size) if max_iter is None else check_int(max_iter, "max_iter", width)
    rng = operand.rng(check_seed(seed))
    # Every product is of A / s, s a power of two of about the first product's size where
    # ||A|| is far from 1 (see Operand.scale_products); results are scaled back at the end.
    operand.scale_products()
    if width > 1 and basis_size + width > operand.dim:
        # A cycle would need more than D orthonormal rows (its basis and the residual block
        # after it): its last blocks would have fewer new directions than columns, and no
        # direction is left to replace the others with. Where a basis of the default size
        # still fits beside the residual block, the basis shrinks to D - b; else (D < about
        # 20 + b) the whole space costs about as many products as one such cycle, and its Ritz
        # pairs are the eigenpairs, where a tiny basis could restart past a wanted one.
        if operand.dim - width >= default_basis_size:
            basis_size = operand.dim - width
        else:
            problem = _Problem(operand, k, which, tol, width, basis_size, max_steps, exact_residuals)
            spanned = f"although the products spanned the whole space (D={operand.dim})"
            return _finish(problem, _whole_space(problem), f"{spanned}: tol is below their rounding")
    problem = _Problem(operand, k, which, tol, width, basis_size, max_steps, exact_residuals)
    return _finish(problem, _restarted_lanczos(problem, v0, rng), f"within max_iter={max_steps} matvecs")


@dataclass(frozen=True)
class _Problem:
    """The checked arguments of [`lanczos`][curvops.lanczos] (see there): the operator in the vector layer,
    ``k``, ``which``, ``tol``, the block size, the basis size between restarts, the matvec
    budget of the steps and whether the final residuals are computed explicitly."""

    operand: Operand
    k: int
    which: str
    tol: float
    width: int
    basis_size: int
    max_steps: int
    exact_residuals: bool


@dataclass(frozen=True)
class _RitzPairs:
    """The wanted Ritz pairs a run ends with, in the units of the scaled products
    (``Operand.scale_products``): values, vectors ``(D, k)``, residual estimates, the
    ``||A||`` estimate and the restarts taken."""

    eigenvalues: np.ndarray
    vectors: Array
    estimates: np.ndarray
    norm_estimate: float
    restarts: int


@dataclass(frozen=True)
class _Cycle:
    """One restart cycle's outcome: the basis rows ``[0, stop)`` reached, the residual block's
    ``(b, b)`` coupling, the Ritz values, vectors (in the basis) and residual estimates, the
    wanted indices and how many of them have converged."""

    stop: int
    coupling: np.ndarray
    theta: np.ndarray
    vectors: np.ndarray
    residual_estimates: np.ndarray
    wanted: list[int]
    num_converged: int


def _check_sizes(size: int, k: Any, block_size: Any, max_basis_size: Any) -> tuple[int, int, int, int]:
    """Checked ``k``, block size and basis size of [`lanczos`][curvops.lanczos] on a ``D = size`` operator,
    and the default basis size."""
    k = check_int(k, "k", 1)
    if k >= size:
        raise ValueError(
            f"lanczos needs k < D (got k={k}, D={size}); use numpy.linalg.eigh for all eigenpairs"
        )
    width = check_int(block_size, "block_size", 1)
    if k + width > size:
        raise ValueError(
            f"lanczos needs k + block_size <= D (got {k} + {width} > {size}): use block_size <= {size - k}"
        )
    default_basis_size = max(2 * k + 1, 20, k + 2 * width)
    if max_basis_size is None:
        basis_size = min(size, default_basis_size)
    else:
        basis_size = check_int(max_basis_size, "max_basis_size", k + width)
        if basis_size > size:
            raise ValueError(f"max_basis_size must be <= D={size}, got {basis_size}")
    return k, width, basis_size, default_basis_size


def _restarted_lanczos(problem: _Problem, v0: Any, rng: Any) -> _RitzPairs:
    """Thick-restart Lanczos cycles (Wu & Simon 2000) until the wanted pairs converge or the
    matvec budget is spent; the wanted Ritz pairs."""
    operand, width = problem.operand, problem.width
    # Basis orthogonality kept: semi-orthogonality, sqrt(eps) (1.5e-8 in float64), which keeps
    # the Ritz values accurate to rounding (Simon 1984), and 100x below tol, so that the
    # residual estimates are within 1% of tol. The drift regrows by a roughly constant factor
    # per step after each pair of updates, so a tighter level only makes the pairs more frequent.
    orthogonality = min(math.sqrt(operand.eps), 0.01 * problem.tol)
    state = LanczosState(operand, problem.basis_size, width, rng, orthogonality)
    state.basis[:width] = start_block(operand, v0, width, rng)
    search = _RestartedSearch(state, problem)
    while True:
        cycle = search.run_cycle(problem.max_steps)
        out_of_budget = operand.num_matvecs + width > problem.max_steps
        if (cycle.num_converged == problem.k and len(cycle.wanted) == problem.k) or out_of_budget:
            break
        search.thick_restart(cycle)
    stop, wanted = cycle.stop, cycle.wanted
    weights = state.scales[:stop, None] * cycle.vectors[:, wanted]
    ritz_vectors = operand.matmul(state.basis[:stop].T, operand.from_host(weights))
    return _RitzPairs(
        cycle.theta[wanted],
        ritz_vectors,
        cycle.residual_estimates[wanted],
        state.norm_estimate,
        search.restarts,
    )


class _RestartedSearch:
    """Thick restarts, locking and Ritz extraction of [`lanczos`][curvops.lanczos] on a ``LanczosState``.

    After a thick restart (Wu & Simon 2000) the state's projection is ``diag(theta)`` on the kept
    rows ``[0, start)`` plus their couplings to row ``start`` (an "arrow"), banded from
    ``start`` on. Rows ``[0, locked)`` hold wanted Ritz pairs converged far below ``tol``,
    frozen: restarts recombine, and the projected eigenproblem covers, only the rows after them.
    The lock level keeps the dropped couplings rounding-sized (each enters the drift estimates
    of its row).

    Parameters
    ----------
    state
        The Lanczos basis and projection, its start block set.
    problem
        ``k``, ``which``, ``tol`` and the basis size between restarts (see [`lanczos`][curvops.lanczos]).
    """

    def __init__(self, state: LanczosState, problem: _Problem) -> None:
        self.state = state
        self.k, self.which, self.tol, self.basis_size = (
            problem.k,
            problem.which,
            problem.tol,
            problem.basis_size,
        )
        tol = problem.tol
        self.width = state.width
        self.start, self.restarts = 0, 0
        self.locked, self.locked_residuals = 0, np.zeros(0)
        self.locked_residual_floats: list[float] = []  # the same as host floats, for the per-step check
        # The restart's kept block in tridiagonal form (single-vector Lanczos; none kept at first).
        self.head = (np.zeros((0, 0)), np.zeros(0), np.zeros(0))
        self.lock_threshold = min(_LOCK * tol, 1e3 * state.operand.eps)
        self.converged = self.single_converged if self.width == 1 else self.block_converged
        # Single-vector Lanczos: the policy keeps the locked rows' residuals as host floats.
        self.drift = state.policy if isinstance(state.policy, PartialReorthogonalization) else None

    def active_threshold(self, threshold: float) -> float:
        """``threshold`` less the largest locked residual (each other pair's residual differs
        from its estimate by at most that much)."""
        return threshold - (float(self.locked_residuals.max()) if self.locked else 0.0)

    def active_eigh(self, stop: int, vectors: bool) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of the active block ``[locked, stop)``; with
        ``vectors=False`` only the last ``width`` rows of the eigenvectors are exact."""
        locked, projected = self.locked, self.state.projected
        if self.width == 1 and stop - locked > 1:  # (LAPACK's wrapper rejects n = 1)
            # Single-vector Lanczos: the active block is tridiagonal once the restart's kept
            # block is (see tridiagonal_head), and a tridiagonal eigensolver costs half of a
            # dense one in-run (this runs after every step; see docs/benchmarks.md#lanczos).
            rotation, head_diagonal, head_off = self.head
            kept = head_diagonal.size
            diagonal = np.empty(stop - locked)
            off = np.empty(stop - locked - 1)
            diagonal[:kept] = head_diagonal
            off[:kept] = head_off
            diagonal[kept:] = projected.diagonal()[self.start : stop]
            off[kept:] = projected.diagonal(1)[self.start : stop - 1]
            values, active, info = scipy.linalg.lapack.dstev(diagonal, off, compute_v=1)
            if info == 0:
                if vectors and kept:
                    active[:kept] = rotation @ active[:kept]
                return values, active
        return np.linalg.eigh(projected[locked:stop, locked:stop])

    def active_ritz(
        self, stop: int, coupling: np.ndarray, vectors: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values and residual estimates of rows ``[0, stop)`` (locked rows first), and the
        eigenvectors of the active block ``[locked, stop)`` (only their last rows exact unless
        ``vectors``): all the per-step check needs."""
        locked = self.locked
        values, active = self.active_eigh(stop, vectors)
        last = coupling @ active[-self.width :]
        # Filled in place: np.concatenate/np.diag wrappers cost more than the copies.
        theta, residuals = np.empty(stop), np.empty(stop)
        theta[:locked] = self.state.projected.diagonal()[:locked]
        theta[locked:] = values
        residuals[:locked] = self.locked_residuals
        if self.width == 1:
            np.abs(last[0], out=residuals[locked:])
        else:
            residuals[locked:] = np.sqrt(np.square(last).sum(0))
        return theta, active, residuals

    def ritz(self, stop: int, coupling: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values, vectors (in the basis) and residual estimates of rows ``[0, stop)``."""
        locked = self.locked
        theta, active, residuals = self.active_ritz(stop, coupling, vectors=True)
        vectors = np.zeros((stop, stop))
        vectors[np.arange(locked), np.arange(locked)] = 1.0
        vectors[locked:, locked:] = active
        return theta, vectors, residuals

    def block_converged(self, stop: int, coupling: np.ndarray, norm_bound: float) -> bool:
        """Whether the wanted pairs of rows ``[0, stop)`` have converged (asked after every block).

        Checked after every block (an m x m eigenproblem, negligible next to a matvec), so the
        run ends as soon as the residuals allow instead of at the next restart. In the first
        cycle only from 2k vectors on, so that a nearly invariant small Krylov space of a lucky
        start does not end the run before the basis has explored the spectrum.
        """
        k = self.k
        if self.restarts == 0 and stop < min(2 * k, self.basis_size):
            return False
        # No (m, m) assembly of the vectors: on a GPU the host side of a step is its overhead.
        theta, _, residuals = self.active_ritz(stop, coupling)
        threshold = self.active_threshold(self.tol * max(norm_bound, float(np.abs(theta).max())))
        return bool((residuals[_select(theta, self.which, min(k, stop))] <= threshold).all()) and stop >= k

    def single_converged(self, stop: int, beta: float, norm_bound: float) -> bool:
        """``block_converged`` for single-vector Lanczos, on host floats: the tridiagonal
        eigensolver's output is read once (values and the eigenvectors' last row), the rest is
        Python arithmetic on about 20 numbers (each numpy call costs microseconds in-run)."""
        k, locked = self.k, self.locked
        if self.restarts == 0 and stop < min(2 * k, self.basis_size):
            return False
        if stop - locked < 2:
            return self.block_converged(stop, np.array([[beta]]), norm_bound)
        projection = self.state.projection
        values, active, info = scipy.linalg.lapack.dstev(*projection.active(stop), compute_v=1)
        if info != 0:  # the dense eigensolver instead
            return self.block_converged(stop, np.array([[beta]]), norm_bound)
        theta = projection.diag[:locked] + values.tolist()
        residuals = self.locked_residual_floats + [abs(beta * last) for last in active[-1].tolist()]
        threshold = self.active_threshold(self.tol * max(norm_bound, max(map(abs, theta))))
        wanted = _select(theta, self.which, min(k, stop))
        return all(residuals[index] <= threshold for index in wanted) and stop >= k

    def run_cycle(self, max_steps: int) -> _Cycle:
        """Extend the state from the cycle's start until its basis is full, the wanted pairs
        converge or the matvec budget ``max_steps`` is spent, then its Ritz pairs.

        At least one block fits: ``start <= basis_size - width`` after a restart, and the run
        ends before the budget drops below one block."""
        state, width, start = self.state, self.width, self.start
        num_blocks = min((self.basis_size - start) // width, (max_steps - state.operand.num_matvecs) // width)
        coupling, stop = state.extend(start, start + width * num_blocks, self.converged)
        theta, vectors, residual_estimates = self.ritz(stop, coupling)
        norm_estimate = state.norm_estimate = max(state.norm_estimate, float(np.abs(theta).max()))
        wanted = _select(theta, self.which, min(self.k, stop))
        threshold = self.active_threshold(self.tol * norm_estimate)
        num_converged = int(np.sum(residual_estimates[wanted] <= threshold))
        return _Cycle(stop, coupling, theta, vectors, residual_estimates, wanted, num_converged)

    def thick_restart(self, cycle: _Cycle) -> None:
        """Restart the state from the kept Ritz vectors of the cycle's rows ``[0, stop)`` (Wu &
        Simon 2000).

        The basis becomes the kept Ritz vectors, the projection ``diag(theta)`` plus their
        couplings to the residual block, which moves behind them. Locked rows stay where they
        are; newly locked ones (wanted pairs with residual estimates below the lock level;
        single-vector Lanczos only) come next, then the other kept Ritz vectors: only the rows
        after the old locked ones are recombined.
        """
        order, lockable = self._restart_order(cycle)
        self._recombine(cycle, order)
        newly = int(lockable[order[self.locked :]].sum())
        self._load_projection(cycle, order, newly)
        self.restarts += 1

    def _restart_order(self, cycle: _Cycle) -> tuple[np.ndarray, np.ndarray]:
        """The kept columns of the cycle's Ritz vectors in their new row order (locked rows,
        newly locked ones, the others; ARPACK's count, ``_num_kept``), and which columns may
        be locked."""
        width, locked = self.width, self.locked
        num_kept = _num_kept(self.k, self.basis_size - width + 1, cycle.num_converged)
        kept = np.asarray(_select(cycle.theta, self.which, num_kept))
        lockable = np.zeros(cycle.stop, dtype=bool)
        if width == 1:
            wanted = cycle.wanted
            lockable[wanted] = (
                cycle.residual_estimates[wanted] <= self.lock_threshold * self.state.norm_estimate
            )
        moving = kept[kept >= locked][: max(num_kept - locked, 0)]
        # Array operations: list comprehensions over numpy integers cost more, once per restart.
        order = np.concatenate((np.arange(locked), moving[lockable[moving]], moving[~lockable[moving]]))
        return order, lockable

    def _recombine(self, cycle: _Cycle, order: np.ndarray) -> None:
        """One recombination of the rows after the locked ones gives the kept Ritz vectors and
        moves the residual block after them, normalized (its recorded scale applied: carried
        over restarts, it would drift); the drift estimates follow (Simon 1984)."""
        state, width, locked, stop = self.state, self.width, self.locked, cycle.stop
        scales, num_kept = state.scales, order.size
        combination = np.zeros((num_kept - locked + width, stop - locked + width))
        kept_vectors = cycle.vectors[locked:stop, order[locked:]].T * scales[locked:stop]
        combination[: num_kept - locked, : stop - locked] = kept_vectors
        combination[num_kept - locked :, stop - locked :] = np.diag(scales[stop : stop + width])
        state.operand.combine_rows_(state.basis[locked : stop + width], combination)
        scales[locked : num_kept + width] = 1.0
        if self.drift is not None:
            self.drift.restart(cycle.vectors, order)

    def _load_projection(self, cycle: _Cycle, order: np.ndarray, newly: int) -> None:
        """Lock ``newly`` more rows and set the projection to ``diag(theta)`` on the kept rows
        plus their couplings ("arrow") to the residual block; the locked rows' couplings (below
        the lock level) are dropped."""
        state, width, locked, drift = self.state, self.width, self.locked, self.drift
        projected, num_kept = state.projected, order.size
        arrow = cycle.coupling @ cycle.vectors[cycle.stop - width : cycle.stop, order]
        self.locked_residuals = np.concatenate(
            [self.locked_residuals, cycle.residual_estimates[order[locked : locked + newly]]]
        )
        self.locked = locked = locked + newly
        arrow[:, :locked] = 0.0  # the locked rows' couplings (<= lock_threshold ||A||) are dropped
        self.locked_residual_floats = self.locked_residuals.tolist()
        if drift is not None:
            drift.locked_residuals = self.locked_residual_floats
        projected[:] = 0.0
        projected[np.arange(num_kept), np.arange(num_kept)] = cycle.theta[order]
        projected[num_kept : num_kept + width, :num_kept] = arrow
        projected[:num_kept, num_kept : num_kept + width] = arrow.T
        self.start = num_kept
        if width == 1:
            self.head = tridiagonal_head(projected, locked, num_kept)
            state.projection.load(num_kept, self.head)


def _whole_space(problem: _Problem) -> _RitzPairs:
    """The ``k`` wanted eigenpairs from the products of the whole standard basis, ``width``
    columns at a time: the projected matrix is ``A`` itself (symmetrized), and its eigenpairs'
    residuals in it are the residual estimates."""
    operand, k, which, width = problem.operand, problem.k, problem.which, problem.width
    size = operand.dim
    identity = operand.identity_columns(0, size)
    images = operand.zeros((operand.local_dim, size))
    for first in range(0, size, width):
        columns = slice(first, min(first + width, size))
        images[:, columns] = operand.matmat(identity[:, columns])
    matrix = operand.inner(identity, images)  # one reduction (over the shards, if any)
    matrix = (matrix + matrix.T) / 2
    largest = float(np.abs(matrix).max())
    if largest > 0.0 and not 1.0 / operand.scale_limit <= largest <= operand.scale_limit:
        # The scale came from the first columns' products, which can be far from the others'
        # (zero columns): take it from the whole matrix, for these and the later products.
        exponent = math.frexp(largest)[1]
        matrix = np.ldexp(matrix, -exponent)
        operand.product_exponent += exponent
    values, vectors = np.linalg.eigh(matrix)
    wanted = _select(values, which, k)
    chosen = vectors[:, wanted]
    estimates = np.linalg.norm(matrix @ chosen - chosen * values[wanted], axis=0)
    ritz_vectors = operand.matmul(identity, operand.from_host(chosen))
    return _RitzPairs(values[wanted], ritz_vectors, estimates, float(np.abs(values).max()), 0)


def _finish(problem: _Problem, pairs: _RitzPairs, unconverged: str) -> EigenResult:
    """[`lanczos`][curvops.lanczos]' result from its Ritz pairs (in the units of the scaled products, see
    ``Operand.scale_products``): residuals (explicit, or the estimates), the convergence
    flags, a warning ending in ``unconverged`` if some pair is missing or not converged, and the
    values scaled back to ``A``'s units."""
    operand, k, tol = problem.operand, problem.k, problem.tol
    eigenvalues, ritz_vectors, norm_estimate = pairs.eigenvalues, pairs.vectors, pairs.norm_estimate
    if problem.exact_residuals:
        # NaN/Inf in the product propagate into the norms: their check replaces a pass.
        residual_block = operand.matmat(ritz_vectors, check_finite=False)
        operand.subtract_scaled_columns_(residual_block, ritz_vectors, eigenvalues)
        residual_norms = operand.column_norms(residual_block)
        if not np.all(np.isfinite(residual_norms)):
            operand.require_finite_product(residual_block)
            raise FloatingPointError("lanczos: the final residuals overflowed (the product itself is finite)")
    else:
        residual_norms = pairs.estimates
    converged = residual_norms <= tol * norm_estimate
    values = operand.unscale(np.asarray(eigenvalues, dtype=np.float64))
    residual_norms = operand.unscale(np.asarray(residual_norms, dtype=np.float64))
    if len(eigenvalues) < k or not converged.all():
        warnings.warn(
            f"lanczos: {int(converged.sum())} of {k} eigenpairs converged to tol={tol:g} {unconverged}",
            RuntimeWarning,
            stacklevel=3,
        )
    return EigenResult(
        eigenvalues=operand.from_host(values),
        eigenvectors=ritz_vectors,
        residual_norms=operand.from_host(residual_norms),
        converged=operand.flags_from_host(converged),
        num_matvecs=operand.num_matvecs,
        num_restarts=pairs.restarts,
        spectral_norm_estimate=operand.unscale(norm_estimate),
    )


def power_iteration(
    A: Any,
    k: int = 1,
    *,
    tol: float | None = None,
    max_iter: int = 1000,
    v0: Any = None,
    seed: int | None = None,
    dim: int | None = None,
) -> EigenResult:
    """``k`` largest-magnitude eigenpairs by power iteration with deflation (PyHessian style).

    Eigenpairs are found one after another; each new iterate is projected onto the orthogonal
    complement of the eigenvectors already found. Convergence of pair ``i`` is linear with rate
    ``|lambda_{i+1} / lambda_i|``, so prefer [`lanczos`][curvops.lanczos] unless parity with PyHessian-style
    workflows is wanted.

    Parameters
    ----------
    A
        Symmetric ``(D, D)`` operator: curvops/torch-native operator or dense torch tensor
        (torch path, on its device/dtype), scipy ``LinearOperator``/sparse matrix/numpy array
        (numpy path), or callable ``v -> A v`` with ``dim=D`` (numpy path, float64).
    k
        Number of eigenpairs, ``1 <= k <= D``.
    tol
        Relative residual tolerance per pair, in ``(0, 1)`` (``ValueError`` otherwise): stop
        when ``||A v - lambda v|| <= tol * max(|lambda_1|, |lambda|)``. Default ``sqrt(eps)``.
        Operators of any norm within the dtype's range work alike (products are scaled by a
        power of two where needed, see [`lanczos`][curvops.lanczos]).
    max_iter
        Maximum matvecs per eigenpair.
    v0
        Start vector ``(D,)`` used (after deflation) for every pair; default random from ``seed``.
    seed
        Seed of the random start vectors; same seed, same result within a backend.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    EigenResult
        Pairs sorted by descending ``|lambda|``; ``num_restarts`` is 0.
    """
    operand = as_operand(A, dim)
    size = operand.dim
    k = check_int(k, "k", 1)
    if k > size:
        raise ValueError(f"power_iteration needs k <= D (got k={k}, D={size})")
    tol = _check_tol(tol, operand)
    max_iter = check_int(max_iter, "max_iter", 1)
    rng = operand.rng(check_seed(seed))
    start = unit_columns(operand, [operand.as_vector(v0, "v0")])[0] if v0 is not None else None
    operand.scale_products()  # products of A / s (see lanczos); scaled back below

    found = operand.zeros((k, operand.local_dim))
    eigenvalues = np.zeros(k)
    residual_norms = np.zeros(k)
    norm_estimate = 0.0
    for index in range(k):
        raw = start if start is not None else operand.probes(1, "gaussian", rng)[:, 0]
        vector, norm = operand.orthogonalize(found[:index], raw)
        if norm <= BREAKDOWN_FACTOR * operand.eps * operand.norm(raw):
            vector = random_orthogonal(operand, found[:index], rng)
        theta, residual_norm = 0.0, math.inf
        for _ in range(max_iter):
            w = operand.matvec(vector)
            theta = operand.dot(vector, w)
            residual_norm = operand.norm(w - theta * vector)
            norm_estimate = max(norm_estimate, abs(theta))
            if residual_norm <= tol * norm_estimate:
                break
            w, w_norm = operand.orthogonalize(found[:index], w)
            if w_norm == 0.0:
                break  # A v lies in the span of the found eigenvectors; nothing left to iterate on
            vector = w
        found[index] = vector
        eigenvalues[index] = theta
        residual_norms[index] = residual_norm

    order = np.argsort(-np.abs(eigenvalues), kind="stable")
    converged = residual_norms[order] <= tol * norm_estimate
    if not converged.all():
        warnings.warn(
            f"power_iteration: {int(converged.sum())} of {k} eigenpairs converged to tol={tol:g} "
            f"within max_iter={max_iter} matvecs each",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=operand.from_host(operand.unscale(eigenvalues[order])),
        eigenvectors=found[order.tolist()].T,
        residual_norms=operand.from_host(operand.unscale(residual_norms[order])),
        converged=operand.flags_from_host(converged),
        num_matvecs=operand.num_matvecs,
        num_restarts=0,
        spectral_norm_estimate=operand.unscale(norm_estimate),
    )
