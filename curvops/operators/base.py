"""The curvature of a loss over a data set, and the data loop of its exact products.

[`CurvatureOperator`][curvops.CurvatureOperator] holds the objective: model, loss, data, parameter selection,
the whole-dataset normalisation, [`loss_and_gradient`][curvops.CurvatureOperator.loss_and_gradient] and the
checks. Its products come from one of two kinds of subclass:

* ``BatchSumOperator`` (Hessian, GGN, Fisher): the curvature is a sum over batches,
  and every product runs the batches once. This class owns that loop and everything
  around it: the accumulators (the caller's ``out`` rows when they can be written in
  place), the losses computed on the way, the checks (data changed since construction,
  NaN/Inf loss or product localised to its batch, ranks agreeing) and the reduction over
  ranks. A subclass supplies the curvature of one batch,
  ``BatchSumOperator._batch_products``: a context manager for the per-product setup
  (finite-difference steps, a choice of method) that yields
  ``product(index, inputs, target) -> loss``, which adds the batch's share of ``A V`` into
  the accumulators.
* structured approximations (KFAC, EKFAC in ``kfac``), whose factors
  are collected in one pass at construction and whose products touch no data.

The rest of the operator lives in modules named for what they hold:
``_interface`` (scipy/torch dispatch, ``out=``, operator algebra),
``_model`` (model, data, parameter selection, ``J v`` and ``Jᵀ u``),
``_checks`` (the checks' logic and messages),
``_output_space`` (the ``Jᵀ M J`` products of GGN and Fisher) and
``strategy`` (the public choice of differentiation strategy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvops._finite import all_finite
from curvops.operators._checks import check_deterministic, data_change_error, nonfinite_loss_error
from curvops.operators._forward_ad import ConstantRegions
from curvops.operators._interface import (  # noqa: F401 - re-exported: the operators' public base classes
    MAX_DENSE_DIM,
    TorchLinearOperator,
)
from curvops.operators._loss import LossSpec
from curvops.operators._model import (  # noqa: F401 - re-exported for the operators built on them
    ModelOperator,
    ParameterBlock,
    ParamSelection,
    _first_batch,
    _same,
    _select_parameters,
    _stashed_gradients,
    _to_device,
    _unpack,
)
from curvops.operators._parallel import Replicated, Sharded, local_tensor

#: The curvature of one batch: ``product(index, inputs, target)`` adds the batch's share of
#: ``A V`` into the accumulators it was made for and returns the batch's scaled loss (a 0-d
#: tensor, checked for NaN/Inf; non-finite if any loss it evaluated was) or None.
BatchProduct = Callable[[int, Any, Any], "Tensor | None"]


class RestartPass(Exception):
    """A per-batch product must change its method mid-pass (reverse over forward meeting an
    unverified operation): the data loop zeroes the accumulators and runs the pass again,
    asking ``BatchSumOperator._batch_products`` anew."""


#: Parameters every curvature operator takes, documented once and substituted into each
#: operator's docstring (``{shared_parameters}``) so that each renders the full text.
SHARED_PARAMETERS = """model : torch.nn.Module
        The network. Its forward takes a batch's ``inputs`` (a tensor, or a dict of
        tensors passed as keyword arguments) and returns a tensor or an object with a
        ``logits`` attribute (Hugging Face ``ModelOutput``). It is evaluated as it is, in
        its current train/eval mode, and left as it was. A model wrapped in
        ``DistributedDataParallel`` or sharded with FSDP2 ``fully_shard`` gives the
        curvature of the global objective (see Notes).
    loss_fn : callable
        ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (reduction
        ``"mean"`` or ``"sum"``) or any callable ``(output, target) -> scalar``
        (assumed to be a mean over the batch's samples unless it has
        ``reduction="sum"``).
    data : iterable of (inputs, targets)
        Re-iterable batches (a list, or a ``DataLoader`` without shuffling); batches
        may differ in size. Tensors are moved to the model's device. The operator is the
        curvature of these data: every pass recounts the batches and (mean losses) the
        normaliser, and a product refuses with a ``ValueError`` if they changed since
        construction (build a new operator for new data). Targets must fit the output:
        built-in losses refuse shapes that torch would broadcast.
    params : None, str, list of str, or list of parameters, optional
        Parameters the operator acts on. ``None`` (default): every parameter that
        requires grad. Strings are glob patterns on parameter names, e.g.
        ``"layers.*.attn.*"``; parameters are given in ``model.named_parameters()`` order
        whatever the order of the selection.
    check_deterministic : bool, optional
        If True (default), check once on the first batch that two evaluations of the
        loss and gradient agree and that ``data`` yields the same first batch twice."""

#: Notes every curvature operator shares (``{shared_notes}`` in the docstrings).
SHARED_NOTES = """The operator is the curvature of the whole-dataset objective: for ``mean`` losses
    the mean over all samples of all batches (for cross-entropy with ``ignore_index``,
    over all counted targets), exactly, whatever the batch sizes; for ``sum`` losses
    the sum.

    Distributed models (see the docs' distributed page): with a model wrapped in
    ``DistributedDataParallel`` or sharded with FSDP2 ``fully_shard``, every rank passes
    its own batches and the operator is the curvature of the *global* objective (all
    batches of all ranks). Under DDP vectors are replicated (every rank passes the same
    vector) and each product is all-reduced once; under FSDP vectors are sharded like the
    parameters (each rank passes its local rows, see ``sharding``) and every rank
    must hold the same number of batches.

    Forward passes run on copies of the buffers. A batch norm layer in train mode
    normalises each batch by its own statistics, which the curvature then treats as
    functions of the parameters (as autograd does); its running statistics are not
    updated by products. Where the model runs part of its forward pass under
    ``torch.no_grad()`` (or ``.detach()``), that part is a constant, as in a gradient.
    An ``nn.Embedding(scale_grad_by_freq=True)`` among the selected parameters is refused
    (``ValueError``): autograd rescales its gradient, which is then no derivative."""


def document_shared_parameters(cls: type) -> type:
    """Class decorator: substitute ``SHARED_PARAMETERS`` and ``SHARED_NOTES`` into the docstring.

    Parameters
    ----------
    cls : type
        A class whose docstring holds ``{shared_parameters}`` and/or ``{shared_notes}``
        (indented as its other parameter entries).

    Returns
    -------
    type
        ``cls``, its ``__doc__`` completed.
    """
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{shared_parameters}", SHARED_PARAMETERS).replace(
            "{shared_notes}", SHARED_NOTES
        )
    return cls


@document_shared_parameters
class CurvatureOperator(ModelOperator):
    """Base class: a curvature matrix of a loss over a data set, as a linear operator (D, D).

    It holds the objective (model, loss, data, normalisation,
    [`loss_and_gradient`][curvops.CurvatureOperator.loss_and_gradient], checks); subclasses supply the
    product: ``BatchSumOperator`` by one pass over the data per product, KFAC/EKFAC from factors collected at
    construction.

    Parameters
    ----------
    {shared_parameters}

    Notes
    -----
    {shared_notes}
    """

    #: Step ``‖εv‖`` of the central differences; None: ``finite_difference_step``'s rule.
    fd_eps: float | None = None
    #: Whether products sum over this rank's batches (so a DDP product needs one
    #: all-reduce); False for operators whose products use already-global statistics.
    _sums_over_local_data: bool = True
    #: Every curvature operator here is symmetric (self-adjoint).
    is_symmetric: bool = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        check_deterministic: bool = True,
    ) -> None:
        self._set_model(model)
        self.loss = LossSpec.from_loss(loss_fn)
        self._set_data_and_params(data, params)
        super().__init__((self.num_params, self.num_params), self.torch_dtype, self.device)

        self.num_batches, self.normaliser = self._count()
        # Scale that turns batch sums into the whole-dataset objective.
        self.scale: float = 1.0 / self.normaliser if self.loss.reduction == "mean" else 1.0
        if check_deterministic:
            self._check_deterministic()

    # ================================================================ public API
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Whole-dataset loss (scalar) and its gradient (D,) at the current parameters.

        Returns
        -------
        loss : Tensor
            0-d, the objective the operator is the curvature of (the global one when
            distributed, on every rank).
        gradient : Tensor
            ``(D,)``; distributed: replicated (DDP) or this rank's shard,
            ``(sharding.local_dim,)`` (FSDP).

        Raises
        ------
        ValueError
            If the data changed since construction.
        FloatingPointError
            If the loss is NaN or Inf.
        """
        grad = torch.zeros(self._vector_rows(), dtype=self.torch_dtype, device=self.device)
        total = torch.zeros((), dtype=self.torch_dtype, device=self.device)

        def accumulate() -> None:
            nonlocal total
            with self._data_pass():
                for _, inputs, target in self._batches():
                    value, grads, _ = self._loss_gradient(inputs, target, self.scale)
                    grad.add_(torch.cat([g.reshape(-1) for g in grads]))
                    total = total + value

        self._run_local(accumulate)
        if self.parallel is not None:
            total = self.parallel.all_reduce_(total.reshape(1)).reshape(())
            if isinstance(self.parallel, Replicated):
                self.parallel.all_reduce_(grad)
        self._agree(self._pass_error([total], [0]))
        return total, grad

    def finite_difference_step(self) -> float:
        """Perturbation norm ``‖εv‖`` of the central differences (FD Hessian, ``J v`` under FSDP).

        ``fd_eps`` if the operator was given one, else ``10 · u^(1/3) · (1 + ‖θ‖/√D)``
        with ``u`` the unit roundoff of the parameters' dtype and ``‖θ‖/√D`` the RMS of
        the selected parameters. The cube root balances truncation ``T ε²`` against
        rounding ``κ u / ε`` (Nocedal & Wright 2006, §8.1). Two corrections to the textbook
        ``u^(1/3)(1 + ‖θ‖)``: the scale is the parameters' typical *entry*, because ``‖θ‖``
        grows like ``√D`` and would make the step far too large on large models; and the
        factor 10 ≈ κ^(1/3), because a gradient summed over many terms has rounding errors
        ``κ`` times one roundoff (see ``benchmarks/results/fd_step_*``).

        Returns
        -------
        float
            The step, ``> 0``.

        Raises
        ------
        ValueError
            Under ``torch.autocast``: the low-precision forward passes leave no digits to the
            differences.
        """
        if torch.is_autocast_enabled(self.device.type):
            low = torch.get_autocast_dtype(self.device.type)
            raise ValueError(
                f"finite differences under torch.autocast: the forward passes compute in {low} "
                f"(unit roundoff {torch.finfo(low).eps / 2:.1e}), so the differences of outputs or "
                "gradients lose every digit (relative errors of order 1; see "
                "docs/benchmarks.md#language-models). Use method='autograd' under autocast, or "
                "multiply outside the autocast region"
            )
        if self.fd_eps is not None:
            return float(self.fd_eps)
        unit_roundoff = float(torch.finfo(self.torch_dtype).eps) / 2
        rms = self._global_norm([local_tensor(p) for p in self.params]) / self.num_params**0.5
        return 10.0 * unit_roundoff ** (1 / 3) * (1.0 + rms)

    def _loss_gradient(
        self,
        inputs: Any,
        target: Any,
        scale: float,
        at: Sequence[Tensor] | None = None,
        regions: ConstantRegions | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor]:
        """``scale`` times the batch's loss sum, its gradient (local pieces) and the detached output.

        Under FSDP the gradient comes from ``backward()`` and FSDP's reduce-scatter (the sum
        over the ranks' batches); elsewhere from ``torch.autograd.grad`` (this batch only).
        ``at``: values of the selected parameters to evaluate at instead of their own (one
        process; see ``_shifted_parameters``). ``regions``: with ``at``, a
        ``ConstantRegions`` that watches the forward pass.
        """
        if at is not None:
            with torch.enable_grad():
                point = [t.detach().requires_grad_(True) for t in at]
                # Parameters outside the selection enter detached: no graph through them, so
                # what requires grad in the forward pass depends on the selected ones.
                replace = {**self._detached_parameters(), **dict(zip(self.param_names, point))}
                with contextlib.nullcontext() if regions is None else regions.watch(point):
                    output = self.forward(inputs, replace=replace)
                value = self.loss.batch_sum(output, target) * scale
                if value.requires_grad:
                    shifted = torch.autograd.grad(value, point, allow_unused=True, materialize_grads=True)
                else:  # the loss does not depend on the selected parameters (as autograd sees it)
                    shifted = tuple(torch.zeros_like(t) for t in point)
            return value.detach(), list(shifted), output.detach()
        if isinstance(self.parallel, Sharded):
            with self.parallel.summed_gradients(), _stashed_gradients(self.model):
                output = self.forward(inputs)
                value = self.loss.batch_sum(output, target) * scale
                value.backward()
                shards = [
                    torch.zeros_like(local_tensor(p)) if p.grad is None else local_tensor(p.grad).clone()
                    for p in self.params
                ]
            return value.detach(), shards, output.detach()
        with torch.enable_grad():
            output = self.forward(inputs)
            value = self.loss.batch_sum(output, target) * scale
            grads = torch.autograd.grad(value, self.params, allow_unused=True, materialize_grads=True)
        return value.detach(), list(grads), output.detach()

    # ----------------------------------------------------- scipy interface: symmetric
    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> CurvatureOperator:
        return self

    def _transpose(self) -> CurvatureOperator:
        return self

    def _parameter_shapes(self) -> list[torch.Size]:
        return list(self.param_shapes)

    def _pass_error(
        self, losses: list[Tensor], loss_batches: list[int], finite: list[bool] | None = None
    ) -> Exception | None:
        """The error of the last pass: the data changed since construction, or a loss is NaN/Inf
        (``finite``: whether each loss is finite, if already read)."""
        counts = self.__dict__.pop("_pass_counts", None)
        return data_change_error(self, counts) or nonfinite_loss_error(
            losses, loss_batches, what="loss", finite=finite
        )

    def _run_local(self, work: Callable[[], Any]) -> Any:
        """Run this rank's pass over its data so that an exception reaches every rank.

        Under DDP the pass makes no collective call and its error is agreed on; under FSDP
        the pass is collective and a failure is reported as in ``Parallel.fail_out_of_step``.
        """
        if self.parallel is None:
            return work()
        return self.parallel.run_local(work, self.device, collective=isinstance(self.parallel, Sharded))

    def _sum_over_ranks(self, tensors: Sequence[Tensor]) -> None:
        """Under DDP, sum each tensor over the ranks in place (one flat all-reduce); else nothing."""
        if not isinstance(self.parallel, Replicated) or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        self.parallel.all_reduce_(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view(t.shape))

    def _count(self) -> tuple[int, float]:
        count = 0
        total = 0.0
        error: Exception | None = None
        try:
            shares = []
            for index, batch in enumerate(self.data):
                inputs, target = _unpack(batch, index)
                shares.append(self._normaliser_share(index, target, inputs))
                count += 1
            # Summed in order, as every pass recounts them (data_change_error).
            for share in self._remember_shares(shares):
                total += float(share)
        except (TypeError, ValueError) as caught:
            error = caught
        self._agree(error)
        # This process's share, which every pass over the data recounts (data_change_error).
        self._local_normaliser = total
        total_count = count
        if self.parallel is not None:
            table = self.parallel.all_gather_numbers([count, total], self.device).cpu()
            counts = [int(c) for c in table[:, 0]]
            if isinstance(self.parallel, Sharded) and len(set(counts)) > 1:
                raise ValueError(
                    f"under FSDP every rank must hold the same number of batches (the forward "
                    f"passes are collective), got {counts} per rank; shard the data evenly, e.g. "
                    "with DistributedSampler (which pads to equal length) and drop_last=False"
                )
            total_count, total = sum(counts), float(table[:, 1].sum())
        if total_count == 0:
            where = " on every rank" if self.parallel is not None else ""
            raise ValueError(f"data is empty{where}: it yielded no batches")
        if self.loss.reduction == "mean" and total <= 0:
            raise ValueError(
                "the data has no counted loss terms (every target equals ignore_index, or "
                "the class weights of all targets are 0): the mean loss is undefined"
            )
        return count, total

    def _check_deterministic(self) -> None:
        check_deterministic(self)

    def __repr__(self) -> str:
        strategy = getattr(self, "strategy", None)
        chosen = "" if strategy is None or strategy.is_default else f", strategy={strategy!r}"
        return (
            f"{type(self).__name__}(D={self.shape[0]}, params={len(self.params)}, "
            f"batches={self.num_batches}, loss={self.loss.kind}/{self.loss.reduction}, "
            f"dtype={self.torch_dtype}, device={self.device}{chosen})"
        )


@document_shared_parameters
class BatchSumOperator(CurvatureOperator):
    """A curvature operator whose product is a sum of per-batch products, one pass over the data each.

    The Hessian, GGN and Fisher are sums over batches; this class runs the batches once per
    product and owns everything around them: the accumulators (the caller's ``out`` rows
    when they can be written in place), the losses computed on the way, the checks (data
    changed since construction, NaN/Inf loss or product localised to its batch, ranks
    agreeing) and the reduction over ranks. A subclass supplies the curvature of one
    batch, ``_batch_products``.

    Parameters
    ----------
    {shared_parameters}

    Notes
    -----
    {shared_notes}
    """

    def _batch_products(
        self, V: list[Tensor], out: list[Tensor]
    ) -> contextlib.AbstractContextManager[BatchProduct]:
        """The curvature of one batch, for one product; implemented by subclasses.

        Parameters
        ----------
        V : list of Tensor
            The block to multiply, one tensor per parameter of shape ``(k, *param.shape)``.
        out : list of Tensor
            Zero accumulators of the same shapes (views into one ``(k, D)`` block); each
            batch's share of ``A V`` is added into them in place.

        Returns
        -------
        context manager
            Entered once per pass, around the loop over the batches (per-product setup and
            teardown: step sizes, shifted parameters, a finishing scale); it yields the
            ``BatchProduct`` the loop calls for every batch. Raising ``RestartPass``
            from it restarts the pass with zeroed accumulators.
        """
        raise NotImplementedError

    def _accumulate(
        self, V: list[Tensor], block: ParameterBlock, only: set[int] | None = None
    ) -> tuple[list[Tensor], list[int]]:
        """Run one pass over the batches (those in ``only``, or all), adding ``A V`` into ``block``.

        Returns the losses computed on the way and their batch indices. A whole pass also
        leaves the batch count and normaliser it saw for ``data_change_error``.
        """
        for attempt in range(2):
            losses: list[Tensor] = []
            loss_batches: list[int] = []
            try:
                with self._data_pass(), self._batch_products(V, block.parts) as product:
                    for index, inputs, target in self._batches(only):
                        loss = product(index, inputs, target)
                        if loss is not None:
                            losses.append(loss)
                            loss_batches.append(index)
            except RestartPass:
                if attempt:
                    raise RuntimeError(f"{type(self).__name__} asked to restart a product twice") from None
                block.zero_()
                continue
            return losses, loss_batches
        raise AssertionError("unreachable")

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for a checked (D, k) torch block."""
        return self._apply_into(X, None)

    def _apply_into(self, X: Tensor, out: Tensor | None) -> Tensor:
        """``A @ X`` for a checked (D, k) block, into ``out`` (checked (D, k); None: a new tensor).

        When ``out``'s rows are contiguous (``out = rows.T`` for rows of a larger buffer, as
        Lanczos passes a basis row) the accumulators are those rows: the product is written
        in place, without a ``(k, D)`` buffer to allocate, fill and copy.
        """
        k = X.shape[1]
        # Under DDP the ranks' sums over their own batches are all-reduced once.
        replicated = (
            self.parallel if isinstance(self.parallel, Replicated) and self._sums_over_local_data else None
        )
        if replicated is not None:
            replicated.check_same_block(X, self.device)
        V = ParameterBlock(X.T.contiguous(), self.param_numels, self.param_shapes).parts
        rows = None if out is None else out.T
        into = rows if rows is not None and rows.is_contiguous() else None
        block = ParameterBlock.zeros(
            k, self.param_numels, self.param_shapes, self.torch_dtype, self.device, into=into
        )
        losses, loss_batches = self._run_local(lambda: self._accumulate(V, block))
        flat = block.flat
        if replicated is not None:
            replicated.all_reduce_(flat)  # the (k, D) rows: contiguous, as NCCL needs (out may not be)
        if out is None:
            result = flat.T.contiguous()
        else:
            if flat is not rows:
                out.copy_(flat.T)
            result = out
        losses_finite, sum_finite = _finite_flags(losses, result)
        # Two agreements, in this order: a NaN loss on one rank spreads NaN into every rank's
        # (reduced) product, and the message must name the rank whose loss caused it.
        self._agree(self._pass_error(losses, loss_batches, losses_finite))
        # A finite sum proves every entry finite; an infinite one may be an overflow of finite
        # entries, settled elementwise.
        finite = sum_finite or all_finite(result)
        if self.parallel is not None:
            self._agree(None if finite else FloatingPointError("the curvature product is NaN or Inf"))
        elif not finite:
            self._raise_nonfinite_product(V)
        return result

    def _raise_nonfinite_product(self, V: list[Tensor]) -> None:
        """Raise ``FloatingPointError`` naming the first batch whose product is NaN or Inf."""
        for index in range(self.num_batches):
            block = ParameterBlock.zeros(
                V[0].shape[0], self.param_numels, self.param_shapes, self.torch_dtype, self.device
            )
            self._accumulate(V, block, only={index})
            if not all_finite(block.flat):
                raise FloatingPointError(f"the curvature product is NaN or Inf on batch {index}")
        raise FloatingPointError("the curvature product is NaN or Inf")


def _finite_flags(losses: list[Tensor], result: Tensor) -> tuple[list[bool] | None, bool]:
    """Whether each loss is finite, and whether the sum of ``result`` is, read in one transfer.

    On a GPU every read of a device value to the host waits for the queued kernels; the
    checks after a product read them together. Losses on another device than ``result``
    are left to ``nonfinite_loss_error`` (None).
    """
    total = result.sum()
    if not losses or any(loss.device != result.device for loss in losses):
        return None, bool(torch.isfinite(total))
    # stack promotes to the widest dtype: finiteness is kept.
    flags = torch.isfinite(torch.stack([*(loss.reshape(()) for loss in losses), total])).tolist()
    return flags[:-1], flags[-1]
