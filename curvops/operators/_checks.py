"""The checks of a curvature operator's data and results, and their messages.

- :func:`check_deterministic`: at construction, the data yields the same first batch
  twice and two evaluations of the loss and gradient on it agree (and the loss is the one
  curvops reproduces);
- :func:`data_change_error`: a whole pass over the data found the batches and the
  normaliser counted at construction (the operator's normalisation is that of its data);
- :func:`nonfinite_loss_error`: the first batch whose loss is NaN or Inf.

Each returns or raises the error; the operator agrees on it over the ranks
(:meth:`~curvops.operators._interface.TorchLinearOperator._agree`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

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

    values, grads, output = op._run_local(evaluate_twice)
    try:
        _compare_evaluations(op, values, grads, output, inputs, target)
    except (ValueError, FloatingPointError) as caught:
        error = caught
    op._agree(error)


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
        (:class:`~curvops.operators._forward_ad.ConstantRegions`).
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
