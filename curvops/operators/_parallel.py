"""How an operator runs when its model is spread over processes (DDP, FSDP2).

An operator finds out from its model (:func:`detect_parallel`):

- a model wrapped in :class:`torch.nn.parallel.DistributedDataParallel` is *replicated*
  (:class:`Replicated`): every rank holds all parameters and full-size vectors; each rank
  multiplies over its own batches and the product is all-reduced once per product.
- a model whose parameters are FSDP2 ``DTensor`` shards (``fully_shard``) is *sharded*
  (:class:`Sharded`): vectors are laid out like the parameters' local shards, products
  come from gradients (FSDP's reduce-scatter) and forward passes only, and no rank ever
  holds a full-size vector.
- anything else runs in one process (``None``).

Both parallel modes also carry the rank-consensus used for errors: a rank that finds
bad input or a NaN tells the others through one scalar all-reduce, and all ranks raise
the same message (instead of one rank raising and the others hanging in a collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ParallelError(RuntimeError):
    """Raised on every rank when one rank of a distributed operator failed a check."""


class Parallel:
    """What the two parallel modes share: the process group and the error consensus."""

    kind: str = ""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place (and return it)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather_numbers(self, values: Sequence[float], device: torch.device) -> Tensor:
        """``(world_size, len(values))`` float64 table of every rank's ``values``."""
        local = torch.tensor(list(values), dtype=torch.float64, device=device)
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(table, local, group=self.group)
        return torch.stack(table)

    def agree(self, error: BaseException | None, device: torch.device) -> None:
        """Raise on every rank if ``error`` is set on any rank (one scalar all-reduce).

        The raised exception has the failing rank's type (ValueError, TypeError,
        FloatingPointError) if all failing ranks agree on it, else :class:`ParallelError`;
        its message names the rank(s).
        """
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device)
        self.all_reduce_(flag)
        if float(flag) == 0.0:
            return
        messages: list[object] = [None] * self.world_size
        local = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(messages, local, group=self.group)
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        text = "; ".join(f"rank {rank}: {m[1]}" for rank, m in failed)  # type: ignore[index]
        names = {m[0] for _, m in failed}  # type: ignore[index]
        cls = _ERRORS.get(names.pop(), ParallelError) if len(names) == 1 else ParallelError
        raise cls(f"[{len(failed)} of {self.world_size} ranks failed] {text}") from error


_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "TypeError": TypeError, "FloatingPointError": FloatingPointError,
    "NotImplementedError": NotImplementedError,
}


class Replicated(Parallel):
    """DDP: parameters and vectors replicated on every rank, data sharded by rank."""

    kind = "ddp"


class Sharded(Parallel):
    """FSDP2: parameters and vectors sharded by rank (dim 0 of each parameter)."""

    kind = "fsdp"

    def __init__(self, group: dist.ProcessGroup | None, model: nn.Module) -> None:
        super().__init__(group)
        self.model = model

    @contextlib.contextmanager
    def summed_gradients(self) -> Iterator[None]:
        """FSDP reduce-scatters the *sum* of the ranks' gradients inside this context.

        FSDP2 divides by the world size by default (data-parallel averaging); the operators
        already normalise by the global count, so they need the plain sum. The factors set
        by the user are restored afterwards.
        """
        from torch.distributed.fsdp import FSDPModule

        saved = []
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                state = module._get_fsdp_state()
                groups = getattr(state, "_fsdp_param_groups", None)
                if groups is None:  # torch versions with one parameter group per module
                    group = getattr(state, "_fsdp_param_group", None)
                    groups = [] if group is None else [group]
                saved.append((groups, [getattr(g, "gradient_divide_factor", None) for g in groups]))
                module.set_gradient_divide_factor(1.0)
        try:
            yield
        finally:
            for groups, factors in saved:
                for group, factor in zip(groups, factors):
                    group.gradient_divide_factor = factor


@dataclass(frozen=True)
class ShardLayout:
    """Where a rank's slice of a length-``D`` vector sits in the global vector.

    Attributes
    ----------
    dim : int
        Global length ``D``.
    local_dim : int
        Length of this rank's slice.
    ranges : tuple of (int, int)
        Global ``[start, stop)`` of each contiguous piece of the local slice, in local
        order (one per parameter: FSDP shards dim 0, so a shard of a row-major
        parameter is contiguous).
    parallel : Sharded
        The process group and collectives.
    """

    dim: int
    local_dim: int
    ranges: tuple[tuple[int, int], ...]
    parallel: Sharded


def detect_parallel(model: nn.Module) -> tuple[nn.Module, Parallel | None]:
    """The module to run and how it is spread over processes.

    Returns ``(model.module, Replicated)`` for DDP, ``(model, Sharded)`` for a model with
    FSDP2-sharded parameters and ``(model, None)`` otherwise.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, Replicated(model.process_group)
    dtensors = [p for p in model.parameters() if _is_dtensor(p)]
    if not dtensors:
        return model, None
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        raise TypeError(
            "the model has DTensor parameters but no fully_shard (FSDP2) module; curvops "
            "supports FSDP2 (fully_shard) and DDP, not tensor parallelism"
        )
    # fully_shard builds a mesh object per call; what matters is the ranks it spans.
    meshes = {(p.device_mesh.ndim, tuple(p.device_mesh.mesh.flatten().tolist())) for p in dtensors}
    mesh = dtensors[0].device_mesh
    if len(meshes) != 1 or mesh.ndim != 1:
        raise NotImplementedError(
            "curvops supports FSDP2 on a one-dimensional device mesh (plain sharding); "
            "hybrid sharding (HSDP, 2-D meshes) is not supported"
        )
    if len(dtensors) != sum(1 for _ in model.parameters()):
        raise TypeError("some parameters of the model are not sharded by fully_shard; shard the root module too")
    return model, Sharded(mesh.get_group(), model)


def local_tensor(param: Tensor) -> Tensor:
    """The rank's local shard of a (possibly DTensor) parameter, as a plain tensor view."""
    return param.to_local() if _is_dtensor(param) else param


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor)


def shard_layout(params: Sequence[Tensor], parallel: Sharded) -> ShardLayout:
    """The :class:`ShardLayout` of the selected FSDP2 parameters (one all-gather)."""
    for p in params:
        placements = p.placements
        if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim != 0:
            raise NotImplementedError(
                f"parameter of shape {tuple(p.shape)} has placements {placements}; curvops "
                "supports FSDP2's default Shard(0) placement only"
            )
    device = local_tensor(params[0]).device
    local_numels = [local_tensor(p).numel() for p in params]
    table = parallel.all_gather_numbers(local_numels, device).to("cpu").long()
    ranges = []
    offset = 0
    for column, p in enumerate(params):
        counts = table[:, column]
        if int(counts.sum()) != p.numel():
            raise NotImplementedError(
                f"the shards of a parameter of shape {tuple(p.shape)} hold {int(counts.sum())} "
                f"entries, not {p.numel()}: unsupported FSDP layout"
            )
        start = offset + int(counts[: parallel.rank].sum())
        ranges.append((start, start + local_numels[column]))
        offset += p.numel()
    return ShardLayout(dim=offset, local_dim=sum(local_numels), ranges=tuple(ranges), parallel=parallel)
