"""When does a block-diagonal preconditioner (KFAC) speed up CG on the damped GGN?

Dense float64 study on an MLP trained on scikit-learn's digits (no download) that is small
enough to materialise its GGN ``G`` (D ≈ 2,400). For ``(G + δI) x = b`` to relative
residual 1e-6 it reports the CG iterations with no preconditioner, with KFAC's damped
inverse ``(K + γI)⁻¹``, and with the *exact* block-diagonal part of ``G`` (one block per
layer) ``(blkdiag(G) + γI)⁻¹`` — the best any per-layer preconditioner such as KFAC can
hope to be — for preconditioner damping ``γ ∈ {1, 3, 10, 30} · δ``. It also prints how much
of ``G`` (Frobenius norm) lies outside the layer blocks, and how far KFAC is from the blocks.

Usage: ``python benchmarks/bench_preconditioner.py [--hidden 24] [--out FILE.md]``
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np
import torch
from _report import emit_report  # benchmarks/ is on sys.path when a script runs
from sklearn.datasets import load_digits
from torch import nn

import curvops
from curvops.algorithms.solve import cg
from curvops.operators.kfac import KFACOperator


def trained_mlp(hidden: int, epochs: int) -> tuple[nn.Sequential, list]:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    model = nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    ).double()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(X))
        for start in range(0, len(X), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[index]), y[index]).backward()
            optimizer.step()
    return model, [(X[i : i + 600], y[i : i + 600]) for i in range(0, len(X), 600)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, data = trained_mlp(args.hidden, args.epochs)
    loss = nn.CrossEntropyLoss()
    G = curvops.GGNOperator(model, loss, data).to_dense().numpy()
    K = KFACOperator(model, loss, data).to_dense().numpy()
    blocks = np.zeros_like(G)
    start = 0
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        stop = start + layer.weight.numel() + layer.bias.numel()
        blocks[start:stop, start:stop] = G[start:stop, start:stop]
        start = stop
    eigenvalues = np.linalg.eigvalsh(G)
    top = eigenvalues[-1]
    off_block = np.linalg.norm(G - blocks) / np.linalg.norm(G)
    kfac_vs_blocks = np.linalg.norm(K - blocks) / np.linalg.norm(blocks)
    rhs = torch.tensor(np.random.default_rng(1).standard_normal(len(G)))
    gammas = (1, 3, 10, 30)
    lines = [
        f"# Block-diagonal preconditioning of CG on the damped GGN ({date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}. "
        f"MLP 64-{args.hidden}-{args.hidden}-10 (ReLU) trained {args.epochs} epochs on digits "
        f"(1,797 samples), float64, D = {len(G):,}, λ_max(G) = {top:.4g}, "
        f"rank(G) = {(eigenvalues > 1e-10 * top).sum():,}. Share of ‖G‖_F outside the layer blocks: "
        f"**{off_block:.0%}**; KFAC vs the exact layer blocks: "
        f"‖K − blkdiag(G)‖_F / ‖blkdiag(G)‖_F = {kfac_vs_blocks:.0%}. "
        "CG iterations to relative residual 1e-6 for (G + δI) x = b, b random; preconditioner damping γ.",
        "",
        "| δ / λ_max | no preconditioner | "
        + " | ".join(f"KFAC γ={g}δ" for g in gammas)
        + " | "
        + " | ".join(f"exact blkdiag(G) γ={g}δ" for g in gammas)
        + " |",
        "|" + "---|" * (2 + 2 * len(gammas)),
    ]
    for fraction in (1e-2, 1e-3):
        damping = fraction * top
        A = torch.tensor(G + damping * np.eye(len(G)))

        def iterations(P: np.ndarray | None, A: torch.Tensor = A) -> int:  # this δ's matrix
            if P is None:
                return int(cg(lambda V: A @ V, rhs, rtol=1e-6, maxiter=10_000)[1].iterations[0])
            inverse = torch.tensor(np.linalg.inv(P))
            return int(
                cg(lambda V: A @ V, rhs, rtol=1e-6, maxiter=10_000, preconditioner=lambda R: inverse @ R)[
                    1
                ].iterations[0]
            )

        eye = np.eye(len(G))
        row = [iterations(None)]
        row += [iterations(K + g * damping * eye) for g in gammas]
        row += [iterations(blocks + g * damping * eye) for g in gammas]
        line = f"| {fraction:g} | " + " | ".join(map(str, row)) + " |"
        print(line, flush=True)
        lines.append(line)
    lines += [
        "",
        "Reading: on this network most of G is *between* layers, so even the exact layer blocks "
        "are a worse preconditioner than none for the damping the solve uses (γ = δ), and only "
        "approach plain CG with much larger preconditioner damping. KFAC, which approximates "
        "those blocks, inherits that; a block-diagonal preconditioner cannot halve the iterations "
        "here. See docs/influence.md for when to precondition.",
    ]
    emit_report(lines, args.out)


if __name__ == "__main__":
    main()
