"""Sums, scalar multiples, products and powers of curvops operators, on the torch path.

``H + G``, ``H - G``, ``-H``, ``2.0 * H``, ``H / 2``, ``H @ G`` (and ``H * G``), ``H ** 3``
and the transposes of these are ``TorchLinearOperator``\\ s:
torch input stays torch on the operands' device and dtype, numpy input follows scipy's
semantics, and the curvops algorithms (``lanczos``, ``xtrace``, ``inverse``, ...) and
scipy's solvers (``eigsh``, ``cg``) accept them like any curvops operator. scipy's own
composites (``_SumLinearOperator``, ...) would multiply numpy arrays only.

The tags say what is known: a sum is symmetric (positive semi-definite) when every term
is; ``α A`` is symmetric when ``A`` is and positive semi-definite when ``A`` is and
``α ≥ 0``; a product ``A B`` is in general neither (``A A`` of a symmetric ``A`` is
both); ``A^p`` is symmetric when ``A`` is, and positive semi-definite when ``A`` is
symmetric and ``p`` even or ``A`` positive semi-definite.

The operands must agree in shape, dtype, device and distribution (DDP / FSDP layout):
a mismatch raises at construction, naming both sides. A curvops operator combined with
a plain scipy ``LinearOperator`` gives scipy's composite, which multiplies numpy arrays
only (the operand has no torch path).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvops.operators.base import TorchLinearOperator


def _real_scalar(value: Any) -> float | None:
    """``value`` as a float if it is a real scalar (Python/numpy number, 0-d real tensor), else None.

    Raises
    ------
    TypeError
        For a complex scalar: the operators are real.
    """
    if torch.is_tensor(value):
        if value.dim() != 0:
            return None
        if value.is_complex():
            raise TypeError("curvops operators are real; got a complex scalar")
        return float(value)
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        raise TypeError(f"curvops operators are real; got the complex scalar {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    return None


class _CompositeOperator(TorchLinearOperator):
    """Common part of the composites: checked operands, their dtype, device and distribution.

    Parameters
    ----------
    shape : tuple of int
        Shape of the composite.
    operands : sequence of TorchLinearOperator
        The operators it is made of.
    """

    def __init__(self, shape: tuple[int, int], operands: Sequence[TorchLinearOperator]) -> None:
        first = operands[0]
        for other in operands[1:]:
            if other.torch_dtype != first.torch_dtype:
                raise TypeError(
                    f"cannot combine an operator of dtype {first.torch_dtype} ({_name(first)}) with one of "
                    f"dtype {other.torch_dtype} ({_name(other)}): build both on parameters of one dtype"
                )
            if other.device != first.device:
                raise ValueError(
                    f"cannot combine an operator on device {first.device} ({_name(first)}) with one on "
                    f"{other.device} ({_name(other)}): build both on one device"
                )
            if not _same_distribution(first, other):
                raise ValueError(
                    f"cannot combine {_name(first)} and {_name(other)}: they are distributed differently "
                    "(DDP / FSDP); build both on the same distributed model"
                )
        self.operands: tuple[TorchLinearOperator, ...] = tuple(operands)
        super().__init__(shape, first.torch_dtype, first.device)
        self.parallel = first.parallel
        self.sharding = first.sharding

    def _parameter_shapes(self) -> list[torch.Size] | None:
        # The operands' common parameter layout, if they all have one and it is the same.
        shapes = [op._parameter_shapes() for op in self.operands]
        first = shapes[0]
        if first is None or any(s is None or list(s) != list(first) for s in shapes[1:]):
            return None
        return list(first)

    def _transposed_operands(self, adjoint: bool) -> list[TorchLinearOperator] | None:
        """The operands' transposes, or None if one of them has no torch transpose."""
        result = []
        for op in self.operands:
            t = op.adjoint() if adjoint else op.transpose()
            if not isinstance(t, TorchLinearOperator):
                return None
            result.append(t)
        return result


class _SumOperator(_CompositeOperator):
    """``A_1 + A_2 + ...`` of operators of one shape (``H + G``, ``H - G``)."""

    def __init__(self, terms: Sequence[TorchLinearOperator]) -> None:
        flat: list[TorchLinearOperator] = []
        for term in terms:  # (A + B) + C is one sum of three terms
            flat.extend(term.operands if isinstance(term, _SumOperator) else (term,))
        for term in flat[1:]:
            if term.shape != flat[0].shape:
                raise ValueError(
                    f"cannot add operators of shapes {flat[0].shape} ({_name(flat[0])}) and "
                    f"{term.shape} ({_name(term)})"
                )
        super().__init__(flat[0].shape, flat)

    @property
    def is_symmetric(self) -> bool:  # type: ignore[override]
        """True if every term is symmetric."""
        return all(bool(op.is_symmetric) for op in self.operands)

    @property
    def is_positive_semidefinite(self) -> bool:
        """True if every term is known to be positive semi-definite."""
        return all(op.is_positive_semidefinite for op in self.operands)

    def _apply(self, X: Tensor) -> Tensor:
        result = self.operands[0].matmat_torch(X)
        for op in self.operands[1:]:
            result = result + op.matmat_torch(X)
        return result

    def _transpose(self) -> TorchLinearOperator:
        terms = self._transposed_operands(adjoint=False)
        return super()._transpose() if terms is None else _SumOperator(terms)

    def _adjoint(self) -> TorchLinearOperator:
        terms = self._transposed_operands(adjoint=True)
        return super()._adjoint() if terms is None else _SumOperator(terms)

    def __repr__(self) -> str:
        return "(" + " + ".join(_name(op) for op in self.operands) + ")"


class _ScaledOperator(_CompositeOperator):
    """``α A`` for a finite real scalar ``α`` (``2.0 * H``, ``H / 2``, ``-H``)."""

    alpha: float

    def __init__(self, operator: TorchLinearOperator, alpha: float) -> None:
        alpha = float(alpha)
        if not np.isfinite(alpha):
            raise ValueError(f"cannot scale an operator by the non-finite number {alpha}")
        inner = operator
        if isinstance(operator, _ScaledOperator):  # α (β A) is (αβ) A
            alpha, inner = alpha * operator.alpha, operator.operands[0]
        super().__init__(inner.shape, [inner])
        self.alpha = alpha

    @property
    def is_symmetric(self) -> bool:  # type: ignore[override]
        """True if the operator is symmetric."""
        return bool(self.operands[0].is_symmetric)

    @property
    def is_positive_semidefinite(self) -> bool:
        """True if the operator is known to be positive semi-definite and ``α ≥ 0``."""
        return self.alpha >= 0 and self.operands[0].is_positive_semidefinite

    def _apply(self, X: Tensor) -> Tensor:
        return self.operands[0].matmat_torch(X) * self.alpha

    def _transpose(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=False)
        return super()._transpose() if ops is None else _ScaledOperator(ops[0], self.alpha)

    def _adjoint(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=True)
        return super()._adjoint() if ops is None else _ScaledOperator(ops[0], self.alpha)

    def __repr__(self) -> str:
        return f"{self.alpha:g} * {_name(self.operands[0])}"


class _ProductOperator(_CompositeOperator):
    """``A B``: ``(A B) X = A (B X)`` (``H @ G``, ``H * G``)."""

    def __init__(self, left: TorchLinearOperator, right: TorchLinearOperator) -> None:
        if left.shape[1] != right.shape[0]:
            raise ValueError(
                f"cannot multiply operators of shapes {left.shape} ({_name(left)}) and "
                f"{right.shape} ({_name(right)})"
            )
        super().__init__((left.shape[0], right.shape[1]), [left, right])

    @property
    def is_symmetric(self) -> bool:  # type: ignore[override]
        """True only for ``A A`` of a symmetric ``A`` (a product is not symmetric in general)."""
        left, right = self.operands
        return left is right and bool(left.is_symmetric)

    @property
    def is_positive_semidefinite(self) -> bool:
        """True only for ``A A`` of a symmetric ``A`` (``A² = Aᵀ A``)."""
        return self.is_symmetric

    def _apply(self, X: Tensor) -> Tensor:
        left, right = self.operands
        return left.matmat_torch(right.matmat_torch(X))

    def _transpose(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=False)
        return super()._transpose() if ops is None else _ProductOperator(ops[1], ops[0])

    def _adjoint(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=True)
        return super()._adjoint() if ops is None else _ProductOperator(ops[1], ops[0])

    def __repr__(self) -> str:
        return f"({_name(self.operands[0])} @ {_name(self.operands[1])})"


class _PowerOperator(_CompositeOperator):
    """``A^p`` of a square operator for an integer ``p ≥ 0`` (``H ** 2``; ``A^0 = I``)."""

    power: int

    def __init__(self, operator: TorchLinearOperator, power: int) -> None:
        if isinstance(power, bool) or not isinstance(power, numbers.Integral) or power < 0:
            raise ValueError(f"an operator's power must be an integer >= 0, got {power!r}")
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(
                f"only a square operator has powers; {_name(operator)} has shape {operator.shape}"
            )
        super().__init__(operator.shape, [operator])
        self.power = int(power)

    @property
    def is_symmetric(self) -> bool:  # type: ignore[override]
        """True if the operator is symmetric."""
        return bool(self.operands[0].is_symmetric)

    @property
    def is_positive_semidefinite(self) -> bool:
        """True for a symmetric operator and an even power, or a positive semi-definite operator."""
        op = self.operands[0]
        return self.is_symmetric and (self.power % 2 == 0 or op.is_positive_semidefinite)

    def _apply(self, X: Tensor) -> Tensor:
        result = X.clone()
        for _ in range(self.power):
            result = self.operands[0].matmat_torch(result)
        return result

    def _transpose(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=False)
        return super()._transpose() if ops is None else _PowerOperator(ops[0], self.power)

    def _adjoint(self) -> TorchLinearOperator:
        ops = self._transposed_operands(adjoint=True)
        return super()._adjoint() if ops is None else _PowerOperator(ops[0], self.power)

    def __repr__(self) -> str:
        return f"{_name(self.operands[0])} ** {self.power}"


def _same_distribution(a: TorchLinearOperator, b: TorchLinearOperator) -> bool:
    """Whether two operators are spread over the same processes in the same way (or neither is)."""
    if (a.parallel is None) != (b.parallel is None):
        return False
    if a.parallel is not None and (
        type(a.parallel) is not type(b.parallel) or a.parallel.group is not b.parallel.group
    ):
        return False
    if a.sharding is None or b.sharding is None:
        return a.sharding is None and b.sharding is None
    return (a.sharding.dim, a.sharding.local_dim, a.sharding.ranges) == (
        b.sharding.dim,
        b.sharding.local_dim,
        b.sharding.ranges,
    )


def _name(op: Any) -> str:
    """Short description of an operand for messages and reprs."""
    if isinstance(op, _CompositeOperator):
        return repr(op)
    return f"{type(op).__name__}{tuple(op.shape)}"
