"""Extremal eigenpairs of symmetric operators: thick-restart Lanczos and deflated power iteration."""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import scipy.linalg

from curvops.algorithms._operand import Array, Operand, as_operand, check_int, check_seed

Which = Literal["LA", "SA", "LM", "BE"]
WHICH_OPTIONS: tuple[str, ...] = ("LA", "SA", "LM", "BE")

# Below this many multiples of eps * ||A|| a Lanczos residual is rounding noise: normalizing it
# would give a vector that is not orthogonal to the basis, so the Krylov space is treated as
# invariant and continued with a fresh random direction instead.
_BREAKDOWN_FACTOR = 10.0
# A wanted Ritz pair whose residual is below min(_LOCK * tol, 1000 eps) * ||A|| at a restart is
# locked: kept as it is, its coupling to the residual dropped. Each other pair's residual then
# differs from its estimate by at most the largest locked residual (the locked vectors are
# orthonormal), which the convergence test subtracts from its threshold.
_LOCK = 0.01
# DGKS criterion (Daniel, Gragg, Kaufman, Stewart 1976): a second Gram-Schmidt pass is needed
# only if the first one removed more than ~30% of the vector's norm.
_DGKS_ETA = 1.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Array fields are torch tensors on the operator's device/dtype when the algorithm ran on
    the torch path, numpy arrays otherwise.

    Attributes
    ----------
    eigenvalues : (k,) array
        Ritz values, ordered by the ``which`` criterion (see :func:`lanczos`).
    eigenvectors : (D, k) array
        Unit-norm Ritz vectors; column ``i`` belongs to ``eigenvalues[i]``. From
        :func:`lanczos` orthonormal to about ``min(sqrt(eps), tol / 100)`` (the basis'
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


def _check_which(which: str) -> str:
    if which not in WHICH_OPTIONS:
        raise ValueError(f"which must be one of {WHICH_OPTIONS}, got {which!r}")
    return which


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


def _unit_columns(operand: Operand, columns: list[Array]) -> list[Array]:
    """User start vectors divided by their largest entry, so that their norms neither over- nor
    underflow whatever their scale (entries of 1e-200 square to 0); ValueError if one is zero."""
    scaled = []
    for column in columns:
        largest = operand.max_abs(column)
        if largest == 0.0:
            raise ValueError("v0 must be nonzero")
        scaled.append(column / largest)
    return scaled


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


def _random_orthogonal(operand: Operand, basis_rows: Array, rng: Any) -> Array:
    """A random unit vector orthogonal to ``basis_rows`` (used after an invariant-subspace breakdown).

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
        f"could not draw a vector orthogonal to the Krylov basis ({basis_rows.shape[0]} rows, D={operand.dim})"
    )


def _start_block(operand: Operand, v0: Any, block_size: int, rng: Any) -> Array:
    """Orthonormal ``(block_size, D)`` start rows from ``v0`` (``(D,)`` or ``(D, b)``) or at random."""
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
        columns = _unit_columns(operand, columns)
    rows = operand.zeros((block_size, size))
    for index in range(block_size):
        if index < len(columns):
            vector, norm = operand.orthogonalize(rows[:index], columns[index])
            if norm > _BREAKDOWN_FACTOR * operand.eps * operand.norm(columns[index]):
                rows[index] = vector
                continue
        rows[index] = _random_orthogonal(operand, rows[:index], rng)
    return rows


def _extend_lanczos(
    operand: Operand,
    basis: Array,
    scales: np.ndarray,
    projected: np.ndarray,
    start: int,
    stop: int,
    block_size: int,
    norm_estimate: float,
    rng: Any,
    is_converged: Callable[[int, np.ndarray, float], bool] | None = None,
    orthogonality: float = 0.0,
) -> tuple[np.ndarray, float, int]:
    """Run block Lanczos steps on the blocks ``[j, j + b)`` for ``j = start, start + b, ..., stop - b``.

    The Lanczos vectors are ``v_i = scales[i] * basis[i]`` (block steps normalize their rows;
    single-vector steps, :func:`_extend_single`, record the scale instead). On entry
    ``v[:start + b]`` are orthonormal and ``projected[:start + b, :start + b]`` holds the known
    part of ``V^T A V`` (after a thick restart: ``diag(theta)`` plus the arrow couplings to the
    block at ``start``). On exit ``v[:stop + b]`` are orthonormal, ``projected[:stop, :stop] =
    V^T A V`` (banded/arrow) and ``A V = V H + v[stop:stop + b]^T B E^T`` with ``E`` the last
    ``b`` unit columns.

    ``is_converged(new_stop, B, norm_estimate)`` is asked after every block; if it returns True
    the run ends early at ``new_stop`` (the relations above then hold with ``stop = new_stop``).
    A reorthogonalization update is skipped when every coefficient it would remove is at most
    ``orthogonality`` times its column's norm (0: never skipped), so the basis is then
    orthonormal to about that level instead of to rounding.

    Returns ``B`` (the ``(b, b)`` coupling to the next block), the updated ``||A||`` estimate and
    the actual ``stop``.
    """
    width = block_size
    coupling = np.zeros((width, width))
    for j in range(start, stop, width):
        new = j + width
        coupling, norm_estimate = _block_step(
            operand, basis, scales, projected, j, start, width, norm_estimate, rng, orthogonality
        )
        if new < stop:
            projected[new : new + width, j:new] = coupling
            projected[j:new, new : new + width] = coupling.T
            if is_converged is not None and is_converged(new, coupling, norm_estimate):
                return coupling, norm_estimate, new
    return coupling, norm_estimate, stop


def _extend_single(
    operand: Operand,
    views: "_RowViews",
    scales: np.ndarray,
    projection: "_Projection",
    start: int,
    stop: int,
    norm_estimate: float,
    rng: Any,
    is_converged: Callable[[int, float, float], bool],
    orthogonality: float,
    drift: "_Drift",
) -> tuple[float, float, int]:
    """Single-vector Lanczos steps ``j = start, ..., stop - 1``: :func:`_extend_lanczos` with
    ``b = 1``, the coupling a float, and :func:`_single_step` for each step (the drift of each
    new vector is estimated and only the rows near ``orthogonality`` are measured).
    ``is_converged(new_stop, beta, norm_estimate)`` is asked after every step."""
    beta = 0.0
    drift.begin(start)
    for j in range(start, stop):
        beta, norm_estimate = _single_step(
            operand, views, scales, projection, j, start, norm_estimate, rng, orthogonality, drift
        )
        new = j + 1
        if new < stop:
            projection.set_coupling(new, beta)
            if is_converged(new, beta, norm_estimate):
                return beta, norm_estimate, new
    return beta, norm_estimate, stop


class _RowViews:
    """Views of a Krylov basis' rows, made once per run: single-vector Lanczos takes about six
    per step, and each slice of a tensor costs microseconds of host time in-run (a product
    has just evicted the host's caches), the overhead of a step on a GPU."""

    def __init__(self, basis: Array) -> None:
        count = basis.shape[0]
        self.basis = basis
        self.rows = [basis[i : i + 1] for i in range(count)]  # (1, D)
        self.vectors = [basis[i] for i in range(count)]  # (D,)
        self.pairs = [basis[i : i + 2] for i in range(count - 1)]  # (2, D)
        self.triples = [basis[i : i + 3] for i in range(count - 2)]  # (3, D)


class _Projection:
    """Single-vector Lanczos' projected matrix ``T = V^T A V`` in Python floats, kept beside
    (and written with) the dense ``projected`` array that restarts and Ritz vectors use.

    A step reads about ``3 j`` entries (the drift estimate) and the check a tridiagonal: on
    host floats these cost a fraction of numpy's per-call overhead. After a thick restart ``T``
    is ``diag(theta)`` on the kept rows ``[0, start)`` with couplings ``arrow`` to row
    ``start`` (none for locked rows), tridiagonal from ``start`` on; ``head`` is the kept block
    reduced to tridiagonal form (:func:`_tridiagonal_head`) for the per-step check.
    """

    def __init__(self, projected: np.ndarray) -> None:
        self.projected = projected
        self.load(0, (np.zeros((0, 0)), np.zeros(0), np.zeros(0)))

    def load(self, start: int, head: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Take ``T`` from ``projected`` after a restart (or at the first cycle)."""
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
        self.diag[j] = alpha
        self.projected[j, j] = alpha

    def set_coupling(self, new: int, beta: float) -> None:
        self.off[new] = beta
        self.projected[new, new - 1] = self.projected[new - 1, new] = beta

    def coupling(self, j: int) -> float:
        """``T[j - 1, j]``: the recurrence's, or the arrow's at a cycle's first row."""
        return self.off[j] if j != self.start else self.arrow[j - 1]

    def active(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Diagonal and off-diagonal of the tridiagonal active block ``[locked, stop)``."""
        return (np.array(self.head_diag + self.diag[self.start : stop]),
                np.array(self.head_off + self.off[self.start + 1 : stop]))


def _first_coupled(projected: np.ndarray, j: int, width: int, start: int) -> int:
    """First row with a known coupling to the block at ``j``: the previous block, or after a
    thick restart (``j == start``) the first kept row of the arrow (locked rows have none)."""
    if j != start:
        return j - width
    coupled = np.flatnonzero(np.any(projected[:j, j : j + width] != 0.0, axis=1))
    return int(coupled[0]) if coupled.size else j


def _block_step(
    operand: Operand,
    basis: Array,
    scales: np.ndarray,
    projected: np.ndarray,
    j: int,
    start: int,
    width: int,
    norm_estimate: float,
    rng: Any,
    orthogonality: float,
) -> tuple[np.ndarray, float]:
    """One block Lanczos step (see :func:`_extend_lanczos`): ``basis[j + b : j + 2b]`` <- the
    next block, orthonormal with unit scales, ``projected[block, block]`` <- its diagonal block.
    Returns the ``(b, b)`` coupling ``B`` and the updated ``||A||`` estimate."""
    block = slice(j, j + width)
    new = j + width
    # Work in the units of the stored rows: the product of basis[block] is
    # ``X = A basis[block] = A v[block] / scales[block]`` (row r), and a true coefficient c
    # of v_m in ``A v_r`` is removed from X as ``c * scales[m] / scales[r]`` times basis[m].
    own = scales[block].copy()
    # (b, D) rows, one block product, written into the next basis rows (by the operator
    # itself when it takes ``out=``): the residual is formed there, and no copy is made.
    # Its NaN/Inf check is alpha's: NaN and Inf propagate into every inner product with the
    # block, and this saves a pass over the product.
    images = basis[new : new + width]
    operand.matmat_rows_into(basis[block], images, check_finite=False)
    # Subtract the couplings already known (block three-term recurrence, or the arrow after a
    # restart) so that full reorthogonalization only removes rounding-level components.
    # alpha from the raw product (the current block is orthogonal to the earlier ones up to
    # rounding, which the full pass below corrects), so that one update removes both.
    previous = _first_coupled(projected, j, width, start)
    diagonal_block = operand.inner(basis[block].T, images.T) * (own[:, None] * own[None, :])
    if not np.isfinite(diagonal_block).all():
        operand.require_finite_product(images)
        raise FloatingPointError("lanczos: A v overflowed in v^T A v (the product itself is finite)")
    known = np.concatenate((projected[previous:j, block].T, diagonal_block.T), axis=1)
    known *= scales[previous:new][None, :] / own[:, None]
    operand.subtract_combination_(images, known, basis[previous:new])
    norms_before = operand.column_norms(images.T)  # in stored units: true norms are own * these
    norms_after = _reorthogonalize(
        operand, basis, scales, images, j + width, norms_before, orthogonality, block, own, diagonal_block
    )
    diagonal_block = (diagonal_block + diagonal_block.T) / 2
    projected[block, block] = diagonal_block
    norm_estimate = max(norm_estimate, float(np.abs(diagonal_block).sum(0).max()))
    # Orthonormalize the new block column by column (Gram-Schmidt within the block: the
    # columns are already orthogonal to the basis). B is upper triangular; each row is
    # normalized in place before the next one is projected on it (block rows have unit scales).
    coupling = np.zeros((width, width))
    for index in range(width):
        vector = images[index]
        # Without in-block projections the norm is the one just computed.
        stored_norm = float(norms_after[index])
        if index and stored_norm > 0.0:
            for _ in range(2):
                vector, removed = operand.project_out(basis[new : new + index], vector)
                coupling[:index, index] += removed
            before, stored_norm = stored_norm, operand.norm(vector)
            if stored_norm < _DGKS_ETA * before:
                # Most of the column lay along the block's earlier columns: what is left carries
                # the rounding of that removal along the basis too. One pass against the whole
                # basis; if that too removes most of it, the column is in the Krylov space.
                vector, removed = operand.project_out(basis[: new + index], vector)
                coupling[:index, index] += removed[new:]
                before, stored_norm = stored_norm, operand.norm(vector)
                if stored_norm < _DGKS_ETA * before:
                    stored_norm = 0.0
        norm = float(own[index]) * stored_norm
        norm_estimate = max(norm_estimate, norm)
        if _broke_down(operand, basis, scales, new + index, norm, norm_estimate, rng):
            continue
        coupling[index, index] = norm
        operand.scaled_copy_(basis[new + index], vector, 1.0 / stored_norm)
        scales[new + index] = 1.0
    return coupling, norm_estimate


def _single_step(
    operand: Operand,
    views: _RowViews,
    scales: np.ndarray,
    projection: _Projection,
    j: int,
    start: int,
    norm_estimate: float,
    rng: Any,
    orthogonality: float,
    drift: "_Drift",
) -> tuple[float, float]:
    """One single-vector Lanczos step (``b = 1``, see :func:`_extend_single`) in host scalars.

    ``basis[j + 1]`` <- the new residual, unnormalized (its scale recorded), and ``T[j, j]`` <-
    alpha. On an accelerator the Gram matrix of the previous vector ``u``, the current one ``v``
    and the raw product ``w`` comes from one pass and one device-to-host read; the residual's
    norm then follows from the three-term recurrence,
    ``||w - alpha v - beta u||^2 = w^T w - alpha v^T w + beta^2 u^T u - 2 beta u^T w +
    2 alpha beta u^T v`` (true units, ``alpha = v^T w / v^T v``), whenever its rounding error
    (``~ sqrt(D) eps max(||w||^2, ||A||^2)``) is below 1% of the kept orthogonality level
    relative to the result, and is measured otherwise: the host side of a step is its overhead
    there, and this saves a kernel and a synchronizing read per step. On a CPU the norm is
    measured (see the comments below). Returns ``(beta_next, norm_estimate)``.
    """
    new = j + 1
    own = float(scales[j])
    rows = views.rows[new]
    image = views.vectors[new]
    operand.matmat_rows_into(views.rows[j], rows, check_finite=False)
    # Python floats, not numpy scalars, from here on: each numpy call costs microseconds of host
    # time, several times the arithmetic on one number.
    previous = j - 1 if j != start else projection.first_coupled
    recurrence = previous == j - 1  # coupled to the previous row only (three-term recurrence)
    # Where passes are cheap (an accelerator: a step's host time, not memory bandwidth, is its
    # overhead) the one read is the Gram matrix of [u,] v and w (stored units; its last row w's
    # inner products), from which the residual's norm follows exactly; with cheap passes and
    # the three-term recurrence, the same read also brings every stored row's inner products
    # with u, v and w, so each row's drift is measured, not estimated, and a Gram-Schmidt update
    # needs no second pass and read. On a CPU, where passes cost bandwidth (and a (3, D) x (D, 3)
    # product runs 4x slower than a (3, D) x (D,) one), the read is w's inner products with
    # [u,] v and w, and the norm is measured after the subtraction (the new row is in cache).
    # The NaN/Inf check of those inner products is the product's (NaN and Inf propagate into
    # every inner product with it, and the product is still untouched here).
    measure_all = operand.cheap_passes and recurrence
    if measure_all:
        table = operand.gram(views.basis[: new + 1], views.triples[j - 1])
        gram = [table[j - 1], table[j], table[new]]
        products = gram[-1]
    elif operand.cheap_passes:
        gram = operand.gram(views.triples[j - 1] if recurrence else views.pairs[j])
        products = gram[-1]
    else:
        gram = None
        products = operand.dots(views.triples[j - 1] if recurrence else views.pairs[j], image)
    if not all(map(math.isfinite, products)):
        operand.require_finite_product(image)
        raise FloatingPointError("lanczos: A v overflowed in v^T A v or ||A v||^2 (the product itself is finite)")
    # alpha = v^T A v / v^T v (scale-free: w is A v in v's stored units; a measured norm made
    # v^T v = 1 / own^2 to rounding), and in true units ||A v - alpha v||^2 = own^2 (w^T w -
    # alpha v^T w).
    alpha = products[-2] / gram[-2][-2] if gram is not None else own * own * products[-2]
    product_squared = own * own * products[-1]
    squared = product_squared - own * own * alpha * products[-2]
    # Known couplings of rows [previous, j], in stored units (see _block_step).
    if recurrence:
        beta = projection.coupling(j)
        scale = float(scales[j - 1])
        if gram is not None:
            # ... - 2 beta u^T A v + beta^2 u^T u + 2 alpha beta u^T v (true units): exact for
            # the vectors as they are, not as unit vectors, so the norm errors of earlier steps
            # do not compound through this formula (they did, by (alpha^2 + beta^2) /
            # beta_next^2 per step, when it took them for unit vectors).
            squared += beta * scale * (beta * scale * gram[0][0] - 2.0 * own * products[0] + 2.0 * alpha * own * gram[0][1])
        known = (beta * scale / own, alpha)
        if not measure_all:  # (else merged into the update, or subtracted below)
            operand.subtract_rows_(image, known, views.pairs[j - 1], views.vectors[j - 1 : new])
    else:
        known = np.empty((1, new - previous))
        known[0, :-1] = projection.projected[previous:j, j] * scales[previous:j] / own
        known[0, -1] = alpha
        operand.subtract_combination_(rows, known, views.basis[previous:new])
    rounding = _pass_rounding(operand)
    exact = (gram is not None and previous >= j - 1
             and squared * 0.01 * orthogonality >= rounding * max(product_squared, norm_estimate**2))
    norm_before = math.sqrt(squared) / own if exact else 0.0  # stored units
    if measure_all:
        # Each row's inner product with the residual w - alpha v - c u comes from the table (true
        # row units over own) where its rounding, relative to the inner products' operands, is
        # within 1% of the level (the accuracy a measurement pass has); else a pass measures.
        coefficient_u = known[0]
        norms = math.sqrt(gram[2][2]) + abs(alpha) * math.sqrt(gram[1][1]) + abs(coefficient_u) * math.sqrt(gram[0][0])
        measure_all = exact and rounding * norms <= 0.01 * orthogonality * norm_before
        if not measure_all:
            operand.subtract_rows_(image, known, views.pairs[j - 1], views.vectors[j - 1 : new])
    if not exact:  # a CPU, the arrow after a restart, or cancellation too deep for the level kept
        norm_before = operand.norm(image)
    first = None
    if measure_all:
        first = [weight * (row[2] - alpha * row[1] - coefficient_u * row[0])
                 for weight, row in zip(scales[:new].tolist(), table)]
    # Rows [0, reach) get a Gram-Schmidt pass: only up to the last row whose drift (measured, or
    # estimated: see _Drift) exceeds the tolerated level; often none.
    if first is not None:
        scale_down = 1.0 / max(norm_before, 1e-300)
        predicted = [value * scale_down for value in first[:j]]
    else:
        predicted = drift.predict(j, alpha, own * norm_before, norm_estimate)
    reach, forced = drift.reach(j, predicted, orthogonality)
    norm_after = norm_before
    if reach:
        norm_after, alpha = _single_reorthogonalize(
            operand, views, scales, new, reach, norm_before, orthogonality, j, own, alpha, drift, predicted, forced,
            first, known if measure_all else None,
        )
    elif measure_all:
        operand.subtract_rows_(image, known, views.pairs[j - 1], views.vectors[j - 1 : new])
    projection.set_alpha(j, alpha)
    norm = own * norm_after
    norm_estimate = max(norm_estimate, abs(alpha), norm)
    if _broke_down(operand, views.basis, scales, new, norm, norm_estimate, rng):
        norm = 0.0
    else:
        _record_scale(operand, image, scales, new, norm_after)
    drift.advance(predicted, norm, own * norm_before)
    return norm, norm_estimate


def _record_scale(operand: Operand, row: Array, scales: np.ndarray, index: int, stored_norm: float) -> None:
    """Make ``scales[index] * basis[index]`` (``row``) a unit vector: record ``1 / stored_norm``
    (no pass over the row), or normalize the row in place once its norm has left
    ``[1 / scale_limit, scale_limit]``. Stored norms multiply by about ``beta`` per step, so an
    operator with ``||A||`` far from 1 would otherwise drive them to over- or underflow within a
    run (``||A|| = 90``: a scale of 1e-123 after 85 steps, measured)."""
    limit = operand.scale_limit
    if 1.0 / limit <= stored_norm <= limit:
        scales[index] = 1.0 / stored_norm
    else:
        operand.scaled_copy_(row, row, 1.0 / stored_norm)
        scales[index] = 1.0


def _reorthogonalize(
    operand: Operand,
    basis: Array,
    scales: np.ndarray,
    images: Array,
    reach: int,
    norms_before: np.ndarray,
    orthogonality: float,
    block: slice,
    own: np.ndarray,
    diagonal_block: np.ndarray,
) -> np.ndarray:
    """Classical Gram-Schmidt of the new block rows ``images`` against ``basis[:reach]``, a
    second pass only if the first removed a large part of some row (DGKS). The part removed
    along the current block (when ``reach`` covers it) is added to ``diagonal_block`` in place.
    Returns the rows' norms after (stored units), 0 for a row the second pass too reduced by
    more than ``1 - 1/sqrt(2)`` (it lies in the Krylov space). (:func:`_single_reorthogonalize`
    is the single-vector version.)
    """
    norms_after = norms_before
    for repeat in range(2):
        if reach == 0:
            break
        # coefficients[i, r] = v_i^T (A v_r) / own[r], relative to the norms in stored units.
        coefficients = operand.inner(basis[:reach].T, images.T) * scales[:reach, None]
        if (np.abs(coefficients) <= orthogonality * norms_before).all():
            # Already orthogonal to the basis to ``orthogonality`` (relative): the update
            # pass over the basis would change the block by less than that. Skipping it
            # leaves the basis orthogonal to that level, far below what the Ritz values
            # and residuals need (semi-orthogonality, sqrt(eps), suffices; Simon 1984).
            break
        operand.subtract_combination_(images, (coefficients * scales[:reach, None]).T, basis[:reach])
        if reach > block.start:
            diagonal_block += coefficients[block] * own[None, :]
        norms_after = _norms_after_update(operand, coefficients, norms_before, reach, orthogonality)
        if norms_after is None:
            norms_after = operand.column_norms(images.T)
        if (norms_after >= _DGKS_ETA * norms_before).all():
            break
        if repeat:
            # A second pass that again removed most of a row: it lies in the span of the basis
            # to rounding (an invariant subspace; ARPACK's rule), norm 0 (see _broke_down).
            norms_after = np.where(norms_after >= _DGKS_ETA * norms_before, norms_after, 0.0)
        norms_before = norms_after
    return norms_after


def _single_reorthogonalize(
    operand: Operand,
    views: _RowViews,
    scales: np.ndarray,
    new: int,
    reach: int,
    norm_before: float,
    orthogonality: float,
    j: int,
    own: float,
    alpha: float,
    drift: "_Drift",
    predicted: list[float],
    forced: bool,
    first: list[float] | None = None,
    known: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """:func:`_reorthogonalize` of the single new row ``basis[new]`` (stored norm
    ``norm_before``) against ``basis[:reach]``, in host floats (a step's host time is its
    overhead on a GPU). The first pass's inner products replace the drift estimates; a
    ``forced`` update is applied whatever they say. ``first``: the first pass's coefficients,
    already measured by the caller (no pass then); ``known``: the recurrence's coefficients of
    ``basis[j - 1]`` and ``basis[j]``, not yet subtracted, which join the first update (or are
    subtracted alone if it is skipped). Returns the norm after (stored units; 0 if a second pass
    also removed most of the row, as in :func:`_reorthogonalize`) and alpha corrected by the
    part removed along the current row ``j``."""
    image = views.vectors[new]
    weights = scales[: max(reach, j + 1)].tolist()
    for repeat in range(2):
        # coefficients[i] = v_i^T (A v_j) / own, relative to the norm in stored units.
        if repeat == 0 and first is not None:
            coefficients = first[:reach]
        else:
            coefficients = [value * weight for value, weight in zip(operand.dots(views.basis[:reach], image), weights)]
            if repeat == 0:
                scale = 1.0 / max(norm_before, 1e-300)
                drift.measured(predicted, reach, [value * scale for value in coefficients])
        if not (forced and repeat == 0) and max(map(abs, coefficients)) <= orthogonality * norm_before:
            if known is not None:
                operand.subtract_rows_(image, known, views.pairs[j - 1], views.vectors[j - 1 : new])
            return norm_before, alpha  # orthogonal to the level already: see _reorthogonalize
        update = [value * weight for value, weight in zip(coefficients, weights)]
        if known is not None:  # one update for both, over rows [0, max(reach, j + 1))
            update += [0.0] * (j + 1 - len(update))
            update[j - 1] += known[0]
            update[j] += known[1]
            known = None
        operand.subtract_combination_(views.rows[new], np.array([update]), views.basis[: len(update)])
        if reach > j:
            alpha += coefficients[j] * own
        drift.dropped(j, [own * value for value in coefficients])
        drift.reset(reach)
        norm_after = _norm_after_update(operand, coefficients, norm_before, reach, orthogonality)
        if norm_after is None:
            norm_after = operand.norm(image)
        if norm_after >= _DGKS_ETA * norm_before:
            return norm_after, alpha
        norm_before = norm_after
    # Both passes removed most of what was left: the row lies in the span of the basis to
    # rounding (an invariant subspace; ARPACK's rule), norm 0 (see _broke_down).
    return 0.0, alpha


def _pass_rounding(operand: Operand) -> float:
    """Relative rounding bound of a squared norm formed from one pass over ``D`` entries
    (``4 sqrt(D) eps``, a probabilistic summation bound with a safety factor); both norm
    formulas of a step (the recurrence's and :func:`_norm_after_update`) are held to it."""
    return 4.0 * math.sqrt(operand.dim) * operand.eps


def _norm_after_update(
    operand: Operand, coefficients: list[float], norm_before: float, reach: int, orthogonality: float
) -> float | None:
    """Norm of a row after removing ``coefficients`` (its components along ``reach`` basis
    vectors), ``sqrt(||x||^2 - ||c||^2)``, or None where that is not accurate enough.

    Exact for an orthonormal basis; the basis' departure from it (``orthogonality``) adds at
    most ``reach * orthogonality * ||c||^2``, and the update's rounding about
    ``4 sqrt(D) eps (||x||^2 + ||c||_1 ||x||)``. The formula is used when their sum is below 1%
    of ``orthogonality`` relative to the result (the accuracy the recurrence norm is held to)
    and at most half the norm was removed (no DGKS re-pass): that saves a pass over the row
    and a device-to-host read.
    """
    before_squared = norm_before * norm_before
    removed = sum(value * value for value in coefficients)
    after_squared = before_squared - removed
    bound = reach * orthogonality * removed + _pass_rounding(operand) * (
        before_squared + sum(map(abs, coefficients)) * norm_before
    )
    if removed <= 0.5 * before_squared and bound <= 0.01 * orthogonality * after_squared:
        return math.sqrt(after_squared)
    return None


def _norms_after_update(
    operand: Operand, coefficients: np.ndarray, norms_before: np.ndarray, reach: int, orthogonality: float
) -> np.ndarray | None:
    """:func:`_norm_after_update` of each column of ``coefficients`` ``(reach, b)`` (norms
    ``norms_before`` ``(b,)``): the norms, or None if any is not accurate enough."""
    norms = [
        _norm_after_update(operand, column, norm, reach, orthogonality)
        for column, norm in zip(coefficients.T.tolist(), norms_before.tolist())
    ]
    return None if None in norms else np.array(norms)


def _broke_down(
    operand: Operand, basis: Array, scales: np.ndarray, row: int, norm: float, norm_estimate: float, rng: Any
) -> bool:
    """If the new row's true ``norm`` is at rounding level (an invariant subspace), replace it by
    a fresh random unit direction orthogonal to the basis (with zero coupling, which keeps the
    Lanczos relation exact) and return True.

    A row at index ``D`` or beyond has no direction left: rows ``[0, D)`` span the whole space,
    which ``A`` maps into itself, so the coupling is exactly 0 whatever rounding left in the row.
    The row is zeroed and the Ritz pairs are exact; every residual estimate is then 0, so the
    run ends here (with ``block_size > 1`` no row goes past ``D``: see :func:`_whole_space`).
    """
    if row >= operand.dim:
        basis[row] = 0.0
        scales[row] = 1.0
        return True
    if norm > _BREAKDOWN_FACTOR * operand.eps * norm_estimate:
        return False
    _normalize_rows(operand, basis, scales, row)
    basis[row] = _random_orthogonal(operand, basis[:row], rng)
    scales[row] = 1.0
    return True


def _normalize_rows(operand: Operand, basis: Array, scales: np.ndarray, stop: int) -> None:
    """Apply the recorded scales to ``basis[:stop]`` in place (before a generic Gram-Schmidt)."""
    for index in np.flatnonzero(scales[:stop] != 1.0):
        operand.scaled_copy_(basis[index], basis[index], float(scales[index]))
        scales[index] = 1.0


class _Drift:
    """Estimates of ``omega_i = v_{j+1}^T v_i``, the newest Lanczos vector's drift from
    orthogonality to the basis rows, by Simon's (1984) recurrence generalised to the arrow of
    a thick restart.

    From ``A v_i = sum_m T[m, i] v_m`` for every row ``i < j`` (``T``: the three-term
    recurrence, and ``theta_i v_i + sigma_i v_start`` for kept Ritz vectors) and
    ``beta_{j+1} v_{j+1} = A v_j - sum_m T[m, j] v_m - f`` (``f``: rounding),

        beta_{j+1} omega_{j+1, i} = (omega_j T)_i - sum_{m known} T[m, j] omega_{m, i} - v_i^T f,

    with ``omega_j`` the row of the current vector (1 at ``j``). ``|v_i^T f|`` is bounded by
    ``eps ||A||`` (times a safety factor), added in the direction that grows the estimate.

    A kept Ritz vector satisfies ``A y_i = theta_i y_i + sigma_i v_start`` only up to the
    Gram-Schmidt coefficients removed from the vectors it combines (they are not in ``T``):
    ``E_i = V C s_i``, of norm up to about ``level * beta``. That error lies in the span of the
    old basis, discarded directions included, which new vectors are not orthogonal to, so it
    enters ``omega_{j+1, i}`` as ``|v_j^T E_i| <= ||E_i||`` per step: divided by a small
    ``beta_{j+1}``, many times the level (converged Ritz vectors of a spectrum's other end, at
    ``beta / ||A|| ~ 1e-4``: 1e-5 per step). A bound ``errors[i]`` per kept row is added to its
    estimate: the cycle's removed coefficients ``C`` (``removed[l, j]``: row ``l``'s coefficient
    taken out of vector ``j``) give ``E_i = V C s_i``, whose part in the discarded directions
    is ``||S_disc^T C s_i||`` (``V = [Y, Y_disc] S^T``); older kept rows' bounds combine as
    ``sum_m |s_mi| errors[m]``. (The part along kept rows, and within a cycle all of it, lies
    along basis rows, to which new vectors are orthogonal to the level: second order.)
    Rows whose estimate exceeds the tolerated level get a Gram-Schmidt pass, whose measured
    inner products replace the estimates; the loss concentrates on converged Ritz directions
    (Paige), mostly the first kept rows, so most passes cover a few rows instead of all.

    The rows are lists of Python floats and ``T`` is read from a :class:`_Projection`: with
    about 20 entries, one loop in the interpreter costs a fraction of the dozen numpy calls it
    replaces (in-run, after a product, 18 vs 73 us on a CPU), and on a GPU a step's host time
    is its overhead.
    """

    #: A full measurement at least this often, in case rounding outgrows the model.
    FULL_EVERY = 8
    #: Safety factor on the rounding term, and on the level a row may reach unmeasured.
    NOISE = 4.0
    MARGIN = 0.25

    def __init__(self, projection: _Projection, eps: float) -> None:
        self.projection = projection
        self.eps = eps
        self.start = 0
        self.current = [1.0]  # the start vector
        self.previous: list[float] = []
        self.since_full = 0
        self._reset = 0  # rows [0, _reset) updated by this step's pass
        self._follow = 0  # rows the next step must update again (the second of a pair)
        self._forced = False  # this step is the second of a pair
        self._local = eps  # drift along v_j itself (alpha's rounding), set by predict
        self.locked_residuals: list[float] = []  # residual norms of the locked rows [0, L)
        size = len(projection.diag)
        self.errors = [0.0] * size  # kept rows: bounds on the relation error (true units)
        self.removed = np.zeros((size, size))  # the cycle's removed coefficients, C

    def begin(self, start: int) -> None:
        """A Lanczos cycle from row ``start``, whose drift row is ``current`` (see restart)."""
        self.start = start
        self.previous = [0.0] * start
        self.errors[start:] = [0.0] * (len(self.errors) - start)
        self.removed[:, start:] = 0.0
        self.since_full = 0
        self._follow = 0

    def restart(self, vectors: np.ndarray, order: np.ndarray) -> None:
        """Thick restart ``basis[:p] <- S_kept^T basis[:m]`` (``S_kept = vectors[:, order]``):
        the residual row moves to row ``p`` and keeps its drift, ``omega_new = omega[:m]
        S_kept`` (the kept rows are combinations of rows it had drifted from); the kept rows'
        relation error bounds are formed (see the class)."""
        m, start = vectors.shape[0], self.start
        kept = vectors[:, order]
        row = (np.array(self.current[:m]) @ kept).tolist()
        row.append(1.0)
        self.current = row
        discarded = np.ones(m, dtype=bool)
        discarded[order] = False
        inherited = np.array(self.errors[:start]) @ np.abs(kept[:start])
        new = np.sqrt(np.square(vectors[:, discarded].T @ (self.removed[:m, :m] @ kept)).sum(0))
        self.errors[: len(order)] = (inherited + new).tolist()

    def dropped(self, j: int, coefficients: list[float]) -> None:
        """Vector ``j``'s update removed ``coefficients`` (true units) along rows
        ``[0, len(coefficients))`` besides its own (which alpha takes): not in ``T``."""
        self.removed[: len(coefficients), j] += coefficients
        self.removed[j, j] = 0.0

    def predict(self, j: int, alpha: float, beta_next: float, norm: float) -> list[float]:
        """Estimates of ``omega_{j+1, i}``, ``i < j`` (before this step's pass)."""
        start = self.start
        if j == start or beta_next <= 0.0:
            return [math.inf] * j  # first step of a cycle: the arrow touches every kept row
        t = self.projection
        diag, off, arrow = t.diag, t.off, t.arrow
        current, previous = self.current, self.previous
        beta = off[j]
        noise = self.NOISE * self.eps * norm
        self._local = noise / beta_next
        locked = self.locked_residuals
        num_locked = len(locked)
        errors = self.errors
        pivot = current[start]
        # (omega_j T)_i over T's nonzeros: the kept block's diagonal and arrow, then the
        # tridiagonal part (row j's own coupling enters through current[j] = 1).
        image = [0.0] * j
        for i in range(j):
            if i < start:
                value = current[i] * diag[i] + pivot * arrow[i]
            elif i > start:
                value = current[i - 1] * off[i] + current[i] * diag[i] + current[i + 1] * off[i + 1]
            else:
                value = sum(map(operator.mul, current[:start], arrow))
                value += pivot * diag[i] + current[i + 1] * off[i + 1]
            value -= alpha * current[i] + beta * previous[i]
            # Rounding, a kept row's relation error, and a locked row's residual r_i (it is an
            # eigenvector only up to r_i, so v_j^T r_i adds |r_i|), in the direction that grows
            # the estimate.
            if i < start:
                bound = noise + errors[i] + (locked[i] if i < num_locked else 0.0)
            else:
                bound = noise
            image[i] = (value + bound if value >= 0.0 else value - bound) / beta_next
        return image

    def reach(self, j: int, predicted: list[float], level: float) -> tuple[int, bool]:
        """Rows ``[0, reach)`` to measure, and whether they must be updated whatever the
        measurement says.

        Measured: all rows after ``FULL_EVERY`` steps, else up to the last row above
        ``MARGIN * level`` (0: none). Updated in any case: the rows the previous step updated
        (Simon's partial reorthogonalization removes them from two consecutive vectors, so that
        the drift regrows from rounding; after one update alone the previous vector's drift,
        about the level, re-enters the next one through the recurrence within a step), and at
        the first step of a cycle, whose arrow makes it measure every row anyway. That pair
        resets the drift to rounding, from where it regrows by about 10x per step on the
        benchmark's Hessian, so the rest of a cycle usually passes without a measurement
        (otherwise a cycle made 1-3 more passes over part of the basis there: partial
        measurements, then a pair of updates; on a GPU a pass costs as much host time as a quiet
        step).
        """
        follow, self._follow = self._follow, 0
        self._forced = follow > 0
        reach = self._measured_reach(j, predicted, level)
        if self._forced:
            reach = max(reach, min(follow, j + 1))
        return reach, self._forced or j == self.start

    def _measured_reach(self, j: int, predicted: list[float], level: float) -> int:
        self.since_full += 1
        if j == self.start or self.since_full >= self.FULL_EVERY or not sum(map(abs, predicted)) < math.inf:
            self.since_full = 0  # (a sum that is not finite: an Inf or NaN estimate)
            return j + 1
        bound = self.MARGIN * level
        # One past the last row above the level (0: none).
        reach = next((i + 1 for i in range(j - 1, -1, -1) if abs(predicted[i]) > bound), 0)
        if reach >= j:
            self.since_full = 0
            return j + 1
        return reach

    def measured(self, predicted: list[float], reach: int, values: list[float]) -> None:
        """Replace the estimates of rows ``[0, reach)`` by the inner products just formed."""
        count = min(reach, len(predicted))
        predicted[:count] = values[:count]

    def reset(self, reach: int) -> None:
        """After an update over rows ``[0, reach)`` those are orthogonal to rounding."""
        self._reset = reach

    def advance(self, predicted: list[float], beta_next: float, beta_before: float) -> None:
        """Move to the next vector: its row is the estimate (1 at its own index).

        Estimates and measurements are relative to the norm before this step's update,
        ``beta_before``; the new vector is that residual divided by ``beta_next``.
        """
        reach, self._reset = self._reset, 0
        self._follow = 0 if self._forced else reach
        j = len(predicted)
        eps = self.eps
        if beta_next > 0 and beta_before > 0:
            # Finite: a non-finite estimate (a cycle's first step) forces a full measurement,
            # which replaces every entry; were one left, the next step would measure all rows.
            factor = beta_before / beta_next
            row = [value * factor for value in predicted]
            row[: min(reach, j)] = [eps] * min(reach, j)
            row.append(eps if reach > j else self._local)
        else:  # breakdown: a fresh random direction, orthogonalized twice against every row
            row = [eps] * (j + 1)
        row.append(1.0)
        self.previous, self.current = self.current, row


def _num_kept(k: int, basis_size: int, num_converged: int) -> int:
    """How many Ritz vectors a thick restart keeps.

    The k wanted ones plus one extra per converged wanted pair, up to half of the free slots:
    ARPACK's ``nev + min(nconv, np / 2)`` (keeping converged directions stops them from
    re-entering the search). A cap of two thirds saved 3-7% of the matvecs on GOE spectra (none
    on clustered, decaying, outlier + bulk spectra or the MLP Hessian of the benchmark) but
    restarted 1.4x as often; with half, every one of 32 test runs (D = 2000, four spectra, tol
    1e-6 and 1e-10, four seeds) used at most as many matvecs as ARPACK from the same start.
    """
    free = basis_size - k
    return min(k + min(num_converged, free // 2), basis_size - 1)


def _tridiagonal_head(projected: np.ndarray, first: int, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tridiagonal form of the kept block ``[first, start)`` of a thick-restart arrow.

    After a restart ``projected`` holds ``diag(theta)`` on the kept rows and their couplings
    ``sigma`` to row ``start``. An orthogonal ``G`` (Householder, ``p = start - first`` rows)
    with ``G^T diag(theta) G`` tridiagonal and ``G^T sigma = c e_p`` makes the whole active
    matrix tridiagonal: rows from ``start`` on are untouched, so Ritz values and the last
    components of Ritz vectors (the residual estimates) are those of the original matrix.
    Returns ``G`` ``(p, p)``, the diagonal ``(p,)`` and the off-diagonal ``(p,)``, whose last
    entry is ``c``, the coupling of the block to row ``start``.
    """
    p = start - first
    if p == 0:  # every kept row locked
        return np.zeros((0, 0)), np.zeros(0), np.zeros(0)
    arrow = np.zeros((p + 1, p + 1))
    arrow[1:, 0] = arrow[0, 1:] = projected[start, first:start]
    arrow[np.arange(1, p + 1), np.arange(1, p + 1)] = projected.diagonal()[first:start]
    # Householder reflections on rows 1..p only (Q e_1 = e_1): the coupling column becomes c e_1.
    # LAPACK directly: scipy.linalg.hessenberg's checks and workspace query cost 3x the
    # factorization (13 vs 39 us, p = 15), once per restart.
    # (Both report only illegal arguments through info, which these calls cannot pass.)
    reduced, reflectors, _ = scipy.linalg.lapack.dgehrd(arrow, lwork=32 * (p + 1))
    rotation, _ = scipy.linalg.lapack.dorghr(reduced, reflectors, lwork=32 * (p + 1))
    diagonal = reduced.diagonal()[1:][::-1].copy()
    off = np.empty(p)
    off[:-1] = reduced.diagonal(-1)[1:][::-1]
    off[-1] = reduced[1, 0]
    return rotation[1:, 1:][:, ::-1].copy(), diagonal, off


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
    allows: at tolerances above about ``1e-8``). The per-step convergence check solves the tridiagonal projected
    problem (the kept block of a restart is reduced to tridiagonal form once). Thick restarts
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
        A :class:`RuntimeWarning` is issued if some pair did not converge within ``max_iter``.
    """
    operand = as_operand(A, dim)
    size = operand.dim
    which = _check_which(which)
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
    tol = _check_tol(tol, operand)
    default_basis_size = max(2 * k + 1, 20, k + 2 * width)
    if max_basis_size is None:
        basis_size = min(size, default_basis_size)
    else:
        basis_size = check_int(max_basis_size, "max_basis_size", k + width)
        if basis_size > size:
            raise ValueError(f"max_basis_size must be <= D={size}, got {basis_size}")
    max_steps = max(1000, 50 * basis_size) if max_iter is None else check_int(max_iter, "max_iter", width)
    rng = operand.rng(check_seed(seed))
    # Every product is of A / s, s a power of two of about the first product's size where
    # ||A|| is far from 1 (see Operand.scale_products); results are scaled back at the end.
    operand.scale_products()
    if width > 1 and basis_size + width > size:
        # A cycle would need more than D orthonormal rows (its basis and the residual block
        # after it): its last blocks would have fewer new directions than columns, and no
        # direction is left to replace the others with. Where a basis of the default size
        # still fits beside the residual block, the basis shrinks to D - b; else (D < about
        # 20 + b) the whole space costs about as many products as one such cycle, and its Ritz
        # pairs are the eigenpairs, where a tiny basis could restart past a wanted one.
        if size - width >= default_basis_size:
            basis_size = size - width
        else:
            eigenvalues, ritz_vectors, estimates, norm_estimate = _whole_space(operand, k, which, width)
            return _finish(operand, k, tol, eigenvalues, ritz_vectors, estimates, norm_estimate, 0, exact_residuals,
                           f"although the products spanned the whole space (D={size}): tol is below their rounding")
    # Basis orthogonality kept: semi-orthogonality, sqrt(eps) (1.5e-8 in float64), which keeps
    # the Ritz values accurate to rounding (Simon 1984), and 100x below tol, so that the
    # residual estimates are within 1% of tol. The drift passes the level a few steps after
    # each pair of updates (10x per step on the benchmark's Hessian): a tighter level (eps^(3/4)
    # before) only makes those pairs more frequent.
    orthogonality = min(math.sqrt(operand.eps), 0.01 * tol)

    basis = operand.empty((basis_size + width, operand.local_dim))
    basis[:width] = _start_block(operand, v0, width, rng)
    # Lanczos vector i is scales[i] * basis[i] (see _extend_lanczos; restarts reset to 1).
    scales = np.ones(basis_size + width)
    projected = np.zeros((basis_size, basis_size))
    if width == 1:
        projection = _Projection(projected)
        drift = _Drift(projection, operand.eps)
        views = _RowViews(basis)
    start, restarts, norm_estimate = 0, 0, 0.0
    # Locked rows [0, locked): wanted Ritz pairs converged far below tol, frozen; restarts
    # recombine, and the projected eigenproblem covers, only the rows after them. The lock level
    # keeps the dropped couplings rounding-sized (each enters the drift estimates of its row).
    locked, locked_residuals = 0, np.zeros(0)
    # The restart's kept block in tridiagonal form (single-vector Lanczos; none kept at first).
    head = (np.zeros((0, 0)), np.zeros(0), np.zeros(0))
    lock_threshold = min(_LOCK * tol, 1e3 * operand.eps)

    def active_threshold(threshold: float) -> float:
        return threshold - (float(locked_residuals.max()) if locked else 0.0)

    def active_eigh(stop: int, vectors: bool) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of the active block ``[locked, stop)``; with
        ``vectors=False`` only the last ``width`` rows of the eigenvectors are exact."""
        if width == 1 and stop - locked > 1:  # (LAPACK's wrapper rejects n = 1)
            # Single-vector Lanczos: the active block is tridiagonal once the restart's kept
            # block is (see _tridiagonal_head). A tridiagonal eigensolver costs half of a dense
            # one in-run, where a product has just evicted LAPACK from the caches (n = 21: 117
            # vs 237 us on the H200's host, 106-127 vs 280-350 us on a 2-core VM), and this
            # runs after every step.
            rotation, head_diagonal, head_off = head
            kept = head_diagonal.size
            diagonal = np.empty(stop - locked)
            off = np.empty(stop - locked - 1)
            diagonal[:kept] = head_diagonal
            off[:kept] = head_off
            diagonal[kept:] = projected.diagonal()[start:stop]
            off[kept:] = projected.diagonal(1)[start : stop - 1]
            values, active, info = scipy.linalg.lapack.dstev(diagonal, off, compute_v=1)
            if info == 0:
                if vectors and kept:
                    active[:kept] = rotation @ active[:kept]
                return values, active
        return np.linalg.eigh(projected[locked:stop, locked:stop])

    def active_ritz(
        stop: int, coupling: np.ndarray, vectors: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values and residual estimates of rows ``[0, stop)`` (locked rows first), and the
        eigenvectors of the active block ``[locked, stop)`` (only their last rows exact unless
        ``vectors``): all the per-step check needs."""
        values, active = active_eigh(stop, vectors)
        last = coupling @ active[-width:]
        # Filled in place: np.concatenate/np.diag wrappers cost more than the copies.
        theta, residuals = np.empty(stop), np.empty(stop)
        theta[:locked] = projected.diagonal()[:locked]
        theta[locked:] = values
        residuals[:locked] = locked_residuals
        if width == 1:
            np.abs(last[0], out=residuals[locked:])
        else:
            residuals[locked:] = np.sqrt(np.square(last).sum(0))
        return theta, active, residuals

    def ritz(stop: int, coupling: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values, vectors (in the basis) and residual estimates of rows ``[0, stop)``."""
        theta, active, residuals = active_ritz(stop, coupling, vectors=True)
        vectors = np.zeros((stop, stop))
        vectors[np.arange(locked), np.arange(locked)] = 1.0
        vectors[locked:, locked:] = active
        return theta, vectors, residuals

    def wanted_converged(stop: int, coupling: np.ndarray, norm_bound: float) -> bool:
        # Checked after every block (an m x m eigenproblem, negligible next to a matvec), so the
        # run ends as soon as the residuals allow instead of at the next restart. In the first
        # cycle only from 2k vectors on, so that a nearly invariant small Krylov space of a
        # lucky start does not end the run before the basis has explored the spectrum.
        if restarts == 0 and stop < min(2 * k, basis_size):
            return False
        # No (m, m) assembly of the vectors: on a GPU the host side of a step is its overhead.
        theta, _, residuals = active_ritz(stop, coupling)
        threshold = active_threshold(tol * max(norm_bound, float(np.abs(theta).max())))
        return bool((residuals[_select(theta, which, min(k, stop))] <= threshold).all()) and stop >= k

    def single_converged(stop: int, beta: float, norm_bound: float) -> bool:
        """wanted_converged for single-vector Lanczos, on host floats: the tridiagonal
        eigensolver's output is read once (values and the eigenvectors' last row), the rest is
        Python arithmetic on about 20 numbers (numpy calls cost microseconds each in-run)."""
        if restarts == 0 and stop < min(2 * k, basis_size):
            return False
        if stop - locked < 2:
            return wanted_converged(stop, np.array([[beta]]), norm_bound)
        values, active, info = scipy.linalg.lapack.dstev(*projection.active(stop), compute_v=1)
        if info != 0:  # the dense eigensolver instead
            return wanted_converged(stop, np.array([[beta]]), norm_bound)
        theta = projection.diag[:locked] + values.tolist()
        residuals = drift.locked_residuals + [abs(beta * last) for last in active[-1].tolist()]
        threshold = active_threshold(tol * max(norm_bound, max(map(abs, theta))))
        return all(residuals[index] <= threshold for index in _select(theta, which, min(k, stop))) and stop >= k

    while True:
        # At least one block fits: start <= basis_size - width after a restart, and the loop
        # ends before the matvec budget drops below one block.
        num_blocks = min((basis_size - start) // width, (max_steps - operand.num_matvecs) // width)
        stop = start + width * num_blocks
        if width == 1:
            beta, norm_estimate, stop = _extend_single(
                operand, views, scales, projection, start, stop, norm_estimate, rng, single_converged,
                orthogonality, drift,
            )
            coupling = np.array([[beta]])
        else:
            coupling, norm_estimate, stop = _extend_lanczos(
                operand, basis, scales, projected, start, stop, width, norm_estimate, rng, wanted_converged,
                orthogonality,
            )
        theta, vectors, residual_estimates = ritz(stop, coupling)
        norm_estimate = max(norm_estimate, float(np.abs(theta).max()))
        threshold = tol * norm_estimate
        wanted = _select(theta, which, min(k, stop))
        num_converged = int(np.sum(residual_estimates[wanted] <= active_threshold(threshold)))
        out_of_budget = operand.num_matvecs + width > max_steps
        if (num_converged == k and len(wanted) == k) or out_of_budget:
            break
        num_kept = _num_kept(k, basis_size - width + 1, num_converged)
        kept = np.asarray(_select(theta, which, num_kept))
        # Thick restart: basis <- Ritz vectors, projected matrix <- diag(theta) + arrow couplings.
        # Locked rows stay where they are; newly locked ones (single-vector Lanczos only) come
        # next, then the other kept Ritz vectors: only the rows after the old locked ones are
        # recombined.
        lockable = np.zeros(stop, dtype=bool)
        if width == 1:
            lockable[wanted] = residual_estimates[wanted] <= lock_threshold * norm_estimate
        moving = kept[kept >= locked][: max(num_kept - locked, 0)]
        # Array operations: list comprehensions over numpy integers cost ~0.15 ms per restart.
        order = np.concatenate((np.arange(locked), moving[lockable[moving]], moving[~lockable[moving]]))
        num_kept = order.size
        # One recombination gives the kept Ritz vectors and moves the residual block after them,
        # normalized (its recorded scale applied: carried over restarts, it would drift).
        combination = np.zeros((num_kept - locked + width, stop - locked + width))
        combination[: num_kept - locked, : stop - locked] = vectors[locked:stop, order[locked:]].T * scales[locked:stop]
        combination[num_kept - locked :, stop - locked :] = np.diag(scales[stop : stop + width])
        operand.combine_rows_(basis[locked : stop + width], combination)
        scales[locked : num_kept + width] = 1.0
        if width == 1:
            drift.restart(vectors, order)
        arrow = coupling @ vectors[stop - width : stop, order]
        newly = int(lockable[order[locked:]].sum())
        locked_residuals = np.concatenate([locked_residuals, residual_estimates[order[locked : locked + newly]]])
        locked += newly
        arrow[:, :locked] = 0.0  # the locked rows' couplings (<= lock_threshold ||A||) are dropped
        if width == 1:
            drift.locked_residuals = locked_residuals.tolist()
        projected[:] = 0.0
        projected[np.arange(num_kept), np.arange(num_kept)] = theta[order]
        projected[num_kept : num_kept + width, :num_kept] = arrow
        projected[:num_kept, num_kept : num_kept + width] = arrow.T
        start = num_kept
        if width == 1:
            head = _tridiagonal_head(projected, locked, start)
            projection.load(start, head)
        restarts += 1

    ritz_vectors = operand.matmul(basis[:stop].T, operand.from_host(scales[:stop, None] * vectors[:, wanted]))
    return _finish(operand, k, tol, theta[wanted], ritz_vectors, residual_estimates[wanted], norm_estimate,
                   restarts, exact_residuals, f"within max_iter={max_steps} matvecs")


def _whole_space(operand: Operand, k: int, which: str, width: int) -> tuple[np.ndarray, Array, np.ndarray, float]:
    """The ``k`` wanted eigenpairs from the products of the whole standard basis, ``width``
    columns at a time: the projected matrix is ``A`` itself (symmetrized), and its eigenpairs'
    residuals in it are the residual estimates. Returns the eigenvalues, the eigenvectors
    ``(D, k)``, the residual estimates and ``||A||``."""
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
    return values[wanted], ritz_vectors, estimates, float(np.abs(values).max())


def _finish(
    operand: Operand,
    k: int,
    tol: float,
    eigenvalues: np.ndarray,
    ritz_vectors: Array,
    estimates: np.ndarray,
    norm_estimate: float,
    restarts: int,
    exact_residuals: bool,
    unconverged: str,
) -> EigenResult:
    """:func:`lanczos`' result from its Ritz pairs (in the units of the scaled products, see
    :meth:`Operand.scale_products`): residuals (explicit, or ``estimates``), the convergence
    flags, a warning ending in ``unconverged`` if some pair is missing or not converged, and the
    values scaled back to ``A``'s units."""
    if exact_residuals:
        # NaN/Inf in the product propagate into the norms: their check replaces a pass.
        residual_block = operand.matmat(ritz_vectors, check_finite=False)
        operand.subtract_scaled_columns_(residual_block, ritz_vectors, eigenvalues)
        residual_norms = operand.column_norms(residual_block)
        if not np.all(np.isfinite(residual_norms)):
            operand.require_finite_product(residual_block)
            raise FloatingPointError("lanczos: the final residuals overflowed (the product itself is finite)")
    else:
        residual_norms = estimates
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
        converged=_bool_array(operand, converged),
        num_matvecs=operand.num_matvecs,
        num_restarts=restarts,
        spectral_norm_estimate=operand.unscale(norm_estimate),
    )


def _bool_array(operand: Operand, values: np.ndarray) -> Array:
    if operand.backend == "torch":
        import torch

        return torch.as_tensor(values, device=operand.device)
    return np.asarray(values, dtype=bool)


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
    ``|lambda_{i+1} / lambda_i|``, so prefer :func:`lanczos` unless parity with PyHessian-style
    workflows is wanted.

    Parameters
    ----------
    A
        Symmetric ``(D, D)`` operator (see :func:`lanczos` for accepted types).
    k
        Number of eigenpairs, ``1 <= k <= D``.
    tol
        Relative residual tolerance per pair, in ``(0, 1)`` (``ValueError`` otherwise): stop
        when ``||A v - lambda v|| <= tol * max(|lambda_1|, |lambda|)``. Default ``sqrt(eps)``.
        Operators of any norm within the dtype's range work alike (products are scaled by a
        power of two where needed, see :func:`lanczos`).
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
    start = _unit_columns(operand, [operand.as_vector(v0, "v0")])[0] if v0 is not None else None
    operand.scale_products()  # products of A / s (see lanczos); scaled back below

    found = operand.zeros((k, operand.local_dim))
    eigenvalues = np.zeros(k)
    residual_norms = np.zeros(k)
    norm_estimate = 0.0
    for index in range(k):
        raw = start if start is not None else operand.probes(1, "gaussian", rng)[:, 0]
        vector, norm = operand.orthogonalize(found[:index], raw)
        if norm <= _BREAKDOWN_FACTOR * operand.eps * operand.norm(raw):
            vector = _random_orthogonal(operand, found[:index], rng)
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
        converged=_bool_array(operand, converged),
        num_matvecs=operand.num_matvecs,
        num_restarts=0,
        spectral_norm_estimate=operand.unscale(norm_estimate),
    )
