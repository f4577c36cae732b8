"""Numpy backend of the vector layer (``curvops.algorithms.vectors``): scipy operators,
sparse and dense numpy matrices and callables, on host arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse
import torch

from curvops.algorithms.vectors import Operand


class NumpyOperand(Operand):
    """Numpy backend: the operator is applied through ``apply_block``/``apply_vector`` on host arrays.

    Parameters
    ----------
    dim
        Operator dimension ``D``.
    dtype
        Working dtype (float32 or float64).
    apply_block
        ``X (D, b) -> A X`` on numpy arrays.
    apply_vector
        ``v (D,) -> A v``; default ``apply_block`` on one column.
    """

    backend = "numpy"

    def __init__(
        self,
        dim: int,
        dtype: np.dtype,
        apply_block: Callable[[np.ndarray], Any],
        apply_vector: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        super().__init__(dim, float(np.finfo(dtype).eps), int(np.finfo(dtype).maxexp))
        self.dtype = np.dtype(dtype)
        self._block_fn = apply_block
        self._vector_fn = apply_vector

    def _apply_block(self, block: np.ndarray) -> Any:
        return self._block_fn(block)

    def _apply_vector(self, vector: np.ndarray) -> Any:
        if self._vector_fn is None:
            return super()._apply_vector(vector)
        return self._vector_fn(vector)

    def _coerce(self, array: Any) -> np.ndarray:
        if scipy.sparse.issparse(array):
            array = array.toarray()
        if isinstance(array, torch.Tensor):
            raise TypeError("the operator returned a torch.Tensor on the numpy path")
        return np.asarray(array, dtype=self.dtype)

    def _all_finite(self, array: np.ndarray) -> bool:
        return bool(np.isfinite(array).all())

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=self.dtype)

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array, dtype=np.float64)

    def qr(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, r = np.linalg.qr(block)
        return q, r.astype(np.float64)

    def _local_qr(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.qr(block)

    def _concatenate(self, blocks: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(blocks)

    def rng(self, seed: int | None) -> np.random.Generator:
        return np.random.default_rng(seed)

    def probes(self, num_columns: int, kind: str, rng: np.random.Generator) -> np.ndarray:
        shape = (self.dim, num_columns)
        if kind == "rademacher":
            return (2.0 * rng.integers(0, 2, size=shape) - 1.0).astype(self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)
