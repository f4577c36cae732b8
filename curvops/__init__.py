"""curvops: the curvature of a neural network's loss as a linear operator.

Hessian, generalized Gauss-Newton and Fisher matrices are
:class:`scipy.sparse.linalg.LinearOperator` objects that also multiply torch tensors
on the model's device.
"""

from curvops.operators import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator

__version__ = "0.1.0"

__all__ = ["CurvatureOperator", "FisherOperator", "GGNOperator", "HessianOperator", "__version__"]
