"""curvops: the curvature of a neural network's loss as a linear operator.

Hessian, generalized Gauss-Newton, Fisher and KFAC matrices are
:class:`scipy.sparse.linalg.LinearOperator` objects that also multiply torch tensors
on the model's device; the algorithms (Lanczos, trace and diagonal estimators,
spectral density) work on any linear operator.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _distribution_version

from curvops.algorithms import (
    DensityCurve,
    DiagonalEstimate,
    EigenResult,
    ScalarEstimate,
    SpectralDensity,
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
    xdiag,
    xnystrace,
    xtrace,
)
from curvops.algorithms.solve import SolveInfo, SolverWarning
from curvops.operators import (
    CurvatureOperator,
    EKFACOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    InverseOperator,
    JacobianOperator,
    KFACOperator,
    ProductStrategy,
    TransposedJacobianOperator,
    assume_psd,
    inverse,
    tag,
)

try:
    # The installed distribution's version, which setuptools-scm derives from the git tags.
    __version__ = _distribution_version("curvops")
except _PackageNotFoundError:  # imported from a source tree that is not installed (PYTHONPATH)
    __version__ = "0+unknown"

__all__ = [
    "CurvatureOperator",
    "EKFACOperator",
    "InverseOperator",
    "JacobianOperator",
    "KFACOperator",
    "ProductStrategy",
    "SolveInfo",
    "SolverWarning",
    "TransposedJacobianOperator",
    "assume_psd",
    "inverse",
    "tag",
    "DensityCurve",
    "DiagonalEstimate",
    "EigenResult",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "ScalarEstimate",
    "SpectralDensity",
    "__version__",
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
