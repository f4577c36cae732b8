"""Curvature operators: one module per curvature object.

Shared machinery: ``base`` (the objective, and the data loop of the exact products),
``_interface`` (scipy/torch dispatch), ``_model`` (model, data, parameters),
``_output_space`` (``Jᵀ M J`` of GGN and Fisher), ``_checks`` (checks and their messages),
``strategy`` ([`ProductStrategy`][curvops.ProductStrategy]), ``kfac_factors`` (KFAC's factor collection),
``kronecker`` (Kronecker-structured operators).
"""

from curvops.operators._parallel import ParallelError, ShardLayout
from curvops.operators.base import (
    MAX_DENSE_DIM,
    BatchSumOperator,
    CurvatureOperator,
    ModelOperator,
    TorchLinearOperator,
)
from curvops.operators.compiled import CompiledGGNOperator, CompiledHessianOperator
from curvops.operators.ekfac import EKFACOperator
from curvops.operators.fisher import FisherOperator
from curvops.operators.ggn import GGNOperator
from curvops.operators.hessian import HessianOperator
from curvops.operators.inverse import InverseOperator, TaggedOperator, assume_psd, inverse, tag
from curvops.operators.jacobian import JacobianOperator, TransposedJacobianOperator
from curvops.operators.kfac import KFACOperator, KroneckerInverseOperator
from curvops.operators.kronecker import KroneckerOperator
from curvops.operators.strategy import ProductStrategy

__all__ = [
    "BatchSumOperator",
    "CompiledGGNOperator",
    "CompiledHessianOperator",
    "CurvatureOperator",
    "EKFACOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "InverseOperator",
    "JacobianOperator",
    "KFACOperator",
    "KroneckerInverseOperator",
    "KroneckerOperator",
    "MAX_DENSE_DIM",
    "ModelOperator",
    "ParallelError",
    "ProductStrategy",
    "ShardLayout",
    "TaggedOperator",
    "TorchLinearOperator",
    "TransposedJacobianOperator",
    "assume_psd",
    "inverse",
    "tag",
]
