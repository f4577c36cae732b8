"""KFAC build and inverse cost, curvops vs curvlinops 3.0.1, each in its own subprocess.

For each model and Fisher type, every implementation runs in a fresh subprocess (so the
peak memory is its own, as in ``bench_matvec.py``, whose problem-building pattern this
follows) and reports:

- ``build``: median wall time of constructing the operator with its Kronecker factors
  (curvops computes them in the constructor; curvlinops on ``compute_kronecker_factors()``);
- ``inverse setup``: time of ``inverse(δ)`` plus its first product (curvlinops computes its
  factor eigendecompositions lazily in the first product), exact damping for both;
- ``inverse apply``: median time of one further product with a vector;
- ``peak extra``: ru_maxrss growth during the build, and during inverse setup + products.

``--baseline TREE`` instead compares two source trees of curvops (``TREE`` and
``--candidate``, default this checkout) on one model and Fisher type: every round runs
each tree in a fresh subprocess, alternating which goes first, and times the factor
collection (one build, ``check_deterministic=False``) and one product ``K @ v``
(median of 5); the report gives the medians over the rounds and the ratio
candidate / baseline.

Run: ``python benchmarks/bench_kfac.py [--threads 2] [--repeats 3] [--out FILE.md]``, or
``python benchmarks/bench_kfac.py --baseline /path/to/old/tree --threads 1 --rounds 5 --models mlp``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _report import emit_report  # benchmarks/ is on sys.path when a script runs
from torch import nn

MODELS = ("mlp", "cnn")
FISHER_TYPES = ("mc", "type-2")
IMPLS = ("curvops", "curvlinops")
DAMPING = 1e-3


def build(model_name: str) -> tuple[nn.Module, nn.Module, list]:
    """The benchmark problem: (model, loss, 4 batches), float32, fixed seed."""
    torch.manual_seed(0)
    if model_name == "mlp":  # 3.7M parameters, factors up to 2048 x 2048
        model = nn.Sequential(
            nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        data = [(torch.randn(512, 784), torch.randint(0, 10, (512,))) for _ in range(4)]
    elif model_name == "cnn":  # 1.6M parameters, factors up to 2305 x 2305
        model = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(256, 512, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(512, 10),
        )
        data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(4)]
    else:
        raise ValueError(model_name)
    return model.eval(), nn.CrossEntropyLoss(), data


def make(
    impl: str, fisher_type: str, model: nn.Module, loss: nn.Module, data: list
) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """Return (build the operator, build its inverse) callables for one implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if impl == "curvops":
        from curvops.operators.kfac import KFACOperator

        def make_kfac() -> KFACOperator:
            return KFACOperator(model, loss, data, fisher_type=fisher_type, check_deterministic=False)

        def make_kfac_inverse(op: KFACOperator) -> Any:
            return op.inverse(DAMPING)

        return make_kfac, make_kfac_inverse
    import curvlinops

    def make_op() -> Any:
        # joint weight/bias blocks like curvops' default; factors computed here, not lazily
        op = curvlinops.KFACLinearOperator(
            model,
            loss,
            params,
            data,
            fisher_type=fisher_type,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        return op

    def make_inv(op: Any) -> Any:
        return curvlinops.KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True)

    return make_op, make_inv


def measure(model_name: str, impl: str, fisher_type: str, repeats: int, threads: int) -> dict:
    """Times and peak memory of one implementation, in this process."""
    torch.set_num_threads(threads)
    model, loss, data = build(model_name)
    make_op, make_inv = make(impl, fisher_type, model, loss, data)
    dim = sum(p.numel() for p in model.parameters())
    v = torch.randn(dim)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    build_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op = make_op()
        build_times.append(time.perf_counter() - start)
        if len(build_times) < repeats:
            del op
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    inv = make_inv(op)
    first = inv @ v
    setup = time.perf_counter() - start
    apply_times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        out = inv @ v
        apply_times.append(time.perf_counter() - start)
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all()
    assert torch.allclose(out, first)
    return {
        "dim": dim,
        "build": statistics.median(build_times),
        "setup": setup,
        "apply": statistics.median(apply_times),
        "build_mib": max(rss1 - rss0, 0) / 1024,
        "inverse_mib": max(rss2 - rss1, 0) / 1024,
        "out_norm": float(out.norm()),
    }


def measure_build_and_product(model_name: str, fisher_type: str, threads: int) -> dict:
    """One factor collection and the median of 5 products ``K @ v`` of curvops' KFAC, in this process.

    Times are CPU seconds of this process with one thread, wall seconds otherwise.

    Each comes with a drift-free unit timed in the same process, alternating with it, so that
    the load of a shared machine cancels in the ratio: for the build, one loss gradient over
    the data (``model`` forward and backward); for the product, the bare matrix products
    ``G M A`` of every block with the same factors.
    """
    torch.set_num_threads(threads)
    # CPU time of this process: on a shared machine the wall time also counts the waits for
    # a core; with one thread the CPU time is the work done.
    clock = time.process_time if threads == 1 else time.perf_counter
    model, loss, data = build(model_name)
    make_op, _ = make("curvops", fisher_type, model, loss, data)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        for x, y in data:
            torch.autograd.grad(loss(model(x), y), params)

    gradient()
    start = clock()
    gradient()
    gradient_time = clock() - start
    start = clock()
    op = make_op()
    build_time = clock() - start
    start = clock()
    gradient()
    gradient_time = (gradient_time + clock() - start) / 2
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    bare = [(b.G, torch.randn(b.G.shape[0], b.A.shape[0]), b.A) for b in op.blocks]
    op @ v  # first product: allocator warm-up
    product_times, ratios = [], []
    for _ in range(5):
        start = clock()
        out = op @ v
        product_times.append(clock() - start)
        start = clock()
        for G, M, A in bare:
            G @ M @ A
        ratios.append(product_times[-1] / (clock() - start))
    return {
        "build": build_time,
        "build_per_gradient": build_time / gradient_time,
        "product": statistics.median(product_times),
        "product_per_bare": statistics.median(ratios),
        "out_norm": float(out.norm()),
    }


def compare_trees(args: argparse.Namespace) -> list[str]:
    """Interleaved A/B of factor collection and one product between two source trees."""
    trees = {"baseline": os.path.abspath(args.baseline), "candidate": os.path.abspath(args.candidate)}
    lines = [
        f"# KFAC factor collection and product, A/B of two trees ({datetime.date.today()})",
        "",
        f"baseline `{trees['baseline']}`, candidate `{trees['candidate']}`; {args.rounds} rounds, "
        f"each tree in a fresh process per round (alternating order), {args.threads} torch thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; 1-min load average at start "
        f"{os.getloadavg()[0]:.1f}. build = one KFACOperator construction; product = median of 5 `K @ v`.",
        "",
    ]
    for model_name in args.models:
        for fisher_type in args.fisher_types:
            samples: dict[str, list[dict]] = {name: [] for name in trees}
            for round_index in range(args.rounds):
                order = list(trees) if round_index % 2 == 0 else list(reversed(list(trees)))
                for name in order:
                    code = (
                        f"import sys; sys.path.insert(0, {trees[name]!r}); "
                        f"sys.path.insert(1, {os.path.dirname(os.path.abspath(__file__))!r}); "
                        "import json, bench_kfac; "
                        f"print(json.dumps(bench_kfac.measure_build_and_product({model_name!r}, "
                        f"{fisher_type!r}, {args.threads})))"
                    )
                    env = dict(os.environ, PYTHONPATH=trees[name])
                    proc = subprocess.run(
                        [sys.executable, "-c", code], capture_output=True, text=True, env=env
                    )
                    if proc.returncode != 0:
                        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
                    samples[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(model_name, fisher_type, name, samples[name][-1], flush=True)
            keys = ("build", "build_per_gradient", "product", "product_per_bare")
            medians = {
                name: {key: statistics.median(r[key] for r in runs) for key in keys}
                for name, runs in samples.items()
            }
            lines += [
                f"## {model_name}, fisher_type={fisher_type}",
                "",
                "| tree | build | build / gradient | product | product / bare G M A |",
                "|---|---|---|---|---|",
            ]
            for name in samples:
                m = medians[name]
                lines.append(
                    f"| {name} | {m['build']:.3f} s | {m['build_per_gradient']:.2f} | "
                    f"{1e3 * m['product']:.1f} ms | {m['product_per_bare']:.3f} |"
                )
            ratio = {key: medians["candidate"][key] / medians["baseline"][key] for key in keys}
            agree = max(
                abs(a["out_norm"] - b["out_norm"]) / b["out_norm"]
                for a, b in zip(samples["candidate"], samples["baseline"])
            )
            lines += [
                "",
                "Medians over the rounds. candidate / baseline (< 1: candidate faster): "
                f"build {ratio['build']:.3f} (per gradient {ratio['build_per_gradient']:.3f}), "
                f"product {ratio['product']:.3f} (per bare G M A {ratio['product_per_bare']:.3f}); "
                f"‖K v‖ agree to {agree:.1e} relative.",
                "",
                "Per round (build s, build/gradient, product ms, product/bare):",
                "",
            ]
            for name, runs in samples.items():
                lines.append(
                    f"- {name}: "
                    + "; ".join(
                        f"{r['build']:.2f}, {r['build_per_gradient']:.2f}, {1e3 * r['product']:.0f}, "
                        f"{r['product_per_bare']:.3f}"
                        for r in runs
                    )
                )
            lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--fisher-types", nargs="*", default=list(FISHER_TYPES))
    parser.add_argument("--note", default="", help="a remark for the results file (e.g. machine load)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "IMPL", "FISHER"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default=None, help="A/B mode: the source tree to compare against")
    parser.add_argument(
        "--candidate",
        default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        help="A/B mode: the source tree under test (default: this checkout)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="A/B mode: rounds of one process per tree")
    args = parser.parse_args()
    if args.baseline:
        emit_report(compare_trees(args), args.out)
        return
    if args.one:
        model_name, impl, fisher_type = args.one
        print(json.dumps(measure(model_name, impl, fisher_type, args.repeats, args.threads)))
        return

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# KFAC build and inverse cost, curvops vs curvlinops 3.0.1 ({datetime.date.today()})",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs visible, {args.threads} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}; 1-min load average at start "
        f"{load:.1f}. float32, CE loss, 4 batches, joint weight/bias blocks, exact damping δ = {DAMPING:g}. "
        f"Each implementation in its own process; build = median of {args.repeats}, apply = median "
        f"of {max(args.repeats, 5)}. `setup` = inverse construction + first product (curvlinops "
        "decomposes lazily there). Memory = ru_maxrss growth (build; inverse setup + products).",
    ]
    if args.note:
        lines += ["", args.note]
    lines.append("")
    for model_name in args.models:
        for fisher_type in args.fisher_types:
            results: dict[str, dict | None] = {}
            for impl in IMPLS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    model_name,
                    impl,
                    fisher_type,
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    results[impl] = None
                    print(
                        f"{model_name}/{impl}/{fisher_type} failed:\n{proc.stderr[-2000:]}", file=sys.stderr
                    )
                    continue
                results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(model_name, fisher_type, impl, results[impl], flush=True)
            dim = next((r["dim"] for r in results.values() if r), 0)
            lines += [
                f"## {model_name}, fisher_type={fisher_type} (D = {dim:,})",
                "",
                "| impl | build | build peak extra | inverse setup | inverse apply | inverse peak extra |",
                "|---|---|---|---|---|---|",
            ]
            for impl, r in results.items():
                if r is None:
                    lines.append(f"| {impl} | failed | | | | |")
                    continue
                lines.append(
                    f"| {impl} | {r['build']:.2f} s | {r['build_mib']:.0f} MiB | {r['setup']:.2f} s | "
                    f"{1e3 * r['apply']:.1f} ms | {r['inverse_mib']:.0f} MiB |"
                )
            ours, theirs = results.get("curvops"), results.get("curvlinops")
            if ours and theirs:
                lines += [
                    "",
                    f"curvlinops / curvops: build {theirs['build'] / ours['build']:.2f}x, "
                    f"inverse setup {theirs['setup'] / ours['setup']:.2f}x, "
                    f"inverse apply {theirs['apply'] / ours['apply']:.2f}x (> 1: curvops faster)",
                ]
                if fisher_type != "mc":
                    rel = abs(ours["out_norm"] - theirs["out_norm"]) / theirs["out_norm"]
                    lines.append(f"‖K⁻¹v‖ agree to {rel:.1e} relative (same problem, same v).")
            lines.append("")
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
