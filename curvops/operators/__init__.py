"""Curvature operators: one module per curvature object, shared machinery in ``base``."""

from curvops.operators._parallel import ParallelError, ShardLayout
from curvops.operators.base import (
    MAX_DENSE_DIM,
    CurvatureOperator,
    ModelOperator,
    TorchLinearOperator,
)
from curvops.operators.ekfac import EKFACOperator
from curvops.operators.fisher import FisherOperator
from curvops.operators.ggn import GGNOperator
from curvops.operators.hessian import HessianOperator
from curvops.operators.inverse import InverseOperator, TaggedOperator, assume_psd, inverse, tag
from curvops.operators.jacobian import JacobianOperator, TransposedJacobianOperator
from curvops.operators.kfac import KFACOperator, KroneckerInverseOperator

__all__ = [
    "CurvatureOperator",
    "EKFACOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "InverseOperator",
    "JacobianOperator",
    "KFACOperator",
    "KroneckerInverseOperator",
    "MAX_DENSE_DIM",
    "ModelOperator",
    "ParallelError",
    "ShardLayout",
    "TaggedOperator",
    "TorchLinearOperator",
    "TransposedJacobianOperator",
    "assume_psd",
    "inverse",
    "tag",
]
