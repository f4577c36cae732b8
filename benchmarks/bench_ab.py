"""A/B of curvature products and Lanczos between two source trees of curvops.

Every (tree, case) pair runs in a fresh subprocess with the tree first on ``sys.path``, so
two versions of the library are compared on the same machine in one sitting; rounds
alternate the trees (A B, then B A, ...) so that drifts of a shared machine hit both alike.
Only the public API is used, so any two commits that share it can be compared.

Cases (``--cases``; default: all of the device's):

* ``{mlp,cnn}-{hessian,ggn}-{1,8}``: one product with a ``(D, k)`` block, the problems of
  ``benchmarks/bench_matvec.py`` (MLP 784-256-256-10 on 4 x 512 inputs, small CNN on
  4 x 128 images of 3 x 32 x 32; float32, cross-entropy). Reported per product, with the
  ratio to one gradient timed in the same subprocess (drift-free unit).
* ``lanczos-mlp``: top 10 eigenpairs of the MLP's Hessian (float64, ``tol=1e-6``, seed 0);
  the overhead per Lanczos step, ``(wall - time inside the operator) / steps``, as a
  fraction of the mean product time, and the number of products.
* ``lanczos-goe``: top 10 eigenpairs of a 3000 x 3000 GOE matrix (a torch tensor, float64):
  the eigensolver's own cost dominates.
* ``slq-goe``: ``spectral_density`` of the same matrix, 16 probes x 60 steps.
* ``gpt2-{ggn,ggn_fused_head,hessian,hessian_fd}`` (CUDA only): GPT-2 small from a config
  (eager attention, random init, eval mode), 4 batches of 2 x 1024 tokens, one product per
  call; peak extra memory in GiB.

Run: ``python benchmarks/bench_ab.py --baseline /path/to/old/tree [--candidate .]
[--rounds 5] [--device cpu] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

CPU_CASES = [f"{m}-{c}-{k}" for m in ("mlp", "cnn") for c in ("hessian", "ggn") for k in (1, 8)] + [
    "lanczos-mlp",
    "lanczos-goe",
    "slq-goe",
]
GPU_CASES = ["gpt2-ggn", "gpt2-ggn_fused_head", "gpt2-hessian", "gpt2-hessian_fd"]


# ------------------------------------------------------------------ child side
def _problem(name: str, dtype: Any) -> tuple[Any, Any, list]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        data = [(torch.randn(512, 784), torch.randint(0, 10, (512,))) for _ in range(4)]
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        data = [(torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))) for _ in range(4)]
    model = model.to(dtype).eval()
    data = [(x.to(dtype), y) for x, y in data]
    return model, nn.CrossEntropyLoss(), data


#: The clock of the timings: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of
#: the process, which a shared machine's other jobs do not inflate); set by ``child``.
CLOCK = time.perf_counter


def _timed(fn: Any, repeats: int, sync: Any) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - start)
    return times


class _TimedOperator:
    """Any-operator protocol of curvops.algorithms around a curvops operator, timing its products."""

    def __init__(self, op: Any) -> None:
        self.op, self.shape, self.device, self.torch_dtype = op, op.shape, op.device, op.torch_dtype
        self.inside, self.calls, self.columns = 0.0, 0, 0

    def matmat_torch(self, X: Any, out: Any = None) -> Any:
        start = CLOCK()
        result = self.op.matmat_torch(X, out=out)
        self.inside += CLOCK() - start
        self.calls += 1
        self.columns += X.shape[1]
        return result


def _goe(dim: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    G = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (G + G.T) / (2 * dim) ** 0.5


def child(case: str, repeats: int, device: str, clock: str = "wall") -> dict[str, Any]:
    """Run one case in this process and return its timings (seconds) and extras."""
    global CLOCK
    import torch

    import curvops

    CLOCK = time.process_time if clock == "cpu" else time.perf_counter

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kind = case.split("-")
    result: dict[str, Any] = {"curvops": os.path.dirname(curvops.__file__)}
    if kind[0] in ("mlp", "cnn"):
        model, loss, data = _problem(kind[0], torch.float32)
        op_class = curvops.HessianOperator if kind[1] == "hessian" else curvops.GGNOperator
        op = op_class(model, loss, data, check_deterministic=False)
        X = torch.randn(op.shape[0], int(kind[2]), generator=torch.Generator().manual_seed(1))
        gradient = _timed(op.loss_and_gradient, repeats, sync)
        product = _timed(lambda: op.matmat_torch(X), repeats, sync)
        result.update(seconds=product, gradient=gradient, ratio=[p / g for p, g in zip(product, gradient)])
    elif case == "lanczos-mlp":
        model, loss, data = _problem("mlp", torch.float64)
        timed = _TimedOperator(curvops.HessianOperator(model, loss, data, check_deterministic=False))
        walls, overheads = [], []
        for _ in range(max(1, repeats // 2)):
            timed.inside, timed.calls, timed.columns = 0.0, 0, 0
            start = CLOCK()
            res = curvops.lanczos(timed, k=10, tol=1e-6, seed=0)
            wall = CLOCK() - start
            walls.append(wall)
            per_product = timed.inside / timed.columns
            overheads.append((wall - timed.inside) / timed.columns / per_product)
        result.update(
            seconds=walls,
            overhead=overheads,
            products=timed.columns,
            converged=bool(res.converged.all()) if hasattr(res.converged, "all") else res.converged,
        )
    elif case == "lanczos-goe":
        A = _goe(3000)
        result.update(seconds=_timed(lambda: curvops.lanczos(A, k=10, tol=1e-6, seed=0), repeats, sync))
    elif case == "slq-goe":
        A = _goe(3000)
        result.update(
            seconds=_timed(
                lambda: curvops.spectral_density(A, num_probes=16, lanczos_steps=60, seed=0), repeats, sync
            )
        )
    elif kind[0] == "gpt2":
        result.update(_gpt2(kind[1], repeats))
    else:
        raise ValueError(f"unknown case {case!r}")
    return result


def _gpt2(method: str, repeats: int) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import curvops
    from curvops.lm import CausalLMLoss, causal_lm_data

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=12,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        # Taken by the config's **kwargs at run time; its dataclass signature does not list it.
        attn_implementation="eager",  # type: ignore[call-arg]
    )
    # As an nn.Module: transformers' decorated PreTrainedModel.cuda does not type-check.
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.cuda().eval()
    batches = [{"input_ids": torch.randint(0, 50257, (2, 1024), device="cuda")} for _ in range(4)]
    data = causal_lm_data(batches)
    kw: dict[str, Any] = {"check_deterministic": False}
    if method == "ggn":
        op = curvops.GGNOperator(model, CausalLMLoss(), data, **kw)
    elif method == "ggn_fused_head":
        op = curvops.GGNOperator(model, CausalLMLoss(), data, fused_head=True, **kw)
    elif method == "hessian":
        op = curvops.HessianOperator(model, CausalLMLoss(), data, **kw)
    else:
        op = curvops.HessianOperator(model, CausalLMLoss(), data, method="finite_difference", **kw)
    v = torch.randn(op.shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 1e-3
    sync = torch.cuda.synchronize
    gradient = _timed(op.loss_and_gradient, repeats, sync)
    op @ v
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    product = _timed(lambda: op @ v, repeats, sync)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    return {
        "seconds": product,
        "gradient": gradient,
        "ratio": [p / g for p, g in zip(product, gradient)],
        "peak_gib": peak,
        "device_name": torch.cuda.get_device_name(),
    }


# ----------------------------------------------------------------- parent side
def run_child(tree: str, case: str, repeats: int, device: str, threads: int, clock: str) -> dict[str, Any]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=os.path.abspath(tree),
    )
    code = (
        f"import sys, json, torch; torch.set_num_threads({threads}); "
        f"sys.path.insert(0, {os.path.abspath(tree)!r}); "
        f"sys.path.insert(1, {os.path.dirname(os.path.abspath(__file__))!r}); "
        f"import bench_ab; "
        f"print('RESULT' + json.dumps(bench_ab.child({case!r}, {repeats}, {device!r}, {clock!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.path.abspath(tree)
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[len("RESULT") :])


def summarise(values: list[dict[str, Any]], key: str) -> float | None:
    """Median over rounds of each subprocess's median ``key``."""
    samples = [statistics.median(v[key]) for v in values if key in v]
    return statistics.median(samples) if samples else None


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """Median over rounds of B's median / A's median within the same round (drift cancels)."""
    ratios = [
        statistics.median(y[key]) / statistics.median(x[key]) for x, y in zip(a, b) if key in x and key in y
    ]
    return statistics.median(ratios) if ratios else None


def best_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """B's fastest sample over A's fastest sample (interference only ever adds time)."""
    fa = [t for x in a if key in x for t in x[key]]
    fb = [t for y in b if key in y for t in y[key]]
    return min(fb) / min(fa) if fa and fb else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="source tree A (the directory holding curvops/)")
    parser.add_argument(
        "--candidate",
        default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        help="source tree B (default: this repository)",
    )
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--clock",
        default=None,
        choices=["wall", "cpu"],
        help="wall time, or CPU time of the process (default: cpu on the CPU, wall on CUDA)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    cases = args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    trees = {"A": args.baseline, "B": args.candidate}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"A": [], "B": []} for c in cases}
    for round_index in range(args.rounds):
        order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
        for case in cases:
            for label in order:
                res = run_child(trees[label], case, args.repeats, args.device, args.threads, clock)
                results[case][label].append(res)
                if "error" in res:
                    print(f"{case} {label}: {res['error']}", file=sys.stderr)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    lines = [
        "# A/B: curvature products and Lanczos, two source trees",
        "",
        f"`python benchmarks/bench_ab.py --rounds {args.rounds} --repeats {args.repeats} "
        f"--threads {args.threads} --device {args.device} --clock {clock}`; machine: {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} cores), Python {platform.python_version()}.",
        f"A = `{os.path.abspath(args.baseline)}`, B = `{os.path.abspath(args.candidate)}`.",
        "A, B: median over rounds of the median of a fresh subprocess's repeats (ms). "
        "B/A paired: median over rounds of the ratio within a round; B/A best: ratio of the fastest "
        "samples; grads: product time / gradient time in the same subprocess. B/A < 1: B is faster.",
        "",
        "| case | A (ms) | B (ms) | B/A paired | B/A best | A (grads) | B (grads) | B/A grads paired "
        "| extra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        a, b = results[case]["A"], results[case]["B"]
        ta, tb = summarise(a, "seconds"), summarise(b, "seconds")
        ra, rb = summarise(a, "ratio"), summarise(b, "ratio")
        extra = ""
        if case == "lanczos-mlp":
            oa, ob = summarise(a, "overhead"), summarise(b, "overhead")
            pa = [v.get("products") for v in a]
            pb = [v.get("products") for v in b]
            extra = (
                f"overhead/product A {oa:.4f} B {ob:.4f}; products A {pa[0]} B {pb[0]}" if oa and ob else ""
            )
        if case.startswith("gpt2"):
            ma = [v["peak_gib"] for v in a if "peak_gib" in v]
            mb = [v["peak_gib"] for v in b if "peak_gib" in v]
            extra = f"peak GiB A {max(ma):.2f} B {max(mb):.2f}" if ma and mb else ""
            name = next((v.get("device_name") for v in a + b if "device_name" in v), None)
            if name:
                extra += f" ({name})"

        def fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
            return "-" if x is None else f"{x * scale:.{digits}f}"

        paired, best = paired_ratio(a, b, "seconds"), best_ratio(a, b, "seconds")
        grads_paired = paired_ratio(a, b, "ratio")
        lines.append(
            f"| {case} | {fmt(ta, 1e3)} | {fmt(tb, 1e3)} | {fmt(paired, digits=3)} | {fmt(best, digits=3)} | "
            f"{fmt(ra, digits=2)} | {fmt(rb, digits=2)} | {fmt(grads_paired, digits=3)} | {extra} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
