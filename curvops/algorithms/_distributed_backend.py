"""Torch backends of operators spread over processes: replicated (DDP) and sharded (FSDP2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from curvops.algorithms._random import ProbeStream, fresh_seed
from curvops.algorithms._torch_backend import TorchOperand, tall_qr, wide_matmul


def _agreed_seed(operand: ReplicatedTorchOperand | ShardedTorchOperand, seed: int | None) -> int:
    """The seed of a distributed operand's probes: the same on every rank.

    Every randomized algorithm asks for its generator once, before its first product, so
    this is also where the ranks agree on the call (algorithm and arguments, operator size
    and dtype): ranks that called different things raise a message listing them instead of
    entering mismatched collectives. ``seed=None`` becomes rank 0's fresh seed.
    """
    from curvops.operators._parallel import describe_call

    doing = describe_call(f"a ({operand.dim}, {operand.dim}) {operand.dtype} operator")
    return operand.parallel.shared_seed(seed, doing, operand.device, fresh_seed)


class ReplicatedTorchOperand(TorchOperand):
    """Torch backend of an operator replicated across processes (DDP).

    Vectors and arithmetic are those of ``TorchOperand`` (every rank holds full
    vectors and computes the same thing); only the seed is shared (see
    ``_agreed_seed``), since each rank's product checks that all ranks multiply the
    same vectors.

    Parameters
    ----------
    parallel
        The process group wrapper (``curvops.operators._parallel``) of the replicas.
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

    def __init__(
        self,
        parallel: Any,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        apply_block: Callable[..., torch.Tensor],
        takes_out: bool = False,
    ) -> None:
        super().__init__(dim, dtype, device, apply_block, takes_out)
        self.parallel = parallel

    def rng(self, seed: int | None) -> ProbeStream:
        return ProbeStream(_agreed_seed(self, seed))


class ShardedTorchOperand(TorchOperand):
    """Torch backend on vectors sharded across processes (FSDP2 layout).

    Each process holds the rows ``layout.ranges`` of every length-``D`` vector; every
    reduction over ``D`` is a local partial result summed with one all-reduce, QR is
    TSQR (local QR, then a QR of the gathered small ``R`` factors) and probes come from
    ``ProbeStream``, so results equal the single-process run's up to rounding.

    Parameters
    ----------
    layout
        The sharding layout: ``dim``, ``local_dim``, ``ranges`` held here and ``parallel``.
    dtype
        Working dtype (real floating).
    device
        Working device.
    apply_block
        ``X (D, b) -> A X``; with ``takes_out``, also ``apply_block(X, out=Y)`` writing into ``Y``.
    takes_out
        Whether ``apply_block`` accepts ``out=`` (default False).
    """

    def __init__(
        self,
        layout: Any,
        dtype: torch.dtype,
        device: torch.device,
        apply_block: Callable[..., torch.Tensor],
        takes_out: bool = False,
    ) -> None:
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
