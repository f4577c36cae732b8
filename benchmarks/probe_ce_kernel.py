"""Probe: CE-Hessian kernel configurations (block, warps, ticket or program-id order) on a GPU.

Prints kernel-only time (median of ``triton.testing.do_bench``, L2 flushed) and its share of
the floor ``3 N V bytes / copy bandwidth`` for each configuration and shape, and the relative
error against the eager path. Run: ``python benchmarks/probe_ce_kernel.py --out DIR``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ce_hvp import bench, copy_bandwidth, rel_err

from curvops.kernels import _ce_hvp_triton as K
from curvops.kernels.cross_entropy_hvp import _row_coefficients, cross_entropy_hvp

SHAPES = [
    (16384, 50304, torch.bfloat16),
    (16384, 128000, torch.bfloat16),
    (4096, 128000, torch.bfloat16),
    (16384, 50304, torch.float32),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    bw = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for n, v, dtype in SHAPES:
        gen = torch.Generator("cuda").manual_seed(0)
        z = (3 * torch.randn(n, v, device="cuda", generator=gen)).to(dtype)
        u = torch.randn(n, v, device="cuda", generator=gen).to(dtype)
        t = torch.randint(0, v, (n,), device="cuda", generator=gen)
        t[::10] = -100
        coeff = _row_coefficients(z, u, t, -100, None, "mean", None)
        ref = cross_entropy_hvp(
            z[:256],
            u[:256],
            target=t[:256],
            normalizer=coeff.new_tensor(float((t != -100).sum())),
            backend="eager",
        )
        floor = 3 * n * v * z.element_size() / bw * 1e3
        out = torch.empty_like(u)
        for block, warps, ticket in itertools.product((2048, 4096, 8192), (2, 4, 8), (True, False)):
            cfg = K.KernelConfig(block, warps, ticket=ticket)
            try:
                ms = bench(functools.partial(K.launch, z, u, coeff, out, cfg))
                err = rel_err(out[:256], ref)
                name = f"{block}/{warps}w/{'ticket' if ticket else 'pid'}"
                row = {
                    "shape": f"N={n} V={v} {str(dtype)[6:]}",
                    "cfg": name,
                    "ms": ms,
                    "floor_share": floor / ms,
                    "err": err,
                }
            except Exception as exc:  # a probe: report and go on
                row = {"shape": f"N={n} V={v}", "cfg": str(cfg), "error": repr(exc)[:200]}
            print(row, flush=True)
            rows.append(row)
        del z, u, out, coeff  # free this shape's tensors before the next one is allocated
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_ce_kernel.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=1)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        timed = [r for r in rows if r["shape"] == shape and "ms" in r]
        best = sorted(timed, key=lambda r: float(r["ms"]))[:6]
        print(shape, " | ".join(f"{r['cfg']} {r['ms']:.3f} ms {r['floor_share']:.0%}" for r in best))


if __name__ == "__main__":
    main()
