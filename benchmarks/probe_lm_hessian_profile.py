"""Where a GPT-2 Hessian product spends its GPU time: reverse over forward vs double backward.

Run on a GPU machine: ``python benchmarks/probe_lm_hessian_profile.py``; prints the top CUDA
kernels (torch.profiler) of one single-vector product by each path, same model and batches
as ``bench_lm.py --part e2e``.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_lm import build_gpt2
from curvops import HessianOperator
from curvops.lm import CausalLMLoss, causal_lm_data

parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true")
parser.add_argument("--rows", type=int, default=18)
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
model, batches = build_gpt2(args.small, device)
data = causal_lm_data(batches)
v = torch.randn(sum(p.numel() for p in model.parameters()), device=device, generator=torch.Generator(device).manual_seed(0)) * 1e-3
for label, rof in (("reverse over forward", True), ("double backward", False)):
    H = HessianOperator(model, CausalLMLoss(), data, check_deterministic=False)
    H._reverse_over_forward = rof
    H @ v
    H @ v
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        H @ v
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"==== {label} (verdict {H.__dict__.get('_forward_mode_verdict')})")
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
