"""LM curvature products on a GPU: GPT-2-small end to end, and the fused GGN head.

End to end (``--part e2e``): GPT-2-small-sized model from a config (12 layers, d=768,
vocabulary 50257, eager attention), random init, eval mode; 8 sequences of 1024 random
tokens in 4 batches of 2, labels = inputs (shifted inside the loss). Times are medians
of ``--repeats`` after one warm-up (device synchronised); "peak extra" is the maximum
allocated during one product minus the allocated before it. Unit: one gradient over the
4 batches through Hugging Face's own ``labels=`` loss (what the anchors call the
gradient). Precisions: float32 and bf16 autocast (parameters stay float32).

Head (``--part head``): ``z = h Wᵀ`` with d = 768, V = 50304, N = 16384 in bf16; the
materialised head GGN product (logits, tangent, fused CE-Hessian kernel, two products)
against :func:`curvops.kernels.linear_cross_entropy_ggn` (row chunks, vocabulary tiles).

Profile (``--part profile``): torch.profiler tables of one GGN and one Hessian product.

Run: ``python benchmarks/bench_lm.py --out DIR [--part e2e head profile] [--small]``.
Writes ``DIR/bench_lm.json`` and ``DIR/bench_lm.md``; prints the tables last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvops import GGNOperator, HessianOperator, ProductStrategy
from curvops.kernels import cross_entropy_hvp
from curvops.kernels.linear_cross_entropy_ggn import linear_cross_entropy_ggn
from curvops.lm import CausalLMLoss, causal_lm_data

GIB = 2**30
ANCHORS = {"gradient": 236.0, "ggn": 446.0, "hessian": 781.0, "hessian_fd": 493.0}
ANCHOR_MEM = {"ggn": 6.80, "hessian": 11.88, "hessian_fd": 6.11}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median wall time (ms) after one warm-up, and the peak extra memory of one call (GiB)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = float("nan")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / GIB
    return {"ms": statistics.median(times), "times": times, "peak_gib": peak}


# ---------------------------------------------------------------------------- end to end
class SummedTorchCE:
    """``loss``'s shifted cross-entropy through ``F.cross_entropy``, as a batch-sum callable."""

    reduction = "sum"  # read by curvops: the batch sum, not a mean

    def __init__(self, loss: CausalLMLoss) -> None:
        self.loss = loss

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            self.loss.flat_output(logits), self.loss.flat_target(labels), reduction="sum"
        )


def summed_torch_ce(loss: CausalLMLoss) -> SummedTorchCE:
    """``loss``'s shifted cross-entropy through ``F.cross_entropy``, as a batch-sum callable.

    Its Hessian is that of ``loss`` times the number of counted targets (a sum, not a mean).
    """
    return SummedTorchCE(loss)


def build_gpt2(small: bool, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    if small:
        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=1000,
            n_positions=64,
            # Taken by the config's **kwargs at run time; its dataclass signature does not list it.
            attn_implementation="eager",  # type: ignore[call-arg]
        )
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
    # As an nn.Module: transformers' decorated PreTrainedModel.to does not type-check.
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, config.vocab_size, shape, generator=gen).to(device)} for _ in range(4)
    ]
    return model, batches


class _GGNFuncJvp(GGNOperator):
    """The GGN with the no-graph tangents from ``torch.func.jvp`` (what hessian-eigenthings
    does) instead of ``torch.autograd.forward_ad`` dual tensors: a candidate CUDA strategy
    (built with ``strategy=ProductStrategy(output_tangent="separate_tangent_pass")``)."""

    def _jvp(self, inputs, tangents, keep_graph):
        assert not keep_graph
        primals = {n: p.detach() for n, p in zip(self.param_names, self.params)}
        with torch.no_grad():
            output, tangent = torch.func.jvp(
                lambda ps: self.forward(inputs, replace=ps),
                (primals,),
                (dict(zip(self.param_names, tangents)),),
            )
        return output, tangent


def eigenthings_operators(model, batches) -> dict[str, Any]:
    """hessian-eigenthings' GGN and Hessian (autograd, finite differences) on the same batches,
    if the package is importable (labels = inputs, shifted inside its HF loss helpers)."""
    try:
        import hessian_eigenthings as he
    except ImportError:
        return {}
    labelled = [{**b, "labels": b["input_ids"]} for b in batches]
    return {
        "eigenthings_ggn": he.GGNOperator(model, labelled, he.hf_lm_forward(), he.hf_lm_loss_of_output()),
        "eigenthings_hessian": he.HessianOperator(model, labelled, he.hf_lm_loss()),
        "eigenthings_hessian_fd": he.HessianOperator(
            model, labelled, he.hf_lm_loss(), method="finite_difference"
        ),
    }


def e2e(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    model, batches = build_gpt2(args.small, device)
    params = list(model.parameters())
    num_params = sum(p.numel() for p in params)
    data = causal_lm_data(batches)
    loss = CausalLMLoss()
    with_graph = ProductStrategy(output_tangent="dual_forward_with_graph")  # the CPU default
    separate = ProductStrategy(output_tangent="separate_tangent_pass")
    double_backward = ProductStrategy(hessian_vector="double_backward")  # single vectors
    ops = {
        "ggn": GGNOperator(model, loss, data, check_deterministic=False),
        "ggn_tangent_with_graph": GGNOperator(
            model, loss, data, strategy=with_graph, check_deterministic=False
        ),
        "ggn_func_jvp": _GGNFuncJvp(model, loss, data, strategy=separate, check_deterministic=False),
        "ggn_fused_head": GGNOperator(model, loss, data, fused_head=True, check_deterministic=False),
        "hessian": HessianOperator(model, loss, data, check_deterministic=False),
        "hessian_fd": HessianOperator(
            model, loss, data, method="finite_difference", check_deterministic=False
        ),
        "hessian_db": HessianOperator(model, loss, data, strategy=double_backward, check_deterministic=False),
    }
    # The pre-change Hessian path: the same objective through F.cross_entropy's own double
    # backward (a custom callable; its normaliser differs, the cost does not).
    ops["hessian_torch_ce"] = HessianOperator(model, summed_torch_ce(loss), data, check_deterministic=False)
    ops.update(eigenthings_operators(model, batches))
    gen = torch.Generator(device).manual_seed(0)
    v = torch.randn(num_params, device=device, generator=gen) * 1e-3

    def hf_gradient():
        grads = None
        for b in batches:
            out = model(**b, labels=b["input_ids"])
            g = torch.autograd.grad(out.loss / len(batches), params)
            grads = g if grads is None else [a + c for a, c in zip(grads, g)]
        return grads

    gradient_op = ops["hessian"]
    if args.methods:
        ops = {name: op for name, op in ops.items() if name in args.methods}
    rows = []
    for precision in args.precisions:
        ctx = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if precision != "fp32"
            else contextlib.nullcontext
        )
        with ctx():
            # Every method once per round, rounds in rotated order; each method's fastest round
            # (median of its repeats) is kept, so drifts of the machine hit all methods alike.
            names = [
                name
                for name in ops
                if precision == "fp32"
                or name not in ("hessian_fd", "hessian_db", "hessian_torch_ce", "eigenthings_hessian_fd")
            ]
            best: dict[str, dict[str, Any]] = {}
            for round_index in range(args.rounds):
                order = ["gradient (HF labels= loss)", "gradient (curvops loss_and_gradient)"] + names
                shift = round_index % len(order)
                for name in order[shift:] + order[:shift]:
                    call: Callable[[], Any]
                    if name.startswith("gradient (HF"):
                        call = hf_gradient
                    elif name.startswith("gradient (curvops"):
                        call = gradient_op.loss_and_gradient
                    else:
                        # hessian-eigenthings' operators take torch vectors through .matvec.
                        op = ops[name]
                        apply = op.matvec if name.startswith("eigenthings") else op.__matmul__
                        call = partial(apply, v)
                    try:
                        res = measure(call, args.repeats)
                    except Exception as exc:  # report, keep going
                        best[name] = {"error": repr(exc)[:300]}
                        continue
                    if name not in best or res["ms"] < best[name].get("ms", float("inf")):
                        best[name] = res
            grad = best["gradient (HF labels= loss)"]
            for name in order[:2] + names:
                row = {"precision": precision, "method": name, **best[name]}
                if "ms" in best[name] and not name.startswith("gradient (HF"):
                    row["gradients"] = best[name]["ms"] / grad["ms"]
                rows.append(row)
            print(
                precision,
                "done; reverse over forward passed its check:",
                ops["hessian"].single_vector_method == "reverse_over_forward" if "hessian" in ops else None,
                flush=True,
            )
    if not {"ggn", "ggn_fused_head", "ggn_func_jvp"} <= set(ops):
        return rows
    # Agreement of the fused head with the plain GGN on this model (float32).
    a, b = ops["ggn"] @ v, ops["ggn_fused_head"] @ v
    rows.append(
        {
            "precision": "fp32",
            "method": "check: ||G_fused v - G v|| / ||G v||",
            "value": float((a - b).norm() / a.norm()),
        }
    )
    c = ops["ggn_func_jvp"] @ v
    rows.append(
        {
            "precision": "fp32",
            "method": "check: ||G_func_jvp v - G v|| / ||G v||",
            "value": float((a - c).norm() / a.norm()),
        }
    )
    if "eigenthings_ggn" in ops:
        # Its GGN averages batch means with equal weights; the batches here are of equal size,
        # so it is the same objective as ours.
        e = ops["eigenthings_ggn"].matvec(v)
        rows.append(
            {
                "precision": "fp32",
                "method": "check: ||G_eigenthings v - G v|| / ||G v||",
                "value": float((a - e).norm() / a.norm()),
            }
        )
    return rows


# ---------------------------------------------------------------------------- head
def materialised_head(h, w, hd, wd, c):
    """The head GGN product on whole (N, V) tensors: logits, tangent, CE-Hessian kernel, 2 products."""
    z = h @ w.T
    zd = torch.addmm(hd @ w.T, h, wd.T)
    u = cross_entropy_hvp(z, zd, weight=c, reduction="sum")
    del z, zd
    return u @ w, u.T @ h


def head(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    n, d, vocab = (1024, 64, 5000) if args.small else (16384, 768, 50304)
    dtype = torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)
    h, hd = (torch.randn(n, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    w, wd = ((torch.randn(vocab, d, device=device, dtype=dtype, generator=gen) * d**-0.5) for _ in range(2))
    c = torch.full((n,), 1.0 / n, device=device)

    def materialised():
        return materialised_head(h, w, hd, wd, c)

    # The materialised path computes no log-sum-exp: the like-for-like fused rows skip it too.
    variants = {
        "materialised": materialised,
        "fused rows (default chunk)": lambda: linear_cross_entropy_ggn(h, w, hd, wd, c, return_lse=False)[:2],
        "fused rows (default chunk) + lse": lambda: linear_cross_entropy_ggn(h, w, hd, wd, c)[:2],
        "fused rows chunk 1024": lambda: linear_cross_entropy_ggn(
            h, w, hd, wd, c, chunk_rows=1024, return_lse=False
        )[:2],
        "fused rows chunk 4096": lambda: linear_cross_entropy_ggn(
            h, w, hd, wd, c, chunk_rows=4096, return_lse=False
        )[:2],
        "fused vocab tile 8192": lambda: linear_cross_entropy_ggn(h, w, hd, wd, c, strategy="vocab")[:2],
    }
    ref = [x.double() for x in materialised()]
    rows = []
    base = None
    for name, fn in variants.items():
        res = measure(fn, args.repeats * 3)
        out = fn()
        err = max(float((o.double() - r).norm() / r.norm()) for o, r in zip(out, ref))
        base = base or res
        rows.append(
            {
                "method": name,
                **res,
                "time_vs_materialised": res["ms"] / base["ms"],
                "mem_vs_materialised": res["peak_gib"] / base["peak_gib"],
                "rel_err_vs_materialised": err,
            }
        )
    return rows


# ---------------------------------------------------------------------------- profile
def profile(args: argparse.Namespace, device: str, out_dir: str) -> dict[str, str]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    model, batches = build_gpt2(args.small, device)
    data = causal_lm_data(batches)
    num = sum(p.numel() for p in model.parameters())
    v = torch.randn(num, device=device) * 1e-3
    tables = {}
    for name, op in (
        ("ggn", GGNOperator(model, CausalLMLoss(), data, check_deterministic=False)),
        (
            "ggn_fused_head",
            GGNOperator(model, CausalLMLoss(), data, fused_head=True, check_deterministic=False),
        ),
        ("hessian", HessianOperator(model, CausalLMLoss(), data, check_deterministic=False)),
    ):
        op @ v
        sync()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            op @ v
            sync()
        table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
        tables[name] = table
        with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
            f.write(table)
    return tables


# ---------------------------------------------------------------------------- report
def markdown(env: dict[str, str], e2e_rows, head_rows) -> str:
    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}; transformers {env['transformers']}; "
        f"triton {env['triton']}; Python {env['python']}.",
        "",
    ]
    if e2e_rows:
        lines += [
            "## End to end: GPT-2-small-sized model, 4 batches of 2 × 1024 tokens",
            "",
            "| precision | product | time ms | in gradients | peak extra GiB | anchor ms (gradients, GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in e2e_rows:
            if "value" in r:
                lines.append(f"| {r['precision']} | {r['method']} | {r['value']:.2e} | | | |")
                continue
            if "error" in r:
                lines.append(f"| {r['precision']} | {r['method']} | error: {r['error']} | | | |")
                continue
            key = {"ggn": "ggn", "hessian": "hessian", "hessian_fd": "hessian_fd"}.get(r["method"])
            anchor = ""
            if r["precision"] == "fp32" and key:
                anchor = (
                    f"{ANCHORS[key]:.0f} ({ANCHORS[key] / ANCHORS['gradient']:.2f}, {ANCHOR_MEM[key]:.2f})"
                )
            if r["precision"] == "fp32" and r["method"].startswith("gradient (HF"):
                anchor = f"{ANCHORS['gradient']:.0f} (1.0)"
            grads = f"{r['gradients']:.2f}" if "gradients" in r else "1.0" if "HF" in r["method"] else ""
            lines.append(
                f"| {r['precision']} | {r['method']} | {r['ms']:.1f} | {grads} | "
                f"{r['peak_gib']:.2f} | {anchor} |"
            )
        lines.append("")
    if head_rows:
        lines += [
            "## Head GGN product: d = 768, V = 50304, N = 16384, bf16",
            "",
            "| variant | time ms | vs materialised | peak extra GiB | vs materialised "
            "| rel. err vs materialised |",
            "|---|---|---|---|---|---|",
        ]
        for r in head_rows:
            lines.append(
                f"| {r['method']} | {r['ms']:.2f} | {r['time_vs_materialised']:.2f}x | {r['peak_gib']:.3f} | "
                f"{r['mem_vs_materialised']:.3f} | {r['rel_err_vs_materialised']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--part", nargs="+", default=["e2e", "head", "profile"], choices=["e2e", "head", "profile"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke test, also on the CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="e2e: rounds in rotated order, fastest kept")
    parser.add_argument("--methods", nargs="*", default=None, help="e2e: only these products")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16-autocast"], choices=["fp32", "bf16-autocast"]
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
    }
    results: dict[str, Any] = {"env": env}
    if "head" in args.part:
        results["head"] = head(args, device)
        print(markdown(env, [], results["head"]), flush=True)
    if "e2e" in args.part:
        results["e2e"] = e2e(args, device)
    if "profile" in args.part:
        results["profile"] = profile(args, device, args.out)
        for name, table in results["profile"].items():
            print(f"== profile {name}\n{table[:6000]}", flush=True)
    with open(os.path.join(args.out, "bench_lm.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = markdown(env, results.get("e2e", []), results.get("head", []))
    with open(os.path.join(args.out, "bench_lm.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
