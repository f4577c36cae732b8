"""Kronecker-factored approximate curvature (KFAC) of the GGN / Fisher.

KFAC (Martens & Grosse 2015; convolutions: Grosse & Martens 2016; weight sharing,
"expand" and "reduce": Eschenhagen et al. 2023; conventions follow the tutorial of
Dangel et al. 2025, arXiv:2507.05127) approximates the curvature by a block-diagonal
matrix with one Kronecker-factored block per layer.

[`KFACOperator`][curvops.KFACOperator] is two steps: a factor collection over the data at construction
(``curvops.operators.kfac_factors``) and a Kronecker-structured operator that holds the
factors and does every product and closed form without the data
(``KroneckerOperator``).

Layout and flattening
---------------------
Vectors use the layout of every curvops operator: ``model.named_parameters()`` order,
each parameter flattened row-major. For a layer with weight ``W`` of shape
``(out, in)`` (a ``Conv2d`` weight ``(out, c_in, k1, k2)`` is ``(out, in)`` with
``in = c_in·k1·k2``, flattened row-major, the same order as ``F.unfold``'s patches) the
per-row gradient is ``g aᵀ`` with ``g`` the gradient w.r.t. the layer output (out,)
and ``a`` the layer input (in,); ``W.reshape(-1)`` of ``g aᵀ`` is ``g ⊗ a``. Hence the
block of ``W`` alone is

    G ⊗ A        (Kronecker order: G (out × out) outer, A (in × in) inner),

and ``(G ⊗ A) vec_row(V) = vec_row(G V A)``. By default the weight and bias of one
layer form one block: the bias is the extra input 1, ``Ã = [[A, ā], [āᵀ, 1]]`` of size
``in + 1``, the block acts on ``Ṽ = [V_W | v_b]`` (out × (in+1)) as ``G Ṽ Ã``; in the
operator's layout (all of ``W`` row-major, then ``b``) it is ``G ⊗ Ã`` with its rows and
columns permuted accordingly, so the weight-bias cross terms are kept.
``separate_weight_and_bias=True`` gives the two blocks ``G ⊗ A`` and ``G ⊗ 1``.

Factors and normalisation
-------------------------
For the whole-dataset objective ``L = c Σ_t ℓ_t`` (``c = 1/normaliser`` for mean
losses, exactly as [`CurvatureOperator`][curvops.CurvatureOperator]); the factors are collected by
``KFACComputer``:

    A = (1/M) Σ_rows a aᵀ,        G = c Σ_rows Σ_k g_k g_kᵀ,

with ``M`` the total number of rows over all batches and ``g_k`` the gradient w.r.t.
the layer output of ``Σ ⟨output, s_k⟩`` (one backward pass per ``s_k``):

- ``fisher_type="type-2"``: ``s_k`` the columns of a symmetric factorisation of the
  loss Hessian (``LossSpec.hessian_sqrt_columns``), so KFAC approximates the GGN;
- ``"mc"``: ``s_k`` output gradients with labels drawn from the model
  (``LossSpec.sample_output_gradients``, divided by ``sqrt(mc_samples)``); the same
  draws as [`FisherOperator`][curvops.FisherOperator] with the same ``seed``;
- ``"empirical"``: the gradient of the batch loss w.r.t. the output (one ``s``).

Rows: ``kfac_approx="expand"`` treats every weight-sharing position (sequence
position, conv output location) of every sample as a row; ``"reduce"`` sums the output
gradients and averages the inputs over the weight-sharing dimensions, one row per
sample. Without weight sharing the two coincide.

The columns ``s_k`` are backpropagated for all loss terms of a batch at once. Within a
row of the *model output* they are an exact factorisation; if one layer row feeds several
output rows (attention, a conv followed by a linear layer on flattened features under
"expand", ...), products between different output rows enter ``G`` — the usual KFAC
approximation, as in curvlinops. For MSE and BCE the last output dimension is the feature
dimension (a row is every other index): a Conv2d's ``(N, C, H, W)`` map as the model
output is refused with ``"type-2"`` (its columns would couple the channels of each
location); return it channels-last. With ``ignore_index`` the ignored positions contribute
nothing to ``G`` but their inputs still enter ``A`` (the layer does not know which
targets are counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from curvops.operators._loss import LossSpec, check_mc_samples, resolve_seed
from curvops.operators._parallel import Sharded, detect_parallel
from curvops.operators.base import CurvatureOperator, ParamSelection
from curvops.operators.kfac_factors import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KFACComputer,
    select_supported_parameters,
)
from curvops.operators.kronecker import (
    INVERSE_METHODS,
    BlockForm,
    KroneckerBlock,
    KroneckerEigen,
    KroneckerFactors,
    KroneckerInverseOperator,
    KroneckerOperator,
)

__all__ = [
    "FISHER_TYPES",
    "INVERSE_METHODS",
    "KFAC_APPROXIMATIONS",
    "KFACOperator",
    "KroneckerBlock",
    "KroneckerEigen",
    "KroneckerInverseOperator",
]


class _KroneckerCurvature(CurvatureOperator):
    """What KFAC and EKFAC share: options, the factor collection, and a Kronecker-structured product.

    The model, data, parameter selection, objective normalisation, first-batch checks and
    [`loss_and_gradient`][curvops.CurvatureOperator.loss_and_gradient] come from
    [`CurvatureOperator`][curvops.CurvatureOperator]; the products do not pass over the data: they are those
    of the ``KroneckerOperator`` built once at construction.
    """

    #: The factor-collection step (EKFAC uses its subclass).
    _computer_class: type[KFACComputer] = KFACComputer

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        fisher_type: str = "type-2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        unsupported: str = "raise",
        seed: int | None = 0,
        check_deterministic: bool = True,
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        mc_samples = check_mc_samples(mc_samples)
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(f"mc_samples={mc_samples} only makes sense with fisher_type='mc'")
        if unsupported not in ("raise", "exclude"):
            raise ValueError(f"unsupported must be 'raise' or 'exclude', got {unsupported!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        kind = LossSpec.from_loss(loss_fn).kind
        if kind == "custom" and fisher_type != "empirical":
            raise ValueError(
                f"fisher_type={fisher_type!r} needs the loss Hessian's factorisation or the "
                "model's predictive distribution, known for nn.CrossEntropyLoss, nn.MSELoss and "
                f"nn.BCEWithLogitsLoss only; got {type(loss_fn).__name__} (use fisher_type='empirical')"
            )
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = bool(separate_weight_and_bias)
        self.seed = resolve_seed(seed)
        inner, parallel = detect_parallel(model)
        if isinstance(parallel, Sharded):
            raise NotImplementedError(
                "KFAC/EKFAC of an FSDP-sharded model is not supported: a Kronecker block multiplies "
                "whole weight matrices, which FSDP splits across ranks (DDP models work)"
            )
        keep, self.excluded_params = select_supported_parameters(inner, params, unsupported)
        super().__init__(model, loss_fn, data, params=keep, check_deterministic=check_deterministic)
        computer = self._computer_class(
            self,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            kfac_approx=kfac_approx,
            separate_weight_and_bias=self.separate_weight_and_bias,
            seed=self.seed,
            # Part of the first-batch validation that check_deterministic switches on.
            check_structure=bool(check_deterministic),
            owner=type(self).__name__,
        )
        self.blocks: list[KroneckerBlock] = computer.blocks()
        self._kronecker = KroneckerOperator(
            self.param_names,
            self.param_shapes,
            [(b.weight, b.bias) for b in self.blocks],
            self._block_forms(computer),
            self.torch_dtype,
            self.device,
            label=type(self).__name__,
        )

    def _block_forms(self, computer: KFACComputer) -> list[BlockForm]:
        """The form of every block of ``blocks`` the product uses (after any further pass)."""
        raise NotImplementedError

    # ------------------------------------------------------------ products
    @property
    def is_positive_semidefinite(self) -> bool:
        """True: every block is a Kronecker product (or eigen-form) of PSD factors."""
        return True

    def _apply(self, X: Tensor) -> Tensor:
        return self._apply_into(X, None)

    def _apply_into(self, X: Tensor, out: Tensor | None) -> Tensor:
        """``K X`` from the factors, into ``out`` when given (see ``KroneckerOperator._apply_into``).

        Under DDP every rank holds the same factors and multiplies its own copy of the
        vector: no communication, except that all ranks raise if one overflows.
        """
        if self.parallel is None:
            return self._kronecker._apply(X) if out is None else self._kronecker._apply_into(X, out)
        try:
            result = self._kronecker._apply(X) if out is None else self._kronecker._apply_into(X, out)
        except FloatingPointError as error:
            self._agree(error)  # raises on every rank
            raise
        self._agree(None)
        return result

    # ------------------------------------------------------------ closed forms
    def trace(self) -> Tensor:
        """The trace, summed over the blocks without forming them.

        Returns
        -------
        Tensor
            0-d: ``Σ_blocks tr(G) tr(A)`` (KFAC), ``Σ S`` (EKFAC).
        """
        return self._kronecker.trace()

    def frobenius_norm(self) -> Tensor:
        """The Frobenius norm, summed over the blocks without forming them.

        Returns
        -------
        Tensor
            0-d: ``sqrt(Σ_blocks ‖G‖_F² ‖A‖_F²)`` (KFAC), ``sqrt(Σ S²)`` (EKFAC).
        """
        return self._kronecker.frobenius_norm()

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + δ I)``: the sum of ``log(d + δ)`` over all eigenvalues ``d``.

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
        return self._kronecker.logdet(damping)

    def diagonal(self) -> Tensor:
        """The diagonal in the operator's layout, block by block.

        Returns
        -------
        Tensor
            (D,): ``diag(G)[o] · diag(A)[i]`` (KFAC), ``(Q_G∘Q_G) S (Q_A∘Q_A)ᵀ`` (EKFAC).
        """
        return self._kronecker.diagonal()

    def eigenvalues(self) -> Tensor:
        """All D eigenvalues, ascending.

        Returns
        -------
        Tensor
            (D,): the products ``λ_i μ_j`` of the factors' eigenvalues (KFAC, negative
            rounding clamped to 0), the entries of every ``S`` (EKFAC).
        """
        return self._kronecker.eigenvalues()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.shape[0]}, blocks={len(self.blocks)}, "
            f"fisher_type={self.fisher_type!r}, kfac_approx={self.kfac_approx!r}, "
            f"loss={self.loss.kind}/{self.loss.reduction}, dtype={self.torch_dtype}, device={self.device})"
        )


# ============================================================== KFAC
class KFACOperator(_KroneckerCurvature):
    """KFAC approximation of the GGN / Fisher as a linear operator (D, D).

    Block-diagonal over the supported layers (``nn.Linear`` with any leading
    weight-sharing dimensions, ``nn.Conv2d`` with any stride, padding, dilation and
    padding mode, ``groups=1``), each block ``G ⊗ A`` in the flattening convention of
    the module docstring (``W.reshape(-1)`` row-major: ``G`` outer, ``A`` inner; the
    bias, by default, the last input column of ``A``). The Kronecker factors are
    computed in one pass over the data at construction
    (``KFACComputer``); products, [`trace`][curvops.KFACOperator.trace],
    [`logdet`][curvops.KFACOperator.logdet], [`frobenius_norm`][curvops.KFACOperator.frobenius_norm],
    [`diagonal`][curvops.KFACOperator.diagonal], [`eigenvalues`][curvops.KFACOperator.eigenvalues] and
    [`inverse`][curvops.KFACOperator.inverse] use only the factors (``KroneckerOperator``) and never form the
    dense matrix. numpy/torch dispatch, input checks and ``to_dense()`` are those of every
    curvops operator; [`loss_and_gradient`][curvops.KFACOperator.loss_and_gradient], ``flatten`` and
    ``unflatten`` those of [`CurvatureOperator`][curvops.CurvatureOperator].

    Parameters
    ----------
    model : torch.nn.Module
        The network. Its forward takes a batch's ``inputs`` (a tensor, or a dict of
        tensors passed as keyword arguments) and returns a tensor or an object with a
        ``logits`` attribute (Hugging Face ``ModelOutput``). It is evaluated as it is, in
        its current train/eval mode, and left as it was (forward passes run on copies of
        its buffers). A model wrapped in ``DistributedDataParallel`` gives the factors of
        the global objective (all ranks' batches, summed once at construction); an
        FSDP-sharded model is refused.
    loss_fn : callable
        ``nn.CrossEntropyLoss`` (``ignore_index``, class weights, label smoothing),
        ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``, reduction ``"mean"`` or ``"sum"``; a
        custom callable ``(output, target) -> scalar`` only with
        ``fisher_type="empirical"`` (assumed to be a mean over the batch's samples unless
        it has ``reduction="sum"``).
    data : iterable of (inputs, targets)
        Re-iterable batches (a list, or a ``DataLoader`` without shuffling); batches may
        differ in size; tensors are moved to the model's device. Read at construction
        only: the factors are the curvature of these data, normalised over all of them
        (for mean losses, by the number of loss terms of the whole data set).
    params : None, str, list of str, or list of parameters, optional
        Parameters the operator acts on. ``None`` (default): every parameter that
        requires grad. Strings are glob patterns on parameter names, e.g.
        ``"layers.*.attn.*"``; parameters are given in ``model.named_parameters()`` order
        whatever the order of the selection. Each must be the weight or bias of a
        supported layer (see ``unsupported``).
    fisher_type : {"type-2", "mc", "empirical"}, optional
        Which curvature ``G`` approximates (default ``"type-2"``: the GGN; ``"mc"``: the
        Monte-Carlo Fisher with the label draws of [`FisherOperator`][curvops.FisherOperator];
        ``"empirical"``: the empirical Fisher).
    mc_samples : int, optional
        Label draws per loss term for ``"mc"`` (default 1).
    kfac_approx : {"expand", "reduce"}, optional
        Treatment of weight-sharing dimensions (default ``"expand"``).
    separate_weight_and_bias : bool, optional
        If True, weight and bias of a layer get separate blocks (no cross terms).
        Default False: one joint block per layer.
    unsupported : {"raise", "exclude"}, optional
        Selected parameters that are not the weight/bias of a supported layer raise a
        ``ValueError`` naming them (default), or with ``"exclude"`` are left out of the
        operator (listed in ``op.excluded_params``; ``op.param_names`` is what remains).
    seed : int or None, optional
        Seed of the label draws for ``"mc"``, a non-negative integer (default 0). ``None``:
        a fresh seed from the operating system's entropy, drawn once and stored in
        ``seed``.
    check_deterministic : bool, optional
        If True (default), check once on the first batch that two evaluations of the loss
        and gradient agree, that ``data`` yields the same first batch twice, and that every
        selected weight's and bias's gradient equals ``Σ_rows g aᵀ`` (``Σ_rows g``) from its
        layer's inputs and output gradients; the last catches parameters also used outside
        their layer (tied or functional uses) that KFAC would silently misrepresent.

    Raises
    ------
    ValueError
        Bad option; parameters of unsupported layers (``unsupported="raise"``); a
        parameter shared by two layers (tied weights: rejected, since no Kronecker block
        represents it); ``Conv2d`` with ``groups > 1``; a layer called more than once per
        forward or not through its forward; an unsupported loss; ``"type-2"`` with MSE or
        BCE on a Conv2d's ``(N, C, H, W)`` output map.
    NotImplementedError
        For an FSDP-sharded model.
    FloatingPointError
        If the model output or a factor is NaN or Inf; from a product, if it overflows.

    Attributes
    ----------
    blocks : list of KroneckerBlock
        The factors, one entry per block.
    excluded_params : list of str
        Selected parameters left out with ``unsupported="exclude"``.
    """

    def _block_forms(self, computer: KFACComputer) -> list[BlockForm]:
        return [KroneckerFactors(b.G, b.A) for b in self.blocks]

    def eigendecomposition(self) -> list[KroneckerEigen]:
        """Eigendecompositions of both factors of every block (``torch.linalg.eigh``, computed once).

        The block's eigenvalues are the products ``λ_i μ_j`` with eigenvectors
        ``q_i ⊗ u_j`` (in the block's ``[W | b]`` layout).

        Returns
        -------
        list of KroneckerEigen
            One per block, in the order of ``blocks``.
        """
        eigen = []
        for block, form in zip(self.blocks, self._kronecker.forms):
            lg, qg, la, qa = form.eigh()  # type: ignore[union-attr]
            eigen.append(KroneckerEigen(block.name, block.param_names, lg, qg, la, qa))
        return eigen

    def inverse(self, damping: float, *, method: str = "exact") -> KroneckerInverseOperator:
        """The damped inverse as a linear operator (numpy and torch), per block.

        Parameters
        ----------
        damping : float
            ``δ``. ``method="exact"`` needs ``δ ≥ 0`` (``δ = 0`` only if ``K`` is
            non-singular); the factor-wise methods need ``δ > 0``.
        method : {"exact", "pi", "plain"}, optional
            - ``"exact"`` (default): ``(G ⊗ A + δ I)⁻¹`` through the factor eigenbases,
              ``(Q_G ⊗ Q_A) diag(1 / (λ_i μ_j + δ)) (Q_G ⊗ Q_A)ᵀ``.
            - ``"pi"``: factor-wise damping with Martens & Grosse's (2015, sec. 6.3) π
              correction, ``(G + (√δ/π) I)⁻¹ ⊗ (A + π√δ I)⁻¹``,
              ``π² = (tr A / dim A) / (tr G / dim G)`` (π = 1 if either trace is 0). Not
              ``(K + δI)⁻¹``: a cheaper heuristic.
            - ``"plain"``: ``(G + √δ I)⁻¹ ⊗ (A + √δ I)⁻¹``.

        Returns
        -------
        KroneckerInverseOperator
            Symmetric positive definite (D, D), in this operator's layout.

        Raises
        ------
        ValueError
            Unknown method; ``δ`` negative or not finite; ``δ = 0`` where not allowed or
            with a singular ``K``.
        TypeError
            If ``δ`` is not a real number.
        """
        return self._kronecker.inverse(damping, method=method)
