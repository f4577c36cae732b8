"""Matvecs and overhead of ``curvops.algorithms.lanczos`` versus ARPACK and hessian-eigenthings.

Task: the top ``k = 10`` eigenpairs (largest algebraic) to residual tolerance ``tol = 1e-6``,
on

1. a 5000 x 5000 random symmetric (GOE) matrix, ``A = (G + G^T) / sqrt(2 D)``, whose top
   eigenvalues are packed at the semicircle edge (a hard case), and
2. if ``curvops.HessianOperator`` is available, the Hessian of an MLP 784-256-256-10
   (269,322 parameters, float64, cross-entropy) over 4 batches of 512 random inputs.

Common accuracy criterion, checked on the returned pairs with explicit residuals (products not
counted): ``max_i ||A v_i - lambda_i v_i|| <= tol * ||A||``, with ``||A||`` the largest
``|Ritz value|`` (curvops' backward-error criterion).

All three start from the same vector for a given seed (``start_vector``): on the MLP Hessian the
matvec count of any one method moves by +-10 with the start vector alone (seeds 0-7: curvops
66-85 with its own random start, 65-71 with ARPACK's), so only like starts compare algorithms.

* curvops ``lanczos``: thick restart, ``max_basis_size`` default ``max(2k+1, 20) = 21``
  (ARPACK's ``ncv``). "Krylov matvecs" are those of the iteration; "+ residual block" adds the
  ``k`` products of the explicit final residuals (one ``(D, k)`` block product).
* ARPACK (``scipy.sparse.linalg.eigsh``, same ``ncv``): its criterion is per eigenvalue,
  ``||r_i|| <= tol_arpack |lambda_i|``. It is run with ``tol_arpack = tol`` and with the looser
  ``tol * ||A|| / |lambda_k|`` that matches ours; the cheaper run that meets the common
  criterion is reported.
* hessian-eigenthings 1.0.0a5 ``lanczos``: no restarts, a fixed number ``max_iter`` of steps
  (stored basis grows with it). One long ``lanczos_tridiagonal`` run (full
  reorthogonalization, the same kernel ``lanczos`` calls) gives every prefix; the reported
  count is the smallest ``max_iter`` whose Ritz pairs meet the criterion (checked explicitly).

Overhead per iteration = (wall time of ``lanczos`` - time inside the operator) / Lanczos steps,
as a fraction of the time of one matvec: "in-run" from the compared run itself; "isolated" as
the minimum over 5 replays of the same run (an untimed run records the operator's products, a
replay hands them back in order, one copy each, timed as the product: the same steps and
restarts), divided by the minimum of 5 timed matvecs of the real operator. The minima filter
out interference from other processes on a shared machine; the replay leaves out what a real
product does to the caches (the in-run column keeps it). curvops' ``lanczos`` hands the
operator a basis row to write its product into (``matmat_torch(X, out=...)``, which the curvops
operators accept), as it does with any curvops operator; ARPACK and eigenthings take fresh
products (their interfaces have no ``out``). The basis rows are first touched (page faults) by
those products, so in the first Lanczos cycle that cost lands in the products' time. With
``--device cuda`` the operator and every vector live on the GPU (ARPACK's vectors cross to the
host per product) and the timers synchronize around each product. The last two columns are
the peers' own overhead, measured the same way: ARPACK's per matvec (its ``eigsh`` call; the
numpy <-> torch conversions at the operator boundary count as its overhead, free on a CPU), and
eigenthings' per step from a run of exactly the steps it needs.

Run: ``python benchmarks/bench_lanczos.py [--threads 2] [--seeds 3] [--hessian-seeds 2]
[--skip-hessian] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import time
import warnings
from typing import Protocol

import numpy as np
import scipy
import scipy.sparse.linalg as sla
import torch

from curvops.algorithms import lanczos

K = 10
TOL = 1e-6
#: Where operators and vectors live (``--device``); ARPACK's vectors cross to the host per product.
DEVICE = torch.device("cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class BlockProduct(Protocol):
    """``block -> A @ block``, written into ``out`` when one is given."""

    def __call__(self, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


class TimedOperator:
    """Torch-native operator protocol around a block function, timing every product."""

    def __init__(
        self,
        apply_block: BlockProduct,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.shape = (dim, dim)
        self.torch_dtype = dtype
        self.device = device
        self._apply_block = apply_block
        self.seconds = 0.0
        self.columns = 0

    def matmat_torch(self, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        synchronize()  # on a GPU: the product's time only, not queued work of the caller
        start = time.perf_counter()
        result = self._apply_block(block, out=out)
        synchronize()
        self.seconds += time.perf_counter() - start
        self.columns += block.shape[1]
        return result


def explicit_residual(apply_block, vectors: torch.Tensor, values: torch.Tensor) -> np.ndarray:
    return torch.linalg.vector_norm(apply_block(vectors) - vectors * values, dim=0).cpu().numpy()


def start_vector(dim: int, seed: int) -> np.ndarray:
    """The one start vector every method gets for ``seed`` (Lanczos matvec counts move by
    +-10 with the start vector alone on the MLP Hessian, so each method must see the same)."""
    return np.random.default_rng(seed).standard_normal(dim)


def run_curvops(apply_block, dim, dtype, seed):
    operator = TimedOperator(apply_block, dim, dtype, DEVICE)
    v0 = torch.as_tensor(start_vector(dim, seed), dtype=dtype, device=DEVICE)
    synchronize()
    start = time.perf_counter()
    result = lanczos(operator, k=K, which="LA", tol=TOL, v0=v0, seed=seed)
    synchronize()
    wall = time.perf_counter() - start
    steps = result.num_matvecs - K
    per_matvec = operator.seconds / operator.columns
    overhead = (wall - operator.seconds) / steps
    scale = result.spectral_norm_estimate
    return {
        "krylov": steps,
        "total": result.num_matvecs,
        "restarts": result.num_restarts,
        "residual": float(result.residual_norms.max()) / scale,
        "ok": bool(result.converged.all()),
        "overhead": overhead / per_matvec,
        "overhead_ms": overhead * 1e3,
        "matvec_ms": per_matvec * 1e3,
        "scale": scale,
        "eigenvalues": result.eigenvalues.cpu().numpy(),
    }


def run_arpack(apply_block, dim, dtype, seed, scale, kth_value):
    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    record = None
    # The looser tolerance matches our criterion; a looser tol never needs more matvecs, so the
    # strict run (tol_arpack = tol) is only made if the loose one misses the common criterion.
    for arpack_tol in (TOL * scale / abs(kth_value), TOL):
        count, seconds = [0], [0.0]

        def matvec(vector, count=count, seconds=seconds):  # this attempt's counters
            count[0] += 1
            column = torch.as_tensor(np.asarray(vector, dtype=numpy_dtype), device=DEVICE).reshape(-1, 1)
            synchronize()
            start = time.perf_counter()
            product = apply_block(column)
            synchronize()
            seconds[0] += time.perf_counter() - start
            return product[:, 0].cpu().numpy()

        operator = sla.LinearOperator((dim, dim), matvec=matvec, dtype=numpy_dtype)
        start = time.perf_counter()
        values, vectors = sla.eigsh(
            operator, k=K, which="LA", tol=arpack_tol, v0=start_vector(dim, seed), ncv=max(2 * K + 1, 20)
        )
        wall = time.perf_counter() - start
        residual = explicit_residual(
            apply_block, torch.as_tensor(vectors, device=DEVICE), torch.as_tensor(values, device=DEVICE)
        )
        record = {
            "matvecs": count[0],
            "residual": float(residual.max()) / scale,
            "tol": arpack_tol,
            "overhead_ms": (wall - seconds[0]) / count[0] * 1e3,
        }
        record["ok"] = record["residual"] <= TOL
        if record["ok"]:
            break
    return record


def run_eigenthings(apply_block, dim, dtype, seed, scale, max_steps):
    from hessian_eigenthings import LambdaOperator, lanczos_tridiagonal

    seconds = [0.0]

    def product(vector):
        synchronize()
        start = time.perf_counter()
        result = apply_block(vector.reshape(-1, 1))[:, 0]
        synchronize()
        seconds[0] += time.perf_counter() - start
        return result

    operator = LambdaOperator(product, size=dim, device=DEVICE, dtype=dtype)
    v0 = torch.as_tensor(start_vector(dim, seed), dtype=dtype, device=DEVICE)
    run = lanczos_tridiagonal(operator, v0, max_steps, reorthogonalize=True)
    alphas = run.alphas.double().cpu().numpy()
    betas = run.betas.double().cpu().numpy()
    basis = torch.stack(run.basis, 1)
    for steps in range(K, run.iterations + 1):
        tridiagonal = (
            np.diag(alphas[:steps]) + np.diag(betas[: steps - 1], 1) + np.diag(betas[: steps - 1], -1)
        )
        theta, vectors = np.linalg.eigh(tridiagonal)
        coupling = betas[steps - 1] if steps < run.iterations else float(run.last_beta)
        top = np.argsort(-theta)[:K]
        if np.max(np.abs(coupling * vectors[-1, top])) > TOL * scale:
            continue
        ritz = basis[:, :steps] @ torch.as_tensor(vectors[:, top], dtype=dtype, device=DEVICE)
        residual = explicit_residual(
            apply_block, ritz, torch.as_tensor(theta[top], dtype=dtype, device=DEVICE)
        )
        if residual.max() <= TOL * scale:
            # Its overhead per step, from a run of exactly this many steps (full
            # reorthogonalization costs more per step as the basis grows).
            seconds[0] = 0.0
            start = time.perf_counter()
            lanczos_tridiagonal(operator, v0, steps, reorthogonalize=True)
            synchronize()
            overhead = (time.perf_counter() - start - seconds[0]) / steps
            return {
                "matvecs": steps,
                "residual": float(residual.max()) / scale,
                "ok": True,
                "overhead_ms": overhead * 1e3,
            }
    return {"matvecs": run.iterations, "residual": math.nan, "ok": False, "overhead_ms": math.nan}


class Replay(TimedOperator):
    """The recorded products again, in order, each copied into ``out``: the same Lanczos run
    (its arithmetic is deterministic), with products that cost one copy."""

    def __init__(self, products: list[torch.Tensor], dim: int, dtype: torch.dtype) -> None:
        self._products = products
        self._next = 0
        super().__init__(self._recorded, dim, dtype, DEVICE)

    def _recorded(self, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        product = self._products[self._next]
        self._next += 1
        if product.shape != block.shape:
            raise RuntimeError("the replayed run departed from the recorded one")
        return product.clone() if out is None else out.copy_(product)


def isolated_overhead(apply_block, dim, dtype, seed, repeats=5):
    """Per-step overhead of lanczos and one matvec of ``apply_block``, each the minimum of repeats.

    The overhead is that of the very run being compared (same start vector, so the same steps
    and restarts): one run records the products (its times unused), and each repeat replays them (a copy
    per product, timed as the product). The matvec is timed on its own. Minima over repeats
    filter out interference from other processes.
    """
    products = []

    def recording(block, out=None):
        result = apply_block(block, out=out)
        products.append(result.clone())
        return result

    v0 = torch.as_tensor(start_vector(dim, seed), dtype=dtype, device=DEVICE)
    recorded = lanczos(
        TimedOperator(recording, dim, dtype, DEVICE), k=K, which="LA", tol=TOL, v0=v0, seed=seed
    )
    overheads = []
    for _ in range(repeats):
        operator = Replay(products, dim, dtype)
        synchronize()
        start = time.perf_counter()
        result = lanczos(operator, k=K, which="LA", tol=TOL, v0=v0, seed=seed)
        synchronize()
        wall = time.perf_counter() - start
        if result.num_matvecs != recorded.num_matvecs or operator._next != len(products):
            raise RuntimeError("the replayed run departed from the recorded one")
        overheads.append((wall - operator.seconds) / (result.num_matvecs - K))
    products.clear()  # free the recorded products before timing the matvec
    vector = torch.randn(dim, 1, dtype=dtype, device=DEVICE)
    matvecs = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        apply_block(vector)
        synchronize()
        matvecs.append(time.perf_counter() - start)
    return min(overheads), min(matvecs)


def random_problem(dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    matrix = ((gaussian + gaussian.T) / math.sqrt(2 * dim)).to(DEVICE)

    def apply_block(block, out=None):
        return torch.matmul(matrix, block, out=out)

    return apply_block, torch.float64


def hessian_problem():
    import curvops

    if not hasattr(curvops, "HessianOperator"):
        return None
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            torch.nn.Linear(784, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        .double()
        .to(DEVICE)
    )
    data = [
        (torch.randn(512, 784, dtype=torch.float64).to(DEVICE), torch.randint(0, 10, (512,)).to(DEVICE))
        for _ in range(4)
    ]
    operator = curvops.HessianOperator(model, torch.nn.CrossEntropyLoss(), data)
    return operator.matmat_torch, torch.float64, operator.shape[0]


def compare(name, apply_block, dim, dtype, seed, max_steps):
    isolated = isolated_overhead(apply_block, dim, dtype, seed)
    ours = run_curvops(apply_block, dim, dtype, seed)
    ours["isolated_overhead_ms"] = isolated[0] * 1e3
    ours["isolated_matvec_ms"] = isolated[1] * 1e3
    arpack = run_arpack(apply_block, dim, dtype, seed, ours["scale"], ours["eigenvalues"][-1])
    eigenthings = run_eigenthings(apply_block, dim, dtype, seed, ours["scale"], max_steps)
    row = {
        "problem": name,
        "dim": dim,
        "seed": seed,
        "ours": ours,
        "arpack": arpack,
        "eigenthings": eigenthings,
    }
    print(format_row(row), flush=True)
    return row


def format_row(row) -> str:
    ours, arpack, eigenthings = row["ours"], row["arpack"], row["eigenthings"]
    eig_count = f"{eigenthings['matvecs']}" + ("" if eigenthings["ok"] else " (not converged)")
    return (
        f"| {row['problem']} | {row['dim']:,} | {row['seed']} "
        f"| {ours['krylov']} (+{K} = {ours['total']}) | {ours['restarts']} | {ours['residual']:.1e} "
        f"| {arpack['matvecs']} | {arpack['residual']:.1e} "
        f"| {eig_count} | {eigenthings['residual']:.1e} "
        f"| {ours['krylov'] / arpack['matvecs']:.2f} / {ours['total'] / arpack['matvecs']:.2f} "
        f"| {ours['krylov'] / eigenthings['matvecs']:.2f} "
        f"| {ours['matvec_ms']:.1f} | {ours['overhead_ms']:.2f} | {100 * ours['overhead']:.2f}% "
        f"| {ours['isolated_matvec_ms']:.1f} | {ours['isolated_overhead_ms']:.2f} "
        f"| {100 * ours['isolated_overhead_ms'] / ours['isolated_matvec_ms']:.2f}% "
        f"| {arpack['overhead_ms']:.2f} | {eigenthings['overhead_ms']:.2f} |"
    )


HEADER = (
    "| problem | D | seed | curvops matvecs: Krylov (+ residual block = total) | restarts "
    "| curvops max residual / norm(A) | ARPACK matvecs | ARPACK max residual / norm(A) "
    "| eigenthings matvecs | eigenthings max residual / norm(A) "
    "| curvops / ARPACK (Krylov / total) | curvops / eigenthings (Krylov) "
    "| in-run: matvec ms | overhead ms / step | overhead / matvec "
    "| isolated (min of 5): matvec ms | overhead ms / step | overhead / matvec "
    "| ARPACK overhead ms / matvec | eigenthings overhead ms / step |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=5000)
    parser.add_argument("--hessian-seeds", type=int, default=2)
    parser.add_argument("--skip-hessian", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("error", RuntimeWarning)  # a non-converged curvops run must not pass silently

    load_before = os.getloadavg()
    print(HEADER)
    rows = []
    apply_block, dtype = random_problem(args.dim, 0)
    for seed in range(args.seeds):
        rows.append(compare("random symmetric (GOE)", apply_block, args.dim, dtype, seed, 600))

    hessian_note = ""
    problem = None if args.skip_hessian else hessian_problem()
    if problem is None:
        hessian_note = "curvops.HessianOperator not available (or skipped): Hessian part not run."
        print(hessian_note)
    else:
        apply_block, dtype, dim = problem
        for seed in range(args.hessian_seeds):
            rows.append(
                compare("MLP 784-256-256-10 Hessian, CE, 4x512 (float64)", apply_block, dim, dtype, seed, 150)
            )
    load_after = os.getloadavg()

    date = datetime.date.today().isoformat()
    cores = os.cpu_count()
    machine = f"{cores}-core CPU ({cpu_model()}), torch {torch.__version__}, {args.threads} torch threads"
    label = f"cpu-{cores}core"
    if DEVICE.type == "cuda":
        gpu = torch.cuda.get_device_name(DEVICE)
        machine = f"{gpu} (operators and vectors on the GPU; host: {machine})"
        label = "cuda-" + gpu.split()[-1].lower()
    lines = [
        f"# lanczos benchmark: top {K} eigenpairs (LA) at residual tol {TOL:g}",
        "",
        f"Machine: {machine}; numpy {np.__version__}, scipy {scipy.__version__}. Date: {date}.",
        "Generated by `benchmarks/bench_lanczos.py` (see its docstring for the protocol).",
        "",
        "Matvecs: operator-vector products (a (D, b) block counts b). Residuals are explicit, "
        "`max_i ||A v_i - lambda_i v_i|| / norm(A)`; target <= 1e-6.",
        "Ratios < 1 mean curvops used fewer matvecs.",
        "",
        f"Load average (1, 5, 15 min) at start {tuple(round(x, 1) for x in load_before)}, at end "
        f"{tuple(round(x, 1) for x in load_after)} on {cores} cores: in-run times include interference "
        "from other processes; the isolated columns take minima over 5 repeats to filter it.",
        "",
        HEADER,
        *[format_row(row) for row in rows],
        "",
    ]
    if hessian_note:
        lines += [hessian_note, ""]
    output = (
        pathlib.Path(args.out)
        if args.out
        else (pathlib.Path(__file__).parent / "results" / f"lanczos_{label}_{date}.md")
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
