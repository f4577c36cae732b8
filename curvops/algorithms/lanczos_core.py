"""One Lanczos core: the three-term (block) recurrence shared by the eigensolver and SLQ.

The recurrence (Lanczos 1950) builds an orthonormal basis ``Q = [q_0, q_1, ...]`` of the Krylov
space of a symmetric ``A`` and the projection ``T = Q^T A Q``, tridiagonal (block tridiagonal for
a block start, Golub & Underwood 1977). For a single vector, one step is::

    w = A q_j - beta_{j-1} q_{j-1}
    alpha_j = <q_j, w>
    w = w - alpha_j q_j
    w = reorthogonalize(w, Q)            # the policy: full or partial
    beta_j = ||w||;  q_{j+1} = w / beta_j

In floating point the basis loses orthogonality as Ritz pairs converge (Paige 1972), so each new
vector is reorthogonalized by a policy (``curvops.algorithms.reorthogonalization``):

* ``FullReorthogonalization``: classical Gram-Schmidt against every stored vector, a
  second pass only where the first removed much of the vector (DGKS: Daniel, Gragg, Kaufman &
  Stewart 1976). Block steps and SLQ use it.
* ``PartialReorthogonalization``: Simon's (1984) recurrence estimates each stored vector's
  drift ``omega_i = q_{j+1}^T q_i`` and only the rows above the kept level are measured and
  removed, from two consecutive vectors; semi-orthogonality (``sqrt(eps)``) keeps the Ritz
  values accurate to rounding. Single-vector steps use it.

Two drivers share the recurrence:

* ``LanczosState`` holds one (block) Krylov basis and its projection, and extends it step by
  step (``LanczosState.extend``); [`curvops.lanczos`][curvops.lanczos] adds thick restarts
  (Wu & Simon 2000), locking and Ritz extraction on top.
* ``tridiagonalize_probes`` runs independent single-vector recurrences, one per probe, that
  share one block product per step, for stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
  [`curvops.spectral_density`][curvops.spectral_density]).

A new vector whose norm is at most ``BREAKDOWN_FACTOR`` ``* eps * ||A||`` is rounding: the
Krylov space is invariant (a "breakdown"), and both drivers treat it alike (the eigensolver
continues with a random orthogonal direction and zero coupling; SLQ ends that probe's
recurrence, its quadrature being exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from curvops.algorithms.reorthogonalization import (
    DGKS_ETA,
    FullReorthogonalization,
    PartialReorthogonalization,
    pass_rounding,
)
from curvops.algorithms.vectors import Array, Operand

__all__ = [
    "BREAKDOWN_FACTOR",
    "BasisRowViews",
    "BlockStep",
    "LanczosState",
    "ProbeTridiagonals",
    "RowStep",
    "TridiagonalProjection",
    "random_orthogonal",
    "start_block",
    "tridiagonal_head",
    "tridiagonalize_probes",
    "unit_columns",
]

#: Below this many multiples of ``eps * ||A||`` a Lanczos residual is rounding noise: normalizing
#: it would give a vector that is not orthogonal to the basis, so the Krylov space is treated as
#: invariant.
BREAKDOWN_FACTOR = 10.0


def unit_columns(operand: Operand, columns: list[Array]) -> list[Array]:
    """User start vectors divided by their largest entry.

    Their norms then neither over- nor underflow whatever their scale (entries of 1e-200
    square to 0).

    Parameters
    ----------
    operand
        The vector layer.
    columns
        Length-``D`` vectors of the operand's backend.

    Returns
    -------
    list
        The scaled vectors, largest entry 1 in magnitude.

    Raises
    ------
    ValueError
        If a vector is zero.
    """
    scaled = []
    for column in columns:
        largest = operand.max_abs(column)
        if largest == 0.0:
            raise ValueError("v0 must be nonzero")
        scaled.append(column / largest)
    return scaled


def random_orthogonal(operand: Operand, basis_rows: Array, rng: Any) -> Array:
    """A random unit vector orthogonal to ``basis_rows`` (used after an invariant-subspace breakdown).

    Parameters
    ----------
    operand
        The vector layer.
    basis_rows
        ``(n, D)`` orthonormal rows, ``n < D``.
    rng
        The operand's generator.

    Returns
    -------
    Array
        A ``(D,)`` unit vector orthogonal to the rows (to rounding).

    Raises
    ------
    RuntimeError
        If five Gaussian draws left less than ``sqrt(eps)`` of their norm (the rows span the
        whole space).

    Notes
    -----
    A Gaussian vector keeps about ``sqrt((D - n) / D)`` of its norm when projected on the
    complement of ``n < D`` orthonormal rows, rarely less than ``sqrt(eps)``; what two
    Gram-Schmidt passes leave of it when the rows span the whole space is rounding (or the
    basis' departure from orthogonality, squared), far below that. Normalizing such a
    remainder would give a vector that is not orthogonal to the basis at all."""
    for _ in range(5):
        candidate = operand.probes(1, "gaussian", rng)[:, 0]
        before = operand.norm(candidate)
        candidate, norm = operand.orthogonalize(basis_rows, candidate)
        if norm > math.sqrt(operand.eps) * before:
            return candidate
    raise RuntimeError(
        f"could not draw a vector orthogonal to the Krylov basis "
        f"({basis_rows.shape[0]} rows, D={operand.dim})"
    )


def start_block(operand: Operand, v0: Any, block_size: int, rng: Any) -> Array:
    """Orthonormal start rows of a Lanczos run.

    Parameters
    ----------
    operand
        The vector layer.
    v0
        User start vector ``(D,)`` or block ``(D, block_size)`` (numpy or torch), or None.
        Columns that are (nearly) dependent on the earlier ones are replaced by random
        orthogonal directions.
    block_size
        Rows ``b >= 1``.
    rng
        The operand's generator (random rows where ``v0`` gives none).

    Returns
    -------
    Array
        ``(block_size, D)`` orthonormal rows.

    Raises
    ------
    ValueError
        If ``v0`` has another shape, holds NaN/Inf, or is zero.
    """
    size = operand.local_dim
    if v0 is None:
        columns = []
    else:
        shape = tuple(v0.shape) if hasattr(v0, "shape") else np.shape(v0)
        if len(shape) == 2 and shape[0] == size and shape[1] == block_size:
            columns = [operand.as_vector(v0[:, index], "v0 column") for index in range(block_size)]
        elif len(shape) == 1 or block_size == 1:
            columns = [operand.as_vector(v0, "v0")]
        else:
            raise ValueError(f"v0 must have shape ({size},) or ({size}, {block_size}), got {shape}")
        columns = unit_columns(operand, columns)
    rows = operand.zeros((block_size, size))
    for index in range(block_size):
        if index < len(columns):
            vector, norm = operand.orthogonalize(rows[:index], columns[index])
            if norm > BREAKDOWN_FACTOR * operand.eps * operand.norm(columns[index]):
                rows[index] = vector
                continue
        rows[index] = random_orthogonal(operand, rows[:index], rng)
    return rows


class BasisRowViews:
    """Views of a Krylov basis' rows, made once per run.

    Single-vector Lanczos takes about six per step, and each slice of a tensor costs
    microseconds of host time in-run (a product has just evicted the host's caches), the
    overhead of a step on a GPU.

    Parameters
    ----------
    basis
        ``(n, D)`` stored rows.

    Attributes
    ----------
    rows, vectors, pairs, triples : list
        Row ``i`` as ``(1, D)``, as ``(D,)``, and rows ``i, i + 1`` (``(2, D)``) and
        ``i, i + 1, i + 2`` (``(3, D)``).
    """

    def __init__(self, basis: Array) -> None:
        count = basis.shape[0]
        self.basis = basis
        self.rows = [basis[i : i + 1] for i in range(count)]  # (1, D)
        self.vectors = [basis[i] for i in range(count)]  # (D,)
        self.pairs = [basis[i : i + 2] for i in range(count - 1)]  # (2, D)
        self.triples = [basis[i : i + 3] for i in range(count - 2)]  # (3, D)


class TridiagonalProjection:
    """Single-vector Lanczos' projected matrix ``T = V^T A V`` in Python floats, kept beside
    (and written with) the dense ``projected`` array that restarts and Ritz vectors use.

    A step reads about ``3 j`` entries (the drift estimate) and the check a tridiagonal: on
    host floats these cost a fraction of numpy's per-call overhead. After a thick restart ``T``
    is ``diag(theta)`` on the kept rows ``[0, start)`` with couplings ``arrow`` to row
    ``start`` (none for locked rows), tridiagonal from ``start`` on; ``head`` is the kept block
    reduced to tridiagonal form (``tridiagonal_head``) for the per-step check.

    Parameters
    ----------
    projected
        ``(m, m)`` dense projection, written alongside.
    """

    def __init__(self, projected: np.ndarray) -> None:
        self.projected = projected
        self.load(0, (np.zeros((0, 0)), np.zeros(0), np.zeros(0)))

    def load(self, start: int, head: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Take ``T`` from ``projected`` after a restart (or at the first cycle).

        Parameters
        ----------
        start
            Row of the cycle's first vector.
        head
            The kept block in tridiagonal form (``tridiagonal_head``).
        """
        size = self.projected.shape[0]
        self.start = start
        self.diag = self.projected.diagonal().tolist()  # T[i, i]
        self.off = [0.0] * (size + 1)  # off[i] = T[i - 1, i] for i > start
        self.arrow = self.projected[start, :start].tolist() if start < size else []  # T[start, i]
        # The first row coupled to the cycle's first vector (locked rows are not): the
        # known couplings that vector's product has.
        self.first_coupled = next((row for row, value in enumerate(self.arrow) if value != 0.0), start)
        self.head_diag, self.head_off = head[1].tolist(), head[2].tolist()

    def set_alpha(self, j: int, alpha: float) -> None:
        """Set ``T[j, j] = alpha``.

        Parameters
        ----------
        j
            Row.
        alpha
            The diagonal entry.
        """
        self.diag[j] = alpha
        self.projected[j, j] = alpha

    def set_coupling(self, new: int, beta: float) -> None:
        """Set ``T[new - 1, new] = T[new, new - 1] = beta``.

        Parameters
        ----------
        new
            Row of the new vector.
        beta
            The coupling.
        """
        self.off[new] = beta
        self.projected[new, new - 1] = self.projected[new - 1, new] = beta

    def coupling(self, j: int) -> float:
        """``T[j - 1, j]``: the recurrence's, or the arrow's at a cycle's first row.

        Parameters
        ----------
        j
            Row.

        Returns
        -------
        float
            The coupling.
        """
        return self.off[j] if j != self.start else self.arrow[j - 1]

    def active(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal and off-diagonal of the tridiagonal active block ``[locked, stop)``.

        Parameters
        ----------
        stop
            One past the last row.

        Returns
        -------
        tuple of numpy.ndarray
            The diagonal and the off-diagonal.
        """
        return (
            np.array(self.head_diag + self.diag[self.start : stop]),
            np.array(self.head_off + self.off[self.start + 1 : stop]),
        )


def _first_coupled(projected: np.ndarray, j: int, width: int, start: int) -> int:
    """First row with a known coupling to the block at ``j``: the previous block, or after a
    thick restart (``j == start``) the first kept row of the arrow (locked rows have none)."""
    if j != start:
        return j - width
    coupled = np.flatnonzero(np.any(projected[:j, j : j + width] != 0.0, axis=1))
    return int(coupled[0]) if coupled.size else j


def tridiagonal_head(
    projected: np.ndarray, first: int, start: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tridiagonal form of the kept block ``[first, start)`` of a thick-restart arrow.

    After a restart ``projected`` holds ``diag(theta)`` on the kept rows and their couplings
    ``sigma`` to row ``start``. An orthogonal ``G`` (Householder, ``p = start - first`` rows)
    with ``G^T diag(theta) G`` tridiagonal and ``G^T sigma = c e_p`` makes the whole active
    matrix tridiagonal: rows from ``start`` on are untouched, so Ritz values and the last
    components of Ritz vectors (the residual estimates) are those of the original matrix.

    Parameters
    ----------
    projected
        ``(m, m)`` projection after a thick restart.
    first
        First kept row not locked.
    start
        Row of the residual vector (one past the kept rows).

    Returns
    -------
    tuple of numpy.ndarray
        ``G`` ``(p, p)``, the diagonal ``(p,)`` and the off-diagonal ``(p,)``, whose last entry
        is ``c``, the coupling of the block to row ``start``.
    """
    p = start - first
    if p == 0:  # every kept row locked
        return np.zeros((0, 0)), np.zeros(0), np.zeros(0)
    arrow = np.zeros((p + 1, p + 1))
    arrow[1:, 0] = arrow[0, 1:] = projected[start, first:start]
    arrow[np.arange(1, p + 1), np.arange(1, p + 1)] = projected.diagonal()[first:start]
    # Householder reflections on rows 1..p only (Q e_1 = e_1): the coupling column becomes c e_1.
    # LAPACK directly: scipy.linalg.hessenberg's checks and workspace query cost more than the
    # factorization of so small a matrix (docs/benchmarks.md#lanczos).
    # (Both report only illegal arguments through info, which these calls cannot pass.)
    reduced, reflectors, _ = scipy.linalg.lapack.dgehrd(arrow, lwork=32 * (p + 1))
    rotation, _ = scipy.linalg.lapack.dorghr(reduced, reflectors, lwork=32 * (p + 1))
    diagonal = reduced.diagonal()[1:][::-1].copy()
    off = np.empty(p)
    off[:-1] = reduced.diagonal(-1)[1:][::-1]
    off[-1] = reduced[1, 0]
    return rotation[1:, 1:][:, ::-1].copy(), diagonal, off


@dataclass
class ProbeTridiagonals:
    """The tridiagonal projections of independent Lanczos recurrences (one per probe).

    Attributes
    ----------
    alphas : (P, m) ndarray
        Diagonals ``T[j, j]``.
    betas : (P, m) ndarray
        Off-diagonals ``T[j, j + 1]`` (entry ``lengths[p] - 1`` and later unused).
    lengths : (P,) ndarray of int
        Steps completed per probe: ``m``, or fewer where the probe's Krylov space became
        invariant (its quadrature is then exact).
    """

    alphas: np.ndarray
    betas: np.ndarray
    lengths: np.ndarray


def tridiagonalize_probes(operand: Operand, start: Array, steps: int) -> ProbeTridiagonals:
    """Independent Lanczos recurrences for the columns of ``start``, sharing block products.

    Every probe runs the three-term recurrence with ``FullReorthogonalization`` of its new
    vector against its own basis; one ``(D, P)`` block product per step serves all probes that
    have not broken down (stochastic Lanczos quadrature, Ubaru, Chen & Saad 2017).

    Parameters
    ----------
    operand
        The symmetric operator in the vector layer.
    start
        ``(D, P)`` start vectors, nonzero (normalized here).
    steps
        Lanczos steps per probe ``m >= 1`` (at most ``D``).

    Returns
    -------
    ProbeTridiagonals
        The ``(P, m)`` diagonals and off-diagonals and the steps completed per probe.
    """
    policy = FullReorthogonalization()
    num = start.shape[1]
    basis = operand.zeros((num, steps, operand.local_dim))
    basis[:, 0] = (start / operand.from_host(operand.column_norms(start))).T
    alphas, betas = np.zeros((num, steps)), np.zeros((num, steps))
    lengths = np.full(num, steps)
    scale = np.zeros(num)
    active = np.arange(num)
    for j in range(steps):
        everyone = active.size == num
        # Slicing (not fancy indexing) while all probes are active avoids copying the basis.
        past = basis[:, : j + 1] if everyone else basis[active.tolist(), : j + 1]
        current = past[:, j]
        # The recurrence: w = A q_j - beta_{j-1} q_{j-1}; alpha_j = <q_j, w>; w -= alpha_j q_j.
        w = operand.matmat_rows(current)
        if j > 0:
            w = w - operand.from_host(betas[active, j - 1])[:, None] * past[:, j - 1]
        alpha = operand.column_dots(current.T, w.T)
        w = w - operand.from_host(alpha)[:, None] * current
        w = policy.reorthogonalize_probes(operand, past, w, alpha)
        # beta_j = ||w||; q_{j+1} = w / beta_j, unless the probe's Krylov space is invariant.
        beta = operand.column_norms(w.T)
        alphas[active, j] = alpha
        if j + 1 == steps:
            break
        scale[active] = np.maximum(scale[active], np.maximum(np.abs(alpha), beta))
        finished = beta <= BREAKDOWN_FACTOR * operand.eps * scale[active]
        lengths[active[finished]] = j + 1
        going = ~finished
        betas[active[going], j] = beta[going]
        new_vectors = w[going.nonzero()[0].tolist()] / operand.from_host(beta[going])[:, None]
        basis[active[going].tolist(), j + 1] = new_vectors
        active = active[going]
        if active.size == 0:
            break
    return ProbeTridiagonals(alphas, betas, lengths)


@dataclass(slots=True)
class RowStep:
    """The working values of one single-vector step (``LanczosState._single_step``), shared
    by its parts and the partial policy (``PartialReorthogonalization.reorthogonalize_row``).

    Host floats throughout: on an accelerator a step's host time is its overhead, and each numpy
    call on one number costs several times the arithmetic. Norms and coefficients are in the
    stored units of row ``j`` (Lanczos vector ``i`` is ``scales[i] * basis[i]``) unless named
    true.

    Attributes
    ----------
    j, new : int
        Row of the current vector ``q_j`` and of the new residual ``w`` (``j + 1``).
    own : float
        ``scales[j]``.
    previous : int
        First row with a known coupling to row ``j``: ``j - 1`` (the three-term recurrence) or,
        at a cycle's first step, the first kept row of the restart's arrow.
    recurrence : bool
        ``previous == j - 1``.
    measure_all : bool
        Every stored row's inner products with ``u = q_{j-1}``, ``q_j`` and ``w`` come from the
        step's one read (``table``), so each row's drift is measured, not estimated (cheap
        passes and the three-term recurrence).
    table, gram, products
        The read: the stored rows' inner products with ``u, q_j, w`` (``measure_all``), the Gram
        matrix of ``[u,] q_j, w`` (cheap passes) or None, and ``w``'s inner products with them.
    alpha : float
        ``T[j, j]``.
    product_squared, squared : float
        ``||w||^2`` and ``||w - alpha q_j - beta u||^2`` from the Gram matrix (true units).
    known : tuple of float or None
        The recurrence's coefficients of ``basis[j - 1]`` and ``basis[j]`` in ``w``.
    norm_before, norm_after : float
        The residual's norm before and after reorthogonalization.
    first : list of float or None
        Every row's inner product with the residual, from the read (``measure_all``).
    predicted : list of float
        The drift estimates of rows ``[0, j)`` (measured rows replaced).
    reach, forced
        Rows ``[0, reach)`` to measure, and whether they are updated whatever the measurement.
    """

    j: int
    new: int
    own: float
    previous: int
    recurrence: bool
    measure_all: bool
    table: Any = None
    gram: Any = None
    products: Any = None
    alpha: float = 0.0
    product_squared: float = 0.0
    squared: float = 0.0
    known: tuple[float, float] | None = None
    norm_before: float = 0.0
    norm_after: float = 0.0
    first: list[float] | None = None
    predicted: list[float] | None = None
    reach: int = 0
    forced: bool = False


@dataclass(slots=True)
class BlockStep:
    """The working values of one block step (``LanczosState._block_step``), shared with the
    full policy (``FullReorthogonalization.reorthogonalize_block``).

    Attributes
    ----------
    block : slice
        Rows ``[j, j + b)`` of the current block ``Q_j``.
    new : int
        First row of the new block, ``j + b``.
    own : (b,) ndarray
        The current block's scales.
    images : (b, D) array
        The residual block ``W``, formed in the basis rows ``[new, new + b)``.
    diagonal_block : (b, b) ndarray
        ``A_j = Q_j^T A Q_j`` (true units).
    norms_before : (b,) ndarray
        ``W``'s row norms before reorthogonalization (stored units).
    """

    block: slice
    new: int
    own: np.ndarray
    images: Array
    diagonal_block: np.ndarray
    norms_before: np.ndarray


class LanczosState:
    """A (block) Krylov basis and the projection of ``A`` onto it, extended step by step.

    Lanczos vector ``i`` is ``scales[i] * basis[i]``: block steps normalize their rows,
    single-vector steps record the scale instead (no pass over the row). With ``n`` the last
    index reached, rows ``[0, n + b)`` are orthonormal to the kept level, ``projected[:n, :n] =
    V^T A V`` (block tridiagonal; after a thick restart ``diag(theta)`` on the kept rows plus
    their "arrow" couplings to the first new block) and ``A V = V H + v[n:n + b]^T B E^T`` with
    ``B`` the coupling ``extend`` returns and ``E`` the last ``b`` unit columns.

    Parameters
    ----------
    operand
        The symmetric operator in the vector layer.
    basis_size
        Basis vectors between restarts ``m``; the basis holds ``m + width`` rows.
    width
        Block size ``b >= 1``; 1 uses ``PartialReorthogonalization``, more
        ``FullReorthogonalization``.
    rng
        The operand's generator, for directions after a breakdown.
    orthogonality
        Level to which the basis is kept orthonormal (relative), e.g. ``sqrt(eps)``.

    Attributes
    ----------
    basis : (m + b, D) array
        Stored rows (the operand's backend, device and dtype).
    scales : (m + b,) ndarray
        Recorded scales of the rows.
    projected : (m, m) ndarray
        ``T = V^T A V`` (host float64).
    norm_estimate : float
        Running lower bound on ``||A||`` (largest coupling or diagonal seen).
    policy : FullReorthogonalization or PartialReorthogonalization
        The reorthogonalization policy of the steps.
    """

    def __init__(self, operand: Operand, basis_size: int, width: int, rng: Any, orthogonality: float) -> None:
        self.operand = operand
        self.width = width
        self.rng = rng
        self.orthogonality = orthogonality
        self.basis = operand.empty((basis_size + width, operand.local_dim))
        self.scales = np.ones(basis_size + width)
        self.projected = np.zeros((basis_size, basis_size))
        self.norm_estimate = 0.0
        self.policy: FullReorthogonalization | PartialReorthogonalization
        # The policy again under its own type, for the step that uses it.
        self.partial: PartialReorthogonalization
        self.full: FullReorthogonalization
        if width == 1:
            self.projection = TridiagonalProjection(self.projected)
            self.policy = self.partial = PartialReorthogonalization(self.projection, operand.eps)
            self.views = BasisRowViews(self.basis)
        else:
            self.policy = self.full = FullReorthogonalization()

    def extend(
        self, start: int, stop: int, is_converged: Callable[[int, Any, float], bool] | None = None
    ) -> tuple[np.ndarray, int]:
        """Lanczos steps on the blocks ``[j, j + b)`` for ``j = start, start + b, ..., stop - b``.

        Parameters
        ----------
        start
            First row of the first new block. On entry ``v[:start + b]`` are orthonormal and
            ``projected[:start + b, :start + b]`` holds the known part of ``V^T A V``.
        stop
            Last row (exclusive) of the steps' blocks.
        is_converged
            ``is_converged(new_stop, B, norm_estimate)`` is asked after every block (``B`` the
            ``(b, b)`` coupling to the next block); if it returns True the steps end early at
            ``new_stop``. ``None``: never.

        Returns
        -------
        tuple
            ``B`` ``(b, b)``, the coupling of the last block to the next one, and the actual
            ``stop``; the relations of the class hold with ``n = stop``.
        """
        # One loop for both widths: a single vector is a block of width 1, whose step keeps its
        # coupling a host float (its host time is a step's overhead on a GPU) under the partial
        # policy; a block's step is a (b, b) coupling under the full one.
        width = self.width
        step: Callable[[int, int], Any]
        set_coupling: Callable[[int, Any], None]
        coupling: Any  # a float for width 1, else a (b, b) array
        if width == 1:
            self.partial.begin(start)
            step, set_coupling, coupling = self._single_step, self.projection.set_coupling, 0.0
        else:
            step, set_coupling = self._block_step, self._set_block_coupling
            coupling = np.zeros((width, width))
        for j in range(start, stop, width):
            new = j + width
            coupling = step(j, start)
            if new < stop:
                set_coupling(new, coupling)
                if is_converged is not None and is_converged(new, coupling, self.norm_estimate):
                    stop = new
                    break
        return (np.array([[coupling]]) if width == 1 else coupling), stop

    def _set_block_coupling(self, new: int, coupling: np.ndarray) -> None:
        """Write the ``(b, b)`` coupling ``B`` of the block before row ``new`` into the projection."""
        width, projected = self.width, self.projected
        projected[new : new + width, new - width : new] = coupling
        projected[new - width : new, new : new + width] = coupling.T

    # -- block steps (full reorthogonalization) ---------------------------------------------------

    def _block_step(self, j: int, start: int) -> np.ndarray:
        """One block Lanczos step (Golub & Underwood 1977): ``basis[j + b : j + 2b]`` <- the next
        block, orthonormal with unit scales; ``projected[block, block]`` <- ``A_j``. Returns the
        ``(b, b)`` coupling ``B_j``."""
        step = self._block_residual(j, start)  # W = A Q_j - Q_j A_j - Q_{j-1} B_{j-1}^T
        norms = self.full.reorthogonalize_block(self, step)  # W -= Q (Q^T W)
        self._set_diagonal_block(step)
        return self._orthonormalize_block(step, norms)  # Q_{j+1} B_j = W

    def _block_residual(self, j: int, start: int) -> BlockStep:
        """(1)-(3) of a block step: ``W = A Q_j`` written into the next basis rows (by the operator
        itself when it takes ``out=``; no copy), ``A_j = Q_j^T W``, and ``W`` less its known
        couplings (the block three-term recurrence, or the arrow after a restart), so that the
        full pass only removes rounding-level components.

        Works in the units of the stored rows: ``W = A basis[block] = A v[block] / scales[block]``
        (row ``r``), and a true coefficient ``c`` of ``v_m`` in ``A v_r`` is removed from ``W`` as
        ``c * scales[m] / scales[r]`` times ``basis[m]``."""
        operand, basis, scales, projected, width = (
            self.operand,
            self.basis,
            self.scales,
            self.projected,
            self.width,
        )
        block = slice(j, j + width)
        new = j + width
        own = scales[block].copy()
        images = basis[new : new + width]
        # No NaN/Inf check of the product: NaN and Inf propagate into every inner product with the
        # block, so A_j's check covers it and saves a pass.
        operand.matmat_rows_into(basis[block], images, check_finite=False)
        previous = _first_coupled(projected, j, width, start)
        # A_j from the raw product: the current block is orthogonal to the earlier ones up to
        # rounding, which the full pass corrects, so one update removes both couplings.
        diagonal_block = operand.inner(basis[block].T, images.T) * (own[:, None] * own[None, :])
        if not np.isfinite(diagonal_block).all():
            operand.require_finite_product(images)
            raise FloatingPointError("lanczos: A v overflowed in v^T A v (the product itself is finite)")
        known = np.concatenate((projected[previous:j, block].T, diagonal_block.T), axis=1)
        known *= scales[previous:new][None, :] / own[:, None]
        operand.subtract_combination_(images, known, basis[previous:new])
        # In stored units: true norms are own * these.
        norms_before = operand.column_norms(images.T)
        return BlockStep(block, new, own, images, diagonal_block, norms_before)

    def _set_diagonal_block(self, step: BlockStep) -> None:
        """Write ``A_j`` (symmetrized: the pass may have corrected it unevenly) and raise the
        running ``||A||`` estimate to its largest column sum."""
        diagonal_block = (step.diagonal_block + step.diagonal_block.T) / 2
        self.projected[step.block, step.block] = diagonal_block
        self.norm_estimate = max(self.norm_estimate, float(np.abs(diagonal_block).sum(0).max()))

    def _orthonormalize_block(self, step: BlockStep, norms_after: np.ndarray) -> np.ndarray:
        """(5) ``Q_{j+1} B_j = W``, a QR: Gram-Schmidt within the block, column by column (the
        columns are already orthogonal to the basis). ``B_j`` is upper triangular; each row is
        normalized in place (unit scale) before the next one is projected on it; a column at
        rounding level is replaced by a fresh direction (``_broke_down``). Returns ``B_j``."""
        operand, width, new = self.operand, self.width, step.new
        norm_estimate = self.norm_estimate
        coupling = np.zeros((width, width))
        for index in range(width):
            vector = step.images[index]
            # Without in-block projections the norm is the one just computed.
            stored_norm = float(norms_after[index])
            if index and stored_norm > 0.0:
                vector, stored_norm = self._project_out_block(new, index, vector, stored_norm, coupling)
            norm = float(step.own[index]) * stored_norm
            norm_estimate = max(norm_estimate, norm)
            if self._broke_down(new + index, norm, norm_estimate):
                continue
            coupling[index, index] = norm
            operand.scaled_copy_(self.basis[new + index], vector, 1.0 / stored_norm)
            self.scales[new + index] = 1.0
        self.norm_estimate = norm_estimate
        return coupling

    def _project_out_block(
        self, new: int, index: int, vector: Array, stored_norm: float, coupling: np.ndarray
    ) -> tuple[Array, float]:
        """Column ``index`` of the new block less its components along the columns before it
        (two passes), accumulated into ``coupling[:index, index]``. Returns the column and its
        norm, 0 where it lies in the Krylov space."""
        operand, basis = self.operand, self.basis
        for _ in range(2):
            vector, removed = operand.project_out(basis[new : new + index], vector)
            coupling[:index, index] += removed
        before, stored_norm = stored_norm, operand.norm(vector)
        if stored_norm < DGKS_ETA * before:
            # Most of the column lay along the block's earlier columns: what is left carries the
            # rounding of that removal along the basis too. One pass against the whole basis; if
            # that too removes most of it (DGKS), the column is in the Krylov space.
            vector, removed = operand.project_out(basis[: new + index], vector)
            coupling[:index, index] += removed[new:]
            before, stored_norm = stored_norm, operand.norm(vector)
            if stored_norm < DGKS_ETA * before:
                stored_norm = 0.0
        return vector, stored_norm

    # -- single-vector steps (partial reorthogonalization) ----------------------------------------

    def _single_step(self, j: int, start: int) -> float:
        """One single-vector Lanczos step (Lanczos 1950; Paige 1972), in host scalars.

        ``basis[j + 1]`` <- the new residual, unnormalized (its scale recorded), and ``T[j, j]``
        <- alpha. Returns ``beta_j``. Both known couplings leave ``w`` in one update (one pass
        over the row instead of two).
        """
        step = self._apply(j, start)  # w = A q_j, and its inner products with [q_{j-1},] q_j, w
        self._alpha(step)  # alpha_j = <q_j, w>
        self._subtract_known(step)  # w -= alpha_j q_j + beta_{j-1} q_{j-1}
        self._residual_norm(step)  # ||w||, and each row's drift where the read computed it
        self._reorthogonalize(step)  # the partial policy (Simon 1984)
        return self._normalize(step)  # beta_j = ||w||; q_{j+1} = w / beta_j

    def _apply(self, j: int, start: int) -> RowStep:
        """(1) ``w = A q_j``, written into the next basis row (no copy), and the step's one read.

        Where passes are cheap (an accelerator: a step's host time, not memory bandwidth, is its
        overhead) the read is the Gram matrix of ``[u,] q_j, w`` (``u = q_{j-1}``), from which the
        residual's norm follows exactly; with the three-term recurrence the same read also brings
        every stored row's inner products with ``u, q_j, w``, so each row's drift is measured, not
        estimated, and a Gram-Schmidt update needs no second pass. On a CPU, where passes cost
        bandwidth (a ``(3, D) x (D, 3)`` product is several times slower than ``(3, D) x (D,)``),
        the read is ``w``'s inner products with ``[u,] q_j, w``. Their NaN/Inf check is the
        product's: NaN and Inf propagate into every inner product with it.
        """
        operand, views = self.operand, self.views
        new = j + 1
        own = float(self.scales[j])
        operand.matmat_rows_into(views.rows[j], views.rows[new], check_finite=False)
        previous = j - 1 if j != start else self.projection.first_coupled
        recurrence = previous == j - 1
        step = RowStep(j, new, own, previous, recurrence, operand.cheap_passes and recurrence)
        if step.measure_all:
            table = operand.gram(views.basis[: new + 1], views.triples[j - 1])
            step.table = table
            step.gram = [table[j - 1], table[j], table[new]]
            step.products = step.gram[-1]
        elif operand.cheap_passes:
            step.gram = operand.gram(views.triples[j - 1] if recurrence else views.pairs[j])
            step.products = step.gram[-1]
        else:
            step.products = operand.dots(
                views.triples[j - 1] if recurrence else views.pairs[j], views.vectors[new]
            )
        if not all(map(math.isfinite, step.products)):
            operand.require_finite_product(views.vectors[new])
            raise FloatingPointError(
                "lanczos: A v overflowed in v^T A v or ||A v||^2 (the product itself is finite)"
            )
        return step

    def _alpha(self, step: RowStep) -> None:
        """(2) ``alpha_j = q_j^T A q_j / q_j^T q_j``: scale-free, as ``w`` is ``A q_j`` in row
        ``j``'s stored units (a measured norm made ``q_j^T q_j = 1 / own^2`` to rounding); and in
        true units ``||A q_j - alpha q_j||^2 = own^2 (w^T w - alpha q_j^T w)``."""
        own, products, gram = step.own, step.products, step.gram
        step.alpha = products[-2] / gram[-2][-2] if gram is not None else own * own * products[-2]
        step.product_squared = own * own * products[-1]
        step.squared = step.product_squared - own * own * step.alpha * products[-2]

    def _subtract_known(self, step: RowStep) -> None:
        """(3) ``w -= alpha_j q_j + beta_{j-1} q_{j-1}`` (or the arrow's couplings after a thick
        restart, Wu & Simon 2000), in stored units (see ``_block_residual``).

        With the Gram matrix the residual's norm follows from the recurrence, ``||w - alpha v -
        beta u||^2 = w^T w - alpha v^T w + beta^2 u^T u - 2 beta u^T w + 2 alpha beta u^T v``
        (true units): exact for the vectors as they are, not as unit vectors, so earlier steps'
        norm errors do not compound. With measured drift the subtraction waits: it joins the
        Gram-Schmidt update (``_reorthogonalize``)."""
        j, own, alpha = step.j, step.own, step.alpha
        operand, views, scales, projection = self.operand, self.views, self.scales, self.projection
        if step.recurrence:
            beta = projection.coupling(j)
            scale = float(scales[j - 1])
            gram = step.gram
            if gram is not None:
                step.squared += (
                    beta
                    * scale
                    * (
                        beta * scale * gram[0][0]
                        - 2.0 * own * step.products[0]
                        + 2.0 * alpha * own * gram[0][1]
                    )
                )
            step.known = (beta * scale / own, alpha)
            if not step.measure_all:
                self._subtract_recurrence(step)
        else:
            previous, new = step.previous, step.new
            arrow_known = np.empty((1, new - previous))
            arrow_known[0, :-1] = projection.projected[previous:j, j] * scales[previous:j] / own
            arrow_known[0, -1] = alpha
            operand.subtract_combination_(views.rows[new], arrow_known, views.basis[previous:new])

    def _residual_norm(self, step: RowStep) -> None:
        """The residual's norm: from the recurrence where its rounding (``~ sqrt(D) eps
        max(||w||^2, ||A||^2)``) is below 1% of the kept level relative to the result, else
        measured (a CPU, the arrow after a restart, or cancellation too deep). With measured
        drift, each row's inner product with the residual comes from the read where its rounding
        is within 1% of the level too (the accuracy a measuring pass has); else the deferred
        subtraction is done now and the drift is estimated."""
        operand, orthogonality, own = self.operand, self.orthogonality, step.own
        image = self.views.vectors[step.new]
        rounding = pass_rounding(operand)
        exact = (
            step.gram is not None
            and step.previous >= step.j - 1
            and step.squared * 0.01 * orthogonality
            >= rounding * max(step.product_squared, self.norm_estimate**2)
        )
        norm_before = math.sqrt(step.squared) / own if exact else 0.0
        if step.measure_all:
            gram, alpha = step.gram, step.alpha
            assert step.known is not None  # measure_all: the three-term recurrence
            coefficient_u = step.known[0]
            norms = (
                math.sqrt(gram[2][2])
                + abs(alpha) * math.sqrt(gram[1][1])
                + abs(coefficient_u) * math.sqrt(gram[0][0])
            )
            step.measure_all = exact and rounding * norms <= 0.01 * orthogonality * norm_before
            if not step.measure_all:
                self._subtract_recurrence(step)
        if not exact:
            norm_before = operand.norm(image)
        step.norm_before = norm_before
        if step.measure_all:
            assert step.known is not None
            alpha, coefficient_u = step.alpha, step.known[0]
            step.first = [
                weight * (row[2] - alpha * row[1] - coefficient_u * row[0])
                for weight, row in zip(self.scales[: step.new].tolist(), step.table)
            ]

    def _subtract_recurrence(self, step: RowStep) -> None:
        """``w -= known[0] basis[j - 1] + known[1] basis[j]``: the three-term recurrence's
        subtraction (deferred with measured drift, see ``_subtract_known``)."""
        views, j = self.views, step.j
        assert step.known is not None
        self.operand.subtract_rows_(
            views.vectors[step.new], step.known, views.pairs[j - 1], views.vectors[j - 1 : step.new]
        )

    def _reorthogonalize(self, step: RowStep) -> None:
        """(4) Rows ``[0, reach)`` get a Gram-Schmidt pass, only up to the last row whose drift
        (measured, or estimated by Simon's recurrence: ``PartialReorthogonalization``)
        exceeds the tolerated level; often none. Then ``T[j, j] = alpha`` (corrected by the pass)."""
        drift = self.partial
        if step.first is not None:
            scale_down = 1.0 / max(step.norm_before, 1e-300)
            step.predicted = [value * scale_down for value in step.first[: step.j]]
        else:
            step.predicted = drift.predict(
                step.j, step.alpha, step.own * step.norm_before, self.norm_estimate
            )
        step.reach, step.forced = drift.reach(step.j, step.predicted, self.orthogonality)
        step.norm_after = step.norm_before
        if step.reach:
            drift.reorthogonalize_row(self, step)
        elif step.measure_all:
            self._subtract_recurrence(step)
        self.projection.set_alpha(step.j, step.alpha)

    def _normalize(self, step: RowStep) -> float:
        """(5) ``beta_j = ||w||`` and ``q_{j+1} = w / beta_j`` as a recorded scale, or a
        fresh direction with zero coupling after a breakdown; the drift row moves on."""
        own, norm_after = step.own, step.norm_after
        norm = own * norm_after
        norm_estimate = max(self.norm_estimate, abs(step.alpha), norm)
        if self._broke_down(step.new, norm, norm_estimate):
            norm = 0.0
        else:
            self._record_scale(step.new, norm_after)
        assert step.predicted is not None
        self.partial.advance(step.predicted, norm, own * step.norm_before)
        self.norm_estimate = norm_estimate
        return norm

    # -- both widths ------------------------------------------------------------------------------

    def _record_scale(self, index: int, stored_norm: float) -> None:
        """Make ``scales[index] * basis[index]`` a unit vector: record ``1 / stored_norm`` (no pass
        over the row), or normalize the row in place once its norm has left ``[1 / scale_limit,
        scale_limit]``. Stored norms multiply by about ``beta`` per step, so an operator with
        ``||A||`` far from 1 would otherwise drive them to over- or underflow within a run."""
        limit = self.operand.scale_limit
        if 1.0 / limit <= stored_norm <= limit:
            self.scales[index] = 1.0 / stored_norm
        else:
            row = self.views.vectors[index]
            self.operand.scaled_copy_(row, row, 1.0 / stored_norm)
            self.scales[index] = 1.0

    def _broke_down(self, row: int, norm: float, norm_estimate: float) -> bool:
        """If the new row's true ``norm`` is at rounding level (an invariant subspace), replace it
        by a fresh random unit direction orthogonal to the basis (with zero coupling, which keeps
        the Lanczos relation exact) and return True.

        A row at index ``D`` or beyond has no direction left: rows ``[0, D)`` span the whole
        space, which ``A`` maps into itself, so the coupling is exactly 0 whatever rounding left
        in the row. The row is zeroed and the Ritz pairs are exact; every residual estimate is
        then 0, so the run ends here (with ``block_size > 1`` no row goes past ``D``: see
        [`curvops.lanczos`][curvops.lanczos]).
        """
        operand, basis, scales = self.operand, self.basis, self.scales
        if row >= operand.dim:
            basis[row] = 0.0
            scales[row] = 1.0
            return True
        if norm > BREAKDOWN_FACTOR * operand.eps * norm_estimate:
            return False
        self._normalize_rows(row)
        basis[row] = random_orthogonal(operand, basis[:row], self.rng)
        scales[row] = 1.0
        return True

    def _normalize_rows(self, stop: int) -> None:
        """Apply the recorded scales to ``basis[:stop]`` in place (before a generic Gram-Schmidt)."""
        basis, scales = self.basis, self.scales
        for index in np.flatnonzero(scales[:stop] != 1.0):
            self.operand.scaled_copy_(basis[index], basis[index], float(scales[index]))
            scales[index] = 1.0
