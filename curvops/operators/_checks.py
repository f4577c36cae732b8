"""The checks of a curvature operator's data and results, and their messages.

- `check_deterministic`: at construction, the data yields the same first batch
  twice and two evaluations of the loss and gradient on it agree (and the loss is the one
  curvops reproduces, a custom loss does not broadcast its targets); then
  `warn_batch_statistics` warns of batch norm layers that normalise by batch statistics;
- `data_change_error`: a whole pass over the data found the batches and the
  normaliser counted at construction (the operator's normalisation is that of its data);
- `nonfinite_loss_error`: the first batch whose loss is NaN or Inf.

Each returns or raises the error; the operator agrees on it over the ranks
(`TorchLinearOperator._agree` in `curvops.operators._interface`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvops.operators._model import _first_batch, _same, _to_device

if TYPE_CHECKING:
    from curvops.operators.base import CurvatureOperator


def nonfinite_loss_error(
    losses: list[Tensor], batches: list[int], what: str, finite: list[bool] | None = None
) -> FloatingPointError | None:
    """The error naming the first batch whose loss is NaN or Inf, or None.

    Parameters
    ----------
    losses : list of Tensor
        Scalar loss values computed during a pass.
    batches : list of int
        Batch index of each entry of ``losses``.
    what : str
        What the values are, for the message (``"loss"``).
    finite : list of bool, optional
        Whether each loss is finite, when the caller has already read it to the host (with
        other checks, in one transfer); default None: read here.

    Returns
    -------
    FloatingPointError or None
    """
    if not losses:
        return None
    if finite is None:
        flags = torch.isfinite(torch.stack([v.reshape(()) for v in losses]))
        if bool(flags.all()):
            return None
        finite = flags.tolist()
    if all(finite):
        return None
    bad = batches[finite.index(False)]
    return FloatingPointError(f"the {what} of batch {bad} is NaN or Inf")


def data_change_error(op: CurvatureOperator, counts: tuple[int, list[Any]] | None) -> ValueError | None:
    """An error if the last whole pass over the data found other batches than construction did.

    The normaliser of a mean loss (and the batch count) are fixed at construction: if the
    data changed since (a batch appended, targets replaced), the products would follow
    neither the old objective nor the new one. The recount is that of construction, the
    same numbers summed in the same order, so unchanged data compare equal exactly.

    Parameters
    ----------
    op : CurvatureOperator
        The operator whose pass it was.
    counts : (int, list) or None
        Batches counted by the pass and each batch's normaliser; None: the pass was not a
        whole one (``only=``), nothing to compare.

    Returns
    -------
    ValueError or None
    """
    if counts is None:
        return None
    count, shares = counts
    total = 0.0
    for share in shares:
        total += float(share)
    changed_normaliser = op.loss.reduction == "mean" and total != op._local_normaliser
    if count == op.num_batches and not changed_normaliser:
        return None
    return ValueError(
        f"data changed since the operator was built: it now yields {count} batches with "
        f"{total:g} loss terms (normaliser), it had {op.num_batches} with {op._local_normaliser:g} "
        "when the operator was built (its normalisation is that of the data it was built "
        f"on); build a new {type(op).__name__} for the new data"
    )


def check_deterministic(op: CurvatureOperator) -> None:
    """Refuse data that changes between passes and a loss or model that is not deterministic.

    The operator is one fixed matrix only if every pass sees the same batches and the same
    function of the parameters. Checked on the first batch: it is yielded twice alike, and
    two evaluations of the loss and gradient agree to ``√u``. All ranks raise together.

    Parameters
    ----------
    op : CurvatureOperator
        The operator being built.

    Raises
    ------
    ValueError
        If the data shuffles, the model is random (dropout left on), or the loss is a
        configuration curvops does not reproduce.
    FloatingPointError
        If the first batch's loss is NaN or Inf.
    """
    if op.num_batches == 0:  # a DDP rank without data: nothing to check here, but it
        op._agree(None)  # joins the three agreements the other ranks make below
        op._agree(None)
        op._agree(None)
        return
    error: Exception | None = None
    first = _first_batch(op.data)
    if not _same(first, _first_batch(op.data)):
        error = ValueError(
            "data yields a different first batch on each iteration (a shuffling "
            "DataLoader or random augmentation?); the operator needs the same batches "
            "every pass: use shuffle=False and deterministic transforms"
        )
    op._agree(error)
    inputs, target = _to_device(first[0], op.device), _to_device(first[1], op.device)

    def evaluate_twice() -> tuple[list[Tensor], list[Tensor], Tensor]:
        values, grads = [], []
        for _ in range(2):
            value, g, output = op._loss_gradient(inputs, target, 1.0)
            values.append(value)
            grads.append(torch.cat([x.reshape(-1) for x in g]))
        return values, grads, output

    with _broadcast_warnings(op) as broadcasts:
        values, grads, output = op._run_local(evaluate_twice)
    try:
        if broadcasts:
            raise _broadcast_error(broadcasts[0], output, target)
        _compare_evaluations(op, values, grads, output, inputs, target)
    except (ValueError, FloatingPointError) as caught:
        error = caught
    op._agree(error)
    warn_batch_statistics(op.model, type(op).__name__)


#: The start of torch's warning that a loss broadcasts its targets against the output
#: (``F.mse_loss``, ``F.l1_loss``, ``F.smooth_l1_loss``, ``F.huber_loss``).
_TORCH_BROADCAST_WARNING = "Using a target size"


@contextlib.contextmanager
def _broadcast_warnings(op: CurvatureOperator) -> Iterator[list[str]]:
    """Collect torch's target-broadcasting warnings of a custom loss; pass every other warning on.

    The built-in losses are checked by shape on every batch (`LossSpec.check_shapes`); a
    custom loss has no known target shape, but torch says when it broadcasts. Every warning
    is recorded (a warning already shown once would otherwise be filtered out before it
    could be seen here), and the others are issued again, once each, under the caller's
    filters.
    """
    found: list[str] = []
    if op.loss.kind != "custom":
        yield found
        return
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            caught = recorded
            yield found
    finally:  # also when the loss raises: its warnings may explain why
        passed: set[tuple[Any, ...]] = set()
        for w in caught:
            text = str(w.message)
            if issubclass(w.category, UserWarning) and text.startswith(_TORCH_BROADCAST_WARNING):
                found.append(text)
                continue
            key = (w.category, text, w.filename, w.lineno)
            if key not in passed:
                passed.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _broadcast_error(warning: str, output: Tensor, target: Any) -> ValueError:
    shape = tuple(output.shape)
    got = tuple(target.shape) if torch.is_tensor(target) else None
    return ValueError(
        f"loss_fn broadcasts the targets{f' of shape {got}' if got else ''} against the model output "
        f"of shape {shape} (torch warns: {warning!r}), which pairs outputs with other samples' "
        f"targets: a different loss. Give targets of the output's shape {shape} (for one output "
        "per sample, targets.unsqueeze(1)), or pass nn.MSELoss(), whose target shapes curvops "
        "checks on every batch"
    )


def warn_batch_statistics(
    model: nn.Module, operator: str, what: str = "the curvature of the training-mode loss"
) -> None:
    """Warn that batch norm layers normalise by batch statistics, if any do (at construction).

    Such a layer (in training mode, or built without running statistics) makes every
    sample's output depend on the other samples of its batch; the operator is the curvature
    of that objective, with the batch statistics differentiated as functions of the
    parameters, so it depends on how the data are batched and differs from the curvature of
    the model as it predicts (eval mode). Refusing would take away a well-defined matrix
    (the curvature of the training-mode loss, as autograd differentiates it), hence a warning
    and not an error, unlike dropout, which makes the operator random.

    Parameters
    ----------
    model : torch.nn.Module
        The operator's model, in the mode it will be evaluated in.
    operator : str
        The operator's class name, for the message.
    what : str, optional
        What the operator is then, for the message (a Jacobian: of the training-mode model).
    """
    layers = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.training or module.running_mean is None or module.running_var is None)
    ]
    if not layers:
        return
    shown = ", ".join(repr(n) for n in layers[:4])
    if len(layers) > 4:
        shown += f" and {len(layers) - 4} more"
    warnings.warn(
        f"{operator}: batch norm layer{'s' if len(layers) > 1 else ''} {shown} "
        f"normalise{'' if len(layers) > 1 else 's'} by the "
        "statistics of each batch (training mode, or track_running_stats=False): the operator is "
        f"{what}, with those statistics differentiated as "
        "functions of the parameters, so it depends on how the data are batched; running "
        "statistics are not updated. For the model as it predicts (eval mode), call "
        "model.eval() before building the operator",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside curvops."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "curvops":
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _compare_evaluations(
    op: CurvatureOperator, values: list[Tensor], grads: list[Tensor], output: Tensor, inputs: Any, target: Any
) -> None:
    error = nonfinite_loss_error(values[:1], [0], what="loss")
    if error is not None:
        raise error
    tol = float(torch.finfo(op.torch_dtype).eps) ** 0.5
    dv = float((values[0] - values[1]).abs())
    dg = float((grads[0] - grads[1]).norm())
    if dv > tol * (1 + float(values[0].abs())) or dg > tol * (1 + float(grads[0].norm())):
        hint = " The model is in training mode: call model.eval()." if op.model.training else ""
        raise ValueError(
            "two evaluations of the loss and gradient on the first batch differ "
            f"(|Δloss| = {dv:.3g}, ‖Δgrad‖ = {dg:.3g}): the model is not deterministic "
            f"(dropout left on, or a random layer?).{hint} Pass "
            "check_deterministic=False only if you accept a randomised operator."
        )
    terms = float(op.loss.batch_normaliser(target, inputs))
    if op.loss.kind != "custom" and (terms > 0 or op.loss.reduction == "sum"):
        # A batch without counted terms (all targets ignore_index, or class weights 0: a
        # padding-only batch) has the mean 0/0 in torch; there is nothing to compare.
        with torch.no_grad():
            reference = op.loss.fn(output.detach(), target)
            ours = values[0] / (terms if op.loss.reduction == "mean" else 1.0)
        if not torch.allclose(ours.to(reference.dtype), reference, rtol=tol, atol=tol * 1e-3):
            raise ValueError(
                f"curvops does not reproduce this {type(op.loss.fn).__name__} configuration "
                f"(got {float(ours):.6g}, the loss gives {float(reference):.6g}); "
                "please report it, and wrap the loss in a plain function meanwhile"
            )


#: Why finite differences and autograd differ where a value is hidden from reverse mode
#: (formatted with what they differentiate).
FINITE_DIFFERENCES_SEE_VALUES = (
    "finite differences differentiate {}'s values, and reverse mode treats that value as a constant"
)
USE_AUTOGRAD = "Use method='autograd', which is exact here"


def refuse_values_hidden_from_reverse_mode(regions: Any, index: int, why: str, fix: str) -> None:
    """Refuse a product that sees what reverse mode treats as constant (a parameter-dependent value).

    Parameters
    ----------
    regions : ConstantRegions
        What watched a forward pass of batch ``index``
        (`ConstantRegions` in `curvops.operators._forward_ad`).
    index : int
        The batch's position in the data.
    why : str
        Why the product and autograd's matrix would differ there.
    fix : str
        What to use instead.

    Raises
    ------
    ValueError
        If the forward pass read the selected parameters without gradients, or read a
        padding row of an embedding outside the embedding.
    """
    reason = f"{why}: the two differ (and the matrix is not symmetric). {fix}"
    if regions.found is not None:
        raise ValueError(
            f"batch {index}: the model's forward calls {regions.found} without gradients (under "
            f"torch.no_grad() or detach()) on a tensor that depends on the selected parameters; {reason}"
        )
    if regions.padding_weight_used_elsewhere:
        raise ValueError(
            f"batch {index}: an embedding weight with padding_idx is also read outside the "
            f"embedding (tied to an output head?): its padding row gets a gradient from that "
            f"use only; {reason}, or leave that weight out of params"
        )
