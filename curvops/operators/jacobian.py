"""The Jacobian of the model outputs w.r.t. the parameters over a data set, and its transpose."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops._finite import all_finite
from curvops.operators._checks import warn_batch_statistics
from curvops.operators._interface import TorchLinearOperator
from curvops.operators._model import (
    ModelOperator,
    ParameterBlock,
    ParamSelection,
    _first_batch,
    _same,
    _to_device,
)


class JacobianOperator(ModelOperator):
    """Jacobian ``J = ∂ vec(f) / ∂θ`` of the model outputs over the data, shape (M, D).

    ``f`` is the model output on every batch, the batches' outputs concatenated along
    dimension 0 and flattened row-major: row ``m`` of ``J`` is one output entry, ordered
    by sample, then by the output's remaining dimensions (for outputs ``(N_b, C)``: row
    ``(n, c)`` with ``c`` fastest). ``M = Σ_b output_b.numel()``. Columns follow the
    parameter layout of the curvature operators (``model.named_parameters()`` order,
    selected parameters, each flattened row-major).

    ``J @ V`` uses forward-mode AD (one vmapped ``jvp`` per batch for a whole block);
    ``J.T @ U`` ([`TransposedJacobianOperator`][curvops.TransposedJacobianOperator]) reverse mode, one forward
    pass per batch kept for the backward passes of all columns. No loss is involved; targets in
    ``data`` are ignored. ``J`` is exactly the adjoint of ``Jᵀ``: the forward-mode rules are
    made to agree with reverse mode where torch's differ (embedding padding rows, regions
    under ``torch.no_grad()``: constants in both). Products leave the model's buffers
    untouched (batch norm in train mode: its batch statistics are functions of the
    parameters; its running statistics are not updated).

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its forward takes a batch's ``inputs`` (a tensor, or a dict of
        tensors passed as keyword arguments) and returns a tensor or an object with a
        ``logits`` attribute (Hugging Face ``ModelOutput``), whose entries over all batches
        are the rows. It is evaluated as it is, in its current train/eval mode. One
        process only: a DDP or FSDP model is refused (``NotImplementedError``).
    data : iterable of (inputs, targets)
        Re-iterable batches in a fixed order (the rows depend on it); targets unused.
    params : None, str, list of str, or list of parameters, optional
        Parameters the operator acts on (the columns). ``None`` (default): every
        parameter that requires grad. Strings are glob patterns on parameter names, e.g.
        ``"layers.*.attn.*"``; parameters are given in ``model.named_parameters()`` order
        whatever the order of the selection.
    check_deterministic : bool, optional
        If True (default), check that ``data`` yields the same first batch twice and that
        two forward passes on it agree.

    Attributes
    ----------
    output_shapes : list of torch.Size
        Output shape of each batch (their ``numel`` sum to M).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        check_deterministic: bool = True,
    ) -> None:
        self._set_model(model)
        if self.parallel is not None:
            raise NotImplementedError(
                "JacobianOperator works in one process; for DDP/FSDP models use the curvature "
                "operators (HessianOperator, GGNOperator, FisherOperator)"
            )
        self._set_data_and_params(data, params)
        # One forward pass per batch fixes the row count and per-batch output shapes;
        # a no-grad forward is cheap next to any product with the operator.
        with torch.no_grad():
            self.output_shapes = [self.forward(inputs).shape for _, inputs, _ in self._batches()]
        if not self.output_shapes:
            raise ValueError("data is empty: it yielded no batches")
        self.output_numels = [s.numel() for s in self.output_shapes]
        self.num_batches = len(self.output_shapes)
        super().__init__((sum(self.output_numels), self.num_params), self.torch_dtype, self.device)
        if check_deterministic:
            self._check_deterministic()

    def unflatten_output(self, vector: Tensor) -> list[Tensor]:
        """Split an output-space vector (M,) into per-batch output-shaped views.

        Parameters
        ----------
        vector : Tensor
            ``(M,)`` vector in the output layout (batches' outputs concatenated, each
            flattened row-major), the operator's dtype and device.

        Returns
        -------
        list of Tensor
            One view per batch, shaped like that batch's model output.

        Raises
        ------
        ValueError
            If ``vector`` is not of shape ``(M,)``.
        """
        vector = self._check_torch(vector, self.shape[0])
        if vector.dim() != 1:
            raise ValueError(
                f"unflatten_output expects a vector of shape ({self.shape[0]},), got {tuple(vector.shape)}"
            )
        return [t.view(s) for t, s in zip(vector.split(self.output_numels), self.output_shapes)]

    def _apply(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        Vt = X.T.contiguous()
        V = [t.view(k, *s) for t, s in zip(Vt.split(self.param_numels, dim=1), self.param_shapes)]
        rows = []
        for _, inputs, _ in self._batches():
            rows.append(self._jvp_block(inputs, V).reshape(k, -1))
        self._check_rows(rows)
        return torch.cat(rows, dim=1).T.contiguous()

    def _apply_transposed(self, U: Tensor) -> Tensor:
        """``Jᵀ U`` for a checked (M, k) block: one kept forward and k backward passes per batch."""
        k = U.shape[1]
        block = ParameterBlock.zeros(k, self.param_numels, self.param_shapes, self.torch_dtype, self.device)
        out = block.parts
        pieces = U.split(self.output_numels, dim=0)
        count = 0
        for index, inputs, _ in self._batches():
            count += 1
            if index >= self.num_batches:
                continue  # refused below, with the count
            u = pieces[index]
            with torch.enable_grad():
                output = self.forward(inputs)
            if output.shape != self.output_shapes[index]:
                raise ValueError(
                    f"batch {index} gives an output of shape {tuple(output.shape)}, "
                    f"expected {tuple(self.output_shapes[index])}: the data changed"
                )
            cotangents = u.T.reshape(k, *output.shape)
            for col in range(k):
                for o, g in zip(out, self._vjp(output, cotangents[col], retain_graph=col < k - 1)):
                    o[col].add_(g)
        if count != self.num_batches:
            raise ValueError(
                f"data changed since the operator was built: it now yields {count} batches, "
                f"it had {self.num_batches}; build a new JacobianOperator for the new data"
            )
        result = block.flat.T.contiguous()
        if not all_finite(result):
            raise FloatingPointError("the transposed Jacobian product is NaN or Inf")
        return result

    def _check_rows(self, rows: list[Tensor]) -> None:
        if len(rows) != self.num_batches:
            raise ValueError(
                f"data changed since the operator was built: it now yields {len(rows)} batches, "
                f"it had {self.num_batches}; build a new JacobianOperator for the new data"
            )
        for index, (r, numel) in enumerate(zip(rows, self.output_numels)):
            if r.shape[1] != numel:
                raise ValueError(
                    f"batch {index} gives {r.shape[1]} output entries, expected {numel}: the data changed"
                )
            if not all_finite(r):
                raise FloatingPointError(f"the Jacobian product is NaN or Inf on batch {index}")

    def _check_deterministic(self) -> None:
        first = _first_batch(self.data)
        if not _same(first, _first_batch(self.data)):
            raise ValueError(
                "data yields a different first batch on each iteration (a shuffling "
                "DataLoader or random augmentation?); the Jacobian's rows follow the data "
                "order: use shuffle=False and deterministic transforms"
            )
        inputs = _to_device(first[0], self.device)
        with torch.no_grad():
            a, b = self.forward(inputs), self.forward(inputs)
        tol = float(torch.finfo(self.torch_dtype).eps) ** 0.5
        if not torch.allclose(a, b, rtol=tol, atol=tol):
            hint = " The model is in training mode: call model.eval()." if self.model.training else ""
            raise ValueError(
                "two forward passes on the first batch differ: the model is not "
                f"deterministic (dropout left on?).{hint}"
            )
        warn_batch_statistics(self.model, type(self).__name__, "the Jacobian of the training-mode model")

    def _rmatvec(self, x: Any) -> Any:
        return self.T.matvec(x)

    def _rmatmat(self, X: Any) -> Any:
        return self.T.matmat(X)

    def _transpose(self) -> TransposedJacobianOperator:
        return TransposedJacobianOperator(self)

    _adjoint = _transpose

    def __repr__(self) -> str:
        return (
            f"JacobianOperator(M={self.shape[0]}, D={self.shape[1]}, params={len(self.params)}, "
            f"batches={self.num_batches}, dtype={self.torch_dtype}, device={self.device})"
        )


class TransposedJacobianOperator(TorchLinearOperator):
    """``Jᵀ`` of a [`JacobianOperator`][curvops.JacobianOperator], shape (D, M), by reverse-mode AD.

    Shares the Jacobian's model, data and parameter selection (no second check).
    ``.T`` gives the Jacobian back.

    Parameters
    ----------
    jacobian : JacobianOperator
        The Jacobian to transpose.
    """

    def __init__(self, jacobian: JacobianOperator) -> None:
        if not isinstance(jacobian, JacobianOperator):
            raise TypeError(f"expected a JacobianOperator, got {type(jacobian).__name__}")
        self.jacobian = jacobian
        rows, cols = jacobian.shape
        super().__init__((cols, rows), jacobian.torch_dtype, jacobian.device)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a parameter-space result (D,) into named parameter-shaped views.

        Parameters
        ----------
        vector : Tensor
            ``(D,)`` vector in the parameter layout, the operator's dtype and device.

        Returns
        -------
        dict of str to Tensor
            Views of ``vector``, one per selected parameter, by name.
        """
        return self.jacobian.unflatten(vector)

    def _apply(self, U: Tensor) -> Tensor:
        return self.jacobian._apply_transposed(U)

    def _rmatvec(self, x: Any) -> Any:
        return self.jacobian.matvec(x)

    def _rmatmat(self, X: Any) -> Any:
        return self.jacobian.matmat(X)

    def _transpose(self) -> JacobianOperator:
        return self.jacobian

    _adjoint = _transpose

    def __repr__(self) -> str:
        return f"TransposedJacobianOperator(D={self.shape[0]}, M={self.shape[1]}, of {self.jacobian!r})"
