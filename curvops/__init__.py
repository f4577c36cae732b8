"""curvops: the curvature of a neural network's loss as a linear operator.

Hessian, generalized Gauss-Newton, Fisher and KFAC matrices are
:class:`scipy.sparse.linalg.LinearOperator` objects that also multiply torch tensors
on the model's device; the algorithms (Lanczos, trace and diagonal estimators,
spectral density) work on any linear operator.
"""

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
    TransposedJacobianOperator,
    assume_psd,
    inverse,
    tag,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "EKFACOperator",
    "InverseOperator",
    "JacobianOperator",
    "KFACOperator",
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
