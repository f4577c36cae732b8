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

from curvops._finite import all_finite
from curvops.operators._forward_ad import ConstantRegions, own_storage, tangent_rules
from curvops.operators._loss import LossSpec
from curvops.operators._parallel import (
    Parallel,
    Replicated,
    Sharded,
    ShardLayout,
    detect_parallel,
    fingerprint,
    local_tensor,
    shard_layout,
)

#: Largest dimension :meth:`TorchLinearOperator.to_dense` builds without ``max_dim``.
MAX_DENSE_DIM = 10_000

ParamSelection = None | str | Sequence[str] | Sequence[nn.Parameter]


class TorchLinearOperator(LinearOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` that also multiplies torch tensors.

    numpy input follows scipy's semantics (host arrays in and out); torch input stays on
    the operator's device and dtype (``op @ tensor``, ``op.matvec``, ``op.matmat``,
    :meth:`matmat_torch`). Subclasses implement :meth:`_apply` on a checked torch block
    of shape ``(shape[1], k)``. An empty block ``(shape[1], 0)`` gives an empty
    ``(shape[0], 0)`` result, as numpy's ``@`` does.

    numpy has no bfloat16: an operator on bfloat16 parameters has numpy ``dtype``
    float32; numpy input is rounded to bfloat16, multiplied in bfloat16 (the model's
    precision, as torch input is) and returned as float32.

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
    #: How the operator is spread over processes (DDP / FSDP); None: one process.
    parallel: Parallel | None = None
    #: Under FSDP: which rows of a length-``D`` vector this process holds; None otherwise.
    sharding: ShardLayout | None = None

    def __init__(self, shape: tuple[int, int], torch_dtype: torch.dtype, device: torch.device) -> None:
        self.torch_dtype = torch_dtype
        self.device = device
        super().__init__(dtype=_numpy_dtype(torch_dtype), shape=shape)

    @property
    def is_positive_semidefinite(self) -> bool:
        """Whether the operator is known to be positive semi-definite (False: unknown or indefinite)."""
        return False

    def matmat_torch(self, X: Tensor, out: Tensor | None = None) -> Tensor:
        """Multiply a torch block ``X`` of shape (shape[1], k) on the operator's device and dtype.

        Parameters
        ----------
        X : Tensor
            (shape[1], k) block (under FSDP: this rank's rows).
        out : Tensor, optional
            (shape[0], k) tensor of the same dtype and device, not overlapping ``X``, to write
            the product into (it is returned). The curvature operators then accumulate the
            product there: no D-sized result is allocated (Lanczos passes a row of its basis).

        Returns
        -------
        Tensor
            ``A @ X``, shape (shape[0], k), same device and dtype (``out`` if given). Computed
            in one pass over the data for the whole block.
        """
        X = self._check_torch(X)
        if X.dim() != 2:
            raise ValueError(f"matmat_torch expects a block of shape ({self._vector_rows()}, k), got {tuple(X.shape)}")
        if out is not None:
            self._check_out(out, X)
        if X.shape[1] == 0:  # no columns: nothing to multiply (the products assume k >= 1)
            rows = self.shape[0] if self.sharding is None else self.sharding.local_dim
            return X.new_zeros(rows, 0) if out is None else out
        if out is None:
            return self._apply(X)
        return self._apply_into(X, out)

    def _check_out(self, out: Tensor, X: Tensor) -> None:
        rows = self.shape[0] if self.sharding is None else self.sharding.local_dim
        if not isinstance(out, Tensor) or tuple(out.shape) != (rows, X.shape[1]):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"out must be a tensor of shape ({rows}, {X.shape[1]}), got {shape}")
        if out.dtype != self.torch_dtype or out.device != self.device:
            raise TypeError(f"out must have dtype {self.torch_dtype} on {self.device}, got {out.dtype} on {out.device}")
        if _overlap(out, X):
            raise ValueError("out must not overlap the input block")

    def _apply_into(self, X: Tensor, out: Tensor) -> Tensor:
        """``A @ X`` written into ``out``; operators that can accumulate there override this."""
        out.copy_(self._apply(X))
        return out

    def to_dense(self, max_dim: int = MAX_DENSE_DIM) -> Tensor:
        """The full matrix as a torch tensor on the operator's device.

        Raises
        ------
        ValueError
            If a dimension exceeds ``max_dim`` (default :data:`MAX_DENSE_DIM` = 10,000).
        """
        rows, dim = self.shape
        if self.sharding is not None:
            raise NotImplementedError("to_dense() of an FSDP-sharded operator would gather a full matrix on every rank")
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
        """``A @ x``: torch tensors stay torch on the device; everything else as scipy.

        ``x`` may also be a list of tensors shaped like the selected parameters (``[*p.shape]``
        each, or ``[*p.shape, k]`` for k vectors) for operators whose input and output are
        parameter-space vectors: the result is such a list (as in curvlinops). A curvops
        operator gives the product operator, a real scalar the scaled operator
        (:mod:`curvops.operators.algebra`, torch path kept); a plain scipy
        ``LinearOperator`` gives scipy's product (numpy only).
        """
        from curvops.operators.algebra import _ProductOperator, _real_scalar, _ScaledOperator

        if isinstance(x, TorchLinearOperator):
            return _ProductOperator(self, x)
        if isinstance(x, LinearOperator):
            return super().dot(x)
        alpha = _real_scalar(x)
        if alpha is not None:
            return _ScaledOperator(self, alpha)
        if isinstance(x, (list, tuple)) and any(torch.is_tensor(t) for t in x):
            return self._apply_to_parameter_list(x)
        if torch.is_tensor(x):
            if x.dim() == 2:
                return self.matmat_torch(x)
            x = self._check_torch(x)
            return self._apply(x.unsqueeze(1)).squeeze(1)
        if isinstance(x, np.ndarray):
            self._reject_host_arrays()
        return super().dot(x)

    def __matmul__(self, x: Any) -> Any:
        if _is_scalar(x):
            raise ValueError("Scalar operands are not allowed, use '*' instead")
        return self.dot(x)

    def __rmul__(self, x: Any) -> Any:
        from curvops.operators.algebra import _real_scalar, _ScaledOperator

        alpha = _real_scalar(x)
        return super().__rmul__(x) if alpha is None else _ScaledOperator(self, alpha)

    def __truediv__(self, x: Any) -> "TorchLinearOperator":
        from curvops.operators.algebra import _real_scalar, _ScaledOperator

        alpha = _real_scalar(x)
        if alpha is None:
            raise ValueError("Can only divide a linear operator by a scalar.")
        if alpha == 0:
            raise ZeroDivisionError("cannot divide an operator by zero")
        return _ScaledOperator(self, 1.0 / alpha)

    def __neg__(self) -> "TorchLinearOperator":
        from curvops.operators.algebra import _ScaledOperator

        return _ScaledOperator(self, -1.0)

    def __add__(self, x: Any) -> Any:
        from curvops.operators.algebra import _SumOperator

        if isinstance(x, TorchLinearOperator):
            return _SumOperator([self, x])
        return super().__add__(x)  # scipy's sum (numpy only) for a plain LinearOperator

    def __sub__(self, x: Any) -> Any:
        if isinstance(x, LinearOperator):
            return self.__add__(-x)
        return NotImplemented

    def __pow__(self, p: Any) -> Any:
        from curvops.operators.algebra import _PowerOperator

        if _is_scalar(p):
            return _PowerOperator(self, p)
        return NotImplemented

    def _parameter_shapes(self) -> list[torch.Size] | None:
        """Parameter shapes of the vectors if both input and output are in a model's parameter layout.

        None (the default) for operators between other spaces; square curvature operators
        and their inverses return their ``param_shapes``.
        """
        return None

    def _apply_to_parameter_list(self, tensors: Sequence[Any]) -> list[Tensor]:
        """``A @ [t_1, t_2, ...]`` for parameter-shaped tensors (``[*p.shape]`` or ``[*p.shape, k]``)."""
        shapes = self._parameter_shapes()
        if shapes is None:
            raise TypeError(
                f"{type(self).__name__} multiplies flat vectors of shape ({self.shape[1]},) or "
                f"({self.shape[1]}, k), not lists of tensors: its input and output are not both in a model's "
                "parameter layout. Concatenate them with op.flatten(tensors) (a ModelOperator's) or "
                "torch.cat([t.reshape(-1) for t in tensors])"
            )
        if not all(torch.is_tensor(t) for t in tensors) or len(tensors) != len(shapes):
            raise ValueError(
                f"expected a list of {len(shapes)} tensors shaped like the parameters {[tuple(s) for s in shapes]} "
                f"(or with a trailing dimension k), got {[tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in tensors]}; "
                "op.flatten / op.unflatten convert between such lists and flat vectors"
            )
        first, shape = tensors[0], tuple(shapes[0])
        k = None if tuple(first.shape) == shape else (first.shape[-1] if tuple(first.shape[:-1]) == shape else -1)
        expected = [tuple(s) if k is None else (*s, k) for s in shapes]
        if k == -1 or any(tuple(t.shape) != e for t, e in zip(tensors, expected)):
            raise ValueError(
                f"expected tensors shaped like the parameters {[tuple(s) for s in shapes]} (or all with one "
                f"trailing dimension k), got {[tuple(t.shape) for t in tensors]}; op.flatten / op.unflatten "
                "convert between such lists and flat vectors"
            )
        if k is None:
            flat = torch.cat([t.reshape(-1) for t in tensors])
        else:
            flat = torch.cat([t.reshape(-1, k) for t in tensors])
        result = self.dot(flat)
        numels = [int(np.prod(s)) for s in shapes]
        return [r.reshape(e) for r, e in zip(result.split(numels), expected)]

    def matvec(self, x: Any) -> Any:
        """Matrix-vector product; accepts numpy arrays (scipy semantics) or torch tensors."""
        if torch.is_tensor(x):
            x = self._check_torch(x)
            if x.dim() != 1:
                raise ValueError(f"matvec expects a vector of shape ({self._vector_rows()},), got {tuple(x.shape)}")
            return self._apply(x.unsqueeze(1)).squeeze(1)
        self._reject_host_arrays()
        return super().matvec(x)

    def matmat(self, X: Any) -> Any:
        """Matrix-matrix product; accepts numpy arrays (scipy semantics) or torch tensors."""
        if torch.is_tensor(X):
            return self.matmat_torch(X)
        self._reject_host_arrays()
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

    def _reject_host_arrays(self) -> None:
        if self.sharding is not None:
            raise TypeError(
                "this operator is FSDP-sharded: it multiplies torch tensors holding this rank's "
                f"shard ({self.sharding.local_dim} of {self.shape[1]} rows), not numpy arrays; "
                "use curvops.lanczos / hutchinson_trace / spectral_density, or matmat_torch"
            )

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self._reject_host_arrays()
        X = np.asarray(X)
        if np.iscomplexobj(X):
            raise TypeError("curvature operators are real; got a complex array")
        if X.ndim > 2:
            # scipy >= 1.18 batched matmat: (..., D, k).
            blocks = [self._matmat(block) for block in X.reshape(-1, *X.shape[-2:])]
            return np.stack(blocks).reshape(*X.shape[:-2], self.shape[0], X.shape[-1])
        if X.ndim != 2 or X.shape[0] != self.shape[1]:
            raise ValueError(f"expected an array of shape ({self.shape[1]}, k), got {X.shape}")
        if X.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype)).to(self.device, self.torch_dtype)
        if not all_finite(Xt):
            raise ValueError("input vector contains NaN or Inf")
        return self._apply(Xt).cpu().to(_torch_dtype(self.dtype)).numpy()

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for a checked (shape[1], k) torch block; implemented by subclasses."""
        raise NotImplementedError

    def _check_torch(self, x: Tensor, dim: int | None = None) -> Tensor:
        """Check a torch vector (dim,) or block (dim, k); ``dim`` defaults to the input rows.

        In a distributed operator every rank checks its own input and all ranks raise
        together if any rank's input is bad.
        """
        dim = self._vector_rows() if dim is None else dim
        error: Exception | None = None
        if x.dim() not in (1, 2) or x.shape[0] != dim:
            error = ValueError(f"expected a tensor of shape ({dim},) or ({dim}, k), got {tuple(x.shape)}")
        elif x.dtype != self.torch_dtype:
            error = TypeError(f"expected dtype {self.torch_dtype} (the parameters'), got {x.dtype}")
        elif x.device != self.device:
            error = ValueError(f"expected a tensor on device {self.device} (the parameters'), got one on device {x.device}")
        elif not all_finite(x):
            error = ValueError("input vector contains NaN or Inf")
        # The block width is agreed on too: ranks multiplying different numbers of vectors
        # would enter collectives of different sizes (gloo aborts the process on those).
        columns = x.shape[1] if x.dim() == 2 else 1
        self._agree(error, f"a product with {columns} vector(s)")
        return x

    def _vector_rows(self) -> int:
        """Rows of the input vectors held by this process (``shape[1]``, or the local shard's)."""
        return self.shape[1] if self.sharding is None else self.sharding.local_dim

    def _agree(self, error: Exception | None, doing: str = "") -> None:
        """Raise ``error``; in a distributed operator, raise on all ranks if any rank has one.

        ``doing`` describes what the rank is about to do; ranks whose descriptions differ
        raise too (see :meth:`Parallel.agree`).
        """
        if self.parallel is not None:
            self.parallel.agree(error, self.device, doing)
        elif error is not None:
            raise error


class ModelOperator(TorchLinearOperator):
    """A :class:`TorchLinearOperator` defined by a model, its data and a parameter selection.

    Holds what every model-based operator shares: the model, the re-iterable data, the
    selected parameters (names, shapes, order), the forward pass, the batch iterator,
    and the forward-mode (``J v``) and reverse-mode (``Jᵀ u``) products of the model
    output w.r.t. the selected parameters. Subclasses call :meth:`_set_model` and
    :meth:`_set_data_and_params`, then ``TorchLinearOperator.__init__`` with their shape.
    """

    #: Rows of a caller's ``out`` for the next product's accumulators (see _zeros_like_block).
    _destination: Tensor | None = None

    def _set_model(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # DDP: run the wrapped module (its reducer is for training steps; products are
        # all-reduced once each here). FSDP2: run the sharded model itself.
        self.model, self.parallel = detect_parallel(model)
        meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(
                f"the model's {', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''} are on the meta "
                "device (shapes without values): materialise the model before building an operator, "
                "e.g. model.to_empty(device='cpu') and load_state_dict, or build it outside "
                "torch.device('meta')"
            )

    def _set_data_and_params(self, data: Iterable[tuple[Any, Any]], params: ParamSelection) -> None:
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (inputs, targets) batches or a "
                f"DataLoader); got a one-shot iterator of type {type(data).__name__}"
            )
        self.data = data
        error: Exception | None = None
        try:
            self._select_params(params)
        except (TypeError, ValueError) as caught:
            if self.parallel is None:
                raise
            error = caught
        if self.parallel is not None:
            # Before the first collective whose size depends on the selection (the shard layout's).
            self._agree_on_parameters(error)
        if isinstance(self.parallel, Sharded):
            self.sharding = shard_layout(self.params, self.parallel)
            self.device = local_tensor(self.params[0]).device
        # Shapes of the pieces of a vector this process holds (local shards under FSDP).
        self.param_shapes = [local_tensor(p).shape for p in self.params]
        self.param_numels = [local_tensor(p).numel() for p in self.params]
        #: Number of selected parameter entries (the parameter-space dimension).
        self.num_params: int = sum(p.numel() for p in self.params)
        selected = {id(p) for p in self.params}
        scaled = [n for n, m in self.model.named_modules()
                  if isinstance(m, nn.Embedding) and m.scale_grad_by_freq and id(m.weight) in selected]
        if scaled:
            # Reverse mode divides each row's gradient by the row's count in the batch: not the
            # derivative of the output, so Jᵀu is not the adjoint of J v and the Hessian is not
            # the loss's (a GGN 15% asymmetric).
            raise ValueError(
                f"embedding {scaled[0]!r} has scale_grad_by_freq=True: autograd then returns a "
                "rescaled gradient, not the derivative, and every curvature product would be "
                "wrong; set scale_grad_by_freq=False on it for the curvature (the output is the "
                "same), or leave its weight out of params"
            )

    def _select_params(self, params: ParamSelection) -> None:
        self.param_names, self.params = _select_parameters(self.model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"selected parameters must share one dtype and device, got {dtypes} on {devices}")
        self.torch_dtype: torch.dtype = self.params[0].dtype
        self.device: torch.device = self.params[0].device
        if not self.torch_dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {self.torch_dtype}")

    def _agree_on_parameters(self, error: Exception | None) -> None:
        """Raise on every rank if a rank's selection failed (``error``) or the ranks selected different parameters."""
        if error is not None:  # pairs with the other ranks' agreement below, and raises on all
            first = next(iter(self.model.parameters()), None)
            device = torch.device("cpu") if first is None else local_tensor(first).device
            self.parallel.agree(error, device)
        selection = ";".join(f"{n}:{tuple(p.shape)}" for n, p in zip(self.param_names, self.params))
        digest = f"{int(fingerprint(selection)):012x}"
        doing = (f"{type(self).__name__}(params: {len(self.params)} tensors, "
                 f"{sum(p.numel() for p in self.params)} entries, {self.param_names[0]} ... "
                 f"{self.param_names[-1]}, selection hash {digest})")
        self.parallel.agree(None, local_tensor(self.params[0]).device, doing)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat parameter-space vector (D,) into named parameter-shaped views.

        Under FSDP the vector is this rank's shard and the views have the local shards' shapes.
        """
        rows = sum(self.param_numels)
        vector = self._check_torch(vector, rows)
        if vector.dim() != 1:
            raise ValueError(f"unflatten expects a vector of shape ({rows},), got {tuple(vector.shape)}")
        parts = vector.split(self.param_numels)
        return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (by name or in order) into a vector (D,).

        Under FSDP: the local shards' shapes, giving this rank's shard of the vector.
        """
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
        """Current values of the selected parameters as one flat vector (D,) (local shard under FSDP)."""
        return torch.cat([local_tensor(p).detach().reshape(-1) for p in self.params])

    def _global_norm(self, tensors: Sequence[Tensor]) -> float:
        """Euclidean norm of a vector given by its pieces (summed over the shards under FSDP)."""
        # float64 accumulation (no overflow of squared float32 entries), without a float64 copy.
        norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
        square = (torch.stack(norms).square().sum() if norms
                  else torch.zeros((), dtype=torch.float64, device=self.device)).reshape(1)
        if isinstance(self.parallel, Sharded):
            self.parallel.all_reduce_(square)
        return float(square.sqrt())

    @contextlib.contextmanager
    def _shifted_parameters(self) -> Iterator[Callable[[list[Tensor], int, float], list[Tensor] | None]]:
        """Yield ``shift(V, col, amount)``, which moves the evaluation point to ``θ₀ + amount · V[col]``.

        On one process (and under DDP) nothing is modified: ``shift`` returns the shifted
        values as new tensors, to evaluate at with ``_loss_gradient(..., at=...)`` or
        ``forward(..., replace=...)``. The parameters, their version counters and so any
        graph the caller built before the product stay valid.

        Under FSDP the all-gather reads the parameters' own storage, so ``shift`` sets this
        rank's local shards in place (each rank perturbs only its own) and returns None.
        On exit ``θ₀`` is restored bit for bit, also after an exception, and so are the
        shards' version counters (in-place writes bump them, and a graph the caller built
        earlier would then refuse to backpropagate); restoring them needs
        ``torch._C._autograd._unsafe_set_version_counter``, without which they stay bumped.
        """
        if not isinstance(self.parallel, Sharded):
            def shifted(V: list[Tensor], col: int, amount: float) -> list[Tensor]:
                with torch.no_grad():
                    return [p.detach() + amount * v[col] for p, v in zip(self.params, V)]

            yield shifted
            return
        local = [local_tensor(p) for p in self.params]
        versions = [t._version for t in local]
        saved = [t.detach().clone() for t in local]

        def shift(V: list[Tensor], col: int, amount: float) -> None:
            with torch.no_grad():
                for t, t0, v in zip(local, saved, V):
                    if amount == 0.0:
                        t.copy_(t0)
                    else:
                        torch.add(t0, v[col], alpha=amount, out=t)

        try:
            yield shift
        finally:
            with torch.no_grad():
                for t, t0 in zip(local, saved):
                    t.copy_(t0)
            set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
            if set_versions is not None:
                set_versions(tuple(local), tuple(versions))

    def forward(self, inputs: Any, replace: Mapping[str, Tensor] | None = None) -> Tensor:
        """Run the model on a batch's inputs and return the output tensor.

        ``replace`` maps parameter names to tensors used in their place (for
        forward-mode AD through dual tensors). The model runs on copies of its buffers:
        what the forward pass writes into them (batch norm's running statistics in train
        mode) is discarded, and the buffers and their version counters stay as they were.
        """
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
        replace = {} if replace is None else dict(replace)
        if not isinstance(self.parallel, Sharded):
            replace.update((name, buffer.clone()) for name, buffer in self.model.named_buffers())
        with _attention_with_higher_derivatives():
            if not replace:
                output = self.model(*args, **kwargs)
            else:
                output = torch.func.functional_call(self.model, replace, args, kwargs)
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
        """Yield (index, inputs, targets) with tensors moved to the model's device.

        A whole pass of a curvature operator also counts the batches and their normaliser
        on the way (from the targets, as at construction), for :meth:`_data_change_error`.
        """
        counting = only is None and hasattr(self, "_local_normaliser")
        shares: list[Any] = []
        count = 0
        for index, batch in enumerate(self.data):
            count += 1
            if only is not None and index not in only:
                continue
            inputs, target = _unpack(batch, index)
            if counting:
                shares.append(self.loss.batch_normaliser(target, inputs))
            yield index, _to_device(inputs, self.device), _to_device(target, self.device)
        if counting:
            self._pass_counts = (count, shares)

    def _zeros_like_block(self, k: int) -> list[Tensor]:
        """Zero (k, *shape) accumulators, one per parameter, as views into one (k, D) buffer.

        :meth:`_apply` returns that buffer itself when a product hands the views back
        unchanged: no concatenation into a second D-sized result, which costs a copy of D
        values per product (0.5 GB for a 124M-parameter model in float32). The peak
        memory of a product usually lies earlier, inside a batch: GPT-2's did not move.
        """
        flat, self._destination = self._destination, None  # a caller's out rows: used once
        if flat is not None and tuple(flat.shape) == (k, sum(self.param_numels)):
            flat.zero_()
        else:
            flat = torch.zeros(k, sum(self.param_numels), dtype=self.torch_dtype, device=self.device)
        return [t.view(k, *s) for t, s in zip(flat.split(self.param_numels, dim=1), self.param_shapes)]

    def _as_flat_block(self, out: list[Tensor], k: int, buffer: Tensor | None = None) -> Tensor:
        """The (k, D) block of per-parameter products: the views' buffer (``buffer``, a caller's
        rows that :meth:`_zeros_like_block` may have handed out, or the views' own base), or a
        concatenation."""
        base = buffer if buffer is not None else (out[0]._base if out else None)
        if base is not None and base.shape == (k, sum(self.param_numels)):
            root = base if base._base is None else base._base  # views know only their root
            offset, size = base.data_ptr(), base.element_size()
            for o, numel in zip(out, self.param_numels):
                if o._base is not root or o.data_ptr() != offset:
                    break
                offset += numel * size
            else:
                return base
        return torch.cat([o.reshape(k, -1) for o in out], dim=1)

    def _jvp(self, inputs: Any, tangents: list[Tensor], keep_graph: bool,
             tangent_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Output and output tangent ``J v`` of one batch by forward-mode AD.

        With ``keep_graph`` the output carries the autograd graph w.r.t. the parameters;
        with ``tangent_graph`` too the tangent (``J v`` as a function of the parameters:
        the reverse-over-forward Hessian product differentiates it). Without ``keep_graph``
        all parameters are detached (no graph is recorded) but gradients stay enabled:
        :func:`~curvops.operators._forward_ad.tangent_rules` recognises the model's own
        no-grad regions by the grad mode.
        """
        import torch.autograd.forward_ad as fwAD

        with torch.enable_grad(), fwAD.dual_level(), tangent_rules(differentiated=tangent_graph):
            duals = {} if keep_graph else self._detached_parameters()
            duals.update((n, fwAD.make_dual(p if keep_graph else p.detach(), t))
                         for n, p, t in zip(self.param_names, self.params, tangents))
            output, tangent = fwAD.unpack_dual(self.forward(inputs, replace=duals))
        if tangent is None:  # the output does not depend on the selected parameters
            tangent = torch.zeros_like(output)
        return output, (tangent if tangent_graph else tangent.detach())

    def _jvp_block(self, inputs: Any, tangents: list[Tensor]) -> Tensor:
        """``J V`` for a block of tangents (leading dimension m), shape ``(m, *output.shape)``.

        Vectorised with ``torch.func.vmap`` over the tangents, so the primal forward is
        computed once for all of them; one dual forward per tangent for a model whose
        forward pass writes into buffers (batch or instance norm in train mode updating
        running statistics), which ``vmap`` cannot batch.
        """
        if self._forward_writes_buffers():
            return torch.stack([self._jvp(inputs, [t[col] for t in tangents], keep_graph=False)[1]
                                for col in range(tangents[0].shape[0])])
        primals = {n: p.detach() for n, p in zip(self.param_names, self.params)}
        others = self._detached_parameters()

        def output_of(params: dict[str, Tensor]) -> Tensor:
            return self.forward(inputs, replace={**others, **params})

        def tangent_of(*ts: Tensor) -> Tensor:
            return torch.func.jvp(output_of, (primals,), (dict(zip(self.param_names, ts)),))[1]

        # Gradients enabled (no graph: the primals are detached) for tangent_rules' no-grad regions.
        with torch.enable_grad(), tangent_rules(shortcuts=False):
            return torch.func.vmap(tangent_of)(*tangents)

    def _detached_parameters(self) -> dict[str, Tensor]:
        """All parameters of the model, detached: a tangent pass with gradients enabled (see
        :meth:`_jvp`) then records no graph, also through parameters outside the selection."""
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def _forward_writes_buffers(self) -> bool:
        """Whether the model has a norm layer that updates running statistics in its forward pass."""
        return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
                   for m in self.model.modules())

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
        may differ in size. Tensors are moved to the model's device. The operator is the
        curvature of these data: every pass recounts the batches and (mean losses) the
        normaliser, and a product refuses with a ``ValueError`` if they changed since
        construction (build a new operator for new data). Targets must fit the output:
        built-in losses refuse shapes that torch would broadcast.
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

    Distributed models (see the docs' distributed page): with a model wrapped in
    ``DistributedDataParallel`` or sharded with FSDP2 ``fully_shard``, every rank passes
    its own batches and the operator is the curvature of the *global* objective (all
    batches of all ranks). Under DDP vectors are replicated (every rank passes the same
    vector) and each product is all-reduced once; under FSDP vectors are sharded like the
    parameters (each rank passes its local rows, see :attr:`sharding`) and every rank
    must hold the same number of batches.

    The model is evaluated as it is, in its current train/eval mode, and left as it was:
    forward passes run on copies of the buffers. A batch norm layer in train mode
    normalises each batch by its own statistics, which the curvature then treats as
    functions of the parameters (as autograd does); its running statistics are not
    updated by products. Where the model runs part of its forward pass under
    ``torch.no_grad()`` (or ``.detach()``), that part is a constant, as in a gradient.
    An ``nn.Embedding(scale_grad_by_freq=True)`` among the selected parameters is refused
    (``ValueError``): autograd rescales its gradient, which is then no derivative.
    """

    #: Step ``‖εv‖`` of the central differences; None: :meth:`finite_difference_step`'s rule.
    fd_eps: float | None = None
    #: Whether :meth:`_products` sums over this rank's batches (so a DDP product needs one
    #: all-reduce); False for operators whose products use already-global statistics.
    _sums_over_local_data: bool = True

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
        """Whole-dataset loss (scalar) and its gradient (D,) at the current parameters.

        Distributed: the global loss on every rank; the gradient replicated (DDP) or this
        rank's shard, shape ``(sharding.local_dim,)`` (FSDP).
        """
        grad = torch.zeros(self._vector_rows(), dtype=self.torch_dtype, device=self.device)
        total = torch.zeros((), dtype=self.torch_dtype, device=self.device)

        def accumulate() -> None:
            nonlocal total
            for index, inputs, target in self._batches():
                value, grads, _ = self._loss_gradient(inputs, target, self.scale)
                grad.add_(torch.cat([g.reshape(-1) for g in grads]))
                total = total + value

        self._run_local(accumulate)
        if self.parallel is not None:
            total = self.parallel.all_reduce_(total.reshape(1)).reshape(())
            if isinstance(self.parallel, Replicated):
                self.parallel.all_reduce_(grad)
        self._agree(self._data_change_error() or self._nonfinite_loss_error([total], [0], what="loss"))
        return total, grad

    def finite_difference_step(self) -> float:
        """Perturbation norm ``‖εv‖`` of the central differences (FD Hessian, ``J v`` under FSDP).

        ``fd_eps`` if the operator was given one, else ``10 · u^(1/3) · (1 + ‖θ‖/√D)``
        with ``u`` the unit roundoff of the parameters' dtype and ``‖θ‖/√D`` the RMS of
        the selected parameters. The cube root balances truncation ``T ε²`` against
        rounding ``κ u / ε``. Two measured corrections to the textbook ``u^(1/3)(1 + ‖θ‖)``:
        the scale is the parameters' typical *entry* (``‖θ‖`` grows like ``√D`` and gave
        steps ~100x too large on 10⁸-parameter LMs, with relative errors of order 1 in
        float32), and the factor 10 ≈ κ^(1/3) because a gradient summed over many terms
        has rounding errors ``κ ≈ 10³`` times larger than one roundoff (measured:
        ``benchmarks/results/fd_step_*``).
        """
        if self.fd_eps is not None:
            return float(self.fd_eps)
        unit_roundoff = float(torch.finfo(self.torch_dtype).eps) / 2
        rms = self._global_norm([local_tensor(p) for p in self.params]) / self.num_params ** 0.5
        return 10.0 * unit_roundoff ** (1 / 3) * (1.0 + rms)

    def _loss_gradient(self, inputs: Any, target: Any, scale: float,
                       at: Sequence[Tensor] | None = None,
                       regions: ConstantRegions | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
        """``scale`` times the batch's loss sum, its gradient (local pieces) and the detached output.

        Under FSDP the gradient comes from ``backward()`` and FSDP's reduce-scatter (the sum
        over the ranks' batches); elsewhere from ``torch.autograd.grad`` (this batch only).
        ``at``: values of the selected parameters to evaluate at instead of their own (one
        process; see :meth:`_shifted_parameters`). ``regions``: with ``at``, a
        :class:`~curvops.operators._forward_ad.ConstantRegions` that watches the forward pass.
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
                    grads = torch.autograd.grad(value, point, allow_unused=True, materialize_grads=True)
                else:  # the loss does not depend on the selected parameters (as autograd sees it)
                    grads = tuple(torch.zeros_like(t) for t in point)
            return value.detach(), list(grads), output.detach()
        if isinstance(self.parallel, Sharded):
            with self.parallel.summed_gradients(), _stashed_gradients(self.model):
                output = self.forward(inputs)
                value = self.loss.batch_sum(output, target) * scale
                value.backward()
                grads = [torch.zeros_like(local_tensor(p)) if p.grad is None else local_tensor(p.grad).clone()
                         for p in self.params]
            return value.detach(), grads, output.detach()
        with torch.enable_grad():
            output = self.forward(inputs)
            value = self.loss.batch_sum(output, target) * scale
            grads = torch.autograd.grad(value, self.params, allow_unused=True, materialize_grads=True)
        return value.detach(), list(grads), output.detach()

    # ----------------------------------------------------- scipy / torch dispatch
    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> "CurvatureOperator":
        return self

    def _transpose(self) -> "CurvatureOperator":
        return self

    def _parameter_shapes(self) -> list[torch.Size]:
        return list(self.param_shapes)

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

    def _column_by_column(self, V: list[Tensor], only: set[int] | None) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """:meth:`_products` of a block as one single-column product per column (losses of the first)."""
        columns = [self._products([v[col:col + 1] for v in V], only) for col in range(V[0].shape[0])]
        out = [torch.cat(parts) for parts in zip(*(c[0] for c in columns))]
        return out, columns[0][1], columns[0][2]

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for a checked (D, k) torch block."""
        return self._apply_into(X, None)

    def _apply_into(self, X: Tensor, out: Tensor | None) -> Tensor:
        """``A @ X`` for a checked (D, k) block, into ``out`` (checked (D, k); None: a new tensor)."""
        k = X.shape[1]
        replicated = isinstance(self.parallel, Replicated) and self._sums_over_local_data
        if replicated:
            self.parallel.check_same_block(X, self.device)
        Vt = X.T.contiguous()
        V = [t.view(k, *s) for t, s in zip(Vt.split(self.param_numels, dim=1), self.param_shapes)]
        # The product's accumulators are views into out's rows when those are contiguous (a
        # basis row: no (k, D) buffer to allocate, zero-fill and copy); see _zeros_like_block.
        rows = None if out is None else out.T
        offered = rows if rows is not None and rows.is_contiguous() else None
        self._destination = offered
        try:
            products, losses, loss_batches = self._run_local(lambda: self._products(V))
        finally:
            self._destination = None
        flat = self._as_flat_block(products, k, offered)
        if replicated:
            self.parallel.all_reduce_(flat)  # the (k, D) rows: contiguous, as NCCL needs (out may not be)
        if out is None:
            result = flat.T.contiguous()
        else:
            if flat is not rows:
                out.copy_(flat.T)
            result = out
        # Two agreements, in this order: a NaN loss on one rank spreads NaN into every rank's
        # (reduced) product, and the message must name the rank whose loss caused it.
        self._agree(self._data_change_error() or self._nonfinite_loss_error(losses, loss_batches, what="loss"))
        finite = all_finite(result)
        if self.parallel is not None:
            self._agree(None if finite else FloatingPointError("the curvature product is NaN or Inf"))
        elif not finite:
            self._raise_nonfinite_product(V)
        return result

    def _run_local(self, work: Callable[[], Any]) -> Any:
        """Run this rank's pass over its data so that an exception reaches every rank.

        Under DDP the pass makes no collective call and its error is agreed on; under FSDP
        the pass is collective and a failure is reported as in :meth:`Parallel.fail_out_of_step`.
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
            for index, batch in enumerate(self.data):
                inputs, target = _unpack(batch, index)
                total += float(self.loss.batch_normaliser(target, inputs))
                count += 1
        except (TypeError, ValueError) as caught:
            error = caught
        self._agree(error)
        # This process's share, which every pass over the data recounts (_data_change_error).
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

    def _data_change_error(self) -> ValueError | None:
        """An error if the last whole pass over the data found other batches than construction did.

        The normaliser of a mean loss (and the batch count) are fixed at construction: if the
        data changed since (a batch appended, targets replaced), the products would follow
        neither the old objective nor the new one. The recount is that of :meth:`_count`, the
        same numbers summed in the same order, so unchanged data compare equal exactly.
        """
        counts = self.__dict__.pop("_pass_counts", None)
        if counts is None:
            return None
        count, shares = counts
        total = 0.0
        for share in shares:
            total += float(share)
        changed_normaliser = self.loss.reduction == "mean" and total != self._local_normaliser
        if count == self.num_batches and not changed_normaliser:
            return None
        return ValueError(
            f"data changed since the operator was built: it now yields {count} batches with "
            f"{total:g} loss terms (normaliser), it had {self.num_batches} with {self._local_normaliser:g} "
            "when the operator was built (its normalisation is that of the data it was built "
            f"on); build a new {type(self).__name__} for the new data"
        )

    def _check_deterministic(self) -> None:
        if self.num_batches == 0:  # a DDP rank without data: nothing to check here, but it
            self._agree(None)      # joins the three agreements the other ranks make below
            self._agree(None)
            self._agree(None)
            return
        error: Exception | None = None
        first = _first_batch(self.data)
        if not _same(first, _first_batch(self.data)):
            error = ValueError(
                "data yields a different first batch on each iteration (a shuffling "
                "DataLoader or random augmentation?); the operator needs the same batches "
                "every pass: use shuffle=False and deterministic transforms"
            )
        self._agree(error)
        inputs, target = _to_device(first[0], self.device), _to_device(first[1], self.device)

        def evaluate_twice() -> tuple[list[Tensor], list[Tensor], Tensor]:
            values, grads = [], []
            for _ in range(2):
                value, g, output = self._loss_gradient(inputs, target, 1.0)
                values.append(value)
                grads.append(torch.cat([x.reshape(-1) for x in g]))
            return values, grads, output

        values, grads, output = self._run_local(evaluate_twice)
        try:
            self._compare_evaluations(values, grads, output, inputs, target)
        except (ValueError, FloatingPointError) as caught:
            error = caught
        self._agree(error)

    def _compare_evaluations(self, values: list[Tensor], grads: list[Tensor], output: Tensor,
                             inputs: Any, target: Any) -> None:
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
        terms = float(self.loss.batch_normaliser(target, inputs))
        if self.loss.kind != "custom" and (terms > 0 or self.loss.reduction == "sum"):
            # A batch without counted terms (all targets ignore_index, or class weights 0: a
            # padding-only batch) has the mean 0/0 in torch; there is nothing to compare.
            with torch.no_grad():
                reference = self.loss.fn(output.detach(), target)
                ours = values[0] / (terms if self.loss.reduction == "mean" else 1.0)
            if not torch.allclose(ours.to(reference.dtype), reference, rtol=tol, atol=tol * 1e-3):
                raise ValueError(
                    f"curvops does not reproduce this {type(self.loss.fn).__name__} configuration "
                    f"(got {float(ours):.6g}, the loss gives {float(reference):.6g}); "
                    "please report it, and wrap the loss in a plain function meanwhile"
                )

    def _raise_if_nonfinite_loss(self, losses: list[Tensor], batches: list[int], what: str) -> None:
        error = self._nonfinite_loss_error(losses, batches, what)
        if error is not None:
            raise error

    def _nonfinite_loss_error(self, losses: list[Tensor], batches: list[int], what: str) -> FloatingPointError | None:
        if not losses:
            return None
        finite = torch.isfinite(torch.stack([v.reshape(()) for v in losses]))
        if bool(finite.all()):
            return None
        bad = batches[int((~finite).nonzero()[0])]
        return FloatingPointError(f"the {what} of batch {bad} is NaN or Inf")

    def _raise_nonfinite_product(self, V: list[Tensor]) -> None:
        for index in range(self.num_batches):
            out, _, _ = self._products(V, only={index})
            if not all(all_finite(o) for o in out):
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
    block shares the forward pass and prepares the middle matrix once. For models without
    convolutions it also vectorises the tangents (``vmap`` of forward AD) and the backward
    passes (one ``is_grads_batched`` backward); with convolutions it loops over the columns,
    which measured faster on the CPU (see ``_batched_vjp`` and ``_tangents``).
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

    #: Block products: one ``vmap``-ed backward pass for all columns (True) or one pass per
    #: column (False). None (default): batched unless the model has convolutions. Measured on
    #: the CPU, (D, 8) GGN block vs 8 single products per vector: MLP 1.50x batched vs 1.40x
    #: looped; CNN 0.82x batched vs 0.87x looped. Unbatched with the tangent's graph kept
    #: (convolutions on the CPU), the columns are computed as single products.
    _batched_vjp: bool | None = None

    def _batched_backward(self) -> bool:
        if self._batched_vjp is not None:
            return self._batched_vjp
        return not self._has_convolutions()

    def _has_convolutions(self) -> bool:
        return any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())

    def _tangents(self, inputs: Any, V: list[Tensor]) -> list[Tensor]:
        """``J v`` of every column of ``V`` (no graph): ``vmap`` over the columns, or one dual
        forward per column for convolutional models (vmapped forward AD through convolutions is
        slower than the loop on the CPU: a CNN's (D, 8) GGN block took 0.87x the time of 8
        single products with it)."""
        k = V[0].shape[0]
        if k == 0:
            return []
        if k == 1 or self._has_convolutions():
            return [self._jvp(inputs, [v[col] for v in V], keep_graph=False)[1] for col in range(k)]
        return list(self._jvp_block(inputs, V).unbind(0))

    def _keep_graph_for_tangent(self) -> bool:
        if self._tangent_with_graph is None:
            return self.device.type == "cpu"
        return self._tangent_with_graph

    def _products(self, V, only=None):
        if isinstance(self.parallel, Sharded):
            return self._sharded_products(V, only)
        k = V[0].shape[0]
        if k > 1 and self._keep_graph_for_tangent() and not self._batched_backward():
            # Convolutional model, tangents with the graph (the CPU default): k single products
            # measured faster than sharing one kept graph among the columns (small CNN, (D, 8)
            # GGN block per vector: 1.51 vs 1.80 gradients).
            return self._column_by_column(V, only)
        out = self._zeros_like_block(k)
        losses, loss_batches = [], []
        column = [own_storage(v[0]) for v in V] if self._keep_graph_for_tangent() else None
        for index, inputs, target in self._batches(only):
            if column is not None:
                output, first = self._jvp(inputs, column, keep_graph=True)
                tangents = [first] + self._tangents(inputs, [v[1:] for v in V])
            else:
                with torch.enable_grad():
                    output = self.forward(inputs)
                tangents = self._tangents(inputs, V)
            primal = output.detach()
            context = self._middle_context(primal, target, index)
            if k > 1 and output.requires_grad and self._batched_backward():
                # One vmapped backward for all columns: larger matrix products than k passes.
                middles = torch.stack([self._middle(primal, target, jv, context) * self.scale
                                       for jv in tangents])
                grads = torch.autograd.grad(output, self.params, grad_outputs=middles,
                                            is_grads_batched=True, allow_unused=True,
                                            materialize_grads=True)
                for o, g in zip(out, grads):
                    o.add_(g)
            else:
                for col, jv in enumerate(tangents):
                    # One output-sized middle at a time (LM logits are large).
                    middle = self._middle(primal, target, jv, context) * self.scale
                    grads = self._vjp(output, middle, retain_graph=col < k - 1)
                    for o, g in zip(out, grads):
                        o[col].add_(g)
            with torch.no_grad():
                losses.append(self.loss.batch_sum(primal, target) * self.scale)
            loss_batches.append(index)
        return out, losses, loss_batches

    def _sharded_products(self, V, only):
        """Products under FSDP: ``J v`` by central differences of the output, ``Jᵀ u`` by backward.

        Forward-mode AD does not pass through FSDP's parameter all-gather, so ``J v`` is
        ``(f(θ + εv) − f(θ − εv)) / 2ε`` (two forward passes, each rank perturbing its own
        shards; step :meth:`finite_difference_step`); ``Jᵀ (M J v)``
        is a backward pass whose gradient FSDP reduce-scatters into the rank's shard.
        """
        k = V[0].shape[0]
        out = self._zeros_like_block(k)
        losses, loss_batches = [], []
        step = self.finite_difference_step()
        norms = [self._global_norm([v[col] for v in V]) for col in range(k)]
        with self._shifted_parameters() as shift:
            for index, inputs, target in self._batches(only):
                context = None
                for col in range(k):
                    if norms[col] == 0.0:
                        continue
                    eps = step / norms[col]
                    jv = None  # accumulated in place: one output-sized buffer (LM logits are large)
                    for sign in (1.0, -1.0):
                        shift(V, col, sign * eps)
                        with torch.no_grad():
                            shifted = self.forward(inputs)
                            jv = shifted.mul_(sign) if jv is None else jv.sub_(shifted)
                            del shifted
                    shift(V, col, 0.0)
                    jv.div_(2 * eps)
                    with self.parallel.summed_gradients(), _stashed_gradients(self.model):
                        with torch.enable_grad():
                            output = self.forward(inputs)
                        primal = output.detach()
                        if context is None:
                            context = self._middle_context(primal, target, index)
                        middle = self._middle(primal, target, jv, context) * self.scale
                        output.backward(middle)
                        for o, p in zip(out, self.params):
                            if p.grad is not None:
                                o[col].add_(local_tensor(p.grad))
                with torch.no_grad():
                    primal = self.forward(inputs) if context is None else primal
                    losses.append(self.loss.batch_sum(primal, target) * self.scale)
                loss_batches.append(index)
        return out, losses, loss_batches


# ==================================================================== helpers
def _is_scalar(x: Any) -> bool:
    """A number or a 0-d tensor (what ``@`` refuses and ``*``/``**`` take as a scalar)."""
    return bool(np.isscalar(x)) or (torch.is_tensor(x) and x.dim() == 0)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of the scipy interface: the parameters' own, float32 for bfloat16."""
    return np.dtype(np.float32) if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (the results handed back to numpy)."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


@contextlib.contextmanager
def _stashed_gradients(model: nn.Module) -> Iterator[None]:
    """Run a ``backward()`` without touching the user's ``.grad``: stash them, restore after."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


@contextlib.contextmanager
def _attention_with_higher_derivatives() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel, and off the MHA fast path.

    The fused attention kernels have neither a double backward nor forward-mode AD;
    the math kernel is made of differentiable primitives, so Hessian and GGN products
    work through ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.
    Without autograd (the no-graph tangent forwards) ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` in eval mode take a fused "fast path" that has no
    forward-mode AD either; it is switched off for the duration.
    """
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - old torch
            yield
            return
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


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


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share any memory (byte ranges on the same storage)."""
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
        return start, start + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
