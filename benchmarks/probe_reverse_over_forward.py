"""Hessian single-vector products by reverse over forward vs double backward: time and memory.

Models: an MLP and a CNN (``--models mlp cnn``), and a Hugging Face GPT-2 built from a config
(``--models gpt2``; sizes by flags, eager or sdpa attention) through :mod:`curvops.lm`, as a
user builds it. Prints, per model, the relative difference of the two products, the path the
reverse-over-forward operator took, and for each product its median time, its cost in
gradients (one gradient over the same batches) and its peak memory.

Memory: the peak during one product minus the memory in use before it, for the first product
(which includes the one-time plain-forward check of each batch's graph) and a later one: on
CUDA from torch's allocator statistics, on the CPU (where torch keeps none) from glibc's
``mallinfo2`` read after every aten operation.

GPU (the lead's run, GPT-2 small as in docs/benchmarks.md)::

    python benchmarks/probe_reverse_over_forward.py --models gpt2 mlp cnn

CPU check of the script (small sizes, one thread)::

    python benchmarks/probe_reverse_over_forward.py --small --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from functools import partial
from operator import matmul
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import curvops
from curvops.lm import CausalLMLoss, causal_lm_operator
from curvops.operators.strategy import HessianVectorMethod

METHODS: tuple[tuple[str, HessianVectorMethod], ...] = (
    ("rof", "reverse_over_forward"),
    ("db", "double_backward"),
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "mlp", "cnn"], choices=["gpt2", "mlp", "cnn"])
    parser.add_argument("--small", action="store_true", help="CPU sizes: a quick run of every path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, help="timed rounds, methods interleaved (10; --small: 3)")
    parser.add_argument("--layers", type=int, help="GPT-2 layers (12, GPT-2 small; --small: 4)")
    parser.add_argument("--width", type=int, help="GPT-2 n_embd (768; --small: 256)")
    parser.add_argument("--heads", type=int, help="GPT-2 heads (12; --small: 4)")
    parser.add_argument("--vocab", type=int, help="GPT-2 vocabulary (50257; --small: 8192)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (1024; --small: 128)")
    parser.add_argument("--batch", type=int, help="sequences per batch (2; --small: 4)")
    parser.add_argument("--batches", type=int, help="batches (4; --small: 2)")
    parser.add_argument("--attention", default="eager", choices=["eager", "sdpa"])
    args = parser.parse_args()
    # GPT-2 small on 4 batches of 2 x 1024 tokens; --small: a quick CPU run of every path.
    names = ("rounds", "layers", "width", "heads", "vocab", "seq", "batch", "batches")
    values = (3, 4, 256, 4, 8192, 128, 4, 2) if args.small else (10, 12, 768, 12, 50257, 1024, 2, 4)
    defaults = dict(zip(names, values))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def mlp(small: bool) -> tuple[nn.Module, list]:
    width, n = (256, 512) if small else (2048, 4096)
    m = nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    return m, [(torch.randn(n, 784), torch.randint(0, 10, (n,))) for _ in range(4)]


def cnn(small: bool) -> tuple[nn.Module, list]:
    n = 64 if small else 512
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
    return m, [(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))) for _ in range(4)]


def gpt2(args: argparse.Namespace) -> tuple[nn.Module, list]:
    import transformers

    options: dict[str, Any] = {
        "n_layer": args.layers,
        "n_embd": args.width,
        "n_head": args.heads,
        "vocab_size": args.vocab,
        "n_positions": args.seq,
        "attn_implementation": args.attention,
        "use_cache": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    config = transformers.GPT2Config(**options)
    model = transformers.GPT2LMHeadModel(config)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq)) for _ in range(args.batches)]
    return model, batches


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
            *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
        )
    ]


class _CPUPeak(TorchDispatchMode):
    """Peak of the bytes glibc's malloc has handed out (heap and mmap), read after every aten
    operation (forward and backward) while active: torch keeps no CPU peak statistics."""

    def __init__(self) -> None:
        super().__init__()
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo2 = libc.mallinfo2
        self.base = self.peak = self._used()

    def _used(self) -> int:
        info = self._mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._used())
        return result


def peak_extra_mib(run: Callable[[], object], cuda: bool) -> float:
    """Peak memory during ``run()`` minus the memory in use before it, MiB."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _CPUPeak() as meter:
        run()
    return (meter.peak - meter.base) / 2**20


def probe(name: str, model: nn.Module, data: list, lm: bool, args: argparse.Namespace) -> None:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = model.to(dev, dtype).eval()
    params = list(model.parameters())
    if lm:
        data = [ids.to(dev) for ids in data]
        loss = CausalLMLoss()

        def operators(batches: list) -> dict[str, Any]:
            return {
                label: causal_lm_operator(
                    "hessian", model, batches, strategy=curvops.ProductStrategy(hessian_vector=method)
                )
                for label, method in METHODS
            }

        def grad() -> None:
            for ids in data:
                torch.autograd.grad(loss(model(input_ids=ids).logits, ids), params)

    else:
        data = [(x.to(dev, dtype), y.to(dev)) for x, y in data]
        ce = nn.CrossEntropyLoss()

        def operators(batches: list) -> dict[str, Any]:
            return {
                label: curvops.HessianOperator(
                    model, ce, batches, strategy=curvops.ProductStrategy(hessian_vector=method)
                )
                for label, method in METHODS
            }

        def grad() -> None:
            for x, y in data:
                torch.autograd.grad(ce(model(x), y), params)

    ops = operators(data)
    v = torch.randn(ops["rof"].shape[0], device=dev, dtype=dtype)
    cuda = dev.type == "cuda"
    runs: dict[str, Callable[[], object]] = {"gradient": grad}
    runs.update({label: partial(matmul, op, v) for label, op in ops.items()})

    # Peak of the first call (the operators' one-time checks included) and of a later one.
    memory = {label: [peak_extra_mib(run, cuda) for _ in range(2)] for label, run in runs.items()}
    ref = ops["db"] @ v
    got = ops["rof"] @ v
    difference = float((got - ref).norm() / ref.norm())
    path = ops["rof"].single_vector_method
    refused = ops["rof"]._unverified_operation  # why reverse over forward was given up, if it was
    print(
        f"{name}: rof vs db relative difference {difference:.2e}, path {path}"
        + (f" ({refused})" if refused else "")
    )
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):  # interleaved: the machine's drift hits every method alike
        for label, run in runs.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    gradient = statistics.median(times["gradient"])
    heading = "peak extra MiB, first / later call" + ("" if cuda else " (glibc malloc, read per operation)")
    print(f"  {'product':9s} {'median ms':>10s} {'gradients':>10s}  {heading}")
    for label in runs:
        median = statistics.median(times[label])
        first, later = memory[label]
        print(f"  {label:9s} {1e3 * median:10.2f} {median / gradient:10.2f}  {first:9.1f} / {later:9.1f}")


def main() -> None:
    args = _arguments()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", {args.dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds"
    )
    for name in args.models:
        if name == "gpt2":
            model, data = gpt2(args)
            label = (
                f"gpt2 L={args.layers} d={args.width} V={args.vocab} {args.batches} x {args.batch} x "
                f"{args.seq} {args.attention}"
            )
            probe(label, model, data, True, args)
        else:
            model, data = (mlp if name == "mlp" else cnn)(args.small)
            probe(name, model, data, False, args)


if __name__ == "__main__":
    main()
