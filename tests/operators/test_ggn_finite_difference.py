"""``GGNOperator(method="finite_difference")``: ``J v`` by central differences of the output.

The product is approximate by design; its error must be what central differences promise, and
what differences of values cannot see (reverse-mode constants) must be handled or refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import GGNOperator
from tests.operators.cases import get_case
from tests.operators.references import dense_ggn
from tests.operators.test_forward_mode_consistency import PROBLEMS, _vector

#: Central differences with the default step ``ε ≈ 10 u^(1/3)`` err by ``O(ε²) + O(u/ε)``,
#: i.e. ``O(u^(2/3)) ≈ 2e-11`` in float64, times the model's third derivatives and the
#: output's conditioning; 1e-7 leaves three to four orders of magnitude for those constants.
#: The defects this guards against (a wrong step scale, a missing division, a sign) are O(1).
FD_RTOL = 1e-7


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    "case_id",
    [
        "mlp_tanh-ce_mean",
        "transformer_ln-ce_seq_ignore_mean",
        "attn_nonorm-ce_seq_mean",
        "mlp_tanh-mse_sum-tiny_last",
    ],
)
def test_finite_difference_ggn_approximates_the_exact_one(case_id):
    model, loss_fn, data = get_case(case_id).make()
    exact = GGNOperator(model, loss_fn, data)
    fd = GGNOperator(model, loss_fn, data, method="finite_difference")
    reference = dense_ggn(model, loss_fn, data, exact.params)
    V = torch.randn(exact.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    error = _relative_error(fd @ V, reference @ V)
    assert error < FD_RTOL, error
    assert error > 0, "finite differences are not exact: a zero error means the exact path ran"
    assert _relative_error(fd @ V[:, 0], reference @ V[:, 0]) < FD_RTOL


def test_step_size_moves_the_error_as_central_differences_predict():
    """Truncation error ``∝ ε²``: ten times the step, about a hundred times the error."""
    model, loss_fn, data = get_case("mlp_tanh-ce_mean").make()
    exact = GGNOperator(model, loss_fn, data)
    v = _vector(exact.shape[0], seed=3)
    reference = exact @ v
    errors = [
        _relative_error(
            GGNOperator(model, loss_fn, data, method="finite_difference", fd_eps=eps) @ v, reference
        )
        for eps in (1e-2, 1e-1)
    ]
    assert 30 < errors[1] / errors[0] < 300, errors


@pytest.mark.parametrize("problem", ["padding_idx", "negative_padding_idx"])
def test_padding_rows_are_left_out_of_the_direction(problem):
    model, loss_fn, data = PROBLEMS[problem]()
    G = GGNOperator(model, loss_fn, data, method="finite_difference")
    v = _vector(G.shape[0])
    reference = dense_ggn(model, loss_fn, data, G.params) @ v
    assert _relative_error(G @ v, reference) < FD_RTOL


@pytest.mark.parametrize("problem", ["no_grad_region", "detached_region"])
def test_values_hidden_from_reverse_mode_are_refused(problem):
    model, loss_fn, data = PROBLEMS[problem]()
    G = GGNOperator(model, loss_fn, data, method="finite_difference")
    with pytest.raises(ValueError, match="method='autograd'"):
        G @ _vector(G.shape[0])


def test_no_side_effects_on_parameters():
    model, loss_fn, data = get_case("mlp_tanh-ce_mean").make()
    before = [(p.detach().clone(), p._version) for p in model.parameters()]
    G = GGNOperator(model, loss_fn, data, method="finite_difference")
    G @ _vector(G.shape[0])
    for p, (value, version) in zip(model.parameters(), before):
        assert torch.equal(p, value)
        assert p._version == version
        assert p.grad is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "finite_differences"}, "method must be 'autograd' or 'finite_difference'"),
        ({"method": "finite_difference", "fd_eps": 0.0}, "fd_eps must be a positive number"),
        ({"method": "finite_difference", "fused_head": True}, "no finite-difference variant"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = nn.Sequential(nn.Linear(3, 4, bias=False)).double()
    data = [(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=message):
        GGNOperator(model, nn.CrossEntropyLoss(), data, **kwargs)


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_finite_differences_under_autocast_are_refused(operator):
    """bfloat16 forward passes leave no digits to central differences (relative errors of
    order 1 on GPT-2): refused with the fix named, where a product would be silently wrong."""
    from curvops import HessianOperator

    model, loss_fn, data = get_case("mlp_tanh-ce_mean").make()
    model, data = model.float(), [(x.float(), y) for x, y in data]
    cls = GGNOperator if operator == "ggn" else HessianOperator
    op = cls(model, loss_fn, data, method="finite_difference")
    v = torch.ones(op.shape[0])
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(ValueError, match="method='autograd' under autocast"),
    ):
        op @ v
    assert torch.isfinite(op @ v).all()  # outside autocast it works
