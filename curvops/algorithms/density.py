"""Spectral density estimation by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from curvops.algorithms._checks import ProbeKind, check_int, check_probe, check_seed
from curvops.algorithms._memory import PRODUCT_COLUMNS, plan_block
from curvops.algorithms.lanczos_core import tridiagonalize_probes
from curvops.algorithms.vectors import as_operand

_FORMAT = "curvops.spectral_density/1"
#: Columns of working memory per probe besides its basis: the new vector, its projection's
#: temporary and the block product (``curvops.algorithms._memory.PRODUCT_COLUMNS``).
_WORK_COLUMNS = 2 + PRODUCT_COLUMNS


@dataclass(frozen=True)
class DensityCurve:
    """A Gaussian-broadened spectral density evaluated on a grid.

    Attributes
    ----------
    grid : (G,) ndarray
        Evaluation points (eigenvalue units).
    density : (G,) ndarray
        Mean over probes of the broadened densities (1 / eigenvalue units; integrates to 1),
        or its ``log10`` if ``log_scale``.
    lower, upper : (G,) ndarray
        Uncertainty band ``density -+ 2 * standard_error`` (lower clipped at 0 before taking
        logs); equal to ``density`` if there is a single probe.
    standard_error : (G,) ndarray
        Standard deviation across probes divided by ``sqrt(num_probes)`` (linear scale; NaN for
        a single probe).
    per_probe : (P, G) ndarray
        Broadened density of each probe (linear scale).
    sigma : float
        Gaussian broadening width (eigenvalue units).
    log_scale : bool
        Whether ``density``, ``lower`` and ``upper`` are ``log10`` values (floored at
        ``1e-12 * max(density)``).
    """

    grid: np.ndarray
    density: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    standard_error: np.ndarray
    per_probe: np.ndarray
    sigma: float
    log_scale: bool


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature approximation of the spectral density.

    The density is ``(1/D) sum_i delta(t - lambda_i)``.

    Each probe ``p`` contributes a Gauss quadrature rule with nodes ``nodes[p]`` (Ritz values)
    and weights ``weights[p]`` (squared first components of the Ritz vectors, summing to 1); the
    SLQ measure is the average of these rules over probes.

    Attributes
    ----------
    nodes : (P, m) ndarray
        Ritz values per probe (eigenvalue units, float64). A probe whose Krylov space became
        invariant after ``m' < m`` steps has weight 0 in its last ``m - m'`` slots.
    weights : (P, m) ndarray
        Quadrature weights per probe; each row sums to 1.
    dim : int
        Operator dimension ``D``.
    num_matvecs : int
        Operator-vector products used.
    probe : str
        Probe distribution (``"rademacher"`` or ``"gaussian"``).
    seed : int or None
        Seed used for the probes.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    num_matvecs: int
    probe: str = "rademacher"
    seed: int | None = None

    @property
    def num_probes(self) -> int:
        """Number of probes ``P``."""
        return int(self.nodes.shape[0])

    @property
    def spectral_range(self) -> tuple[float, float]:
        """``(min, max)`` of the nodes with positive weight (inside the true spectral interval)."""
        used = self.nodes[self.weights > 0]
        return float(used.min()), float(used.max())

    def default_sigma(self) -> float:
        """Default broadening: 1% of the spectral range (``1e-3`` if all nodes coincide at 0).

        Returns
        -------
        float
            The width ``sigma`` in eigenvalue units.
        """
        low, high = self.spectral_range
        width = high - low
        if width > 0:
            return 0.01 * width
        return 0.01 * abs(high) if high != 0 else 1e-3

    def default_grid(self, num_points: int = 1024, sigma: float | None = None) -> np.ndarray:
        """Equispaced grid covering the spectral range plus ``5 sigma`` on each side.

        Parameters
        ----------
        num_points
            Grid size ``G``. Default 1024.
        sigma
            Broadening width in eigenvalue units; default
            [`default_sigma`][curvops.SpectralDensity.default_sigma].

        Returns
        -------
        numpy.ndarray
            ``(G,)`` grid points (eigenvalue units).
        """
        sigma = self.default_sigma() if sigma is None else sigma
        low, high = self.spectral_range
        return np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)

    def probe_moments(self, order: int) -> np.ndarray:
        """Per-probe moments ``sum_j w_pj theta_pj^order``.

        Each is unbiased for ``tr(A^order) / D`` and the exact Gauss quadrature of
        ``u^T A^order u`` for ``order <= 2 m - 1``.

        Parameters
        ----------
        order
            Moment order ``>= 0``.

        Returns
        -------
        numpy.ndarray
            ``(P,)`` moments (eigenvalue units to the power ``order``).
        """
        order = check_int(order, "order", 0)
        return np.sum(self.weights * self.nodes**order, axis=1)

    def moment(self, order: int) -> tuple[float, float]:
        """Estimate of ``tr(A^order) / D`` and its standard error.

        Parameters
        ----------
        order
            Moment order ``>= 0``.

        Returns
        -------
        tuple of float
            The mean of [`probe_moments`][curvops.SpectralDensity.probe_moments] over probes
            and its standard error (NaN for one probe).
        """
        samples = self.probe_moments(order)
        error = samples.std(ddof=1) / math.sqrt(samples.size) if samples.size > 1 else math.nan
        return float(samples.mean()), float(error)

    def evaluate(
        self,
        grid: np.ndarray | None = None,
        *,
        sigma: float | None = None,
        num_points: int = 1024,
        log_scale: bool = False,
    ) -> DensityCurve:
        """Gaussian-broadened density ``mean_p sum_j w_pj N(t; theta_pj, sigma^2)`` on ``grid``.

        Parameters
        ----------
        grid
            Points ``(G,)``; default [`default_grid`][curvops.SpectralDensity.default_grid]
            with ``num_points`` points.
        sigma
            Broadening width in eigenvalue units; default
            [`default_sigma`][curvops.SpectralDensity.default_sigma] (1% of the spectral range).
            Smaller values resolve more detail but show the discrete Ritz nodes.
        num_points
            Grid size when ``grid`` is not given.
        log_scale
            Return ``log10`` of the density and band (floored at ``1e-12 * max density``).

        Returns
        -------
        DensityCurve
            The broadened density, its band and the per-probe densities on the grid.

        Raises
        ------
        ValueError
            If ``sigma`` is not positive.
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = self.default_grid(num_points, sigma) if grid is None else np.asarray(grid, float)
        per_probe = np.zeros((self.num_probes, grid.size))
        normalization = 1.0 / (sigma * math.sqrt(2 * math.pi))
        for index in range(self.num_probes):
            offsets = (grid[None, :] - self.nodes[index][:, None]) / sigma
            per_probe[index] = self.weights[index] @ np.exp(-0.5 * offsets**2) * normalization
        density = per_probe.mean(0)
        if self.num_probes > 1:
            error = per_probe.std(0, ddof=1) / math.sqrt(self.num_probes)
            lower, upper = np.maximum(density - 2 * error, 0.0), density + 2 * error
        else:
            error = np.full_like(density, math.nan)
            lower, upper = density.copy(), density.copy()
        if log_scale:
            floor = 1e-12 * max(float(density.max()), np.finfo(float).tiny)
            density, lower, upper = (np.log10(np.maximum(x, floor)) for x in (density, lower, upper))
        return DensityCurve(grid, density, lower, upper, error, per_probe, sigma, log_scale)

    def plot(
        self,
        ax: Any = None,
        *,
        sigma: float | None = None,
        num_points: int = 1024,
        log_scale: bool = True,
        band: bool = True,
        label: str | None = None,
        color: str | None = None,
    ) -> Any:
        """Plot the broadened density with its uncertainty band (requires matplotlib).

        Parameters
        ----------
        ax
            Matplotlib axes; default a new figure of size 5 x 3.5 inches whose layout keeps the
            labels and title inside it when saved (matplotlib's constrained layout).
        sigma, num_points
            As in [`evaluate`][curvops.SpectralDensity.evaluate].
        log_scale
            Logarithmic density axis (default, as in Ghorbani et al. 2019: it shows both the bulk
            near 0 and the outliers).
        band
            Shade ``density -+ 2 standard errors`` across probes.
        label, color
            Passed to matplotlib.

        Returns
        -------
        matplotlib.axes.Axes
        """
        import matplotlib.pyplot as plt  # optional dependency: imported only when plotting

        if ax is None:
            # Constrained layout: the default margins cut the x-label off a saved 5 x 3.5 figure.
            _, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
        curve = self.evaluate(sigma=sigma, num_points=num_points)
        (line,) = ax.plot(curve.grid, curve.density, label=label, color=color, linewidth=1.5)
        if band and self.num_probes > 1:
            ax.fill_between(
                curve.grid, curve.lower, curve.upper, color=line.get_color(), alpha=0.25, linewidth=0
            )
        if log_scale:
            ax.set_yscale("log")
            top = float(curve.upper.max())
            ax.set_ylim(max(top * 1e-8, np.finfo(float).tiny), top * 2)
        ax.set_xlabel("Eigenvalue")
        ax.set_ylabel("Density" + (" (log scale)" if log_scale else ""))
        ax.set_title(f"Spectral density (SLQ, {self.num_probes} probes, sigma={curve.sigma:.3g})")
        if label is not None:
            ax.legend()
        return ax

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict of the raw nodes and weights and the run's metadata.

        Returns
        -------
        dict
            Keys ``format``, ``dim``, ``num_probes``, ``lanczos_steps``, ``num_matvecs``,
            ``probe``, ``seed``, ``nodes`` and ``weights`` (nested lists).
        """
        return {
            "format": _FORMAT,
            "dim": self.dim,
            "num_probes": self.num_probes,
            "lanczos_steps": int(self.nodes.shape[1]),
            "num_matvecs": self.num_matvecs,
            "probe": self.probe,
            "seed": self.seed,
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
        }

    def to_json(self, path: str | None = None) -> str:
        """JSON string of [`to_dict`][curvops.SpectralDensity.to_dict]; also written to ``path`` if given.

        Parameters
        ----------
        path
            File to write the string to (UTF-8); default none.

        Returns
        -------
        str
            The JSON text.
        """
        text = json.dumps(self.to_dict())
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralDensity:
        """Inverse of [`to_dict`][curvops.SpectralDensity.to_dict].

        Parameters
        ----------
        data
            A dict made by [`to_dict`][curvops.SpectralDensity.to_dict].

        Returns
        -------
        SpectralDensity
            The restored result.

        Raises
        ------
        ValueError
            If ``data`` is not a record of this format.
        """
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} record (format={data.get('format')!r})")
        return cls(
            nodes=np.asarray(data["nodes"], dtype=np.float64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            dim=int(data["dim"]),
            num_matvecs=int(data["num_matvecs"]),
            probe=str(data["probe"]),
            seed=data["seed"],
        )

    @classmethod
    def from_json(cls, text: str) -> SpectralDensity:
        """Inverse of [`to_json`][curvops.SpectralDensity.to_json].

        Parameters
        ----------
        text
            The JSON text (not a path).

        Returns
        -------
        SpectralDensity
            The restored result.
        """
        return cls.from_dict(json.loads(text))


def spectral_density(
    A: Any,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    *,
    probe: ProbeKind = "rademacher",
    seed: int | None = None,
    probe_batch_size: int | None = None,
    memory_budget: float | None = None,
    dim: int | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019).

    For each random probe ``u`` (normalized), ``lanczos_steps`` Lanczos steps with full
    reorthogonalization (``curvops.algorithms.lanczos_core.tridiagonalize_probes``) give a
    tridiagonal ``T = U diag(theta) U^T``; ``(theta_j, U_{0j}^2)`` is
    the Gauss quadrature rule of the measure ``sum_i (u^T q_i)^2 delta(t - lambda_i)`` whose
    expectation is the spectral density ``(1/D) sum_i delta(t - lambda_i)``. Probes run together,
    sharing one block product ``A @ V`` per step.

    Parameters
    ----------
    A
        Symmetric ``(D, D)`` operator (curvops/torch-native, torch tensor, scipy LinearOperator,
        numpy array, or callable with ``dim``).
    num_probes
        Number of probes ``P >= 1``.
    lanczos_steps
        Lanczos steps per probe ``m >= 1`` (capped at ``D``); moments up to order ``2 m - 1``
        are integrated exactly per probe.
    probe
        ``"rademacher"`` (default) or ``"gaussian"``.
    seed
        Seed of the probes; the same seed gives the same probes within a backend, whatever
        ``probe_batch_size`` (results then agree up to the rounding of the block products).
    probe_batch_size
        Probes run simultaneously; default as many as fit ``memory_budget`` (at most all).
        Working memory ``(P + (m + 6) b) D itemsize`` for ``b`` probes at a time: the starting
        vectors, and per probe its Lanczos basis, the new vector and its block product (see
        ``curvops.algorithms._memory``).
    memory_budget
        Bytes the algorithm may use (default: half the memory available on the operator's
        device). ``MemoryError`` before any product, naming the bytes needed, if one probe (or
        the given ``probe_batch_size``) does not fit.
    dim
        Operator dimension; required only for callables.

    Returns
    -------
    SpectralDensity
        Uses ``P * m`` matvecs (fewer if Krylov spaces become invariant).
    """
    operand = as_operand(A, dim)
    num_probes = check_int(num_probes, "num_probes", 1)
    steps = min(check_int(lanczos_steps, "lanczos_steps", 1), operand.dim)
    check_probe(probe)
    seed = check_seed(seed)
    if probe_batch_size is not None:
        check_int(probe_batch_size, "probe_batch_size", 1)
    batch = plan_block(
        operand,
        probe_batch_size,
        num_probes,
        memory_budget,
        num_probes,
        steps + _WORK_COLUMNS,
        f"spectral_density with {steps} Lanczos steps",
        "probe_batch_size",
        "pass fewer lanczos_steps, or a larger memory_budget= if the memory is there",
    )
    rng = operand.rng(seed)

    nodes = np.zeros((num_probes, steps))
    weights = np.zeros((num_probes, steps))
    # All starting vectors drawn at once (P columns, small next to a probe's basis of m): the
    # result does not depend on how the probes are batched to fit the memory.
    starts = operand.probes(num_probes, probe, rng)
    for first in range(0, num_probes, batch):
        count = min(batch, num_probes - first)
        tridiagonals = tridiagonalize_probes(operand, starts[:, first : first + count], steps)
        for offset in range(count):
            length = tridiagonals.lengths[offset]
            theta, vectors = scipy.linalg.eigh_tridiagonal(
                tridiagonals.alphas[offset, :length], tridiagonals.betas[offset, : length - 1]
            )
            row = first + offset
            nodes[row, :length] = theta
            nodes[row, length:] = theta[-1]
            weights[row, :length] = vectors[0] ** 2
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        dim=operand.dim,
        num_matvecs=operand.num_matvecs,
        probe=probe,
        seed=seed,
    )
