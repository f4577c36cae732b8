"""Distributed spectrum: one process vs DDP vs FSDP2 on 1 or more GPUs, side by side.

Runs ``examples/distributed_spectrum.py`` once per configuration (``torchrun`` for the
distributed ones) on the same global data and prints / writes a markdown table: time per
Hessian product and per Lanczos iteration, peak memory per GPU, and the agreement of the top
eigenvalues with the one-process autograd run (the reference).

Usage::

    python benchmarks/bench_distributed.py --gpus 1 2 --out benchmarks/results/distributed_<device>_<date>.md
    python benchmarks/bench_distributed.py --gpus 1 -- --width 256 --layers 2   # model arguments after --

Everything after ``--`` is passed to the example (model size, batches, dtype, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_spectrum.py"


def run(wrap: str, processes: int, extra: list[str], workdir: Path, method: str | None = None) -> dict:
    out = workdir / f"{wrap}-{processes}-{method}.json"
    if processes == 0:
        command = [sys.executable, str(EXAMPLE)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            str(EXAMPLE),
        ]
    command += ["--wrap", wrap, "--out", str(out), *extra]
    if method is not None:
        command += ["--method", method]
    print("$", " ".join(command), flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    print(completed.stdout, flush=True)
    if completed.returncode != 0:
        print(completed.stderr[-4000:], file=sys.stderr)
        return {
            "wrap": wrap,
            "method": method,
            "world_size": processes,
            "failed": completed.stderr.strip().splitlines()[-1:],
        }
    return json.loads(out.read_text())


def table(rows: list[dict], reference: dict) -> str:
    lines = [
        "| run | Hessian product | processes | D (rank 0) | product ms | Lanczos ms / iteration "
        "| Lanczos products | peak GiB per GPU | top eigenvalues | max rel. diff vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            failure = " ".join(r["failed"])
            lines.append(f"| {r['wrap']} | {r['method']} | {r['world_size']} | failed: {failure} |||||||")
            continue
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["top_eigenvalues"], reference["top_eigenvalues"]))
        lines.append(
            f"| {r['wrap']} | {r['method']} | {r['world_size']} | {r['dim']:,} ({r['local_dim']:,}) "
            f"| {r['product_s'] * 1e3:.1f} | {r['lanczos_s_per_iteration'] * 1e3:.1f} "
            f"| {r['lanczos_matvecs']} | "
            f"{', '.join(f'{p:.2f}' for p in r['peak_memory_gib_per_rank'])} | "
            f"{', '.join(f'{v:.6g}' for v in r['top_eigenvalues'])} | {diff:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="process counts to run (1 GPU each)")
    parser.add_argument("--wraps", nargs="+", default=["fsdp", "ddp"])
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        reference = run("none", 0, extra, workdir)
        if "failed" in reference:
            sys.exit("the one-process reference run failed")
        rows = [reference, run("none", 0, extra, workdir, "finite_difference")]
        rows += [run(w, n, extra, workdir) for n in args.gpus for w in args.wraps]
    report = table(rows, reference)
    header = (
        f"# Distributed spectrum ({reference['device_name']}, {date.today().isoformat()})\n\n"
        f"`python benchmarks/bench_distributed.py --gpus {' '.join(map(str, args.gpus))} "
        f"-- {' '.join(extra)}`\n\n"
        "Same global data in every run. `none`: one process (no torch.distributed); "
        "`ddp`: autograd products all-reduced once per product; `fsdp`: finite differences "
        "of gradients on parameter shards. The first row is the reference. "
        "Lanczos: k=3, tol 1e-4, same seed.\n\n"
    )
    print(header + report)
    if args.out:
        Path(args.out).write_text(header + report + "\n")


if __name__ == "__main__":
    main()
