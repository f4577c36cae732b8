"""Products and QR with a very long ``D`` axis are split into pieces (cuBLAS 32-bit offsets).

The thresholds are lowered so that small tensors take the split path; results must equal the
unsplit computation to float64 rounding, and no single product may see an operand larger than
``CHUNK_ELEMENTS``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from curvops import algorithms as alg
from curvops.algorithms import _numpy_backend, _torch_backend, vectors

WIDE, CHUNK = 64, 16


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(_torch_backend, "WIDE_ELEMENTS", WIDE)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", CHUNK)


class RecordingTensor(torch.Tensor):
    """Records the operand sizes of every matrix product it takes part in."""

    sizes: list[int] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            cls.sizes.append(max(a.numel() for a in args[:2]))
        return super().__torch_function__(func, types, args, kwargs or {})


def recorded(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(RecordingTensor)


# (left shape, right shape): D as the output rows, the reduction, the output columns; vectors.
SHAPES = [
    ((200, 3), (3, 2)),
    ((3, 200), (200, 2)),
    ((3, 5), (5, 200)),
    ((200, 3), (3,)),
    ((200,), (200, 3)),
    ((4, 200), (200,)),
    ((2, 3), (3, 4)),
    ((1, 200), (200, 1)),
]


@pytest.mark.parametrize("left_shape, right_shape", SHAPES)
def test_wide_matmul_equals_matmul(small_thresholds, left_shape, right_shape):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(left_shape, generator=generator, dtype=torch.float64)
    right = torch.randn(right_shape, generator=generator, dtype=torch.float64)
    RecordingTensor.sizes = []
    result = _torch_backend.wide_matmul(recorded(left), recorded(right))
    expected = left @ right
    assert result.shape == expected.shape
    # Split reductions add the pieces in another order: float64 rounding of a 200-term sum.
    torch.testing.assert_close(result.as_subclass(torch.Tensor), expected, rtol=1e-13, atol=1e-13)
    if max(left.numel(), right.numel(), expected.numel()) >= WIDE:
        assert RecordingTensor.sizes
        assert max(RecordingTensor.sizes) <= CHUNK
    else:
        assert RecordingTensor.sizes == [max(left.numel(), right.numel())]


def test_row_times_column_is_a_dot_product():
    """A (1, D) row times a (D, 1) column (an inner product of single columns, e.g. a drift
    measurement of one row) is one dot product with the matrix product's value and (1, 1) shape."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 200, generator=generator, dtype=torch.float64)
    left, right = rows[1:2], rows[2:3].T  # a row view and a strided column view
    result = _torch_backend.wide_matmul(left, right)
    assert result.shape == (1, 1)
    torch.testing.assert_close(result, left @ right, rtol=4 * 200 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (3,), (2, 2)])
def test_to_host_keeps_shape_and_value(shape):
    """Small reductions come back as float64 numpy arrays of their own shape (scalars through
    item(), larger arrays through a host tensor)."""
    operand = _torch_backend.TorchOperand(4, torch.float32, torch.device("cpu"), lambda block: block)
    array = torch.arange(1, 1 + int(np.prod(shape)), dtype=torch.float32).reshape(shape) / 3
    host = operand.to_host(array)
    assert isinstance(host, np.ndarray)
    assert host.dtype == np.float64
    assert host.shape == shape
    np.testing.assert_array_equal(host, array.double().numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("columns", [1, 2, 3])
def test_subtract_combination_on_cuda_equals_cpu(columns):
    """On an accelerator the three-term update of one row (1-2 coefficients) runs as scalar
    kernels instead of an addmm with copied coefficients; the result is the same."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(columns, 500, generator=generator, dtype=torch.float64)
    target = torch.randn(1, 500, generator=generator, dtype=torch.float64)
    coefficients = np.random.default_rng(2).standard_normal((1, columns))
    results = []
    for device in ("cpu", "cuda"):
        operand = _torch_backend.TorchOperand(500, torch.float64, torch.device(device), lambda block: block)
        moved = target.to(device, copy=True)
        operand.subtract_combination_(moved, coefficients, rows.to(device))
        results.append(moved.cpu())
    # Each path rounds at most columns + 1 times partial sums bounded by ``scale`` (summation
    # error <= (columns + 1) (eps / 2) scale each), so they differ by at most twice that.
    scale = float((target.abs() + torch.as_tensor(np.abs(coefficients)) @ rows.abs()).max())
    atol = (columns + 1) * torch.finfo(torch.float64).eps * scale
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=atol)


def test_wide_matmul_of_transposed_view(small_thresholds):
    """Lanczos forms Ritz vectors from ``basis.T`` (a strided view): pieces are copied contiguous."""
    rows = torch.randn(6, 100, dtype=torch.float64)
    coefficients = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(
        _torch_backend.wide_matmul(rows.T, coefficients), rows.T @ coefficients, rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("shape", [(300, 4), (301, 1), (64, 16), (90, 7)])
def test_tall_qr_is_a_thin_qr(small_thresholds, shape):
    block = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, r = _torch_backend.tall_qr(block)
    assert q.shape == shape
    assert r.shape == (shape[1], shape[1])
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(q.T @ q, torch.eye(shape[1], dtype=torch.float64), rtol=0, atol=100 * eps)
    torch.testing.assert_close(q @ r, block, rtol=0, atol=100 * eps * float(block.abs().max()))
    assert torch.equal(r, torch.triu(r))
    # R is unique up to the signs of its rows.
    _, reference = torch.linalg.qr(block)
    torch.testing.assert_close(r.abs(), reference.abs(), rtol=1e-12, atol=1e-12)


ALGORITHMS = {
    "lanczos": lambda op: alg.lanczos(op, k=3, seed=0, tol=1e-10).eigenvalues,
    "lanczos_block": lambda op: alg.lanczos(op, k=3, block_size=2, seed=0, tol=1e-10).eigenvalues,
    "hutchpp": lambda op: alg.hutchpp_trace(op, budget=30, seed=0).estimate,
    "xtrace": lambda op: alg.xtrace(op, budget=30, seed=0).estimate,
    "xdiag": lambda op: alg.xdiag(op, budget=30, seed=0).estimate,
    "density": lambda op: alg.spectral_density(op, num_probes=3, lanczos_steps=12, seed=0).nodes,
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithms_equal_with_split_products(monkeypatch, name, make_spectrum_matrix, torch_native_class):
    """The split path (forced on a D = 60 operator) changes only the rounding."""
    TorchNativeOperator = torch_native_class
    matrix, _ = make_spectrum_matrix(np.linspace(-1.0, 4.0, 60), seed=2)
    run = ALGORITHMS[name]
    plain = np.asarray(run(TorchNativeOperator(matrix)), dtype=np.float64)
    monkeypatch.setattr(_torch_backend, "WIDE_ELEMENTS", WIDE)
    monkeypatch.setattr(_torch_backend, "CHUNK_ELEMENTS", CHUNK)
    split = np.asarray(run(TorchNativeOperator(matrix)), dtype=np.float64)
    np.testing.assert_allclose(split, plain, rtol=1e-9, atol=1e-9 * np.abs(plain).max())


class _IdentityReturningInput(scipy.sparse.linalg.LinearOperator):
    """The identity, written the lazy way: every product hands back the caller's own array."""

    def __init__(self, dim: int) -> None:
        super().__init__(dtype=np.dtype(np.float64), shape=(dim, dim))
        self.device = torch.device("cpu")
        self.torch_dtype = torch.float64

    def matmat_torch(self, block: torch.Tensor) -> torch.Tensor:
        return block

    def _matmat(self, block: np.ndarray) -> np.ndarray:
        return block

    def _matvec(self, vector: np.ndarray) -> np.ndarray:
        return vector


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_operator_returning_its_input_is_not_updated_in_place(backend):
    """Lanczos updates products in place; a product that is the input block must be copied
    first, or the update would overwrite the Lanczos basis (a zero Ritz vector)."""
    op = _IdentityReturningInput(40)
    operator = (
        op
        if backend == "torch"
        else scipy.sparse.linalg.aslinearoperator(
            scipy.sparse.linalg.LinearOperator(
                op.shape, matvec=op._matvec, matmat=op._matmat, dtype=np.float64
            )
        )
    )
    result = alg.lanczos(operator, k=1, seed=0, tol=1e-10)
    vector = np.asarray(result.eigenvectors)[:, 0]
    assert float(np.asarray(result.eigenvalues)[0]) == pytest.approx(1.0, rel=1e-12)
    assert np.linalg.norm(vector) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_combine_rows_in_place_by_pieces(monkeypatch, backend, step):
    """The thick-restart update ``rows[:m] = C @ rows[:n]`` in column pieces of any width."""
    generator = np.random.default_rng(3)
    rows, coefficients = generator.standard_normal((6, 50)), generator.standard_normal((3, 6))
    expected = coefficients @ rows
    if backend == "torch":
        operand = _torch_backend.TorchOperand(50, torch.float64, torch.device("cpu"), lambda b: b)
        array = torch.as_tensor(rows.copy())
    else:
        operand = _numpy_backend.NumpyOperand(50, np.float64, lambda b: b)
        array = rows.copy()
    monkeypatch.setattr(type(operand), "_combine_columns", lambda self, n: step)
    operand.combine_rows_(array, coefficients)
    np.testing.assert_allclose(np.asarray(array[:3]), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(array[3:]), rows[3:])


class _Native:
    """A torch-native operator whose ``matmat_torch`` has no ``out=`` parameter."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.shape, self.device, self.torch_dtype = tuple(matrix.shape), matrix.device, matrix.dtype
        self.matrix = matrix

    def matmat_torch(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block


class _NativeWithOut(_Native):
    """A torch-native operator whose ``matmat_torch`` accepts ``out=`` (recorded in ``outs``);
    with ``honour_out=False`` it returns a fresh product instead of writing into ``out``."""

    def __init__(self, matrix: torch.Tensor, honour_out: bool = True) -> None:
        super().__init__(matrix)
        self.honour_out = honour_out
        self.outs: list[torch.Tensor | None] = []

    def matmat_torch(self, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.outs.append(out)
        if out is None or not self.honour_out:
            return self.matrix @ block  # allowed: the operand copies it into out
        return torch.matmul(self.matrix, block, out=out)


@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_writes_products_into_its_basis_through_out(block_size):
    """An operator whose ``matmat_torch`` takes ``out=`` gets basis rows to write into (Lanczos
    forms each residual there, with no copy); one that ignores ``out`` or has no such
    parameter gives the same eigenpairs."""
    generator = np.random.default_rng(4)
    values = np.r_[np.linspace(10.0, 6.0, 6), generator.uniform(-1.0, 1.0, 194)]
    basis, _ = np.linalg.qr(generator.standard_normal((200, 200)))
    matrix = torch.tensor((basis * values) @ basis.T)
    with_out = _NativeWithOut(matrix)
    ignoring = _NativeWithOut(matrix, honour_out=False)
    without = _Native(matrix)
    assert vectors.as_operand(with_out).takes_out
    assert not vectors.as_operand(without).takes_out
    results = [
        alg.lanczos(op, k=4, tol=1e-10, seed=1, block_size=block_size) for op in (with_out, ignoring, without)
    ]
    # Every Lanczos step writes into the basis; only the final residual block (k columns) does not.
    steps = [out for out in with_out.outs if out is not None]
    assert all(out.shape == (200, block_size) for out in steps)
    assert len(steps) * block_size == results[0].num_matvecs - 4
    assert len(with_out.outs) == len(steps) + 1
    for result in results:
        np.testing.assert_allclose(result.eigenvalues.numpy(), values[:4], rtol=1e-12)
        assert result.num_matvecs == results[0].num_matvecs
    np.testing.assert_allclose(
        results[1].eigenvalues.numpy(), results[2].eigenvalues.numpy(), rtol=0, atol=1e-13
    )
