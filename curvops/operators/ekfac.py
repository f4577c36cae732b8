"""Eigenvalue-corrected KFAC (George et al. 2018).

EKFAC keeps KFAC's eigenbasis ``Q_G ⊗ Q_A`` per block and replaces the eigenvalues
``λ_i μ_j`` by the second moments of the per-sample gradients projected onto that basis:

    S[i, j] = c Σ_n Σ_k ( Q_Gᵀ (Σ_r g_{n,r,k} a_{n,r}ᵀ) Q_A )[i, j]²,

``n`` the samples, ``r`` the weight-sharing positions of the layer (one without weight
sharing; the per-sample gradient sums over them), ``k`` the output-space vectors of the
chosen ``fisher_type`` and ``c`` the objective's scale — the same quantities as KFAC's
factors. The block is ``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ``.

What ``S`` is: for vectors ``γ_m`` with ``Σ_m γ_m γ_mᵀ = B``, ``Σ_m ((Q_G ⊗ Q_A)ᵀ γ_m)² =
diag((Q_G ⊗ Q_A)ᵀ B (Q_G ⊗ Q_A))``, so EKFAC's eigenvalues are the diagonal of the curvature
block ``B`` in the Kronecker eigenbasis, exactly when the per-sample gradients factorise
``B``:

- ``"type-2"``: ``B`` the GGN block. The columns ``s_k`` factorise each *loss row*'s Hessian
  (:meth:`LossSpec.hessian_sqrt_columns`), so the per-sample gradients factorise the GGN
  only if every sample has one loss row. With several (outputs ``(N, T, C)``, maps
  ``(N, C, H, W)``) the per-sample gradient of column ``k`` sums the rows' columns, and its
  square adds products between different rows of one sample that the GGN does not have
  (George et al.'s per-sample gradient is that of one column of the Hessian square root,
  which for a sequence has ``T·C`` columns per sample: ``T`` times KFAC's backward
  passes). Such outputs are refused.
- ``"mc"``: ``B`` the Monte-Carlo Fisher. Draws of different loss rows are independent and
  have mean zero, so the cross-row products vanish in expectation: given the eigenbasis,
  ``E[S] = diag((Q_G ⊗ Q_A)ᵀ GGN (Q_G ⊗ Q_A))`` for any number of rows per sample.
- ``"empirical"``: ``B`` the empirical Fisher of
  :class:`~curvops.operators.fisher.FisherOperator`, whose terms are the samples (MSE,
  BCE, custom losses: exact) or, for cross-entropy, the positions: cross-entropy with
  several positions per sample is refused like type-2.

The samples are the first dimension of every layer's output, which must be that of the
model output (a model that folds positions into the batch before a layer would make one
layer "sample" a part of a loss row; refused).

Per-sample gradients (``out × in`` each) are not formed where avoidable: without weight
sharing ``S = (ĝ∘ĝ)ᵀ (â∘â)`` from the projected rows ``ĝ = g Q_G``, ``â = a Q_A``; with
weight sharing ``R`` the cheaper in memory of the Gramian contraction
(``N R² (out + in)`` numbers) and the projected per-sample gradients (``N out in``),
in chunks of samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvops._finite import all_finite
from curvops.operators._loss import LossSpec
from curvops.operators.kfac import (
    _CHUNK_ELEMENTS,
    KroneckerEigen,
    KroneckerInverseOperator,
    _check_damping,
    _KroneckerOperator,
    _Layer,
)


class EKFACOperator(_KroneckerOperator):
    """Eigenvalue-corrected KFAC as a linear operator (D, D).

    Same parameters, layout, block structure and supported layers/losses as
    :class:`~curvops.operators.kfac.KFACOperator`; ``kfac_approx`` only affects the
    eigenbasis (KFAC's factors). Two passes over the data at construction: the Kronecker
    factors, then the corrected eigenvalues: the diagonal of the exact curvature block in
    KFAC's eigenbasis (module docstring), exactly for ``"type-2"`` and ``"empirical"``, in
    expectation for ``"mc"``.

    Raises
    ------
    ValueError
        Besides KFAC's: ``fisher_type="type-2"`` with several loss rows per sample
        (outputs ``(N, T, C)``, ``(N, C, H, W)``, ...), and ``"empirical"`` with
        cross-entropy over several positions per sample, whose exact corrected eigenvalues
        would need a backward pass per row (use ``fisher_type="mc"`` or
        :class:`~curvops.operators.kfac.KFACOperator`); a layer whose first dimension is
        not the model output's sample dimension.

    Attributes
    ----------
    blocks : list of KroneckerBlock
        KFAC's factors, whose eigenbases EKFAC uses.
    corrected_eigenvalues : list of Tensor
        Per block ``S`` of shape (out, q), in the eigenbasis of :meth:`eigendecomposition`.
    """

    def _check_output(self, output: Tensor, outputs: dict[str, Tensor], index: int) -> None:
        # Refuse, before any statistics are summed, the outputs whose per-sample gradients do
        # not factorise the block of fisher_type (see the module docstring).
        samples = _output_samples(self.loss, output)
        for name, z in outputs.items():
            layer_samples = _layer_samples(z, self._layer_by_name(name).module)
            if layer_samples != samples:
                raise ValueError(
                    f"EKFACOperator: layer {name!r} sees {layer_samples} samples in batch {index} where the model "
                    f"output (shape {tuple(output.shape)}) has {samples}: the corrected eigenvalues need per-sample "
                    "gradients, with every layer's first dimension indexing the output's samples (a reshape "
                    "that folds positions into the batch dimension mixes them). Use KFACOperator, or keep the "
                    "batch dimension first through the model"
                )
        rows = _loss_rows(self.loss, output) // max(samples, 1)
        if rows > 1 and self.fisher_type == "type-2":
            raise ValueError(
                f"EKFACOperator(fisher_type='type-2') with {rows} loss rows per sample (model output of batch "
                f"{index}: shape {tuple(output.shape)}) is not supported: the exact corrected eigenvalues need "
                f"the gradient of every row's Hessian square-root columns separately, {rows} times KFAC's "
                "backward passes, and summing the rows first would add cross-row products (silently wrong). "
                "Use fisher_type='mc' (an unbiased estimate of the same eigenvalues), KFACOperator, or give "
                "each sample one loss row (fold the positions into the batch dimension of the data if the "
                "model treats them independently)"
            )
        if rows > 1 and self.fisher_type == "empirical" and self.loss.kind == "cross_entropy":
            raise ValueError(
                f"EKFACOperator(fisher_type='empirical') with cross-entropy over {rows} positions per sample "
                f"(model output of batch {index}: shape {tuple(output.shape)}) is not supported: the empirical "
                "Fisher's terms are the positions (as in FisherOperator(kind='empirical')), whose gradients "
                f"would each need a backward pass ({rows} times KFAC's), and summing them per sample would add "
                "cross-position products (silently wrong). Use fisher_type='mc', "
                "KFACOperator(fisher_type='empirical'), or one position per sample"
            )
        super()._check_output(output, outputs, index)

    def _layer_by_name(self, name: str) -> _Layer:
        return next(layer for layer in self._layers if layer.name == name)

    def _after_factors(self) -> None:
        self._eigen: list[KroneckerEigen] = []
        for b in self.blocks:
            lg, qg = torch.linalg.eigh(b.G)
            la, qa = torch.linalg.eigh(b.A)
            self._eigen.append(KroneckerEigen(b.name, b.param_names, lg, qg, la, qa))
        self.corrected_eigenvalues: list[Tensor] = self._correct_eigenvalues()
        self._forms = [(e.G_eigenvectors, e.A_eigenvectors, s) for e, s in zip(self._eigen, self.corrected_eigenvalues)]

    def _correct_eigenvalues(self) -> list[Tensor]:
        """Second pass over the data: ``S`` of every block (see the module docstring)."""
        by_layer: dict[str, list[int]] = {}
        for i, b in enumerate(self.blocks):
            by_layer.setdefault(b.name, []).append(i)
        layers = {layer.name: layer for layer in self._layers}
        sums = [torch.zeros(b.G.shape[0], b.A.shape[0], dtype=self.torch_dtype, device=self.device) for b in self.blocks]

        def on_input(layer: _Layer, x: Tensor) -> list[Tensor | None]:
            # Projected per-sample input rows â (N, R, q) per block, formed inside the hook
            # (later in-place operations cannot change them); None for a bias-only block.
            rows = self._input_rows(layer, x) if layer.weight is not None else None
            projected = []
            for i in by_layer[layer.name]:
                block = self.blocks[i]
                if block.weight is None:
                    projected.append(None)
                    continue
                a = rows
                if block.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                projected.append(a @ self._eigen[i].A_eigenvectors)
            return projected

        for index, inputs, target in self._batches():
            output, projected, outputs = self._record_forward(inputs, on_input)
            for column in self._columns(output.detach(), target, index):
                for name, g in self._layer_grads(output, outputs, column).items():
                    if g is None:
                        continue
                    rows = self._grad_rows(layers[name], g)
                    for i, a_hat in zip(by_layer[name], projected[name]):
                        g_hat = rows @ self._eigen[i].G_eigenvectors
                        sums[i] += _projected_second_moment(g_hat, a_hat)
            del output, outputs
            for i, s in enumerate(sums):
                if not all_finite(s):
                    raise FloatingPointError(
                        f"the corrected eigenvalues of layer {self.blocks[i].name!r} are NaN or Inf on batch {index}")
        self._sum_over_ranks(sums)
        return [s * self.scale for s in sums]

    def _products(self, V, only=None):
        def apply(i: int, M: Tensor) -> Tensor:
            QG, QA, S = self._forms[i]
            return QG @ ((QG.T @ M @ QA) * S) @ QA.T
        return self._blockwise(V, apply), [], []

    def _eigen_form(self):
        return self._forms

    # ------------------------------------------------------------ closed forms
    def eigendecomposition(self) -> list[KroneckerEigen]:
        """Eigendecompositions of KFAC's factors (EKFAC's eigenbasis; the KFAC eigenvalues)."""
        return list(self._eigen)

    def trace(self) -> Tensor:
        """``Σ S`` over all blocks (0-d tensor)."""
        return sum(s.sum() for s in self.corrected_eigenvalues)

    def frobenius_norm(self) -> Tensor:
        """``sqrt(Σ S²)`` (0-d tensor)."""
        return torch.sqrt(sum(s.square().sum() for s in self.corrected_eigenvalues))

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``Σ log(S + δ)`` (0-d tensor; ``-inf`` if singular and ``δ = 0``)."""
        delta = _check_damping(damping, allow_zero=True)
        return sum(torch.log(s + delta).sum() for s in self.corrected_eigenvalues)

    def diagonal(self) -> Tensor:
        """Diagonal (D,) in the operator's layout: ``(Q_G∘Q_G) S (Q_A∘Q_A)ᵀ`` per block."""
        return self._eigen_diagonal()

    def eigenvalues(self) -> Tensor:
        """All D eigenvalues (the entries of every ``S``), ascending (D,)."""
        return torch.sort(torch.cat([s.reshape(-1) for s in self.corrected_eigenvalues])).values

    def inverse(self, damping: float, *, method: str = "exact") -> KroneckerInverseOperator:
        """``(EKFAC + δ I)⁻¹ = (Q_G ⊗ Q_A) diag(1 / (S + δ)) (Q_G ⊗ Q_A)ᵀ`` as a linear operator.

        Only ``method="exact"``: EKFAC is no Kronecker product, so factor-wise damping
        does not apply. ``δ ≥ 0`` (``0`` only if no ``S`` entry is 0).
        """
        return super().inverse(damping, method=method)

    def __repr__(self) -> str:
        return (f"EKFACOperator(D={self.shape[0]}, blocks={len(self.blocks)}, fisher_type={self.fisher_type!r}, "
                f"kfac_approx={self.kfac_approx!r}, loss={self.loss.kind}/{self.loss.reduction}, "
                f"dtype={self.torch_dtype}, device={self.device})")


def _output_samples(loss: LossSpec, output: Tensor) -> int:
    """Number of samples of a model output: its first dimension (an unbatched output is one)."""
    unbatched = output.dim() == 0 or (output.dim() == 1 and loss.kind == "cross_entropy" and loss.flat is None)
    return 1 if unbatched else int(output.shape[0])


def _loss_rows(loss: LossSpec, output: Tensor) -> int:
    """Number of loss rows of a model output (the blocks of :meth:`LossSpec.hessian_sqrt_columns`)."""
    if loss.flat is not None:
        return int(loss.fn.flat_output(output.detach()).shape[0])
    if loss.kind == "cross_entropy":
        return 1 if output.dim() <= 1 else math.prod(output.shape) // int(output.shape[1])
    if output.dim() <= 1:
        return max(output.numel(), 1)
    return math.prod(output.shape[:-1])


def _layer_samples(z: Tensor, module: torch.nn.Module) -> int:
    """Number of samples of a layer output, as :meth:`_KroneckerOperator._grad_rows` splits it."""
    unbatched = z.dim() == 3 if isinstance(module, torch.nn.Conv2d) else z.dim() <= 1
    return 1 if unbatched else int(z.shape[0])


def _projected_second_moment(g_hat: Tensor, a_hat: Tensor | None) -> Tensor:
    """``Σ_n (Σ_r g_hat[n, r] a_hat[n, r]ᵀ)²`` elementwise, shape (p, q).

    ``g_hat`` (N, R, p), ``a_hat`` (N, R, q) or None (bias alone: ``a = 1``, ``Q_A = [±1]``).
    """
    if a_hat is None:
        return g_hat.sum(1).square().sum(0).unsqueeze(1)
    N, R, p = g_hat.shape
    q = a_hat.shape[-1]
    if R == 1:
        return g_hat[:, 0].square().T @ a_hat[:, 0].square()
    total = g_hat.new_zeros(p, q)
    if R * R * (p + q) < p * q:
        # Gramian contraction: Σ_n Σ_{r,r'} (ĝ_r ĝ_r')_i (â_r â_r')_j, N R² (p + q) numbers.
        step = max(1, _CHUNK_ELEMENTS // (R * R * (p + q)))
        for start in range(0, N, step):
            g = g_hat[start:start + step]
            a = a_hat[start:start + step]
            gram_g = (g.unsqueeze(2) * g.unsqueeze(1)).reshape(-1, p)
            gram_a = (a.unsqueeze(2) * a.unsqueeze(1)).reshape(-1, q)
            total += gram_g.T @ gram_a
    else:
        # Projected per-sample gradients, N p q numbers, chunked over samples.
        step = max(1, _CHUNK_ELEMENTS // (p * q))
        for start in range(0, N, step):
            per_sample = g_hat[start:start + step].transpose(1, 2) @ a_hat[start:start + step]
            total += per_sample.square().sum(0)
    return total
