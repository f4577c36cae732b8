"""Shared machinery of the curvature operators.

:class:`TorchLinearOperator` is a :class:`scipy.sparse.linalg.LinearOperator` that also
multiplies torch tensors on its device without a host copy (numpy/torch dispatch and
vector checks). :class:`ModelOperator` adds a model, its data and a parameter selection,
with the forward pass and the forward-/reverse-mode products of the model output
(shared with :class:`~curvops.operators.jacobian.JacobianOperator`).
:class:`CurvatureOperator` is a ``(D, D)`` curvature matrix of a loss; subclasses
implement one method, :meth:`CurvatureOperator._products`, which multiplies a block of
vectors over a given set of batches; everything else (whole-dataset normalisation,
determinism and finiteness checks) lives here.

Parameter order
---------------
Vectors are laid out in ``model.named_parameters()`` order (shared parameters once),
restricted to the selected parameters, each flattened row-major (``p.reshape(-1)``).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from curvops.operators._loss import LossSpec

#: Largest dimension :meth:`TorchLinearOperator.to_dense` builds without ``max_dim``.
MAX_DENSE_DIM = 10_000

ParamSelection = None | str | Sequence[str] | Sequence[nn.Parameter]


class TorchLinearOperator(LinearOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` that also multiplies torch tensors.

    numpy input follows scipy's semantics (host arrays in and out); torch input stays on
    the operator's device and dtype (``op @ tensor``, ``op.matvec``, ``op.matmat``,
    :meth:`matmat_torch`). Subclasses implement :meth:`_apply` on a checked torch block
    of shape ``(shape[1], k)``.

    Attributes
    ----------
    device : torch.device
        Where products run.
    torch_dtype : torch.dtype
        dtype of the torch vectors it multiplies.
    is_symmetric : bool
        Whether the operator is known to be symmetric (default False).
    """

    #: Whether the operator is known to be symmetric (self-adjoint).
    is_symmetric: bool = False

    def __init__(self, shape: tuple[int, int], torch_dtype: torch.dtype, device: torch.device) -> None:
        self.torch_dtype = torch_dtype
        self.device = device
        super().__init__(dtype=np.dtype(str(torch_dtype).removeprefix("torch.")), shape=shape)

    @property
    def is_positive_semidefinite(self) -> bool:
        """Whether the operator is known to be positive semi-definite (False: unknown or indefinite)."""
        return False

    def matmat_torch(self, X: Tensor) -> Tensor:
        """Multiply a torch block ``X`` of shape (shape[1], k) on the operator's device and dtype.

        Returns
        -------
        Tensor
            ``A @ X``, shape (shape[0], k), same device and dtype. Computed in one pass over
            the data for the whole block.
        """
        X = self._check_torch(X)
        if X.dim() != 2:
            raise ValueError(f"matmat_torch expects a block of shape ({self.shape[1]}, k), got {tuple(X.shape)}")
        return self._apply(X)

    def to_dense(self, max_dim: int = MAX_DENSE_DIM) -> Tensor:
        """The full matrix as a torch tensor on the operator's device.

        Raises
        ------
        ValueError
            If a dimension exceeds ``max_dim`` (default :data:`MAX_DENSE_DIM` = 10,000).
        """
        rows, dim = self.shape
        if max(rows, dim) > max_dim:
            raise ValueError(
                f"to_dense() would build a {rows}x{dim} matrix; that exceeds max_dim={max_dim}. "
                "Pass a larger max_dim if you really have the memory."
            )
        eye = torch.eye(dim, dtype=self.torch_dtype, device=self.device)
        cols = [self._apply(eye[:, i:i + 64]) for i in range(0, dim, 64)]
        return torch.cat(cols, dim=1)

    # ----------------------------------------------------- scipy / torch dispatch
    def dot(self, x: Any) -> Any:
        """``A @ x``: torch tensors stay torch on the device; everything else as scipy."""
        if torch.is_tensor(x):
            x = self._check_torch(x)
            return self._apply(x.unsqueeze(1)).squeeze(1) if x.dim() == 1 else self._apply(x)
        return super().dot(x)

    def matvec(self, x: Any) -> Any:
        """Matrix-vector product; accepts numpy arrays (scipy semantics) or torch tensors."""
        if torch.is_tensor(x):
            x = self._check_torch(x)
            if x.dim() != 1:
                raise ValueError(f"matvec expects a vector of shape ({self.shape[1]},), got {tuple(x.shape)}")
            return self._apply(x.unsqueeze(1)).squeeze(1)
        return super().matvec(x)

    def matmat(self, X: Any) -> Any:
        """Matrix-matrix product; accepts numpy arrays (scipy semantics) or torch tensors."""
        if torch.is_tensor(X):
            return self.matmat_torch(X)
        return super().matmat(X)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        dim = self.shape[1]
        if x.ndim == 1:
            return self._matmat(x.reshape(dim, 1)).reshape(self.shape[0])
        if x.shape == (dim, 1):
            return self._matmat(x)
        # scipy >= 1.18 passes batches of row vectors (..., D) to matvec.
        rows = x.reshape(-1, dim)
        return self._matmat(rows.T).T.reshape(*x.shape[:-1], self.shape[0])

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if np.iscomplexobj(X):
            raise TypeError("curvature operators are real; got a complex array")
        if X.ndim > 2:
            # scipy >= 1.18 batched matmat: (..., D, k).
            blocks = [self._matmat(block) for block in X.reshape(-1, *X.shape[-2:])]
            return np.stack(blocks).reshape(*X.shape[:-2], self.shape[0], X.shape[-1])
        if X.ndim != 2 or X.shape[0] != self.shape[1]:
            raise ValueError(f"expected an array of shape ({self.shape[1]}, k), got {X.shape}")
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype)).to(self.device)
        if not torch.isfinite(Xt).all():
            raise ValueError("input vector contains NaN or Inf")
        return self._apply(Xt).cpu().numpy()

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for a checked (shape[1], k) torch block; implemented by subclasses."""
        raise NotImplementedError

    def _check_torch(self, x: Tensor, dim: int | None = None) -> Tensor:
        """Check a torch vector (dim,) or block (dim, k); ``dim`` defaults to ``shape[1]``."""
        dim = self.shape[1] if dim is None else dim
        if x.dim() not in (1, 2) or x.shape[0] != dim:
            raise ValueError(f"expected a tensor of shape ({dim},) or ({dim}, k), got {tuple(x.shape)}")
        if x.dtype != self.torch_dtype:
            raise TypeError(f"expected dtype {self.torch_dtype} (the parameters'), got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"expected a tensor on device {self.device} (the parameters'), got one on device {x.device}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("input vector contains NaN or Inf")
        return x


class ModelOperator(TorchLinearOperator):
    """A :class:`TorchLinearOperator` defined by a model, its data and a parameter selection.

    Holds what every model-based operator shares: the model, the re-iterable data, the
    selected parameters (names, shapes, order), the forward pass, the batch iterator,
    and the forward-mode (``J v``) and reverse-mode (``Jᵀ u``) products of the model
    output w.r.t. the selected parameters. Subclasses call :meth:`_set_model` and
    :meth:`_set_data_and_params`, then ``TorchLinearOperator.__init__`` with their shape.
    """

    def _set_model(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def _set_data_and_params(self, data: Iterable[tuple[Any, Any]], params: ParamSelection) -> None:
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (inputs, targets) batches or a "
                f"DataLoader); got a one-shot iterator of type {type(data).__name__}"
            )
        self.data = data
        self.param_names, self.params = _select_parameters(self.model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"selected parameters must share one dtype and device, got {dtypes} on {devices}")
        self.torch_dtype: torch.dtype = self.params[0].dtype
        self.device: torch.device = self.params[0].device
        if not self.torch_dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {self.torch_dtype}")
        self.param_shapes = [p.shape for p in self.params]
        self.param_numels = [p.numel() for p in self.params]
        #: Number of selected parameter entries (the parameter-space dimension).
        self.num_params: int = sum(self.param_numels)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat parameter-space vector (D,) into named parameter-shaped views."""
        vector = self._check_torch(vector, self.num_params)
        if vector.dim() != 1:
            raise ValueError(f"unflatten expects a vector of shape ({self.num_params},), got {tuple(vector.shape)}")
        parts = vector.split(self.param_numels)
        return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (by name or in order) into a vector (D,)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"flatten: missing tensors for parameters {missing[:5]}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.params):
            raise ValueError(f"flatten expects {len(self.params)} tensors, got {len(tensors)}")
        for name, t, shape in zip(self.param_names, tensors, self.param_shapes):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"flatten: tensor for {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return torch.cat([t.reshape(-1) for t in tensors]).to(device=self.device, dtype=self.torch_dtype)

    def parameter_vector(self) -> Tensor:
        """Current values of the selected parameters as one flat vector (D,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def forward(self, inputs: Any, replace: Mapping[str, Tensor] | None = None) -> Tensor:
        """Run the model on a batch's inputs and return the output tensor.

        ``replace`` maps parameter names to tensors used in their place (for
        forward-mode AD through dual tensors).
        """
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
        with _attention_with_higher_derivatives():
            if replace is None:
                output = self.model(*args, **kwargs)
            else:
                output = torch.func.functional_call(self.model, dict(replace), args, kwargs)
        if torch.is_tensor(output):
            return output
        logits = getattr(output, "logits", None)
        if torch.is_tensor(logits):
            return logits
        if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
            return output[0]
        raise TypeError(
            f"model output must be a tensor or have a 'logits' tensor, got {type(output).__name__}"
        )

    def _batches(self, only: set[int] | None = None) -> Iterator[tuple[int, Any, Any]]:
        """Yield (index, inputs, targets) with tensors moved to the model's device."""
        for index, batch in enumerate(self.data):
            if only is not None and index not in only:
                continue
            inputs, target = _unpack(batch, index)
            yield index, _to_device(inputs, self.device), _to_device(target, self.device)

    def _zeros_like_block(self, k: int) -> list[Tensor]:
        return [torch.zeros(k, *s, dtype=self.torch_dtype, device=self.device) for s in self.param_shapes]

    def _jvp(self, inputs: Any, tangents: list[Tensor], keep_graph: bool) -> tuple[Tensor, Tensor]:
        """Output and output tangent ``J v`` of one batch by forward-mode AD.

        With ``keep_graph`` the output carries the autograd graph w.r.t. the parameters.
        """
        import torch.autograd.forward_ad as fwAD

        grad_mode = torch.enable_grad() if keep_graph else torch.no_grad()
        with grad_mode, fwAD.dual_level():
            duals = {n: fwAD.make_dual(p if keep_graph else p.detach(), t)
                     for n, p, t in zip(self.param_names, self.params, tangents)}
            output, tangent = fwAD.unpack_dual(self.forward(inputs, replace=duals))
        if tangent is None:  # the output does not depend on the selected parameters
            tangent = torch.zeros_like(output)
        return output, tangent.detach()

    def _jvp_block(self, inputs: Any, tangents: list[Tensor]) -> Tensor:
        """``J V`` for a block of tangents (leading dimension m), shape ``(m, *output.shape)``.

        Vectorised with ``torch.func.vmap`` over the tangents, so the primal forward is
        computed once for all of them.
        """
        primals = {n: p.detach() for n, p in zip(self.param_names, self.params)}

        def output_of(params: dict[str, Tensor]) -> Tensor:
            return self.forward(inputs, replace=params)

        def tangent_of(*ts: Tensor) -> Tensor:
            return torch.func.jvp(output_of, (primals,), (dict(zip(self.param_names, ts)),))[1]

        with torch.no_grad():
            return torch.func.vmap(tangent_of)(*tangents)

    def _vjp(self, output: Tensor, cotangent: Tensor, retain_graph: bool) -> tuple[Tensor, ...]:
        """``Jᵀ u`` per selected parameter: one backward pass from ``output`` (with graph) seeded by ``cotangent``."""
        if not output.requires_grad:  # the output does not depend on any parameter
            return tuple(torch.zeros_like(p) for p in self.params)
        return torch.autograd.grad(output, self.params, grad_outputs=cotangent,
                                   retain_graph=retain_graph, allow_unused=True,
                                   materialize_grads=True)


class CurvatureOperator(ModelOperator):
    """Base class: a curvature matrix of a loss over a data set, as a linear operator.

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its forward takes a batch's ``inputs`` (a tensor, or a dict of
        tensors passed as keyword arguments) and returns a tensor or an object with a
        ``logits`` attribute (Hugging Face ``ModelOutput``).
    loss_fn : callable
        ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (reduction
        ``"mean"`` or ``"sum"``) or any callable ``(output, target) -> scalar``
        (assumed to be a mean over the batch's samples unless it has
        ``reduction="sum"``).
    data : iterable of (inputs, targets)
        Re-iterable batches (a list, or a ``DataLoader`` without shuffling); batches
        may differ in size. Tensors are moved to the model's device.
    params : None, str, list of str, or list of parameters, optional
        Parameters the operator acts on. ``None`` (default): every parameter that
        requires grad. Strings are glob patterns on parameter names, e.g.
        ``"layers.*.attn.*"``.
    check_deterministic : bool, optional
        If True (default), check once on the first batch that two evaluations of the
        loss and gradient agree and that ``data`` yields the same first batch twice.

    Notes
    -----
    The operator is the curvature of the whole-dataset objective: for ``mean`` losses
    the mean over all samples of all batches (for cross-entropy with ``ignore_index``,
    over all counted targets), exactly, whatever the batch sizes; for ``sum`` losses
    the sum.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
                 data: Iterable[tuple[Any, Any]], *, params: ParamSelection = None,
                 check_deterministic: bool = True) -> None:
        self._set_model(model)
        self.loss = LossSpec.from_loss(loss_fn)
        self._set_data_and_params(data, params)
        super().__init__((self.num_params, self.num_params), self.torch_dtype, self.device)

        self.num_batches, self.normaliser = self._count()
        # Scale that turns batch sums into the whole-dataset objective.
        self.scale: float = 1.0 / self.normaliser if self.loss.reduction == "mean" else 1.0
        if check_deterministic:
            self._check_deterministic()

    #: Every curvature operator here is symmetric (self-adjoint).
    is_symmetric: bool = True

    # ================================================================ public API
    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Whole-dataset loss (scalar) and its gradient (D,) at the current parameters."""
        grad = torch.zeros(self.shape[0], dtype=self.torch_dtype, device=self.device)
        total = torch.zeros((), dtype=self.torch_dtype, device=self.device)
        for index, inputs, target in self._batches():
            with torch.enable_grad():
                value = self.loss.batch_sum(self.forward(inputs), target) * self.scale
                grads = torch.autograd.grad(value, self.params, allow_unused=True, materialize_grads=True)
            grad += torch.cat([g.reshape(-1) for g in grads])
            total += value.detach()
        self._raise_if_nonfinite_loss([total], [0], what="loss")
        return total, grad

    # ----------------------------------------------------- scipy / torch dispatch
    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> "CurvatureOperator":
        return self

    def _transpose(self) -> "CurvatureOperator":
        return self

    # ================================================================ internals
    def _products(self, V: list[Tensor], only: set[int] | None = None) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """Multiply the block ``V`` over the data; implemented by subclasses.

        Parameters
        ----------
        V : list of Tensor
            One tensor per parameter, shape ``(k, *param.shape)``.
        only : set of int, optional
            Restrict the product to these batch indices (used to locate NaN/Inf);
            iterate with ``self._batches(only)``.

        Returns
        -------
        out : list of Tensor
            ``A V`` per parameter, shape ``(k, *param.shape)``.
        losses : list of Tensor
            Scalar loss values computed on the way (checked for NaN/Inf).
        loss_batches : list of int
            Batch index of each loss value.
        """
        raise NotImplementedError

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for a checked (D, k) torch block."""
        k = X.shape[1]
        Vt = X.T.contiguous()
        V = [t.view(k, *s) for t, s in zip(Vt.split(self.param_numels, dim=1), self.param_shapes)]
        out, losses, loss_batches = self._products(V)
        self._raise_if_nonfinite_loss(losses, loss_batches, what="loss")
        result = torch.cat([o.reshape(k, -1) for o in out], dim=1).T
        if not bool(torch.isfinite(result).all()):
            self._raise_nonfinite_product(V)
        return result.contiguous()

    def _count(self) -> tuple[int, float]:
        count = 0
        total = 0.0
        for index, batch in enumerate(self.data):
            inputs, target = _unpack(batch, index)
            total += float(self.loss.batch_normaliser(target, inputs))
            count += 1
        if count == 0:
            raise ValueError("data is empty: it yielded no batches")
        if self.loss.reduction == "mean" and total <= 0:
            raise ValueError(
                "the data has no counted loss terms (every target equals ignore_index, or "
                "the class weights of all targets are 0): the mean loss is undefined"
            )
        return count, total

    def _check_deterministic(self) -> None:
        first = _first_batch(self.data)
        again = _first_batch(self.data)
        if not _same(first, again):
            raise ValueError(
                "data yields a different first batch on each iteration (a shuffling "
                "DataLoader or random augmentation?); the operator needs the same batches "
                "every pass: use shuffle=False and deterministic transforms"
            )
        inputs, target = _to_device(first[0], self.device), _to_device(first[1], self.device)
        values, grads = [], []
        for _ in range(2):
            with torch.enable_grad():
                output = self.forward(inputs)
                value = self.loss.batch_sum(output, target)
                g = torch.autograd.grad(value, self.params, allow_unused=True, materialize_grads=True)
            values.append(value.detach())
            grads.append(torch.cat([x.reshape(-1) for x in g]))
        self._raise_if_nonfinite_loss(values[:1], [0], what="loss")
        tol = float(torch.finfo(self.torch_dtype).eps) ** 0.5
        dv = float((values[0] - values[1]).abs())
        dg = float((grads[0] - grads[1]).norm())
        if dv > tol * (1 + float(values[0].abs())) or dg > tol * (1 + float(grads[0].norm())):
            hint = " The model is in training mode: call model.eval()." if self.model.training else ""
            raise ValueError(
                "two evaluations of the loss and gradient on the first batch differ "
                f"(|Δloss| = {dv:.3g}, ‖Δgrad‖ = {dg:.3g}): the model is not deterministic "
                f"(dropout left on, or a random layer?).{hint} Pass "
                "check_deterministic=False only if you accept a randomised operator."
            )
        if self.loss.kind != "custom":
            with torch.no_grad():
                reference = self.loss.fn(output.detach(), target)
                ours = values[0] / (float(self.loss.batch_normaliser(target, inputs)) if self.loss.reduction == "mean" else 1.0)
            if not torch.allclose(ours.to(reference.dtype), reference, rtol=tol, atol=tol * 1e-3):
                raise ValueError(
                    f"curvops does not reproduce this {type(self.loss.fn).__name__} configuration "
                    f"(got {float(ours):.6g}, the loss gives {float(reference):.6g}); "
                    "please report it, and wrap the loss in a plain function meanwhile"
                )

    def _raise_if_nonfinite_loss(self, losses: list[Tensor], batches: list[int], what: str) -> None:
        if not losses:
            return
        finite = torch.isfinite(torch.stack([v.reshape(()) for v in losses]))
        if bool(finite.all()):
            return
        bad = batches[int((~finite).nonzero()[0])]
        raise FloatingPointError(f"the {what} of batch {bad} is NaN or Inf")

    def _raise_nonfinite_product(self, V: list[Tensor]) -> None:
        for index in range(self.num_batches):
            out, _, _ = self._products(V, only={index})
            if not all(bool(torch.isfinite(o).all()) for o in out):
                raise FloatingPointError(f"the curvature product is NaN or Inf on batch {index}")
        raise FloatingPointError("the curvature product is NaN or Inf")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(D={self.shape[0]}, params={len(self.params)}, "
                f"batches={self.num_batches}, loss={self.loss.kind}/{self.loss.reduction}, "
                f"dtype={self.torch_dtype}, device={self.device})")


class OutputSpaceOperator(CurvatureOperator):
    """Base of the operators of the form ``Σ_batches Jᵀ M J`` (GGN and Fisher).

    ``J`` is the Jacobian of the model output w.r.t. the selected parameters and ``M``
    a symmetric matrix in output space given by :meth:`_middle`. Per batch: the graph of
    one forward pass is kept, ``J v`` comes from forward-mode AD (dual tensors; see
    ``_tangent_with_graph`` for how the two share work, chosen by device), and
    ``Jᵀ (M J v)`` from one backward pass through the kept graph per column; a (D, k)
    block shares the forward pass, vectorises the tangents with ``vmap`` and prepares the
    middle matrix once.
    """

    def _middle_context(self, output: Tensor, target: Any, index: int) -> Any:
        """Per-batch data for :meth:`_middle`, computed once for all columns of a block."""
        return None

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Any) -> Tensor:
        """Apply the output-space matrix ``M`` of the batch sum to ``jv``."""
        raise NotImplementedError

    #: How ``J v`` of the first column is obtained. True: one dual forward with the autograd
    #: graph kept gives the output and ``J v`` together (one forward pass fewer). False: a
    #: plain forward keeps the graph and the tangents come from a separate no-graph dual
    #: forward. With the graph kept, forward AD also records the tangent computations (the
    #: parameters require grad), which roughly doubles the activations held. None (default)
    #: picks by device, as measured: on the CPU keeping the graph is faster (MLP 2.42 vs 2.78
    #: gradients, CNN 1.73 vs 2.88); on an H100 (GPT-2-small, fp32) the separate forward is
    #: both faster (2.23 vs 2.35 gradients) and far leaner (7.9 vs 17.1 GiB peak extra).
    _tangent_with_graph: bool | None = None

    def _keep_graph_for_tangent(self) -> bool:
        if self._tangent_with_graph is None:
            return self.device.type == "cpu"
        return self._tangent_with_graph

    def _products(self, V, only=None):
        k = V[0].shape[0]
        out = self._zeros_like_block(k)
        losses, loss_batches = [], []
        for index, inputs, target in self._batches(only):
            if self._keep_graph_for_tangent():
                output, first = self._jvp(inputs, [v[0] for v in V], keep_graph=True)
                tangents = [first]
                if k > 1:
                    tangents += list(self._jvp_block(inputs, [v[1:] for v in V]).unbind(0))
            else:
                with torch.enable_grad():
                    output = self.forward(inputs)
                if k == 1:
                    tangents = [self._jvp(inputs, [v[0] for v in V], keep_graph=False)[1]]
                else:
                    tangents = list(self._jvp_block(inputs, V).unbind(0))
            primal = output.detach()
            context = self._middle_context(primal, target, index)
            for col, jv in enumerate(tangents):
                middle = self._middle(primal, target, jv, context) * self.scale
                grads = self._vjp(output, middle, retain_graph=col < k - 1)
                for o, g in zip(out, grads):
                    o[col].add_(g)
            with torch.no_grad():
                losses.append(self.loss.batch_sum(primal, target) * self.scale)
            loss_batches.append(index)
        return out, losses, loss_batches


# ==================================================================== helpers
@contextlib.contextmanager
def _attention_with_higher_derivatives() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel.

    The fused attention kernels have neither a double backward nor forward-mode AD;
    the math kernel is made of differentiable primitives, so Hessian and GGN products
    work through ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _select_parameters(model: nn.Module, params: ParamSelection) -> tuple[list[str], list[nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameters that require grad")
        return [n for n, _ in chosen], [p for _, p in chosen]
    if isinstance(params, str):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    if all(isinstance(p, str) for p in params):
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in params)]
        if not chosen:
            names = ", ".join(n for n, _ in named[:8])
            raise ValueError(f"no parameter name matches {params}; names look like: {names}, ...")
    elif all(isinstance(p, Tensor) for p in params):
        by_id = {id(p): n for n, p in named}
        for i, p in enumerate(params):
            if id(p) not in by_id:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model")
        wanted = {id(p) for p in params}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
    else:
        raise TypeError("params must be None, glob pattern string(s), or a list of the model's parameters")
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameters {frozen[:5]} do not require grad; the curvature w.r.t. them is undefined here")
    return [n for n, _ in chosen], [p for _, p in chosen]


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"batch {index} must be an (inputs, targets) pair, got {type(batch).__name__}")


def _to_device(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _first_batch(data: Iterable[Any]) -> tuple[Any, Any]:
    for batch in data:
        return _unpack(batch, 0)
    raise ValueError("data is empty: it yielded no batches")


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            # NaN == NaN here: a NaN batch is reported as such later, not as shuffling.
            return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
