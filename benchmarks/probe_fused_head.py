"""Probe: where the time of the row-chunked fused head GGN goes (GPU), and variants of it.

d = 768, V = 50304, N = 16384, bf16, tied-style (Ẇ ≠ 0, ∂W computed). Times are medians of
``triton.testing.do_bench`` (L2 flushed); peak extra = max allocated during one call minus the
allocated before it. Run: ``python benchmarks/probe_fused_head.py --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvops.kernels import cross_entropy_hvp
from curvops.kernels.linear_cross_entropy_ggn import linear_cross_entropy_ggn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lm import materialised_head

GIB = 2**30


def main() -> None:
    from triton.testing import do_bench

    from curvops.kernels import _ce_hvp_triton as tk

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    n, d, vocab = (1024, 64, 5000) if args.small else (16384, 768, 50304)
    dev = "cuda"
    dt = torch.bfloat16
    gen = torch.Generator(dev).manual_seed(0)
    h, hd = (torch.randn(n, d, device=dev, dtype=dt, generator=gen) for _ in range(2))
    w, wd = ((torch.randn(vocab, d, device=dev, dtype=dt, generator=gen) * d**-0.5) for _ in range(2))
    c = torch.full((n,), 1.0 / n, device=dev)
    rows = []

    def record(name, fn, ref=None):
        try:
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / GIB
            err = None
            if ref is not None and out is not None:
                err = max(float((o.double() - r).norm() / r.norm()) for o, r in zip(out, ref))
            row = {"name": name, "ms": ms, "peak_gib": peak, "err": err}
        except Exception as exc:  # a probe: keep going
            row = {"name": name, "error": repr(exc)[:300]}
        print(row, flush=True)
        rows.append(row)

    def materialised():
        return materialised_head(h, w, hd, wd, c)

    ref = [x.double() for x in materialised()]
    record("materialised", materialised, ref)
    # Pieces of the materialised path (the lambdas bind z, zd and u as defaults, so that the
    # `del` below frees them).
    z = h @ w.T
    zd = torch.addmm(hd @ w.T, h, wd.T)
    u = cross_entropy_hvp(z, zd, weight=c, reduction="sum")
    record("piece: z = h W^T", lambda: h @ w.T)
    record("piece: zd = hd W^T + h Wd^T (mm + addmm)", lambda: torch.addmm(hd @ w.T, h, wd.T))
    h2 = torch.cat([hd, h], dim=1)
    w2 = torch.cat([w, wd], dim=1)
    record("piece: zd = [hd h] [W Wd]^T (one K=2d mm)", lambda: h2 @ w2.T)
    record("piece: CE kernel (API)", lambda z=z, zd=zd: cross_entropy_hvp(z, zd, weight=c, reduction="sum"))
    record("piece: u W", lambda u=u: u @ w)
    record("piece: u^T h", lambda u=u: u.T @ h)
    try:
        g32 = torch.zeros(vocab, d, device=dev)
        record(
            "piece: addmm(g32, u^T, h, out_dtype=f32)",
            lambda u=u: torch.addmm(g32, u.T, h, out_dtype=torch.float32),
        )
    except Exception as exc:
        print("out_dtype", exc)
    del z, zd, u

    for chunk in (1024, 2048, 2668, 4096):
        record(
            f"lib rows chunk {chunk}",
            lambda chunk=chunk: linear_cross_entropy_ggn(h, w, hd, wd, c, chunk_rows=chunk, return_lse=False)[
                :2
            ],
            ref,
        )

    cfg = tk.DEFAULT_CONFIG

    def variant(chunk, *, cat_k, inplace, acc):
        def fn():
            grad_h = torch.empty_like(h)
            grad_w = (
                torch.zeros(vocab, d, device=dev)
                if acc != "bf16"
                else torch.zeros(vocab, d, device=dev, dtype=dt)
            )
            hh = h2 if cat_k else None
            for i in range(0, n, chunk):
                sl = slice(i, i + chunk)
                hc = h[sl]
                zz = hc @ w.T
                if cat_k:
                    zzd = hh[sl] @ w2.T
                else:
                    zzd = hd[sl] @ w.T
                    zzd.addmm_(hc, wd.T)
                if inplace:
                    uu = tk.launch(zz, zzd, c[sl].contiguous(), zzd, cfg)
                else:
                    uu = cross_entropy_hvp(zz, zzd, weight=c[sl], reduction="sum")
                del zz
                torch.mm(uu, w, out=grad_h[sl])
                if acc == "out_dtype":
                    torch.addmm(grad_w, uu.T, hc, out_dtype=torch.float32, out=grad_w)
                elif acc == "bf16":
                    grad_w.addmm_(uu.T, hc)
                else:
                    grad_w.add_(uu.T @ hc)
                del uu, zzd
            return grad_h, grad_w.to(dt)

        return fn

    for chunk in (2048, 4096):
        for cat_k in (False, True):
            for inplace in (False, True):
                for acc in ("add", "out_dtype", "bf16"):
                    record(
                        f"variant chunk {chunk} cat_k={cat_k} inplace={inplace} acc={acc}",
                        variant(chunk, cat_k=cat_k, inplace=inplace, acc=acc),
                        ref,
                    )
    record(
        "variant chunk 1024 cat_k inplace out_dtype",
        variant(1024, cat_k=True, inplace=True, acc="out_dtype"),
        ref,
    )
    record(
        "variant chunk 8192 cat_k inplace out_dtype",
        variant(8192, cat_k=True, inplace=True, acc="out_dtype"),
        ref,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_fused_head.json"), "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()
