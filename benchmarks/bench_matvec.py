"""Cost of one curvature matvec, side by side with the peers, in units of one gradient.

For each model, every method runs in a fresh subprocess (so peak memory is its own) and
times ``--repeats`` pairs of (one gradient, one product) back to back after a warm-up; the
cost of the method is the median over all pairs of all ``--rounds`` rounds of the ratio
product / gradient (methods in a rotated order each round). On the shared 2-core machine
the speed drifts by tens of percent over minutes: a ratio of two separately timed medians
once put curvops' Hessian (the same double backward as the plain loop) at 1.44x the plain
loop's time, while adjacent pairs cancel the drift. Peak memory: the resident memory added
by one product (max RSS after it minus before it, in MiB).

Methods: one gradient (the unit); a plain double-backward loop
(``autograd.grad(g, params, v)`` per batch); curvops Hessian (autograd: reverse over
forward for single vectors, the CPU default, and ``_db`` forced double backward; finite
differences), GGN, and (D, 8) blocks of both (cost per vector); curvlinops 3.0.1
``HessianLinearOperator`` / ``GGNLinearOperator``; hessian-eigenthings 1.0.0a5
``HessianOperator`` / ``GGNOperator``.

Run: ``python benchmarks/bench_matvec.py [--threads 2] [--repeats 5] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from _report import emit_report  # benchmarks/ is on sys.path when a script runs
from torch import nn

MODELS = ("mlp", "cnn")
METHODS = (
    "gradient",
    "plain_double_backward",
    "curvops_hessian",
    "curvops_hessian_db",
    "curvops_hessian_fd",
    "curvops_ggn",
    "curvops_hessian_block8",
    "curvops_ggn_block8",
    "curvlinops_hessian",
    "curvlinops_ggn",
    "eigenthings_hessian",
    "eigenthings_ggn",
)


def build(model_name: str) -> tuple[nn.Module, nn.Module, list]:
    """The benchmark problem: (model, loss, 4 batches), float32, fixed seed."""
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        data = [(torch.randn(512, 784), torch.randint(0, 10, (512,))) for _ in range(4)]
    elif model_name == "cnn":
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
    else:
        raise ValueError(model_name)
    return model.eval(), nn.CrossEntropyLoss(), data


def make_product(method: str, model: nn.Module, loss: nn.Module, data: list):
    """Return (callable doing one product, number of vectors it multiplies)."""
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim)
    block = torch.randn(dim, 8)
    if method == "gradient":

        def run():
            for x, y in data:
                torch.autograd.grad(loss(model(x), y), params)

        return run, 1
    if method == "plain_double_backward":
        vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

        def run():
            out = [torch.zeros_like(p) for p in params]
            for x, y in data:
                g = torch.autograd.grad(loss(model(x), y) / len(data), params, create_graph=True)
                for o, h in zip(out, torch.autograd.grad(g, params, vs)):
                    o.add_(h)
            return out

        return run, 1
    if method.startswith("curvops"):
        import curvops

        if "hessian" in method:
            # "_db": single vectors by double backward instead of reverse over forward.
            strategy = curvops.ProductStrategy(
                hessian_vector="double_backward" if method.endswith("_db") else "auto"
            )
            op = curvops.HessianOperator(
                model,
                loss,
                data,
                strategy=strategy,
                method="finite_difference" if method.endswith("_fd") else "autograd",
            )
        else:
            op = curvops.GGNOperator(model, loss, data)
        if method.endswith("block8"):
            return (lambda: op @ block), 8
        return (lambda: op @ v), 1
    if method.startswith("curvlinops"):
        import curvlinops

        cls = curvlinops.HessianLinearOperator if method.endswith("hessian") else curvlinops.GGNLinearOperator
        op = cls(model, loss, params, data, check_deterministic=False)
        return (lambda: op @ v), 1
    if method.startswith("eigenthings"):
        import hessian_eigenthings as he

        if method.endswith("hessian"):
            op = he.HessianOperator(model, data, he.supervised_loss(loss))
        else:
            op = he.GGNOperator(model, data, he.supervised_forward, he.supervised_loss_of_output(loss))
        return (lambda: op.matvec(v)), 1
    raise ValueError(method)


def measure(model_name: str, method: str, repeats: int, threads: int) -> dict:
    """Time, cost in gradients and peak memory of one method, in this process.

    The cost is the median over ``repeats`` pairs of (product time / gradient time), the two
    timed back to back: the speed of the shared machine drifts by tens of percent over
    minutes, and a ratio of adjacent timings cancels the drift that a ratio of two separate
    medians keeps.
    """
    torch.set_num_threads(threads)
    model, loss, data = build(model_name)
    gradient, _ = make_product("gradient", model, loss, data)
    run, nvec = make_product(method, model, loss, data)
    gradient()
    run()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, ratios = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gradient()
        middle = time.perf_counter()
        run()
        end = time.perf_counter()
        times.append((end - middle) / nvec)
        ratios.append((end - middle) / nvec / (middle - start))
    return {
        "per_vector": statistics.median(times),
        "cost": statistics.median(ratios),
        "ratios": ratios,
        "peak_extra_mib": max(after - before, 0) / 1024,
        "dim": sum(p.numel() for p in model.parameters()),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.repeats, args.threads)))
        return

    lines = [
        f"# Curvature matvec cost, in gradients ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}. float32, CE loss, 4 batches; "
        f"each method in its own process, {args.repeats} (gradient, product) pairs timed back to back "
        f"after a warm-up, {args.rounds} rounds (methods in rotated order). "
        "`cost` = median over all pairs of (time of one product / time of the gradient before it), "
        "over the same batches (blocks: per vector); `time per vector` = median product time, "
        "which drifts with the machine's speed; `peak extra` = max RSS growth during a product.",
        "",
    ]
    for model_name in args.models:
        runs: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
        for round_index in range(args.rounds):
            shift = round_index % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    model_name,
                    method,
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{model_name}/{method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                measured = json.loads(proc.stdout.strip().splitlines()[-1])
                print(model_name, round_index, method, f"{measured['cost']:.3f}", flush=True)
                runs[method].append(measured)
        results: dict[str, dict[str, Any] | None] = {}  # None: every run of the method failed
        for method, measured in runs.items():
            if measured:
                ratios = [r for m in measured for r in m["ratios"]]
                results[method] = {
                    "cost": statistics.median(ratios),
                    "spread": (_quantile(ratios, 0.25), _quantile(ratios, 0.75)),
                    "per_vector": statistics.median(m["per_vector"] for m in measured),
                    "peak_extra_mib": max(m["peak_extra_mib"] for m in measured),
                    "dim": measured[0]["dim"],
                }
            else:
                results[method] = None
        dim = next(r["dim"] for r in results.values() if r)
        lines += [
            f"## {model_name} (D = {dim:,})",
            "",
            "| method | time per vector | cost (gradients) | middle half of the ratios | peak extra |",
            "|---|---|---|---|---|",
        ]
        for method, r in results.items():
            if r is None:
                lines.append(f"| {method} | failed | | | |")
                continue
            lines.append(
                f"| {method} | {1e3 * r['per_vector']:.1f} ms | {r['cost']:.2f} | "
                f"{r['spread'][0]:.2f}–{r['spread'][1]:.2f} | {r['peak_extra_mib']:.0f} MiB |"
            )
        lines.append("")
        for single, block in (
            ("curvops_hessian", "curvops_hessian_block8"),
            ("curvops_hessian_db", "curvops_hessian_block8"),
            ("curvops_ggn", "curvops_ggn_block8"),
        ):
            if (single_run := results.get(single)) and (block_run := results.get(block)):
                lines.append(
                    f"(D, 8) block vs 8 single products ({single}): "
                    f"{single_run['cost'] / block_run['cost']:.2f}x cheaper per vector."
                )
        for ours, peers in (
            ("curvops_hessian", ("curvlinops_hessian", "eigenthings_hessian", "plain_double_backward")),
            ("curvops_ggn", ("curvlinops_ggn", "eigenthings_ggn")),
        ):
            for peer in peers:
                if (peer_run := results.get(peer)) and (our_run := results.get(ours)):
                    lines.append(f"{peer} / {ours} cost: {peer_run['cost'] / our_run['cost']:.2f}x")
        lines.append("")
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
