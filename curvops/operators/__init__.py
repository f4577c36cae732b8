"""Curvature operators: one module per curvature object, shared machinery in ``base``."""

from curvops.operators.base import MAX_DENSE_DIM, CurvatureOperator
from curvops.operators.fisher import FisherOperator
from curvops.operators.ggn import GGNOperator
from curvops.operators.hessian import HessianOperator

__all__ = ["CurvatureOperator", "FisherOperator", "GGNOperator", "HessianOperator", "MAX_DENSE_DIM"]
