"""How the curvature operators organise their automatic differentiation: ``ProductStrategy``.

The choices change the cost of a product, never its value beyond rounding: every
combination computes the same matrix exactly (up to floating-point summation order).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

HessianVectorMethod = Literal["auto", "reverse_over_forward", "double_backward"]
OutputTangentMethod = Literal["auto", "alongside_forward", "dual_forward_with_graph", "separate_tangent_pass"]

_HESSIAN_VECTOR = ("auto", "reverse_over_forward", "double_backward")
_OUTPUT_TANGENT = ("auto", "alongside_forward", "dual_forward_with_graph", "separate_tangent_pass")
_BATCHED_COLUMNS = ("auto", True, False)


@dataclass(frozen=True, repr=False)
class ProductStrategy:
    """How [`HessianOperator`][curvops.HessianOperator], [`GGNOperator`][curvops.GGNOperator] and
    [`FisherOperator`][curvops.FisherOperator] compute their products.

    Pass it as ``strategy=`` (or the string ``"auto"``, the default: every field
    ``"auto"``). Each operator reads the fields that concern it and ignores the others, so
    one strategy can be handed to all of them. ``"auto"`` picks by device and model as
    measured (see docs/benchmarks.md and ``benchmarks/results/matvec_*``,
    ``reverse_over_forward_*``, ``lm_*``). The results agree to rounding whatever the choice.

    Parameters
    ----------
    hessian_vector : {"auto", "reverse_over_forward", "double_backward"}, optional
        How [`HessianOperator`][curvops.HessianOperator] (``method="autograd"``) multiplies a single
        vector (a block of k > 1 columns always uses double backward: one differentiable
        gradient per batch serves every column).

        - ``"reverse_over_forward"``: ``Hv = ∇_θ ⟨∇_z ℓ(z), J v⟩`` from one dual forward
          pass that keeps the graph of the output ``z`` and of its tangent ``J v``, then one
          backward pass (reverse over forward; Pearlmutter 1994, "Fast exact multiplication
          by the Hessian"; Griewank & Walther 2008, ch. 5). It forms fewer matrix products
          than double backward, which also forms the gradient's weight products. It
          differentiates forward-mode rules, and torch's for layer norm, softmax,
          log-softmax and attention are wrong or not differentiable when differentiated;
          curvops replaces them with its own (verified against double backward in float64),
          so transformers qualify. Each batch's graph is checked by a plain forward pass
          before its first product and again in every product; on an operation without a
          verified rule (train-mode batch norm, a custom ``autograd.Function``), or if the
          product runs out of memory, the operator switches to double backward for good and
          recomputes the product. The check is structural: no data can fool it.
        - ``"double_backward"``: a differentiable gradient, then one backward pass of
          ``⟨∇L, v⟩`` per column (reverse over reverse).
        - ``"auto"`` (default): ``"reverse_over_forward"``, faster and no larger than
          double backward on the CPU and on GPUs for MLPs and CNNs.
    output_tangent : str, optional
        One of ``"auto"``, ``"alongside_forward"``, ``"dual_forward_with_graph"``,
        ``"separate_tangent_pass"``: how the GGN and Fisher (``Jᵀ M J``) obtain ``J v`` of the
        first column.

        - ``"alongside_forward"``: the forward pass that keeps the graph carries ``J v``
          alongside, computed next to each operation from its own inputs and not recorded
          (bilinear layers by the product rule, so no primal product is computed twice;
          Pearlmutter 1994). A model whose forward pass does what this cannot carry exactly
          (an in-place update of a tensor that carries a tangent, a custom
          ``autograd.Function``) is detected on the way and served by
          ``"separate_tangent_pass"`` from then on (``tangent_alongside_refusal`` on the
          operator says why).
        - ``"dual_forward_with_graph"``: one dual forward pass (forward-mode AD) with the
          autograd graph kept gives the output and ``J v`` together: one forward pass
          fewer, but the graph also records the tangent computations, roughly doubling the
          activations held.
        - ``"separate_tangent_pass"``: a plain forward keeps the graph and every tangent
          comes from a separate dual forward without a graph.
        - ``"auto"`` (default): ``"dual_forward_with_graph"`` on the CPU,
          ``"alongside_forward"`` on GPUs (``"separate_tangent_pass"`` for DDP/FSDP models);
          see docs/benchmarks.md#product-strategy.
    batched_columns : {"auto", True, False}, optional
        Whether the columns of a ``(D, k)`` block share vectorised passes in the GGN and
        Fisher: the tangents of all columns by one ``torch.func.vmap`` of forward-mode AD
        and ``Jᵀ`` of all columns by one batched backward pass (``is_grads_batched``), i.e.
        larger matrix products; or one tangent pass and one backward pass per column.
        ``"auto"`` (default): batched unless the model has convolutions (vmapped
        convolutions measure slower than the loop on the CPU). Unbatched with
        ``"dual_forward_with_graph"``, each column of a block is computed as a single
        product, batch by batch.

    Raises
    ------
    ValueError
        If a field is not one of its allowed values (the message lists them).

    Examples
    --------
    >>> from curvops import ProductStrategy
    >>> ProductStrategy(hessian_vector="double_backward")
    ProductStrategy(hessian_vector='double_backward')
    """

    hessian_vector: HessianVectorMethod = "auto"
    output_tangent: OutputTangentMethod = "auto"
    batched_columns: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("hessian_vector", _HESSIAN_VECTOR),
            ("output_tangent", _OUTPUT_TANGENT),
            ("batched_columns", _BATCHED_COLUMNS),
        ):
            value = getattr(self, name)
            # ``1 == True`` in Python: compare by type as well as by value.
            if not any(type(value) is type(a) and value == a for a in allowed):
                listed = ", ".join(repr(a) for a in allowed)
                raise ValueError(f"ProductStrategy: {name} must be one of {listed}, got {value!r}")

    @classmethod
    def from_argument(cls, strategy: Any) -> ProductStrategy:
        """The strategy an operator's ``strategy=`` argument names.

        Parameters
        ----------
        strategy : ProductStrategy or "auto"
            A strategy, or ``"auto"`` for the default one.

        Returns
        -------
        ProductStrategy

        Raises
        ------
        TypeError
            If ``strategy`` is neither.
        """
        if isinstance(strategy, ProductStrategy):
            return strategy
        if isinstance(strategy, str) and strategy == "auto":
            return cls()
        raise TypeError(f"strategy must be a curvops.ProductStrategy or 'auto', got {strategy!r}")

    @property
    def is_default(self) -> bool:
        """Whether every field is ``"auto"``."""
        return self == ProductStrategy()

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"ProductStrategy({', '.join(changed)})"
