"""Bad input gets a clear error, never a silent wrong number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator

OPERATORS = [HessianOperator, GGNOperator, FisherOperator]


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(4, 2))
    return nn.Sequential(*layers).double()


def _data(n_batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (4,), generator=g))
        for _ in range(n_batches)
    ]


@pytest.fixture(params=OPERATORS, ids=lambda c: c.__name__)
def op(request):
    return request.param(_mlp(), nn.CrossEntropyLoss(), _data())


def test_wrong_length_vector(op):
    dim = op.shape[0]
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(dim + 1, dtype=torch.float64)
    # numpy in goes through scipy's LinearOperator.matvec, which checks the shape itself.
    with pytest.raises(ValueError, match="dimension mismatch"):
        op @ np.zeros(dim + 1)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(dim, 2, 2, dtype=torch.float64)


def test_wrong_dtype(op):
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.zeros(op.shape[0], dtype=torch.float32)


def test_bad_out_tensor(op):
    """``matmat_torch(X, out=...)``: a wrong shape, dtype or device, or an ``out`` that overlaps
    ``X`` (the product would overwrite its own input), is an error."""
    dim = op.shape[0]
    X = torch.ones(dim, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        op.matmat_torch(X, out=torch.empty(dim, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        op.matmat_torch(X, out=np.empty((dim, 2)))
    with pytest.raises(TypeError, match="dtype"):
        op.matmat_torch(X, out=torch.empty(dim, 2, dtype=torch.float32))
    with pytest.raises(TypeError, match="meta"):
        op.matmat_torch(X, out=torch.empty(dim, 2, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="overlap"):
        op.matmat_torch(X, out=X)
    buffer = torch.ones(3, dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        op.matmat_torch(buffer[:2].T, out=buffer[1:].T)
    op.matmat_torch(buffer[:1].T, out=buffer[1:2].T)  # neighbouring rows do not overlap


def test_complex_numpy_rejected(op):
    with pytest.raises(TypeError, match="complex"):
        op.matmat(np.zeros((op.shape[0], 1), dtype=complex))


def test_wrong_device(op):
    with pytest.raises(ValueError, match="device"):
        op @ torch.zeros(op.shape[0], dtype=torch.float64, device="meta")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_vector(op, bad):
    v = torch.zeros(op.shape[0], dtype=torch.float64)
    v[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        op @ v
    with pytest.raises(ValueError, match="NaN or Inf"):
        op @ v.numpy()


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_empty_data(cls):
    with pytest.raises(ValueError, match="empty"):
        cls(_mlp(), nn.CrossEntropyLoss(), [])


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_one_shot_iterator_rejected(cls):
    with pytest.raises(TypeError, match="re-iterable"):
        cls(_mlp(), nn.CrossEntropyLoss(), iter(_data()))


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_unsupported_reduction(cls):
    with pytest.raises(ValueError, match="reduction"):
        cls(_mlp(), nn.CrossEntropyLoss(reduction="none"), _data())


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_all_targets_ignored(cls):
    data = [(x, torch.full_like(y, -100)) for x, y in _data()]
    with pytest.raises(ValueError, match="ignore_index"):
        cls(_mlp(), nn.CrossEntropyLoss(), data)


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_params_not_of_model(cls):
    stranger = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        cls(_mlp(), nn.CrossEntropyLoss(), _data(), params=[stranger])


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_params_without_grad(cls):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        cls(model, nn.CrossEntropyLoss(), _data(), params=[model[0].weight])


def test_params_pattern_matching_nothing():
    with pytest.raises(ValueError, match="no parameter name matches"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), _data(), params="encoder.*")


def test_params_mixed_types():
    model = _mlp()
    with pytest.raises(TypeError, match="params must be"):
        HessianOperator(model, nn.CrossEntropyLoss(), _data(), params=["0.weight", model[2].bias])


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_dropout_left_on(cls):
    model = _mlp(dropout=0.5)
    model.train()
    with pytest.raises(ValueError, match="not deterministic.*model.eval"):
        cls(model, nn.CrossEntropyLoss(), _data())
    model.eval()
    cls(model, nn.CrossEntropyLoss(), _data())


def test_shuffling_data_rejected():
    class Shuffling:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            batches = _data(3)
            return iter(batches[self.calls % 3 :] + batches[: self.calls % 3])

    with pytest.raises(ValueError, match="different first batch"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), Shuffling())


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_nonfinite_loss_names_batch(cls):
    data = _data(3)
    model = _mlp()
    op = cls(model, nn.CrossEntropyLoss(), data)
    data[1][0][2, 0] = math.inf  # poison batch 1 after construction
    with pytest.raises(FloatingPointError, match="batch 1"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_nonfinite_loss_at_construction():
    data = _data(2)
    data[0][0][0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="batch 0"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), data)


def test_nonfinite_product_names_batch():
    # |f − y|^1.5 is finite with a finite gradient where f = y, but its second
    # derivative 0.75 |f − y|^-0.5 is infinite there.
    def loss_fn(output, target):
        return (output - target).abs().pow(1.5).mean()

    g = torch.Generator().manual_seed(3)
    data = [
        (
            torch.randn(3, 3, generator=g, dtype=torch.float64),
            torch.randn(3, 2, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    model = _mlp()
    op = HessianOperator(model, loss_fn, data)
    with torch.no_grad():
        data[2][1].copy_(model(data[2][0]))  # batch 2 sits exactly on the kink
    with pytest.raises(FloatingPointError, match="product is NaN or Inf on batch 2"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_custom_loss_without_distribution_has_no_mc_fisher():
    with pytest.raises(ValueError, match="predictive distribution"):
        FisherOperator(_mlp(), lambda out, y: (out.sum(1) - y).pow(2).mean(), _data(), kind="mc")


def test_unknown_options():
    with pytest.raises(ValueError, match="method"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), _data(), method="magic")
    with pytest.raises(ValueError, match="fd_eps"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), _data(), method="finite_difference", fd_eps=-1.0)
    with pytest.raises(ValueError, match="kind"):
        FisherOperator(_mlp(), nn.CrossEntropyLoss(), _data(), kind="true")
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(_mlp(), nn.CrossEntropyLoss(), _data(), mc_samples=0)


def test_loss_returning_vector():
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(_mlp(), lambda out, y: out.sum(1), _data())


def test_model_output_not_a_tensor():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return {"out": self.lin(x)}

    with pytest.raises(TypeError, match="logits"):
        HessianOperator(Weird(), nn.CrossEntropyLoss(), _data())


def test_to_dense_too_large(op):
    with pytest.raises(ValueError, match="max_dim"):
        op.to_dense(max_dim=op.shape[0] - 1)


def test_batch_not_a_pair():
    with pytest.raises(TypeError, match="pair"):
        HessianOperator(_mlp(), nn.CrossEntropyLoss(), [(torch.zeros(2, 3, dtype=torch.float64),)])
