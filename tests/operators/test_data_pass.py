"""What a pass over the data sets up once, and what it still rechecks every pass.

A product reads the model's structure and enters the attention settings once per pass, and
remembers each batch's normaliser share while its targets are unchanged. These tests hold
the public behaviour that must survive those savings: a change of the targets or of the
loss settings the normaliser reads is still refused, and the attention settings are in
place for every forward pass of a product and restored after it, also when it fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvops import GGNOperator, HessianOperator, ProductStrategy
from tests.operators.references import dense_ggn, dense_hessian

DTYPE = torch.float64


def _problem(weight: Tensor | None = None) -> tuple[nn.Module, nn.CrossEntropyLoss, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DTYPE)
    data = [(torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 4, (6,))) for _ in range(3)]
    return model, nn.CrossEntropyLoss(weight=weight), data


def _operators(model: nn.Module, loss: nn.Module, data: list) -> list:
    return [
        HessianOperator(model, loss, data),
        HessianOperator(model, loss, data, method="finite_difference"),
        GGNOperator(model, loss, data),
    ]


@pytest.mark.parametrize("change", ["class_weights_in_place", "ignore_index"])
def test_loss_settings_changed_after_construction_are_refused(change):
    """The normaliser counts the targets through the loss's class weights and ignore_index:
    changing those after construction changes the objective, and every product refuses it,
    after products that remembered the counts of the unchanged data."""
    model, loss, data = _problem(weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=DTYPE))
    ops = _operators(model, loss, data)
    v = torch.randn(ops[0].shape[0], dtype=DTYPE)
    for op in ops:
        op @ v
        op @ v  # the counts of this pass are the remembered ones
    if change == "class_weights_in_place":
        with torch.no_grad():
            loss.weight.mul_(2.0)
    else:
        loss.ignore_index = int(data[0][1][0])
    for op in ops:
        with pytest.raises(ValueError, match="data changed since the operator was built"):
            op @ v


def test_targets_replaced_or_changed_in_place_are_recounted():
    """A batch's targets replaced by another tensor, or changed in place, are counted anew: an
    equal replacement gives the same product, one with ignored targets is refused."""
    model, loss, data = _problem()
    op = HessianOperator(model, loss, data)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    before = op @ v
    op @ v
    inputs, target = data[1]
    data[1] = (inputs, target.clone())
    torch.testing.assert_close(op @ v, before, rtol=0, atol=0)
    data[1][1][:2] = -100  # in place, on the replacement
    with pytest.raises(ValueError, match="data changed since the operator was built"):
        op @ v
    data[1] = (inputs, target)
    torch.testing.assert_close(op @ v, before, rtol=0, atol=0)


class _Recorder(nn.Module):
    """Records whether the MHA fast path is enabled during each of its forward passes."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4).to(DTYPE)
        self.seen: list[bool] = []
        self.fail_on_call = fail_on_call

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(torch.backends.mha.get_fastpath_enabled())
        if self.fail_on_call is not None and len(self.seen) == self.fail_on_call:
            raise RuntimeError("model failure")
        return self.layer(x)


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_attention_settings_hold_in_every_forward_and_are_restored(operator):
    """The fused attention paths are off in every forward pass of a product, and on again
    after it, also after a product that failed mid-pass."""
    torch.manual_seed(0)
    data = [(torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 4, (5,))) for _ in range(3)]
    model = _Recorder()
    op = operator(model, nn.CrossEntropyLoss(), data)
    assert torch.backends.mha.get_fastpath_enabled()
    v = torch.randn(op.shape[0], dtype=DTYPE)
    model.seen.clear()
    op @ v
    assert model.seen
    assert not any(model.seen)
    assert torch.backends.mha.get_fastpath_enabled()

    model.seen.clear()
    model.fail_on_call = 2
    with pytest.raises(RuntimeError, match="model failure"):
        op @ v
    assert torch.backends.mha.get_fastpath_enabled()
    model.fail_on_call = None
    model.seen.clear()
    op @ v
    assert model.seen
    assert not any(model.seen)
    assert torch.backends.mha.get_fastpath_enabled()


def _batchnorm_sequential(train: bool) -> nn.Sequential:
    """torch's own modules only, with a batch norm whose running statistics are non-trivial."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), bn, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DTYPE)
    assert bn.running_mean is not None
    assert bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.train(train)


def _image_data() -> list:
    torch.manual_seed(2)
    return [(torch.randn(4, 2, 4, 4, dtype=DTYPE), torch.randint(0, 3, (4,))) for _ in range(2)]


def test_products_of_a_model_that_only_reads_its_buffers_match_the_references():
    """A model of torch's modules whose batch norm is in eval mode reads its buffers in place:
    the products equal the dense float64 references, and the buffers keep values and versions."""
    model, data, loss = _batchnorm_sequential(train=False), _image_data(), nn.CrossEntropyLoss()
    params = list(model.parameters())
    buffers = [b.clone() for b in model.buffers()]
    versions = [b._version for b in model.buffers()]
    v = torch.randn(sum(p.numel() for p in params), dtype=DTYPE)
    hv = dense_hessian(model, loss, data, params) @ v
    gv = dense_ggn(model, loss, data, params) @ v
    # float64 rounding over a few hundred terms: far below 1e-10 relative.
    for op, expected, rtol in (
        (HessianOperator(model, loss, data), hv, 1e-10),
        (HessianOperator(model, loss, data, strategy=_double_backward()), hv, 1e-10),
        (GGNOperator(model, loss, data), gv, 1e-10),
        # central differences in float64: relative error of order u^(2/3) ~ 1e-11 times model constants
        (HessianOperator(model, loss, data, method="finite_difference"), hv, 1e-6),
    ):
        result = op @ v
        assert float((result - expected).norm()) <= rtol * float(expected.norm())
    for b, saved, version in zip(model.buffers(), buffers, versions):
        torch.testing.assert_close(b, saved, rtol=0, atol=0)
        assert b._version == version


def _double_backward() -> ProductStrategy:
    return ProductStrategy(hessian_vector="double_backward")


@pytest.mark.parametrize("writer", ["train_mode", "forward_pre_hook"])
def test_a_model_that_writes_its_buffers_still_runs_on_copies(writer):
    """Batch norm in train mode updates its running statistics, and a hook may write a buffer:
    such models run on copies, so a product leaves the buffers (values and versions) as they were."""
    model = _batchnorm_sequential(train=writer == "train_mode")
    if writer == "forward_pre_hook":

        def shift_statistics(module: nn.BatchNorm2d, args: tuple) -> None:
            assert module.running_mean is not None
            module.running_mean.add_(1.0)

        model[1].register_forward_pre_hook(shift_statistics)
    data, loss = _image_data(), nn.CrossEntropyLoss()
    buffers = [b.clone() for b in model.buffers()]
    versions = [b._version for b in model.buffers()]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    for op in (
        HessianOperator(model, loss, data, check_deterministic=False),
        GGNOperator(model, loss, data, check_deterministic=False),
    ):
        op @ v
        op @ v
    for b, saved, version in zip(model.buffers(), buffers, versions):
        torch.testing.assert_close(b, saved, rtol=0, atol=0)
        assert b._version == version
