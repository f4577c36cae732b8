"""Matrix-product FLOPs of curvature products, in units of one gradient (a lower-bound study).

Counts, with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, batched matrix
products, convolutions and attention only; elementwise work is not counted), the FLOPs that
curvops' own products execute, next to those of one gradient over the same batch:

* ``gradient``: ``loss_and_gradient()`` of the operator (one forward, one backward);
* ``ggn``: ``GGNOperator @ v`` with ``J v`` from the kept-graph dual forward (the CPU
  strategy: primal and tangent in one pass) and with the separate plain forward (the CUDA
  strategy: one extra primal forward, no tangent graph);
* ``hessian``: ``HessianOperator @ v``, the default (reverse over forward, where it passes
  the operator's check against double backward; models with LayerNorm do not) and double
  backward.

Forward-mode AD costs two matrix products per parameter matrix product (``Ẇx + Wẋ``), a
backward pass two (``gx``, ``gW``), the forward one, so a GGN product needs at least
(1 + 2 + 2) / 3 = 5/3 gradients of matrix-product FLOPs, and a Hessian product by double
backward 9/3 = 3, less what the first layer saves (its input needs no gradient). This script
measures the actual counts. Matrix products dominate the GPU time of these products
(64% of the GGN's, 51% + attention of the Hessian's CUDA time in
``results/lm_h100_2026-11-23.md``), so a time ratio cannot fall much below its FLOP ratio.

Models: the MLP 784-256-256-10 of ``bench_matvec.py`` (cross-entropy, one batch of 512), and
GPT-2-small-shaped language models (d = 768, 12 heads, vocabulary 50257, one sequence of
1024 tokens, eager attention) with 1 and 2 transformer blocks, whose counts are extrapolated
linearly to the 12 blocks of GPT-2 small (every block has the same count).

Run: ``python benchmarks/flop_bounds.py [--skip-lm] [--out FILE]`` (CPU, about 2 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import emit_report

from curvops import GGNOperator, HessianOperator, ProductStrategy


def _flops(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def count(model: torch.nn.Module, loss_fn: Any, data: Iterable[tuple[Any, Any]]) -> dict[str, int]:
    """Matrix-product FLOPs of one gradient and of one product of each kind over ``data``."""
    hessian = HessianOperator(model, loss_fn, data, check_deterministic=False)
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0))
    hessian @ v  # the one-time check of reverse over forward, outside the counts
    double = HessianOperator(
        model,
        loss_fn,
        data,
        strategy=ProductStrategy(hessian_vector="double_backward"),
        check_deterministic=False,
    )
    kept = ProductStrategy(output_tangent="dual_forward_with_graph")
    separate = ProductStrategy(output_tangent="separate_tangent_pass")
    return {
        "gradient": _flops(hessian.loss_and_gradient),
        "ggn (kept-graph dual forward)": _flops(
            lambda: GGNOperator(model, loss_fn, data, strategy=kept, check_deterministic=False) @ v
        ),
        "ggn (separate forward)": _flops(
            lambda: GGNOperator(model, loss_fn, data, strategy=separate, check_deterministic=False) @ v
        ),
        "hessian (default: reverse over forward if it passes its check)": _flops(lambda: hessian @ v),
        "hessian (double backward)": _flops(lambda: double @ v),
    }


def mlp_counts() -> dict[str, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    data = [(torch.randn(512, 784), torch.randint(0, 10, (512,)))]
    return count(model, torch.nn.CrossEntropyLoss(), data)


def gpt2_counts(layers: int) -> dict[str, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from curvops.lm import CausalLMLoss, causal_lm_data

    config = GPT2Config(
        n_layer=layers,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        # Taken by the config's **kwargs at run time; its dataclass signature does not list it.
        attn_implementation="eager",  # type: ignore[call-arg]
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    return count(model, CausalLMLoss(), causal_lm_data([{"input_ids": tokens}]))


def table(title: str, counts: Mapping[str, float]) -> list[str]:
    gradient = counts["gradient"]
    lines = [f"## {title}", "", "| product | matrix-product GFLOP | in gradients |", "|---|---|---|"]
    for name, flops in counts.items():
        lines.append(f"| {name} | {flops / 1e9:.1f} | {flops / gradient:.3f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    date = datetime.date.today().isoformat()
    lines = [
        f"# Matrix-product FLOPs of curvature products, in gradients ({date})",
        "",
        f"Counted by `benchmarks/flop_bounds.py` with `torch.utils.flop_counter.FlopCounterMode` on "
        f"{platform.machine()}, torch {torch.__version__} (counts do not depend on the machine). "
        "Matrix products, convolutions and attention only; elementwise work is not counted.",
        "",
    ]
    lines += table("MLP 784-256-256-10, cross-entropy, one batch of 512", mlp_counts())
    if not args.skip_lm:
        one, two = gpt2_counts(1), gpt2_counts(2)
        per_block = {k: two[k] - one[k] for k in one}
        gpt2_small = {k: one[k] + 11 * per_block[k] for k in one}
        lines += table("GPT-2-shaped LM, 1 block (d 768, vocabulary 50257, 1 x 1024 tokens)", one)
        lines += table(
            "GPT-2 small (12 blocks), extrapolated: 1-block count + 11 x per-block count", gpt2_small
        )
        lines += table("One transformer block alone (2-block count - 1-block count)", per_block)
    default = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"flop_bounds_cpu_{date}.md"
    )
    emit_report(lines, args.out or default)


if __name__ == "__main__":
    main()
