"""EKFACOperator on outputs with several loss rows per sample: (N, T, C) sequences, (N, C, H, W) maps.

The reference is independent of curvops' loss code and of GGNOperator/FisherOperator: per
sample, the loss Hessian w.r.t. that sample's output by autograd (float64), its square root
by ``eigh`` (``H_n = Σ_j λ_j v_j v_jᵀ``), and the parameter gradient of every column
``sqrt(λ_j) v_j`` by autograd; the corrected eigenvalues are
``S = Σ_n Σ_j (Q_Gᵀ Γ_{n,j} Q_A)²`` in the operator's own eigenbasis (George et al. 2018,
with the per-sample gradient of one column of the Hessian square root). Summed, the columns
give the exact GGN block, so this is ``diag((Q_G ⊗ Q_A)ᵀ GGN (Q_G ⊗ Q_A))``.

Tolerances: ``EXACT_RTOL = 1e4·u`` (see test_kfac) where both sides are exact float64 sums
in different orders; Monte-Carlo tolerances are derived where used.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops.operators.ekfac import EKFACOperator
from tests.operators.test_kfac import EXACT_RTOL, _rel, mlp

DTYPE = torch.float64


class ClassesFirst(nn.Module):
    """(N, T, C) -> (N, C, T): nn.CrossEntropyLoss's layout for a sequence."""

    def forward(self, x):
        return x.transpose(1, 2)


class FoldPositions(nn.Module):
    """(N, T, d) -> (N·T, d): positions folded into the batch dimension inside the model."""

    def forward(self, x):
        return x.reshape(-1, x.shape[-1])


class MeanOverPositions(nn.Module):
    def __init__(self, positions: int):
        super().__init__()
        self.positions = positions

    def forward(self, x):
        return x.reshape(-1, self.positions, x.shape[-1]).mean(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(name: str):
    """(model, loss_fn, data) of a named case; every case has several loss rows per sample."""
    if name == "seq_mse":
        model = mlp([4, 5, 3], nn.Tanh(), seed=30)
        gen = _gen(31)
        data = [
            (
                torch.randn(n, 4, 4, generator=gen, dtype=DTYPE),
                torch.randn(n, 4, 3, generator=gen, dtype=DTYPE),
            )
            for n in (3, 2)
        ]
        return model, nn.MSELoss(reduction="sum"), data
    if name == "seq_ce":
        model = nn.Sequential(mlp([4, 5, 3], nn.Tanh(), seed=32), ClassesFirst())
        gen = _gen(33)
        data = [
            (torch.randn(n, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n, 4), generator=gen))
            for n in (3, 2)
        ]
        return model, nn.CrossEntropyLoss(reduction="sum"), data
    if name in ("map_ce", "map_mse"):
        torch.manual_seed(34)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 2, stride=2)).to(
            DTYPE
        )
        gen = _gen(35)
        inputs = [torch.randn(n, 2, 4, 4, generator=gen, dtype=DTYPE) for n in (3, 2)]
        if name == "map_ce":
            data = [(x, torch.randint(0, 3, (x.shape[0], 2, 2), generator=gen)) for x in inputs]
            return model, nn.CrossEntropyLoss(reduction="sum"), data
        data = [(x, torch.randn(x.shape[0], 3, 2, 2, generator=gen, dtype=DTYPE)) for x in inputs]
        return model, nn.MSELoss(reduction="sum"), data
    raise KeyError(name)


def _brute_force_eigenvalues(op: EKFACOperator, model, loss_fn, data, kind: str) -> list[torch.Tensor]:
    """``S`` per block of ``op`` from per-sample gradients (see the module docstring).

    ``kind="ggn"``: one gradient per column of each sample's loss-Hessian square root;
    ``"empirical"``: one gradient per sample, of the sample's loss. ``loss_fn`` must sum.
    """
    params = list(op.params)
    sums = [torch.zeros_like(s) for s in op.corrected_eigenvalues]
    eigen = op.eigendecomposition()
    for x, y in data:
        output = model(x)
        f0 = output.detach()
        per_sample = f0[0].numel()
        columns = []  # output-shaped vectors, each supported on one sample
        if kind == "ggn":
            H = torch.autograd.functional.hessian(lambda f, y=y: loss_fn(f, y), f0).reshape(
                f0.numel(), f0.numel()
            )
            for n in range(f0.shape[0]):
                chunk = slice(n * per_sample, (n + 1) * per_sample)
                lam, V = torch.linalg.eigh(H[chunk, chunk])
                for j in range(per_sample):
                    col = torch.zeros(f0.numel(), dtype=DTYPE)
                    col[chunk] = lam[j].clamp_min(0).sqrt() * V[:, j]
                    columns.append(col.reshape(f0.shape))
        else:
            f = f0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(f, y), f)
            for n in range(f0.shape[0]):
                col = torch.zeros_like(grad)
                col[n] = grad[n]
                columns.append(col)
        for col in columns:
            grads = torch.autograd.grad(output, params, grad_outputs=col, retain_graph=True)
            for i, block in enumerate(op.blocks):
                out = block.G.shape[0]
                parts = [grads[p].reshape(out, -1) for p in (block.weight, block.bias) if p is not None]
                M = torch.cat(parts, dim=1)
                sums[i] += (eigen[i].G_eigenvectors.T @ M @ eigen[i].A_eigenvectors).square()
    return sums


def _worst(op: EKFACOperator, reference: list[torch.Tensor]) -> float:
    return max(_rel(s, r) for s, r in zip(op.corrected_eigenvalues, reference))


# ============================================================== refusals
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["seq_mse", "seq_ce", "map_ce", "map_mse"])
def test_type2_with_several_loss_rows_per_sample_is_refused(name, kfac_approx):
    # Summing a sample's rows before squaring adds cross-row products the GGN lacks; the exact
    # value needs rows x KFAC's backward passes: refused, naming the way out.
    model, loss_fn, data = _case(name)
    with pytest.raises(ValueError, match=r"loss rows per sample.*fisher_type='mc'.*KFACOperator"):
        EKFACOperator(model, loss_fn, data, fisher_type="type-2", kfac_approx=kfac_approx)


@pytest.mark.parametrize("name", ["seq_ce", "map_ce"])
def test_empirical_cross_entropy_over_positions_is_refused(name):
    # The empirical Fisher's terms are the positions for cross-entropy (FisherOperator):
    # per-sample gradients summed over positions would add cross-position products.
    model, loss_fn, data = _case(name)
    with pytest.raises(ValueError, match=r"positions per sample.*fisher_type='mc'"):
        EKFACOperator(model, loss_fn, data, fisher_type="empirical")


def test_positions_folded_into_the_batch_before_a_layer_are_refused():
    # The layers see N·T "samples", the output N: a layer's per-sample gradient would be a
    # part of one sample's gradient and the cross-position products would be dropped.
    torch.manual_seed(36)
    model = nn.Sequential(
        FoldPositions(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), MeanOverPositions(4)
    ).to(DTYPE)
    gen = _gen(37)
    data = [(torch.randn(3, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (3,), generator=gen))]
    for fisher_type in ("type-2", "mc", "empirical"):
        with pytest.raises(ValueError, match=r"sees 12 samples.*has 3.*KFACOperator"):
            EKFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type)


# ============================================================== computed ones
@pytest.mark.parametrize(
    ("net", "fisher_type", "kfac_approx"),
    [
        ("mlp", "type-2", "expand"),
        ("mlp", "empirical", "reduce"),
        ("cnn", "type-2", "reduce"),
        ("cnn", "empirical", "expand"),
    ],
)
def test_one_loss_row_per_sample_equals_brute_force(net, fisher_type, kfac_approx):
    # (N, C) outputs, with conv weight sharing inside (per-sample gradient summed over locations).
    if net == "mlp":
        model = mlp([4, 5, 3], nn.Tanh(), seed=38)
        gen = _gen(39)
        data = [
            (torch.randn(n, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen))
            for n in (4, 2)
        ]
    else:
        torch.manual_seed(40)
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
        ).to(DTYPE)
        gen = _gen(41)
        data = [
            (torch.randn(n, 2, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen))
            for n in (3, 2)
        ]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    E = EKFACOperator(model, loss_fn, data, fisher_type=fisher_type, kfac_approx=kfac_approx)
    reference = _brute_force_eigenvalues(
        E, model, loss_fn, data, "ggn" if fisher_type == "type-2" else "empirical"
    )
    assert _worst(E, reference) <= EXACT_RTOL


def test_empirical_mse_on_sequences_equals_brute_force():
    # MSE's empirical-Fisher term is the sample (FisherOperator): the per-sample gradient sums
    # over positions, exactly what EKFAC squares.
    model, loss_fn, data = _case("seq_mse")
    E = EKFACOperator(model, loss_fn, data, fisher_type="empirical")
    assert _worst(E, _brute_force_eigenvalues(E, model, loss_fn, data, "empirical")) <= EXACT_RTOL


@pytest.mark.parametrize("name", ["seq_ce", "map_mse"])
def test_mc_is_unbiased_for_the_type2_eigenvalues(name):
    # Draws of different rows are independent with mean zero: the cross-row products vanish
    # in expectation, so S(m draws) -> the brute-force type-2 S in the operator's basis, with
    # error ~ σ/√m. 64x the draws should cut the error ~8x; we require >= 3x (fixed seeds make
    # this deterministic; 8/3 covers one realisation's spread) and <= 10% at m = 1024. A bias
    # (e.g. cross-row products that do not cancel) would stall the error at its size instead.
    model, loss_fn, data = _case(name)
    errors = {}
    for m in (16, 1024):
        E = EKFACOperator(model, loss_fn, data, fisher_type="mc", mc_samples=m, seed=1)
        reference = _brute_force_eigenvalues(E, model, loss_fn, data, "ggn")
        errors[m] = max(float((s - r).norm() / r.norm()) for s, r in zip(E.corrected_eigenvalues, reference))
    assert errors[1024] < errors[16] / 3
    assert errors[1024] < 0.1
