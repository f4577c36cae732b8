"""Cross-checks of the operators against the peer libraries, and the cases where they are wrong.

- curvlinops 3.0.1 computes the same Hessian, GGN and empirical Fisher on models without
  normalisation layers (and with batches whose mean normaliser is proportional to the
  sample count): we agree to rounding (``1e4·u`` relative, u = 1.1e-16: two exact float64
  computations in different orders).
- curvlinops' Hessian through LayerNorm is wrong (vmap batching rule of layer_norm's double
  backward on this torch); ours matches the plain double-backward reference and finite
  differences.
- hessian-eigenthings 1.0.0a5 averages batch means with equal weights; with batches of 5
  and 2 samples its Hessian of a linear regression is ~20% off the whole-dataset Hessian,
  which ours reproduces exactly (closed form ``2/(N·K) [X 1]ᵀ[X 1]`` per output).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from tests.operators.cases import call_model, case_ids, get_case, num_samples
from tests.operators.references import dense_hessian, finite_difference_hvp

curvlinops = pytest.importorskip("curvlinops")

DENSE_RTOL = 1e4 * torch.finfo(torch.float64).eps / 2


class _Positional(nn.Module):
    """curvlinops calls ``model(X)``; dict-input models want ``model(**X)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return call_model(self.model, inputs)


def _curvlinops_dense(name: str, model, loss_fn, data, params) -> torch.Tensor:
    op = getattr(curvlinops, name)(
        _Positional(model), loss_fn, params, data, check_deterministic=False, batch_size_fn=num_samples
    )
    return op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


PEER_CASES = [
    get_case(i)
    for i in (
        "mlp_tanh-ce_mean",
        "mlp_gelu-bce_mean",
        "cnn_tanh_avgpool-ce_mean",
        "tied_embed-ce_sum-tiny_last",
        "dict_mlp-mse_mean",
        "attn_nonorm-ce_seq_mean",
    )
]


@pytest.mark.parametrize("case", PEER_CASES, ids=case_ids(PEER_CASES))
def test_agrees_with_curvlinops(case):
    model, loss_fn, data = case.make()
    for ours, theirs in ((HessianOperator, "HessianLinearOperator"), (GGNOperator, "GGNLinearOperator")):
        op = ours(model, loss_fn, data)
        assert _rel(op.to_dense(), _curvlinops_dense(theirs, model, loss_fn, data, op.params)) <= DENSE_RTOL
    ef = FisherOperator(model, loss_fn, data, kind="empirical")
    assert (
        _rel(ef.to_dense(), _curvlinops_dense("EFLinearOperator", model, loss_fn, data, ef.params))
        <= DENSE_RTOL
    )


def test_layernorm_hessian_right_where_curvlinops_is_not():
    model, loss_fn, data = get_case("transformer_ln-ce_seq_ignore_sum-tiny_last").make()
    H = HessianOperator(model, loss_fn, data)
    ours = H.to_dense()
    assert _rel(ours, dense_hessian(model, loss_fn, data, H.params)) <= DENSE_RTOL
    assert _rel(ours, ours.T) <= DENSE_RTOL
    # Independent of every double backward: central differences in a random direction
    # (float64, step 1e-5: truncation ~1e-10 relative, rounding ~u/1e-5 ~ 1e-11).
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fd = finite_difference_hvp(model, loss_fn, data, H.params, v, 1e-5)
    assert float((ours @ v - fd).norm() / fd.norm()) < 1e-7
    theirs = _curvlinops_dense("HessianLinearOperator", model, loss_fn, data, H.params)
    assert _rel(theirs, ours) > 1e-3, "curvlinops' LayerNorm Hessian was fixed: update the docs"
    assert _rel(theirs, theirs.T) > 1e-3


def test_unequal_batches_exact_where_eigenthings_is_not():
    he = pytest.importorskip("hessian_eigenthings")
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    X = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 1, dtype=torch.float64)
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    H = HessianOperator(model, nn.MSELoss(), data)
    Xa = torch.cat([X, torch.ones(7, 1, dtype=torch.float64)], dim=1)
    closed_form = 2.0 / 7 * Xa.T @ Xa  # weight (1, 3) then bias (1,)
    assert _rel(H.to_dense(), closed_form) <= DENSE_RTOL
    op = he.HessianOperator(model, data, he.supervised_loss(nn.MSELoss()))
    theirs = torch.stack([op.matvec(e) for e in torch.eye(4, dtype=torch.float64)], dim=1)
    assert _rel(theirs, closed_form) > 0.05, (
        "hessian-eigenthings now weights batches exactly: update the docs"
    )
