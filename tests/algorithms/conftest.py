"""Shared fixtures for the algorithm tests: matrices with known spectra and operator wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch


class TorchNativeOperator(scipy.sparse.linalg.LinearOperator):
    """Minimal implementation of the curvops torch-native operator protocol over a dense matrix.

    Records the shape of every ``matmat_torch`` call so tests can check that block products are
    used. Tagged symmetric, as curvops' curvature operators are: the tests wrap symmetric matrices.
    """

    is_symmetric = True

    def __init__(self, matrix: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(dtype=np.dtype(np.float64), shape=matrix.shape)
        self.device = torch.device("cpu")
        self.torch_dtype = dtype
        self._matrix = torch.as_tensor(matrix, dtype=dtype)
        self.calls: list[tuple[int, ...]] = []

    def matmat_torch(self, block: torch.Tensor) -> torch.Tensor:
        assert block.ndim == 2
        assert block.dtype == self.torch_dtype
        self.calls.append(tuple(block.shape))
        return self._matrix @ block

    def _matvec(self, vector: np.ndarray) -> np.ndarray:
        return self._matrix.numpy() @ vector


def spectrum_matrix(eigenvalues: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dense symmetric ``Q diag(eigenvalues) Q^T`` with Haar-random ``Q``; returns (A, Q)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    size = eigenvalues.size
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    q = q * np.sign(np.diag(r))
    matrix = (q * eigenvalues) @ q.T
    return (matrix + matrix.T) / 2, q


def as_form(matrix: np.ndarray, form: str):
    """The same operator in each accepted input form."""
    if form == "numpy":
        return matrix
    if form == "scipy":
        return scipy.sparse.linalg.aslinearoperator(matrix)
    if form == "torch":
        return torch.as_tensor(matrix)
    if form == "torch_native":
        return TorchNativeOperator(matrix)
    raise ValueError(form)


FORMS = ("numpy", "scipy", "torch", "torch_native")


def to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


@pytest.fixture(scope="session")
def make_spectrum_matrix():
    return spectrum_matrix


@pytest.fixture(scope="session")
def operator_form():
    return as_form


@pytest.fixture(scope="session")
def numpy_of():
    return to_numpy


@pytest.fixture(scope="session")
def torch_native_class():
    return TorchNativeOperator
