"""Small models: curvops products against the same product written by hand in plain torch.

For a small model the arithmetic of a product is a few microseconds of kernels per batch,
and what a library adds around it (Python, kernel launches, host-device syncs) shows in the
time. This script measures that overhead, side by side in one process:

* ``plain_hessian``: the Hessian-vector product as a user writes it, the unit of the
  Hessian rows: per batch ``loss``, ``g = grad(loss, params, create_graph=True)``,
  ``grad(g, params, v)``, summed;
* ``curvops_hessian`` (default strategy), ``curvops_hessian_rof`` and ``curvops_hessian_db``
  (``ProductStrategy.hessian_vector`` forced to reverse over forward / double backward):
  ``HessianOperator @ v``;
* ``eigenthings_hessian``: hessian-eigenthings 1.0.0a6 ``HessianOperator.matvec`` (its
  repository head; put it on ``PYTHONPATH``, e.g. ``/work/shared/peers/hessian-eigenthings-a6``);
* ``plain_ggn``: the GGN product by hand, the unit of the GGN rows: per batch a tangent pass
  ``torch.func.jvp`` of the output, the loss's output Hessian on it by double backward, and
  one backward pass ``grad(output, params, H J v)`` through a plain forward's graph;
* ``curvops_ggn`` (default strategy), ``curvops_ggn_with_graph``, ``curvops_ggn_separate`` and
  ``curvops_ggn_alongside`` (``output_tangent`` forced, where the version has the choice):
  ``GGNOperator @ v``;
* ``eigenthings_ggn`` (its default: a finite-difference ``J v``, approximate) and
  ``eigenthings_ggn_autograd`` (``loss_hvp="autograd"``, exact);
* ``gradient``: one gradient over the same batches (for scale).

Problems: an MLP (default 64-128-128-10, D = 26,122: the issue's "small MLP", 8 batches of
128) and a small CNN (3 x 32 x 32 images, two 3 x 3 convolutions of 8 and 16 channels with
max pooling, a linear head; D = 11,626; ``--batchnorm`` adds an eval-mode ``BatchNorm2d`` after each
convolution, whose buffers every forward pass reads), float32, cross-entropy, eval mode. Data are put on
the device once (``--data-on-host`` leaves them on the host, so that every method moves them
per batch, as a user's ``DataLoader`` would).

Timing: on CUDA when available (else the CPU; ``--device`` overrides), every sample is
``--inner`` products between two ``torch.cuda.synchronize()`` calls (the host clock); the
methods run interleaved, in a rotated order every round, ``--rounds`` rounds after a
warm-up. Reported: the median time per product, and its ratio to the plain product of the
same family as the median of the per-round ratios (each round's ratio compares adjacent
timings, which cancels the drift of a shared machine). Each method's result is checked
against the plain product of its family (relative error printed; the finite-difference
GGN of the peer is approximate).

Run: ``python benchmarks/bench_small_models.py [--small] [--models mlp cnn] [--rounds 30]
[--out FILE.md]``; ``--small``: tiny problems and few rounds (a quick check on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _report import emit_report  # benchmarks/ is on sys.path when a script runs
from torch import Tensor, nn

HESSIAN_METHODS = (
    "plain_hessian",
    "curvops_hessian",
    "curvops_hessian_rof",
    "curvops_hessian_db",
    "eigenthings_hessian",
)
GGN_METHODS = (
    "plain_ggn",
    "curvops_ggn",
    "curvops_ggn_with_graph",
    "curvops_ggn_separate",
    "curvops_ggn_alongside",
    "eigenthings_ggn",
    "eigenthings_ggn_autograd",
)
METHODS = ("gradient", *HESSIAN_METHODS, *GGN_METHODS)


# ------------------------------------------------------------------ problems
def build(
    name: str,
    widths: list[int],
    batches: int,
    batch_size: int,
    device: torch.device,
    on_host: bool,
    batchnorm: bool = False,
) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    """The problem: (model on ``device`` in eval mode, loss, batches), float32, seed 0.

    ``batchnorm``: the CNN has a ``BatchNorm2d`` after each convolution (eval mode: its running
    statistics are buffers that every forward pass reads).
    """
    torch.manual_seed(0)
    if name == "mlp":
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        model: nn.Module = nn.Sequential(*layers)
        inputs = [torch.randn(batch_size, widths[0]) for _ in range(batches)]
        classes = widths[-1]
    elif name == "cnn":
        side, channels, classes = widths[0], widths[1:-1], widths[-1]
        conv: list[nn.Module] = []
        fan_in = 3
        for c in channels:
            conv += [nn.Conv2d(fan_in, c, 3, padding=1), *([nn.BatchNorm2d(c)] if batchnorm else [])]
            conv += [nn.ReLU(), nn.MaxPool2d(2)]
            fan_in = c
        pooled = side // 2 ** len(channels)
        model = nn.Sequential(*conv, nn.Flatten(), nn.Linear(fan_in * pooled * pooled, classes))
        if batchnorm:
            # Non-trivial running statistics, as after training.
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    assert m.running_mean is not None
                    assert m.running_var is not None
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        inputs = [torch.randn(batch_size, 3, side, side) for _ in range(batches)]
    else:
        raise ValueError(f"unknown model {name!r}")
    targets = [torch.randint(0, classes, (batch_size,)) for _ in range(batches)]
    where = torch.device("cpu") if on_host else device
    data = [(x.to(where), y.to(where)) for x, y in zip(inputs, targets)]
    return model.to(device).eval(), nn.CrossEntropyLoss(), data


def _split(v: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]


def make_methods(
    model: nn.Module, loss: nn.Module, data: list[tuple[Tensor, Tensor]], v: Tensor, device: torch.device
) -> dict[str, Callable[[], Tensor]]:
    """Every method as a callable computing one product with ``v`` (or one gradient), flat ``(D,)``."""
    import curvops

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    vs = _split(v, params)
    n_batches = len(data)
    total = sum(len(y) for _, y in data)
    methods: dict[str, Callable[[], Tensor]] = {}

    def gradient() -> Tensor:
        out = [torch.zeros_like(p) for p in params]
        for x, y in data:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for o, g in zip(out, torch.autograd.grad(loss(model(x), y) * (len(y) / total), params)):
                o.add_(g)
        return torch.cat([o.reshape(-1) for o in out])

    def plain_hessian() -> Tensor:
        out = [torch.zeros_like(p) for p in params]
        for x, y in data:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            value = loss(model(x), y) * (len(y) / total)
            g = torch.autograd.grad(value, params, create_graph=True)
            for o, h in zip(out, torch.autograd.grad(g, params, vs)):
                o.add_(h)
        return torch.cat([o.reshape(-1) for o in out])

    primals = dict(zip(names, (p.detach() for p in params)))
    tangents = dict(zip(names, vs))

    def plain_ggn() -> Tensor:
        out = [torch.zeros_like(p) for p in params]
        for x, y in data:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            jv = torch.func.jvp(
                lambda ps, x=x: torch.func.functional_call(model, ps, (x,)), (primals,), (tangents,)
            )[1]
            output = model(x)
            z = output.detach().requires_grad_(True)
            (dz,) = torch.autograd.grad(loss(z, y) * (len(y) / total), z, create_graph=True)
            (hjv,) = torch.autograd.grad(dz, z, jv)
            for o, g in zip(out, torch.autograd.grad(output, params, hjv)):
                o.add_(g)
        return torch.cat([o.reshape(-1) for o in out])

    methods.update(gradient=gradient, plain_hessian=plain_hessian, plain_ggn=plain_ggn)

    strategies: dict[str, dict[str, Any]] = {
        "curvops_hessian": {},
        "curvops_hessian_rof": {"hessian_vector": "reverse_over_forward"},
        "curvops_hessian_db": {"hessian_vector": "double_backward"},
        "curvops_ggn": {},
        "curvops_ggn_with_graph": {"output_tangent": "dual_forward_with_graph"},
        "curvops_ggn_separate": {"output_tangent": "separate_tangent_pass"},
        "curvops_ggn_alongside": {"output_tangent": "alongside_forward"},
    }
    for method, fields in strategies.items():
        try:
            strategy = curvops.ProductStrategy(**fields)
        except ValueError:  # a choice this version of curvops does not have
            continue
        cls = curvops.HessianOperator if "hessian" in method else curvops.GGNOperator
        methods[method] = _product(cls(model, loss, data, strategy=strategy), v)

    try:
        import hessian_eigenthings as he
    except ImportError:
        print("hessian_eigenthings not importable: its rows are left out (set PYTHONPATH)")
        return methods
    peer_hessian = he.HessianOperator(model, data, he.supervised_loss(loss))
    methods["eigenthings_hessian"] = lambda: peer_hessian.matvec(v)
    # 1.0.0a6 on: a choice of GGN (its default a finite-difference J v, needing a loss with an
    # ``hvp``: its cross-entropy helper); earlier versions have only the autograd GGN.
    standard = getattr(getattr(he, "loss_fns", None), "standard", None)
    peer_loss = getattr(standard, "cross_entropy_loss_of_output", None)
    exact = {"loss_hvp": "autograd"} if peer_loss is not None else {}
    peer_ggn_autograd = he.GGNOperator(
        model, data, he.supervised_forward, he.supervised_loss_of_output(loss), **exact
    )
    methods["eigenthings_ggn_autograd"] = lambda: peer_ggn_autograd.matvec(v)
    if peer_loss is not None:
        peer_ggn = he.GGNOperator(model, data, he.supervised_forward, peer_loss())
        methods["eigenthings_ggn"] = lambda: peer_ggn.matvec(v)
    # The peer weights every batch equally (the mean of batch means): the same matrix as the
    # whole-dataset mean when the batches have equal sizes, as here.
    assert all(len(y) == total // n_batches for _, y in data)
    return methods


def _product(op: Any, v: Tensor) -> Callable[[], Tensor]:
    return lambda: op @ v


# ------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    model_name: str, widths: list[int], args: argparse.Namespace, device: torch.device
) -> tuple[list[str], dict[str, Any]]:
    """Time every method on one problem; return the markdown lines and the raw numbers."""
    model, loss, data = build(
        model_name, widths, args.batches, args.batch_size, device, args.data_on_host, args.batchnorm
    )
    dim = sum(p.numel() for p in model.parameters())
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(device)
    methods = make_methods(model, loss, data, v, device)
    chosen = [m for m in args.methods if m in methods]

    # Correctness: each product against the plain one of its family (float32 rounding).
    results = {m: methods[m]().detach() for m in chosen}
    reference = {"hessian": methods["plain_hessian"](), "ggn": methods["plain_ggn"]()}
    errors: dict[str, float] = {}
    for m in chosen:
        family = "hessian" if "hessian" in m else "ggn" if "ggn" in m else None
        if family is not None:
            ref = reference[family]
            errors[m] = float((results[m] - ref).norm() / ref.norm())

    for _ in range(args.warmup):
        for m in chosen:
            methods[m]()
    sync(device)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    times: dict[str, list[float]] = {m: [] for m in chosen}
    for round_index in range(args.rounds):
        shift = round_index % len(chosen)
        for m in chosen[shift:] + chosen[:shift]:
            sync(device)
            start = clock()
            for _ in range(args.inner):
                methods[m]()
            sync(device)
            times[m].append((clock() - start) / args.inner)

    def ratios(m: str, unit: str) -> list[float]:
        return [a / b for a, b in zip(times[m], times[unit])] if unit in times else []

    lines = [
        f"## {model_name}{' with batch norm' if args.batchnorm and model_name == 'cnn' else ''} "
        f"{'-'.join(map(str, widths))} (D = {dim:,}), {args.batches} batches of "
        f"{args.batch_size}, on {device_name(device)}",
        "",
        "| method | time per product | / plain (median of rounds) | / plain (best) | "
        "relative error vs plain |",
        "|---|---|---|---|---|",
    ]
    import curvops

    raw: dict[str, Any] = {"dim": dim, "times": times, "errors": errors, "curvops": curvops.__file__}
    for m in chosen:
        unit = "plain_hessian" if "hessian" in m else "plain_ggn" if "ggn" in m else "plain_hessian"
        r = ratios(m, unit)
        median_ratio = f"{statistics.median(r):.3f}" if r else ""
        best = f"{min(times[m]) / min(times[unit]):.3f}" if unit in times else ""
        error = f"{errors[m]:.1e}" if m in errors else ""
        lines.append(
            f"| {m} | {1e3 * statistics.median(times[m]):.3f} ms | {median_ratio} | {best} | {error} |"
        )
    lines.append("")
    return lines, raw


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peer_version() -> str:
    try:
        import hessian_eigenthings as he
    except ImportError:
        return "not installed"
    return str(getattr(he, "__version__", "unknown"))


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--mlp", default="64,128,128,10", help="MLP widths, input to output")
    parser.add_argument(
        "--cnn", default="32,8,16,10", help="CNN: image side, channels of each conv layer, classes"
    )
    parser.add_argument("--batchnorm", action="store_true", help="CNN: BatchNorm2d (eval) after each conv")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=None, help="default 30 (--small: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (--small: 1)")
    parser.add_argument("--inner", type=int, default=1, help="products per timed sample")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--data-on-host", action="store_true", help="leave the batches on the host")
    parser.add_argument("--small", action="store_true", help="tiny problems, few rounds (a quick check)")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: CPU time of this process (a shared CPU's other jobs do not count; CPU only)",
    )
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--json", default=None, help="write the raw times (seconds) here")
    args = parser.parse_args()
    if args.small:
        args.mlp, args.cnn = "8,16,16,4", "8,4,4,3"
        args.batches, args.batch_size = 4, 16
    if args.rounds is None:
        args.rounds = 5 if args.small else 30
    if args.warmup is None:
        args.warmup = 1 if args.small else 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    lines = [
        f"# Small models: curvops against plain torch ({datetime.date.today()})",
        "",
        f"Device: {device_name(device)}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"commit {_commit()}, hessian-eigenthings {_peer_version()}. float32, cross-entropy (mean), "
        "eval mode, data "
        f"{'on the host' if args.data_on_host else 'on the device'}. {args.rounds} rounds after "
        f"{args.warmup} warm-up, methods interleaved in a rotated order, {args.inner} product(s) per "
        f"timed sample between device synchronisations ({args.clock} clock). `/ plain`: the "
        "product's time over the plain "
        "torch product of its family (Hessian: double backward; GGN: `func.jvp` + double backward "
        "on the output + one backward), median of the per-round ratios, and the ratio of the "
        "best times. Relative error: `‖result − plain‖ / ‖plain‖` (float32).",
        "",
    ]
    raw = {}
    for name in args.models:
        widths = [int(w) for w in (args.mlp if name == "mlp" else args.cnn).split(",")]
        problem_lines, raw[name] = run(name, widths, args, device)
        lines += problem_lines
    emit_report(lines, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(raw))


if __name__ == "__main__":
    main()
