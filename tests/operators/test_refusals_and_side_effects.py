"""Issue 26, "no silent wrong answers": side effects, stale data, input validation, messages.

Every test here goes through the public API. A product must leave the model as it was (its
parameters' version counters included, so a graph the user built earlier still
backpropagates); data changed after construction, shapes torch would broadcast, and invalid
settings are refused with a message that names the problem and the fix; valid problems that
look odd (a padding-only first batch, an empty block, a bfloat16 model) work.

References are dense matrices built independently by plain double backward in float64
(``references.py``); tolerances are derived from the precision where stated.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, JacobianOperator, KFACOperator
from tests.operators.cases import TiedEmbeddingModel
from tests.operators.references import dense_empirical_fisher, dense_ggn, dense_hessian

#: float64 products against float64 dense references: both are sums of a few hundred
#: roundings of order u = 1.1e-16 relative to the largest entries, so 1e-10 leaves a margin
#: of 10^4 and still catches any error of the order of one term.
RTOL64 = 1e-10


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _data(n_batches: int = 2, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (size,), generator=g))
        for _ in range(n_batches)
    ]


def _vector(dim: int, seed: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Norm-wise relative comparison (entries near zero carry no scale of their own)."""
    error = float(torch.linalg.vector_norm((actual - expected).double()))
    scale = float(torch.linalg.vector_norm(expected.double()))
    assert error <= rtol * scale, f"relative error {error / scale:.3e} > {rtol:.1e}"


# ================================================================ side effects (item 8)
def test_finite_difference_product_keeps_the_users_graph():
    """A loss the user built before ``H @ v`` still backpropagates, to the same gradient."""
    model = _mlp()
    data = _data()
    x, y = data[0]
    pending = nn.functional.cross_entropy(model(x), y)  # graph saves the parameters
    params = list(model.parameters())
    versions = [p._version for p in params]
    values = [p.detach().clone() for p in params]
    op = HessianOperator(model, nn.CrossEntropyLoss(), data, method="finite_difference")
    v = _vector(op.shape[0])
    hv = op @ v
    assert [p._version for p in params] == versions
    assert all(torch.equal(p, p0) for p, p0 in zip(params, values))
    pending.backward()  # on HEAD: "modified by an inplace operation"
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    # The product itself: central differences in float64 are accurate to about u^(2/3)
    # (the docstring's 1e-10 to 1e-8); 1e-6 leaves a margin for the model constants.
    _close(hv, dense_hessian(model, nn.CrossEntropyLoss(), data, params) @ v, 1e-6)


def test_finite_difference_product_of_tied_weights():
    """Evaluated out of place, a tied weight is still one parameter used twice."""
    torch.manual_seed(0)
    model = TiedEmbeddingModel().double()
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randint(0, 6, (5,), generator=g), torch.randint(0, 6, (5,), generator=g)) for _ in range(2)
    ]
    params = list(model.parameters())
    versions = [p._version for p in params]
    op = HessianOperator(model, nn.CrossEntropyLoss(), data, method="finite_difference")
    v = _vector(op.shape[0])
    hv = op @ v
    assert [p._version for p in params] == versions
    _close(hv, dense_hessian(model, nn.CrossEntropyLoss(), data, params) @ v, 1e-6)


# ================================================================ stale data (item 9)
def _operators(data):
    loss = nn.CrossEntropyLoss()
    return {
        "hessian": HessianOperator(_mlp(), loss, data),
        "hessian_fd": HessianOperator(_mlp(), loss, data, method="finite_difference"),
        "ggn": GGNOperator(_mlp(), loss, data),
        "fisher_mc": FisherOperator(_mlp(), loss, data),
        "fisher_empirical": FisherOperator(_mlp(), loss, data, kind="empirical"),
    }


@pytest.mark.parametrize("change", ["append_batch", "ignore_targets"])
def test_data_changed_after_construction_is_refused(change):
    """A batch appended, or targets set to ignore_index: the normaliser fixed at construction
    is no longer the data's, so products and the loss refuse instead of mixing the two."""
    data = _data()
    ops = _operators(data)
    v = _vector(next(iter(ops.values())).shape[0])
    if change == "append_batch":
        data.append(_data(3)[2])
    else:
        data[1][1][:2] = -100
    for op in ops.values():
        with pytest.raises(ValueError, match="data changed since the operator was built.*build a new"):
            op @ v
        with pytest.raises(ValueError, match="data changed since the operator was built"):
            op.loss_and_gradient()


def test_jacobian_refuses_an_appended_batch():
    """The Jacobian's rows are those of the batches it was built on: on HEAD an appended
    batch made ``J v`` longer than ``shape[0]`` and ``Jᵀ u`` skip the new batch."""
    data = _data()
    jac = JacobianOperator(_mlp(), data)
    v, u = _vector(jac.shape[1]), _vector(jac.shape[0])
    data.append(_data(3)[2])
    with pytest.raises(ValueError, match="data changed since the operator was built.*3 batches.*had 2"):
        jac @ v
    with pytest.raises(ValueError, match="data changed since the operator was built.*3 batches.*had 2"):
        jac.T @ u


def test_unchanged_data_and_normaliser_keep_working():
    """Inputs replaced in place keep the normaliser: the products follow the current data
    exactly (no false refusal), here against a dense reference of the new data."""
    data = _data()
    op = GGNOperator(_mlp(), nn.CrossEntropyLoss(), data)
    v = _vector(op.shape[0])
    op @ v
    data[0][0].mul_(2.0)
    model = _mlp()
    reference = dense_ggn(model, nn.CrossEntropyLoss(), data, list(model.parameters()))
    _close(op @ v, reference @ v, RTOL64)


# ====================================================== valid problems refused (item 10)
@pytest.mark.parametrize("first", ["padding", "zero_weights"])
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
def test_first_batch_without_counted_terms_is_accepted(cls, first):
    """A padding-only first batch (every target ignore_index, or every class weight 0) is a
    valid problem: it contributes nothing to the mean; the products are the whole data's."""
    data = _data(3)
    if first == "padding":
        loss = nn.CrossEntropyLoss()
        data[0] = (data[0][0], torch.full_like(data[0][1], -100))
    else:
        loss = nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0], dtype=torch.float64))
        data[0] = (data[0][0], torch.zeros_like(data[0][1]))
    kwargs = {"kind": "empirical"} if cls is FisherOperator else {}
    op = cls(_mlp(), loss, data, **kwargs)  # on HEAD: "does not reproduce ... please report it"
    model = _mlp()
    reference = {
        HessianOperator: dense_hessian,
        GGNOperator: dense_ggn,
        FisherOperator: dense_empirical_fisher,
    }[cls](model, loss, data, list(model.parameters()))
    v = _vector(op.shape[0])
    _close(op @ v, reference @ v, RTOL64)


@pytest.mark.parametrize(
    ("loss", "target", "message"),
    [
        (nn.MSELoss(), torch.zeros(4, 1, dtype=torch.float64), r"MSELoss.*\(4, 1\).*\(4, 2\).*broadcast"),
        (
            nn.BCEWithLogitsLoss(),
            torch.zeros(4, 1, dtype=torch.float64),
            r"BCEWithLogitsLoss.*\(4, 1\).*\(4, 2\)",
        ),
        (nn.CrossEntropyLoss(), torch.zeros(4, 1, dtype=torch.long), r"must have shape \(4,\).*squeeze"),
    ],
    ids=["mse", "bce", "cross_entropy"],
)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_target_shape_mismatch_is_refused(loss, target, message, check):
    """Targets that torch would broadcast (with only a warning) or reject cryptically get a
    shape error naming both shapes, before any number is computed and without the warning.
    Checked, the construction's determinism check runs the model and refuses; unchecked, the
    construction runs nothing and the first product refuses."""
    data = [(x, target) for x, _ in _data()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's broadcasting UserWarning must not come first
        if check:
            with pytest.raises(ValueError, match=message):
                GGNOperator(_mlp(), loss, data, check_deterministic=True)
        else:
            op = GGNOperator(_mlp(), loss, data, check_deterministic=False)
            vector = _vector(op.shape[0])
            with pytest.raises(ValueError, match=message):
                op @ vector


# ================================================================ settings (item 13)
@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: FisherOperator(_mlp(), nn.CrossEntropyLoss(), _data(), **kw),
        lambda **kw: KFACOperator(_mlp(), nn.CrossEntropyLoss(), _data(), fisher_type="mc", **kw),
    ],
    ids=["fisher", "kfac"],
)
def test_monte_carlo_settings_are_validated(build):
    with pytest.raises(ValueError, match="mc_samples must be a positive integer.*True"):
        build(mc_samples=True)
    with pytest.raises(TypeError, match="seed must be a non-negative integer or None.*1.7"):
        build(seed=1.7)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build(seed=-1)
    op = build(seed=np.int64(5))
    assert op.seed == 5
    assert type(op.seed) is int


def test_seed_none_draws_a_fresh_seed_once():
    """seed=None: a fresh seed, stored; the operator is one fixed matrix, reproducible from it."""
    data = _data()
    op = FisherOperator(_mlp(), nn.CrossEntropyLoss(), data, seed=None)
    assert isinstance(op.seed, int)
    assert op.seed >= 0
    v = _vector(op.shape[0])
    first = op @ v
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)
    again = FisherOperator(_mlp(), nn.CrossEntropyLoss(), data, seed=op.seed)
    torch.testing.assert_close(again @ v, first, rtol=0, atol=0)
    kfac = KFACOperator(_mlp(), nn.CrossEntropyLoss(), data, fisher_type="mc", seed=None)
    assert isinstance(kfac.seed, int)
    assert kfac.seed >= 0


def test_more_monte_carlo_samples_than_fit_are_refused():
    """Draws that cannot fit (10^12 samples: about 180 TB here) are refused before any
    allocation, naming the number; a realistic count still works."""
    many = 10**12
    op = FisherOperator(_mlp(), nn.CrossEntropyLoss(), _data(), mc_samples=many)
    with pytest.raises(MemoryError, match=f"mc_samples={many}.*GiB.*fewer samples"):
        op @ _vector(op.shape[0])
    with pytest.raises(MemoryError, match=f"mc_samples={many}"):
        KFACOperator(_mlp(), nn.CrossEntropyLoss(), _data(), fisher_type="mc", mc_samples=many)


def test_monte_carlo_fisher_names_the_nan_batch():
    """NaN in the data: the MC Fisher reports the batch like the other operators, instead of
    torch.multinomial's RuntimeError about its probability tensor."""
    data = _data(3)
    data[1][0][0, 0] = float("nan")
    op = FisherOperator(_mlp(), nn.CrossEntropyLoss(), data, check_deterministic=False)
    with pytest.raises(FloatingPointError, match="batch 1 is NaN or Inf"):
        op @ _vector(op.shape[0])


# ================================================================ messages
def _all_operators():
    data = _data()
    loss = nn.CrossEntropyLoss()
    return [
        HessianOperator(_mlp(), loss, data),
        GGNOperator(_mlp(), loss, data),
        FisherOperator(_mlp(), loss, data),
        KFACOperator(_mlp(), loss, data),
    ]


def test_empty_block_gives_an_empty_result():
    """A (D, 0) block: an empty (D, 0) result, as numpy's ``@`` gives, on every path."""
    for op in _all_operators():
        dim = op.shape[0]
        empty = op @ torch.empty(dim, 0, dtype=torch.float64)
        assert isinstance(empty, torch.Tensor)
        assert empty.shape == (dim, 0)
        assert op.matmat(torch.empty(dim, 0, dtype=torch.float64)).shape == (dim, 0)
        for result in (op.matmat(np.empty((dim, 0))), op @ np.empty((dim, 0))):
            assert isinstance(result, np.ndarray)
            assert result.shape == (dim, 0)
    jac = JacobianOperator(_mlp(), _data())
    assert (jac @ torch.empty(jac.shape[1], 0, dtype=torch.float64)).shape == (jac.shape[0], 0)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator, KFACOperator])
def test_meta_device_model_is_refused(cls):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        cls(model, nn.CrossEntropyLoss(), [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))])


def test_bfloat16_model_works_on_torch_and_numpy():
    """A bfloat16 model: torch products in bfloat16; numpy has no bfloat16, so the scipy
    interface is float32 (input rounded to bfloat16, the same product, returned in float32)."""
    data = [(x.to(torch.bfloat16), y) for x, y in _data()]
    op = GGNOperator(_mlp(torch.bfloat16), nn.CrossEntropyLoss(), data)
    assert op.dtype == np.float32
    assert op.torch_dtype == torch.bfloat16
    v = _vector(op.shape[0]).to(torch.bfloat16)
    product = op @ v
    assert product.dtype == torch.bfloat16
    from_numpy = op @ v.float().numpy()
    assert from_numpy.dtype == np.float32
    np.testing.assert_array_equal(from_numpy, product.float().numpy())
    # Against the float64 GGN of the same (bfloat16-representable) weights and data: a
    # product of this depth in bfloat16 (u = 2^-8) is accurate to a few u; 16 u = 0.0625.
    model64 = _mlp(torch.bfloat16).double()
    data64 = [(x.double(), y) for x, y in data]
    reference = dense_ggn(model64, nn.CrossEntropyLoss(), data64, list(model64.parameters())) @ v.double()
    _close(product.double(), reference, 16 * 2.0**-8)


def test_fused_head_values_are_validated():
    with pytest.raises(ValueError, match="fused_head='nope'.*no submodule.*True"):
        GGNOperator(_mlp(), nn.CrossEntropyLoss(), _data(), fused_head="nope")
    with pytest.raises(TypeError, match="fused_head must be"):
        GGNOperator(_mlp(), nn.CrossEntropyLoss(), _data(), fused_head=3)
