"""The Fisher information: Monte-Carlo (model-sampled) or empirical (data labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._loss import check_mc_samples, resolve_seed
from curvops.operators._output_space import OutputSpaceOperator
from curvops.operators.base import ParamSelection, document_shared_parameters
from curvops.operators.strategy import ProductStrategy

_KINDS = ("mc", "empirical")


@document_shared_parameters
class FisherOperator(OutputSpaceOperator):
    """Fisher ``F = c Σ_t J_tᵀ E[s_t s_tᵀ] J_t`` as a linear operator (D, D).

    ``t`` runs over the loss terms of all batches — for cross-entropy every output
    position (a row over the class dimension 1), for other losses every sample —
    ``c`` is ``1 / normaliser`` for mean losses and 1 for sum losses, and ``s_t`` is a
    gradient of the term's loss w.r.t. the output:

    - ``kind="mc"`` (default): with labels drawn from the model's predictive
      distribution (categorical for cross-entropy, Gaussian of covariance ``I/2`` for
      MSE so that ``E[s sᵀ] = 2I``, Bernoulli for BCE-with-logits), averaged over
      ``mc_samples`` draws. Its expectation is the GGN. The draws are a fixed function
      of ``seed`` and the batch index, so repeated products use the same samples and
      the operator is a fixed symmetric matrix.
    - ``kind="empirical"``: with the data's labels, one ``s_t`` per term: the
      uncentered second moment of the per-term gradients,
      ``c Σ_t ∇θ ℓ_t ∇θ ℓ_tᵀ``. Computed as ``Jᵀ (g gᵀ) J`` per term through one
      forward-mode and one reverse-mode pass per batch; the per-term gradients are
      never materialised (for B terms and D parameters that would be B·D numbers).

    Parameters
    ----------
    {shared_parameters}
    kind : {"mc", "empirical"}, optional
        Which Fisher (default ``"mc"``).
    mc_samples : int, optional
        Number of label draws per term for ``kind="mc"`` (default 1). Products refuse
        (``MemoryError``) a number whose draws for one batch would not fit in the device's
        free memory.
    seed : int or None, optional
        Seed of the label draws, a non-negative integer (default 0). ``None``: a fresh seed
        from the operating system's entropy, drawn once at construction and stored in
        ``seed`` (the operator is still one fixed matrix; pass that seed to reproduce it).
    strategy : ProductStrategy or "auto", optional
        How ``J v`` is obtained (``output_tangent``) and whether the columns of a block share
        vectorised passes (``batched_columns``); ``hessian_vector`` does not concern the
        Fisher. Default ``"auto"``: by device and model. See [`ProductStrategy`][curvops.ProductStrategy].

    Raises
    ------
    ValueError
        If ``kind``, ``mc_samples`` or ``seed`` is invalid, ``kind="mc"`` is asked of a custom
        loss, or for the data and model refusals of every curvature operator.
    TypeError
        If ``strategy`` is neither a [`ProductStrategy`][curvops.ProductStrategy] nor ``"auto"``.

    Notes
    -----
    {shared_notes}
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: Iterable[tuple[Any, Any]],
        *,
        params: ParamSelection = None,
        kind: str = "mc",
        mc_samples: int = 1,
        seed: int | None = 0,
        check_deterministic: bool = True,
        strategy: ProductStrategy | str = "auto",
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.strategy = ProductStrategy.from_argument(strategy)
        self.kind = kind
        self.mc_samples = check_mc_samples(mc_samples)
        self.seed = resolve_seed(seed)
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        if kind == "mc" and self.loss.kind == "custom":
            raise ValueError(
                "the Monte-Carlo Fisher needs the model's predictive distribution, known for "
                "nn.CrossEntropyLoss, nn.MSELoss and nn.BCEWithLogitsLoss only; use "
                "kind='empirical' or the GGNOperator for a custom loss"
            )

    @property
    def is_positive_semidefinite(self) -> bool:
        """Always True: a sum of outer products."""
        return True

    def _middle_context(self, output: Tensor, target: Any, index: int) -> Tensor:
        if self.kind == "empirical":
            return self.loss.output_gradient(output, target).unsqueeze(0)
        generator = torch.Generator(device=output.device)
        # One stream per (seed, batch): the same draws in every product.
        # Under DDP/FSDP each rank numbers its own batches: the rank keeps the streams apart.
        rank = 0 if self.parallel is None else self.parallel.rank
        generator.manual_seed((self.seed * 1_000_003 + index + rank * 1_000_000_007) % (2**63 - 1))
        samples = self.loss.sample_output_gradients(output, target, self.mc_samples, generator)
        return samples / self.mc_samples**0.5

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Tensor) -> Tensor:
        return self.loss.fisher_middle(context, jv)
