"""Issue 31, item 7: a newcomer's mistakes get messages that name the problem and the fix.

- a model with one output under cross-entropy, and class indices outside the model's classes
  (torch says ``IndexError: Target 1 is out of bounds``);
- a custom loss that broadcasts its targets against the output (torch only warns);
- a hessian-eigenthings-style loss of the model and the batch (torch says ``'Tensor' object
  is not callable``) and the arguments in hessian-eigenthings' order;
- batch norm normalising by batch statistics (training mode): one ``UserWarning`` per
  operator that says what is computed and how to get the eval-mode curvature; none in
  eval mode.

Checked at construction (``check_deterministic=True``) and, where the check is switched off,
at the first product. Everything through the public API.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator

DTYPE = torch.float64
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _model(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(DTYPE)


def _data(labels: int | None = 3, size: int = 8) -> Batches:
    """Two batches; class labels ``0..labels-1`` (every one present), or float targets (None)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        x = torch.randn(size, 4, generator=g, dtype=DTYPE)
        y = torch.arange(size) % labels if labels is not None else torch.randn(size, generator=g, dtype=DTYPE)
        batches.append((x, y))
    return batches


def _vector(dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=DTYPE)


def _refused(build: Callable[..., Any], check: bool, error: type[Exception], message: str) -> None:
    """The mistake is refused with ``message``: at construction when checked, else at the first product."""
    if check:
        with pytest.raises(error, match=message):
            build(check_deterministic=True)
    else:
        op = build(check_deterministic=False)
        with pytest.raises(error, match=message):
            op @ _vector(op.shape[0])


CHECKED = pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": lambda *a, **kw: FisherOperator(*a, kind="mc", mc_samples=2, seed=0, **kw),
}


# ================================================================ cross-entropy and its classes
@CHECKED
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_one_output_under_cross_entropy_names_the_classes_and_the_fix(kind, check):
    """torch's ``IndexError: Target 1 is out of bounds``; with labels 0 only, a silent zero curvature."""
    for data in (_data(3), _data(1)):
        _refused(
            lambda data=data, **kw: OPERATORS[kind](_model(1), nn.CrossEntropyLoss(), data, **kw),
            check,
            ValueError,
            r"CrossEntropyLoss: the model output \(8, 1\) has 1 class .*softmax is the constant 1.*"
            r"one output per class.*nn\.Linear\(\.\.\., C\).*nn\.BCEWithLogitsLoss\(\)",
        )


@CHECKED
@pytest.mark.parametrize("kind", list(OPERATORS))
def test_class_index_outside_the_outputs_names_it_and_the_fix(kind, check):
    _refused(
        lambda **kw: OPERATORS[kind](_model(2), nn.CrossEntropyLoss(), _data(3), **kw),
        check,
        ValueError,
        r"class indices 2, outside the 2 classes of the model output \(8, 2\) \(class indices 0\.\.1, "
        r"or ignore_index=-100\)\. Give the model one output per class \(a last layer "
        r"nn\.Linear\(\.\.\., 3\) for classes 0\.\.2\), or map the labels to 0\.\.1",
    )


def test_negative_class_index_is_named_and_ignore_index_is_not():
    data = _data(2)
    data[1][1][0] = -1
    with pytest.raises(ValueError, match=r"class indices -1, outside the 2 classes"):
        HessianOperator(_model(2), nn.CrossEntropyLoss(), data[1:])
    # ignore_index is a valid target, not an out-of-range one
    data[1][1][0] = -100
    H = HessianOperator(_model(2), nn.CrossEntropyLoss(), data)
    assert torch.isfinite(H @ _vector(H.shape[0])).all()


# ================================================================ a custom loss that broadcasts
def test_custom_loss_broadcasting_targets_is_refused_without_torchs_warning():
    """``F.mse_loss`` of (8, 1) outputs and (8,) targets is a loss over all 64 pairs; torch only warns.

    Checked at construction (the determinism check evaluates the loss); a custom loss has no
    target shape curvops could check on every batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"loss_fn broadcasts the targets of shape \(8,\) against "):
            GGNOperator(_model(1), F.mse_loss, _data(None))
    assert [w for w in caught if "Using a target size" in str(w.message)] == []


def test_broadcast_message_names_the_shapes_and_the_fix():
    with pytest.raises(ValueError, match="broadcasts the targets") as info:
        HessianOperator(_model(1), F.mse_loss, _data(None))
    message = str(info.value)
    assert "the model output of shape (8, 1)" in message
    assert "Give targets of the output's shape (8, 1)" in message
    assert "(for one output per sample, targets.unsqueeze(1))" in message
    assert "pass nn.MSELoss()" in message
    # the fix works
    fixed = [(x, y.unsqueeze(1)) for x, y in _data(None)]
    H = HessianOperator(_model(1), F.mse_loss, fixed)
    G = HessianOperator(_model(1), nn.MSELoss(), fixed)
    v = _vector(H.shape[0])
    assert torch.allclose(H @ v, G @ v, rtol=1e-12, atol=0)


def test_other_warnings_of_a_custom_loss_reach_the_user_once():
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        warnings.warn("my loss says hello", UserWarning, stacklevel=1)
        return F.mse_loss(output, target)

    data = [(x, y.unsqueeze(1)) for x, y in _data(None)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GGNOperator(_model(1), loss, data)
    assert [str(w.message) for w in caught].count("my loss says hello") == 1


# ================================================================ losses of the model and the batch
def _eigenthings_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


FIX = (
    r"hessian-eigenthings' loss_fn\(model, batch\)\) becomes a loss of the output: pass "
    r"nn\.CrossEntropyLoss\(\) .*HessianOperator\(model, loss_fn, data\)"
)


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_loss_of_the_model_and_the_batch_is_refused_by_its_signature(kind):
    with pytest.raises(TypeError, match=r"loss_fn takes 'model' as its first argument.*" + FIX):
        OPERATORS[kind](_model(3), _eigenthings_loss, _data(3))


@CHECKED
def test_loss_calling_the_output_as_a_model_names_the_fix(check):
    """A lambda's names say nothing: torch's ``'Tensor' object is not callable`` is caught instead."""
    criterion = nn.CrossEntropyLoss()
    _refused(
        lambda **kw: HessianOperator(_model(3), lambda m, b: criterion(m(b[0]), b[1]), _data(3), **kw),
        check,
        TypeError,
        r"loss_fn failed with 'Tensor' object is not callable when called as loss_fn\(output, target\).*"
        + FIX,
    )


def test_unrelated_type_error_of_a_custom_loss_is_left_alone():
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise TypeError("my own mistake")

    with pytest.raises(TypeError, match=r"^my own mistake$"):
        HessianOperator(_model(3), loss, _data(3))


def test_arguments_in_hessian_eigenthings_order_name_curvops_order():
    with pytest.raises(TypeError, match=r"got list; the arguments are \(model, loss_fn, data\)"):
        HessianOperator(_model(3), _data(3), nn.CrossEntropyLoss())


# ================================================================ batch norm in training mode
def _batch_norm_model(train: bool = True, running_stats: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=running_stats), nn.Tanh(), nn.Linear(5, 3)
    ).to(DTYPE)
    return model.train(train)


BATCH_NORM_OPERATORS = {
    **OPERATORS,
    "kfac": lambda *a, **kw: KFACOperator(*a, unsupported="exclude", **kw),
}
BATCH_NORM_WARNING = (
    r"(Hessian|GGN|Fisher|KFAC)Operator: batch norm layer '1' normalises by the statistics of each "
    r"batch.*the curvature of the training-mode loss, with those statistics differentiated as functions "
    r"of the parameters.*call model\.eval\(\) before building the operator"
)


def _batch_norm_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if "batch norm" in str(w.message)]


@pytest.mark.parametrize("kind", list(BATCH_NORM_OPERATORS))
def test_batch_norm_in_training_mode_warns_once_per_operator(kind):
    data = _data(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = [BATCH_NORM_OPERATORS[kind](_batch_norm_model(), nn.CrossEntropyLoss(), data) for _ in range(2)]
        for op in ops:  # products and to_dense add none
            op @ _vector(op.shape[0])
            op.to_dense()
    found = _batch_norm_warnings(caught)
    assert len(found) == 2, [str(w.message) for w in found]
    for w in found:
        assert w.category is UserWarning
        assert re.search(BATCH_NORM_WARNING, str(w.message)), str(w.message)
        assert w.filename == __file__  # attributed to the line that built the operator


@pytest.mark.parametrize("kind", list(BATCH_NORM_OPERATORS))
def test_batch_norm_in_eval_mode_does_not_warn(kind):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BATCH_NORM_OPERATORS[kind](_batch_norm_model(train=False), nn.CrossEntropyLoss(), _data(3))
    assert _batch_norm_warnings(caught) == []


def test_batch_norm_without_running_statistics_warns_in_eval_mode_too():
    """Such a layer normalises by batch statistics whatever the mode."""
    with pytest.warns(UserWarning, match=BATCH_NORM_WARNING):
        GGNOperator(_batch_norm_model(train=False, running_stats=False), nn.CrossEntropyLoss(), _data(3))


def test_the_warnings_fix_gives_another_curvature_without_a_warning():
    """The warning is no formality: model.eval() (its fix) changes the matrix and silences it."""
    model, data = _batch_norm_model(), _data(3)
    with pytest.warns(UserWarning, match=BATCH_NORM_WARNING):
        H_train = HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = _vector(H_train.shape[0])
    train_product = H_train @ v
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        H_eval = HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert not torch.allclose(H_eval @ v, train_product)


# ================================================================ documentation imports
def test_concepts_page_imports_operators_from_the_public_package():
    text = (Path(__file__).parents[2] / "docs" / "concepts.md").read_text()
    assert "from curvops.operators.kfac import" not in text
    assert "from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator" in text
