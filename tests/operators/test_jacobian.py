"""JacobianOperator and its transpose against dense Jacobians built independently.

References: ``references.model_jacobian`` (row-by-row plain ``autograd.grad`` on the
concatenated data) and ``torch.func.jacrev`` (first order, reliable here). Products are
sums of D (or M) float64 terms, so they agree with the references to ~1e-15 relative;
RTOL = 1e-12 leaves a wide margin while any layout or batching error is O(1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import GGNOperator
from curvops.operators.jacobian import JacobianOperator, TransposedJacobianOperator
from tests.operators.cases import CASES, call_model, case_ids
from tests.operators.references import concat_batches, dense_ggn, model_jacobian

RTOL = 1e-12


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_products_match_dense_jacobian(case):
    model, _, data = case.make()
    J = JacobianOperator(model, data)
    out, ref = model_jacobian(model, data, J.params)
    assert J.shape == (out.numel(), sum(p.numel() for p in J.params))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(J.shape[1], dtype=torch.float64, generator=g)
    V = torch.randn(J.shape[1], 3, dtype=torch.float64, generator=g)
    w = torch.randn(J.shape[0], dtype=torch.float64, generator=g)
    W = torch.randn(J.shape[0], 3, dtype=torch.float64, generator=g)
    assert _rel(J @ v, ref @ v) <= RTOL
    assert _rel(J @ V, ref @ V) <= RTOL
    assert _rel(J.T @ w, ref.T @ w) <= RTOL
    assert _rel(J.T @ W, ref.T @ W) <= RTOL
    # numpy path (scipy semantics): matvec / rmatvec / matmat / rmatmat
    assert _rel(J.matvec(v.numpy()), ref @ v) <= RTOL
    assert _rel(J.rmatvec(w.numpy()), ref.T @ w) <= RTOL
    assert _rel(J.matmat(V.numpy()), ref @ V) <= RTOL
    assert _rel(J.rmatmat(W.numpy()), ref.T @ W) <= RTOL


def test_dense_matches_jacrev_and_blocks_match_columns():
    case = next(c for c in CASES if c.id == "cnn_bn_eval-ce_mean")
    model, _, data = case.make()
    J = JacobianOperator(model, data)
    x, _ = concat_batches(data)
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    ref = torch.cat([jac[n].reshape(J.shape[0], -1) for n in J.param_names], dim=1)
    assert _rel(J.to_dense(), ref) <= RTOL
    assert _rel(J.T.to_dense(), ref.T) <= RTOL
    # a block is the columns multiplied one by one
    V = torch.randn(J.shape[1], 4, dtype=torch.float64)
    block = J @ V
    for i in range(4):
        assert _rel(block[:, i], J @ V[:, i]) <= RTOL


def test_parameter_subset_and_transpose_roundtrip():
    case = next(c for c in CASES if c.id == "mlp_tanh-ce_mean")
    model, _, data = case.make()
    J = JacobianOperator(model, data, params="layers.1.*")
    assert J.param_names == ["layers.1.weight", "layers.1.bias"]
    _, ref = model_jacobian(model, data, J.params)
    assert _rel(J.to_dense(), ref) <= RTOL
    assert isinstance(J.T, TransposedJacobianOperator)
    assert J.T.T is J
    assert J.H.H is J
    assert J.T.shape == (J.shape[1], J.shape[0])
    parts = J.unflatten_output(torch.arange(J.shape[0], dtype=torch.float64))
    assert [tuple(p.shape) for p in parts] == [tuple(s) for s in J.output_shapes]
    assert set(J.T.unflatten(torch.zeros(J.shape[1], dtype=torch.float64))) == set(J.param_names)


def test_ggn_is_jt_hout_j():
    """Jᵀ H_out J with curvops' J equals curvops' GGN (ties the Jacobian layout to the GGN's)."""
    case = next(c for c in CASES if c.id == "mlp_gelu-bce_mean")
    model, loss_fn, data = case.make()
    J = JacobianOperator(model, data).to_dense()
    _, _, H_out = dense_ggn(model, loss_fn, data, list(model.parameters()), return_factors=True)
    G = GGNOperator(model, loss_fn, data).to_dense()
    assert _rel(J.T @ H_out @ J, G) <= 1e-10


def test_output_independent_of_selected_params():
    """A parameter the output does not depend on gives zero columns (no autograd error)."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    unused = nn.Linear(1, 1).double()
    model.add_module("unused", unused)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = model[0], unused

        def forward(self, x):
            return self.used(x)

    net = Wrap()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4))]
    J = JacobianOperator(net, data, params="unused.*")
    assert torch.equal(J.to_dense(), torch.zeros(8, 2, dtype=torch.float64))
    assert torch.equal(J.T @ torch.ones(8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------ bad input
def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.zeros(5)) for _ in range(2)]
    return model, data


def test_bad_shapes_dtype_device():
    model, data = _small()
    J = JacobianOperator(model, data)
    M, D = J.shape
    with pytest.raises(ValueError, match="shape"):
        J @ torch.zeros(M, dtype=torch.float64)  # an output-space vector where a parameter one belongs
    with pytest.raises(ValueError, match="shape"):
        J.T @ torch.zeros(D, dtype=torch.float64)
    # numpy in goes through scipy's LinearOperator.matvec, which checks the shape itself.
    with pytest.raises(ValueError, match="dimension mismatch"):
        J @ np.zeros(D + 1)
    with pytest.raises(TypeError, match="dtype"):
        J @ torch.zeros(D, dtype=torch.float32)
    with pytest.raises(ValueError, match="NaN"):
        J.T @ torch.full((M,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="device"):
        J @ torch.zeros(D, dtype=torch.float64, device="meta")


def test_bad_data_and_model():
    model, data = _small()
    with pytest.raises(TypeError, match="re-iterable"):
        JacobianOperator(model, iter(data))
    with pytest.raises(ValueError, match="empty"):
        JacobianOperator(model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        JacobianOperator(lambda x: x, data)
    dropout = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match="deterministic"):
        JacobianOperator(dropout, data)

    class Shuffling:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            g = torch.Generator().manual_seed(self.calls)
            yield torch.randn(5, 3, dtype=torch.float64, generator=g), torch.zeros(5)

    with pytest.raises(ValueError, match="different first batch"):
        JacobianOperator(model, Shuffling())


def test_dict_inputs_call_convention():
    case = next(c for c in CASES if c.dict_inputs)
    model, _, data = case.make()
    J = JacobianOperator(model, data)
    x, _ = concat_batches(data)
    assert J.shape[0] == call_model(model, x).numel()
