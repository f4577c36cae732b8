"""Cost of one curvature matvec, side by side with the peers, in units of one gradient.

For each model, every method runs in a fresh subprocess (so peak memory is its own):
the median wall time of ``--repeats`` products after one warm-up, divided by the same for
one gradient over the same batches, and the peak resident memory added by the product (max
RSS during the products minus max RSS before them, in MiB). The whole list of methods runs
``--rounds`` times, in a rotated order each round, and each method keeps its fastest round:
on a shared 2-core machine the speed drifts by tens of percent over minutes, and a single
round once put curvops' Hessian (the same double backward as the plain loop) at 1.44x the
plain loop's time.

Methods: one gradient (the unit); a plain double-backward loop
(``autograd.grad(g, params, v)`` per batch); curvops Hessian (autograd and finite
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

import torch
from torch import nn

from _report import emit_report  # benchmarks/ is on sys.path when a script runs

MODELS = ("mlp", "cnn")
METHODS = (
    "gradient", "plain_double_backward",
    "curvops_hessian", "curvops_hessian_fd", "curvops_ggn",
    "curvops_hessian_block8", "curvops_ggn_block8",
    "curvlinops_hessian", "curvlinops_ggn",
    "eigenthings_hessian", "eigenthings_ggn",
)


def build(model_name: str) -> tuple[nn.Module, nn.Module, list]:
    """The benchmark problem: (model, loss, 4 batches), float32, fixed seed."""
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        data = [(torch.randn(512, 784), torch.randint(0, 10, (512,))) for _ in range(4)]
    elif model_name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
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
            op = curvops.HessianOperator(model, loss, data, method="finite_difference" if method.endswith("_fd") else "autograd")
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
    """Time and peak memory of one method, in this process."""
    torch.set_num_threads(threads)
    model, loss, data = build(model_name)
    run, nvec = make_product(method, model, loss, data)
    run()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"time": statistics.median(times), "per_vector": statistics.median(times) / nvec,
            "peak_extra_mib": max(after - before, 0) / 1024, "dim": sum(p.numel() for p in model.parameters())}


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
        f"median of {args.repeats} after a warm-up, each method in its own process; the fastest of "
        f"{args.rounds} rounds (methods in rotated order). "
        "`cost` = time of one product / time of one gradient over the same batches "
        "(blocks: per vector). `peak extra` = max RSS growth during the products.",
        "",
    ]
    for model_name in args.models:
        results = {method: None for method in args.methods}
        for round_index in range(args.rounds):
            shift = round_index % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                cmd = [sys.executable, __file__, "--one", model_name, method, "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{model_name}/{method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                measured = json.loads(proc.stdout.strip().splitlines()[-1])
                print(model_name, round_index, method, measured, flush=True)
                if results[method] is None or measured["time"] < results[method]["time"]:
                    results[method] = measured
        unit = results["gradient"]["time"]
        dim = results["gradient"]["dim"]
        lines += [f"## {model_name} (D = {dim:,})", "", "| method | time per vector | cost (gradients) | peak extra |",
                  "|---|---|---|---|"]
        for method, r in results.items():
            if r is None:
                lines.append(f"| {method} | failed | | |")
                continue
            lines.append(f"| {method} | {1e3 * r['per_vector']:.1f} ms | {r['per_vector'] / unit:.2f} | "
                         f"{r['peak_extra_mib']:.0f} MiB |")
        ours = results.get("curvops_hessian"), results.get("curvops_hessian_block8")
        if all(ours):
            lines.append("")
            lines.append(f"(D, 8) Hessian block vs 8 single products: {ours[0]['per_vector'] / ours[1]['per_vector']:.2f}x cheaper per vector.")
        ours = results.get("curvops_ggn"), results.get("curvops_ggn_block8")
        if all(ours):
            lines.append(f"(D, 8) GGN block vs 8 single products: {ours[0]['per_vector'] / ours[1]['per_vector']:.2f}x cheaper per vector.")
        for peer in ("curvlinops_hessian", "eigenthings_hessian", "plain_double_backward"):
            if results.get(peer) and results.get("curvops_hessian"):
                lines.append(f"{peer} / curvops_hessian time: {results[peer]['per_vector'] / results['curvops_hessian']['per_vector']:.2f}x")
        for peer in ("curvlinops_ggn", "eigenthings_ggn"):
            if results.get(peer) and results.get("curvops_ggn"):
                lines.append(f"{peer} / curvops_ggn time: {results[peer]['per_vector'] / results['curvops_ggn']['per_vector']:.2f}x")
        lines.append("")
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
