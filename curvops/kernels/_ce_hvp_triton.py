"""Triton kernel for the cross-entropy loss-Hessian-vector product (split-V).

Imported lazily by [`curvops.kernels.cross_entropy_hvp`][curvops.kernels.cross_entropy_hvp]; never import it
from package ``__init__`` files (``import curvops`` must not import triton).

Design
------
The op is memory-bound: it must read ``z`` and ``u`` and write ``out``, so the
floor is 3 N V bytes of traffic. A row-per-program kernel with an online softmax
needs two passes over the row (stats, then output) and moves 5 N V bytes once
rows outgrow the L2 cache (the rows in flight on 132 SMs are 50-130 MB for
V = 50k-128k). Here each row is split into ``C`` chunks of ``BLOCK`` columns,
one program per chunk, small enough to stay in registers. A program loads its
chunk once, computes the chunk's (max, sum exp, sum exp*u), publishes them
(stores, then a release increment of the row's counter), polls the counter
until all ``C`` chunks of its row have published, combines the ``C`` partials
and writes its chunk of the output from registers: one read, one write.

Progress. Programs take their (row, chunk) from an atomic ticket, in the order
they actually start (``ticket=True``, the default), so the siblings a program
waits for hold adjacent tickets and are running or about to run: the kernel
progresses whenever at least ``C`` programs fit on the GPU at once (``C <= 64``
is enforced; an H100 holds hundreds). With ``fallback=True`` progress needs no
assumption at all: a program polls at most ``MAX_SPIN`` times, then reads the
whole row itself to get the statistics. The extra branch costs registers and
latency (see the fallback column of the kernel configurations in
benchmarks/results/ce_hvp_h100_2026-12-02.md), so the GPU default leaves it
out; the Triton interpreter, which runs programs one after
another, always uses it with ``MAX_SPIN = 0``: there the earlier chunks of a
row take the whole-row path and the last chunk combines the published partials.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Fused programs wait for their row's siblings: keep the chunks per row far
# below the number of programs any supported GPU keeps resident.
_MAX_CHUNKS = 64
# Polls of the row counter before a fallback program reads the whole row
# itself. Each poll is an L2 round trip (~0.5 us): a stalled program waits ~2 ms.
_MAX_SPIN = 4096


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    Attributes
    ----------
    block : int
        Columns per program (power of two); shrunk to ``next_pow2(V)`` for small
        V and grown so that a row has at most 64 chunks.
    num_warps : int
        Warps per program.
    ticket : bool
        Map programs to chunks by an atomic ticket, in the order they start,
        rather than by ``program_id``. Without ticket or fallback, progress
        relies on the hardware starting programs in ``program_id`` order
        (what NVIDIA GPUs do, but not a documented guarantee).
    fallback : bool
        Bounded polling with a whole-row fallback (see the module docstring).
    """

    block: int
    num_warps: int
    ticket: bool = True
    fallback: bool = False


# A small set: chunks that stay in registers (no spills on sm_90) and enough
# programs to fill 132 SMs; the autotuner picks among them per shape and dtype
# (the sweep: benchmarks/results/ce_hvp_h100_2026-12-02.md).
CONFIGS: list[KernelConfig] = [
    KernelConfig(2048, 4),
    KernelConfig(4096, 2),
    KernelConfig(4096, 4),
    KernelConfig(8192, 4),
    KernelConfig(4096, 8),
    KernelConfig(8192, 8),
    KernelConfig(8192, 16),
    KernelConfig(16384, 16),
]
DEFAULT_CONFIG = KernelConfig(4096, 4)
# Autotune only when a call is large enough for the choice to matter.
_AUTOTUNE_MIN_ELEMENTS = 1 << 24
_TUNED: dict[tuple, KernelConfig] = {}


def _ce_hvp_kernel(
    z_ptr,
    u_ptr,
    out_ptr,
    c_ptr,
    lse_ptr,
    stats_ptr,
    cnt_ptr,
    ticket_ptr,
    N,
    V,
    C,
    MAX_SPIN,
    stride_zn,
    stride_zv,
    stride_un,
    stride_uv,
    stride_on,
    BLOCK: tl.constexpr,
    CP2: tl.constexpr,
    FB_BLOCK: tl.constexpr,
    USE_TICKET: tl.constexpr,
    FALLBACK: tl.constexpr,
    WANT_LSE: tl.constexpr,
):
    if USE_TICKET:
        t = tl.atomic_add(ticket_ptr, 1)
    else:
        t = tl.program_id(0)
    NC = N * C
    row = t // C
    chunk = t % C
    active = row < N
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    # (Not `(cols < V) & active`: the interpreter turns a block-and-scalar `&`
    # into an int32 mask.)
    cmask = cols < tl.where(active, V, 0)
    row64 = row.to(tl.int64)
    z_ptrs = z_ptr + row64 * stride_zn + cols.to(tl.int64) * stride_zv
    u_ptrs = u_ptr + row64 * stride_un + cols.to(tl.int64) * stride_uv
    o_ptrs = out_ptr + row64 * stride_on + cols
    # c carries the accumulation dtype (float32, or float64 for float64 inputs).
    c = tl.load(c_ptr + row, mask=active, other=0.0)
    ks = tl.arange(0, CP2)
    kmask = ks < C
    # Ignored rows (c == 0) are skipped unless their log-sum-exp is asked for.
    if WANT_LSE:
        go = active
    else:
        go = c != 0
    if go:
        z = tl.load(z_ptrs, mask=cmask, other=float("-inf")).to(c.dtype)
        uu = tl.load(u_ptrs, mask=cmask, other=0.0).to(c.dtype)
        m = tl.max(z, axis=0)
        e = tl.exp(z - m)
        l_own = tl.sum(e, axis=0)
        s_own = tl.sum(e * uu, axis=0)
        if C > 1:
            tl.store(stats_ptr + row * C + chunk, m)
            tl.store(stats_ptr + NC + row * C + chunk, l_own)
            tl.store(stats_ptr + 2 * NC + row * C + chunk, s_own)
            # All threads' stores must precede the release of the counter.
            tl.debug_barrier()
            tl.atomic_add(cnt_ptr + row, 1, sem="release")
        if C > 1:
            done = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
            if FALLBACK:
                spins = 0
                while (done < C) & (spins < MAX_SPIN):
                    done = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
                    spins += 1
                if done >= C:
                    ms = tl.load(
                        stats_ptr + row * C + ks, mask=kmask, other=float("-inf"), cache_modifier=".cg"
                    )
                    ls = tl.load(stats_ptr + NC + row * C + ks, mask=kmask, other=0.0, cache_modifier=".cg")
                    ss = tl.load(
                        stats_ptr + 2 * NC + row * C + ks, mask=kmask, other=0.0, cache_modifier=".cg"
                    )
                    big_m = tl.max(ms, axis=0)
                    scale = tl.exp(ms - big_m)
                    big_l = tl.sum(ls * scale, axis=0)
                    big_s = tl.sum(ss * scale, axis=0)
                else:
                    # Siblings not resident: compute the row statistics from the
                    # row itself, in sub-blocks so that registers stay free.
                    big_m = tl.full((), float("-inf"), c.dtype)
                    big_l = tl.zeros((), c.dtype)
                    big_s = tl.zeros((), c.dtype)
                    for k in range(tl.cdiv(V, FB_BLOCK)):
                        kc = k * FB_BLOCK + tl.arange(0, FB_BLOCK)
                        kmsk = kc < V
                        zk = tl.load(
                            z_ptr + row64 * stride_zn + kc.to(tl.int64) * stride_zv,
                            mask=kmsk,
                            other=float("-inf"),
                        ).to(c.dtype)
                        uk = tl.load(
                            u_ptr + row64 * stride_un + kc.to(tl.int64) * stride_uv, mask=kmsk, other=0.0
                        )
                        new_m = tl.maximum(big_m, tl.max(zk, axis=0))
                        ek = tl.exp(zk - new_m)
                        old = tl.exp(big_m - new_m)
                        big_l = big_l * old + tl.sum(ek, axis=0)
                        big_s = big_s * old + tl.sum(ek * uk.to(c.dtype), axis=0)
                        big_m = new_m
            else:
                while done < C:
                    done = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
                # .cg: read the partials from L2, never from a stale L1 line.
                ms = tl.load(stats_ptr + row * C + ks, mask=kmask, other=float("-inf"), cache_modifier=".cg")
                ls = tl.load(stats_ptr + NC + row * C + ks, mask=kmask, other=0.0, cache_modifier=".cg")
                ss = tl.load(stats_ptr + 2 * NC + row * C + ks, mask=kmask, other=0.0, cache_modifier=".cg")
                big_m = tl.max(ms, axis=0)
                scale = tl.exp(ms - big_m)
                big_l = tl.sum(ls * scale, axis=0)
                big_s = tl.sum(ss * scale, axis=0)
        else:
            big_m = m
            big_l = l_own
            big_s = s_own
        dot = big_s / big_l
        # Two tests, as in every WANT_LSE branch of this kernel: the outer one is a
        # compile-time constant, and the specialisation without log-sum-exp has no branch.
        if WANT_LSE:  # noqa: SIM102
            if chunk == 0:
                tl.store(lse_ptr + row, (big_m + tl.log(big_l)).to(lse_ptr.dtype.element_ty))
        # p = exp(z - M) / L, reusing exp(z - m) of this chunk.
        p = e * (tl.exp(m - big_m) / big_l)
        res = (c * p) * (uu - dot)
        if WANT_LSE:
            # An ignored row is computed only for its log-sum-exp: its output stays
            # exactly zero, whatever its tangent holds.
            res = tl.where(c != 0, res, 0.0)
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(o_ptrs, tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty), mask=cmask)


_JITTED: dict[bool, object] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it decorates, so decorate on first
    # use in each mode rather than at import.
    if interpret not in _JITTED:
        _JITTED[interpret] = triton.jit(_ce_hvp_kernel)
    return _JITTED[interpret]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _plan(v: int, cfg: KernelConfig) -> tuple[int, int]:
    block = min(cfg.block, max(16, _next_pow2(v)))
    block = max(block, _next_pow2(math.ceil(v / _MAX_CHUNKS)))
    return block, math.ceil(v / block)


def launch(
    logits: Tensor,
    u: Tensor,
    coeff: Tensor,
    out: Tensor,
    cfg: KernelConfig,
    max_spin: int | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """Run the kernel in one configuration.

    Parameters
    ----------
    logits : Tensor, shape (N, V)
        Logits, any floating dtype; rows may be strided.
    u : Tensor, shape (N, V)
        Tangent; its dtype is the output's.
    coeff : Tensor, shape (N,)
        Row coefficients in the accumulation dtype (float32, float64 for float64 inputs).
    out : Tensor, shape (N, V)
        Contiguous, dtype of ``u``; receives the product. May be ``u`` (in place).
    cfg : KernelConfig
        The launch configuration.
    max_spin : int, optional
        Poll limit of fallback configurations (0: every program but the last of its row
        reads the whole row); default ``_MAX_SPIN`` on a GPU, 0 in the interpreter.
    lse : Tensor, shape (N,), optional
        Contiguous; receives each row's log-sum-exp.

    Returns
    -------
    Tensor
        ``out``.
    """
    n, v = logits.shape
    interpret = _interpreting() and not logits.is_cuda
    block, chunks = _plan(v, cfg)
    fallback = cfg.fallback or interpret
    if fallback and chunks > 1 and out.data_ptr() == u.data_ptr():
        # Fallback programs read their siblings' columns of u, which an in-place write may
        # already have replaced: write elsewhere, then copy.
        return out.copy_(launch(logits, u, coeff, torch.empty_like(out), cfg, max_spin, lse))
    if max_spin is None:
        # The interpreter runs programs one at a time: polling could never succeed.
        max_spin = 0 if interpret else _MAX_SPIN
    # Counters must start at zero on every launch; stats are written before read.
    cnt = torch.zeros(n + 1, dtype=torch.int32, device=logits.device)  # row counters, then the ticket
    stats = torch.empty(3 * n * chunks, dtype=coeff.dtype, device=logits.device)
    _kernel(interpret)[(n * chunks,)](
        logits,
        u,
        out,
        coeff,
        coeff if lse is None else lse,
        stats,
        cnt,
        cnt[n:],
        n,
        v,
        chunks,
        max_spin,
        logits.stride(0),
        logits.stride(1),
        u.stride(0),
        u.stride(1),
        out.stride(0),
        BLOCK=block,
        CP2=max(2, _next_pow2(chunks)),
        FB_BLOCK=max(16, block // 4),
        USE_TICKET=cfg.ticket and chunks > 1,
        FALLBACK=fallback and chunks > 1,
        WANT_LSE=lse is not None,
        num_warps=cfg.num_warps,
    )
    return out


def _tune_key(logits: Tensor, u: Tensor) -> tuple:
    n, v = logits.shape
    # Bucket N by powers of two: the best chunking depends on how many rows fill the GPU.
    return (v, logits.dtype, u.dtype, min(_next_pow2(n), 1 << 16), logits.device.index)


def _autotune(logits: Tensor, u: Tensor, coeff: Tensor, out: Tensor) -> KernelConfig:
    from triton.testing import do_bench

    best, best_ms = DEFAULT_CONFIG, float("inf")
    seen = set()
    for cfg in CONFIGS:
        plan = _plan(logits.shape[1], cfg) + (cfg.num_warps, cfg.ticket, cfg.fallback)
        if plan in seen:  # small V collapses several configs into one
            continue
        seen.add(plan)
        run = functools.partial(launch, logits, u, coeff, out, cfg)
        ms = do_bench(run, warmup=5, rep=25, return_mode="median")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def ce_hvp_triton(
    logits: Tensor,
    u: Tensor,
    coeff: Tensor,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """The fused product ``coeff[n] * p_n * (u_n - p_n . u_n)`` row by row.

    Parameters
    ----------
    logits : Tensor, shape (N, V)
        Logits, any floating dtype; rows may be strided.
    u : Tensor, shape (N, V)
        Tangent; its dtype is the output's.
    coeff : Tensor, shape (N,)
        Row coefficients in the accumulation dtype (float32, float64 for float64 inputs).
    config : KernelConfig, optional
        Default: autotuned over ``CONFIGS`` for large CUDA calls (cached per V,
        dtypes, N bucket and device), ``DEFAULT_CONFIG`` otherwise.
    out : Tensor, shape (N, V), optional
        Contiguous, dtype of ``u``; may be ``u`` (in place). Default a new tensor.
    lse : Tensor, shape (N,), optional
        Contiguous; receives the rows' log-sum-exp.

    Returns
    -------
    Tensor, shape (N, V)
        ``out``, or a new tensor of ``u``'s dtype.
    """
    n, v = logits.shape
    if out is None:
        out = torch.empty((n, v), dtype=u.dtype, device=u.device)
    if n == 0 or v == 0:
        return out
    if config is None:
        config = DEFAULT_CONFIG
        if logits.is_cuda and n * v >= _AUTOTUNE_MIN_ELEMENTS:
            key = _tune_key(logits, u)
            if key not in _TUNED:
                # Timing runs write their output: never into a caller's tensor that is an input.
                _TUNED[key] = _autotune(logits, u, coeff, torch.empty_like(out))
            config = _TUNED[key]
    return launch(logits, u, coeff, out, config, lse=lse)
