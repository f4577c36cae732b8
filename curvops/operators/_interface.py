"""The scipy/torch interface of every operator: ``TorchLinearOperator``.

A ``scipy.sparse.linalg.LinearOperator`` that also multiplies torch tensors on its
device without a host copy: numpy/torch dispatch, the checks of the vectors it is given,
``out=`` destinations, and the operator algebra (``+``, ``*``, ``@``, ``**``) whose
results live in ``curvops.operators.algebra``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from curvops._finite import all_finite
from curvops.operators._parallel import Parallel, ShardLayout

#: Largest dimension ``TorchLinearOperator.to_dense`` builds without ``max_dim``.
MAX_DENSE_DIM = 10_000


class TorchLinearOperator(LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` that also multiplies torch tensors.

    numpy input follows scipy's semantics (host arrays in and out); torch input stays on
    the operator's device and dtype (``op @ tensor``, ``op.matvec``, ``op.matmat``,
    [`matmat_torch`][curvops.CurvatureOperator.matmat_torch]). Subclasses implement ``_apply`` on a checked
    torch block of shape ``(shape[1], k)``. An empty block ``(shape[1], 0)`` gives an empty
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
        """
        Parameters
        ----------
        shape : (int, int)
            ``(rows, columns)`` of the operator.
        torch_dtype : torch.dtype
            dtype of the torch vectors it multiplies (numpy: ``_numpy_dtype`` of it).
        device : torch.device
            Where products run.
        """
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
            raise ValueError(
                f"matmat_torch expects a block of shape ({self._vector_rows()}, k), got {tuple(X.shape)}"
            )
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
            raise TypeError(
                f"out must have dtype {self.torch_dtype} on {self.device}, got {out.dtype} on {out.device}"
            )
        if _overlap(out, X):
            raise ValueError("out must not overlap the input block")

    def _apply_into(self, X: Tensor, out: Tensor) -> Tensor:
        """``A @ X`` written into ``out``; operators that can accumulate there override this."""
        out.copy_(self._apply(X))
        return out

    def to_dense(self, max_dim: int = MAX_DENSE_DIM) -> Tensor:
        """The full matrix as a torch tensor on the operator's device.

        Parameters
        ----------
        max_dim : int, optional
            Largest dimension built (default ``MAX_DENSE_DIM``).

        Returns
        -------
        Tensor
            ``shape`` matrix, the operator's dtype and device (built from products with
            blocks of 64 unit vectors).

        Raises
        ------
        ValueError
            If a dimension exceeds ``max_dim`` (default ``MAX_DENSE_DIM`` = 10,000).
        """
        rows, dim = self.shape
        if self.sharding is not None:
            raise NotImplementedError(
                "to_dense() of an FSDP-sharded operator would gather a full matrix on every rank"
            )
        if max(rows, dim) > max_dim:
            raise ValueError(
                f"to_dense() would build a {rows}x{dim} matrix; that exceeds max_dim={max_dim}. "
                "Pass a larger max_dim if you really have the memory."
            )
        eye = torch.eye(dim, dtype=self.torch_dtype, device=self.device)
        cols = [self._apply(eye[:, i : i + 64]) for i in range(0, dim, 64)]
        return torch.cat(cols, dim=1)

    # ----------------------------------------------------- scipy / torch dispatch
    def dot(self, x: Any) -> Any:
        """``A @ x``: torch tensors stay torch on the device; everything else as scipy.

        ``x`` may also be a list of tensors shaped like the selected parameters (``[*p.shape]``
        each, or ``[*p.shape, k]`` for k vectors) for operators whose input and output are
        parameter-space vectors: the result is such a list (as in curvlinops). A curvops
        operator gives the product operator, a real scalar the scaled operator
        (``curvops.operators.algebra``, torch path kept); a plain scipy
        ``LinearOperator`` gives scipy's product (numpy only).

        Parameters
        ----------
        x : Tensor, ndarray, list of Tensor, LinearOperator or scalar
            ``(shape[1],)`` or ``(shape[1], k)`` vectors, parameter-shaped tensors, an
            operator or a real scalar.

        Returns
        -------
        Tensor, ndarray, list of Tensor or LinearOperator
            The product, of the kind described above.
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

    def __truediv__(self, x: Any) -> TorchLinearOperator:
        from curvops.operators.algebra import _real_scalar, _ScaledOperator

        alpha = _real_scalar(x)
        if alpha is None:
            raise ValueError("Can only divide a linear operator by a scalar.")
        if alpha == 0:
            raise ZeroDivisionError("cannot divide an operator by zero")
        return _ScaledOperator(self, 1.0 / alpha)

    def __neg__(self) -> TorchLinearOperator:
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
            given = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in tensors]
            raise ValueError(
                f"expected a list of {len(shapes)} tensors shaped like the parameters "
                f"{[tuple(s) for s in shapes]} (or with a trailing dimension k), got {given}; "
                "op.flatten / op.unflatten convert between such lists and flat vectors"
            )
        first, shape = tensors[0], tuple(shapes[0])
        k = (
            None
            if tuple(first.shape) == shape
            else (first.shape[-1] if tuple(first.shape[:-1]) == shape else -1)
        )
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
        """Matrix-vector product; accepts numpy arrays (scipy semantics) or torch tensors.

        Parameters
        ----------
        x : Tensor or ndarray
            ``(shape[1],)`` vector (numpy: also ``(shape[1], 1)``, as scipy allows).

        Returns
        -------
        Tensor or ndarray
            ``A x``, ``(shape[0],)``; torch input stays on the operator's device.
        """
        if torch.is_tensor(x):
            x = self._check_torch(x)
            if x.dim() != 1:
                raise ValueError(
                    f"matvec expects a vector of shape ({self._vector_rows()},), got {tuple(x.shape)}"
                )
            return self._apply(x.unsqueeze(1)).squeeze(1)
        self._reject_host_arrays()
        return super().matvec(x)

    def matmat(self, X: Any) -> Any:
        """Matrix-matrix product; accepts numpy arrays (scipy semantics) or torch tensors.

        Parameters
        ----------
        X : Tensor or ndarray
            ``(shape[1], k)`` block.

        Returns
        -------
        Tensor or ndarray
            ``A X``, ``(shape[0], k)``; torch input stays on the operator's device.
        """
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
            error = ValueError(
                f"expected a tensor on device {self.device} (the parameters'), got one on device {x.device}"
            )
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
        raise too (see ``Parallel.agree``).
        """
        if self.parallel is not None:
            self.parallel.agree(error, self.device, doing)
        elif error is not None:
            raise error


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
