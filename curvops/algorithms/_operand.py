"""Operand adaptation and the vector backend shared by every algorithm.

Every algorithm in :mod:`curvops.algorithms` turns its input into an
:class:`Operand` via :func:`as_operand` and then does *all* arithmetic that
touches length-``D`` vectors through the operand's methods. In particular every
reduction over the operator dimension ``D`` (inner products, norms, Gram
matrices, QR) and every random draw lives here and nowhere else, so that a
sharded backend (vectors split across processes, reductions all-reduced, probes
drawn per shard from the seed) only has to provide another ``Operand``
subclass.

Conventions
-----------
* A vector is a 1-D array of length ``D``; a block is a 2-D array of shape
  ``(D, b)`` (columns are vectors). A *row stack* is ``(n, D)`` (rows are
  vectors) and is used for Krylov bases because rows are contiguous.
* Small results (``(b,)`` or ``(b, c)`` reductions) are returned as float64
  numpy arrays on the host; only these cross the device boundary, never a
  length-``D`` vector.
* The torch path runs on the operator's device and dtype; the numpy path on
  float64 (or float32 if the operator is float32).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from curvops._finite import all_finite

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = ("rademacher", "gaussian")

Array = Any  # np.ndarray or torch.Tensor, depending on the backend


class Operand:
    """A square ``(D, D)`` operator together with its backend's vector arithmetic.

    Lanczos and SLQ take it to be symmetric; :meth:`rmatmat` gives ``A^T`` products to the
    estimators that need them for a non-symmetric ``A`` (XDiag).

    Subclasses: :class:`NumpyOperand`, :class:`TorchOperand`.

    Attributes
    ----------
    dim : int
        The operator dimension ``D``.
    num_matvecs : int
        Operator-vector products applied so far (a block of ``b`` columns counts ``b``).
    eps : float
        Unit roundoff of the working dtype.
    cheap_passes : bool
        Whether a pass over a few dozen stored vectors costs less than a few host operations (an
        accelerator, where a step's host time is its overhead and memory bandwidth is plentiful):
        single-vector Lanczos then measures every stored row's drift each step, in the step's
        one read, instead of estimating it.
    scale_limit : float
        ``2 ** (e / 8)`` for the dtype's largest binary exponent ``e`` (2**128 in float64,
        2**16 in float32): vectors kept unnormalized (with a recorded scale) are renormalized
        once their norm leaves ``[1 / scale_limit, scale_limit]``, far from over- and underflow
        of their squares and of the operator's products.
    backend : str
        ``"torch"`` or ``"numpy"``.
    """

    backend: str = ""

    def __init__(self, dim: int, eps: float, max_exponent: int = 1024) -> None:
        self.dim = dim
        #: Rows of the arrays this process holds (``dim``, or the local shard's length).
        self.local_dim = dim
        self.eps = eps
        self.scale_limit = 2.0 ** (max_exponent // 8)
        self.cheap_passes = False
        self.num_matvecs = 0
        #: Products are ``A x / 2**product_exponent`` (0 unless :meth:`scale_products` chose one).
        self.product_exponent = 0
        self._choose_exponent = False
        self._max_exponent = max_exponent
        #: Whether the operator carries the tag ``is_symmetric`` (never tested numerically).
        self.symmetric = False
        #: ``block -> A^T @ block`` where the input offers it (a matrix, ``rmatmat``), else None.
        self.transpose_product: Callable[[Array], Any] | None = None

    # -- operator application -------------------------------------------------
    def _apply_block(self, block: Array) -> Array:
        raise NotImplementedError

    def _apply_vector(self, vector: Array) -> Array:
        return self._apply_block(vector[:, None])[:, 0]

    def matmat(self, block: Array, check_finite: bool = True) -> Array:
        """Return ``A @ block`` for a ``(D, b)`` block, as one block product where possible.

        With ``check_finite=False`` the NaN/Inf check (one pass over the product) is left to
        the caller, who must then call :meth:`require_finite_product` when a reduction of the
        product comes out non-finite (NaN and Inf propagate into every inner product).
        """
        num_columns = block.shape[1]
        if num_columns == 0:
            return self.zeros((self.local_dim, 0))
        result = self._counted(self._apply_block(block), (self.local_dim, num_columns), check_finite)
        # The algorithms update products in place: never hand back the caller's own block
        # (an identity-like operator may return its input).
        return self._copy(result) if self._shares_memory(result, block) else result

    def rmatmat(self, block: Array) -> Array:
        """Return ``A^T @ block`` for a ``(D, b)`` block (counted as ``b`` matvecs).

        ``A @ block`` if the operator is tagged symmetric; ``ValueError`` if the input offers
        no transposed product (see :attr:`transpose_product`).
        """
        if self.symmetric:
            return self.matmat(block)
        if self.transpose_product is None:
            raise ValueError("the operator offers no product with its transpose")
        return self._counted(self.transpose_product(block), (self.local_dim, block.shape[1]), True)

    def matmat_rows(self, rows: Array, check_finite: bool = True) -> Array:
        """Return ``(A @ rows.T).T`` for a ``(b, D)`` row stack, as a row stack that the
        algorithms may update in place (see :meth:`_row_layout`; ``check_finite`` as in
        :meth:`matmat`)."""
        return self._row_layout(self.matmat(rows.T, check_finite).T)

    def matmat_rows_into(self, rows: Array, out: Array, check_finite: bool = True) -> None:
        """``out[...] = (A @ rows.T).T`` for ``(b, D)`` row stacks ``rows`` and ``out`` (which
        must not overlap). Written in place by an operator that takes ``out=`` (no copy)."""
        out[...] = self.matmat_rows(rows, check_finite)

    def _row_layout(self, rows: Array) -> Array:
        return rows

    def matvec(self, vector: Array) -> Array:
        """Return ``A @ vector`` for a length-``D`` vector."""
        result = self._apply_vector(vector)
        self.num_matvecs += 1
        return self._scaled(self._checked(result, (self.local_dim,)), owned=False)

    def _counted(self, result: Array, shape: tuple[int, int], check_finite: bool) -> Array:
        """A fresh ``(D, b)`` block product: counted as ``b`` matvecs, then :meth:`_checked`
        and :meth:`_scaled`."""
        self.num_matvecs += shape[1]
        return self._scaled(self._checked(result, shape, check_finite), owned=False)

    def scale_products(self) -> None:
        """Let the next product choose a power-of-two scale ``s = 2**product_exponent`` for
        itself and every later one, which then return ``A x / s``.

        ``s`` is 1 while that product's largest entry lies in ``[1 / scale_limit,
        scale_limit]``, else about that entry: an operator of any norm then gives products of
        order 1, whose squared norms and inner products neither overflow (``1e200**2`` does in
        float64) nor underflow, at the cost of one pass per product only where it is needed.
        Powers of two scale without rounding. :meth:`unscale` converts results back.
        """
        self._choose_exponent = True

    def unscale(self, value: Any) -> Any:
        """``value * s`` for a host float or float64 numpy array (see :meth:`scale_products`);
        ``FloatingPointError`` if a finite value leaves the working dtype's range."""
        with np.errstate(over="ignore"):
            result = np.ldexp(np.asarray(value, dtype=np.float64), self.product_exponent)
        representable = np.isfinite(result) & (np.frexp(result)[1] <= self._max_exponent)
        if not np.all(representable | ~np.isfinite(value)):
            raise FloatingPointError(
                f"a result overflowed the working dtype when scaled back by 2**{self.product_exponent} "
                "(the operator's norm is beyond the dtype's range)"
            )
        return result if isinstance(value, np.ndarray) else float(result)

    def _scaled(self, result: Array, owned: bool) -> Array:
        """A product divided by the scale (see :meth:`scale_products`): in place if the caller
        ``owned`` the array, else as a new one (an operator may return an array it keeps)."""
        if self._choose_exponent:
            self._choose_exponent = False
            largest = self.max_abs(result)
            if math.isfinite(largest) and largest > 0.0 and not 1.0 / self.scale_limit <= largest <= self.scale_limit:
                # frexp: largest = m 2**e with 0.5 <= m < 1; the bound keeps 2**-e finite.
                self.product_exponent = max(math.frexp(largest)[1], 2 - self._max_exponent)
        if self.product_exponent == 0:
            return result
        factor = math.ldexp(1.0, -self.product_exponent)
        if owned:
            result *= factor
            return result
        return result * factor

    def max_abs(self, array: Array) -> float:
        """Largest ``|entry|`` of an array (over every shard), as a host float (0 if empty)."""
        return float(abs(array).max()) if math.prod(array.shape) else 0.0

    def _checked(self, result: Array, shape: tuple[int, ...], check_finite: bool = True) -> Array:
        result = self._coerce(result)
        if tuple(result.shape) != shape:
            if math.prod(result.shape) == math.prod(shape):
                result = result.reshape(shape)
            else:
                raise ValueError(
                    f"the operator returned an array of shape {tuple(result.shape)}, expected {shape}"
                )
        if check_finite:
            self.require_finite_product(result)
        return result

    def require_finite_product(self, result: Array) -> None:
        """Raise ``FloatingPointError`` if the product ``result`` holds NaN/Inf."""
        if not self._all_finite(result):
            raise FloatingPointError(
                "the operator produced NaN/Inf in its output (matvec result is not finite)"
            )

    # -- backend primitives (overridden) --------------------------------------
    def _coerce(self, array: Any) -> Array:
        raise NotImplementedError

    def _all_finite(self, array: Array) -> bool:
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...]) -> Array:
        """Zero array of the working dtype/device."""
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...]) -> Array:
        """Uninitialized array of the working dtype/device (every entry must be written before use).

        Large bases are allocated this way: zero-filling one costs as much as several Lanczos steps.
        """
        return self.zeros(shape)

    def from_host(self, array: np.ndarray) -> Array:
        """Small host (numpy) array -> working backend/dtype/device."""
        raise NotImplementedError

    def to_host(self, array: Array) -> np.ndarray:
        """Backend array -> float64 numpy array (only for small arrays or final results)."""
        raise NotImplementedError

    def as_vector(self, vector: Any, name: str) -> Array:
        """Validate and convert a user-given length-``D`` vector (e.g. ``v0``)."""
        if isinstance(vector, torch.Tensor):
            shape = tuple(vector.shape)
        else:
            vector = np.asarray(vector)
            shape = vector.shape
        if shape != (self.local_dim,):
            raise ValueError(f"{name} must have shape ({self.local_dim},), got {shape}")
        if isinstance(vector, torch.Tensor):
            vector = vector.detach()
            converted = (
                self._coerce(vector)
                if self.backend == "torch"
                else self._coerce(vector.cpu().numpy())
            )
        else:
            converted = self._coerce(vector) if self.backend == "numpy" else self.from_host(vector)
        if not self._all_finite(converted):
            raise ValueError(f"{name} contains NaN or Inf")
        return converted

    def matmul(self, left: Array, right: Array) -> Array:
        """``left @ right`` for 1-D/2-D operands, or batched over a leading axis of both (3-D).

        The one place products with a length-``D`` axis are formed (the torch backend splits
        very large ones, see :func:`wide_matmul`).
        """
        return left @ right

    # -- reductions over D: the only places a sharded backend must all-reduce --
    def inner(self, left: Array, right: Array) -> np.ndarray:
        """``left.T @ right`` for ``(D,)`` or ``(D, b)`` operands, as a float64 host array."""
        return self.to_host(self.matmul(left if left.ndim == 1 else left.T, right))

    def dots(self, rows: Array, vector: Array) -> list[float]:
        """``rows @ vector`` for a small ``(n, D)`` row stack, as Python floats: one pass and one
        device-to-host read."""
        return self.inner(rows.T, vector).tolist()

    def gram(self, rows: Array, columns: Array | None = None) -> list[list[float]]:
        """``rows @ columns.T`` (default ``columns = rows``) for small ``(n, D)`` and ``(c, D)``
        row stacks, as nested Python floats: one pass and one device-to-host read (the inner
        products of a Lanczos step's vectors)."""
        return self.inner(rows.T, (rows if columns is None else columns).T).tolist()

    def column_dots(self, left: Array, right: Array) -> np.ndarray:
        """``(b,)`` column-wise inner products of two ``(D, b)`` blocks."""
        if left.shape[1] == 1:  # a dot product, without the (D, 1) temporary
            return self.to_host((left[:, 0] @ right[:, 0]).reshape(1))
        # By pieces of rows: the products' temporary is one piece, not a third (D, b) block.
        step = max(1, QR_PIECE_ELEMENTS // left.shape[1])
        total = (left[:step] * right[:step]).sum(0)
        for start in range(step, left.shape[0], step):
            total = total + (left[start : start + step] * right[start : start + step]).sum(0)
        return self.to_host(total)

    def column_norms(self, block: Array) -> np.ndarray:
        """``(b,)`` Euclidean norms of the columns of a ``(D, b)`` block."""
        return np.sqrt(np.maximum(self.column_dots(block, block), 0.0))

    def subtract_scaled_columns_(self, target: Array, block: Array, scales: np.ndarray) -> None:
        """In place ``target -= block * scales`` for ``(D, b)`` blocks and host ``scales`` ``(b,)``."""
        target -= block * self.from_host(scales)

    def dot(self, left: Array, right: Array) -> float:
        """Inner product of two length-``D`` vectors."""
        return float(self.inner(left, right))

    def norm(self, vector: Array) -> float:
        """Euclidean norm of a length-``D`` vector."""
        return math.sqrt(max(self.dot(vector, vector), 0.0))

    def stacked_inner(self, rows: Array, vectors: Array) -> np.ndarray:
        """Batched ``rows[p] @ vectors[p]``: ``(P, n, D)`` x ``(P, D)`` -> ``(P, n)``."""
        return self.to_host(self.matmul(rows, vectors[:, :, None])[:, :, 0])

    def qr(self, block: Array) -> tuple[Array, np.ndarray]:
        """Thin QR of a ``(D, b)`` block: ``Q`` (backend, orthonormal columns) and ``R`` (host)."""
        raise NotImplementedError

    def qr_in_place(self, block: Array) -> np.ndarray:
        """Thin QR of a tall ``(D, b)`` block that overwrites it with ``Q``; returns ``R`` (host).

        TSQR by pieces of rows (Demmel, Grigori, Hoemmen, Langou 2012): a QR of each piece
        written back in place, a QR of the stacked ``R`` factors, and each piece times its block
        of that ``Q``. Extra memory is one piece, not the second ``(D, b)`` block that
        :meth:`qr` returns.
        """
        rows, width = block.shape
        pieces = min(rows // max(width, 1), -(-rows * width // QR_PIECE_ELEMENTS))
        if pieces <= 1:
            q, r = self.qr(block)
            block[...] = q
            return r
        bounds = [rows * index // pieces for index in range(pieces + 1)]  # each >= width rows
        factors = []
        for start, stop in zip(bounds, bounds[1:]):
            q, r = self._local_qr(block[start:stop])
            block[start:stop] = q
            factors.append(r)
        stacked_q, r = self._local_qr(self._concatenate(factors))
        for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            block[start:stop] = self.matmul(block[start:stop], stacked_q[index * width : (index + 1) * width])
        return self.to_host(r)

    def _local_qr(self, block: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def _concatenate(self, blocks: list[Array]) -> Array:
        raise NotImplementedError

    @property
    def itemsize(self) -> int:
        """Bytes per entry of the working dtype."""
        return int(self.dtype.itemsize)

    def combine_rows_(self, rows: Array, coefficients: np.ndarray) -> None:
        """In place ``rows[:m] = coefficients @ rows[:n]`` for host ``coefficients`` ``(m, n)``, ``m <= n``.

        Done in pieces of columns (the same for every row, so each piece is read before it is
        overwritten): no ``(m, D)`` temporary, and each piece stays in cache. Every piece's
        product goes through one ``(m, step)`` buffer: a fresh temporary per piece cost about
        2,000 page faults per restart on a CPU (``(8, 12)`` rows of D = 269,322 float64, 2-core
        CPU: 7.5 vs 4.8 ms, median of 6 with a flushed cache).
        """
        m, n = coefficients.shape
        small = self.from_host(coefficients)
        length = rows.shape[1]
        step = min(self._combine_columns(n), length)
        whole = step >= length
        buffer = self.empty((m * step,))
        for start in range(0, length, step):
            piece = rows[:n, start : start + step]
            width = piece.shape[1]
            out = buffer[: m * width].reshape(m, width)
            self._matmul_into(small, piece if whole else self._contiguous(piece), out)
            rows[:m, start : start + width] = out

    def _matmul_into(self, left: Array, right: Array, out: Array) -> None:
        np.matmul(left, right, out=out)

    def _combine_columns(self, n: int) -> int:
        # About 4 MiB of float64 per piece: in the cache of a CPU core, and few pieces.
        return max(1, (1 << 19) // max(n, 1))

    def _contiguous(self, piece: Array) -> Array:
        return piece

    def subtract_combination_(self, target: Array, coefficients: np.ndarray, rows: Array) -> None:
        """In place ``target -= coefficients @ rows`` for ``target`` ``(b, D)``, host
        ``coefficients`` ``(b, n)`` and ``rows`` ``(n, D)`` (no reduction over D)."""
        target -= self.matmul(self.from_host(coefficients), rows)

    def subtract_rows_(
        self, target: Array, coefficients: Sequence[float], rows: Array, vectors: Sequence[Array]
    ) -> None:
        """In place ``target -= sum_i coefficients[i] * rows[i]`` for a vector ``target`` ``(D,)``
        and a few rows, given both as the ``(n, D)`` stack ``rows`` and as the vectors
        ``vectors`` (views a caller made once: the three-term recurrence of every Lanczos step)."""
        self.subtract_combination_(target[None], np.array([coefficients], dtype=np.float64), rows)

    def scaled_copy_(self, out: Array, vector: Array, factor: float) -> None:
        """``out[...] = factor * vector`` without a temporary."""
        out[...] = vector
        out *= factor

    def _shares_memory(self, left: Array, right: Array) -> bool:
        return bool(np.may_share_memory(left, right))

    def _copy(self, array: Array) -> Array:
        return array.copy()

    # -- orthogonalization built on the reductions above ------------------------
    def project_out(self, rows: Array, vector: Array) -> tuple[Array, np.ndarray]:
        """One classical Gram-Schmidt pass of ``vector`` against the orthonormal ``rows`` ``(n, D)``.

        Returns the projected vector and the ``(n,)`` coefficients removed.
        """
        coefficients = self.inner(rows.T, vector)
        return vector - self.matmul(rows.T, self.from_host(coefficients)), coefficients

    def orthogonalize(self, rows: Array, vector: Array) -> tuple[Array, float]:
        """Orthonormalize ``vector`` against ``rows`` with two Gram-Schmidt passes (CGS2).

        Returns the unit vector and the norm after projection (0 if ``vector`` lies in the span).
        """
        for _ in range(2):
            if rows.shape[0]:
                vector, _ = self.project_out(rows, vector)
        norm = self.norm(vector)
        return (vector / norm if norm > 0 else vector), norm

    def project_out_block(self, basis: Array, block: Array) -> Array:
        """``block - basis @ (basis.T @ block)`` for an orthonormal ``(D, s)`` basis."""
        return block - self.matmul(basis, self.from_host(self.inner(basis, block)))

    # -- randomness -------------------------------------------------------------
    def rng(self, seed: int | None) -> Any:
        """A backend generator seeded from ``seed`` (``None``: fresh OS entropy)."""
        raise NotImplementedError

    def probes(self, num_columns: int, kind: str, rng: Any) -> Array:
        """``(D, num_columns)`` block of i.i.d. Rademacher (+-1) or standard Gaussian entries."""
        raise NotImplementedError

    def identity_columns(self, start: int, stop: int) -> Array:
        """Columns ``start:stop`` of the ``D x D`` identity, shape ``(D, stop - start)``."""
        block = self.zeros((self.local_dim, stop - start))
        rows, columns = self._local_rows(start, stop)
        block[rows, columns] = 1.0
        return block

    def diagonal_of_columns(self, image: Array, start: int, stop: int) -> tuple[np.ndarray, Array]:
        """Entries ``A[i, i]`` held here, from ``image = A[:, start:stop]``: local rows and values."""
        rows, columns = self._local_rows(start, stop)
        return rows, image[rows, columns]

    def sum_over_shards(self, value: float) -> float:
        """Sum of a per-process partial scalar over the shards (itself when not sharded)."""
        return value

    def _local_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Local row and column (``index - start``) of the global indices ``start:stop`` held here."""
        return np.arange(start, stop), np.arange(stop - start)


class NumpyOperand(Operand):
    """Numpy backend: the operator is applied through ``apply_block``/``apply_vector`` on host arrays."""

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


class TorchOperand(Operand):
    """Torch backend: everything stays on ``device`` in ``dtype``; only small reductions go to host."""

    backend = "torch"

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        apply_block: Callable[..., torch.Tensor],
        takes_out: bool = False,
    ) -> None:
        super().__init__(dim, float(torch.finfo(dtype).eps), math.frexp(torch.finfo(dtype).max)[1])
        self.dtype = dtype
        self.device = torch.device(device)
        self.cheap_passes = self.device.type != "cpu"
        self._block_fn = apply_block
        #: Whether ``apply_block(X, out=Y)`` writes the product into ``Y``.
        self.takes_out = takes_out

    def _apply_block(self, block: torch.Tensor) -> torch.Tensor:
        return self._block_fn(block.contiguous())

    def matmat_rows_into(self, rows: torch.Tensor, out: torch.Tensor, check_finite: bool = True) -> None:
        if not self.takes_out:
            return super().matmat_rows_into(rows, out, check_finite)
        columns = out.T
        result = self._block_fn(rows.T.contiguous(), out=columns)
        if result is columns and not check_finite:
            # Written into our own buffer: its shape, dtype and device are ours, so there is
            # nothing to coerce or check (a Lanczos step's host time is its overhead on a GPU).
            self.num_matvecs += columns.shape[1]
            if self.product_exponent or self._choose_exponent:
                self._scaled(columns, owned=True)
            return
        result = self._counted(result, tuple(columns.shape), check_finite)
        if result.data_ptr() != columns.data_ptr() or result.stride() != columns.stride():
            columns.copy_(result)  # an operator that returned its product elsewhere

    def _coerce(self, array: Any) -> torch.Tensor:
        if not isinstance(array, torch.Tensor):
            array = torch.as_tensor(np.asarray(array))
        return array.detach().to(device=self.device, dtype=self.dtype)

    def _all_finite(self, array: torch.Tensor) -> bool:
        return all_finite(array)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _contiguous(self, piece: torch.Tensor) -> torch.Tensor:
        # On an accelerator, contiguous pieces: no cuBLAS call sees a leading dimension of D
        # (see WIDE_ELEMENTS). A CPU BLAS takes the strided piece as it is (leading dimension
        # D < 2**31): the copy made a thick restart 1.8x slower (21 -> 12 rows, D = 269,322,
        # float64: 9.2 vs 5.1 ms).
        if self.device.type == "cpu" and piece.stride(0) < WIDE_ELEMENTS:
            return piece
        return piece.contiguous()

    def _row_layout(self, rows: torch.Tensor) -> torch.Tensor:
        # The transpose of a contiguous (D, 1) product is a (1, D) tensor with strides (1, 1):
        # torch calls it contiguous, but cuBLAS rejects it as the output of an in-place addmm
        # (CUBLAS_STATUS_INVALID_VALUE, H200, torch 2.11). view() gives it the strides (D, 1)
        # for free; a column-major (D, b) product is copied into rows once.
        return rows.view(rows.shape) if rows.is_contiguous() else rows.contiguous()

    def _combine_columns(self, n: int) -> int:
        if self.device.type == "cpu":
            return super()._combine_columns(n)
        # On an accelerator few large products are fastest; split only what cuBLAS cannot take.
        return max(1, (CHUNK_ELEMENTS if n * self.local_dim >= WIDE_ELEMENTS else WIDE_ELEMENTS) // max(n, 1))

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array)).to(device=self.device, dtype=self.dtype)

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        if array.numel() == 1:
            # A scalar reduction (Lanczos reads two or three per step): item() is one
            # device-to-host read without a host tensor (1.1 vs 2.7 us on a CPU).
            return np.array(array.item(), dtype=np.float64).reshape(array.shape)
        return array.detach().to(device="cpu", dtype=torch.float64).numpy()

    def matmul(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if left.ndim == 3:
            if _is_wide(left, right):
                return torch.stack([wide_matmul(a, b) for a, b in zip(left, right)])
            return left @ right
        return wide_matmul(left, right)

    def _matmul_into(self, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
        torch.matmul(left, right, out=out)

    def qr(self, block: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        q, r = tall_qr(block)
        return q, self.to_host(r)

    def _local_qr(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.qr(block)

    def _concatenate(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(blocks)

    def dots(self, rows: torch.Tensor, vector: torch.Tensor) -> list[float]:
        # One matmul and tolist (its one read): no host tensor, dtype conversion or numpy array
        # on the way, each microseconds of host time in-run.
        return self._summed(wide_matmul(rows, vector)).tolist()

    def gram(self, rows: torch.Tensor, columns: torch.Tensor | None = None) -> list[list[float]]:
        return self._summed(wide_matmul(rows, (rows if columns is None else columns).T)).tolist()

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of a reduction's partial results over the shards (itself when not sharded)."""
        return partial

    def subtract_rows_(
        self, target: torch.Tensor, coefficients: Sequence[float], rows: torch.Tensor,
        vectors: Sequence[torch.Tensor],
    ) -> None:
        if self.device.type == "cpu":
            if _is_wide(rows):
                super().subtract_rows_(target, coefficients, rows, vectors)
            else:  # one fused pass into the target (see subtract_combination_)
                target[None].addmm_(torch.tensor([coefficients], dtype=self.dtype), rows, alpha=-1.0)
            return
        # On an accelerator, one kernel per row with the coefficient as its scalar argument,
        # instead of a host-to-device copy of the coefficients before an addmm (on a CPU the
        # one fused pass is cheaper). Elementwise kernels index in 64 bits: no size limit.
        for value, vector in zip(coefficients, vectors):
            target.add_(vector, alpha=-value)

    def subtract_combination_(
        self, target: torch.Tensor, coefficients: np.ndarray, rows: torch.Tensor
    ) -> None:
        if target.shape[0] == 1 and coefficients.shape[1] <= 2 and self.device.type != "cpu":
            self.subtract_rows_(target[0], coefficients[0].tolist(), rows, rows.unbind(0))
        elif _is_wide(rows):
            target -= wide_matmul(self.from_host(coefficients), rows)
        else:
            # One fused pass into the target: no (b, D) temporary, whose fresh pages cost
            # about as much as the product itself on a CPU (this runs three times per step).
            target.addmm_(self.from_host(coefficients), rows, alpha=-1.0)

    def scaled_copy_(self, out: torch.Tensor, vector: torch.Tensor, factor: float) -> None:
        torch.mul(vector, factor, out=out)  # one pass, no temporary

    def _column_squares(self, block: torch.Tensor) -> torch.Tensor:
        if block.shape[1] == 1:
            # A dot product: 0.24 vs 0.39 ms for vector_norm (D = 269,322 float64, 2-core CPU);
            # Lanczos takes one or two single-column norms per step.
            return (block[:, 0] @ block[:, 0]).reshape(1)
        # A strided reduction: no (D, b) temporary of squares (its fresh pages cost as much as
        # the arithmetic on a CPU).
        return torch.linalg.vector_norm(block, dim=0).square()

    def column_norms(self, block: torch.Tensor) -> np.ndarray:
        return np.sqrt(self.to_host(self._column_squares(block)))

    def subtract_scaled_columns_(
        self, target: torch.Tensor, block: torch.Tensor, scales: np.ndarray
    ) -> None:
        target.addcmul_(block, self.from_host(scales)[None, :], value=-1.0)

    def _shares_memory(self, left: torch.Tensor, right: torch.Tensor) -> bool:
        return left.untyped_storage().data_ptr() == right.untyped_storage().data_ptr()

    def _copy(self, array: torch.Tensor) -> torch.Tensor:
        return array.clone()

    def rng(self, seed: int | None) -> "ProbeStream":
        return ProbeStream(_fresh_seed() if seed is None else seed)

    def probes(self, num_columns: int, kind: str, rng: "ProbeStream") -> torch.Tensor:
        return rng.draw(num_columns, kind, ((0, self.dim),), self.dim, self.dtype, self.device)


#: Entries per piece of :meth:`Operand.qr_in_place` (32 MiB in float64): pieces small next to
#: a block of many parameters, large enough that the stacked ``R`` factors stay few.
QR_PIECE_ELEMENTS = 1 << 22

#: Largest operand (in elements) handed to one BLAS/LAPACK call. cuBLAS (CUDA 13, H200,
#: torch 2.11) fails with an illegal memory access, or silently returns wrong numbers, for
#: float32 products of a few rows with an ``(n, D)`` operand of more than ``2**31`` elements
#: (``benchmarks/results/wide_gemm_h200_2026-11-23.md``): a 32-bit offset overflows. Lanczos
#: bases of models with more than ~100M parameters are that large, so such products are
#: split along ``D`` into contiguous pieces of at most :data:`CHUNK_ELEMENTS`.
WIDE_ELEMENTS = 1 << 31
CHUNK_ELEMENTS = 1 << 28


def _is_wide(*tensors: torch.Tensor) -> bool:
    return any(t.numel() >= WIDE_ELEMENTS for t in tensors)


def wide_matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` (1-D or 2-D), split into contiguous pieces along the longest axis.

    Small products are one ``@``. When an operand or the result has ``WIDE_ELEMENTS`` or
    more entries, the longest axis (``D``: the output rows, the reduction, or the output
    columns) is cut into pieces whose operands each have at most ``CHUNK_ELEMENTS``
    entries; each piece is made contiguous, so no BLAS call sees a large leading dimension.
    """
    # Shapes as (m, n) @ (n, k), read without making views: Lanczos calls this a few times per
    # step, and on a GPU a step's host time is its overhead.
    squeeze_left, squeeze_right = left.ndim == 1, right.ndim == 1
    m = 1 if squeeze_left else left.shape[0]
    n = right.shape[0]
    k = 1 if squeeze_right else right.shape[1]
    if m * n < WIDE_ELEMENTS and n * k < WIDE_ELEMENTS and m * k < WIDE_ELEMENTS:
        if m == 1 and k == 1 and not (squeeze_left or squeeze_right):
            # A (1, D) row times a (D, 1) column (an inner product of single columns): as a
            # matrix product it costs 10-12 us of host time, as a dot product 3 (D = 2000, CPU).
            return torch.dot(left[0], right[:, 0]).reshape(1, 1)
        return left @ right
    a = left[None, :] if squeeze_left else left
    b = right[:, None] if squeeze_right else right
    longest = max(m, n, k)
    if longest == n:  # reduction over D: sum the pieces' partial products
        step = max(1, CHUNK_ELEMENTS // max(m, k))
        out = None
        for start in range(0, n, step):
            part = a[:, start : start + step].contiguous() @ b[start : start + step].contiguous()
            out = part if out is None else out.add_(part)
    elif longest == m:  # D output rows
        step = max(1, CHUNK_ELEMENTS // max(n, k))
        small = b.contiguous()
        out = a.new_empty((m, k))
        for start in range(0, m, step):
            out[start : start + step] = a[start : start + step].contiguous() @ small
    else:  # D output columns
        step = max(1, CHUNK_ELEMENTS // max(m, n))
        small = a.contiguous()
        out = a.new_empty((m, k))
        for start in range(0, k, step):
            out[:, start : start + step] = small @ b[:, start : start + step].contiguous()
    if squeeze_left:
        out = out[0]
    if squeeze_right:
        out = out[..., 0]
    return out


def tall_qr(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall ``(D, b)`` block (``torch.linalg.qr``), by pieces of rows when very large.

    A block of ``WIDE_ELEMENTS`` or more entries is factored as TSQR: a QR of every piece of
    at most ``CHUNK_ELEMENTS`` entries, a QR of the stacked ``R`` factors, and each piece's
    ``Q`` times its block of the second ``Q`` (see :data:`WIDE_ELEMENTS` for why).
    """
    rows, width = block.shape
    if block.numel() < WIDE_ELEMENTS or rows <= width:
        return torch.linalg.qr(block)
    step = max(width, CHUNK_ELEMENTS // width)
    pieces = [torch.linalg.qr(block[start : start + step].contiguous()) for start in range(0, rows, step)]
    sizes = [r.shape[0] for _, r in pieces]
    stacked_q, r = torch.linalg.qr(torch.cat([r for _, r in pieces]))
    q = block.new_empty((rows, min(rows, width)))
    offset, start = 0, 0
    for (piece_q, _), size in zip(pieces, sizes):
        q[start : start + piece_q.shape[0]] = piece_q @ stacked_q[offset : offset + size]
        start += piece_q.shape[0]
        offset += size
    return q, r


class ProbeStream:
    """Random probe blocks defined entry by entry by their *global* index.

    Draw ``t`` of a block of ``b`` columns is cut into chunks of :attr:`CHUNK` rows of the
    global ``(D, b)`` block; chunk ``c`` comes from its own generator seeded with
    ``(seed, t, c)``. A process that holds only some rows (a shard) generates just the
    chunks those rows touch and gets the very numbers the single-process run gets, so
    sharded and single-process runs of an algorithm see the same probes. The generator
    lives on the vectors' device (no host copy), so the same seed gives different
    numbers on CPU and CUDA.
    """

    #: Rows per chunk: large enough that seeding costs nothing next to generation.
    CHUNK = 1 << 20

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.draws = 0

    def draw(self, num_columns: int, kind: str, ranges: Any, dim: int,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``ranges`` (global ``[start, stop)`` pieces, increasing) of the next ``(dim, b)`` block."""
        draw, self.draws = self.draws, self.draws + 1
        total = sum(stop - start for start, stop in ranges)
        # Chunks are copied into one block as they are generated: one chunk alive at a time.
        block: torch.Tensor | None = None
        filled = 0
        cached: tuple[int, torch.Tensor] | None = None
        for start, stop in ranges:
            position = start
            while position < stop:
                chunk = position // self.CHUNK
                first = chunk * self.CHUNK
                if cached is None or cached[0] != chunk:
                    length = min(self.CHUNK, dim - first)
                    cached = (chunk, self._chunk(draw, chunk, length, num_columns, kind, dtype, device))
                end = min(stop, first + cached[1].shape[0])
                piece = cached[1][position - first : end - first]
                if block is None and piece.shape[0] == total:
                    # A row slice of a fresh chunk (contiguous, referenced nowhere else): no copy.
                    return piece
                if block is None:
                    block = torch.empty((total, num_columns), dtype=dtype, device=device)
                block[filled : filled + piece.shape[0]] = piece
                filled += piece.shape[0]
                position = end
        if block is None:
            return torch.zeros((0, num_columns), dtype=dtype, device=device)
        return block

    def _chunk(self, draw: int, chunk: int, length: int, num_columns: int, kind: str,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        state = np.random.SeedSequence([self.seed, draw, chunk]).generate_state(1, dtype=np.uint64)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(state[0]) & ((1 << 63) - 1))
        shape = (length, num_columns)
        if kind == "rademacher":
            bits = torch.randint(0, 2, shape, generator=generator, device=device)
            return bits.to(dtype).mul_(2.0).sub_(1.0)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)


def _agreed_seed(operand: "TorchOperand", seed: int | None) -> int:
    """The seed of a distributed operand's probes: the same on every rank.

    Every randomized algorithm asks for its generator once, before its first product, so
    this is also where the ranks agree on the call (algorithm and arguments, operator size
    and dtype): ranks that called different things raise a message listing them instead of
    entering mismatched collectives. ``seed=None`` becomes rank 0's fresh seed.
    """
    from curvops.operators._parallel import describe_call

    doing = describe_call(f"a ({operand.dim}, {operand.dim}) {operand.dtype} operator")
    return operand.parallel.shared_seed(seed, doing, operand.device, _fresh_seed)


class ReplicatedTorchOperand(TorchOperand):
    """Torch backend of an operator replicated across processes (DDP).

    Vectors and arithmetic are those of :class:`TorchOperand` (every rank holds full
    vectors and computes the same thing); only the seed is shared (see
    :func:`_agreed_seed`), since each rank's product checks that all ranks multiply the
    same vectors.
    """

    def __init__(self, parallel: Any, dim: int, dtype: torch.dtype, device: torch.device,
                 apply_block: Callable[..., torch.Tensor], takes_out: bool = False) -> None:
        super().__init__(dim, dtype, device, apply_block, takes_out)
        self.parallel = parallel

    def rng(self, seed: int | None) -> ProbeStream:
        return ProbeStream(_agreed_seed(self, seed))


class ShardedTorchOperand(TorchOperand):
    """Torch backend on vectors sharded across processes (FSDP2 layout).

    Each process holds the rows ``layout.ranges`` of every length-``D`` vector; every
    reduction over ``D`` is a local partial result summed with one all-reduce, QR is
    TSQR (local QR, then a QR of the gathered small ``R`` factors) and probes come from
    :class:`ProbeStream`, so results equal the single-process run's up to rounding.
    """

    def __init__(self, layout: Any, dtype: torch.dtype, device: torch.device,
                 apply_block: Callable[..., torch.Tensor], takes_out: bool = False) -> None:
        super().__init__(layout.dim, dtype, device, apply_block, takes_out)
        self.local_dim = layout.local_dim
        self.ranges = layout.ranges
        self.parallel = layout.parallel

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce_(partial.contiguous())

    def inner(self, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
        return self.to_host(self._summed(self.matmul(left if left.ndim == 1 else left.T, right)))

    def column_dots(self, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
        return self.to_host(self._summed((left * right).sum(0)))

    def column_norms(self, block: torch.Tensor) -> np.ndarray:
        return np.sqrt(self.to_host(self._summed(self._column_squares(block))))

    def stacked_inner(self, rows: torch.Tensor, vectors: torch.Tensor) -> np.ndarray:
        return self.to_host(self._summed(self.matmul(rows, vectors[:, :, None])[:, :, 0]))

    def sum_over_shards(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self._summed(total))

    def max_abs(self, array: torch.Tensor) -> float:
        local = super().max_abs(array)
        return float(self.parallel.all_gather_numbers([local], self.device).max())

    def _all_finite(self, array: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if super()._all_finite(array) else 1.0], device=self.device)
        return float(self._summed(bad)) == 0.0

    def qr_in_place(self, block: torch.Tensor) -> np.ndarray:
        # The pieces of the base class would be local to this shard: use the distributed TSQR.
        q, r = self.qr(block)
        block.copy_(q)
        return r

    def qr(self, block: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        width = block.shape[1]
        local_q, local_r = tall_qr(block)  # (m, min(m, b)), (min(m, b), b)
        padded_q = torch.zeros((block.shape[0], width), dtype=block.dtype, device=block.device)
        padded_q[:, : local_q.shape[1]] = local_q
        padded_r = torch.zeros((width, width), dtype=block.dtype, device=block.device)
        padded_r[: local_r.shape[0]] = local_r
        gathered = [torch.empty_like(padded_r) for _ in range(self.parallel.world_size)]
        torch.distributed.all_gather(gathered, padded_r, group=self.parallel.group)
        stacked_q, r = torch.linalg.qr(torch.cat(gathered))  # the same on every rank
        rank = self.parallel.rank
        return wide_matmul(padded_q, stacked_q[rank * width : (rank + 1) * width]), self.to_host(r)

    def rng(self, seed: int | None) -> ProbeStream:
        return ProbeStream(_agreed_seed(self, seed))

    def probes(self, num_columns: int, kind: str, rng: ProbeStream) -> torch.Tensor:
        return rng.draw(num_columns, kind, self.ranges, self.dim, self.dtype, self.device)

    def _local_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows, columns = [], []
        local = 0
        for first, last in self.ranges:
            low, high = max(first, start), min(last, stop)
            if low < high:
                rows.append(np.arange(low, high) - first + local)
                columns.append(np.arange(low, high) - start)
            local += last - first
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(columns)


def _square_dim(shape: Any) -> int:
    if shape is None or len(shape) != 2:
        raise ValueError(f"the operator must be 2-D (D, D), got shape {shape}")
    rows, columns = int(shape[0]), int(shape[1])
    if rows != columns:
        raise ValueError(f"the operator must be square, got shape ({rows}, {columns})")
    if rows < 1:
        raise ValueError("the operator must have dimension D >= 1")
    return rows


def _real_numpy_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float64)
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError("only real symmetric operators are supported, got a complex dtype")
    # float32 stays float32; integers, bools and float16 are promoted.
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)


def as_operand(operator: Any, dim: int | None = None) -> Operand:
    """Adapt any supported operator to an :class:`Operand`.

    Parameters
    ----------
    operator
        * a torch-native operator: any object with ``shape``, ``device``,
          ``torch_dtype`` and ``matmat_torch(X)`` (curvops operators) -> torch path. If
          ``matmat_torch`` takes an ``out`` keyword (``matmat_torch(X, out=Y)`` writes
          ``A @ X`` into the ``(D, k)`` tensor ``Y`` and returns it), Lanczos passes rows of
          its basis there and forms each new vector in place;
        * a dense 2-D ``torch.Tensor`` -> torch path on its device/dtype;
        * a ``scipy.sparse.linalg.LinearOperator``, scipy sparse matrix or dense
          numpy array -> numpy path;
        * a callable ``v -> A @ v`` on length-``D`` numpy vectors, with ``dim=D``
          -> numpy path in float64.
    dim
        Required for callables, optional (checked) otherwise.
    """
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dim = int(dim)

    if hasattr(operator, "matmat_torch"):
        size = _square_dim(getattr(operator, "shape", None))
        for attribute in ("device", "torch_dtype"):
            if not hasattr(operator, attribute):
                raise TypeError(
                    f"a torch-native operator needs a `{attribute}` attribute next to matmat_torch"
                )
        dtype = operator.torch_dtype
        if not dtype.is_floating_point:
            raise TypeError(f"torch-native operator must have a real floating dtype, got {dtype}")
        layout = getattr(operator, "sharding", None)
        takes_out = _takes_out(operator.matmat_torch)
        parallel = getattr(operator, "parallel", None)
        if layout is not None:
            operand: Operand = ShardedTorchOperand(layout, dtype, operator.device, operator.matmat_torch, takes_out)
        elif parallel is not None:  # replicated (DDP): the ranks share the probes' seed
            operand = ReplicatedTorchOperand(parallel, size, dtype, operator.device, operator.matmat_torch, takes_out)
        else:
            operand = TorchOperand(size, dtype, operator.device, operator.matmat_torch, takes_out)
        operand.symmetric = bool(getattr(operator, "is_symmetric", False))
    elif isinstance(operator, torch.Tensor):
        size = _square_dim(tuple(operator.shape))
        if not operator.dtype.is_floating_point or operator.dtype.is_complex:
            raise TypeError(f"dense torch operator must be real floating point, got {operator.dtype}")
        matrix = operator.detach()

        def dense_product(block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.matmul(matrix, block, out=out)

        operand = TorchOperand(size, matrix.dtype, matrix.device, dense_product, takes_out=True)
        operand.transpose_product = lambda block: matrix.T @ block
    elif isinstance(operator, np.ndarray) or scipy.sparse.issparse(operator):
        size = _square_dim(operator.shape)
        dtype = _real_numpy_dtype(operator.dtype)
        matrix = operator.astype(dtype) if operator.dtype != dtype else operator
        operand = NumpyOperand(size, dtype, lambda block: matrix @ block, lambda v: matrix @ v)
        operand.transpose_product = lambda block: matrix.T @ block
    elif isinstance(operator, scipy.sparse.linalg.LinearOperator):
        size = _square_dim(operator.shape)
        dtype = _real_numpy_dtype(operator.dtype)
        operand = NumpyOperand(size, dtype, operator.matmat, operator.matvec)
        operand.symmetric = bool(getattr(operator, "is_symmetric", False))
        operand.transpose_product = operator.rmatmat
    elif callable(operator):
        if dim is None:
            raise ValueError("a callable operator needs its size: pass dim=D")
        function = operator

        def apply_block(block: np.ndarray) -> np.ndarray:
            return np.stack([np.asarray(function(column)).reshape(-1) for column in block.T], 1)

        operand = NumpyOperand(dim, np.dtype(np.float64), apply_block, function)
        size = dim
    else:
        raise TypeError(
            "expected a curvops/torch-native operator, scipy LinearOperator, dense numpy array, "
            f"torch tensor or callable, got {type(operator).__name__}"
        )
    if dim is not None and dim != size:
        raise ValueError(f"dim={dim} does not match the operator dimension {size}")
    return operand


def _takes_out(method: Callable[..., Any]) -> bool:
    """Whether a torch-native ``matmat_torch`` accepts ``out=`` (optional in the protocol)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "out" in parameters


def check_int(value: Any, name: str, minimum: int) -> int:
    """Validate an integer argument ``>= minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_probe(kind: str) -> str:
    """Validate a probe distribution name."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {PROBE_KINDS}, got {kind!r}")
    return kind


def check_seed(seed: Any) -> int | None:
    """Validate ``seed``: ``None`` or a non-negative integer."""
    if seed is None:
        return None
    return check_int(seed, "seed", 0)
