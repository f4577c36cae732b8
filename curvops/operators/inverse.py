"""Inverse-curvature products ``(A + δI)⁻¹ B`` as a linear operator, and operator tags.

``inverse`` wraps any symmetric operator — a curvops operator (Hessian, GGN, Fisher,
KFAC, ...), an object with ``matmat_torch``/``shape``/``device``/``torch_dtype``, a dense
torch tensor, a numpy array or a scipy ``LinearOperator`` — into an
[`InverseOperator`][curvops.InverseOperator], itself a scipy ``LinearOperator`` that also multiplies torch
tensors on the operator's device. Each product is a solve (``curvops.algorithms.solve``)
whose report is kept in ``InverseOperator.last_info``.

Tags: ``is_symmetric`` and ``is_positive_semidefinite`` say what an operator is
known to be. CG and the Neumann series need a positive semi-definite ``A``; they refuse
an operator not tagged so. [`tag`][curvops.tag] / [`assume_psd`][curvops.assume_psd] (or ``inverse(...,
assume_psd=True)``) assert a tag for an operator the library cannot know about.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from curvops.algorithms.solve import SOLVERS, SolveInfo, SolverWarning
from curvops.algorithms.vectors import Operand, as_operand
from curvops.operators.base import MAX_DENSE_DIM, TorchLinearOperator

if TYPE_CHECKING:
    from curvops.algorithms._torch_backend import TorchOperand

METHODS: tuple[str, ...] = ("cg", "minres", "lsmr", "neumann", "eigh", "cholesky")
_PSD_METHODS = ("cg", "neumann", "cholesky")

__all__ = ["InverseOperator", "TaggedOperator", "SolveInfo", "SolverWarning", "assume_psd", "inverse", "tag"]


# ================================================================ adaptation and tags
def _adapt(A: Any) -> tuple[Operand, Any]:
    """Operand of ``A`` and the object its tags are read from."""
    if isinstance(A, TaggedOperator):
        return A._operand, A
    return as_operand(A), A


def _torch_matmul(operand: Operand) -> Any:
    """``X -> A X`` on torch blocks: native for the torch backend, through the host otherwise."""
    if operand.backend == "torch":
        return operand.matmat

    def matmul(X: Tensor) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(operand.matmat(X.detach().cpu().numpy()))).to(X)

    return matmul


def _torch_dtype_device(operand: Operand) -> tuple[torch.dtype, torch.device]:
    if operand.backend == "torch":
        # The torch backend's operands are TorchOperand (or its distributed subclasses).
        return operand.dtype, cast("TorchOperand", operand).device
    return (torch.float32 if operand.dtype == np.float32 else torch.float64), torch.device("cpu")


def _dense_is_symmetric(A: Any) -> bool | None:
    """Symmetry of a dense matrix to rounding (None if ``A`` is not dense)."""
    if isinstance(A, Tensor):
        M = A.detach()
    elif isinstance(A, np.ndarray):
        M = torch.from_numpy(np.asarray(A, dtype=np.float64))
    else:
        return None
    eps = float(torch.finfo(M.dtype).eps) if M.dtype.is_floating_point else 0.0
    scale = float(M.abs().max()) if M.numel() else 0.0
    return bool((M - M.T).abs().max() <= 100 * eps * max(scale, 1e-300)) if M.numel() else True


def _tags(A: Any) -> tuple[bool, bool]:
    """(symmetric, positive semi-definite) known for ``A``."""
    symmetric = bool(getattr(A, "is_symmetric", False))
    psd = bool(getattr(A, "is_positive_semidefinite", False))
    if not symmetric:
        symmetric = bool(_dense_is_symmetric(A))
    return symmetric, psd and symmetric


class TaggedOperator(TorchLinearOperator):
    """An operator with tags asserted by the user; products are the wrapped operator's.

    Parameters
    ----------
    A : operator
        Curvops / torch-native operator, dense torch tensor, numpy array or scipy
        ``LinearOperator``, square (D, D).
    symmetric : bool, optional
        Assert symmetry (default: keep ``A``'s own tag; True if dense and symmetric).
    positive_semidefinite : bool, optional
        Assert positive semi-definiteness (implies ``symmetric``; default: ``A``'s tag).
    """

    #: The wrapped operator (never itself a TaggedOperator).
    operator: Any

    def __init__(
        self, A: Any, *, symmetric: bool | None = None, positive_semidefinite: bool | None = None
    ) -> None:
        inner = A.operator if isinstance(A, TaggedOperator) else A
        if getattr(inner, "sharding", None) is not None:
            raise NotImplementedError(
                "inverse() of an FSDP-sharded operator is not supported (DDP operators work)"
            )
        self._operand, _ = _adapt(A)
        own_symmetric, own_psd = _tags(A)
        if positive_semidefinite and symmetric is False:
            raise ValueError("a positive semi-definite operator is symmetric: symmetric=False contradicts it")
        self.operator = inner
        self._symmetric = own_symmetric if symmetric is None else bool(symmetric)
        self._psd = own_psd if positive_semidefinite is None else bool(positive_semidefinite)
        if self._psd:
            self._symmetric = True
        self._matmul = _torch_matmul(self._operand)
        dtype, device = _torch_dtype_device(self._operand)
        super().__init__((self._operand.dim, self._operand.dim), dtype, device)

    @property
    def is_symmetric(self) -> bool:  # type: ignore[override]
        """Whether the operator is (asserted to be) symmetric."""
        return self._symmetric

    @property
    def is_positive_semidefinite(self) -> bool:
        """Whether the operator is (asserted to be) positive semi-definite."""
        return self._psd

    def _apply(self, X: Tensor) -> Tensor:
        return self._matmul(X)

    def _adjoint(self) -> TorchLinearOperator:
        if not self._symmetric:
            raise NotImplementedError("the adjoint of a non-symmetric tagged operator is not available")
        return self

    _transpose = _adjoint

    def __repr__(self) -> str:
        return (
            f"TaggedOperator({type(self.operator).__name__}, D={self.shape[0]}, "
            f"symmetric={self._symmetric}, positive_semidefinite={self._psd})"
        )


def tag(
    A: Any, *, symmetric: bool | None = None, positive_semidefinite: bool | None = None
) -> TaggedOperator:
    """Wrap ``A`` with asserted tags (see ``TaggedOperator``). The assertion is not checked.

    Parameters
    ----------
    A : operator
        A square operator: a curvops operator, a torch tensor, a numpy array or a scipy
        ``LinearOperator``.
    symmetric : bool, optional
        Assert that ``A`` is symmetric (``is_symmetric``); None (default) keeps what ``A``
        says of itself.
    positive_semidefinite : bool, optional
        Assert that ``A`` is positive semi-definite (``is_positive_semidefinite``); None
        (default) keeps what ``A`` says of itself.

    Returns
    -------
    TaggedOperator
        ``A`` with the tags, multiplying as ``A`` does; accepted wherever ``A`` is.
    """
    return TaggedOperator(A, symmetric=symmetric, positive_semidefinite=positive_semidefinite)


def assume_psd(A: Any) -> TaggedOperator:
    """Assert that ``A`` is symmetric positive semi-definite (unchecked), e.g. to allow CG on it.

    Parameters
    ----------
    A : operator
        A square operator: a curvops operator, a torch tensor, a numpy array or a scipy
        ``LinearOperator``.

    Returns
    -------
    TaggedOperator
        ``A`` tagged symmetric and positive semi-definite, multiplying as ``A`` does.
    """
    return TaggedOperator(A, symmetric=True, positive_semidefinite=True)


# ================================================================ the inverse
class InverseOperator(TorchLinearOperator):
    """``(A + δI)⁻¹`` as a linear operator; every product is a solve.

    Build it with [`inverse`][curvops.inverse]. Multiplies numpy arrays (scipy semantics) and torch
    tensors on ``A``'s device (``inv @ b``, ``inv.matmat_torch(B)``); a block (D, k) is
    solved as k independent recurrences advanced together, one block product of ``A``
    per iteration. [`solve`][curvops.InverseOperator.solve] also returns the report; ``last_info`` keeps the
    report of the latest product.

    Tags: symmetric (``A`` must be); positive semi-definite when ``A`` is known (or
    asserted) to be — then ``(A + δI)⁻¹`` is positive definite for ``δ > 0``. The tags
    describe the exact inverse; a Krylov solve to tolerance ``rtol`` is a slightly
    non-linear approximation of it (the Krylov space depends on the right-hand side).

    Attributes
    ----------
    operator : Any
        The operator ``A`` as given.
    damping : float
        δ.
    method : str
        ``"cg"``, ``"minres"``, ``"lsmr"``, ``"neumann"``, ``"eigh"`` or ``"cholesky"``.
    last_info : SolveInfo or None
        Report of the latest solve.
    num_solves : int
        Products (solves) so far; ``total_matvecs`` the products of ``A`` they used.

    Parameters
    ----------
    A : operator
        Symmetric (D, D) operator, as for [`inverse`][curvops.inverse].
    damping : float
        δ >= 0.
    method : str
        ``"cg"``, ``"minres"``, ``"lsmr"``, ``"neumann"``, ``"eigh"`` or ``"cholesky"``
        (what each does: [`inverse`][curvops.inverse]).
    rtol, atol : float
        Stop at ``‖b − (A + δI) x‖ ≤ rtol·‖b‖ + atol`` per column.
    maxiter : int or None
        Iterations per column; None for ``min(10·D, 1000)``.
    preconditioner : operator, callable or None
        ``M ≈ (A + δI)⁻¹``, symmetric positive definite; cg, minres, lsmr only.
    assume_psd : bool
        Assert that ``A`` is positive semi-definite (unchecked).
    scale : float or None
        Neumann ``α``; None for ``1/λ_max(A + δI)`` estimated by Lanczos.
    warn : bool
        Warn ([`SolverWarning`][curvops.SolverWarning]) when a solve misses its tolerance.
    max_dim : int
        Largest D that ``"eigh"`` and ``"cholesky"`` materialise.
    """

    def __init__(
        self,
        A: Any,
        damping: float,
        method: str,
        *,
        rtol: float,
        atol: float,
        maxiter: int | None,
        preconditioner: Any,
        assume_psd: bool,
        scale: float | None,
        warn: bool,
        max_dim: int,
        _eigh: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number, got {damping!r}")
        if damping < 0:
            raise ValueError(
                f"damping must be >= 0, got {damping!r}: negative damping shifts the "
                "spectrum towards (or past) zero and can make A + δI singular or indefinite"
            )
        self.operator = A.operator if isinstance(A, TaggedOperator) else A
        self._given = A  # with its tags, for with_damping() and the Neumann scale
        self._operand, tag_source = _adapt(A)
        symmetric, psd = _tags(tag_source)
        if assume_psd:
            symmetric = psd = True
        if not symmetric:
            raise ValueError(
                f"{type(self.operator).__name__} is not known to be symmetric; the solvers here need a "
                "symmetric operator. If it is, wrap it: curvops.operators.inverse.tag(A, symmetric=True)"
            )
        if method in _PSD_METHODS and not psd:
            hint = (
                " The Hessian is indefinite in general: use method='minres' (or 'lsmr') with damping instead."
                if "Hessian" in type(self.operator).__name__
                else " Use method='minres' or 'lsmr' for indefinite operators."
            )
            raise ValueError(
                f"method={method!r} needs a positive semi-definite operator, and "
                f"{type(self.operator).__name__} is not known to be one.{hint} If you know A is positive "
                "semi-definite, pass assume_psd=True (or wrap it with assume_psd(A))."
            )
        if preconditioner is not None and method not in ("cg", "minres", "lsmr"):
            raise ValueError(f"a preconditioner is supported by cg, minres and lsmr, not {method!r}")
        if scale is not None and method != "neumann":
            raise ValueError("scale is a parameter of method='neumann' only")
        self.damping = float(damping)
        self.method = method
        self.rtol, self.atol, self.maxiter = rtol, atol, maxiter
        self.warn = warn
        self.max_dim = max_dim
        self._psd = psd
        self._matmul_A = _torch_matmul(self._operand)
        dtype, device = _torch_dtype_device(self._operand)
        dim = self._operand.dim
        super().__init__((dim, dim), dtype, device)
        self.preconditioner = preconditioner
        self._precondition = None if preconditioner is None else self._adapt_preconditioner(preconditioner)
        self.scale = scale
        self._eigh = _eigh
        self._cholesky: tuple[Tensor, Tensor] | None = None
        self.last_info: SolveInfo | None = None
        self.num_solves = 0
        self.total_matvecs = 0

    # ------------------------------------------------------------ tags
    #: Inverses of symmetric operators are symmetric.
    is_symmetric: bool = True

    @property
    def is_positive_semidefinite(self) -> bool:
        """True when ``A`` is known or asserted PSD (then ``(A + δI)⁻¹`` is positive definite)."""
        return self._psd

    # ------------------------------------------------------------ products
    def solve(self, B: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        """Solve ``(A + δI) X = B`` for a torch vector (D,) or block (D, k).

        Parameters
        ----------
        B : Tensor
            Right-hand side(s) on the operator's device and dtype.
        x0 : Tensor, optional
            Initial guess of ``B``'s shape (Krylov methods and Neumann; ignored by eigh and cholesky).

        Returns
        -------
        X : Tensor
            Same shape as ``B``.
        info : SolveInfo
            Iterations and true final residual per column.
        """
        B = self._check_torch(B)
        if x0 is not None:
            x0 = self._check_torch(x0)
        X, info = self._solve(B, x0)
        return X, info

    def with_damping(self, damping: float) -> InverseOperator:
        """The same inverse for another δ; ``eigh`` reuses the eigendecomposition.

        Parameters
        ----------
        damping : float
            The new δ >= 0.

        Returns
        -------
        InverseOperator
            ``(A + δI)⁻¹`` with this operator's method and settings.
        """
        return InverseOperator(
            self._given,
            damping,
            self.method,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            preconditioner=self.preconditioner,
            assume_psd=self._psd,
            scale=None,
            warn=self.warn,
            max_dim=self.max_dim,
            _eigh=self._eigh,
        )

    def _apply(self, X: Tensor) -> Tensor:
        return self._solve(X, None)[0]

    def _solve(self, B: Tensor, x0: Tensor | None) -> tuple[Tensor, SolveInfo]:
        if self.method in ("eigh", "cholesky"):
            # Direct solves act on (D, k) blocks; a vector is a block of one column.
            solve_block = self._solve_eigh if self.method == "eigh" else self._solve_cholesky
            X, info = solve_block(B.unsqueeze(1) if B.dim() == 1 else B)
            if B.dim() == 1:
                X = X.squeeze(1)
        else:
            kwargs: dict[str, Any] = {
                "rtol": self.rtol,
                "atol": self.atol,
                "maxiter": self.maxiter,
                "x0": x0,
                "warn": self.warn,
            }
            if self.method == "neumann":
                kwargs["scale"] = self._neumann_scale()
            else:
                kwargs["preconditioner"] = self._precondition
            X, info = SOLVERS[self.method](self._damped_matmul, B, **kwargs)
        self.last_info = info
        self.num_solves += 1
        self.total_matvecs += info.num_matvecs
        return X, info

    def _damped_matmul(self, X: Tensor) -> Tensor:
        AX = self._matmul_A(X)
        return AX if self.damping == 0 else AX.add(X, alpha=self.damping)

    def _adapt_preconditioner(self, P: Any) -> Any:
        dim = self.shape[0]
        if hasattr(P, "matmat_torch") or isinstance(P, (Tensor, np.ndarray)) or hasattr(P, "matmat"):
            shape = tuple(getattr(P, "shape", ()))
            if shape != (dim, dim):
                raise ValueError(f"the preconditioner must have shape ({dim}, {dim}), got {shape}")
            return _torch_matmul(as_operand(P))
        if callable(P):
            return P
        raise TypeError(
            "preconditioner must be an operator (matmat_torch, a tensor, an array, a scipy "
            f"LinearOperator) or a callable on torch blocks, got {type(P).__name__}"
        )

    def _neumann_scale(self) -> float:
        if self.scale is None:
            # α = 1/λ_max(A + δI): the series converges iff every eigenvalue of α(A + δI) is
            # in (0, 2). A Lanczos Ritz value is a lower bound on λ_max, accurate to ~1e-3 here,
            # far inside the factor-2 margin.
            from curvops.algorithms.eigen import lanczos

            top = lanczos(self._given, k=1, which="LA", tol=1e-3, seed=0)
            lam = float(top.eigenvalues[0]) + self.damping
            if not lam > 0:
                raise ValueError(f"λ_max(A + δI) = {lam:.3g} <= 0: the Neumann series cannot converge")
            self.scale = 1.0 / lam
        return float(self.scale)

    # ------------------------------------------------------------ eigh
    def _dense(self) -> Tensor:
        """``A`` materialised (D <= ``max_dim``), symmetric to rounding; for eigh and cholesky."""
        dim = self.shape[0]
        if dim > self.max_dim:
            raise ValueError(
                f"method={self.method!r} materialises the {dim}x{dim} matrix; that exceeds "
                f"max_dim={self.max_dim}. Use a Krylov method, or pass a larger max_dim."
            )
        if isinstance(self.operator, TorchLinearOperator):
            M = self.operator.to_dense(max_dim=self.max_dim)
        elif isinstance(self.operator, Tensor):
            M = self.operator.detach().to(self.torch_dtype)
        else:
            eye = torch.eye(dim, dtype=self.torch_dtype, device=self.device)
            M = torch.cat([self._matmul_A(eye[:, i : i + 256]) for i in range(0, dim, 256)], dim=1)
        return 0.5 * (M + M.T)  # the factorisations read one triangle only

    def _decomposition(self) -> tuple[Tensor, Tensor]:
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self._dense())
        return self._eigh

    def _cholesky_factor(self) -> tuple[Tensor, Tensor]:
        """``(A + δI, L)`` with ``L Lᵀ = A + δI``, computed once per operator."""
        if self._cholesky is None:
            M = self._dense()
            M.diagonal().add_(self.damping)
            factor, info = torch.linalg.cholesky_ex(M)
            if int(info) != 0:
                raise ValueError(
                    f"A + δI is not positive definite to working precision (Cholesky failed at "
                    f"pivot {int(info)}): A is not positive semi-definite, or δ = {self.damping:g} is "
                    "too small for its rounding; increase the damping or use method='eigh'"
                )
            self._cholesky = (M, factor)
        return self._cholesky

    def _solve_cholesky(self, B: Tensor) -> tuple[Tensor, SolveInfo]:
        """Solve for a (D, k) block with the cached factor."""
        M, factor = self._cholesky_factor()
        X = torch.cholesky_solve(B, factor)
        return X, _direct_info("cholesky", B, B - M @ X)

    def _solve_eigh(self, B: Tensor) -> tuple[Tensor, SolveInfo]:
        evals, evecs = self._decomposition()
        shifted = evals + self.damping
        eps = float(torch.finfo(evals.dtype).eps)
        floor = self.shape[0] * eps * float(evals.abs().max())
        if bool((shifted.abs() <= floor).any()):
            raise ValueError(
                f"A + δI is singular to working precision (an eigenvalue + δ = "
                f"{float(shifted[shifted.abs().argmin()]):.3g}, below {floor:.3g}); "
                "increase the damping"
            )
        X = evecs @ ((evecs.T @ B) / shifted[:, None])
        return X, _direct_info("eigh", B, B - (evecs @ (shifted[:, None] * (evecs.T @ X))))

    def _adjoint(self) -> InverseOperator:
        return self

    _transpose = _adjoint

    def __repr__(self) -> str:
        return (
            f"InverseOperator(({type(self.operator).__name__} + {self.damping:g} I)^-1, "
            f"method={self.method!r}, D={self.shape[0]}, rtol={self.rtol:g}, "
            f"preconditioned={self.preconditioner is not None})"
        )


def _direct_info(method: str, B: Tensor, R: Tensor) -> SolveInfo:
    """Report of a direct (factorisation) solve of the (D, k) block ``B`` with residual ``R``."""
    rnorm = torch.linalg.vector_norm(R, dim=0).double().cpu().numpy()
    bnorm = torch.linalg.vector_norm(B, dim=0).double().cpu().numpy()
    k = B.shape[1]
    rel = np.where(bnorm > 0, rnorm / np.where(bnorm > 0, bnorm, 1.0), 0.0)
    return SolveInfo(
        method=method,
        iterations=np.zeros(k, dtype=np.int64),
        residual_norms=rnorm,
        relative_residuals=rel,
        converged=np.ones(k, dtype=bool),
        num_matvecs=0,
        rounds=0,
        rtol=0.0,
        atol=0.0,
    )


def inverse(
    A: Any,
    damping: float = 0.0,
    method: str = "cg",
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Any = None,
    assume_psd: bool = False,
    scale: float | None = None,
    warn: bool = True,
    max_dim: int = MAX_DENSE_DIM,
) -> InverseOperator:
    """An operator for ``(A + δI)⁻¹``.

    Parameters
    ----------
    A : operator
        Symmetric (D, D): a curvops operator, any object with ``matmat_torch``, ``shape``,
        ``device`` and ``torch_dtype``, a dense torch tensor, a numpy array or a scipy
        ``LinearOperator`` (the last two solve in torch on the CPU).
    damping : float, optional
        δ >= 0 (default 0).
    method : {"cg", "minres", "lsmr", "neumann", "eigh", "cholesky"}, optional
        ``"cg"`` (default): conjugate gradients, for positive semi-definite ``A`` (GGN,
        Fisher, KFAC, or ``assume_psd=True``) — refused otherwise. ``"minres"``: symmetric
        indefinite ``A`` (the Hessian), fewest products there. ``"lsmr"``: least squares
        via bidiagonalisation, two products per iteration; robust for singular systems.
        ``"neumann"``: truncated Neumann series (PSD ``A``; slow, ~κ terms). ``"eigh"``:
        materialise ``A`` once (D <= ``max_dim``), eigendecompose, exact to rounding; the
        decomposition is reused by [`InverseOperator.with_damping`][curvops.InverseOperator.with_damping].
        ``"cholesky"``: materialise ``A`` (D <= ``max_dim``) and factor ``A + δI = L Lᵀ`` once; for positive
        semi-definite ``A`` only (refused otherwise), about 3x cheaper than eigh to set up;
        a ``ValueError`` says so if ``A + δI`` is not positive definite in working precision.
    rtol, atol : float, optional
        Stop at ``‖b − (A + δI) x‖ ≤ rtol·‖b‖ + atol`` per column (defaults 1e-6, 0).
    maxiter : int, optional
        Iterations per column (default ``min(10·D, 1000)``).
    preconditioner : operator or callable, optional
        ``M ≈ (A + δI)⁻¹``, symmetric positive definite, e.g.
        ``KFACOperator(model, loss_fn, data).inverse(damping=δ)``; cg, minres, lsmr only.
    assume_psd : bool, optional
        Assert that ``A`` is positive semi-definite (unchecked; default False).
    scale : float, optional
        Neumann ``α`` (default ``1/λ_max(A + δI)`` estimated by Lanczos).
    warn : bool, optional
        Warn ([`SolverWarning`][curvops.SolverWarning]) when a solve misses its tolerance (default True).
    max_dim : int, optional
        Largest D that ``"eigh"`` and ``"cholesky"`` materialise (default 10,000).

    Returns
    -------
    InverseOperator
    """
    return InverseOperator(
        A,
        damping,
        method,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        assume_psd=assume_psd,
        scale=scale,
        warn=warn,
        max_dim=max_dim,
    )
