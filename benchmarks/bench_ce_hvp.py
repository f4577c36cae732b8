"""Benchmark of the fused cross-entropy loss-Hessian-vector product on a CUDA GPU.

Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_ce_hvp.py [--out DIR]``.

For each shape it times (median of ``triton.testing.do_bench``, which flushes
L2 between repetitions) the eager and ``torch.compile`` backends and the Triton
kernel (through the public API, and the kernel launch alone with the row
coefficients precomputed), measures the peak extra memory in units of one
(N, V) tensor of the input dtype, and compares with the floor
``3 N V bytes / copy bandwidth``, the bandwidth measured in the same run by a
large device-to-device copy (bytes read + written). It also times every kernel
configuration, to show what the autotuner chooses from. Results go to
``<out>/ce_hvp_<gpu>_<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import sys
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

from curvops.kernels import _ce_hvp_triton as K
from curvops.kernels import cross_entropy_hvp
from curvops.kernels.cross_entropy_hvp import _row_coefficients

SHAPES = [
    (16384, 50304, torch.float32),
    (16384, 50304, torch.bfloat16),
    (16384, 128000, torch.float32),
    (16384, 128000, torch.bfloat16),
    (4096, 128000, torch.bfloat16),
]
# hessian-eigenthings 1.0.0a6 (repository head) Triton kernel, from
# shared/reference/anchors.md (H100 80GB HBM3, torch 2.11, Triton 3.6, copy 3.02 TB/s).
PEER_ANCHOR_MS = {
    (16384, 50304, torch.float32): 6.78,
    (16384, 50304, torch.bfloat16): 3.46,
    (16384, 128000, torch.float32): 17.01,
    (4096, 128000, torch.bfloat16): 2.20,
}


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``, L2 flushed between runs)."""
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(functools.partial(dst.copy_, src))
    return 2 * (1 << 31) / (ms * 1e-3)


def peak_extra(fn, unit_bytes: int) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra / unit_bytes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure_shape(
    n: int, v: int, dtype: torch.dtype, bw: float, *, compile_backend: bool, sweep: bool
) -> tuple[str, str | None]:
    """One table row for logits (n, v) of ``dtype``, and the configuration sweep line (or None)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen) * 3
    u = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen)
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[torch.rand(n, device="cuda", generator=gen) < 0.1] = -100
    unit = n * v * z.element_size()
    floor_ms = 3 * unit / bw * 1e3

    ours = cross_entropy_hvp(z, u, target=t, backend="triton")  # autotunes on first call
    chosen = K._TUNED.get(K._tune_key(z, u), K.DEFAULT_CONFIG)
    err = rel_err(ours, cross_entropy_hvp(z, u, target=t, backend="eager"))
    del ours

    def api(backend: str) -> Callable[[], torch.Tensor]:
        return functools.partial(cross_entropy_hvp, z, u, target=t, backend=backend)

    t_eager = bench(api("eager"))
    m_eager = peak_extra(api("eager"), unit)
    if compile_backend:
        api("compile")()
        t_comp = bench(api("compile"))
        m_comp = peak_extra(api("compile"), unit)
    else:
        t_comp, m_comp = float("nan"), float("nan")
    t_api = bench(api("triton"))
    m_ours = peak_extra(api("triton"), unit)
    coeff = _row_coefficients(z, u, t, -100, None, "mean", None)
    out = torch.empty_like(u)
    t_kern = bench(functools.partial(K.launch, z, u, coeff, out, chosen))
    peer = PEER_ANCHOR_MS.get((n, v, dtype))
    dname = str(dtype).replace("torch.", "")
    row = (
        f"| N={n} V={v} {dname} | {floor_ms:.2f} | {t_eager:.2f} | {t_comp:.2f} | {t_api:.2f} "
        f"| {t_kern:.2f} | {floor_ms / t_api:.0%} | {t_eager / t_api:.1f}x | {t_comp / t_api:.2f}x "
        f"| {peer if peer else '—'} | {(f'{peer / t_api:.2f}x') if peer else '—'} "
        f"| {chosen.block}/{chosen.num_warps}w "
        f"| {m_eager:.1f} / {m_comp:.1f} / {m_ours:.2f} | {err:.1e} |"
    )
    if not sweep:
        return row, None
    parts = []
    extra = [K.KernelConfig(4096, 4, ticket=False), K.KernelConfig(4096, 4, fallback=True)]
    for cfg in K.CONFIGS + extra:
        ms = bench(functools.partial(K.launch, z, u, coeff, out, cfg))
        tag = ("" if cfg.ticket else "/pid") + ("/fallback" if cfg.fallback else "")
        parts.append(f"{cfg.block}/{cfg.num_warps}w{tag}: {ms:.3f} ({floor_ms / ms:.0%})")
    # Cost of the whole-row path, were every program but the last of a row to take it.
    all_fallback = K.KernelConfig(4096, 4, fallback=True)
    ms = bench(functools.partial(K.launch, z, u, coeff, out, all_fallback, max_spin=0))
    parts.append(f"4096/4w all-fallback: {ms:.3f} ({floor_ms / ms:.0%})")
    return row, f"- N={n} V={v} {dname}: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()

    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    lines = [
        "# Cross-entropy loss-Hessian-vector product: benchmark",
        "",
        f"GPU: {name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"date {datetime.date.today().isoformat()}.",
        f"Device-to-device copy bandwidth (2 GiB copy, read + write): {bw / 1e12:.2f} TB/s.",
        "Floor = 3·N·V·bytes / copy bandwidth. Times are medians of `triton.testing.do_bench` "
        "(L2 flushed between repetitions). Peak extra memory in units of one (N, V) tensor of the "
        "input dtype (max allocated minus allocated before; includes the output). "
        "Targets carry 10% ignored rows; `mean` reduction.",
        "`ours (API)`: the public `cross_entropy_hvp(..., backend='triton')`, row coefficients included; "
        "`ours (kernel)`: the kernel launch alone (counter reset included). Peer: hessian-eigenthings "
        "1.0.0a6 numbers from shared/reference/anchors.md (same GPU model, copy 3.02 TB/s), not rerun: "
        "the installed 1.0.0a5 has no Triton kernel.",
        "",
        "| shape | floor ms | eager ms | compile ms | ours (API) ms | ours (kernel) ms "
        "| ours: share of floor | ours vs eager | ours vs compile | peer ms (anchor) | ours vs peer "
        "| chosen config | peak extra: eager / compile / ours | max rel err vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sweep_lines = ["", "## Kernel configurations (kernel-only ms)", ""]
    for n, v, dtype in SHAPES:
        torch.cuda.empty_cache()
        row, sweep = measure_shape(
            n, v, dtype, bw, compile_backend=not args.no_compile, sweep=not args.no_sweep
        )
        lines.append(row)
        print(row, flush=True)
        if sweep is not None:
            sweep_lines.append(sweep)
            print(sweep, flush=True)

    text = "\n".join(lines + sweep_lines) + "\n"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-").split("-")[0]
    path = os.path.join(args.out, f"ce_hvp_{slug}_{datetime.date.today().isoformat()}.md")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
