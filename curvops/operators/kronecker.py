"""Block-diagonal operators with Kronecker-structured blocks: KFAC's and EKFAC's products and inverses.

A ``KroneckerOperator`` is a symmetric ``(D, D)`` operator in a model's parameter
layout (``named_parameters()`` order, each parameter flattened row-major) that is block
diagonal over groups of parameters: a layer's weight ``W`` (out, in), its bias ``b`` (out,),
or both. Block ``i`` acts on the matrix ``M = [V_W | v_b]`` (out × q, ``q = in``, ``in + 1``
or ``1``) of its parameters' entries in one of two forms:

- ``KroneckerFactors`` ``G ⊗ A``: ``M ↦ G M A`` (Martens & Grosse 2015, eq. 1 and the
  identity ``(G ⊗ A) vec_row(M) = vec_row(G M Aᵀ)``, ``A`` symmetric);
- ``KroneckerEigenForm`` ``(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ``:
  ``M ↦ Q_G ((Q_Gᵀ M Q_A) ∘ D) Q_Aᵀ`` (George et al. 2018, EKFAC; also every exact
  damped inverse of a Kronecker product, through the factors' eigenbases).

The closed forms (trace, Frobenius norm, diagonal, eigenvalues, log-determinant, damped
inverse) are sums over the blocks and never form the dense matrix. The factors are
collected from data by ``curvops.operators.kfac_factors``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from curvops._finite import all_finite
from curvops.operators.base import TorchLinearOperator

#: Damping schemes of ``KroneckerOperator.inverse``; the factor-wise ones need factor blocks.
INVERSE_METHODS = ("exact", "pi", "plain")


@dataclass
class KroneckerBlock:
    """The Kronecker factors ``G ⊗ A`` of one diagonal block of a KFAC operator.

    Attributes
    ----------
    name : str
        Name of the layer (module) the block belongs to.
    param_names : tuple of str
        Parameters the block covers: ``(weight,)``, ``(bias,)`` or ``(weight, bias)``.
    weight, bias : int or None
        Positions of those parameters in the operator's ``params``.
    G : Tensor
        Output-gradient factor, (out, out), scaled by the objective's ``c``.
    A : Tensor
        Input factor, (q, q): ``q = in`` (weight), ``in + 1`` (weight and bias, the bias
        last), or ``1`` (bias alone, ``A = [[1]]``).
    """

    name: str
    param_names: tuple[str, ...]
    weight: int | None
    bias: int | None
    G: Tensor
    A: Tensor


class KroneckerEigen(NamedTuple):
    """Eigendecompositions ``G = Q_G diag(λ) Q_Gᵀ`` and ``A = Q_A diag(μ) Q_Aᵀ`` of one block.

    Attributes
    ----------
    name : str
        Name of the layer the block belongs to.
    param_names : tuple of str
        Parameters the block covers.
    G_eigenvalues : Tensor
        ``λ``, (out,), ascending.
    G_eigenvectors : Tensor
        ``Q_G``, (out, out), orthonormal columns.
    A_eigenvalues : Tensor
        ``μ``, (q,), ascending.
    A_eigenvectors : Tensor
        ``Q_A``, (q, q), orthonormal columns.
    """

    name: str
    param_names: tuple[str, ...]
    G_eigenvalues: Tensor
    G_eigenvectors: Tensor
    A_eigenvalues: Tensor
    A_eigenvectors: Tensor


# ============================================================== block forms
@dataclass
class KroneckerFactors:
    """A block ``G ⊗ A`` with symmetric positive semi-definite factors.

    Attributes
    ----------
    G : Tensor
        Outer factor, (p, p).
    A : Tensor
        Inner factor, (q, q).
    """

    G: Tensor
    A: Tensor
    _eigen: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def apply(self, M: Tensor) -> Tensor:
        """``G M A`` for ``M`` of shape (p, q) or a stack (k, p, q)."""
        return self.G @ M @ self.A

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(λ, Q_G, μ, Q_A)`` from ``torch.linalg.eigh`` of both factors, computed once."""
        if self._eigen is None:
            lg, qg = torch.linalg.eigh(self.G)
            la, qa = torch.linalg.eigh(self.A)
            self._eigen = (lg, qg, la, qa)
        return self._eigen

    def eigen_form(self) -> KroneckerEigenForm:
        """The same block as ``(Q_G ⊗ Q_A) diag(vec(λ μᵀ)) (Q_G ⊗ Q_A)ᵀ``.

        The factors are PSD: negative eigenvalues are rounding and are clamped to 0.
        """
        lg, qg, la, qa = self.eigh()
        return KroneckerEigenForm(qg, qa, torch.outer(lg.clamp_min(0), la.clamp_min(0)))

    def diagonal(self) -> Tensor:
        """The block's diagonal as a (p, q) matrix: ``diag(G)[o] · diag(A)[i]``."""
        return torch.outer(torch.diagonal(self.G), torch.diagonal(self.A))

    def trace(self) -> Tensor:
        """``tr(G) tr(A)`` (0-d tensor)."""
        return torch.trace(self.G) * torch.trace(self.A)

    def squared_frobenius_norm(self) -> Tensor:
        """``‖G‖_F² ‖A‖_F²`` (0-d tensor)."""
        return self.G.square().sum() * self.A.square().sum()


@dataclass
class KroneckerEigenForm:
    """A block ``(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ``.

    Attributes
    ----------
    QG : Tensor
        Orthogonal (p, p).
    QA : Tensor
        Orthogonal (q, q).
    D : Tensor
        The block's eigenvalues as a (p, q) matrix, entry ``[i, j]`` belonging to the
        eigenvector ``QG[:, i] ⊗ QA[:, j]``.
    """

    QG: Tensor
    QA: Tensor
    D: Tensor

    def apply(self, M: Tensor) -> Tensor:
        """``Q_G ((Q_Gᵀ M Q_A) ∘ D) Q_Aᵀ`` for ``M`` of shape (p, q) or a stack (k, p, q)."""
        return self.QG @ ((self.QG.T @ M @ self.QA) * self.D) @ self.QA.T

    def eigen_form(self) -> KroneckerEigenForm:
        """The block itself."""
        return self

    def diagonal(self) -> Tensor:
        """The block's diagonal as a (p, q) matrix: ``(Q_G∘Q_G) D (Q_A∘Q_A)ᵀ``."""
        return self.QG.square() @ self.D @ self.QA.square().T

    def trace(self) -> Tensor:
        """``Σ D`` (0-d tensor)."""
        return self.D.sum()

    def squared_frobenius_norm(self) -> Tensor:
        """``Σ D²`` (0-d tensor)."""
        return self.D.square().sum()


BlockForm = KroneckerFactors | KroneckerEigenForm


# ============================================================== operator
class KroneckerOperator(TorchLinearOperator):
    """A symmetric block-diagonal operator (D, D) with Kronecker-structured blocks.

    Multiplies numpy arrays (scipy semantics) and torch tensors on its device; the
    dispatch and input checks come from ``TorchLinearOperator``.
    Parameter-shaped lists of tensors are accepted too (``op @ [t_1, t_2, ...]``).

    Parameters
    ----------
    param_names : sequence of str
        Names of the parameters, in the vectors' order.
    param_shapes : sequence of torch.Size
        Their shapes; a vector is the parameters flattened row-major and concatenated,
        ``D = Σ numel``.
    positions : sequence of (int or None, int or None)
        Per block, the positions of its weight and bias in ``param_names`` (one may be
        None). A weight of shape (out, ...) is the (out, in) matrix of its row-major
        entries; a bias must have ``out`` entries. Every parameter belongs to exactly one
        block.
    forms : sequence of KroneckerFactors or KroneckerEigenForm
        Per block its form, on the matrix ``[W | b]`` (out × q). Every form must be
        positive semi-definite (PSD factors, ``D ≥ 0``).
    torch_dtype : torch.dtype
        dtype of the forms and of the vectors the operator multiplies.
    device : torch.device
        Where the forms live and products run.
    label : str, optional
        Name used in messages and in the ``repr`` of inverses (default ``"KroneckerOperator"``;
        KFAC passes its own class name).

    Raises
    ------
    FloatingPointError
        From a product whose result is NaN or Inf (an overflow of the forms: the input
        vector is checked to be finite).
    """

    is_symmetric = True
    #: Message of the FloatingPointError raised by a non-finite product.
    _overflow_message = "the Kronecker-factored product overflowed (NaN or Inf)"

    def __init__(
        self,
        param_names: Sequence[str],
        param_shapes: Sequence[torch.Size],
        positions: Sequence[tuple[int | None, int | None]],
        forms: Sequence[BlockForm],
        torch_dtype: torch.dtype,
        device: torch.device,
        label: str = "KroneckerOperator",
    ) -> None:
        self.param_names = list(param_names)
        self.param_shapes = [torch.Size(s) for s in param_shapes]
        self.param_numels = [int(math.prod(s)) for s in self.param_shapes]
        dim = sum(self.param_numels)
        super().__init__((dim, dim), torch_dtype, device)
        if len(positions) != len(forms):
            raise ValueError(f"got {len(positions)} block positions and {len(forms)} block forms")
        self.forms: list[BlockForm] = list(forms)
        self.positions: list[tuple[int | None, int | None]] = [(w, b) for w, b in positions]
        self.label = label
        offsets = np.cumsum([0] + self.param_numels).tolist()
        # Per block: (weight slice or None, bias slice or None, out, in) in a vector's entries.
        self._slices: list[tuple[slice | None, slice | None, int, int]] = []
        covered: list[int] = []
        for weight, bias in self.positions:
            anchor = weight if weight is not None else bias
            if anchor is None:
                raise ValueError("a block needs a weight or a bias position")
            out = self.param_shapes[anchor][0] if self.param_shapes[anchor] else 1
            w = None if weight is None else slice(offsets[weight], offsets[weight + 1])
            b = None if bias is None else slice(offsets[bias], offsets[bias + 1])
            if bias is not None and self.param_numels[bias] != out:
                raise ValueError(
                    f"bias {self.param_names[bias]!r} has {self.param_numels[bias]} entries, "
                    f"its weight {out} rows"
                )
            self._slices.append((w, b, out, 0 if weight is None else self.param_numels[weight] // out))
            covered += [i for i in (weight, bias) if i is not None]
        if sorted(covered) != list(range(len(self.param_shapes))):
            raise ValueError("every parameter must belong to exactly one block")

    @property
    def is_positive_semidefinite(self) -> bool:
        """True: every block is a Kronecker product or eigen-form with PSD factors."""
        return True

    # ------------------------------------------------------------ products
    def _apply(self, X: Tensor) -> Tensor:
        return self._apply_into(X, torch.empty_like(X))

    def _apply_into(self, X: Tensor, out: Tensor) -> Tensor:
        """``K X`` for a checked (D, k) block, written into ``out`` (D, k).

        The products go straight into ``out``'s rows when those are contiguous (a row of
        a Lanczos basis, or a single vector); otherwise into a (k, D) buffer copied once.
        """
        rows = out.T
        target = rows if rows.is_contiguous() else torch.empty(rows.shape, dtype=out.dtype, device=out.device)
        self._multiply_rows(X.T, target)
        if not all_finite(target):
            raise FloatingPointError(self._overflow_message)
        if target is not rows:
            out.copy_(target.T)
        return out

    def _multiply_rows(self, rows: Tensor, target: Tensor) -> None:
        """Block by block, ``target[:, block] = form(rows[:, block])`` for (k, D) rows."""
        k = rows.shape[0]
        for form, (w, b, out, inner) in zip(self.forms, self._slices):
            M = self._block_matrix(rows, w, b, out)
            # One vector: plain 2-D matrix products (no batched-GEMM dispatch).
            R = form.apply(M[0] if k == 1 else M)
            self._write_block(target, R.reshape(k, out, -1), w, b, out, inner)

    @staticmethod
    def _block_matrix(rows: Tensor, w: slice | None, b: slice | None, out: int) -> Tensor:
        """The (k, out, q) matrices ``[V_W | v_b]`` of one block."""
        k = rows.shape[0]
        parts = []
        if w is not None:
            parts.append(rows[:, w].reshape(k, out, -1))
        if b is not None:
            parts.append(rows[:, b].reshape(k, out, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    @staticmethod
    def _write_block(
        target: Tensor, R: Tensor, w: slice | None, b: slice | None, out: int, inner: int
    ) -> None:
        """Write a block's (k, out, q) result into the contiguous (k, D) ``target``."""
        k = target.shape[0]
        if w is not None:
            target[:, w].view(k, out, inner).copy_(R[:, :, :inner])
        if b is not None:
            target[:, b].copy_(R[:, :, -1])

    # symmetric: scipy's adjoint and transpose are the operator itself
    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> KroneckerOperator:
        return self

    def _transpose(self) -> KroneckerOperator:
        return self

    def _parameter_shapes(self) -> list[torch.Size]:
        return list(self.param_shapes)

    # ------------------------------------------------------------ closed forms
    def _blockwise_vector(self, matrices: Sequence[Tensor]) -> Tensor:
        """A (D,) vector assembled from one (out, q) matrix per block."""
        flat = torch.empty(1, self.shape[0], dtype=self.torch_dtype, device=self.device)
        for M, (w, b, out, inner) in zip(matrices, self._slices):
            self._write_block(flat, M.view(1, out, -1), w, b, out, inner)
        return flat[0]

    def eigen_forms(self) -> list[KroneckerEigenForm]:
        """Every block as ``(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ`` (factor blocks decomposed once).

        Returns
        -------
        list of KroneckerEigenForm
            One per block, in block order.
        """
        return [form.eigen_form() for form in self.forms]

    def trace(self) -> Tensor:
        """The trace: ``Σ_blocks tr(G) tr(A)`` (factor blocks), ``Σ D`` (eigen-form blocks).

        Returns
        -------
        Tensor
            0-d, the operator's dtype and device.
        """
        return sum(form.trace() for form in self.forms)  # type: ignore[return-value]

    def frobenius_norm(self) -> Tensor:
        """``sqrt(Σ_blocks ‖G‖_F² ‖A‖_F²)`` (factor blocks), ``sqrt(Σ D²)`` (eigen-form blocks).

        Returns
        -------
        Tensor
            0-d, the operator's dtype and device.
        """
        return torch.sqrt(sum(form.squared_frobenius_norm() for form in self.forms))  # type: ignore[arg-type]

    def diagonal(self) -> Tensor:
        """The diagonal in the operator's layout.

        Returns
        -------
        Tensor
            (D,): per block ``diag(G)[o] · diag(A)[i]`` or ``(Q_G∘Q_G) D (Q_A∘Q_A)ᵀ``.
        """
        return self._blockwise_vector([form.diagonal() for form in self.forms])

    def eigenvalues(self) -> Tensor:
        """All D eigenvalues, ascending: the entries of every block's ``D`` (``λ_i μ_j`` for factors).

        Returns
        -------
        Tensor
            (D,), ascending.
        """
        return torch.sort(torch.cat([form.D.reshape(-1) for form in self.eigen_forms()])).values

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + δ I) = Σ_blocks Σ_ij log(D_ij + δ)``.

        Parameters
        ----------
        damping : float, optional
            ``δ ≥ 0`` (default 0).

        Returns
        -------
        Tensor
            0-d; ``-inf`` if ``K + δ I`` is singular.

        Raises
        ------
        ValueError
            If ``δ`` is negative or not finite.
        TypeError
            If ``δ`` is not a real number.
        """
        delta = check_damping(damping, allow_zero=True)
        return sum(torch.log(form.D + delta).sum() for form in self.eigen_forms())  # type: ignore[return-value]

    def inverse(self, damping: float, *, method: str = "exact") -> KroneckerInverseOperator:
        """The damped inverse as a linear operator (numpy and torch), block by block.

        Parameters
        ----------
        damping : float
            ``δ``. ``method="exact"`` needs ``δ ≥ 0`` (``δ = 0`` only if the operator is
            non-singular); the factor-wise methods need ``δ > 0``.
        method : {"exact", "pi", "plain"}, optional
            - ``"exact"`` (default): ``(K + δ I)⁻¹``, per block
              ``(Q_G ⊗ Q_A) diag(1 / (D + δ)) (Q_G ⊗ Q_A)ᵀ``.
            - ``"pi"`` (factor blocks only): factor-wise damping with Martens & Grosse's
              (2015, sec. 6.3) π correction, ``(G + (√δ/π) I)⁻¹ ⊗ (A + π√δ I)⁻¹``,
              ``π² = (tr A / dim A) / (tr G / dim G)`` (π = 1 if either trace is 0). Not
              ``(K + δI)⁻¹``: a cheaper heuristic.
            - ``"plain"`` (factor blocks only): ``(G + √δ I)⁻¹ ⊗ (A + √δ I)⁻¹``.

        Returns
        -------
        KroneckerInverseOperator
            Symmetric positive definite, in the same layout.

        Raises
        ------
        ValueError
            Unknown method (or a factor-wise one on eigen-form blocks); ``δ`` negative or
            not finite; ``δ = 0`` where not allowed, or with a singular operator.
        TypeError
            If ``δ`` is not a real number.
        """
        factor_blocks = all(isinstance(form, KroneckerFactors) for form in self.forms)
        if not factor_blocks and method != "exact":
            raise ValueError(f"{self.label}.inverse supports method='exact' only, got {method!r}")
        if method not in INVERSE_METHODS:
            raise ValueError(f"method must be one of {INVERSE_METHODS}, got {method!r}")
        if method == "exact":
            delta = check_damping(damping, allow_zero=True)
            forms = []
            for form in self.eigen_forms():
                denominator = form.D.clamp_min(0) + delta
                if not bool((denominator > 0).all()):
                    raise ValueError("the operator is singular: pass damping > 0")
                forms.append(KroneckerEigenForm(form.QG, form.QA, 1.0 / denominator))
        else:
            delta = check_damping(damping, allow_zero=False)
            forms = [_factorwise_inverse(form, delta, method) for form in self.forms]  # type: ignore[arg-type]
        return KroneckerInverseOperator(self, forms, description=f"{method}, damping={delta:g}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.shape[0]}, blocks={len(self.forms)}, "
            f"dtype={self.torch_dtype}, device={self.device})"
        )


class KroneckerInverseOperator(KroneckerOperator):
    """The damped inverse of a Kronecker-structured operator, in eigen form block by block.

    Per block ``(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ`` with ``D = 1 / (eigenvalues + δ)``
    (or the factor-wise damped ones).

    Returned by ``inverse()`` of [`KFACOperator`][curvops.KFACOperator],
    [`EKFACOperator`][curvops.EKFACOperator] and ``KroneckerOperator``: a
    symmetric positive definite scipy ``LinearOperator`` (D, D) in the parent's layout
    that multiplies numpy arrays and torch tensors.

    Parameters
    ----------
    parent : KroneckerOperator
        The operator it inverts (its layout, dtype, device and label are taken).
    forms : list of KroneckerEigenForm
        One per block of ``parent``.
    description : str
        How it was damped, shown in the ``repr``.
    """

    _overflow_message = "the inverse product overflowed (NaN or Inf)"

    def __init__(
        self, parent: KroneckerOperator, forms: Sequence[KroneckerEigenForm], description: str
    ) -> None:
        super().__init__(
            parent.param_names,
            parent.param_shapes,
            parent.positions,
            forms,
            parent.torch_dtype,
            parent.device,
            label=parent.label,
        )
        self._description = description

    def __repr__(self) -> str:
        return f"KroneckerInverseOperator(D={self.shape[0]}, of={self.label}, {self._description})"


# ============================================================== helpers
def _factorwise_inverse(form: KroneckerFactors, delta: float, method: str) -> KroneckerEigenForm:
    """``(G + (√δ/π) I)⁻¹ ⊗ (A + π√δ I)⁻¹`` in eigen form; π = 1 for ``"plain"``."""
    lg, qg, la, qa = form.eigh()
    pi = 1.0
    if method == "pi":
        tr_a = float(torch.trace(form.A)) / form.A.shape[0]
        tr_g = float(torch.trace(form.G)) / form.G.shape[0]
        pi = math.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0
    root = math.sqrt(delta)
    return KroneckerEigenForm(
        qg, qa, 1.0 / torch.outer(lg.clamp_min(0) + root / pi, la.clamp_min(0) + root * pi)
    )


def check_damping(damping: float, *, allow_zero: bool) -> float:
    """Validate a damping ``δ`` and return it as a float.

    Parameters
    ----------
    damping : float or 0-d / one-element tensor
        The value to check.
    allow_zero : bool
        Whether ``δ = 0`` is allowed.

    Returns
    -------
    float
        ``δ``.

    Raises
    ------
    TypeError
        If it is not a real number (a bool is not).
    ValueError
        If it is not finite, negative, or 0 where not allowed.
    """
    is_number = isinstance(damping, (int, float)) and not isinstance(damping, bool)
    if not is_number and not (torch.is_tensor(damping) and damping.numel() == 1):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    value = float(damping)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"damping must be finite and {need}, got {value}")
    return value
