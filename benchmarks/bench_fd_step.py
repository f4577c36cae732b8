"""Accuracy of finite-difference Hessian products against the step size, on a transformer LM.

The finite-difference path (``HessianOperator(method="finite_difference")``, the FSDP path)
trades truncation error ``O(ε²)`` against rounding error ``O(u/ε)``. This script measures
the relative error ``‖H_fd v − H v‖ / ‖H v‖`` for a range of steps ``‖εv‖`` (``fd_eps``),
in float32 and float64, against a float64 double-backward reference, for a random unit
vector and for the normalised gradient. It also prints the default step
(``HessianOperator.finite_difference_step()``).

Usage: ``python benchmarks/bench_fd_step.py [--width 512 --layers 4 ...] [--out FILE.md]``
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from datetime import date
from pathlib import Path

import torch
from _report import emit_report  # benchmarks/ is on sys.path when a script runs
from torch import nn

import curvops

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location(
        "distributed_spectrum", ROOT / "examples" / "distributed_spectrum.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument(
        "--steps", type=float, nargs="+", default=[3.0, 1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    example = load_example()
    torch.manual_seed(0)
    model64 = (
        example.TinyLM(args.vocab, args.width, args.layers, args.heads, args.context)
        .to(device, torch.float64)
        .eval()
    )
    model32 = copy.deepcopy(model64).float()
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(args.batches):
        tokens = torch.randint(0, args.vocab, (args.batch_size, args.context + 1), generator=generator)
        data.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    loss = nn.CrossEntropyLoss()
    reference = curvops.HessianOperator(model64, loss, data)
    _, gradient = reference.loss_and_gradient()
    vectors = {
        "random": torch.randn(
            reference.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64
        ).to(device),
        "gradient": gradient.clone(),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# Finite-difference Hessian products vs step ({device_name}, {date.today().isoformat()})",
        "",
        f"TinyLM width {args.width}, {args.layers} layers, vocab {args.vocab}, context {args.context}, "
        f"{args.batches} batches of {args.batch_size}; D = {reference.shape[0]:,}. "
        "Relative error of H v against float64 double backward.",
        "",
    ]
    header = (
        "| dtype | vector | " + " | ".join(f"‖εv‖={s:g}" for s in args.steps) + " | default step | autograd |"
    )
    lines += [header, "|" + "---|" * (len(args.steps) + 4)]
    for dtype, model in [(torch.float64, model64), (torch.float32, model32)]:
        for name, v64 in vectors.items():
            v64 = v64 / v64.norm()
            exact = reference @ v64
            v = v64.to(dtype)
            errors = []
            for step in args.steps:
                H = curvops.HessianOperator(
                    model, loss, data, method="finite_difference", fd_eps=step, check_deterministic=False
                )
                errors.append(float(((H @ v).double() - exact).norm() / exact.norm()))
            H = curvops.HessianOperator(
                model, loss, data, method="finite_difference", check_deterministic=False
            )
            default = H.finite_difference_step()
            default_error = float(((H @ v).double() - exact).norm() / exact.norm())
            autograd = curvops.HessianOperator(model, loss, data, check_deterministic=False)
            autograd_error = float(((autograd @ v).double() - exact).norm() / exact.norm())
            row = (
                f"| {str(dtype).removeprefix('torch.')} | {name} | "
                + " | ".join(f"{e:.1e}" for e in errors)
                + f" | {default_error:.1e} (‖εv‖={default:.3g}) | {autograd_error:.1e} |"
            )
            print(row, flush=True)
            lines.append(row)
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
