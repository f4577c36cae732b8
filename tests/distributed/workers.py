"""Worker processes of the distributed tests (spawned by ``test_distributed.py``).

Each worker joins a gloo process group, builds the single-process reference from an
unwrapped copy of the model on the *global* data, wraps the model (FSDP2 or DDP), runs
the same computation on its shard of the data, and writes what it measured to
``<out>/<scenario>-rank<r>.json``; the tests assert on those numbers. Errors that a
scenario expects are recorded as ``{"error": type, "message": ...}``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import curvops

WORLD_SIZE = 2
NUM_BATCHES = 4


def make_model() -> nn.Module:
    """An MLP whose layers do not split evenly over 2 ranks (7 and 3 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def make_data(regression: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (6, 4, 5, 3):  # unequal batch sizes: the global mean must still be exact
        x = torch.randn(size, 5, generator=generator, dtype=torch.float64)
        y = (
            torch.randn(size, 3, generator=generator, dtype=torch.float64)
            if regression
            else torch.randint(0, 3, (size,), generator=generator)
        )
        batches.append((x, y))
    return batches


def rank_batches(data: list, rank: int, counts: tuple[int, ...] | None = None) -> list:
    """Round-robin shard of ``data`` (or the first ``counts[rank]`` after the previous ranks')."""
    if counts is None:
        return data[rank::WORLD_SIZE]
    start = sum(counts[:rank])
    return data[start : start + counts[rank]]


def wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit CPU mesh: by default FSDP2 moves the model to CUDA where there is one.
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in model.children():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        sharded = fully_shard(model, mesh=mesh)
        assert isinstance(sharded, nn.Module)  # fully_shard returns the module itself
        return sharded
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def local_rows(operator: Any, full: torch.Tensor) -> torch.Tensor:
    """The rows of a full-length reference vector (or block) that this rank holds."""
    if operator.sharding is None:
        return full
    return torch.cat([full[a:b] for a, b in operator.sharding.ranges])


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Global relative error ‖ours − ref‖ / ‖ref‖.

    The squared norms are summed over the ranks: that assembles sharded (FSDP) vectors and
    scales both norms of replicated (DDP) vectors alike, so the ratio is right in both cases.
    """
    parts = torch.tensor(
        [float((ours - reference).square().sum()), float(reference.square().sum())], dtype=torch.float64
    )
    dist.all_reduce(parts)
    return float((parts[0] / parts[1]).sqrt())


def alignment(left: torch.Tensor, right: torch.Tensor) -> float:
    """Smallest |cos| between matching columns (summed over ranks as in :func:`relative_error`)."""
    parts = torch.stack([(left * right).sum(0), left.square().sum(0), right.square().sum(0)])
    dist.all_reduce(parts)
    return float((parts[0].abs() / (parts[1] * parts[2]).sqrt()).min())


def record(error: BaseException) -> dict[str, str | None]:
    return {"error": type(error).__name__, "message": str(error)}


# ------------------------------------------------------------------ scenarios
def products_and_algorithms(kind: str) -> dict[str, Any]:
    """Hessian/GGN/Fisher products, lanczos, traces and density vs the single-process run."""
    rank = dist.get_rank()
    data = make_data()
    loss_fn = nn.CrossEntropyLoss()
    plain = make_model()
    wrapped = wrap(copy.deepcopy(plain), kind)
    mine = rank_batches(data, rank)
    method = "finite_difference" if kind == "fsdp" else "autograd"
    results: dict[str, Any] = {}

    reference_h = curvops.HessianOperator(plain, loss_fn, data)
    hessian = curvops.HessianOperator(wrapped, loss_fn, mine, method=method)
    results["dim"] = [hessian.shape[0], reference_h.shape[0]]
    results["local_dim"] = hessian._vector_rows()
    results["uneven"] = [list(r) for r in hessian.sharding.ranges] if hessian.sharding else None

    generator = torch.Generator().manual_seed(3)
    full = torch.randn(reference_h.shape[0], 2, generator=generator, dtype=torch.float64)
    X = local_rows(hessian, full)
    params_before = [curvops.operators._parallel.local_tensor(p).detach().clone() for p in hessian.params]
    grads_marker = [torch.full_like(p, 7.0) for p in hessian.model.parameters()]
    for p, g in zip(hessian.model.parameters(), grads_marker):
        p.grad = g
    results["hessian_product"] = relative_error(hessian @ X, local_rows(hessian, reference_h @ full))
    results["hessian_vector"] = relative_error(
        hessian @ X[:, 0], local_rows(hessian, reference_h @ full[:, 0])
    )
    # Into rows of a larger buffer (as Lanczos' basis): a column-major (D, 2) ``out``.
    # NCCL all-reduces only contiguous tensors (gloo takes any): record what is reduced.
    buffer = torch.full((4, X.shape[0]), float("nan"), dtype=torch.float64)
    reduced: list[bool] = []
    parallel = hessian.parallel
    assert parallel is not None  # a DDP or FSDP model
    original_reduce = parallel.all_reduce_

    def reduce_spy(tensor: torch.Tensor) -> torch.Tensor:
        reduced.append(tensor.is_contiguous())
        return original_reduce(tensor)

    parallel.all_reduce_ = reduce_spy  # type: ignore[method-assign]  # a spy on this one object
    try:
        into = hessian.matmat_torch(X, out=buffer[1:3].T)
    finally:
        del parallel.all_reduce_
    results["into_reduces_contiguous"] = all(reduced)
    results["hessian_product_into"] = relative_error(into, local_rows(hessian, reference_h @ full))
    results["params_restored"] = all(
        torch.equal(a, curvops.operators._parallel.local_tensor(p).detach())
        for a, p in zip(params_before, hessian.params)
    )
    results["grads_preserved"] = all(p.grad is g for p, g in zip(hessian.model.parameters(), grads_marker))
    for p in hessian.model.parameters():
        p.grad = None

    subset = curvops.HessianOperator(wrapped, loss_fn, mine, method=method, params="2.*")
    subset_reference = curvops.HessianOperator(plain, loss_fn, data, params="2.*")
    small = full[: subset_reference.shape[0]]
    results["parameter_subset"] = relative_error(
        subset @ local_rows(subset, small), local_rows(subset, subset_reference @ small)
    )
    results["parameter_subset_dim"] = [subset.shape[0], subset._vector_rows()]

    loss, grad = hessian.loss_and_gradient()
    ref_loss, ref_grad = reference_h.loss_and_gradient()
    results["loss"] = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    results["gradient"] = relative_error(grad, local_rows(hessian, ref_grad))

    for name, build in {
        "ggn": lambda m, d: curvops.GGNOperator(m, loss_fn, d),
        "fisher_empirical": lambda m, d: curvops.FisherOperator(m, loss_fn, d, kind="empirical"),
    }.items():
        ours, reference = build(wrapped, mine), build(plain, data)
        results[name] = relative_error(ours @ X, local_rows(ours, reference @ full))

    # Algorithms: the same seeds on the sharded and on the single-process operator.
    top = curvops.lanczos(hessian, k=3, seed=0, tol=1e-9)
    top_reference = curvops.lanczos(reference_h, k=3, seed=0, tol=1e-9)
    dense = np.linalg.eigvalsh(reference_h.to_dense().numpy())
    results["lanczos"] = top.eigenvalues.tolist()
    results["lanczos_reference"] = top_reference.eigenvalues.tolist()
    results["eigh_top3"] = sorted(dense)[::-1][:3]  # lanczos default: largest algebraic
    vectors = top.eigenvectors
    results["eigenvector_shape"] = list(vectors.shape)
    results["eigenvector_residual"] = relative_error(
        hessian @ vectors, vectors * top.eigenvalues
    )  # ‖Hv − λv‖ / ‖λv‖ over all ranks
    ref_vectors = local_rows(hessian, top_reference.eigenvectors)
    results["eigenvector_alignment"] = alignment(vectors, ref_vectors)

    for name, call in {
        "hutchinson": lambda A: curvops.hutchinson_trace(A, budget=12, seed=5).estimate,
        "hutchpp": lambda A: curvops.hutchpp_trace(A, budget=12, seed=5).estimate,
        "xtrace": lambda A: curvops.xtrace(A, budget=12, seed=5).estimate,
        "trace_exact": lambda A: curvops.hutchinson_trace(A, budget=10_000, seed=5).estimate,
    }.items():
        results[name] = [float(call(hessian)), float(call(reference_h))]
    results["trace_dense"] = float(np.trace(reference_h.to_dense().numpy()))

    diagonal = curvops.hutchinson_diagonal(hessian, budget=8, seed=2).estimate
    diagonal_reference = curvops.hutchinson_diagonal(reference_h, budget=8, seed=2).estimate
    results["diagonal"] = relative_error(diagonal, local_rows(hessian, diagonal_reference))
    xdiag = curvops.xdiag(hessian, budget=8, seed=2).estimate  # TSQR on the shards
    results["xdiag"] = relative_error(
        xdiag, local_rows(hessian, curvops.xdiag(reference_h, budget=8, seed=2).estimate)
    )
    power = curvops.power_iteration(hessian, k=1, seed=1, tol=1e-6, max_iter=500)
    power_reference = curvops.power_iteration(reference_h, k=1, seed=1, tol=1e-6, max_iter=500)
    results["power_iteration"] = [float(power.eigenvalues[0]), float(power_reference.eigenvalues[0])]
    # The Monte-Carlo Fisher draws labels per rank (different streams than one process):
    # check only that it is a finite symmetric positive semi-definite operator.
    fisher = curvops.FisherOperator(wrapped, loss_fn, mine, kind="mc", seed=0)
    FX = fisher @ X
    quadratic = torch.stack([(X * FX).sum(0), (X * (fisher @ X.flip(1))).sum(0)])
    dist.all_reduce(quadratic)
    results["fisher_mc"] = {
        "finite": bool(torch.isfinite(FX).all()),
        "quadratic_form": quadratic[0].tolist(),
        "symmetry_gap": abs(float(quadratic[1, 0] - quadratic[1, 1])) / float(quadratic[0].abs().max()),
    }

    density = curvops.spectral_density(hessian, num_probes=3, lanczos_steps=12, seed=4)
    density_reference = curvops.spectral_density(reference_h, num_probes=3, lanczos_steps=12, seed=4)
    results["density_nodes"] = float(
        np.abs(np.asarray(density.nodes) - np.asarray(density_reference.nodes)).max()
    )
    results["density_weights"] = float(
        np.abs(np.asarray(density.weights) - np.asarray(density_reference.weights)).max()
    )

    if kind == "ddp":
        kfac, kfac_reference = (
            curvops.KFACOperator(wrapped, loss_fn, mine),
            curvops.KFACOperator(plain, loss_fn, data),
        )
        results["kfac"] = relative_error(kfac @ X, kfac_reference @ full)
        # Solvers run replicated on every rank; each product is all-reduced.
        ggn, ggn_reference = (
            curvops.GGNOperator(wrapped, loss_fn, mine),
            curvops.GGNOperator(plain, loss_fn, data),
        )
        solve = curvops.inverse(ggn, 0.1, "cg", rtol=1e-10) @ X
        results["cg"] = relative_error(solve, curvops.inverse(ggn_reference, 0.1, "cg", rtol=1e-10) @ full)
        # Uneven batch counts (3 and 1) are fine under DDP: products are summed per rank.
        uneven = curvops.HessianOperator(wrapped, loss_fn, rank_batches(data, rank, (3, 1)))
        results["uneven_batches"] = relative_error(uneven @ X, reference_h @ full)
    else:
        results["fsdp_autograd"] = _expect(lambda: curvops.HessianOperator(wrapped, loss_fn, mine))
        results["fsdp_kfac"] = _expect(lambda: curvops.KFACOperator(wrapped, loss_fn, mine))
        results["fsdp_numpy"] = _expect(lambda: hessian @ X.numpy())
        results["uneven_batches"] = _expect(
            lambda: curvops.HessianOperator(wrapped, loss_fn, rank_batches(data, rank, (3, 1)), method=method)
        )
    return results


def bad_input(kind: str) -> dict[str, Any]:
    """Errors found on one rank only: every rank must raise them, none may hang."""
    rank = dist.get_rank()
    data = make_data()
    loss_fn = nn.CrossEntropyLoss()
    wrapped = wrap(make_model(), kind)
    method = "finite_difference" if kind == "fsdp" else "autograd"
    hessian = curvops.HessianOperator(wrapped, loss_fn, rank_batches(data, rank), method=method)
    rows = hessian._vector_rows()
    results: dict[str, Any] = {}
    vector = torch.ones(rows, dtype=torch.float64)
    if rank == 1:
        vector[0] = float("nan")
    results["nan_vector"] = _expect(lambda: hessian @ vector)
    wrong = torch.ones(rows + (rank == 1), dtype=torch.float64)
    results["wrong_shape"] = _expect(lambda: hessian @ wrong)
    poisoned = [(x.clone(), y) for x, y in rank_batches(data, rank)]
    if rank == 1:
        poisoned[1][0][0, 0] = float("nan")
    nan_operator = curvops.HessianOperator(
        wrapped, loss_fn, poisoned, method=method, check_deterministic=False
    )
    results["nan_data"] = _expect(lambda: nan_operator @ torch.ones(rows, dtype=torch.float64))
    empty = [] if rank == 1 else rank_batches(data, rank)
    results["empty_rank"] = _expect(
        lambda: curvops.HessianOperator(wrapped, loss_fn, empty, method=method).shape
    )
    results["still_works"] = float((hessian @ torch.ones(rows, dtype=torch.float64)).sum())
    if kind == "ddp":
        generator = torch.Generator().manual_seed(rank)  # a different vector per rank
        results["unreplicated"] = _expect(
            lambda: hessian @ torch.randn(rows, generator=generator, dtype=torch.float64)
        )
        dropout = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).double()
        results["dropout"] = _expect(
            lambda: curvops.HessianOperator(wrap(dropout, kind), loss_fn, rank_batches(data, rank))
        )
    return results


class _RaisesOnRankOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == 1 and x.shape[0] == 4:  # rank 1's second batch only
            raise RuntimeError("boom on rank 1")
        return x


def crash(kind: str) -> dict[str, Any]:
    """Rank 1's model raises in the middle of a product: the job must fail, not hang."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), _RaisesOnRankOne(), nn.Tanh(), nn.Linear(7, 3)).double()
    method = "finite_difference" if kind == "fsdp" else "autograd"
    hessian = curvops.HessianOperator(
        wrap(model, kind), nn.CrossEntropyLoss(), rank_batches(make_data(), rank), method=method
    )
    hessian @ torch.ones(hessian._vector_rows(), dtype=torch.float64)
    return {"finished": True}


class Tripwire(nn.Module):
    """An identity layer that runs ``action`` on its ``countdown``-th forward call once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.countdown: int | None = None
        self.action: Callable[[], None] = lambda: None

    def arm(self, countdown: int, action: Callable[[], None]) -> None:
        self.countdown, self.action = countdown, action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = None
                self.action()
        return x


def _boom() -> None:
    raise RuntimeError(f"boom on rank {dist.get_rank()}")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _timed(call: Callable[[], Any]) -> dict[str, Any]:
    """:func:`_expect` with the seconds the call took (how long the rank waited for the others)."""
    started = time.monotonic()
    outcome: dict[str, Any] = _expect(call)
    outcome["seconds"] = time.monotonic() - started
    return outcome


def _summed_over_ranks(tensor: torch.Tensor) -> float:
    """The sum of ``tensor``'s entries over all ranks: the same number on every rank."""
    total = tensor.sum().reshape(1)
    dist.all_reduce(total)
    return float(total)


def _save(scenario: str, kind: str, results: dict[str, Any]) -> None:
    with open(os.path.join(_OUT[0], f"{scenario}-{kind}-rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(results, handle, default=float)


#: Where the running scenario writes (fault scenarios save before they break the group).
_OUT = [""]


class _SavedResults(dict):
    """A scenario's results, saved after every entry: a rank that dies or hangs later still
    leaves what it measured so far (and the tests show which step failed)."""

    def __init__(self, scenario: str, kind: str) -> None:
        super().__init__()
        self.scenario, self.kind = scenario, kind

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        _save(self.scenario, self.kind, self)


#: Forward calls after which rank 1's tripwire fires: a few products into a Lanczos run (a DDP
#: product runs 2 forward passes on rank 1's 2 batches, a finite-difference FSDP product 4).
TRIP_AFTER = {"ddp": 7, "fsdp": 11}


def faults(kind: str) -> dict[str, Any]:
    """Ranks that pass different vectors, seeds, calls or parameters; then a rank that fails mid-Lanczos.

    Everything up to the failure must raise the same clear error on every rank and leave the
    group usable. Then rank 1's forward raises in the middle of a Lanczos run; the user's
    handler catches the error and reaches a barrier. Under DDP the error is agreed on (every
    rank raises it, the barrier and later products work) and then rank 1 is killed in the
    middle of a second run: rank 0 must name it. Under FSDP the other ranks wait in FSDP's
    collectives when rank 1 fails: rank 1 raises at once, its barrier fails after the broken
    group's short timeout and its process ends, upon which rank 0 raises naming rank 1.
    """
    rank = dist.get_rank()
    data = make_data()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    tripwire = Tripwire()
    model = nn.Sequential(nn.Linear(5, 7), tripwire, nn.Tanh(), nn.Linear(7, 3)).double()
    wrapped = wrap(model, kind)
    method = "finite_difference" if kind == "fsdp" else "autograd"
    mine = rank_batches(data, rank)
    hessian = curvops.HessianOperator(wrapped, loss_fn, mine, method=method)
    rows = hessian._vector_rows()
    vector = torch.randn(rows, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = _SavedResults("faults", kind)
    if kind == "ddp":
        unit = torch.zeros(rows, dtype=torch.float64)
        unit[rank] = 1.0
        results["unit_vector_per_rank"] = _expect(lambda: hessian @ unit)
        results["permuted"] = _expect(lambda: hessian @ (vector.flip(0) if rank == 1 else vector))
        columns = torch.stack([vector, vector.roll(1)], 1)
        results["columns_swapped"] = _expect(lambda: hessian @ (columns.flip(1) if rank == 1 else columns))
        # The same vector computed in another order on each rank: rounding, not a difference.
        rounded = (vector + 0.1) - 0.1 if rank == 1 else vector
        results["rounding_differs"] = not torch.equal(rounded, vector)
        results["rounding_accepted"] = _expect(lambda: hessian @ rounded)
    results["block_width"] = _expect(lambda: hessian @ torch.ones(rows, 1 + rank, dtype=torch.float64))
    results["seed_none"] = [
        curvops.lanczos(hessian, k=2).eigenvalues.tolist(),
        float(curvops.hutchinson_trace(hessian, budget=6).estimate),
        curvops.spectral_density(hessian, num_probes=2, lanczos_steps=4).nodes.tolist(),
    ]
    results["algorithms"] = _expect(
        lambda: (
            curvops.lanczos(hessian, k=3, seed=0) if rank == 0 else curvops.xtrace(hessian, budget=6, seed=0)
        )
    )
    results["k"] = _expect(lambda: curvops.lanczos(hessian, k=2 + rank, seed=0))
    results["seeds"] = _expect(lambda: curvops.hutchinson_trace(hessian, budget=4, seed=rank))
    results["params"] = _expect(
        lambda: curvops.HessianOperator(
            wrapped, loss_fn, mine, method=method, params="3.*" if rank == 0 else None
        )
    )
    results["params_none_match"] = _expect(
        lambda: curvops.HessianOperator(
            wrapped, loss_fn, mine, method=method, params="9.*" if rank == 1 else None
        )
    )
    if kind == "ddp":  # rank 1's forward raises outside a product: agreed on too
        if rank == 1:
            tripwire.arm(1, _boom)
        results["raise_in_construction"] = _expect(
            lambda: curvops.HessianOperator(wrapped, loss_fn, mine, method=method)
        )
        if rank == 1:
            tripwire.arm(1, _boom)
        results["raise_in_gradient"] = _expect(hessian.loss_and_gradient)
    results["still_works"] = _summed_over_ranks(hessian @ vector)

    if rank == 1:
        tripwire.arm(TRIP_AFTER[kind], _boom)
    results["raise_mid_lanczos"] = _timed(lambda: curvops.lanczos(hessian, k=2, seed=0))
    if kind == "fsdp" and rank == 0:  # released only when rank 1's process ends
        return results
    results["barrier"] = _timed(dist.barrier)
    if kind == "fsdp":
        return results
    results["works_after_raise"] = _summed_over_ranks(hessian @ vector)
    if rank == 1:
        tripwire.arm(TRIP_AFTER[kind], _killed)
    results["killed_mid_lanczos"] = _timed(lambda: curvops.lanczos(hessian, k=2, seed=0))
    return results


def killed(kind: str) -> dict[str, Any]:
    """Rank 1 is killed in the middle of a Lanczos run: rank 0 must stop and name it."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    tripwire = Tripwire()
    model = nn.Sequential(nn.Linear(5, 7), tripwire, nn.Tanh(), nn.Linear(7, 3)).double()
    method = "finite_difference" if kind == "fsdp" else "autograd"
    hessian = curvops.HessianOperator(
        wrap(model, kind), nn.CrossEntropyLoss(), rank_batches(make_data(), rank), method=method
    )
    results = _SavedResults("killed", kind)
    results["rank"] = rank
    if rank == 1:
        tripwire.arm(TRIP_AFTER[kind], _killed)
    results["killed_mid_lanczos"] = _timed(lambda: curvops.lanczos(hessian, k=2, seed=0))
    return results


def _expect(call: Callable[[], Any]) -> dict[str, str | None]:
    try:
        call()
    except Exception as error:
        return record(error)
    return {"error": None, "message": ""}


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "products_and_algorithms": products_and_algorithms,
    "bad_input": bad_input,
    "crash": crash,
    "faults": faults,
    "killed": killed,
}

#: Scenarios that leave the process group broken: they save their own results and the
#: process ends without the final barrier.
BREAKS_THE_GROUP = {"faults", "killed"}


def run(rank: int, scenario: str, kind: str, out: str, port: int) -> None:
    """Entry point of one spawned process."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    _OUT[0] = out
    if scenario in BREAKS_THE_GROUP:
        try:
            SCENARIOS[scenario](kind)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    try:
        results = SCENARIOS[scenario](kind)
        with open(os.path.join(out, f"{scenario}-{kind}-rank{rank}.json"), "w") as handle:
            json.dump(results, handle, default=float)
        dist.barrier()  # no rank tears the group down while another still talks to it
    except Exception:
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's teardown. A rank of the DDP bad-input
    # scenario was seen to abort there now and then ("terminate called without an active
    # exception", SIGABRT: a C++ thread object destroyed at exit), failing a finished job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
