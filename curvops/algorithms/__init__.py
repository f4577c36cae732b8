"""Algorithms on curvature operators: eigenpairs, traces, diagonals and spectral densities.

Every function accepts a curvops operator (or any object with ``shape``, ``device``,
``torch_dtype`` and ``matmat_torch``), a dense torch tensor, a
``scipy.sparse.linalg.LinearOperator`` / scipy sparse matrix / numpy array, or a callable
``v -> A v`` on numpy vectors together with ``dim=D``. Torch-native operators and tensors run
in torch on their device and dtype; everything else runs in numpy (callables in float64).
Randomized functions take ``seed=``: the same seed gives the same result within a backend.

Modules: ``eigen`` (restarted Lanczos, power iteration),
``density`` (SLQ), ``trace``,
``diagonal``, ``solve`` (CG, MINRES, LSMR, Neumann);
underneath, ``lanczos_core`` (the Lanczos recurrence both eigensolver and
SLQ run), ``reorthogonalization`` (its full and partial policies) and
``vectors`` (the vector layer every algorithm computes through).
"""

from curvops.algorithms.density import DensityCurve, SpectralDensity, spectral_density
from curvops.algorithms.diagonal import (
    DiagonalEstimate,
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    xdiag,
)
from curvops.algorithms.eigen import EigenResult, lanczos, power_iteration
from curvops.algorithms.trace import ScalarEstimate, hutchinson_trace, hutchpp_trace, xnystrace, xtrace

__all__ = [
    "DensityCurve",
    "DiagonalEstimate",
    "EigenResult",
    "ScalarEstimate",
    "SpectralDensity",
    "hutchinson_diagonal",
    "hutchinson_squared_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "xdiag",
    "xnystrace",
    "xtrace",
]
