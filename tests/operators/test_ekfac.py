"""EKFACOperator: exactness of the corrected eigenvalues, closed forms, inverse, curvlinops.

Tolerances as in ``test_kfac.py``: ``EXACT_RTOL = 1e4·u`` for two exact float64 computations
of the same sums in different orders (≲ 10³ summands × cancellation ≲ 10, 10× margin).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator
from curvops.operators.ekfac import EKFACOperator
from curvops.operators.kfac import KFACOperator
from curvops.operators.kfac_factors import projected_second_moment
from tests.operators.test_kfac import (
    EXACT_RTOL,
    U,
    _rel,
    block_mask,
    classification_data,
    mlp,
    regression_data,
)

DTYPE = torch.float64


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).to(DTYPE)


def _cnn_data(sizes=(5, 3, 2), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 2, 5, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen))
        for n in sizes
    ]


def _block_indices(op, i: int) -> torch.Tensor:
    """Operator-layout indices of block i's entries in the block's [W | b] row-major order."""
    block = op.blocks[i]
    offsets = np.cumsum([0] + op.param_numels)
    out = block.G.shape[0]
    cols = []
    if block.weight is not None:
        cols.append(torch.arange(op.param_numels[block.weight]).reshape(out, -1) + int(offsets[block.weight]))
    if block.bias is not None:
        cols.append(torch.arange(out).reshape(out, 1) + int(offsets[block.bias]))
    return torch.cat(cols, dim=1).reshape(-1)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_corrected_eigenvalues_are_exact_block_diagonal_in_eigenbasis(net, separate, fisher_type):
    # (N, C) outputs: one loss row per sample, so the per-sample columns factorise the loss
    # Hessian exactly and S = diag((Q_G ⊗ Q_A)ᵀ B (Q_G ⊗ Q_A)) for the exact block B — with
    # several samples and with conv weight sharing (per-sample gradients summed over locations).
    if net == "mlp":
        model, data = mlp([4, 5, 3], nn.Tanh(), seed=20), classification_data(4, 3)
    else:
        model, data = _cnn(21), _cnn_data()
    loss_fn = nn.CrossEntropyLoss()
    E = EKFACOperator(model, loss_fn, data, fisher_type=fisher_type, separate_weight_and_bias=separate)
    if fisher_type == "type-2":
        exact = GGNOperator(model, loss_fn, data).to_dense()
    else:
        exact = FisherOperator(model, loss_fn, data, kind="empirical").to_dense()
    for i, eig in enumerate(E.eigendecomposition()):
        idx = _block_indices(E, i)
        B = exact[idx][:, idx]
        Q = torch.kron(eig.G_eigenvectors, eig.A_eigenvectors)
        reference = torch.diagonal(Q.T @ B @ Q).reshape(E.corrected_eigenvalues[i].shape)
        assert _rel(E.corrected_eigenvalues[i], reference) <= EXACT_RTOL
    # hence the trace is the exact blocks' trace
    assert math.isclose(float(E.trace()), float(torch.trace(exact)), rel_tol=EXACT_RTOL)


def test_single_datum_equals_kfac_and_ggn_blocks():
    # One datum: KFAC is exact, its eigenbasis diagonalises the block, EKFAC changes nothing.
    model = mlp([4, 5, 3], nn.Sigmoid(), seed=22)
    data = regression_data((4,), (3,), sizes=(1,))
    E = EKFACOperator(model, nn.MSELoss(), data)
    K = KFACOperator(model, nn.MSELoss(), data)
    ggn = GGNOperator(model, nn.MSELoss(), data).to_dense()
    # EKFAC reassembles Q diag(S) Qᵀ: adds the eigensolver's rounding, ≲ D·u·‖K‖.
    assert _rel(E.to_dense(), ggn * block_mask(E)) <= 10 * EXACT_RTOL
    assert _rel(K.to_dense(), ggn * block_mask(K)) <= EXACT_RTOL


@pytest.mark.parametrize(("R", "p", "q"), [(1, 3, 4), (2, 9, 10), (6, 3, 2)])
def test_projected_second_moment_strategies(R, p, q):
    # R=1: squared rows; R=2, p·q > R²(p+q): Gramian; R=6: per-sample gradients.
    gen = torch.Generator().manual_seed(R)
    g = torch.randn(7, R, p, generator=gen, dtype=DTYPE)
    a = torch.randn(7, R, q, generator=gen, dtype=DTYPE)
    brute = torch.einsum("nri,nrj->nij", g, a).square().sum(0)
    assert _rel(projected_second_moment(g, a), brute) <= EXACT_RTOL
    assert _rel(projected_second_moment(g, None), g.sum(1).square().sum(0).unsqueeze(1)) <= EXACT_RTOL


@pytest.fixture(scope="module")
def ekfac():
    return EKFACOperator(_cnn(23), nn.CrossEntropyLoss(), _cnn_data(sizes=(4, 3)))


def test_closed_forms_and_inverse(ekfac):
    E = ekfac
    dense = E.to_dense()
    assert _rel(dense, dense.T) <= EXACT_RTOL
    assert math.isclose(float(E.trace()), float(torch.trace(dense)), rel_tol=EXACT_RTOL)
    assert math.isclose(float(E.frobenius_norm()), float(torch.linalg.matrix_norm(dense)), rel_tol=EXACT_RTOL)
    assert _rel(E.diagonal(), torch.diagonal(dense)) <= 10 * EXACT_RTOL
    evals = torch.linalg.eigvalsh(dense)
    assert float((E.eigenvalues() - evals).abs().max()) <= 1e3 * EXACT_RTOL * float(evals.abs().max())
    delta = 1e-2
    eye = torch.eye(dense.shape[0], dtype=DTYPE)
    # logdet: D logs each off by ≲ cond·u, cond ≲ ‖E‖/δ ≈ 1e2: 1e-9 is ample, a wrong block is O(1).
    assert abs(
        float(E.logdet(delta)) - float(torch.linalg.slogdet(dense + delta * eye).logabsdet)
    ) <= 1e-9 * abs(float(E.logdet(delta)))
    inv = E.inverse(delta)
    V = torch.randn(E.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    # error ≲ cond(E + δI)·u·‖V‖, cond ≲ 1e3
    assert float((E @ (inv @ V) + delta * (inv @ V) - V).abs().max()) <= 1e6 * U * float(V.abs().max())
    assert isinstance(inv @ V[:, 0].numpy(), np.ndarray)
    with pytest.raises(ValueError, match="method='exact' only"):
        E.inverse(delta, method="pi")
    with pytest.raises(ValueError, match="damping"):
        E.inverse(-1.0)


@pytest.mark.parametrize(
    ("net", "fisher_type", "separate"),
    [
        ("mlp", "type-2", False),
        ("mlp", "empirical", True),
        ("cnn", "type-2", True),
        ("cnn", "type-2", False),
    ],
)
def test_agrees_with_curvlinops(net, fisher_type, separate):
    """curvlinops' EKFACLinearOperator in the matching configuration (see test_kfac)."""
    curvlinops = pytest.importorskip("curvlinops")
    if net == "mlp":
        model, data = mlp([4, 5, 3], nn.Tanh(), seed=24), classification_data(4, 3)
    else:
        model, data = _cnn(25), _cnn_data()
    E = EKFACOperator(
        model, nn.CrossEntropyLoss(), data, fisher_type=fisher_type, separate_weight_and_bias=separate
    )
    op = curvlinops.EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        E.params,
        data,
        check_deterministic=False,
        fisher_type=fisher_type,
        separate_weight_and_bias=separate,
    )
    theirs = op @ torch.eye(E.shape[0], dtype=DTYPE)
    # both reassemble Q diag(S) Qᵀ with their own eigensolver calls: ≲ D·u·‖E‖ apart
    assert _rel(E.to_dense(), theirs) <= 10 * EXACT_RTOL


def test_out_is_written_in_place(ekfac):
    """``matmat_torch(X, out=rows.T)`` for rows of a larger buffer: ``out`` itself is returned
    holding ``E X``, and no other row is touched."""
    E = ekfac
    X = torch.randn(E.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    buffer = torch.full((4, E.shape[0]), float("nan"), dtype=DTYPE)
    out = buffer[1:3].T
    assert E.matmat_torch(X, out=out) is out
    assert torch.equal(out, E @ X)
    assert torch.isnan(buffer[0]).all()
    assert torch.isnan(buffer[3]).all()
