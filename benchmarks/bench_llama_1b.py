"""A 1.1B-parameter Llama-style decoder on one GPU: top eigenvalues, trace and spectral density.

What a user can expect from curvops' public API on a model of TinyLlama-1.1B's shape (hidden
2048, 22 layers, MLP 5632, 32 heads with 4 key-value heads, vocabulary 32000, untied head;
1,100,048,384 parameters), built from a ``LlamaConfig`` with random weights (seed 0), on fixed
random token batches (labels = inputs, shifted inside :class:`curvops.lm.CausalLMLoss`):

1. **product**: one gradient (Hugging Face's ``labels=`` loss, ``torch.autograd.grad``) and one
   curvature product, each the median of ``--repeats`` after a warm-up (the first product runs
   the operator's one-time checks: its time is reported apart), with the peak memory of one
   call (``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before);
2. **lanczos**: the ``--k`` largest eigenvalues by :func:`curvops.lanczos`, with the residual
   norm ``||A v - lambda v||`` of every pair, each from one more product;
3. **xtrace**: the trace by :func:`curvops.xtrace` (Epperly, Tropp and Webber 2024) with its
   jackknife standard error;
4. **slq**: the spectral density by :func:`curvops.spectral_density` (stochastic Lanczos
   quadrature, Ubaru, Chen and Saad 2017): its support, its first two moments with their
   standard errors, and a figure (``SpectralDensity.plot``) where matplotlib is installed.

Every phase reports its wall time, its number of products and its peak memory (reset per
phase); the run reports its total wall time, model build included.

The algorithms multiply through :class:`ColumnProducts`, a torch-native operator (the protocol
of :func:`curvops.algorithms.vectors.as_operand`) that applies the curvature operator to one
column at a time: a block of ``c`` columns through a batched product holds ``c`` columns'
activations, which at this size is several GiB each; one at a time the product's memory is
that of a single vector whatever block an algorithm asks for. With ``--dtype bfloat16`` the
model and its products run in bfloat16 while the algorithms' vectors stay float32: Lanczos'
orthogonality and the estimators' sums in bfloat16 (unit roundoff ``2**-8``) would lose most
of the digits the products have.

The GGN is the default product: it is positive semi-definite, costs about two gradients
against about three for the Hessian, and differentiates the network once, so its bfloat16
rounding stays that of a gradient, while the Hessian's second-order terms lose all digits in
bfloat16 (docs/concepts.md, "Numerical precision").

Memory: a float32 vector of 1.1e9 entries is 4.1 GiB. The Lanczos basis size
(``max_basis_size``) and the working memory of XTrace and SLQ (``memory_budget=``) are sized
to the memory left after the model and one product's peak: a 141 GB card holds the default
basis of 20; on a smaller one the basis shrinks to what fits, and below ``k + 1`` vectors the
phase is skipped with the reason (shorter sequences, ``--seq-len``, lower a product's peak).

``--budget-s`` shrinks (or skips) a phase whose products, at the measured time per product,
would end past the budget; the report says which. The defaults (2 batches of 1 x 1024
tokens, 60 Lanczos steps, 16 XTrace products, 2 SLQ probes of 12 steps) are sized for about
four minutes on an H200 in float32 (the ``--budget-s`` default, 240, holds a run to that).

Run: ``python benchmarks/bench_llama_1b.py --out DIR`` (``--small``: a tiny model that runs on
the CPU in seconds). Writes ``DIR/llama_1b_<gpu>_<date>.md`` (``llama_1b-<product>-<dtype>_...``
for other than the GGN in float32), a ``.json`` with every number, and a ``.png`` of the
density if matplotlib is installed; prints the markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curvops
from curvops import lanczos, spectral_density, xtrace
from curvops.lm import causal_lm_operator

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: TinyLlama-1.1B's shape (its config.json), untied head as there.
FULL_SHAPE = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
#: A shape small enough for a dense reference (D = 1704) and a CPU run in seconds.
SMALL_SHAPE = {
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "intermediate_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 32,
}
#: Headroom kept free on the GPU beyond the measured peaks (allocator fragmentation, cuBLAS
#: workspaces, the algorithms' small host-side reads).
MARGIN_BYTES = 2 * GIB
#: Lanczos' default basis size for k <= 9 (``max(2 k + 1, 20)``, as eigsh).
DEFAULT_BASIS = 20


# ---------------------------------------------------------------------------- model and data
def build_model(small: bool, dtype: torch.dtype, attn: str, device: torch.device) -> torch.nn.Module:
    """The Llama-style decoder from a config, random weights (seed 0), in eval mode.

    Parameters
    ----------
    small : bool
        :data:`SMALL_SHAPE` instead of :data:`FULL_SHAPE`.
    dtype : torch.dtype
        Parameter dtype (float32 or bfloat16).
    attn : {"eager", "sdpa"}
        ``attn_implementation``; curvops routes SDPA to its math kernel during products.
    device : torch.device
        Where the weights are created (initialised there: no host copy of 4 GiB).

    Returns
    -------
    torch.nn.Module
        A ``LlamaForCausalLM``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    shape: dict[str, Any] = SMALL_SHAPE if small else FULL_SHAPE
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        # Taken by the config's **kwargs at run time; its signature does not list it.
        attn_implementation=attn,  # type: ignore[call-arg]
    )
    torch.manual_seed(0)
    with torch.device(device):
        model: torch.nn.Module = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def token_batches(
    num_batches: int, batch_size: int, seq_len: int, vocab_size: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Fixed random token batches (seed 0), Hugging Face style.

    Parameters
    ----------
    num_batches, batch_size, seq_len : int
        ``num_batches`` dicts of ``input_ids`` of shape ``(batch_size, seq_len)``.
    vocab_size : int
        Tokens are uniform in ``[0, vocab_size)``.
    device : torch.device
        Where the batches live.

    Returns
    -------
    list of dict
        ``[{"input_ids": LongTensor (batch_size, seq_len)}, ...]``.
    """
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)}
        for _ in range(num_batches)
    ]


# ---------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ColumnProducts:
    """A curvature operator as a torch-native operator on float32 vectors, one column at a time.

    The protocol of :func:`curvops.algorithms.vectors.as_operand` (``shape``, ``device``,
    ``torch_dtype``, ``is_symmetric``, ``matmat_torch(X, out=)``). Each column goes through
    ``operator @ column`` in the operator's dtype; every product is timed (device synchronised).

    Parameters
    ----------
    operator : curvops.CurvatureOperator
        The curvature operator, shape ``(D, D)``, on ``operator.device`` in ``operator.torch_dtype``.

    Attributes
    ----------
    times : list of float
        Wall time of every product since the last :meth:`reset`, seconds.
    """

    is_symmetric = True

    def __init__(self, operator: Any) -> None:
        self.operator = operator
        self.shape = operator.shape
        self.device = operator.device
        self.torch_dtype = torch.float32
        self.times: list[float] = []

    def reset(self) -> None:
        """Forget the recorded product times."""
        self.times = []

    def matmat_torch(self, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``A @ X`` column by column.

        Parameters
        ----------
        X : Tensor, shape (D, c), float32
            The columns.
        out : Tensor, shape (D, c), float32, optional
            Written in place and returned if given.

        Returns
        -------
        Tensor, shape (D, c), float32
            ``A @ X``.
        """
        if out is None:
            out = torch.empty(X.shape, dtype=self.torch_dtype, device=self.device)
        for column in range(X.shape[1]):
            sync(self.device)
            start = time.perf_counter()
            product = self.operator @ X[:, column].to(self.operator.torch_dtype)
            out[:, column].copy_(product)
            del product
            sync(self.device)
            self.times.append(time.perf_counter() - start)
        return out


@contextlib.contextmanager
def phase_memory(device: torch.device, record: dict[str, Any]) -> Iterator[None]:
    """Record a phase's peak allocated memory (absolute, and above what was allocated at its start).

    Writes ``peak_gib`` and ``peak_extra_gib`` into ``record`` (None on the CPU: torch keeps
    no allocation statistics there) and ``wall_s``.
    """
    before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        record["wall_s"] = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            record["peak_gib"] = peak / GIB
            record["peak_extra_gib"] = (peak - before) / GIB
        else:
            record["peak_gib"] = record["peak_extra_gib"] = None


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """Median wall time of ``repeats`` calls after one warm-up, and one call's peak extra memory.

    Returns
    -------
    dict
        ``first_s`` (the warm-up call), ``median_s``, ``times_s``, ``peak_extra_gib`` (None on
        the CPU).
    """
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak_extra = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peak_extra = (torch.cuda.max_memory_allocated(device) - before) / GIB
    return {
        "first_s": first,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_extra_gib": peak_extra,
    }


def measure_products(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], products: ColumnProducts, repeats: int
) -> dict[str, Any]:
    """One gradient over ``batches`` (Hugging Face's ``labels=`` loss, the unit of the report)
    and one product of ``products``, each by :func:`timed`.

    Returns
    -------
    dict
        ``gradient`` and ``product`` (:func:`timed`'s records) and ``resident_gib``, the memory
        allocated before either (model and data; None on the CPU).
    """
    device = products.device
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> list[torch.Tensor]:
        total: list[torch.Tensor] = []
        for batch in batches:
            loss = model(**batch, labels=batch["input_ids"]).loss / len(batches)
            grads = torch.autograd.grad(loss, params)
            total = list(grads) if not total else [a + b for a, b in zip(total, grads)]
        return total

    resident = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    dim = products.shape[0]
    vector = torch.randn(dim, 1, generator=torch.Generator().manual_seed(1)).to(device)
    return {
        "gradient": timed(gradient, repeats, device),
        "product": timed(lambda: products.matmat_torch(vector), repeats, device),
        "resident_gib": resident,
    }


def free_bytes(device: torch.device, product_extra_gib: float | None) -> float | None:
    """Bytes the algorithms may hold: the device's memory less what is allocated now, one
    product's peak and :data:`MARGIN_BYTES`; None on the CPU (no limit is planned there)."""
    if device.type != "cuda" or product_extra_gib is None:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    allocated = torch.cuda.memory_allocated(device)
    return max(total - allocated - product_extra_gib * GIB - MARGIN_BYTES, 0.0)


class Budget:
    """The wall-clock budget of the run: how many products still fit.

    Parameters
    ----------
    seconds : float or None
        Budget of the whole run from ``start`` (None: unlimited).
    start : float
        ``time.perf_counter()`` at the start of the run.
    """

    def __init__(self, seconds: float | None, start: float) -> None:
        self.seconds = seconds
        self.start = start

    def products_left(self, seconds_per_product: float) -> int | None:
        """Products that fit the remaining budget, with 10% headroom for the algorithms' own
        work (None: unlimited)."""
        if self.seconds is None:
            return None
        left = self.seconds - (time.perf_counter() - self.start)
        return max(int(left / (1.1 * seconds_per_product)), 0)


# ---------------------------------------------------------------------------- phases
def run_lanczos(
    products: ColumnProducts,
    args: argparse.Namespace,
    budget: Budget,
    per_product_s: float,
    free: float | None,
) -> dict[str, Any]:
    """The ``args.k`` largest eigenvalues, with explicit residual norms (one product per pair)."""
    record: dict[str, Any] = {"notes": []}
    dim = products.shape[0]
    vector_bytes = dim * 4
    basis = min(DEFAULT_BASIS, dim - 1)
    if free is not None:
        # The basis (m + 1 rows), then the k Ritz vectors formed from it, then one residual.
        fitting = int(free // vector_bytes) - 1 - args.k - 1
        if fitting < basis:
            record["notes"].append(f"basis size {max(fitting, 0)} (not {basis}): what fits the free memory")
            basis = fitting
    steps = args.lanczos_iters
    left = budget.products_left(per_product_s)
    if left is not None and steps + args.k > left:
        steps = left - args.k
        record["notes"].append(f"max_iter {max(steps, 0)} (not {args.lanczos_iters}): what fits --budget-s")
    if basis < args.k + 1 or steps < args.k + 1:
        record["skipped"] = "too little memory or time left for a Lanczos basis"
        return record
    products.reset()
    with phase_memory(products.device, record), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Residual estimates only inside lanczos: its exact residuals are one block product of
        # k columns; the explicit norms below take one column at a time.
        result = lanczos(
            products, k=args.k, max_iter=steps, max_basis_size=basis, seed=0, exact_residuals=False
        )
        summary = {
            "residual_estimates": result.residual_norms.double().cpu().numpy().tolist(),
            "converged": result.converged.cpu().numpy().tolist(),
            "num_matvecs": result.num_matvecs + args.k,
            "num_restarts": result.num_restarts,
        }
        values = result.eigenvalues.double().cpu().numpy()
        vectors = result.eigenvectors
        del result  # the Ritz vectors are k vectors of length D: only `vectors` holds them now
        residuals = []
        for i in range(args.k):
            # In place, in float32: a float64 copy of a length-D vector is 8 bytes per parameter.
            image = products.matmat_torch(vectors[:, i : i + 1])[:, 0]
            image.sub_(vectors[:, i], alpha=float(values[i]))
            residuals.append(float(torch.linalg.vector_norm(image)))
            del image
        del vectors
    record["notes"] += [str(w.message) for w in caught]
    record.update(
        eigenvalues=values.tolist(),
        residual_norms=residuals,
        **summary,
        max_basis_size=basis,
        max_iter=steps,
        product_median_s=statistics.median(products.times),
    )
    return record


def run_xtrace(
    products: ColumnProducts,
    args: argparse.Namespace,
    budget: Budget,
    per_product_s: float,
    free: float | None,
) -> dict[str, Any]:
    """The trace by XTrace with its jackknife standard error."""
    record: dict[str, Any] = {"notes": []}
    count = args.trace_products
    left = budget.products_left(per_product_s)
    if left is not None and count > left:
        count = left
        record["notes"].append(f"{count} products (not {args.trace_products}): what fits --budget-s")
    while count >= 4:
        try:
            products.reset()
            with phase_memory(products.device, record):
                estimate = xtrace(products, count, seed=0, memory_budget=free)
            break
        except MemoryError as error:  # raised before any product: retry with half the probes
            record["notes"].append(f"{count} products do not fit the free memory ({error}); halved")
            count //= 2
    else:
        record["skipped"] = "too little memory or time left for 2 XTrace probes"
        return record
    record.update(
        estimate=estimate.estimate,
        standard_error=estimate.standard_error,
        num_matvecs=estimate.num_matvecs,
        exact=estimate.exact,
        product_median_s=statistics.median(products.times),
    )
    return record


def run_slq(
    products: ColumnProducts,
    args: argparse.Namespace,
    budget: Budget,
    per_product_s: float,
    free: float | None,
    figure: Path | None,
) -> dict[str, Any]:
    """The SLQ density: support, first two moments, trace from the first, and a figure."""
    record: dict[str, Any] = {"notes": []}
    probes, steps = args.slq_probes, args.slq_steps
    left = budget.products_left(per_product_s)
    if left is not None and probes * steps > left:
        steps = left // probes
        record["notes"].append(f"{steps} steps per probe (not {args.slq_steps}): what fits --budget-s")
    while steps >= 2:
        try:
            products.reset()
            with phase_memory(products.device, record):
                density = spectral_density(products, probes, steps, seed=0, memory_budget=free)
            break
        except MemoryError as error:  # raised before any product: retry with fewer steps
            record["notes"].append(f"{steps} steps do not fit the free memory ({error}); halved")
            steps //= 2
    else:
        record["skipped"] = "too little memory or time left for 2 SLQ steps"
        return record
    first, first_error = density.moment(1)
    second, second_error = density.moment(2)
    low, high = density.spectral_range
    record.update(
        num_probes=density.num_probes,
        lanczos_steps=int(density.nodes.shape[1]),
        num_matvecs=density.num_matvecs,
        support=[low, high],
        moment1=first,
        moment1_standard_error=first_error,
        moment2=second,
        moment2_standard_error=second_error,
        trace=first * density.dim,
        trace_standard_error=first_error * density.dim,
        nodes=density.nodes.tolist(),
        weights=density.weights.tolist(),
        product_median_s=statistics.median(products.times),
    )
    if figure is not None and importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a GPU server
        import matplotlib.pyplot as plt

        axes = density.plot()
        axes.figure.savefig(figure, dpi=120, bbox_inches="tight")
        plt.close(axes.figure)
        record["figure"] = figure.name
    return record


# ---------------------------------------------------------------------------- report
def machine_name(device: torch.device) -> str:
    """Short lower-case name of the device for file names: ``h200``, ``h100``, ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    words = re.sub(r"(?i)nvidia", "", torch.cuda.get_device_name(device)).split()
    return re.sub(r"[^a-z0-9-]", "", words[0].lower()) if words else "cuda"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def shown_argv(argv: list[str]) -> list[str]:
    """The command line as the report records it: the output directory (a machine's path) as DIR."""
    shown = list(argv)
    for i, word in enumerate(shown):
        if word == "--out" and i + 1 < len(shown):
            shown[i + 1] = "DIR"
        elif word.startswith("--out="):
            shown[i] = "--out=DIR"
    return shown


def markdown(results: dict[str, Any]) -> str:
    """The report of :func:`main`'s results, as markdown (a results file for docs/benchmarks.md)."""
    env, setup, product = results["env"], results["setup"], results["product"]
    gradient_s = product["gradient"]["median_s"]
    lines = [
        f"# Llama-style decoder of {setup['num_params']:,} parameters: curvature on one device "
        f"({env['device']}, {env['date']})",
        "",
        f"`python benchmarks/bench_llama_1b.py {' '.join(results['argv'])}`. Device: {env['device']}; "
        f"torch {env['torch']}; transformers {env['transformers']}; curvops {env['curvops']}; "
        f"Python {env['python']}.",
        "",
        f"Model: `LlamaForCausalLM` from a config ({setup['shape']}), random weights (seed 0), "
        f"{setup['num_params']:,} parameters in {setup['dtype']}, attention `{setup['attn']}`; "
        f"built in {setup['build_s']:.1f} s. Data: {setup['num_batches']} batches of "
        f"{setup['batch_size']} x {setup['seq_len']} random tokens ({setup['tokens']:,} tokens per "
        f"product). Product: {setup['product']}"
        + (", fused head" if setup.get("fused_head") else "")
        + "; the algorithms' vectors are float32, one column per product. Times: median of "
        f"{setup['repeats']} after a warm-up (device synchronised); peak memory by "
        "`torch.cuda.max_memory_allocated`, reset per phase.",
        "",
        "## One product",
        "",
        "| | time (s) | in gradients | peak extra (GiB) |",
        "|---|---|---|---|",
        f"| gradient (HF `labels=` loss) | {gradient_s:.3f} | 1.00 | "
        f"{_gib(product['gradient']['peak_extra_gib'])} |",
        f"| {setup['product']} product | {product['product']['median_s']:.3f} | "
        f"{product['product']['median_s'] / gradient_s:.2f} | {_gib(product['product']['peak_extra_gib'])} |",
        f"| first {setup['product']} product (one-time checks) | {product['product']['first_s']:.3f} | "
        f"{product['product']['first_s'] / gradient_s:.2f} | |",
        "",
        f"Memory after the model and the data: {_gib(product['resident_gib'])} GiB allocated; "
        f"planned for the algorithms: {_gib(product['free_for_algorithms_gib'])} GiB.",
        "",
        "## Phases",
        "",
        "| phase | products | wall (s) | s per product | in gradients | peak (GiB) | peak extra (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("lanczos", "xtrace", "slq"):
        phase = results[name]
        if "skipped" in phase:
            lines.append(f"| {name} | skipped: {phase['skipped']} | | | | | |")
            continue
        per = phase["product_median_s"]
        lines.append(
            f"| {name} | {phase['num_matvecs']} | {phase['wall_s']:.1f} | {per:.3f} | "
            f"{per / gradient_s:.2f} | {_gib(phase['peak_gib'])} | {_gib(phase['peak_extra_gib'])} |"
        )
    lines += ["", f"Total wall time, model build included: {results['total_s']:.1f} s.", ""]
    lanczos_result = results["lanczos"]
    if "skipped" not in lanczos_result:
        lines += [
            f"## Top {len(lanczos_result['eigenvalues'])} eigenvalues (`lanczos`, max_basis_size "
            f"{lanczos_result['max_basis_size']}, max_iter {lanczos_result['max_iter']}, "
            f"{lanczos_result['num_restarts']} restarts)",
            "",
            "| i | eigenvalue | residual norm | residual / eigenvalue | converged (Lanczos' estimate) |",
            "|---|---|---|---|---|",
        ]
        for i, (value, residual, done) in enumerate(
            zip(lanczos_result["eigenvalues"], lanczos_result["residual_norms"], lanczos_result["converged"])
        ):
            lines.append(f"| {i + 1} | {value:.6g} | {residual:.2e} | {residual / abs(value):.1e} | {done} |")
        lines.append("")
    trace = results["xtrace"]
    slq = results["slq"]
    if "skipped" not in trace:
        lines += [
            f"## Trace: XTrace {trace['estimate']:.6g} +- {trace['standard_error']:.2g} "
            f"(jackknife standard error, {trace['num_matvecs']} products)",
            "",
        ]
    if "skipped" not in slq:
        lines += [
            f"## Spectral density (SLQ, {slq['num_probes']} probes x {slq['lanczos_steps']} steps)",
            "",
            f"Support [{slq['support'][0]:.4g}, {slq['support'][1]:.4g}]; mean eigenvalue "
            f"{slq['moment1']:.4g} +- {slq['moment1_standard_error']:.2g}, mean squared eigenvalue "
            f"{slq['moment2']:.4g} +- {slq['moment2_standard_error']:.2g}; trace from the first moment "
            f"{slq['trace']:.6g} +- {slq['trace_standard_error']:.2g}."
            + (f" Figure: `{slq['figure']}`." if "figure" in slq else ""),
            "",
        ]
    notes = [f"{name}: {note}" for name in ("lanczos", "xtrace", "slq") for note in results[name]["notes"]]
    if setup["product"] == "hessian" and setup["dtype"] == "bfloat16":
        notes.insert(0, "the Hessian's second-order terms lose their digits in bfloat16 (docs/concepts.md)")
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--product", choices=["ggn", "hessian"], default="ggn")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="attn_implementation")
    parser.add_argument("--fused-head", action="store_true", help="GGN: the fused linear-head product")
    parser.add_argument("--batches", type=int, default=2, help="number of token batches")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (1024; --small: 16)")
    parser.add_argument("--k", type=int, default=5, help="eigenvalues wanted (largest)")
    parser.add_argument("--lanczos-iters", type=int, default=60, help="lanczos max_iter (products)")
    parser.add_argument("--trace-products", type=int, default=16, help="XTrace budget (products)")
    parser.add_argument("--slq-probes", type=int, default=2)
    parser.add_argument("--slq-steps", type=int, default=12, help="Lanczos steps per SLQ probe")
    parser.add_argument("--repeats", type=int, default=3, help="timed products after the warm-up")
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="wall-clock budget of the whole run (0: none)"
    )
    parser.add_argument("--small", action="store_true", help="tiny model and data (CPU, seconds)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="directory for the .md, .json and .png")
    args = parser.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 16 if args.small else 1024
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its report.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    dict
        Every number of the run (what the ``.json`` holds), plus ``markdown`` (the report) and,
        with ``--out``, ``files`` (the paths written).
    """
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "curvops": curvops.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    build_start = time.perf_counter()
    model = build_model(args.small, dtype, args.attn, device)
    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    batches = token_batches(args.batches, args.batch_size, args.seq_len, shape["vocab_size"], device)
    sync(device)
    build_s = time.perf_counter() - build_start
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    setup = {
        "shape": ", ".join(f"{key} {value}" for key, value in shape.items()),
        "num_params": num_params,
        "dtype": args.dtype,
        "attn": args.attn,
        "product": args.product,
        "fused_head": bool(args.fused_head and args.product == "ggn"),
        "num_batches": args.batches,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens": args.batches * args.batch_size * args.seq_len,
        "repeats": args.repeats,
        "build_s": build_s,
    }
    extra: dict[str, Any] = {"fused_head": True} if setup["fused_head"] else {}
    operator = causal_lm_operator(args.product, model, batches, **extra)
    products = ColumnProducts(operator)

    product = measure_products(model, batches, products, args.repeats)
    per_product_s = product["product"]["median_s"]
    free = free_bytes(device, product["product"]["peak_extra_gib"])
    product["free_for_algorithms_gib"] = None if free is None else free / GIB
    budget = Budget(args.budget_s or None, start)
    results: dict[str, Any] = {
        "argv": shown_argv(sys.argv[1:] if argv is None else argv),
        "env": env,
        "setup": setup,
    }
    results["product"] = product
    # The default run (GGN, float32) is `llama_1b`; others name their product and dtype, so
    # that runs of one day on one machine do not overwrite each other.
    variant = "" if (args.product, args.dtype) == ("ggn", "float32") else f"-{args.product}-{args.dtype}"
    stem = f"llama_1b{variant}_{machine_name(device)}_{env['date']}"
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results["lanczos"] = run_lanczos(products, args, budget, per_product_s, free)
    results["xtrace"] = run_xtrace(products, args, budget, per_product_s, free)
    results["slq"] = run_slq(
        products, args, budget, per_product_s, free, None if out is None else out / f"{stem}.png"
    )
    results["total_s"] = time.perf_counter() - start
    text = markdown(results)
    print(text, flush=True)
    if out is not None:
        (out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
        record = json.dumps(_strict_json(results), indent=1, allow_nan=False)
        (out / f"{stem}.json").write_text(record, encoding="utf-8")
        results["files"] = [str(out / f"{stem}.{ext}") for ext in ("md", "json")]
        if "figure" in results["slq"]:
            results["files"].append(str(out / results["slq"]["figure"]))
    results["markdown"] = text
    return results


def _strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON has neither) and numpy scalars
    as Python numbers."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
