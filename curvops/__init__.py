"""curvops: the curvature of a neural network's loss as a linear operator.

Hessian, generalized Gauss-Newton, Fisher and KFAC matrices are
``scipy.sparse.linalg.LinearOperator`` objects that also multiply torch tensors
on the model's device; the algorithms (Lanczos, trace and diagonal estimators,
spectral density) work on any linear operator.
"""

import importlib
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from curvops.algorithms.solve import (
        SolveInfo,
        SolverWarning,
    )
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

# Where each public name is defined. They are imported on first use (PEP 562), so that
# `import curvops` does not import torch: the command line handles Ctrl-C and bad arguments
# in the seconds torch takes to load, as it does later.
_EXPORTS = {
    "DensityCurve": "curvops.algorithms",
    "DiagonalEstimate": "curvops.algorithms",
    "EigenResult": "curvops.algorithms",
    "ScalarEstimate": "curvops.algorithms",
    "SpectralDensity": "curvops.algorithms",
    "hutchinson_diagonal": "curvops.algorithms",
    "hutchinson_squared_frobenius": "curvops.algorithms",
    "hutchinson_trace": "curvops.algorithms",
    "hutchpp_trace": "curvops.algorithms",
    "lanczos": "curvops.algorithms",
    "power_iteration": "curvops.algorithms",
    "spectral_density": "curvops.algorithms",
    "xdiag": "curvops.algorithms",
    "xnystrace": "curvops.algorithms",
    "xtrace": "curvops.algorithms",
    "SolveInfo": "curvops.algorithms.solve",
    "SolverWarning": "curvops.algorithms.solve",
    "CurvatureOperator": "curvops.operators",
    "EKFACOperator": "curvops.operators",
    "FisherOperator": "curvops.operators",
    "GGNOperator": "curvops.operators",
    "HessianOperator": "curvops.operators",
    "InverseOperator": "curvops.operators",
    "JacobianOperator": "curvops.operators",
    "KFACOperator": "curvops.operators",
    "ProductStrategy": "curvops.operators",
    "TransposedJacobianOperator": "curvops.operators",
    "assume_psd": "curvops.operators",
    "inverse": "curvops.operators",
    "tag": "curvops.operators",
}
_SUBMODULES = ("algorithms", "cli", "kernels", "lm", "operators")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"curvops.{name}")
    else:
        raise AttributeError(f"module 'curvops' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


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
