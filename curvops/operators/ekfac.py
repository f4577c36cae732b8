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
  (``LossSpec.hessian_sqrt_columns``), so the per-sample gradients factorise the GGN
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
  [`FisherOperator`][curvops.FisherOperator], whose terms are the samples (MSE,
  BCE, custom losses: exact) or, for cross-entropy, the positions: cross-entropy with
  several positions per sample is refused like type-2.

The samples are the first dimension of every layer's output, which must be that of the
model output (a model that folds positions into the batch before a layer would make one
layer "sample" a part of a loss row; refused).

The eigenvalues are collected by ``EKFACComputer``
in a second pass over the data; products and closed forms use the eigen-form blocks of a
``KroneckerOperator``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from curvops.operators.kfac import _KroneckerCurvature
from curvops.operators.kfac_factors import EKFACComputer, KFACComputer
from curvops.operators.kronecker import (
    BlockForm,
    KroneckerEigen,
    KroneckerEigenForm,
    KroneckerInverseOperator,
)


class EKFACOperator(_KroneckerCurvature):
    """Eigenvalue-corrected KFAC as a linear operator (D, D).

    Same parameters, layout, block structure and supported layers/losses as
    [`KFACOperator`][curvops.KFACOperator]; ``kfac_approx`` only affects the
    eigenbasis (KFAC's factors). Two passes over the data at construction
    (``EKFACComputer``): the Kronecker factors, then
    the corrected eigenvalues: the diagonal of the exact curvature block in KFAC's
    eigenbasis (module docstring), exactly for ``"type-2"`` and ``"empirical"``, in
    expectation for ``"mc"``.

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its forward takes a batch's ``inputs`` (a tensor, or a dict of
        tensors passed as keyword arguments) and returns a tensor or an object with a
        ``logits`` attribute (Hugging Face ``ModelOutput``). It is evaluated as it is, in
        its current train/eval mode, and left as it was. A model wrapped in
        ``DistributedDataParallel`` gives the global data set's factors and eigenvalues;
        an FSDP-sharded model is refused. Every supported layer's output must have the
        samples as its first dimension, like the model output.
    loss_fn : callable
        ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (mean or sum); a
        custom callable ``(output, target) -> scalar`` only with ``fisher_type="empirical"``.
    data : iterable of (inputs, targets)
        Re-iterable batches (a list, or a ``DataLoader`` without shuffling), read twice at
        construction only; batches may differ in size.
    params : None, str, list of str, or list of parameters, optional
        Parameters the operator acts on (default: every parameter that requires grad; glob
        patterns on names allowed); each the weight or bias of an ``nn.Linear`` or
        ``nn.Conv2d`` (see ``unsupported``).
    fisher_type : {"type-2", "mc", "empirical"}, optional
        The curvature whose diagonal in the eigenbasis ``S`` is (default ``"type-2"``: the
        GGN; ``"mc"``: the Monte-Carlo Fisher; ``"empirical"``: the empirical Fisher).
    mc_samples : int, optional
        Label draws per loss term for ``"mc"`` (default 1).
    kfac_approx : {"expand", "reduce"}, optional
        Treatment of weight-sharing dimensions in KFAC's factors (default ``"expand"``).
    separate_weight_and_bias : bool, optional
        If True, weight and bias of a layer get separate blocks. Default False.
    unsupported : {"raise", "exclude"}, optional
        Unsupported selected parameters raise (default) or are left out (``"exclude"``,
        listed in ``op.excluded_params``).
    seed : int or None, optional
        Seed of the label draws for ``"mc"`` (default 0; None: fresh, stored in ``seed``).
    check_deterministic : bool, optional
        If True (default), check once on the first batch that two evaluations of the
        loss and gradient agree, that ``data`` yields the same first batch twice and that
        every selected parameter's gradient is that of its layer.

    Raises
    ------
    ValueError
        Besides KFAC's: ``fisher_type="type-2"`` with several loss rows per sample
        (outputs ``(N, T, C)``, ``(N, C, H, W)``, ...), and ``"empirical"`` with
        cross-entropy over several positions per sample, whose exact corrected eigenvalues
        would need a backward pass per row (use ``fisher_type="mc"`` or
        [`KFACOperator`][curvops.KFACOperator]); a layer whose first dimension is
        not the model output's sample dimension.
    NotImplementedError
        For an FSDP-sharded model.
    FloatingPointError
        If the model output, a factor or a corrected eigenvalue is NaN or Inf.

    Attributes
    ----------
    blocks : list of KroneckerBlock
        KFAC's factors, whose eigenbases EKFAC uses.
    corrected_eigenvalues : list of Tensor
        Per block ``S`` of shape (out, q), in the eigenbasis of
        [`eigendecomposition`][curvops.EKFACOperator.eigendecomposition].
    """

    _computer_class = EKFACComputer

    def _block_forms(self, computer: KFACComputer) -> list[BlockForm]:
        self._eigen: list[KroneckerEigen] = []
        for b in self.blocks:
            lg, qg = torch.linalg.eigh(b.G)
            la, qa = torch.linalg.eigh(b.A)
            self._eigen.append(KroneckerEigen(b.name, b.param_names, lg, qg, la, qa))
        self.corrected_eigenvalues: list[Tensor] = cast(EKFACComputer, computer).corrected_eigenvalues(
            self.blocks, [e.G_eigenvectors for e in self._eigen], [e.A_eigenvectors for e in self._eigen]
        )
        return [
            KroneckerEigenForm(e.G_eigenvectors, e.A_eigenvectors, s)
            for e, s in zip(self._eigen, self.corrected_eigenvalues)
        ]

    def eigendecomposition(self) -> list[KroneckerEigen]:
        """Eigendecompositions of KFAC's factors: EKFAC's eigenbasis, with the KFAC eigenvalues.

        Returns
        -------
        list of KroneckerEigen
            One per block, in the order of ``blocks``.
        """
        return list(self._eigen)

    def inverse(self, damping: float, *, method: str = "exact") -> KroneckerInverseOperator:
        """``(EKFAC + δ I)⁻¹ = (Q_G ⊗ Q_A) diag(1 / (S + δ)) (Q_G ⊗ Q_A)ᵀ`` as a linear operator.

        Parameters
        ----------
        damping : float
            ``δ ≥ 0`` (``0`` only if no ``S`` entry is 0).
        method : {"exact"}, optional
            Only exact damping: EKFAC is no Kronecker product, so factor-wise damping does
            not apply.

        Returns
        -------
        KroneckerInverseOperator
            Symmetric positive definite (D, D), in this operator's layout.

        Raises
        ------
        ValueError
            Another method; ``δ`` negative or not finite; ``δ = 0`` with a zero eigenvalue.
        TypeError
            If ``δ`` is not a real number.
        """
        return self._kronecker.inverse(damping, method=method)
