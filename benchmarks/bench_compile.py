"""Compiled curvature products against eager ones: GPT-2 small, one GPU.

Model: GPT-2-small-sized ``GPT2LMHeadModel`` from a config (12 layers, d = 768, vocabulary
50257, eager attention), random init, eval mode, float32; 8 sequences of 1024 random tokens in
4 batches of 2, labels = inputs (shifted inside :class:`curvops.lm.CausalLMLoss`). ``--small``:
a 2-layer, d = 64 model on 4 batches of 2 x 64 tokens (a smoke test, also on the CPU).

Products (one vector of the parameters' size):

- gradient, eager: Hugging Face's ``labels=`` loss over the 4 batches (the unit of every
  ratio, as in ``docs/benchmarks.md``), and the same through ``torch.compile(model)``;
- Hessian: :class:`curvops.HessianOperator` (eager, its default strategy) and
  :class:`curvops.operators.compiled.CompiledHessianOperator` (forward over reverse compiled);
- GGN: :class:`curvops.GGNOperator` (eager, default strategy) and
  :class:`curvops.operators.compiled.CompiledGGNOperator`.

Every product runs once per round, rounds in rotated order; a product's time is the median of
``--repeats`` calls after a warm-up, and its fastest round is kept. "compile s" is the first
call's time minus that median (tracing and code generation; inductor caches its kernels on
disk, so a repeated run measures cache hits: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` measures
a cold compilation). "peak extra GiB" is the maximum allocated during one call minus the
allocated before it (CUDA only). "rel. diff" is
``‖compiled − eager‖ / ‖eager‖`` of the same product (float32 rounding of two summation
orders; the float64 equality is ``tests/operators/test_compile.py``). The reference column is
curvlinops' published ratios (repository head, nanoGPT default config, batch 4, RTX A6000):
Hessian 4.5 eager / 2.9 compiled, GGN 3.1 / 2.1 gradients, all in units of the *eager*
gradient (its benchmark plots divide by the eager gradient's time), as here.

Run: ``python benchmarks/bench_compile.py [--small] [--rounds 2] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import emit_report  # benchmarks/ is on sys.path when a script runs

from curvops import GGNOperator, HessianOperator
from curvops.lm import CausalLMLoss, causal_lm_data
from curvops.operators.compiled import CompiledGGNOperator, CompiledHessianOperator

GIB = 2**30
#: curvlinops' published ratios (gradients), repository head, nanoGPT on an RTX A6000.
CURVLINOPS = {
    "hessian eager": 4.5,
    "hessian compiled": 2.9,
    "ggn eager": 3.1,
    "ggn compiled": 2.1,
}


def sync() -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_gpt2(small: bool, device: str) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """GPT-2 small (a tiny GPT-2 with ``small``) from a config, eager attention, eval mode; its batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if small:
        # attn_implementation: taken by the config's **kwargs; its dataclass signature does not list it.
        config = GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, attn_implementation="eager"
        )  # type: ignore[call-arg]
        shape = (2, 64)
    else:
        config = GPT2Config(
            n_layer=12,
            n_embd=768,
            n_head=12,
            vocab_size=50257,
            n_positions=1024,
            attn_implementation="eager",  # type: ignore[call-arg]  # as above
        )
        shape = (2, 1024)
    torch.manual_seed(0)
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, config.vocab_size, shape, generator=generator).to(device)}
        for _ in range(4)
    ]
    return model, batches


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First call (s), median of ``repeats`` later calls (ms), peak extra memory of one call (GiB)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = float("nan")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / GIB
    ms = statistics.median(times)
    return {"ms": ms, "compile_s": max(first - ms / 1e3, 0.0), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 (smoke test, also on the CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round (median)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in rotated order (fastest kept)")
    parser.add_argument("--mode", default=None, help="torch.compile mode of the compiled products")
    parser.add_argument(
        "--only", nargs="*", default=None, help="products to run (names of the table's first column)"
    )
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    model, batches = build_gpt2(args.small, device)
    params = [p for p in model.parameters() if p.requires_grad]
    data = causal_lm_data(batches)
    loss = CausalLMLoss()
    options: dict[str, Any] = {} if args.mode is None else {"mode": args.mode}
    compiled_model: Any = torch.compile(model)

    def hf_gradient(net: Callable[..., Any]) -> Callable[[], Any]:
        def gradient() -> list[torch.Tensor]:
            total = [torch.zeros_like(p) for p in params]
            for batch in batches:
                value = net(**batch, labels=batch["input_ids"]).loss / len(batches)
                for t, g in zip(total, torch.autograd.grad(value, params)):
                    t.add_(g)
            return total

        return gradient

    operators = {
        "hessian eager": HessianOperator(model, loss, data, check_deterministic=False),
        "hessian compiled": CompiledHessianOperator(
            model, loss, data, check_deterministic=False, compile_options=options
        ),
        "ggn eager": GGNOperator(model, loss, data, check_deterministic=False),
        "ggn compiled": CompiledGGNOperator(
            model, loss, data, check_deterministic=False, compile_options=options
        ),
    }
    v = torch.randn(
        sum(p.numel() for p in params), device=device, generator=torch.Generator(device).manual_seed(0)
    )
    calls: dict[str, Callable[[], Any]] = {
        "gradient eager": hf_gradient(model),
        "gradient compiled": hf_gradient(compiled_model),
    }
    for name, op in operators.items():
        calls[name] = functools.partial(op.__matmul__, v)
    if args.only:
        calls = {name: call for name, call in calls.items() if name in args.only or name == "gradient eager"}
    best: dict[str, dict[str, float] | str] = {}
    order = list(calls)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            try:
                result = measure(calls[name], args.repeats)
            except (
                Exception
            ) as error:  # a product that fails (or runs out of memory) is reported, the rest run
                best[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                continue
            previous = best.get(name)
            if not isinstance(previous, dict) or result["ms"] < previous["ms"]:
                if isinstance(previous, dict):  # the compile time is the first round's
                    result["compile_s"] = previous["compile_s"]
                best[name] = result
            print(f"round {round_index}: {name} {best[name]}", flush=True)

    differences: dict[str, float] = {}
    for kind in ("hessian", "ggn"):
        eager, compiled = f"{kind} eager", f"{kind} compiled"
        if isinstance(best.get(eager), dict) and isinstance(best.get(compiled), dict):
            a, b = operators[eager] @ v, operators[compiled] @ v
            differences[compiled] = float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a))

    import transformers

    unit = best["gradient eager"]
    assert isinstance(unit, dict), f"the eager gradient failed: {unit}"
    size = (
        "tiny GPT-2 (2 layers, d = 64), 4 x 2 x 64 tokens"
        if args.small
        else "GPT-2 small, 4 x 2 x 1024 tokens"
    )
    lines = [
        f"# Compiled vs eager curvature products: {size}",
        "",
        f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (1 thread)'}; "
        f"torch {torch.__version__}; transformers {transformers.__version__}; "
        f"Python {sys.version.split()[0]}; float32, eager attention; "
        f"compile options {options or 'default'}. {args.rounds} rounds in rotated order x median of "
        f"{args.repeats}; unit: one eager gradient ({unit['ms']:.1f} ms).",
        "",
        "| product | time ms | in eager gradients | compile s | peak extra GiB | rel. diff to eager "
        "| curvlinops (gradients) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        outcome = best.get(name)
        reference = (
            f"{CURVLINOPS[name]:.1f}" if name in CURVLINOPS else ("1.0" if name == "gradient eager" else "")
        )
        if not isinstance(outcome, dict):
            lines.append(f"| {name} | failed: {outcome} | | | | | {reference} |")
            continue
        result = outcome
        compile_s = f"{result['compile_s']:.1f}" if "compiled" in name else ""
        difference = f"{differences[name]:.1e}" if name in differences else ""
        peak = "n/a" if result["peak_gib"] != result["peak_gib"] else f"{result['peak_gib']:.2f}"  # NaN: CPU
        lines.append(
            f"| {name} | {result['ms']:.1f} | {result['ms'] / unit['ms']:.2f} | {compile_s} | "
            f"{peak} | {difference} | {reference} |"
        )
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
