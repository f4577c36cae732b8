"""Top Hessian eigenvalues and spectral density of an FSDP2-sharded (or DDP) model.

Launch with torchrun, one process per GPU (or CPU processes on the gloo backend)::

    torchrun --nproc-per-node 2 examples/distributed_spectrum.py              # FSDP2, auto device
    torchrun --nproc-per-node 2 examples/distributed_spectrum.py --wrap ddp
    python examples/distributed_spectrum.py --wrap none                         # one process

The model is a small pre-norm transformer language model (token embedding, ``--layers``
blocks of ``nn.TransformerEncoderLayer`` with a causal mask, untied output head),
built identically on every rank from ``--seed``, then sharded with ``fully_shard`` per
block and at the root. The data are random token
sequences: ``--batches`` global batches dealt round-robin to the ranks, so the operator is
the curvature of the same global loss whatever the number of processes. Under FSDP the
Hessian products are central finite differences of gradients (``method="finite_difference"``);
each rank holds only its shard of parameters, of Lanczos vectors and of probes.

Rank 0 prints the top eigenvalues, the quadrature nodes of the density, the time per
Hessian product and per Lanczos iteration, and the peak memory per rank; with
``--out FILE.json`` it also writes them (the benchmark reports use this).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import curvops


class TinyLM(nn.Module):
    """Embedding + causal transformer blocks + linear head; returns logits (B, T, V)."""

    mask: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            hidden = block(hidden, src_mask=self.mask[:length, :length], is_causal=True)
        # (B, V, T) for CrossEntropyLoss; contiguous: FSDP2 warns about returning views.
        return self.head(self.norm(hidden)).transpose(1, 2).contiguous()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrap", choices=("fsdp", "ddp", "none"), default="fsdp")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--batches",
        type=int,
        default=4,
        help="global number of batches, dealt round-robin to the ranks (FSDP needs "
        "a multiple of the world size); the same global data for any world size",
    )
    parser.add_argument("--k", type=int, default=3, help="number of top eigenvalues")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="lanczos tolerance (float32 finite differences: about 1e-3 at best)",
    )
    parser.add_argument("--probes", type=int, default=2, help="SLQ probes of the density")
    parser.add_argument("--steps", type=int, default=20, help="Lanczos steps per SLQ probe")
    parser.add_argument(
        "--method",
        choices=("autograd", "finite_difference"),
        default=None,
        help="Hessian products (default: finite_difference under FSDP, else autograd)",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: one GPU per process (NCCL) if CUDA is available, else CPU (gloo)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits for the others in a collective before failing",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON (rank 0)")
    return parser.parse_args()


def setup(device_kind: str, timeout_s: float) -> tuple[int, int, torch.device]:
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if "RANK" not in os.environ:  # plain `python`: one process
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # A bounded wait: a rank that hangs (or waits for a rank that does) fails after this long
    # instead of the backend's default (10 minutes for NCCL, 30 for gloo).
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def build(
    args: argparse.Namespace, device: torch.device, world_size: int, rank: int
) -> tuple[nn.Module, list]:
    torch.manual_seed(args.seed)  # the same initial model on every rank
    dtype = getattr(torch, args.dtype)
    model = TinyLM(args.vocab, args.width, args.layers, args.heads, args.context).to(device, dtype).eval()
    if args.wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    wrapped: nn.Module = model
    if args.wrap == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for index in range(args.batches):
        tokens = torch.randint(0, args.vocab, (args.batch_size, args.context + 1), generator=generator)
        if index % world_size == rank:  # this rank's share of the global data
            batches.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return wrapped, batches


def timed(device: torch.device, call: Any) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def main() -> None:
    args = parse()
    rank, world_size, device = setup(args.device, args.timeout)
    model, batches = build(args, device, world_size, rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method = args.method or ("autograd" if args.wrap != "fsdp" else "finite_difference")
    hessian = curvops.HessianOperator(model, nn.CrossEntropyLoss(), batches, method=method)
    rows = hessian.sharding.local_dim if hessian.sharding is not None else hessian.shape[0]
    vector = torch.ones(rows, dtype=hessian.torch_dtype, device=device)
    hessian @ vector  # warm-up (allocator, kernels)
    _, product_s = timed(device, lambda: hessian @ vector)
    top, lanczos_s = timed(device, lambda: curvops.lanczos(hessian, k=args.k, seed=args.seed, tol=args.tol))
    density, density_s = timed(
        device,
        lambda: curvops.spectral_density(
            hessian, num_probes=args.probes, lanczos_steps=args.steps, seed=args.seed
        ),
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peaks = [peak] * world_size
    if world_size > 1:
        table: list[Any] = [None] * world_size  # filled with every rank's peak
        dist.all_gather_object(table, peak)
        peaks = table
    results = {
        "wrap": args.wrap,
        "method": method,
        "world_size": world_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dim": hessian.shape[0],
        "local_dim": rows,
        "dtype": args.dtype,
        "top_eigenvalues": [float(v) for v in top.eigenvalues],
        "lanczos_matvecs": top.num_matvecs,
        "product_s": product_s,
        "lanczos_s": lanczos_s,
        "lanczos_s_per_iteration": lanczos_s / max(top.num_matvecs, 1),
        "density_s": density_s,
        "density_range": [float(x) for x in density.spectral_range],
        "peak_memory_gib_per_rank": [p / 2**30 for p in peaks],
    }
    if rank == 0:
        print(
            f"{args.wrap} ({method}) on {world_size} process(es), D = {hessian.shape[0]:,} "
            f"({rows:,} on rank 0), {args.dtype}, {results['device_name']}"
        )
        print(
            f"top {args.k} Hessian eigenvalues: " + ", ".join(f"{v:.6g}" for v in results["top_eigenvalues"])
        )
        print(
            f"Hessian product: {product_s * 1e3:.1f} ms; lanczos: {top.num_matvecs} products in "
            f"{lanczos_s:.2f} s ({results['lanczos_s_per_iteration'] * 1e3:.1f} ms per iteration)"
        )
        print(
            f"spectral density: {args.probes} probes x {args.steps} steps in {density_s:.2f} s, "
            f"support [{results['density_range'][0]:.4g}, {results['density_range'][1]:.4g}]"
        )
        if device.type == "cuda":
            print(
                "peak memory per rank (GiB): "
                + ", ".join(f"{p:.2f}" for p in results["peak_memory_gib_per_rank"])
            )
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=2)
    if world_size > 1:
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
        # Results are printed and written: leave without the interpreter's teardown. Under
        # gloo a rank now and then aborts there ("terminate called without an active
        # exception", SIGABRT: a C++ worker thread destroyed at exit), failing a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
