"""How an operator runs when its model is spread over processes (DDP, FSDP2).

An operator finds out from its model (``detect_parallel``):

- a model wrapped in ``torch.nn.parallel.DistributedDataParallel`` is *replicated*
  (``Replicated``): every rank holds all parameters and full-size vectors; each rank
  multiplies over its own batches and the product is all-reduced once per product.
- a model whose parameters are FSDP2 ``DTensor`` shards (``fully_shard``) is *sharded*
  (``Sharded``): vectors are laid out like the parameters' local shards, products
  come from gradients (FSDP's reduce-scatter) and forward passes only, and no rank ever
  holds a full-size vector.
- anything else runs in one process (``None``).

Both parallel modes also carry the rank-consensus used for errors: a rank that finds
bad input or a NaN, or whose local work raised, tells the others through one small
all-gather, and all ranks raise the same message (instead of one rank raising and the
others hanging in a collective). The same all-gather carries a fingerprint of what each
rank is doing (the algorithm and its arguments, the parameter selection, the block
size), so ranks that called different things raise a message that lists them instead of
entering mismatched collectives (which hang, or abort in gloo's C++ code).

A failure that cannot be agreed on, because the other ranks are already inside a
collective (an exception in an FSDP forward pass, whose parameter all-gathers are
collective; a rank killed mid-run), is reported through the rendezvous store: the
failing rank posts its message before raising, and a rank whose collective then breaks
raises an error that names the failing or lost rank instead of the backend's bare
"Connection closed by peer".
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ParallelError(RuntimeError):
    """Raised on every rank when one rank of a distributed operator failed a check."""


_T = TypeVar("_T")

#: How long a rank whose collective broke waits for the others' reports in the store.
REPORT_WAIT_S = 2.0
#: Timeout given to the collectives of a process group that one rank's failure left out of
#: step: they cannot succeed any more (the ranks wait in different collectives), so the
#: failing rank's next collective, e.g. a ``dist.barrier()`` in the user's error handler,
#: fails after this long instead of after the group's own timeout (30 minutes by default).
BROKEN_GROUP_TIMEOUT_S = 5.0


def fingerprint(description: str) -> float:
    """A 48-bit hash of ``description`` as a float64 (exact: float64 holds 53-bit integers)."""
    digest = hashlib.blake2b(description.encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "big"))


class Parallel:
    """What the two parallel modes share: the process group and the error consensus."""

    kind: str = ""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._register()

    # ------------------------------------------------------------ collectives
    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place (and return it)."""
        with self.reporting_lost_ranks():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather_numbers(self, values: Sequence[float], device: torch.device) -> Tensor:
        """``(world_size, len(values))`` float64 table of every rank's ``values``.

        Every rank must pass the same number of values (a collective of mismatched sizes
        aborts the process in gloo): callers gather a fixed-size fingerprint first
        (``agree``) when the length depends on the rank's input.
        """
        local = torch.tensor(list(values), dtype=torch.float64, device=device)
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        with self.reporting_lost_ranks():
            dist.all_gather(table, local, group=self.group)
        return torch.stack(table)

    def agree(self, error: BaseException | None, device: torch.device, doing: str = "") -> None:
        """Raise on every rank if ``error`` is set on any rank, or if the ranks do different things.

        One all-gather of two numbers per rank: a failure flag and the ``fingerprint``
        of ``doing`` (a description of the call the rank is in, e.g.
        ``"lanczos(k=5, block_size=1)"``; the empty string where only errors matter). Every
        call of ``agree`` gathers the same two numbers, so ranks that reached different
        agreements are told apart instead of deadlocking.

        The raised exception has the failing rank's type (ValueError, TypeError,
        FloatingPointError, NotImplementedError) if all failing ranks agree on it, else
        [`ParallelError`][curvops.operators.ParallelError]; its message names the rank(s). Ranks whose
        descriptions differ raise a ``ValueError`` that lists each rank's call.
        """
        table = self.all_gather_numbers([0.0 if error is None else 1.0, fingerprint(doing)], device)
        failed_any = bool((table[:, 0] != 0).any())
        differ = bool((table[:, 1] != table[0, 1]).any())
        if not failed_any and not differ:
            return
        messages: list[Any] = [None] * self.world_size
        local = (None if error is None else (type(error).__name__, str(error)), doing)
        with self.reporting_lost_ranks():
            dist.all_gather_object(messages, local, group=self.group)
        if differ and not failed_any:  # a failure says more than the calls that follow from it
            calls = "; ".join(
                f"rank {rank}: {m[1] or 'a check of its input or data'}" for rank, m in enumerate(messages)
            )
            agreed: Exception = ValueError(
                f"the ranks made different calls ({calls}); every rank must make the same curvops "
                "calls in the same order, with the same arguments, on operators built from the same "
                "parameter selection"
            )
        else:
            failed = [(rank, m[0]) for rank, m in enumerate(messages) if m[0] is not None]
            names = {m[0] for _, m in failed}
            cls = _ERRORS.get(next(iter(names)), ParallelError) if len(names) == 1 else ParallelError
            if cls is ParallelError:  # keep the original type's name in the message
                text = "; ".join(f"rank {rank}: {m[0]}: {m[1]}" for rank, m in failed)
            else:
                text = "; ".join(f"rank {rank}: {m[1]}" for rank, m in failed)
            agreed = cls(f"[{len(failed)} of {self.world_size} ranks failed] {text}")
        agreed._raised_on_every_rank = True  # type: ignore[attr-defined]
        raise agreed from error

    def shared_seed(
        self, seed: int | None, doing: str, device: torch.device, fresh: Callable[[], int]
    ) -> int:
        """Agree on the call ``doing`` (see ``agree``) and on its seed: rank 0's ``fresh()``
        if ``seed`` is None.

        Every rank must draw the same random vectors (replicated under DDP; one global
        vector, each rank its rows, under FSDP), so a seed drawn from fresh entropy is
        drawn once, on rank 0. An explicit seed is part of ``doing``: ranks that pass
        different seeds are told apart.
        """
        self.agree(None, device, doing)
        if seed is not None:
            return seed
        # 52 bits: the seed travels as a float64 (exact below 2**53).
        table = self.all_gather_numbers([float(fresh() >> 11)], device)
        return int(table[0, 0])

    def run_local(self, work: Callable[[], _T], device: torch.device, collective: bool) -> _T:
        """Run ``work`` (this rank's share of a product) so that a failure reaches every rank.

        ``collective=False``: ``work`` makes no collective call (DDP: each rank multiplies
        over its own batches), and its error is agreed on (``agree``): every rank raises
        it, naming the rank, and the process group stays usable. ``collective=True``:
        ``work`` itself runs collectives (FSDP's forward and backward passes), so the other
        ranks may wait in one of them when this rank fails; see ``fail_out_of_step``.
        """
        error: Exception | None = None
        result: Any = None
        try:
            result = work()
        except Exception as caught:
            if isinstance(caught, ParallelError) or getattr(caught, "_raised_on_every_rank", False):
                raise  # already agreed on, or already names the failing rank
            if not collective:
                error = caught
            else:
                self.fail_out_of_step(caught)
        if not collective:
            self.agree(error, device)
        return result

    # ------------------------------------------------- failures outside agreement
    def fail_out_of_step(self, error: Exception) -> None:
        """Raise for an error that left the ranks in different collectives.

        If another rank reported a failure first, that one is the cause and this rank's
        error is its consequence (its collective broke or timed out): the message names
        the other rank. Otherwise this rank is the cause: it posts its message for the
        others, shortens its group's timeout (no collective of the group can succeed any
        more: see ``BROKEN_GROUP_TIMEOUT_S``) and raises.
        """
        reports = self._reports()
        if reports:
            raise ParallelError(self._caused_by(reports, error)) from error
        if _is_backend_error(error):
            raise ParallelError(self._lost_rank_message(error)) from error
        message = f"{type(error).__name__}: {error}"
        self._post(message)
        with contextlib.suppress(Exception):
            dist.distributed_c10d._set_pg_timeout(
                datetime.timedelta(seconds=BROKEN_GROUP_TIMEOUT_S), self.group
            )
        raise ParallelError(
            f"rank {self.rank} of {self.world_size} failed inside a product ({message}) while the "
            "other ranks were in the product's collectives (FSDP's parameter all-gathers and "
            "gradient reduce-scatters): the process group is out of step and cannot be used "
            "again; let this error end the process (torchrun, torch.multiprocessing.spawn) so that "
            "the other ranks stop, with this message"
        ) from error

    @contextlib.contextmanager
    def reporting_lost_ranks(self) -> Iterator[None]:
        """Turn a backend's broken-connection or timeout error into one naming the rank that failed."""
        try:
            yield
        except RuntimeError as error:
            if isinstance(error, ParallelError) or not _is_backend_error(error):
                raise
            reports = self._reports()
            if reports:
                raise ParallelError(self._caused_by(reports, error)) from error
            raise ParallelError(self._lost_rank_message(error)) from error

    def _caused_by(self, reports: dict[int, str], error: BaseException) -> str:
        causes = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(reports.items()))
        return (
            f"rank {self.rank} stopped because another rank failed ({causes}); its own "
            f"collective then failed: {_first_line(error)}"
        )

    def _lost_rank_message(self, error: BaseException) -> str:
        lost = self._lost_ranks()
        who = (
            f"rank(s) {', '.join(map(str, lost))} of {self.world_size} exited"
            if lost
            else "another rank stopped responding (crashed, killed or hung on another host)"
        )
        return (
            f"rank {self.rank}: a collective failed because {who} without reporting an error: "
            f"{_first_line(error)}. Check that rank's log; set a timeout in "
            "init_process_group(timeout=...) to bound how long the ranks wait for each other"
        )

    # The rendezvous store carries what the collectives cannot: each rank's host and process
    # id (to name a rank that died) and the message of a rank that failed out of step.
    def _store(self) -> Any:
        """A new client of the default group's store that gives up after ``REPORT_WAIT_S``
        (its host may be the rank that is gone)."""
        try:
            store: Any = dist.distributed_c10d._get_default_store().clone()  # type: ignore[attr-defined]
            store.set_timeout(datetime.timedelta(seconds=REPORT_WAIT_S))
            return store
        except Exception:
            return None

    def _key(self, what: str, rank: int) -> str:
        name = getattr(self.group, "group_name", None) or "default"
        return f"curvops/{name}/{what}/{rank}"

    def _register(self) -> None:
        with contextlib.suppress(Exception):  # no store (custom init): messages without it
            dist.distributed_c10d._get_default_store().set(
                self._key("process", self.rank), f"{socket.gethostname()} {os.getpid()}"
            )

    def _post(self, message: str) -> None:
        store = self._store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(self._key("failure", self.rank), message)

    def _reports(self) -> dict[int, str]:
        """Failure messages other ranks posted (an unreachable store: none)."""
        store = self._store()
        reports: dict[int, str] = {}
        if store is None:
            return reports
        for rank in range(self.world_size):
            key = self._key("failure", rank)
            with contextlib.suppress(Exception):
                if rank != self.rank and store.check([key]):
                    reports[rank] = store.get(key).decode()
        return reports

    def _lost_ranks(self) -> list[int]:
        """Ranks on this host whose process is gone (other hosts cannot be probed)."""
        store = self._store()
        lost: list[int] = []
        if store is None:
            return lost
        host = socket.gethostname()
        for rank in range(self.world_size):
            with contextlib.suppress(Exception):
                where, pid = store.get(self._key("process", rank)).decode().rsplit(" ", 1)
                if where == host and not _alive(int(pid)):
                    lost.append(rank)
        return lost


def describe_call(operand_description: str) -> str:
    """``"lanczos(k=5, block_size=1, ...) on <operand>"``: the public curvops algorithm this rank is in.

    Read from the call stack: the outermost frame of ``curvops.algorithms`` is the public
    function the user called, and its arguments (those that are numbers, strings or
    ``None``) are what every rank must agree on. Reading them here spares
    every algorithm from restating its arguments for the check.
    """
    outermost = None
    frame: Any = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("curvops.algorithms"):
            outermost = frame
        frame = frame.f_back
    if outermost is None:
        return operand_description
    code = outermost.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    arguments = []
    for name in names:
        value = outermost.f_locals.get(name)
        # Vectors are left out: under FSDP each rank holds other rows (DDP compares them
        # with every product).
        if value is None or isinstance(value, (bool, int, float, str)):
            arguments.append(f"{name}={value!r}")
    return f"{code.co_name}({', '.join(arguments)}) on {operand_description}"


def _is_backend_error(error: BaseException) -> bool:
    """Whether ``error`` is a communication failure of gloo or NCCL (peer gone, timeout)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text
        for marker in (
            "gloo",
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "NCCL",
            "Broken pipe",
        )
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):  # an exited child not yet reaped is a zombie: gone
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "FloatingPointError": FloatingPointError,
    "NotImplementedError": NotImplementedError,
}


class Replicated(Parallel):
    """DDP: parameters and vectors replicated on every rank, data sharded by rank."""

    kind = "ddp"

    #: How far (relative to the vectors' norm) the ranks' copies of a vector may differ:
    #: rounding of the same computation done in another order, not a different vector.
    ROUNDING = 1e3

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__(group)
        #: Gaussian weights of ``check_same_block``'s projection, per (rows, dtype, device).
        self._weights: Tensor | None = None

    def check_same_block(self, X: Tensor, device: torch.device) -> None:
        """Raise on every rank unless all ranks pass the same ``(D, k)`` block, up to rounding.

        Fast path, every product: the projection ``p = wᵀ X c`` on fixed Gaussian weights
        (``w``: one ``D``-vector drawn once per operator from a fixed seed; ``c``: one weight
        per column), all-gathered (two numbers per rank). Ranks with bit-identical blocks,
        which is what curvops' algorithms pass (the same seed and arithmetic on every rank,
        products all-reduced), compute bit-identical ``p``; a block that differs by ``Δ``
        changes ``p`` by ``wᵀ Δ c``, a Gaussian of standard deviation ``‖Δ c‖``, which is
        zero with probability 0 (a unit vector per rank, a permutation: ``‖Δ c‖ ≈ ‖X c‖``,
        far beyond ``p``'s rounding). Cost: one matrix-vector product over the block and
        one small all-gather, against a checksum's two passes; memory: the one vector ``w``.

        If the ``p`` differ at all, ``replication_error`` decides, deterministically,
        whether the blocks differ by more than rounding (then every rank raises) or are the
        same vectors computed in another order (then the product goes on).
        """
        rows, k = X.shape
        weights = self._weights
        if (
            weights is None
            or weights.shape[0] != rows
            or weights.dtype != X.dtype
            or weights.device != X.device
        ):
            weights = _fixed_gaussians(rows, 0x5EED, X)
            self._weights = weights
        column_weights = _fixed_gaussians(k, 0x5EED + 1, X)
        projection = float((weights @ X) @ column_weights)
        table = self.all_gather_numbers([float(k), projection], device)
        if bool((table == table[0]).all()):
            return
        if bool((table[:, 0] != table[0, 0]).any()):
            widths = ", ".join(f"rank {r}: {int(w)}" for r, w in enumerate(table[:, 0].tolist()))
            raise ValueError(
                f"the ranks multiply different numbers of vectors ({widths}); make the same "
                "calls with the same arguments on every rank"
            )
        self.agree(self.replication_error(X.T.contiguous()), device)

    def replication_error(self, rows: Tensor) -> ValueError | None:
        """This rank's error if the ranks multiply different ``(k, D)`` blocks (``rows``: the
        block's transpose).

        All-reduces a copy of the block and compares the sum with ``world_size`` times this
        rank's block: ``‖Σ_s x_s − W x_r‖ = W ‖mean − x_r‖``. If any two ranks' blocks differ
        by ``Δ``, some rank is at least ``‖Δ‖ / 2`` from the mean, so every difference larger
        than twice the tolerance is found, deterministically (a checksum such as each
        column's sum and absolute sum misses unit vectors ``e_rank`` and permutations). The
        tolerance ``ROUNDING · eps · W · ‖x_r‖`` allows copies that differ by rounding and
        the rounding of the sum itself (at most ``(W − 1) eps`` of the entries' magnitude
        summed, per entry). The error shows on the ranks away from the mean: the caller
        agrees on it, so that every rank raises.
        """
        total = self.all_reduce_(rows.clone())
        # In the block's dtype: W x_r is exact (a power of two) or one rounding, far below
        # the tolerance; the norms accumulate in float64.
        gap = float(torch.linalg.vector_norm(total.sub_(rows, alpha=self.world_size), dtype=torch.float64))
        tolerance = (
            self.ROUNDING
            * float(torch.finfo(rows.dtype).eps)
            * self.world_size
            * float(torch.linalg.vector_norm(rows, dtype=torch.float64))
        )
        if gap <= tolerance:
            return None
        return ValueError(
            "under DistributedDataParallel every rank must multiply the same vectors, but this "
            f"rank's differ from the ranks' mean by {gap / self.world_size:.3g} (rounding allows "
            f"{tolerance / self.world_size:.3g}); seed random vectors identically on all ranks "
            "(curvops' algorithms share rank 0's seed when seed=None), and do not pass "
            "rank-dependent vectors: under DDP vectors are replicated, not sharded"
        )


def _fixed_gaussians(count: int, seed: int, like: Tensor) -> Tensor:
    """``count`` standard normal numbers from ``seed``: the same on every rank (same device type)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    return torch.randn(count, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


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
    sharded: list[Any] = dtensors  # DTensors: torch's stubs type them as plain tensors
    meshes = {(p.device_mesh.ndim, tuple(p.device_mesh.mesh.flatten().tolist())) for p in sharded}
    mesh = sharded[0].device_mesh
    if len(meshes) != 1 or mesh.ndim != 1:
        raise NotImplementedError(
            "curvops supports FSDP2 on a one-dimensional device mesh (plain sharding); "
            "hybrid sharding (HSDP, 2-D meshes) is not supported"
        )
    if len(dtensors) != sum(1 for _ in model.parameters()):
        raise TypeError(
            "some parameters of the model are not sharded by fully_shard; shard the root module too"
        )
    return model, Sharded(mesh.get_group(), model)


def local_tensor(param: Tensor) -> Tensor:
    """The rank's local shard of a (possibly DTensor) parameter, as a plain tensor view."""
    return param.to_local() if _is_dtensor(param) else param  # type: ignore[attr-defined]


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor)


def shard_layout(params: Sequence[Tensor], parallel: Sharded) -> ShardLayout:
    """The ``ShardLayout`` of the selected FSDP2 parameters (one all-gather)."""
    for p in params:
        placements = p.placements  # type: ignore[attr-defined]
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
