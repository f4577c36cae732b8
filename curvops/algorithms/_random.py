"""The random stream of the torch backend: probes defined by their global index, so that a
sharded run draws the same numbers as a single-process one."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ProbeStream:
    """Random probe blocks defined entry by entry by their *global* index.

    Draw ``t`` of a block of ``b`` columns is cut into chunks of ``CHUNK`` rows of the
    global ``(D, b)`` block; chunk ``c`` comes from its own generator seeded with
    ``(seed, t, c)``. A process that holds only some rows (a shard) generates just the
    chunks those rows touch and gets the very numbers the single-process run gets, so
    sharded and single-process runs of an algorithm see the same probes. The generator
    lives on the vectors' device (no host copy), so the same seed gives different
    numbers on CPU and CUDA.

    Parameters
    ----------
    seed
        Non-negative integer.
    """

    #: Rows per chunk: large enough that seeding costs nothing next to generation.
    CHUNK = 1 << 20

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.draws = 0

    def draw(
        self, num_columns: int, kind: str, ranges: Any, dim: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Rows ``ranges`` (global ``[start, stop)`` pieces, increasing) of the next ``(dim, b)`` block.

        Parameters
        ----------
        num_columns
            Columns ``b``.
        kind
            ``"rademacher"`` or ``"gaussian"``.
        ranges
            Global row ranges ``[(start, stop), ...]`` held by this process.
        dim
            Global length ``D``.
        dtype, device
            Of the block.

        Returns
        -------
        torch.Tensor
            ``(sum of range lengths, b)`` block.
        """
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

    def _chunk(
        self,
        draw: int,
        chunk: int,
        length: int,
        num_columns: int,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        state = np.random.SeedSequence([self.seed, draw, chunk]).generate_state(1, dtype=np.uint64)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(state[0]) & ((1 << 63) - 1))
        shape = (length, num_columns)
        if kind == "rademacher":
            bits = torch.randint(0, 2, shape, generator=generator, device=device)
            return bits.to(dtype).mul_(2.0).sub_(1.0)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def fresh_seed() -> int:
    """A fresh seed from OS entropy (a non-negative 63-bit integer).

    Returns
    -------
    int
        The seed.
    """
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
