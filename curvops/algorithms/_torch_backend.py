"""Torch backend of the vector layer (``curvops.algorithms.vectors``) and its device tuning.

Everything stays on the operator's device in its dtype; only small reductions go to the host.
The tuning that depends on the device lives here: products split so that no cuBLAS call sees
more than ``2**31`` elements (``wide_matmul``, ``tall_qr``), row layouts cuBLAS accepts
in place, fused in-place updates, and one kernel per row on an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from curvops._finite import all_finite
from curvops.algorithms._random import ProbeStream, fresh_seed
from curvops.algorithms.vectors import Operand

#: Largest operand (in elements) handed to one BLAS/LAPACK call. cuBLAS fails with an illegal
#: memory access, or silently returns wrong numbers, for float32 products of a few rows with an
#: ``(n, D)`` operand of more than ``2**31`` elements: a 32-bit offset overflows (see
#: ``benchmarks/results/wide_gemm_h200_2026-11-23.md``, ``benchmarks/probe_wide_gemm.py``). Lanczos
#: bases of models with more than ~100M parameters are that large, so such products are
#: split along ``D`` into contiguous pieces of at most ``CHUNK_ELEMENTS``.
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
            # A (1, D) row times a (D, 1) column (an inner product of single columns): a dot
            # product costs a fraction of a matrix product's host time (docs/benchmarks.md#lanczos).
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
    assert out is not None  # every branch above forms at least one piece
    if squeeze_left:
        out = out[0]
    if squeeze_right:
        out = out[..., 0]
    return out


def tall_qr(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall ``(D, b)`` block (``torch.linalg.qr``), by pieces of rows when very large.

    A block of ``WIDE_ELEMENTS`` or more entries is factored as TSQR: a QR of every piece of
    at most ``CHUNK_ELEMENTS`` entries, a QR of the stacked ``R`` factors, and each piece's
    ``Q`` times its block of the second ``Q`` (see ``WIDE_ELEMENTS`` for why).
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


class TorchOperand(Operand):
    """Torch backend: everything stays on ``device`` in ``dtype``; only small reductions go to host.

    Parameters
    ----------
    dim
        Operator dimension ``D``.
    dtype
        Working dtype (real floating).
    device
        Working device.
    apply_block
        ``X (D, b) -> A X``; with ``takes_out``, also ``apply_block(X, out=Y)`` writing into ``Y``.
    takes_out
        Whether ``apply_block`` accepts ``out=`` (default False).
    """

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
        result = self._counted(result, (columns.shape[0], columns.shape[1]), check_finite)
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
        # D < 2**31), and a copy would slow every thick restart (docs/benchmarks.md#lanczos).
        if self.device.type == "cpu" and piece.stride(0) < WIDE_ELEMENTS:
            return piece
        return piece.contiguous()

    def _row_layout(self, rows: torch.Tensor) -> torch.Tensor:
        # The transpose of a contiguous (D, 1) product is a (1, D) tensor with strides (1, 1):
        # torch calls it contiguous, but cuBLAS rejects it as the output of an in-place addmm
        # (CUBLAS_STATUS_INVALID_VALUE). view() gives it the strides (D, 1)
        # for free; a column-major (D, b) product is copied into rows once.
        return rows.view(rows.shape) if rows.is_contiguous() else rows.contiguous()

    def _combine_columns(self, n: int) -> int:
        if self.device.type == "cpu":
            return super()._combine_columns(n)
        # On an accelerator few large products are fastest; split only what cuBLAS cannot take.
        return max(1, (CHUNK_ELEMENTS if n * self.local_dim >= WIDE_ELEMENTS else WIDE_ELEMENTS) // max(n, 1))

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array)).to(device=self.device, dtype=self.dtype)

    def flags_from_host(self, flags: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(flags, device=self.device)

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        if array.numel() == 1:
            # A scalar reduction (Lanczos reads two or three per step): item() is one
            # device-to-host read without a host tensor.
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
        self,
        target: torch.Tensor,
        coefficients: Sequence[float],
        rows: torch.Tensor,
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
            # A dot product, faster than vector_norm for one column (docs/benchmarks.md#lanczos):
            # Lanczos takes one or two single-column norms per step.
            return (block[:, 0] @ block[:, 0]).reshape(1)
        # A strided reduction: no (D, b) temporary of squares (its fresh pages cost as much as
        # the arithmetic on a CPU).
        return torch.linalg.vector_norm(block, dim=0).square()

    def column_norms(self, block: torch.Tensor) -> np.ndarray:
        return np.sqrt(self.to_host(self._column_squares(block)))

    def subtract_scaled_columns_(self, target: torch.Tensor, block: torch.Tensor, scales: np.ndarray) -> None:
        target.addcmul_(block, self.from_host(scales)[None, :], value=-1.0)

    def _shares_memory(self, left: torch.Tensor, right: torch.Tensor) -> bool:
        return left.untyped_storage().data_ptr() == right.untyped_storage().data_ptr()

    def _copy(self, array: torch.Tensor) -> torch.Tensor:
        return array.clone()

    def rng(self, seed: int | None) -> ProbeStream:
        return ProbeStream(fresh_seed() if seed is None else seed)

    def probes(self, num_columns: int, kind: str, rng: ProbeStream) -> torch.Tensor:
        return rng.draw(num_columns, kind, ((0, self.dim),), self.dim, self.dtype, self.device)
