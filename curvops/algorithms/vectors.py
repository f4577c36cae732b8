"""The vector layer: the one place the algorithms touch length-``D`` vectors.

Every algorithm in ``curvops.algorithms`` (and ``curvops.operators.inverse``) turns its
input into an ``Operand`` with ``as_operand`` and does all arithmetic on length-``D``
vectors through the operand's methods. Every reduction over ``D`` (inner products, norms, Gram
matrices, QR) and every random draw lives behind this interface, so that a sharded backend
(vectors split across processes, reductions all-reduced, probes drawn per shard from the seed)
is another backend and no algorithm changes.

The operations the algorithms use, each written once here on top of a backend's primitives:

1. apply the operator to a block: ``Operand.matmat``, ``Operand.matmat_rows_into``
   (counted, scaled by a power of two, checked for NaN/Inf);
2. inner products to the host: ``Operand.inner``, ``Operand.dots``, ``Operand.gram``;
3. norms: ``Operand.column_norms``, ``Operand.norm``;
4. in-place linear combinations: ``Operand.subtract_combination_``,
   ``Operand.subtract_rows_``, ``Operand.combine_rows_``, ``Operand.scaled_copy_``;
5. QR of a tall block: ``Operand.qr``, ``Operand.qr_in_place``;
6. random probes: ``Operand.rng``, ``Operand.probes``
   (the torch stream is ``curvops.algorithms._random.ProbeStream``);
7. host <-> device transfer of small arrays: ``Operand.from_host``, ``Operand.to_host``.

A backend provides the primitives (applying the operator, allocation, conversion, ``matmul``,
a local QR, random draws, the finiteness test); device tuning (pieces that keep cuBLAS
within 32-bit offsets, contiguous layouts, fused in-place kernels) lives in the backend:

* ``curvops.algorithms._numpy_backend.NumpyOperand`` (scipy/numpy inputs, callables),
* ``curvops.algorithms._torch_backend.TorchOperand`` (curvops operators, torch tensors),
* ``curvops.algorithms._distributed_backend`` (replicated and sharded torch operators).

Conventions
-----------
* A vector is a 1-D array of length ``D``; a block is a 2-D array of shape ``(D, b)``
  (columns are vectors). A *row stack* is ``(n, D)`` (rows are vectors) and is used for
  Krylov bases because rows are contiguous.
* Small results (``(b,)`` or ``(b, c)`` reductions) are returned as float64 numpy arrays or
  Python floats on the host; only these cross the device boundary, never a length-``D`` vector.
* The torch path runs on the operator's device and dtype; the numpy path on float64 (or
  float32 if the operator is float32).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

__all__ = ["Array", "Operand", "as_operand", "QR_PIECE_ELEMENTS"]

Array = Any  # np.ndarray or torch.Tensor, depending on the backend

#: Entries per piece of ``Operand.qr_in_place`` (32 MiB in float64): pieces small next to
#: a block of many parameters, large enough that the stacked ``R`` factors stay few.
QR_PIECE_ELEMENTS = 1 << 22


class Operand:
    """A square ``(D, D)`` operator together with its backend's vector arithmetic.

    Lanczos and SLQ take it to be symmetric; ``rmatmat`` gives ``A^T`` products to the
    estimators that need them for a non-symmetric ``A`` (XDiag).

    Backends: ``NumpyOperand``,
    ``TorchOperand`` and the distributed ones.

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
    #: The working dtype (numpy or torch, by backend).
    dtype: Any

    def __init__(self, dim: int, eps: float, max_exponent: int = 1024) -> None:
        self.dim = dim
        #: Rows of the arrays this process holds (``dim``, or the local shard's length).
        self.local_dim = dim
        self.eps = eps
        self.scale_limit = 2.0 ** (max_exponent // 8)
        self.cheap_passes = False
        self.num_matvecs = 0
        #: Products are ``A x / 2**product_exponent`` (0 unless ``scale_products`` chose one).
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
        the caller, who must then call ``require_finite_product`` when a reduction of the
        product comes out non-finite (NaN and Inf propagate into every inner product).

        Parameters
        ----------
        block
            ``(D, b)`` block of the backend.
        check_finite
            Check the product for NaN/Inf (default True).

        Returns
        -------
        Array
            ``(D, b)`` product, a new array the caller may update in place; ``b`` matvecs counted.

        Raises
        ------
        FloatingPointError
            If ``check_finite`` and the product holds NaN/Inf.
        ValueError
            If the operator returns an array of another size.
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
        no transposed product (see ``transpose_product``).

        Parameters
        ----------
        block
            ``(D, b)`` block of the backend.

        Returns
        -------
        Array
            ``(D, b)`` product with the transpose.

        Raises
        ------
        ValueError
            If the operator offers no transposed product.
        """
        if self.symmetric:
            return self.matmat(block)
        if self.transpose_product is None:
            raise ValueError("the operator offers no product with its transpose")
        return self._counted(self.transpose_product(block), (self.local_dim, block.shape[1]), True)

    def matmat_rows(self, rows: Array, check_finite: bool = True) -> Array:
        """Return ``(A @ rows.T).T`` for a ``(b, D)`` row stack, as a row stack that the
        algorithms may update in place (see ``_row_layout``; ``check_finite`` as in
        ``matmat``).

        Parameters
        ----------
        rows
            ``(b, D)`` row stack.
        check_finite
            Check the product for NaN/Inf (default True).

        Returns
        -------
        Array
            ``(b, D)`` row stack of the products.
        """
        return self._row_layout(self.matmat(rows.T, check_finite).T)

    def matmat_rows_into(self, rows: Array, out: Array, check_finite: bool = True) -> None:
        """``out[...] = (A @ rows.T).T`` for ``(b, D)`` row stacks ``rows`` and ``out`` (which
        must not overlap). Written in place by an operator that takes ``out=`` (no copy).

        Parameters
        ----------
        rows
            ``(b, D)`` row stack.
        out
            ``(b, D)`` row stack that receives the products.
        check_finite
            Check the product for NaN/Inf (default True).
        """
        out[...] = self.matmat_rows(rows, check_finite)

    def _row_layout(self, rows: Array) -> Array:
        return rows

    def matvec(self, vector: Array) -> Array:
        """Return ``A @ vector`` for a length-``D`` vector.

        Parameters
        ----------
        vector
            ``(D,)`` vector of the backend.

        Returns
        -------
        Array
            ``(D,)`` product (one matvec counted).
        """
        result = self._apply_vector(vector)
        self.num_matvecs += 1
        return self._scaled(self._checked(result, (self.local_dim,)), owned=False)

    def _counted(self, result: Array, shape: tuple[int, int], check_finite: bool) -> Array:
        """A fresh ``(D, b)`` block product: counted as ``b`` matvecs, then ``_checked``
        and ``_scaled``."""
        self.num_matvecs += shape[1]
        return self._scaled(self._checked(result, shape, check_finite), owned=False)

    def scale_products(self) -> None:
        """Let the next product choose a power-of-two scale ``s = 2**product_exponent`` for
        itself and every later one, which then return ``A x / s``.

        ``s`` is 1 while that product's largest entry lies in ``[1 / scale_limit,
        scale_limit]``, else about that entry: an operator of any norm then gives products of
        order 1, whose squared norms and inner products neither overflow (``1e200**2`` does in
        float64) nor underflow, at the cost of one pass per product only where it is needed.
        Powers of two scale without rounding. ``unscale`` converts results back.
        """
        self._choose_exponent = True

    def unscale(self, value: Any) -> Any:
        """``value * s`` for a host float or float64 numpy array (see ``scale_products``);
        ``FloatingPointError`` if a finite value leaves the working dtype's range.

        Parameters
        ----------
        value
            Host float or float64 numpy array in the units of the scaled products.

        Returns
        -------
        float or numpy.ndarray
            ``value`` in the operator's units.

        Raises
        ------
        FloatingPointError
            If a finite value leaves the working dtype's range.
        """
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
        """A product divided by the scale (see ``scale_products``): in place if the caller
        ``owned`` the array, else as a new one (an operator may return an array it keeps)."""
        if self._choose_exponent:
            self._choose_exponent = False
            largest = self.max_abs(result)
            if (
                math.isfinite(largest)
                and largest > 0.0
                and not 1.0 / self.scale_limit <= largest <= self.scale_limit
            ):
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
        """Largest ``|entry|`` of an array (over every shard), as a host float (0 if empty).

        Parameters
        ----------
        array
            Array of the backend.

        Returns
        -------
        float
            The largest absolute entry.
        """
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
        """Raise ``FloatingPointError`` if the product ``result`` holds NaN/Inf.

        Parameters
        ----------
        result
            A product of the operator.

        Raises
        ------
        FloatingPointError
            If ``result`` holds NaN/Inf.
        """
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
        """Zero array of the working dtype/device.

        Parameters
        ----------
        shape
            Array shape.

        Returns
        -------
        Array
            Zeros of the working dtype on the working device.
        """
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...]) -> Array:
        """Uninitialized array of the working dtype/device (every entry must be written before use).

        Large bases are allocated this way: zero-filling one costs as much as several Lanczos steps.

        Parameters
        ----------
        shape
            Array shape.

        Returns
        -------
        Array
            Uninitialized array of the working dtype on the working device.
        """
        return self.zeros(shape)

    def from_host(self, array: np.ndarray) -> Array:
        """Small host (numpy) array -> working backend/dtype/device.

        Parameters
        ----------
        array
            Small numpy array.

        Returns
        -------
        Array
            The array in the working backend, dtype and device.
        """
        raise NotImplementedError

    def flags_from_host(self, flags: np.ndarray) -> Array:
        """Host booleans -> a boolean array of the backend (on the working device).

        Parameters
        ----------
        flags
            Small numpy bool array.

        Returns
        -------
        Array
            The flags as a numpy bool array or a torch bool tensor.
        """
        return np.asarray(flags, dtype=bool)

    def to_host(self, array: Array) -> np.ndarray:
        """Backend array -> float64 numpy array (only for small arrays or final results).

        Parameters
        ----------
        array
            Array of the backend.

        Returns
        -------
        numpy.ndarray
            float64 copy on the host.
        """
        raise NotImplementedError

    def as_vector(self, vector: Any, name: str) -> Array:
        """Validate and convert a user-given length-``D`` vector (e.g. ``v0``).

        Parameters
        ----------
        vector
            ``(D,)`` numpy array or torch tensor.
        name
            Argument name for error messages.

        Returns
        -------
        Array
            The vector in the working backend, dtype and device.

        Raises
        ------
        ValueError
            If the shape is not ``(D,)`` or the vector holds NaN/Inf.
        """
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
                self._coerce(vector) if self.backend == "torch" else self._coerce(vector.cpu().numpy())
            )
        else:
            converted = self._coerce(vector) if self.backend == "numpy" else self.from_host(vector)
        if not self._all_finite(converted):
            raise ValueError(f"{name} contains NaN or Inf")
        return converted

    def matmul(self, left: Array, right: Array) -> Array:
        """``left @ right`` for 1-D/2-D operands, or batched over a leading axis of both (3-D).

        The one place products with a length-``D`` axis are formed (the torch backend splits
        very large ones, see ``curvops.algorithms._torch_backend.wide_matmul``).

        Parameters
        ----------
        left, right
            Operands of the backend (1-D, 2-D, or 3-D batched).

        Returns
        -------
        Array
            The product.
        """
        return left @ right

    # -- reductions over D: the only places a sharded backend must all-reduce --
    def inner(self, left: Array, right: Array) -> np.ndarray:
        """``left.T @ right`` for ``(D,)`` or ``(D, b)`` operands, as a float64 host array.

        Parameters
        ----------
        left, right
            ``(D,)`` or ``(D, b)`` operands.

        Returns
        -------
        numpy.ndarray
            ``left.T @ right`` (float64, host).
        """
        return self.to_host(self.matmul(left if left.ndim == 1 else left.T, right))

    def dots(self, rows: Array, vector: Array) -> list[float]:
        """``rows @ vector`` for a small ``(n, D)`` row stack, as Python floats: one pass and one
        device-to-host read.

        Parameters
        ----------
        rows
            ``(n, D)`` row stack.
        vector
            ``(D,)`` vector.

        Returns
        -------
        list of float
            ``n`` inner products.
        """
        return self.inner(rows.T, vector).tolist()

    def gram(self, rows: Array, columns: Array | None = None) -> list[list[float]]:
        """``rows @ columns.T`` (default ``columns = rows``) for small ``(n, D)`` and ``(c, D)``
        row stacks, as nested Python floats: one pass and one device-to-host read (the inner
        products of a Lanczos step's vectors).

        Parameters
        ----------
        rows
            ``(n, D)`` row stack.
        columns
            ``(c, D)`` row stack; default ``rows``.

        Returns
        -------
        list of list of float
            ``(n, c)`` inner products.
        """
        return self.inner(rows.T, (rows if columns is None else columns).T).tolist()

    def column_dots(self, left: Array, right: Array) -> np.ndarray:
        """``(b,)`` column-wise inner products of two ``(D, b)`` blocks.

        Parameters
        ----------
        left, right
            ``(D, b)`` blocks.

        Returns
        -------
        numpy.ndarray
            ``(b,)`` inner products (float64, host).
        """
        if left.shape[1] == 1:  # a dot product, without the (D, 1) temporary
            return self.to_host((left[:, 0] @ right[:, 0]).reshape(1))
        # By pieces of rows: the products' temporary is one piece, not a third (D, b) block.
        step = max(1, QR_PIECE_ELEMENTS // left.shape[1])
        total = (left[:step] * right[:step]).sum(0)
        for start in range(step, left.shape[0], step):
            total = total + (left[start : start + step] * right[start : start + step]).sum(0)
        return self.to_host(total)

    def column_norms(self, block: Array) -> np.ndarray:
        """``(b,)`` Euclidean norms of the columns of a ``(D, b)`` block.

        Parameters
        ----------
        block
            ``(D, b)`` block.

        Returns
        -------
        numpy.ndarray
            ``(b,)`` norms (float64, host).
        """
        return np.sqrt(np.maximum(self.column_dots(block, block), 0.0))

    def subtract_scaled_columns_(self, target: Array, block: Array, scales: np.ndarray) -> None:
        """In place ``target -= block * scales`` for ``(D, b)`` blocks and host ``scales`` ``(b,)``.

        Parameters
        ----------
        target
            ``(D, b)`` block, updated in place.
        block
            ``(D, b)`` block.
        scales
            ``(b,)`` host scales.
        """
        target -= block * self.from_host(scales)

    def dot(self, left: Array, right: Array) -> float:
        """Inner product of two length-``D`` vectors.

        Parameters
        ----------
        left, right
            ``(D,)`` vectors.

        Returns
        -------
        float
            The inner product.
        """
        return float(self.inner(left, right))

    def norm(self, vector: Array) -> float:
        """Euclidean norm of a length-``D`` vector.

        Parameters
        ----------
        vector
            ``(D,)`` vector.

        Returns
        -------
        float
            The norm.
        """
        return math.sqrt(max(self.dot(vector, vector), 0.0))

    def stacked_inner(self, rows: Array, vectors: Array) -> np.ndarray:
        """Batched ``rows[p] @ vectors[p]``: ``(P, n, D)`` x ``(P, D)`` -> ``(P, n)``.

        Parameters
        ----------
        rows
            ``(P, n, D)`` stacks of rows.
        vectors
            ``(P, D)`` vectors.

        Returns
        -------
        numpy.ndarray
            ``(P, n)`` inner products (float64, host).
        """
        return self.to_host(self.matmul(rows, vectors[:, :, None])[:, :, 0])

    def qr(self, block: Array) -> tuple[Array, np.ndarray]:
        """Thin QR of a ``(D, b)`` block: ``Q`` (backend, orthonormal columns) and ``R`` (host).

        Parameters
        ----------
        block
            ``(D, b)`` block.

        Returns
        -------
        tuple
            ``Q`` ``(D, b)`` of the backend and ``R`` ``(b, b)`` on the host.
        """
        raise NotImplementedError

    def qr_in_place(self, block: Array) -> np.ndarray:
        """Thin QR of a tall ``(D, b)`` block that overwrites it with ``Q``; returns ``R`` (host).

        TSQR by pieces of rows (Demmel, Grigori, Hoemmen, Langou 2012): a QR of each piece
        written back in place, a QR of the stacked ``R`` factors, and each piece times its block
        of that ``Q``. Extra memory is one piece, not the second ``(D, b)`` block that
        ``qr`` returns.

        Parameters
        ----------
        block
            ``(D, b)`` block, overwritten by ``Q``.

        Returns
        -------
        numpy.ndarray
            ``R`` ``(b, b)`` on the host.
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
        product goes through one ``(m, step)`` buffer: a fresh temporary per piece page-faults
        on every restart on a CPU (docs/benchmarks.md#lanczos).

        Parameters
        ----------
        rows
            ``(n', D)`` row stack with ``n' >= n``, updated in place.
        coefficients
            ``(m, n)`` host coefficients.
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
        ``coefficients`` ``(b, n)`` and ``rows`` ``(n, D)`` (no reduction over D).

        Parameters
        ----------
        target
            ``(b, D)`` row stack, updated in place.
        coefficients
            ``(b, n)`` host coefficients.
        rows
            ``(n, D)`` row stack.
        """
        target -= self.matmul(self.from_host(coefficients), rows)

    def subtract_rows_(
        self, target: Array, coefficients: Sequence[float], rows: Array, vectors: Sequence[Array]
    ) -> None:
        """In place ``target -= sum_i coefficients[i] * rows[i]`` for a vector ``target`` ``(D,)``
        and a few rows, given both as the ``(n, D)`` stack ``rows`` and as the vectors
        ``vectors`` (views a caller made once: the three-term recurrence of every Lanczos step).

        Parameters
        ----------
        target
            ``(D,)`` vector, updated in place.
        coefficients
            ``n`` host floats.
        rows
            ``(n, D)`` row stack.
        vectors
            The same rows as ``n`` vectors (views).
        """
        self.subtract_combination_(target[None], np.array([coefficients], dtype=np.float64), rows)

    def scaled_copy_(self, out: Array, vector: Array, factor: float) -> None:
        """``out[...] = factor * vector`` without a temporary.

        Parameters
        ----------
        out
            ``(D,)`` or ``(b, D)`` destination.
        vector
            Source of the same shape (may be ``out``).
        factor
            Scale.
        """
        out[...] = vector
        out *= factor

    def _shares_memory(self, left: Array, right: Array) -> bool:
        return bool(np.may_share_memory(left, right))

    def _copy(self, array: Array) -> Array:
        return array.copy()

    # -- orthogonalization built on the reductions above ------------------------
    def project_out(self, rows: Array, vector: Array) -> tuple[Array, np.ndarray]:
        """One classical Gram-Schmidt pass of ``vector`` against the orthonormal ``rows`` ``(n, D)``.

        Parameters
        ----------
        rows
            ``(n, D)`` orthonormal rows.
        vector
            ``(D,)`` vector.

        Returns
        -------
        tuple
            The projected vector and the ``(n,)`` coefficients removed (host).
        """
        coefficients = self.inner(rows.T, vector)
        return vector - self.matmul(rows.T, self.from_host(coefficients)), coefficients

    def orthogonalize(self, rows: Array, vector: Array) -> tuple[Array, float]:
        """Orthonormalize ``vector`` against ``rows`` with two Gram-Schmidt passes (CGS2).

        Parameters
        ----------
        rows
            ``(n, D)`` orthonormal rows.
        vector
            ``(D,)`` vector.

        Returns
        -------
        tuple
            The unit vector and the norm after projection (0 if ``vector`` lies in the span;
            the vector is then returned unnormalized).
        """
        for _ in range(2):
            if rows.shape[0]:
                vector, _ = self.project_out(rows, vector)
        norm = self.norm(vector)
        return (vector / norm if norm > 0 else vector), norm

    def project_out_block(self, basis: Array, block: Array) -> Array:
        """``block - basis @ (basis.T @ block)`` for an orthonormal ``(D, s)`` basis.

        Parameters
        ----------
        basis
            ``(D, s)`` orthonormal columns.
        block
            ``(D, b)`` block.

        Returns
        -------
        Array
            ``(D, b)`` projected block.
        """
        return block - self.matmul(basis, self.from_host(self.inner(basis, block)))

    # -- randomness -------------------------------------------------------------
    def rng(self, seed: int | None) -> Any:
        """A backend generator seeded from ``seed`` (``None``: fresh OS entropy).

        Parameters
        ----------
        seed
            Non-negative integer, or None.

        Returns
        -------
        object
            The generator ``probes`` draws from.
        """
        raise NotImplementedError

    def probes(self, num_columns: int, kind: str, rng: Any) -> Array:
        """``(D, num_columns)`` block of i.i.d. Rademacher (+-1) or standard Gaussian entries.

        Parameters
        ----------
        num_columns
            Columns ``b``.
        kind
            ``"rademacher"`` or ``"gaussian"``.
        rng
            Generator from ``rng``.

        Returns
        -------
        Array
            ``(D, b)`` probes.
        """
        raise NotImplementedError

    def identity_columns(self, start: int, stop: int) -> Array:
        """Columns ``start:stop`` of the ``D x D`` identity, shape ``(D, stop - start)``.

        Parameters
        ----------
        start, stop
            Column range.

        Returns
        -------
        Array
            ``(D, stop - start)`` block.
        """
        block = self.zeros((self.local_dim, stop - start))
        rows, columns = self._local_rows(start, stop)
        block[rows, columns] = 1.0
        return block

    def diagonal_of_columns(self, image: Array, start: int, stop: int) -> tuple[np.ndarray, Array]:
        """Entries ``A[i, i]`` held here, from ``image = A[:, start:stop]``: local rows and values.

        Parameters
        ----------
        image
            ``(D, stop - start)`` product ``A[:, start:stop]``.
        start, stop
            Column range.

        Returns
        -------
        tuple
            Local row indices (numpy) and the diagonal entries held here.
        """
        rows, columns = self._local_rows(start, stop)
        return rows, image[rows, columns]

    def sum_over_shards(self, value: float) -> float:
        """Sum of a per-process partial scalar over the shards (itself when not sharded).

        Parameters
        ----------
        value
            This process' partial sum.

        Returns
        -------
        float
            The total.
        """
        return value

    def _local_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Local row and column (``index - start``) of the global indices ``start:stop`` held here."""
        return np.arange(start, stop), np.arange(stop - start)


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
    """Adapt any supported operator to an ``Operand``.

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
          -> numpy path in float64;
        * an ``Operand``, used as it is (its matvec count and product scale carry on):
          how a caller that adapted an operator once (``curvops.operators.inverse``), or set one
          of its documented attributes (``cheap_passes``), hands it to the algorithms.
    dim
        Operator dimension ``D``: required for callables, optional (checked) otherwise.

    Returns
    -------
    Operand
        The operator with its backend's vector arithmetic; ``num_matvecs`` starts at 0.

    Raises
    ------
    TypeError
        For an unsupported operator type, a complex or non-floating dtype, or a torch-native
        operator without ``device``/``torch_dtype``.
    ValueError
        For a non-square or empty operator, a callable without ``dim``, or a ``dim`` that
        does not match.
    """
    # The backends subclass Operand: imported here, once this module is complete.
    from curvops.algorithms._distributed_backend import ReplicatedTorchOperand, ShardedTorchOperand
    from curvops.algorithms._numpy_backend import NumpyOperand
    from curvops.algorithms._torch_backend import TorchOperand

    if isinstance(operator, Operand):
        if dim is not None and dim != operator.dim:
            raise ValueError(f"dim={dim} does not match the operator dimension {operator.dim}")
        return operator
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
            operand: Operand = ShardedTorchOperand(
                layout, dtype, operator.device, operator.matmat_torch, takes_out
            )
        elif parallel is not None:  # replicated (DDP): the ranks share the probes' seed
            operand = ReplicatedTorchOperand(
                parallel, size, dtype, operator.device, operator.matmat_torch, takes_out
            )
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
