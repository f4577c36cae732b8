"""Reorthogonalization policies of the Lanczos recurrence (``curvops.algorithms.lanczos_core``).

In floating point the Lanczos vectors lose orthogonality as Ritz pairs converge (Paige 1972):
copies of converged eigenvalues appear unless each new vector is reorthogonalized. Two
policies keep the basis orthonormal to a chosen level:

* ``FullReorthogonalization``: classical Gram-Schmidt against every stored vector, a
  second pass only where the first removed much of the vector (DGKS: Daniel, Gragg, Kaufman &
  Stewart 1976). Block Lanczos steps and SLQ use it.
* ``PartialReorthogonalization``: Simon's (1984) recurrence estimates each stored vector's
  drift and only the rows above the level are measured and removed, from two consecutive
  vectors; semi-orthogonality (``sqrt(eps)``) keeps the Ritz values accurate to rounding.
  Single-vector Lanczos uses it.

A Gram-Schmidt update is skipped where every coefficient it would remove is below the level:
the basis is then orthonormal to that level instead of to rounding, which is all the Ritz
values and residuals need (Simon 1984).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import numpy as np

from curvops.algorithms.vectors import Array, Operand

if TYPE_CHECKING:
    from curvops.algorithms.lanczos_core import BlockStep, LanczosState, RowStep, TridiagonalProjection

__all__ = [
    "DGKS_ETA",
    "FullReorthogonalization",
    "PartialReorthogonalization",
    "norm_after_update",
    "norms_after_update",
    "pass_rounding",
]

#: DGKS criterion (Daniel, Gragg, Kaufman, Stewart 1976): a second Gram-Schmidt pass is needed
#: only if the first one removed more than ``1 - 1/sqrt(2)`` (about 30%) of the vector's norm.
DGKS_ETA = 1.0 / math.sqrt(2.0)


def pass_rounding(operand: Operand) -> float:
    """Relative rounding bound of a squared norm formed from one pass over ``D`` entries
    (``4 sqrt(D) eps``, a probabilistic summation bound with a safety factor); both norm
    formulas of a step (the recurrence's and ``norm_after_update``) are held to it.

    Parameters
    ----------
    operand
        The vector layer (its ``dim`` and ``eps``).

    Returns
    -------
    float
        The relative bound.
    """
    return 4.0 * math.sqrt(operand.dim) * operand.eps


def norm_after_update(
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

    Parameters
    ----------
    operand
        The vector layer.
    coefficients
        Components removed (stored units).
    norm_before
        The row's norm before (stored units).
    reach
        Rows the components were removed along.
    orthogonality
        The basis' orthogonality level.

    Returns
    -------
    float or None
        The norm after, or None where the formula is not accurate enough.
    """
    before_squared = norm_before * norm_before
    removed = sum(value * value for value in coefficients)
    after_squared = before_squared - removed
    bound = reach * orthogonality * removed + pass_rounding(operand) * (
        before_squared + sum(map(abs, coefficients)) * norm_before
    )
    if removed <= 0.5 * before_squared and bound <= 0.01 * orthogonality * after_squared:
        return math.sqrt(after_squared)
    return None


def norms_after_update(
    operand: Operand, coefficients: np.ndarray, norms_before: np.ndarray, reach: int, orthogonality: float
) -> np.ndarray | None:
    """``norm_after_update`` of each column of ``coefficients`` ``(reach, b)`` (norms
    ``norms_before`` ``(b,)``): the norms, or None if any is not accurate enough.

    Parameters
    ----------
    operand
        The vector layer.
    coefficients
        ``(reach, b)`` components removed (stored units).
    norms_before
        ``(b,)`` norms before.
    reach
        Rows the components were removed along.
    orthogonality
        The basis' orthogonality level.

    Returns
    -------
    numpy.ndarray or None
        ``(b,)`` norms after, or None if any is not accurate enough.
    """
    norms = [
        norm_after_update(operand, column, norm, reach, orthogonality)
        for column, norm in zip(coefficients.T.tolist(), norms_before.tolist())
    ]
    return None if None in norms else np.array(norms)


class FullReorthogonalization:
    """Reorthogonalization against every stored vector: classical Gram-Schmidt, a second pass
    only where the first removed a large part of a vector (DGKS).

    Used by block Lanczos steps (``extend``
    with ``width > 1``) and by SLQ
    (``tridiagonalize_probes``).
    """

    def reorthogonalize_block(self, state: LanczosState, step: BlockStep) -> np.ndarray:
        """Classical Gram-Schmidt of the new block rows ``step.images`` against the basis rows
        ``[0, step.new)``, a second pass only where the first removed more than ``1 - 1/sqrt(2)``
        of a row (DGKS).

        Parameters
        ----------
        state
            The Lanczos state: its operand, basis (Lanczos vector ``i`` is ``scales[i] *
            basis[i]``) and orthogonality level, below which a coefficient is not removed (0:
            always): the basis is then orthonormal to about that level instead of to rounding.
        step
            The block step: the residual block ``images`` (updated in place), its norms before
            (stored units), the current block's rows and scales, and ``A_j`` (the part removed
            along the current block is added to it in place).

        Returns
        -------
        numpy.ndarray
            ``(b,)`` norms after (stored units); 0 for a row the second pass too reduced by more
            than ``1 - 1/sqrt(2)`` (it lies in the Krylov space).
        """
        operand, basis, scales, orthogonality = state.operand, state.basis, state.scales, state.orthogonality
        images, block, own, reach = step.images, step.block, step.own, step.new
        norms_before = norms_after = step.norms_before
        for repeat in range(2):
            if reach == 0:
                break
            # coefficients[i, r] = v_i^T (A v_r) / own[r], relative to the norms in stored units.
            coefficients = operand.inner(basis[:reach].T, images.T) * scales[:reach, None]
            if (np.abs(coefficients) <= orthogonality * norms_before).all():
                # Already orthogonal to the basis to the level (relative): the update would change
                # the block by less than that. Skipping it leaves the basis orthogonal to that
                # level, far below what the Ritz values and residuals need (semi-orthogonality,
                # sqrt(eps), suffices; Simon 1984).
                break
            operand.subtract_combination_(images, (coefficients * scales[:reach, None]).T, basis[:reach])
            if reach > block.start:
                step.diagonal_block += coefficients[block] * own[None, :]
            estimated = norms_after_update(operand, coefficients, norms_before, reach, orthogonality)
            norms_after = operand.column_norms(images.T) if estimated is None else estimated
            if (norms_after >= DGKS_ETA * norms_before).all():
                break
            if repeat:
                # A second pass that again removed most of a row: it lies in the span of the basis
                # to rounding (an invariant subspace; ARPACK's rule), norm 0: the state then
                # continues with a random direction (LanczosState._broke_down).
                norms_after = np.where(norms_after >= DGKS_ETA * norms_before, norms_after, 0.0)
            norms_before = norms_after
        return norms_after

    def reorthogonalize_probes(self, operand: Operand, past: Array, w: Array, alpha: np.ndarray) -> Array:
        """Two classical Gram-Schmidt passes of each probe's new vector against its own basis.

        Parameters
        ----------
        operand
            The vector layer.
        past
            ``(P, j + 1, D)`` bases of ``P`` independent recurrences (orthonormal rows).
        w
            ``(P, D)`` new vectors, one per recurrence.
        alpha
            ``(P,)`` diagonal entries of the step; the part removed along the current vector is
            added to it in place.

        Returns
        -------
        Array
            ``(P, D)`` the reorthogonalized vectors.
        """
        current = past.shape[1] - 1
        for _ in range(2):
            coefficients = operand.stacked_inner(past, w)
            w = w - operand.matmul(operand.from_host(coefficients)[:, None, :], past)[:, 0]
            alpha += coefficients[:, current]
        return w


class PartialReorthogonalization:
    """Partial reorthogonalization (Simon 1984) of single-vector Lanczos.

    Estimates of ``omega_i = v_{j+1}^T v_i``, the newest Lanczos vector's drift from
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

    The rows are lists of Python floats and ``T`` is read from a ``TridiagonalProjection``: with
    about 20 entries, one loop in the interpreter costs a fraction of the dozen numpy calls it
    replaces (docs/benchmarks.md#lanczos), and on a GPU a step's host time is its overhead.
    """

    #: A full measurement at least this often, in case rounding outgrows the model.
    FULL_EVERY = 8
    #: Safety factor on the rounding term, and on the level a row may reach without being read.
    NOISE = 4.0
    MARGIN = 0.25

    def __init__(self, projection: TridiagonalProjection, eps: float) -> None:
        """Drift estimates over the projection ``projection`` in a dtype of unit roundoff ``eps``."""
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
        """Begin a Lanczos cycle from row ``start``, whose drift row is ``current`` (see restart).

        Parameters
        ----------
        start
            First row of the cycle (the residual row after a restart, 0 at first).
        """
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
        relation error bounds are formed (see the class).

        Parameters
        ----------
        vectors
            ``(m, m)`` eigenvectors of the projection (columns: Ritz vectors in the basis).
        order
            Indices of the kept columns, in their new row order.
        """
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
        """Record that vector ``j``'s update removed ``coefficients`` (true units) along rows
        ``[0, len(coefficients))`` besides its own (which alpha takes): not in ``T``.

        Parameters
        ----------
        j
            Row of the current vector.
        coefficients
            The removed coefficients, one per row.
        """
        self.removed[: len(coefficients), j] += coefficients
        self.removed[j, j] = 0.0

    def predict(self, j: int, alpha: float, beta_next: float, norm: float) -> list[float]:
        """Estimates of ``omega_{j+1, i}``, ``i < j`` (before this step's pass).

        Parameters
        ----------
        j
            Row of the current vector.
        alpha
            ``T[j, j]``.
        beta_next
            Norm of the new residual before reorthogonalization (true units).
        norm
            Estimate of ``||A||``.

        Returns
        -------
        list of float
            ``j`` estimates, relative to ``beta_next`` (Inf at a cycle's first step).
        """
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
        resets the drift to rounding, from where it regrows by a roughly constant factor per
        step, so the rest of a cycle usually passes without a measurement (on a GPU a pass costs
        as much host time as a quiet step).

        Parameters
        ----------
        j
            Row of the current vector.
        predicted
            Estimates from ``predict``.
        level
            The kept orthogonality level.

        Returns
        -------
        tuple
            ``reach`` (int) and whether the update is forced (bool).
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
        """Replace the estimates of rows ``[0, reach)`` by the inner products just formed.

        Parameters
        ----------
        predicted
            The estimates (updated in place).
        reach
            Rows measured.
        values
            The measured inner products, relative to the same norm.
        """
        count = min(reach, len(predicted))
        predicted[:count] = values[:count]

    def reset(self, reach: int) -> None:
        """Record an update over rows ``[0, reach)``: those are orthogonal to rounding.

        Parameters
        ----------
        reach
            Rows updated.
        """
        self._reset = reach

    def advance(self, predicted: list[float], beta_next: float, beta_before: float) -> None:
        """Move to the next vector: its row is the estimate (1 at its own index).

        Estimates and measurements are relative to the norm before this step's update,
        ``beta_before``; the new vector is that residual divided by ``beta_next``.

        Parameters
        ----------
        predicted
            The step's estimates (measured rows replaced).
        beta_next
            The new vector's coupling (0 after a breakdown).
        beta_before
            The residual's norm before reorthogonalization (true units).
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

    def reorthogonalize_row(self, state: LanczosState, step: RowStep) -> None:
        """``FullReorthogonalization.reorthogonalize_block`` of the single new row
        ``basis[step.new]`` against ``basis[:step.reach]``, in host floats (a step's host time is
        its overhead on a GPU).

        The first pass's inner products replace the drift estimates ``step.predicted``; a
        ``step.forced`` update is applied whatever they say. ``step.first``: the first pass's
        coefficients, already measured by the step's read (no pass then); with measured drift the
        recurrence's coefficients ``step.known`` are not yet subtracted and join the first update
        (or are subtracted alone if it is skipped).

        Parameters
        ----------
        state
            The Lanczos state (operand, row views, scales, orthogonality level).
        step
            The single-vector step; sets ``norm_after`` (stored units; 0 if a second pass also
            removed most of the row) and corrects ``alpha`` by the part removed along row ``j``.
        """
        operand, views, orthogonality = state.operand, state.views, state.orthogonality
        j, own, reach, norm_before, alpha = step.j, step.own, step.reach, step.norm_before, step.alpha
        known = step.known if step.measure_all else None
        image = views.vectors[step.new]
        weights = state.scales[: max(reach, j + 1)].tolist()
        for repeat in range(2):
            # coefficients[i] = v_i^T (A v_j) / own, relative to the norm in stored units.
            if repeat == 0 and step.first is not None:
                coefficients = step.first[:reach]
            else:
                coefficients = [
                    value * weight for value, weight in zip(operand.dots(views.basis[:reach], image), weights)
                ]
                if repeat == 0:
                    assert step.predicted is not None
                    scale = 1.0 / max(norm_before, 1e-300)
                    self.measured(step.predicted, reach, [value * scale for value in coefficients])
            if (
                not (step.forced and repeat == 0)
                and max(map(abs, coefficients)) <= orthogonality * norm_before
            ):
                # Orthogonal to the level already (Simon 1984): no update.
                if known is not None:
                    operand.subtract_rows_(image, known, views.pairs[j - 1], views.vectors[j - 1 : step.new])
                step.norm_after, step.alpha = norm_before, alpha
                return
            update = _with_known([value * weight for value, weight in zip(coefficients, weights)], known, j)
            known = None
            operand.subtract_combination_(
                views.rows[step.new], np.array([update]), views.basis[: len(update)]
            )
            if reach > j:
                alpha += coefficients[j] * own
            self.dropped(j, [own * value for value in coefficients])
            self.reset(reach)
            norm_after = norm_after_update(operand, coefficients, norm_before, reach, orthogonality)
            if norm_after is None:
                norm_after = operand.norm(image)
            if norm_after >= DGKS_ETA * norm_before:
                step.norm_after, step.alpha = norm_after, alpha
                return
            norm_before = norm_after
        # Both passes removed most of what was left (DGKS): the row lies in the span of the basis
        # to rounding (an invariant subspace; ARPACK's rule), norm 0: the state then continues
        # with a random direction (LanczosState._broke_down).
        step.norm_after, step.alpha = 0.0, alpha


def _with_known(update: list[float], known: tuple[float, float] | None, j: int) -> list[float]:
    """A Gram-Schmidt update over rows ``[0, len(update))`` joined with the recurrence's
    not-yet-subtracted coefficients of rows ``j - 1`` and ``j`` (one pass over the row for both),
    over rows ``[0, max(len(update), j + 1))``."""
    if known is not None:
        update += [0.0] * (j + 1 - len(update))
        update[j - 1] += known[0]
        update[j] += known[1]
    return update
