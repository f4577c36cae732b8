"""Which very wide float32 matrix products does this GPU's BLAS get right?

A Lanczos basis of a large model is a ``(20, D)`` row stack; restarts, Ritz vectors and
Gram-Schmidt multiply it by a few coefficients. This probe runs those shapes with plain
``torch`` ``@`` (one subprocess per case: a CUDA fault poisons the process) and checks the
last output column against a separate recomputation. It is the measurement behind
``curvops.algorithms._torch_backend.WIDE_ELEMENTS`` (products that large are split).

Usage::

    python benchmarks/probe_wide_gemm.py --out benchmarks/results/wide_gemm_<device>_<date>.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import date
from typing import Any

from _report import emit_report

CASES = {
    "(19,20) @ (20,n)": "c = torch.randn(19, 20, device=d); a = torch.randn(20, n, device=d); r = c @ a",
    "(3,20) @ (20,n)": "c = torch.randn(3, 20, device=d); a = torch.randn(20, n, device=d); r = c @ a",
    "addmm (1,20) @ (20,n)": "c = torch.randn(1, 20, device=d); a = torch.randn(20, n, device=d); "
    "r = torch.addmm(torch.zeros(1, n, device=d), c, a)",
    "addmm (2,20) @ (20,n)": "c = torch.randn(2, 20, device=d); a = torch.randn(20, n, device=d); "
    "r = torch.addmm(torch.zeros(2, n, device=d), c, a)",
}
SIZES = (134_217_728, 269_068_288, 538_136_576)


def child(name: str, n: int) -> None:
    import torch

    d = "cuda"
    scope: dict[str, Any] = {"torch": torch, "d": d, "n": n}  # exec() adds the case's tensors
    exec(CASES[name], scope)
    c, a, r = scope["c"], scope["a"], scope["r"]
    torch.cuda.synchronize()
    error = float((r[:, -1] - (c.double() @ a[:, -1].double()).float()).abs().max())
    print(f"ran; last column max error {error:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    import torch

    lines = [
        f"# Wide float32 products ({torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, {date.today()})",
        "",
        "`python benchmarks/probe_wide_gemm.py`",
        "",
        "| product | n | 20·n ≥ 2^31 | result |",
        "|---|---|---|---|",
    ]
    for n in SIZES:
        for name in CASES:
            done = subprocess.run(
                [sys.executable, __file__, "--child", name, str(n)], capture_output=True, text=True
            )
            message = done.stdout.strip() or (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
            lines.append(f"| {name} | {n:,} | {20 * n >= 2**31} | {message} |")
            print(lines[-1], flush=True)
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
