"""The bf16-autocast GPT-2 Hessian product: ours and hessian-eigenthings', timed and profiled.

Asked because in fp32 the two take the same time (H100 2026-12-02: 772.7 vs 776.2 ms); under bf16 autocast
ours took 555.4 ms against its 484.8 (H200 earlier: 602.4 vs 520.8). This probe times, side by
side under autocast, our Hessian product (loss through ``cross_entropy_sum``), ours with the
loss through ``F.cross_entropy`` (a custom callable), and the peer's, then profiles one product
of each and prints the CUDA kernels by self time plus a summary by kernel family. Answer
(H200): `benchmarks/results/lm_bf16_hessian_h200_2026-12-02.md`.

Run: ``python benchmarks/probe_lm_bf16_hessian.py [--small] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_lm import build_gpt2, eigenthings_operators, measure, summed_torch_ce

from curvops import HessianOperator
from curvops.lm import CausalLMLoss, causal_lm_data


def family(name: str) -> str:
    n = name.lower()
    for key, label in (
        ("gemm", "gemm"),
        ("cutlass", "gemm"),
        ("sm90", "gemm"),
        ("xmma", "gemm"),
        ("nvjet", "gemm"),
        ("softmax", "softmax"),
        ("_ce_hvp", "ce kernel"),
        ("reduce", "reduce"),
        ("copy", "copy/cast"),
        ("cast", "copy/cast"),
        ("layer_norm", "layer norm"),
        ("gelu", "gelu"),
        ("tanh", "gelu"),
        ("elementwise", "elementwise"),
        ("vectorized", "elementwise"),
        ("fill", "fill"),
    ):
        if key in n:
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda"
    model, batches = build_gpt2(args.small, device)
    data = causal_lm_data(batches)
    loss = CausalLMLoss()
    ops = {
        "ours (cross_entropy_sum)": HessianOperator(model, loss, data, check_deterministic=False).__matmul__,
        "ours (F.cross_entropy)": HessianOperator(
            model, summed_torch_ce(loss), data, check_deterministic=False
        ).__matmul__,
    }
    peer = eigenthings_operators(model, batches)
    if "eigenthings_hessian" in peer:
        ops["hessian-eigenthings"] = peer["eigenthings_hessian"].matvec
    num = sum(p.numel() for p in model.parameters())
    v = torch.randn(num, device=device, generator=torch.Generator(device).manual_seed(0)) * 1e-3
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", ""]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        results: dict[str, tuple[float, float]] = {}
        for _ in range(2):  # two rounds; each product's faster one is kept
            for name, apply in ops.items():
                res = measure(functools.partial(apply, v), args.repeats)
                if name not in results or res["ms"] < results[name][0]:
                    results[name] = (res["ms"], res["peak_gib"])
        lines += ["| product (bf16 autocast) | ms | peak extra GiB |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.1f} | {peak:.2f} |" for name, (ms, peak) in results.items()]
        a = ops["ours (cross_entropy_sum)"](v)
        # The F.cross_entropy variant is a batch sum (a custom callable): its Hessian is the
        # mean's times the number of counted targets.
        tokens = sum(int(b["input_ids"][:, 1:].numel()) for b in batches)
        for name, apply in ops.items():
            b = apply(v) / (tokens if "F.cross_entropy" in name else 1)
            lines.append(
                f"rel. difference to ours (cross_entropy_sum), {name}: "
                f"{float((a.float() - b.float()).norm() / a.float().norm()):.2e}"
            )
        from torch.profiler import ProfilerActivity, profile

        for name, apply in ops.items():
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                apply(v)
                torch.cuda.synchronize()
            events = [e for e in p.key_averages() if e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in events) / 1e3
            groups: collections.Counter[str] = collections.Counter()
            for e in events:
                groups[family(e.key)] += e.self_device_time_total / 1e3
            lines += [
                "",
                f"## {name}: {total:.1f} ms of kernels",
                "families: " + ", ".join(f"{k} {t:.1f}" for k, t in groups.most_common()),
            ]
            lines += ["| kernel | calls | ms |", "|---|---|---|"]
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:18]:
                lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_lm_bf16_hessian.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
