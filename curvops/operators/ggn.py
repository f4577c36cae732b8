"""The generalized Gauss-Newton matrix ``Jᵀ H_loss J``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._forward_ad import own_storage, tangent_rules
from curvops.operators._output_space import OutputSpaceOperator
from curvops.operators._tangent_propagation import TangentNotCarried, TangentsAlongside
from curvops.operators.base import BatchProduct, ParamSelection, document_shared_parameters
from curvops.operators.strategy import ProductStrategy


@document_shared_parameters
class GGNOperator(OutputSpaceOperator):
    """Generalized Gauss-Newton ``G = c Σ_b J_bᵀ (∇²_f ℓ_b) J_b`` as a linear operator (D, D).

    ``J_b`` is the Jacobian of the model output of batch ``b`` w.r.t. the selected
    parameters and ``∇²_f ℓ_b`` the Hessian of the batch's loss sum w.r.t. that output;
    ``c`` is ``1 / normaliser`` for mean losses and 1 for sum losses. The loss Hessian
    is applied in closed form for the built-in losses — cross-entropy
    ``a (diag(p) − p pᵀ)`` per position (never materialised; ``a`` folds in class
    weights, label smoothing and ``ignore_index``), MSE ``2I``, BCE-with-logits
    ``σ(1 − σ)`` (times weights) — and by double backward w.r.t. the output for custom
    losses. The GGN is symmetric positive semi-definite for convex losses.

    Parameters
    ----------
    {shared_parameters}
    fused_head : bool, str or nn.Module, optional
        Fuse the output head into the product (default False). For models whose output
        is ``h Wᵀ`` — an ``nn.Linear`` without bias, possibly tied to the input
        embedding, as in GPT-2 and Llama — under cross-entropy with class-index targets
        (``nn.CrossEntropyLoss``, [`curvops.lm.CausalLMLoss`][curvops.lm.CausalLMLoss]): the logits, their
        tangent and the loss-Hessian product are computed in row chunks by
        ``curvops.kernels.linear_cross_entropy_ggn`` and never exist for the whole
        batch (an (N, V) tensor is 0.4 GB for 2,048 tokens of GPT-2 in float32). Same
        arithmetic as the plain path. ``True`` finds the head (``get_output_embeddings()``
        if the model has it, else its last ``nn.Linear``); a string names the head
        module, or pass the module. The model must return the head's output unchanged
        (no scaling or soft-capping after it): checked on every product.
    head_chunk_rows : int, optional
        Rows per chunk of the fused head (default: one (rows, V) tensor of at most
        256 MiB).
    method : {"autograd", "finite_difference"}, optional
        ``"autograd"`` (default): exact, ``J v`` by forward-mode AD as ``strategy`` says.
        ``"finite_difference"``: ``J v ≈ (f(θ + εv) − f(θ − εv)) / (2ε)`` from two forward
        passes without a graph, then ``Jᵀ`` by one backward pass as usual (what
        hessian-eigenthings' GGN does by default, and this operator under FSDP). The
        product is then approximate: central differences have a truncation error
        ``O(ε²)`` and a rounding error ``O(u/ε)`` (``u`` the unit roundoff), so the relative
        error is at best ``O(u^(2/3))`` times model constants (see
        docs/benchmarks.md#finite-difference-ggn for measured errors) and the matrix is
        symmetric only up to that error. The model is evaluated at ``θ ± εv`` out of place:
        parameters and version counters are untouched. The padding rows of embeddings are
        left out of the directions, and a model whose forward pass reads the selected
        parameters under ``torch.no_grad()`` or through ``detach()`` (or a padding row
        outside its embedding) is refused on its first product, as for the Hessian.
    fd_eps : float, optional
        Step of the finite differences as a perturbation norm ``‖εv‖`` (with
        ``method="finite_difference"`` or under FSDP). Default:
        [`finite_difference_step`][curvops.GGNOperator.finite_difference_step].
    strategy : ProductStrategy or "auto", optional
        How ``J v`` is obtained (``output_tangent``) and whether the columns of a block share
        vectorised passes (``batched_columns``); ``hessian_vector`` does not concern the GGN.
        Default ``"auto"``: by device and model. See [`ProductStrategy`][curvops.ProductStrategy].

    Raises
    ------
    TypeError
        If ``fused_head`` or ``strategy`` has the wrong type.
    ValueError
        If ``fused_head`` names no bias-free ``nn.Linear`` of the model or the loss is not a
        cross-entropy, if ``method`` or ``fd_eps`` is invalid or ``method="finite_difference"``
        is combined with ``fused_head``, or for the data and model refusals of every
        curvature operator.
    NotImplementedError
        If ``fused_head`` is asked of a DDP/FSDP model.

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
        fused_head: bool | str | nn.Module = False,
        head_chunk_rows: int | None = None,
        check_deterministic: bool = True,
        method: str = "autograd",
        fd_eps: float | None = None,
        strategy: ProductStrategy | str = "auto",
    ) -> None:
        if method not in ("autograd", "finite_difference"):
            raise ValueError(f"method must be 'autograd' or 'finite_difference', got {method!r}")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be a positive number, got {fd_eps!r}")
        if method == "finite_difference" and fused_head not in (False, None):
            raise ValueError(
                "fused_head computes J v exactly inside the head; it has no finite-difference "
                "variant: use method='autograd' with fused_head, or fused_head=False"
            )
        self.method = method
        self.fd_eps = fd_eps
        if fused_head is not None and not isinstance(fused_head, (bool, str, nn.Module)):
            raise TypeError(
                f"fused_head must be a bool, a module name or a module, got {type(fused_head).__name__}"
            )
        self.strategy = ProductStrategy.from_argument(strategy)
        super().__init__(model, loss_fn, data, params=params, check_deterministic=check_deterministic)
        self.head: nn.Linear | None = None
        self.head_chunk_rows = head_chunk_rows
        if fused_head is not False and fused_head is not None:
            if self.parallel is not None:
                raise NotImplementedError("fused_head is not supported for DDP/FSDP models yet")
            self.head = _find_head(model, fused_head)
            if self.loss.kind != "cross_entropy":
                raise ValueError(f"fused_head needs a cross-entropy loss, got a {self.loss.kind} loss")

    @property
    def is_positive_semidefinite(self) -> bool:
        """True for the built-in losses, which are convex in the output; unknown for custom ones."""
        return self.loss.kind != "custom"

    def _middle(self, output: Tensor, target: Any, jv: Tensor, context: Any) -> Tensor:
        return self.loss.output_hvp(output, target, jv)

    @contextlib.contextmanager
    def _batch_products(self, V: list[Tensor], out: list[Tensor]) -> Iterator[BatchProduct]:
        if self.head is None:
            with super()._batch_products(V, out) as product:
                yield product
        else:
            yield self._fused_head_product(V, out)

    # ------------------------------------------------------------- fused head
    def _forward_to_head(
        self, inputs: Any, replace: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the model with the head skipped: (head input, stand-in head output, model output).

        The head returns a zero-stride stand-in of the logits' shape (no memory), so the
        (N, V) logits are never computed.
        """
        head = self.head
        assert head is not None
        captured: list[tuple[Tensor, Tensor]] = []

        def stand_in(x: Tensor) -> Tensor:
            out = x.new_zeros(()).expand(*x.shape[:-1], head.out_features)
            captured.append((x, out))
            return out

        head.forward = stand_in  # type: ignore[method-assign, assignment]  # shadows nn.Linear.forward for this call
        try:
            output = self.forward(inputs, replace=replace)
        finally:
            del head.forward
        if len(captured) != 1:
            raise ValueError(
                f"fused_head: the head was called {len(captured)} times in one forward pass, expected once"
            )
        return captured[0][0], captured[0][1], output

    def _fused_head_product(self, V: list[Tensor], out: list[Tensor]) -> BatchProduct:
        """``Jᵀ M J V`` of one batch with the head fused into the loss-Hessian product."""
        import torch.autograd.forward_ad as fwAD

        from curvops.kernels.cross_entropy_sum import ce_row_weights
        from curvops.kernels.linear_cross_entropy_ggn import linear_cross_entropy_ggn

        assert self.head is not None
        head = self.head
        k = V[0].shape[0]
        head_weight = head.weight
        w_index = next((i for i, p in enumerate(self.params) if p is head_weight), None)
        spec = self.loss.flat if self.loss.flat is not None else self.loss
        f: Any = self.loss.fn
        ce: Any = spec.fn  # an nn.CrossEntropyLoss (or the flattened loss's)
        method = self._first_tangent_method()
        column = [own_storage(v[0]) for v in V] if method == "alongside_forward" else None
        batched = self._batched_columns()

        def forward_to_head(inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
            """(head input, stand-in, model output, tangent of the head input, whether it is column 0's)."""
            if column is not None and self.tangent_alongside_refusal is None:
                try:
                    with torch.enable_grad(), TangentsAlongside(zip(self.params, column)) as mode:
                        hidden, stand_in, output = self._forward_to_head(inputs, None)
                    return hidden, stand_in, output, mode.tangent_of(hidden), True
                except TangentNotCarried as refusal:
                    self.tangent_alongside_refusal = str(refusal)
            if method == "dual_forward_with_graph":
                # Column 0: one dual forward keeps the graph up to the head's input.
                with torch.enable_grad(), fwAD.dual_level(), tangent_rules():
                    duals = {n: fwAD.make_dual(p, t[0]) for n, p, t in zip(self.param_names, self.params, V)}
                    hidden, stand_in, output = self._forward_to_head(inputs, duals)
                    hidden, first = fwAD.unpack_dual(hidden)
                return hidden, stand_in, output, first, True
            # A plain forward keeps the graph, the tangents come from a separate no-graph
            # forward (the graph holds no tangent work).
            with torch.enable_grad():
                hidden, stand_in, output = self._forward_to_head(inputs, None)
            return hidden, stand_in, output, None, False

        def product(index: int, inputs: Any, target: Any) -> Tensor:
            hidden, stand_in, output, first, has_first = forward_to_head(inputs)
            if output is not stand_in:
                raise ValueError(
                    "fused_head: the model's output is not the head's output (the model "
                    "transforms the logits after the head); use fused_head=False"
                )
            h2d = hidden.detach().reshape(-1, hidden.shape[-1])
            if has_first:
                tangents = [torch.zeros_like(h2d) if first is None else first.detach().reshape(h2d.shape)]
                # The tangent carries the autograd graph of its own computation (recorded because
                # the primals require grad): drop it now, not at the end of the batch.
                del first
                rest = [v[1:] for v in V]
            else:
                tangents, rest = [], V
            columns = rest[0].shape[0]
            if columns == 1 or (columns and not batched):
                tangents += [self._hidden_jvp(inputs, [v[col] for v in rest], h2d) for col in range(columns)]
            elif columns:
                tangents += list(self._hidden_jvp_block(inputs, rest).reshape(-1, *h2d.shape).unbind(0))

            rows_target = f.flat_target(target) if self.loss.flat is not None else target
            if not torch.is_tensor(rows_target) or rows_target.is_floating_point():
                raise ValueError("fused_head supports class-index targets only (not class probabilities)")
            if stand_in.dim() != 2 and self.loss.flat is None:
                raise ValueError(
                    "fused_head with nn.CrossEntropyLoss needs 2-d logits (N, C); for "
                    "sequence models use curvops.lm.CausalLMLoss"
                )
            rows = h2d.shape[0]
            if rows_target.numel() != rows:
                raise ValueError(f"fused_head: {rows_target.numel()} targets for {rows} rows of logits")
            rw = ce_row_weights(
                h2d.new_zeros(()).expand(rows, head.out_features),
                rows_target.reshape(-1),
                weight=ce.weight,
                ignore_index=ce.ignore_index,
                label_smoothing=ce.label_smoothing,
            )
            weight = head_weight.detach()
            lse: Tensor | None = None
            for col, h_dot in enumerate(tangents):
                w_dot = None if w_index is None else V[w_index][col]
                res = linear_cross_entropy_ggn(
                    h2d,
                    weight,
                    h_dot,
                    w_dot,
                    rw.a * self.scale,
                    weight_grad=w_index is not None,
                    chunk_rows=self.head_chunk_rows,
                )
                grads = self._vjp(hidden, res.grad_hidden.view(hidden.shape), retain_graph=col < k - 1)
                for o, g in zip(out, grads):
                    o[col].add_(g)
                if w_index is not None:
                    assert res.grad_weight is not None  # asked for with weight_grad
                    out[w_index][col].add_(res.grad_weight)
                lse = res.lse
            assert lse is not None  # a block has k >= 1 columns
            with torch.no_grad():
                return self._head_loss(h2d, weight, rw, lse) * self.scale

        return product

    def _hidden_jvp(self, inputs: Any, tangents: list[Tensor], like: Tensor | None = None) -> Tensor:
        """Tangent of the head's input for one parameter tangent, without a graph: shaped like
        ``like`` (rows, hidden), or as the head's input when None."""
        import torch.autograd.forward_ad as fwAD

        # Gradients enabled (no graph: detached parameters) for tangent_rules' no-grad regions.
        with torch.enable_grad(), fwAD.dual_level(), tangent_rules():
            duals = self._detached_parameters()
            duals.update(
                (n, fwAD.make_dual(p.detach(), t)) for n, p, t in zip(self.param_names, self.params, tangents)
            )
            hidden, tangent = fwAD.unpack_dual(self._forward_to_head(inputs, duals)[0])
        like = hidden if like is None else like
        return torch.zeros_like(like) if tangent is None else tangent.reshape(like.shape)

    def _hidden_jvp_block(self, inputs: Any, tangents: list[Tensor]) -> Tensor:
        """Tangents of the head's input for a block of parameter tangents (vmap over the block)."""
        primals = {n: p.detach() for n, p in zip(self.param_names, self.params)}
        others = self._detached_parameters()

        def hidden_of(params: dict[str, Tensor]) -> Tensor:
            return self._forward_to_head(inputs, {**others, **params})[0]

        def tangent_of(*ts: Tensor) -> Tensor:
            return torch.func.jvp(hidden_of, (primals,), (dict(zip(self.param_names, ts)),))[1]

        if self._forward_writes_buffers():  # vmap cannot batch running-statistics updates
            return torch.stack(
                [self._hidden_jvp(inputs, [t[col] for t in tangents]) for col in range(tangents[0].shape[0])]
            )
        with torch.enable_grad(), tangent_rules(shortcuts=False):
            return torch.func.vmap(tangent_of)(*tangents)

    @staticmethod
    def _head_loss(h2d: Tensor, weight: Tensor, rw: Any, lse: Tensor) -> Tensor:
        """Batch-sum cross-entropy ``Σ a lse − Σ b·z`` from the rows' log-sum-exp, without the logits."""
        acc = lse.dtype
        h = h2d.to(acc)
        value = (rw.a * lse).sum() - (rw.alpha * (h * weight[rw.target].to(acc)).sum(dim=1)).sum()
        if rw.beta is not None:
            w = weight.to(acc)
            spread = w.sum(dim=0) if rw.class_weight is None else rw.class_weight @ w
            value = value - (rw.beta * (h @ spread)).sum()
        return value


def _find_head(model: nn.Module, head: bool | str | nn.Module) -> nn.Linear:
    """Resolve ``fused_head`` to the model's bias-free output ``nn.Linear``."""
    if head is True:
        getter = getattr(model, "get_output_embeddings", None)
        module = getter() if callable(getter) else None
        if module is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            module = linears[-1] if linears else None
    elif isinstance(head, str):
        try:
            module = model.get_submodule(head)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"fused_head={head!r}: the model has no submodule of that name; name its output "
                f"nn.Linear (its linear layers: {', '.join(names[-5:]) or 'none'}), pass the module, "
                "or pass True to find it"
            ) from None
    elif isinstance(head, nn.Module):
        if not any(m is head for m in model.modules()):
            raise ValueError("fused_head: the given module is not a submodule of the model")
        module = head
    else:
        raise TypeError(f"fused_head must be a bool, a module name or a module, got {type(head).__name__}")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"fused_head needs an nn.Linear output head, found {type(module).__name__}")
    if module.bias is not None:
        raise ValueError("fused_head needs an output head without bias (logits = h Wᵀ)")
    return module
