"""LM curvature products side by side with hessian-eigenthings: GPT-2 small, large and XL on one GPU.

End to end (``--part e2e``): GPT-2 models from Hugging Face configs (random init, seed 0,
eager attention, float32 parameters, eval mode), built on the device; random tokens,
labels = inputs (shifted inside the loss):

======  ==========================  ===========================
model   parameters                  batches (count x size x T)
======  ==========================  ===========================
small   124M (12 x 768, 12 heads)   4 x 2 x 1024
large   774M (36 x 1280, 20 heads)  2 x 1 x 1024
xl      1.56B (48 x 1600, 25 heads) 2 x 1 x 1024
tiny    (``--small``: 2 x 64)       4 x 2 x 64, vocabulary 1000
======  ==========================  ===========================

One process per call, every model of ``--model`` in turn; per model every row below, in
``--rounds`` rounds in rotated order (a drift of the machine hits all rows alike). A row
runs one warm-up call, then ``--repeats`` timed calls (device synchronised); its time is
the median of the timed calls of its fastest round. Its memory is ``peak extra``: the
maximum allocated during its timed calls minus the allocated before them (peak statistics
reset per row), and the same for its warm-up call (``first call``, which includes one-time
checks). Unit: one gradient over the same batches through Hugging Face's ``labels=`` loss,
in the same precision. ``vs peer``: time and memory over those of the peer's row for the
same product. ``rel. error``: ``||A v - A_ref v|| / ||A_ref v||`` against the exact float32
products of curvops (GGN: ``output_tangent="separate_tangent_pass"``; Hessian:
``hessian_vector="double_backward"``), computed once per model before the rows.

Rows (``--methods`` selects by name, shell patterns allowed; a row whose API is not in the
installed curvops reports ``skipped: not available``):

- ``gradient`` (the unit), ``gradient_curvops`` (``loss_and_gradient``);
- ``ggn`` (strategy auto) and one row per ``output_tangent``: ``ggn_with_graph``,
  ``ggn_separate``, ``ggn_alongside``; ``ggn_fused_head`` (auto) and
  ``ggn_fused_head_{with_graph,separate,alongside}``; ``ggn_fd``
  (``method="finite_difference"``);
- ``hessian`` (auto; the row notes the ``single_vector_method`` it used),
  ``hessian_rof`` (reverse over forward), ``hessian_db`` (double backward), ``hessian_fd``
  (finite differences);
- the peer, hessian-eigenthings (``--require-peer 1.0.0a6`` to insist on its version):
  ``peer_ggn`` (its default: a finite-difference JVP, approximate), ``peer_hessian``
  (autograd), ``peer_hessian_fd`` (finite differences with its default step);
- with ``--autocast``: ``gradient``, ``ggn``, ``ggn_fused_head``, ``ggn_fd``,
  ``hessian``, ``peer_ggn``, ``peer_hessian`` again under bf16 autocast (parameters stay
  float32).

A row that runs out of GPU memory reports ``OOM`` (with the free memory after it) and the
run goes on. ``--budget-s`` bounds the whole call: once exceeded, the rows not yet measured
are reported as skipped. Per model the script prints a rough estimate of its time in
gradients, and in seconds once the gradient is measured (its first row).

The vector: ``randn(D) * 1e-3`` (seed 0), or its unit-norm direction with ``--unit-vector``
(the scale of a Lanczos vector, which the finite-difference steps see).

Head (``--part head``): ``z = h Wᵀ`` with d = 768, V = 50304, N = 16384 in bf16; the
materialised head GGN product (logits, tangent, fused CE-Hessian kernel, two products)
against :func:`curvops.kernels.linear_cross_entropy_ggn` (row chunks, vocabulary tiles).

Profile (``--part profile``): torch.profiler tables of one GGN and one Hessian product
(the first model of ``--model``).

Run: ``python benchmarks/bench_lm.py --out DIR [--part e2e head profile] [--model small large xl]
[--autocast] [--small]``. Writes ``DIR/bench_lm.json`` and ``DIR/bench_lm.md``; prints the
tables last.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _peers import eigenthings_operators, load_eigenthings

from curvops import GGNOperator, HessianOperator, ProductStrategy
from curvops.kernels import cross_entropy_hvp
from curvops.kernels.linear_cross_entropy_ggn import linear_cross_entropy_ggn
from curvops.lm import CausalLMLoss, causal_lm_data

__all__ = ["build_gpt2", "eigenthings_operators", "materialised_head", "measure", "summed_torch_ce"]

GIB = 2**30


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


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSize:
    """A GPT-2 configuration and its batches."""

    layers: int
    width: int
    heads: int
    vocab: int
    positions: int
    num_batches: int
    batch_size: int


MODEL_SIZES = {
    "tiny": ModelSize(2, 64, 2, 1000, 64, 4, 2),
    "small": ModelSize(12, 768, 12, 50257, 1024, 4, 2),
    "large": ModelSize(36, 1280, 20, 50257, 1024, 2, 1),
    "xl": ModelSize(48, 1600, 25, 50257, 1024, 2, 1),
}


def build_gpt2(size: bool | str, device: str) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A GPT-2 model from its config (seed 0, eager attention, eval mode) and its batches.

    Parameters
    ----------
    size : bool or {"tiny", "small", "large", "xl"}
        A key of ``MODEL_SIZES``; True means ``"tiny"`` and False ``"small"``.
    device : str
        Where the model is built and the batches live.

    Returns
    -------
    model : torch.nn.Module
        ``GPT2LMHeadModel``, float32.
    batches : list of dict
        ``{"input_ids": (B, T) int64}`` each, random tokens (seed 0).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    key = ("tiny" if size else "small") if isinstance(size, bool) else size
    spec = MODEL_SIZES[key]
    config = GPT2Config(
        n_layer=spec.layers,
        n_embd=spec.width,
        n_head=spec.heads,
        vocab_size=spec.vocab,
        n_positions=spec.positions,
        # Taken by the config's **kwargs at run time; its dataclass signature does not list it.
        attn_implementation="eager",  # type: ignore[call-arg]
    )
    torch.manual_seed(0)
    # Initialised on the device, not on the host and then moved: the random initialisation of a
    # billion-parameter model is work for the GPU.
    with torch.device(device):
        # As an nn.Module: transformers' decorated PreTrainedModel.to does not type-check.
        model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    shape = (spec.batch_size, spec.positions)
    batches = [
        {"input_ids": torch.randint(0, spec.vocab, shape, generator=gen).to(device)}
        for _ in range(spec.num_batches)
    ]
    return model, batches


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


# ---------------------------------------------------------------------------- end to end
class NotAvailable(Exception):
    """The installed curvops (or peer) lacks the API a row needs."""


# output_tangent of each GGN row suffix ("" is the strategy "auto").
GGN_TANGENTS = {
    "": None,
    "_with_graph": "dual_forward_with_graph",
    "_separate": "separate_tangent_pass",
    "_alongside": "alongside_forward",
}
# Rough cost of a row in gradients, for the printed time estimate only
# (see benchmarks/results/lm_h100_2026-12-02.md).
COST = {"gradient": 1.0, "ggn": 2.7, "ggn_fd": 2.3, "hessian": 3.5, "hessian_fd": 2.3}
# The exact products every row's error is measured against: (row, precision) per product.
REFERENCE_ROWS = {"ggn": ("ggn_separate", "fp32"), "hessian": ("hessian_db", "fp32")}
AUTOCAST_ROWS = ("gradient", "ggn", "ggn_fused_head", "ggn_fd", "hessian", "peer_ggn", "peer_hessian")


@dataclass
class Row:
    """One product measured on one model: how to build its call, and what it is compared with."""

    name: str
    precision: str  # "fp32" or "bf16-autocast"
    product: str  # "gradient", "ggn" or "hessian": which reference its error is against
    build: Callable[[], Callable[[], Any]]  # raises NotAvailable when the API is missing
    peer: str | None = None  # the peer's row for the same product
    note: Callable[[], str] | None = None  # read after the row ran (e.g. the method auto chose)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        if self.name.endswith("_fd"):
            return COST["hessian_fd" if self.product == "hessian" else "ggn_fd"]
        return COST[self.product]


def _strategy(**fields: Any) -> ProductStrategy:
    try:
        return ProductStrategy(**fields)
    except (TypeError, ValueError) as exc:
        raise NotAvailable(str(exc)) from None


def _construct(cls: type, *args: Any, **kwargs: Any) -> Any:
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:  # an argument this version does not take
        raise NotAvailable(str(exc)) from None


def build_rows(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], v: torch.Tensor, autocast: bool
) -> list[Row]:
    """Every row of the end-to-end table on ``model`` and ``batches``, applied to ``v``.

    The operators are built on first use and shared by the float32 and autocast rows.
    """
    params = list(model.parameters())
    data = causal_lm_data(batches)
    loss = CausalLMLoss()
    factories: dict[str, Callable[[], Any]] = {}

    def ggn(tangent: str | None, fused: bool) -> Callable[[], Any]:
        def make() -> Any:
            strategy = "auto" if tangent is None else _strategy(output_tangent=tangent)
            return GGNOperator(
                model, loss, data, fused_head=fused, check_deterministic=False, strategy=strategy
            )

        return make

    for suffix, tangent in GGN_TANGENTS.items():
        factories["ggn" + suffix] = ggn(tangent, False)
        factories["ggn_fused_head" + suffix] = ggn(tangent, True)
    factories["ggn_fd"] = lambda: _construct(
        GGNOperator, model, loss, data, method="finite_difference", fd_eps=None, check_deterministic=False
    )
    factories["hessian"] = lambda: HessianOperator(model, loss, data, check_deterministic=False)
    factories["hessian_rof"] = lambda: HessianOperator(
        model,
        loss,
        data,
        strategy=_strategy(hessian_vector="reverse_over_forward"),
        check_deterministic=False,
    )
    factories["hessian_db"] = lambda: HessianOperator(
        model, loss, data, strategy=_strategy(hessian_vector="double_backward"), check_deterministic=False
    )
    factories["hessian_fd"] = lambda: HessianOperator(
        model, loss, data, method="finite_difference", check_deterministic=False
    )
    peer_ops: dict[str, Any] | None = None

    def peer(name: str) -> Any:
        nonlocal peer_ops
        if peer_ops is None:
            peer_ops = eigenthings_operators(model, batches)
        if name not in peer_ops:
            raise NotAvailable("hessian-eigenthings is not importable")
        return peer_ops[name]

    factories["peer_ggn"] = partial(peer, "eigenthings_ggn")
    factories["peer_hessian"] = partial(peer, "eigenthings_hessian")
    factories["peer_hessian_fd"] = partial(peer, "eigenthings_hessian_fd")
    ops: dict[str, Any] = {}

    def op(name: str) -> Any:
        if name not in ops:
            ops[name] = factories[name]()
        return ops[name]

    def hf_gradient() -> list[torch.Tensor]:
        grads: list[torch.Tensor] = []
        for b in batches:
            out = model(**b, labels=b["input_ids"])
            g = torch.autograd.grad(out.loss / len(batches), params)
            grads = list(g) if not grads else [a + c for a, c in zip(grads, g)]
        return grads

    def product(name: str) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            operator = op(name)
            # hessian-eigenthings' operators take torch vectors through .matvec.
            return partial(operator.matvec, v) if name.startswith("peer") else partial(operator.__matmul__, v)

        return make

    names = ["gradient", "gradient_curvops"]
    names += ["ggn" + s for s in GGN_TANGENTS] + ["ggn_fused_head" + s for s in GGN_TANGENTS]
    names += ["ggn_fd", "hessian", "hessian_rof", "hessian_db", "hessian_fd"]
    names += ["peer_ggn", "peer_hessian", "peer_hessian_fd"]
    rows = []
    for precision in ["fp32"] + (["bf16-autocast"] if autocast else []):
        for name in names:
            if precision != "fp32" and name not in AUTOCAST_ROWS:
                continue
            kind = "gradient" if name.startswith("gradient") else "ggn" if "ggn" in name else "hessian"
            build: Callable[[], Callable[[], Any]]
            if name == "gradient":
                build = lambda: hf_gradient  # noqa: E731
            elif name == "gradient_curvops":
                build = lambda: op("hessian").loss_and_gradient  # noqa: E731
            else:
                build = product(name)
            peer_row = None
            if kind != "gradient" and not name.startswith("peer"):
                peer_row = {"ggn": "peer_ggn", "hessian": "peer_hessian"}[kind]
                peer_row = "peer_hessian_fd" if name == "hessian_fd" else peer_row
            note = None
            if name == "hessian":
                note = lambda: f"single_vector_method: {op('hessian').single_vector_method}"  # noqa: E731
            rows.append(Row(name, precision, kind, build, peer_row, note))
    return rows


def _autocast(device: str, call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.autocast(device, dtype=torch.bfloat16):
            return call()

    return run


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_since(before: int) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    return (torch.cuda.max_memory_allocated() - before) / GIB


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / GIB if torch.cuda.is_available() else float("nan")


def timed_calls(call: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, Any]]:
    """One warm-up call, then ``repeats`` timed calls; the last call's result and the statistics.

    ``first_peak_gib`` / ``peak_gib``: maximum allocated during the warm-up / the timed calls
    minus the allocated before them (GiB; NaN without CUDA). A result is released before the
    next call starts, so no call's peak holds the previous result. ``base_gib``: allocated
    before the warm-up (model, data, vector, and whatever operators keep between products).
    """
    before = _allocated()
    base_gib = before / GIB
    _reset_peak()
    sync()
    t0 = time.perf_counter()
    out = call()
    sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    first_peak = _peak_since(before)
    del out
    before = _allocated()
    _reset_peak()
    times = []
    out = None
    for _ in range(repeats):
        out = None
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    stats = {
        "ms": statistics.median(times),
        "times": times,
        "peak_gib": _peak_since(before),
        "first_ms": first_ms,
        "first_peak_gib": first_peak,
        "base_gib": base_gib,
    }
    return out, stats


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64, ``ref`` on the host, streamed to ``out``'s device in chunks."""
    num = den = 0.0
    chunk = 1 << 26
    for start in range(0, ref.numel(), chunk):
        r = ref[start : start + chunk].to(out.device, non_blocking=True).double()
        o = out.reshape(-1)[start : start + chunk].double()
        num += float((o - r).square().sum())
        den += float(r.square().sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def _to_host(x: torch.Tensor) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
    host.copy_(x)
    return host


def _fingerprint(params: Sequence[torch.Tensor]) -> list[float]:
    with torch.no_grad():
        return [float(p.double().sum()) for p in params]


def _estimate_gradients(rows: list[Row], rounds: int, repeats: int) -> float:
    """Rough cost of the rows and the two reference products, in gradients."""
    per_round = sum(r.cost for r in rows) * (1 + repeats)
    return rounds * per_round + COST["ggn"] + COST["hessian"]


def e2e_model(
    args: argparse.Namespace,
    key: str,
    device: str,
    deadline: float,
    info: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """All rows on one model size into ``info``; see the module docstring.

    ``info["rows"]`` holds the table so far after every round, and ``save`` runs then, so a
    call stopped from outside keeps its finished rounds.
    """
    spec = MODEL_SIZES[key]
    t_build = time.perf_counter()
    model, batches = build_gpt2(key, device)
    params = list(model.parameters())
    num_params = sum(p.numel() for p in params)
    gen = torch.Generator(device).manual_seed(0)
    v = torch.randn(num_params, device=device, generator=gen)
    v = v / v.norm() if args.unit_vector else v * 1e-3
    rows = build_rows(model, batches, v, args.autocast)
    if args.methods:
        keep = [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in args.methods)]
        rows = [r for r in rows if r.name == "gradient"] + [r for r in keep if r.name != "gradient"]
    info.update(
        model=key,
        parameters=num_params,
        batches=f"{spec.num_batches} x {spec.batch_size} x {spec.positions}",
        build_s=time.perf_counter() - t_build,
    )
    info["estimate_gradients"] = _estimate_gradients(rows, args.rounds, args.repeats)
    print(
        f"== {key}: {num_params / 1e6:.1f}M parameters, {info['batches']}, {len(rows)} rows; "
        f"rough estimate {info['estimate_gradients']:.0f} gradients; built in {info['build_s']:.0f} s",
        flush=True,
    )
    fingerprint = _fingerprint(params)

    # The exact float32 products every row's error is measured against.
    refs: dict[str, torch.Tensor] = {}
    wanted = {r.product for r in rows} - {"gradient"}
    for kind, (row_name, _) in REFERENCE_ROWS.items():
        if kind not in wanted:
            continue
        try:
            ref_row = next(r for r in build_rows(model, batches, v, False) if r.name == row_name)
            t0 = time.perf_counter()
            refs[kind] = _to_host(ref_row.build()())
            info[f"reference_{kind}_s"] = time.perf_counter() - t0
            del ref_row
        except Exception as exc:  # report, keep going: the rows still get times
            info[f"reference_{kind}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        _free_memory()

    skipped_budget = False
    for round_index in range(args.rounds):
        shift = round_index * len(rows) // args.rounds
        for row in rows[shift:] + rows[:shift]:
            if row.result.get("status", "ok") != "ok" or "later_round" in row.result:
                continue  # skipped, out of memory or failed in an earlier round
            if time.monotonic() > deadline:
                skipped_budget = True
                if not row.result:
                    row.result = {"status": "skipped: budget exceeded"}
                continue
            _free_memory()
            try:
                call = row.build()
            except NotAvailable as exc:
                row.result = {"status": f"skipped: not available ({str(exc)[:160]})"}
                continue
            if row.precision != "fp32":
                call = _autocast(device, call)
            failure: dict[str, Any] | None = None
            try:
                out, stats = timed_calls(call, args.repeats)
            except Exception as exc:  # report, keep going
                # An out-of-memory error may reach here re-raised by the library as another type.
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
                failure = {
                    "status": "OOM" if oom else "error",
                    "message": f"{type(exc).__name__}: {str(exc)[:300]}",
                }
            if failure is not None:
                del call
                _free_memory()
                failure["free_gib_after"] = _free_gib()
                if row.result:  # measured in an earlier round: keep it, note the failure
                    row.result["later_round"] = failure
                else:
                    row.result = failure
                if _fingerprint(params) != fingerprint:
                    info["stopped"] = f"parameters changed by the failed row {row.name}"
                    break
                continue
            first = not row.result
            if first:
                row.result = {"status": "ok", **stats}
            else:
                # The first call of the first round is the one that runs one-time checks: its
                # statistics stay; the peak is the largest of any round.
                peak = max(row.result["peak_gib"], stats["peak_gib"])
                if stats["ms"] < row.result["ms"]:
                    row.result.update(ms=stats["ms"], times=stats["times"])
                row.result["peak_gib"] = peak
            if first and row.note is not None:
                try:
                    row.result["note"] = row.note()
                except Exception as exc:  # an attribute this version lacks: the times stand
                    row.result["note"] = f"note unavailable: {type(exc).__name__}: {str(exc)[:100]}"
            if first and (row.name, row.precision) in REFERENCE_ROWS.values():
                row.result["note"] = "the reference"
            if first and row.product in refs and torch.is_tensor(out):
                row.result["rel_error"] = relative_error(out, refs[row.product])
            if first and row.name == "gradient" and row.precision == "fp32" and round_index == 0:
                estimate = info["estimate_gradients"] * stats["ms"] / 1e3
                info["estimate_s_measured"] = estimate
                print(f"   gradient {stats['ms']:.1f} ms: estimate for {key} ~{estimate:.0f} s", flush=True)
            del out, call
        info["rows"] = _table(rows)
        info["total_s"] = time.perf_counter() - t_build
        save()
        if "stopped" in info:
            break
    if skipped_budget:
        info["budget"] = f"--budget-s {args.budget_s:.0f} exceeded: later rows or rounds skipped"
    info["rows"] = _table(rows)
    info["total_s"] = time.perf_counter() - t_build
    del model, batches, params, v, rows, refs


def _table(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows' results with their gradients and their ratios to the peer's row."""
    by_key = {(r.name, r.precision): r.result for r in rows}
    table = []
    for row in rows:
        res = {"name": row.name, "precision": row.precision, "product": row.product, **row.result}
        res.setdefault("status", "not run")
        unit = by_key.get(("gradient", row.precision), {})
        if res.get("status") == "ok" and unit.get("status") == "ok":
            res["gradients"] = res["ms"] / unit["ms"]
        peer_res = by_key.get((row.peer, row.precision), {}) if row.peer else {}
        if res.get("status") == "ok" and peer_res.get("status") == "ok":
            res["vs_peer_time"] = res["ms"] / peer_res["ms"]
            res["vs_peer_mem"] = res["peak_gib"] / peer_res["peak_gib"] if peer_res["peak_gib"] else None
        table.append(res)
    return table


def e2e(
    args: argparse.Namespace,
    device: str,
    start: float,
    results: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every model of ``--model`` in turn into ``results``, within ``--budget-s`` from ``start``.

    ``start`` is in ``time.monotonic()`` seconds; ``save`` runs after each model.
    """
    deadline = start + args.budget_s
    for key in ["tiny"] if args.small else args.model:
        if time.monotonic() > deadline:
            results.append({"model": key, "skipped": f"--budget-s {args.budget_s:.0f} exceeded"})
            continue
        info: dict[str, Any] = {"model": key}
        results.append(info)
        try:
            e2e_model(args, key, device, deadline, info, save)
        except Exception as exc:  # e.g. the model does not fit: report, go on with the next
            info["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        _free_memory()  # the model's operators and reference products went with e2e_model's frame
        print(markdown_e2e(results[-1]), flush=True)
        save()


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

    model, batches = build_gpt2("tiny" if args.small else args.model[0], device)
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
def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


# The side-by-side summary: (label, precision, our rows, the peer's row).
SUMMARY = (
    ("GGN", "fp32", ("ggn", "ggn_fused_head", "ggn_fd"), "peer_ggn"),
    ("Hessian (autograd)", "fp32", ("hessian", "hessian_db"), "peer_hessian"),
    ("Hessian (finite differences)", "fp32", ("hessian_fd",), "peer_hessian_fd"),
    ("GGN, bf16 autocast", "bf16-autocast", ("ggn", "ggn_fused_head", "ggn_fd"), "peer_ggn"),
    ("Hessian, bf16 autocast", "bf16-autocast", ("hessian",), "peer_hessian"),
)


def _summary_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r.get("status") != "ok":
        return f"{r['name']}: {r.get('status', '').split(' (')[0]}"
    grads, gib = _fmt(r.get("gradients"), ".2f"), _fmt(r["peak_gib"], ".1f")
    text = f"{r['name']}: {r['ms']:.0f} ms = {grads} grads, {gib} GiB"
    if "rel_error" in r and r.get("note") != "the reference":
        text += f", error {r['rel_error']:.1e}"
    return text


def markdown_e2e(info: dict[str, Any]) -> str:
    """One model's table (see the module docstring for the columns)."""
    if "skipped" in info or "rows" not in info:
        return f"## {info['model']}: skipped ({info.get('skipped', 'not finished')})\n"
    lines = [
        f"## GPT-2 {info['model']}: {info['parameters']:,} parameters, batches {info['batches']}",
        "",
    ]
    for key in ("reference_ggn", "reference_hessian", "budget", "stopped"):
        if key in info:
            lines.append(f"- {key}: {info[key]}")
    lines += [
        f"- {info['total_s']:.0f} s in all (estimate {info.get('estimate_s_measured', 0):.0f} s); "
        f"built in {info['build_s']:.0f} s; reference products "
        f"{_fmt(info.get('reference_ggn_s'), '.1f')} s (GGN), "
        f"{_fmt(info.get('reference_hessian_s'), '.1f')} s (Hessian)",
        "",
        "| product | curvops | hessian-eigenthings |",
        "|---|---|---|",
    ]
    rows = {(r["name"], r["precision"]): r for r in info["rows"]}
    for label, precision, ours, peer in SUMMARY:
        cells = [_summary_cell(rows[(n, precision)]) for n in ours if (n, precision) in rows]
        if cells:
            lines.append(f"| {label} | {'<br>'.join(cells)} | {_summary_cell(rows.get((peer, precision)))} |")
    lines += [
        "",
        "| row | precision | ms | gradients | peak extra GiB (first call) | vs peer time, memory "
        "| rel. error vs exact | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        status = r.get("status", "")
        if status != "ok":
            detail = r.get("message", "")
            if status == "OOM":
                detail = f"free after: {_fmt(r.get('free_gib_after'), '.1f')} GiB"
            lines.append(f"| {r['name']} | {r['precision']} | {status} | | | | | {detail[:200]} |")
            continue
        vs_peer = ""
        if "vs_peer_time" in r:
            vs_peer = f"{r['vs_peer_time']:.2f}x"
            if r.get("vs_peer_mem") == r.get("vs_peer_mem") and r.get("vs_peer_mem") is not None:
                vs_peer += f", {r['vs_peer_mem']:.2f}x"
        note = r.get("note", "")
        if r["first_ms"] > 1.5 * r["ms"]:  # one-time work (checks, kernel compilation) shows here
            note += f" first call {r['first_ms']:.0f} ms"
        if "later_round" in r:
            note += f" (later round: {r['later_round']['status']})"
        lines.append(
            f"| {r['name']} | {r['precision']} | {r['ms']:.1f} | {_fmt(r.get('gradients'), '.2f')} | "
            f"{_fmt(r['peak_gib'], '.2f')} ({_fmt(r['first_peak_gib'], '.2f')}) | {vs_peer} | "
            f"{_fmt(r.get('rel_error'), '.1e')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def markdown_head(head_rows: list[dict[str, Any]]) -> str:
    lines = [
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
    return "\n".join(lines) + "\n"


def markdown(env: dict[str, str], results: dict[str, Any]) -> str:
    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}; transformers {env['transformers']}; "
        f"triton {env['triton']}; Python {env['python']}; curvops commit {env['commit']}; "
        f"hessian-eigenthings {env['peer_version']} ({env['peer_path']}); {env['date']}.",
        "",
        f"Command: `{env['command']}`",
        "",
    ]
    for info in results.get("e2e", []):
        lines.append(markdown_e2e(info))
    if results.get("head"):
        lines.append(markdown_head(results["head"]))
    return "\n".join(lines)


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+changes" if dirty else "")


def main() -> None:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--part", nargs="+", default=["e2e", "head", "profile"], choices=["e2e", "head", "profile"]
    )
    parser.add_argument(
        "--model", nargs="+", default=["small"], choices=["small", "large", "xl"], help="e2e: model sizes"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row and round")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke test, also on the CPU)")
    parser.add_argument("--rounds", type=int, default=2, help="e2e: rounds in rotated order, fastest kept")
    parser.add_argument("--methods", nargs="*", default=None, help="e2e: only these rows (shell patterns)")
    parser.add_argument("--autocast", action="store_true", help="e2e: also the bf16 autocast rows")
    parser.add_argument(
        "--unit-vector",
        action="store_true",
        help="e2e: multiply a unit vector (as Lanczos does) instead of randn(D) * 1e-3",
    )
    parser.add_argument(
        "--budget-s", type=float, default=float("inf"), help="skip the rows not yet measured after this"
    )
    parser.add_argument(
        "--require-peer", default=None, help="fail at once unless hessian-eigenthings is this version"
    )
    parser.add_argument("--commit", default=None, help="curvops commit to report (default: from git)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    _, peer = load_eigenthings(args.require_peer)
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {
        "gpu": (
            f"{torch.cuda.get_device_name()}, {torch.cuda.mem_get_info()[1] / GIB:.0f} GiB"
            if device == "cuda"
            else "cpu"
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "commit": args.commit or _commit(),
        "peer_version": peer["version"],
        "peer_path": peer["path"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"hessian-eigenthings {peer['version']} from {peer['path'] or '-'}", flush=True)
    results: dict[str, Any] = {"env": env}

    def save() -> None:
        with open(os.path.join(args.out, "bench_lm.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "bench_lm.md"), "w") as f:
            f.write(markdown(env, results) + "\n")

    if "head" in args.part:
        results["head"] = head(args, device)
        print(markdown_head(results["head"]), flush=True)
        save()
    if "e2e" in args.part:
        results["e2e"] = []
        e2e(args, device, start, results["e2e"], save)
    if "profile" in args.part:
        results["profile"] = profile(args, device, args.out)
        for name, table in results["profile"].items():
            print(f"== profile {name}\n{table[:6000]}", flush=True)
    save()
    print(markdown(env, results))
    print(f"total {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
