"""Hessian-vector products of small MLPs: torch's default intra-op threads against one thread.

The question (docs/troubleshooting.md, "Slow products on a small CPU machine"): how much do
torch's default CPU threads cost on the small models that curvops' examples and tests use,
on the machine at hand? Two tanh MLPs with cross-entropy, float32: the built-in example's
shape (64-32-32-10, D = 3,466, 1,437 samples in batches of 256) and the benchmarks' small MLP
(64-128-128-10, D = 26,122, 1,024 samples in batches of 128). Each round times ``--inner``
products with one thread and then with torch's default (``torch.get_num_threads()`` at
start-up, or ``--threads``), in one process; reported are the median times and the median of
the per-round ratios, which compares adjacent timings and so cancels a shared machine's drift.

    python benchmarks/probe_threads.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from curvops import HessianOperator

PROBLEMS = (((64, 32, 32, 10), 1437, 256), ((64, 128, 128, 10), 1024, 128))


def _operator(widths: tuple[int, ...], samples: int, batch_size: int) -> HessianOperator:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    x, y = torch.randn(samples, widths[0]), torch.randint(0, widths[-1], (samples,))
    data = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, samples, batch_size)]
    return HessianOperator(model, nn.CrossEntropyLoss(), data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3, help="products per timed sample")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the default to compare")
    args = parser.parse_args()
    many = args.threads
    for widths, samples, batch_size in PROBLEMS:
        H = _operator(widths, samples, batch_size)
        v = torch.randn(H.shape[0])
        times: dict[int, list[float]] = {1: [], many: []}
        for threads in times:  # warm-up: one-off set-up of each thread count
            torch.set_num_threads(threads)
            H @ v
        for _ in range(args.rounds):
            for threads in (1, many):
                torch.set_num_threads(threads)
                start = time.perf_counter()
                for _ in range(args.inner):
                    H @ v
                times[threads].append((time.perf_counter() - start) / args.inner)
        ratio = statistics.median(b / a for a, b in zip(times[1], times[many]))
        print(
            f"MLP {'-'.join(map(str, widths))} (D = {H.shape[0]:,}): "
            f"1 thread {statistics.median(times[1]) * 1e3:.1f} ms, "
            f"{many} threads {statistics.median(times[many]) * 1e3:.1f} ms per product; "
            f"ratio {ratio:.1f} (median of {args.rounds} rounds)",
            flush=True,
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
