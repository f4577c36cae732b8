"""On CUDA: Hessian single-vector products by reverse over forward vs double backward (MLP, CNN).

Run on a GPU machine: ``python benchmarks/probe_reverse_over_forward.py``; prints time, cost in
gradients and peak extra memory of each product (results: ``benchmarks/results/reverse_over_forward_*``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from operator import matmul

import torch
from torch import nn

import curvops
from curvops.operators.strategy import HessianVectorMethod

torch.manual_seed(0)
dev = torch.device("cuda")


def mlp() -> tuple[nn.Module, list]:
    m = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    return m, [(torch.randn(4096, 784), torch.randint(0, 10, (4096,))) for _ in range(4)]


def cnn() -> tuple[nn.Module, list]:
    m = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 10),
    )
    return m, [(torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))) for _ in range(4)]


def probe(name: str, make: Callable[[], tuple[nn.Module, list]]) -> None:
    model, data = make()
    model = model.to(dev).eval()
    data = [(x.to(dev), y.to(dev)) for x, y in data]
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    ops: dict[str, curvops.HessianOperator | curvops.GGNOperator] = {}
    methods: tuple[tuple[str, HessianVectorMethod], ...] = (
        ("rof", "reverse_over_forward"),
        ("db", "double_backward"),
    )
    for label, method in methods:
        ops[label] = curvops.HessianOperator(
            model, loss, data, strategy=curvops.ProductStrategy(hessian_vector=method)
        )
    ops["ggn"] = curvops.GGNOperator(model, loss, data)
    v = torch.randn(ops["rof"].shape[0], device=dev)

    def grad():
        for x, y in data:
            torch.autograd.grad(loss(model(x), y), params)

    runs: dict[str, Callable[[], object]] = {
        "gradient": grad,
        **{k: partial(matmul, op, v) for k, op in ops.items()},
    }
    ref = ops["db"] @ v
    got = ops["rof"] @ v
    print(
        name,
        "rof vs db rel diff",
        float((got - ref).norm() / ref.norm()),
        "path",
        ops["rof"].single_vector_method,
    )
    T: dict[str, list[float]] = {k: [] for k in runs}
    M: dict[str, float] = {}
    for k, f in runs.items():
        f()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        f()
        torch.cuda.synchronize()
        M[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(10):
        for k, f in runs.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            torch.cuda.synchronize()
            T[k].append(time.perf_counter() - t)
    g = statistics.median(T["gradient"])
    for k in runs:
        print(
            f"  {name} {k:9s} {1e3 * statistics.median(T[k]):8.2f} ms "
            f"{statistics.median(T[k]) / g:5.2f} gradients  peak extra {M[k]:8.1f} MiB"
        )


for name, make in (("mlp", mlp), ("cnn", cnn)):
    probe(name, make)
