"""Kronecker-factored approximate curvature (KFAC) of the GGN / Fisher.

KFAC (Martens & Grosse 2015; convolutions: Grosse & Martens 2016; weight sharing,
"expand" and "reduce": Eschenhagen et al. 2023; conventions follow the tutorial of
Dangel et al. 2025, arXiv:2507.05127) approximates the curvature by a block-diagonal
matrix with one Kronecker-factored block per layer.

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
losses, exactly as :class:`~curvops.operators.base.CurvatureOperator`):

    A = (1/M) Σ_rows a aᵀ,        G = c Σ_rows Σ_k g_k g_kᵀ,

with ``M`` the total number of rows over all batches and ``g_k`` the gradient w.r.t.
the layer output of ``Σ ⟨output, s_k⟩`` (one backward pass per ``s_k``):

- ``fisher_type="type-2"``: ``s_k`` the columns of a symmetric factorisation of the
  loss Hessian (:meth:`LossSpec.hessian_sqrt_columns`), so KFAC approximates the GGN;
- ``"mc"``: ``s_k`` output gradients with labels drawn from the model
  (:meth:`LossSpec.sample_output_gradients`, divided by ``sqrt(mc_samples)``); the same
  draws as :class:`~curvops.FisherOperator` with the same ``seed``;
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

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvops._finite import all_finite
from curvops.operators._parallel import Sharded, detect_parallel
from curvops.operators.base import CurvatureOperator, ParamSelection, TorchLinearOperator, _select_parameters

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROXIMATIONS = ("expand", "reduce")
INVERSE_METHODS = ("exact", "pi", "plain")
_SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
# Elements per chunk when per-sample quantities are formed (EKFAC): bounds peak memory.
_CHUNK_ELEMENTS = 1 << 24


# ============================================================== data structures
@dataclass
class KroneckerBlock:
    """One diagonal block ``G ⊗ A`` of the operator.

    Attributes
    ----------
    name : str
        Name of the layer (module) the block belongs to.
    param_names : tuple of str
        Parameters the block covers: ``(weight,)``, ``(bias,)`` or ``(weight, bias)``.
    weight, bias : int or None
        Positions of those parameters in ``op.params``.
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
    """Eigendecompositions ``G = Q_G diag(λ) Q_Gᵀ`` and ``A = Q_A diag(μ) Q_Aᵀ`` of one block."""

    name: str
    param_names: tuple[str, ...]
    G_eigenvalues: Tensor
    G_eigenvectors: Tensor
    A_eigenvalues: Tensor
    A_eigenvectors: Tensor


@dataclass
class _Layer:
    """A supported layer whose parameters are (partly) selected."""

    name: str
    module: nn.Module
    weight: int | None
    bias: int | None
    joint: bool  # weight and bias in one block
    out_features: int
    in_features: int  # flattened input size of the weight (c_in·k1·k2 for Conv2d)


# ============================================================== shared base
class _KroneckerOperator(CurvatureOperator):
    """Machinery shared by KFAC and EKFAC: layer discovery, data passes, block products.

    Products are the structured per-block products (no pass over the data); the data is
    traversed only at construction. Under DDP the data statistics are summed over the
    ranks once, at construction.
    """

    _sums_over_local_data = False

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor],
                 data: Iterable[tuple[Any, Any]], *, params: ParamSelection = None,
                 fisher_type: str = "type-2", mc_samples: int = 1, kfac_approx: str = "expand",
                 separate_weight_and_bias: bool = False, unsupported: str = "raise",
                 seed: int | None = 0, check_deterministic: bool = True) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}")
        from curvops.operators._loss import LossSpec, check_mc_samples, resolve_seed

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
        names, chosen = _select_parameters(inner, params)
        owners = _owners(inner)
        keep, self.excluded_params = _classify(names, chosen, owners, unsupported)
        super().__init__(model, loss_fn, data, params=keep, check_deterministic=check_deterministic)
        self._layers = self._build_layers(owners)
        self._clone_outputs: set[str] = set()
        # Part of the first-batch validation that check_deterministic switches on.
        self._check_structure = bool(check_deterministic)
        A, G = self._kronecker_factors()
        self.blocks: list[KroneckerBlock] = self._make_blocks(A, G)
        self._block_layout = [(b.weight, b.bias, b.G.shape[0]) for b in self.blocks]
        self._after_factors()

    def _after_factors(self) -> None:
        """Hook for subclasses: runs once the Kronecker factors and blocks exist."""

    def _check_output(self, output: Tensor, outputs: dict[str, Tensor], index: int) -> None:
        """Refuse a batch (model output, layer outputs) before its statistics are summed.

        MSE and BCE factorise their Hessian with one column per index of the output's last
        dimension (:meth:`LossSpec.hessian_sqrt_columns`): the last dimension is the feature
        dimension. A Conv2d's ``(N, C, H, W)`` map as the model output has a spatial last
        dimension, so every column would hold all channels of a location and ``G`` would get
        products between channels that the loss Hessian does not have (rank-deficient ``G``
        even for one conv layer and one datum, where KFAC is exact). Subclasses extend this.
        """
        if self.fisher_type != "type-2" or self.loss.kind not in ("mse", "bce") or self.loss.flat is not None:
            return
        for layer in self._layers:
            if isinstance(layer.module, nn.Conv2d) and outputs.get(layer.name) is output and output.dim() == 4:
                loss = "nn.MSELoss" if self.loss.kind == "mse" else "nn.BCEWithLogitsLoss"
                raise ValueError(
                    f"{type(self).__name__}(fisher_type='type-2') with {loss} takes the output's last dimension "
                    f"as the feature dimension, but the model output (shape {tuple(output.shape)}) is the "
                    f"(N, C, H, W) map of Conv2d {layer.name!r}, whose last dimension is spatial: the loss "
                    "Hessian's columns would couple the channels of every location and G would be wrong. "
                    "Put the channels last (return output.permute(0, 2, 3, 1) and permute the targets "
                    "alike), or use fisher_type='mc'"
                )

    # ------------------------------------------------------------ layers
    def _build_layers(self, owners: dict[int, list[tuple[str, nn.Module, str]]]) -> list[_Layer]:
        by_module: dict[int, _Layer] = {}
        order: list[_Layer] = []
        for index, p in enumerate(self.params):
            mod_name, module, attr = owners[id(p)][0]
            layer = by_module.get(id(module))
            if layer is None:
                weight = module.weight
                layer = _Layer(name=mod_name, module=module, weight=None, bias=None, joint=False,
                               out_features=weight.shape[0], in_features=weight[0].numel())
                by_module[id(module)] = layer
                order.append(layer)
            setattr(layer, attr, index)
        for layer in order:
            layer.joint = layer.weight is not None and layer.bias is not None and not self.separate_weight_and_bias
        return order

    def _block_specs(self, layer: _Layer) -> list[tuple[int | None, int | None]]:
        """(weight, bias) positions of the blocks of one layer."""
        if layer.joint or layer.bias is None or layer.weight is None:
            return [(layer.weight, layer.bias)]
        return [(layer.weight, None), (None, layer.bias)]

    def _input_rows(self, layer: _Layer, x: Tensor) -> Tensor:
        """Per-sample input rows ``(N, R, in)`` of one layer call (R = weight-sharing size)."""
        module = layer.module
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:  # unbatched input
                x = x.unsqueeze(0)
            return _conv_patches(module, x)
        if x.dim() == 1:
            return x.reshape(1, 1, -1)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def _grad_rows(layer: _Layer, g: Tensor) -> Tensor:
        """Per-sample output-gradient rows ``(N, R, out)``, in the order of :meth:`_input_rows`."""
        if isinstance(layer.module, nn.Conv2d):
            if g.dim() == 3:
                g = g.unsqueeze(0)
            return g.flatten(2).transpose(1, 2)
        if g.dim() == 1:
            return g.reshape(1, 1, -1)
        return g.reshape(g.shape[0], -1, g.shape[-1])

    # ------------------------------------------------------------ data passes
    def _record_forward(self, inputs: Any, on_input: Callable[[_Layer, Tensor], Any]) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """Forward pass with hooks on the layers.

        Returns the model output, ``on_input(layer, x)`` per layer (computed inside the
        hook, before later in-place operations can change ``x``), and each layer's output
        tensor (with its graph), guarded against in-place modification downstream.
        """
        for _ in range(2):
            results: dict[str, Any] = {}
            outputs: dict[str, tuple[Tensor, int]] = {}

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor, layer: _Layer) -> Tensor | None:
                if layer.name in outputs:
                    raise ValueError(
                        f"layer {layer.name!r} is called more than once in one forward pass (weight "
                        "sharing across calls); KFAC supports one call per layer: leave its "
                        "parameters out with params=..."
                    )
                x = args[0] if args else kwargs.get("input")
                results[layer.name] = on_input(layer, x.detach())
                outputs[layer.name] = (output, output._version)
                if layer.name in self._clone_outputs:
                    # A later in-place op (e.g. ReLU(inplace=True)) would overwrite the
                    # output; hand the network a copy and keep the original.
                    return output.clone()
                return None

            handles = [layer.module.register_forward_hook(partial(hook, layer=layer), with_kwargs=True)
                       for layer in self._layers]
            try:
                with torch.enable_grad():
                    output = self.forward(inputs)
            finally:
                for h in handles:
                    h.remove()
            missing = [layer.name for layer in self._layers if layer.name not in outputs]
            if missing:
                raise ValueError(
                    f"layers {missing} were not called through their forward (their parameters are "
                    "used functionally, e.g. nn.MultiheadAttention's out_proj, or not at all); KFAC "
                    "cannot see their inputs: leave their parameters out with params=..."
                )
            modified = {n for n, (z, version) in outputs.items() if z._version != version}
            if not modified:
                return output, results, {n: z for n, (z, _) in outputs.items()}
            self._clone_outputs |= modified
        raise RuntimeError("layer outputs are still modified in place after cloning them")  # pragma: no cover

    def _columns(self, output: Tensor, target: Any, index: int) -> Iterator[Tensor]:
        """The output-space vectors ``s_k`` of one batch (see the module docstring)."""
        if self.fisher_type == "type-2":
            yield from self.loss.hessian_sqrt_columns(output, target)
        elif self.fisher_type == "empirical":
            yield self.loss.output_gradient(output, target)
        else:
            generator = torch.Generator(device=output.device)
            # The stream of FisherOperator(kind="mc"): one per (seed, batch).
            generator.manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))
            samples = self.loss.sample_output_gradients(output, target, self.mc_samples, generator)
            yield from (samples / math.sqrt(self.mc_samples)).unbind(0)

    def _layer_grads(self, output: Tensor, outputs: dict[str, Tensor], column: Tensor) -> dict[str, Tensor | None]:
        """Gradients of ``⟨output, column⟩`` w.r.t. every layer output (None if unused)."""
        names = list(outputs)
        grads = torch.autograd.grad(output, [outputs[n] for n in names], grad_outputs=column,
                                    retain_graph=True, allow_unused=True)
        return dict(zip(names, grads))

    def _check_layer_gradients(self, output: Tensor, target: Any, outputs: dict[str, Tensor],
                               rows: dict[str, Tensor]) -> None:
        """Check on one batch that each layer's parameter gradient is ``Σ_rows g aᵀ``.

        A mismatch means a parameter is used outside its layer's forward (tied weights, a
        functional call) or the layer computes something else than ``W a + b``: KFAC would
        silently be the curvature of a different model.
        """
        loss = self.loss.batch_sum(output, target)
        names = list(outputs)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names] + list(self.params),
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
        by_name = dict(zip(names, grads[:len(names)]))
        param_grads = grads[len(names):]
        tol = float(torch.finfo(self.torch_dtype).eps) ** 0.5
        for layer in self._layers:
            g = self._grad_rows(layer, by_name[layer.name]).reshape(-1, layer.out_features)
            checks = []
            if layer.weight is not None:
                a = rows[layer.name].reshape(-1, layer.in_features)
                checks.append((layer.weight, g.T @ a, float(g.norm() * a.norm())))
            if layer.bias is not None:
                checks.append((layer.bias, g.sum(0), float(g.norm()) * g.shape[0] ** 0.5))
            for index, ours, bound in checks:
                theirs = param_grads[index].reshape(ours.shape)
                err = float((ours - theirs).norm())
                if not err <= tol * (bound + float(theirs.norm())) + torch.finfo(self.torch_dtype).tiny:
                    raise ValueError(
                        f"the gradient of parameter {self.param_names[index]!r} is not that of its layer "
                        f"{layer.name!r} (relative mismatch {err / max(float(theirs.norm()), 1e-300):.3g}): "
                        "the parameter is used outside the layer's forward (tied weights, a functional "
                        "call) or the layer is not a plain Linear/Conv2d; KFAC cannot represent it"
                    )

    def _kronecker_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One pass over the data: ``A`` and ``G`` of every layer (see the module docstring)."""
        reduce = self.kfac_approx == "reduce"
        layers = {layer.name: layer for layer in self._layers}
        # Running sums, updated in place: Σ aᵀa, Σ a (the bias row of a joint A), rows, Σ gᵀg.
        gram: dict[str, Tensor] = {}
        total: dict[str, Tensor] = {}
        num_rows: dict[str, int] = {layer.name: 0 for layer in self._layers}
        G_sum = {layer.name: torch.zeros(layer.out_features, layer.out_features, dtype=self.torch_dtype,
                                         device=self.device) for layer in self._layers}
        check = self._check_structure

        def on_input(layer: _Layer, x: Tensor) -> tuple[Tensor, Tensor, int, Tensor | None] | None:
            if layer.weight is None:  # bias only: A = [[1]], no input statistics needed
                return None
            per_sample = self._input_rows(layer, x)
            a = per_sample.mean(1) if reduce else per_sample.reshape(-1, per_sample.shape[-1])
            rows = per_sample.clone() if check else None  # kept for the structure check only
            return a.T @ a, a.sum(0), a.shape[0], rows

        for index, inputs, target in self._batches():
            output, results, outputs = self._record_forward(inputs, on_input)
            # NaN/Inf in a layer reaches the output; the sums below carry it to the factors,
            # which are checked once at the end. Checking the (small) output names the batch.
            if not all_finite(output):
                raise FloatingPointError(f"the model output of batch {index} is NaN or Inf")
            self._check_output(output, outputs, index)
            if check:
                self._check_layer_gradients(output, target, outputs, {n: r[3] for n, r in results.items() if r})
                check = False
            for name, r in results.items():
                if r is None:
                    continue
                if name in gram:
                    gram[name] += r[0]
                    total[name] += r[1]
                else:
                    gram[name], total[name] = r[0], r[1]
                num_rows[name] += r[2]
            del results
            for column in self._columns(output.detach(), target, index):
                for name, g in self._layer_grads(output, outputs, column).items():
                    if g is None:
                        continue
                    rows = self._grad_rows(layers[name], g)
                    rows = rows.sum(1) if reduce else rows.reshape(-1, rows.shape[-1])
                    G_sum[name].addmm_(rows.T, rows)
            del output, outputs
        if self.parallel is not None:  # DDP: the factors of the global data set
            rows = torch.tensor([float(num_rows[n]) for n in sorted(num_rows)], dtype=torch.float64,
                                device=self.device)
            self._sum_over_ranks([rows] + [gram[n] for n in sorted(gram)] + [total[n] for n in sorted(total)]
                                 + [G_sum[n] for n in sorted(G_sum)])
            num_rows = {n: int(r) for n, r in zip(sorted(num_rows), rows.tolist())}
        A: dict[str, Tensor] = {}
        G: dict[str, Tensor] = {}
        for layer in self._layers:
            G[layer.name] = G_sum[layer.name] * self.scale
            factors = [G[layer.name]]
            if layer.weight is not None:
                n = max(num_rows[layer.name], 1)
                A_w = gram[layer.name] / n
                if layer.joint:
                    mean = (total[layer.name] / n).unsqueeze(1)
                    one = torch.ones(1, 1, dtype=A_w.dtype, device=A_w.device)
                    A_w = torch.cat([torch.cat([A_w, mean], 1), torch.cat([mean.T, one], 1)], 0)
                A[layer.name] = A_w
                factors.append(A_w)
            if not all(all_finite(f) for f in factors):
                raise FloatingPointError(f"the Kronecker factors of layer {layer.name!r} are NaN or Inf (overflow?)")
        return A, G

    def _make_blocks(self, A: dict[str, Tensor], G: dict[str, Tensor]) -> list[KroneckerBlock]:
        one = torch.ones(1, 1, dtype=self.torch_dtype, device=self.device)
        blocks = []
        for layer in self._layers:
            specs = self._block_specs(layer)
            for weight, bias in specs:
                factor_A = one if weight is None else A[layer.name]
                names = tuple(self.param_names[i] for i in (weight, bias) if i is not None)
                blocks.append(KroneckerBlock(layer.name, names, weight, bias, G[layer.name], factor_A))
        return blocks

    # ------------------------------------------------------------ block products
    def _blockwise(self, V: list[Tensor], apply: Callable[[int, Tensor], Tensor]) -> list[Tensor]:
        return _blockwise(V, self._block_layout, self.param_shapes, apply)

    @property
    def is_positive_semidefinite(self) -> bool:
        """True: every block is a Kronecker product (or eigen-form) of PSD factors."""
        return True

    def _raise_nonfinite_product(self, V: list[Tensor]) -> None:
        # The product involves no data: a non-finite result is an overflow of the factors.
        raise FloatingPointError("the Kronecker-factored product overflowed (NaN or Inf)")

    # ------------------------------------------------------------ eigen-form helpers
    def _eigen_form(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per block ``(Q_G, Q_A, D)`` with the block ``= (Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ``."""
        raise NotImplementedError

    def _eigen_diagonal(self) -> Tensor:
        forms = self._eigen_form()

        def apply(i: int, M: Tensor) -> Tensor:
            QG, QA, D = forms[i]
            return QG.square() @ D @ QA.square().T
        ones = [torch.ones(1, *s, dtype=self.torch_dtype, device=self.device) for s in self.param_shapes]
        return torch.cat([o.reshape(-1) for o in self._blockwise(ones, apply)])

    def inverse(self, damping: float, *, method: str = "exact") -> "KroneckerInverseOperator":
        """The damped inverse ``(K + δ I)⁻¹`` as a linear operator (numpy and torch).

        Parameters
        ----------
        damping : float
            ``δ ≥ 0``; ``δ = 0`` only if the operator is non-singular.
        method : {"exact"}
            Exact damping through the eigenbases: per block
            ``(Q_G ⊗ Q_A) diag(1 / (d + δ)) (Q_G ⊗ Q_A)ᵀ``.

        Raises
        ------
        ValueError
            If ``δ < 0``, not finite, or ``δ = 0`` and the operator is singular.
        """
        if method != "exact":
            raise ValueError(f"{type(self).__name__}.inverse supports method='exact' only, got {method!r}")
        delta = _check_damping(damping, allow_zero=True)
        forms = []
        for QG, QA, D in self._eigen_form():
            denom = D.clamp_min(0) + delta
            if not bool((denom > 0).all()):
                raise ValueError("the operator is singular: pass damping > 0")
            forms.append((QG, QA, 1.0 / denom))
        return KroneckerInverseOperator(self, forms, description=f"exact, damping={delta:g}")


# ============================================================== KFAC
class KFACOperator(_KroneckerOperator):
    """KFAC approximation of the GGN / Fisher as a linear operator (D, D).

    Block-diagonal over the supported layers (``nn.Linear`` with any leading
    weight-sharing dimensions, ``nn.Conv2d`` with any stride, padding, dilation and
    padding mode, ``groups=1``), each block ``G ⊗ A`` in the flattening convention of
    the module docstring (``W.reshape(-1)`` row-major: ``G`` outer, ``A`` inner; the
    bias, by default, the last input column of ``A``). The Kronecker factors are
    computed in one pass over the data at construction; products, :meth:`trace`,
    :meth:`logdet`, :meth:`frobenius_norm`, :meth:`diagonal`, :meth:`eigenvalues` and
    :meth:`inverse` never form the dense matrix. ``to_dense()``, numpy/torch dispatch
    and input checks come from :class:`~curvops.operators.base.CurvatureOperator`.

    Parameters
    ----------
    model, loss_fn, data, params, check_deterministic
        See :class:`~curvops.operators.base.CurvatureOperator`. Losses:
        ``nn.CrossEntropyLoss`` (``ignore_index``, class weights, label smoothing),
        ``nn.MSELoss``, ``nn.BCEWithLogitsLoss``, mean or sum; a custom callable only
        with ``fisher_type="empirical"``.
    fisher_type : {"type-2", "mc", "empirical"}, optional
        Which curvature ``G`` approximates (default ``"type-2"``: the GGN).
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
        :attr:`seed`.
    check_deterministic : bool, optional
        Besides the base class's checks, verify on the first batch that every selected
        weight's and bias's gradient equals ``Σ_rows g aᵀ`` (``Σ_rows g``) from its layer's
        inputs and output gradients; this catches parameters also used outside their
        layer (tied or functional uses) that KFAC would silently misrepresent. Default True.

    Raises
    ------
    ValueError
        Bad option; parameters of unsupported layers (``unsupported="raise"``); a
        parameter shared by two layers (tied weights: rejected, since no Kronecker block
        represents it); ``Conv2d`` with ``groups > 1``; a layer called more than once per
        forward or not through its forward; an unsupported loss.

    Attributes
    ----------
    blocks : list of KroneckerBlock
        The factors, one entry per block.
    """

    def _after_factors(self) -> None:
        # Factor eigendecompositions are computed on first use (inverse, logdet, ...).
        self._eigen_cache: list[KroneckerEigen] | None = None

    def _products(self, V, only=None):
        def apply(i: int, M: Tensor) -> Tensor:
            block = self.blocks[i]
            return block.G @ M @ block.A
        return self._blockwise(V, apply), [], []

    # ------------------------------------------------------------ closed forms
    def eigendecomposition(self) -> list[KroneckerEigen]:
        """Eigendecompositions of both factors of every block (``torch.linalg.eigh``, cached).

        The block's eigenvalues are the products ``λ_i μ_j`` with eigenvectors
        ``q_i ⊗ u_j`` (in the block's ``[W | b]`` layout).
        """
        if self._eigen_cache is None:
            cache = []
            for b in self.blocks:
                lg, qg = torch.linalg.eigh(b.G)
                la, qa = torch.linalg.eigh(b.A)
                cache.append(KroneckerEigen(b.name, b.param_names, lg, qg, la, qa))
            self._eigen_cache = cache
        return self._eigen_cache

    def _eigen_form(self):
        # PSD factors: tiny negative eigenvalues are rounding, clamp them.
        return [(e.G_eigenvectors, e.A_eigenvectors,
                 torch.outer(e.G_eigenvalues.clamp_min(0), e.A_eigenvalues.clamp_min(0)))
                for e in self.eigendecomposition()]

    def trace(self) -> Tensor:
        """``Σ_blocks tr(G) tr(A)`` (0-d tensor)."""
        return sum(torch.trace(b.G) * torch.trace(b.A) for b in self.blocks)

    def frobenius_norm(self) -> Tensor:
        """``sqrt(Σ_blocks ‖G‖_F² ‖A‖_F²)`` (0-d tensor)."""
        return torch.sqrt(sum(b.G.square().sum() * b.A.square().sum() for b in self.blocks))

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + δ I) = Σ_blocks Σ_ij log(λ_i μ_j + δ)`` (0-d tensor; ``-inf`` if singular)."""
        delta = _check_damping(damping, allow_zero=True)
        return sum(torch.log(D + delta).sum() for _, _, D in self._eigen_form())

    def diagonal(self) -> Tensor:
        """Diagonal (D,) in the operator's layout: ``diag(G)[o] · diag(A)[i]``."""
        ones = [torch.ones(1, *s, dtype=self.torch_dtype, device=self.device) for s in self.param_shapes]

        def apply(i: int, M: Tensor) -> Tensor:
            b = self.blocks[i]
            return torch.outer(torch.diagonal(b.G), torch.diagonal(b.A))
        return torch.cat([o.reshape(-1) for o in self._blockwise(ones, apply)])

    def eigenvalues(self) -> Tensor:
        """All D eigenvalues ``λ_i μ_j`` of all blocks, ascending (D,)."""
        return torch.sort(torch.cat([D.reshape(-1) for _, _, D in self._eigen_form()])).values

    def inverse(self, damping: float, *, method: str = "exact") -> "KroneckerInverseOperator":
        """The damped inverse as a linear operator (numpy and torch), per block.

        Parameters
        ----------
        damping : float
            ``δ``. ``method="exact"`` needs ``δ ≥ 0`` (``δ = 0`` only if ``K`` is
            non-singular); the factor-wise methods need ``δ > 0``.
        method : {"exact", "pi", "plain"}, optional
            - ``"exact"`` (default): ``(G ⊗ A + δ I)⁻¹`` through the factor eigenbases,
              ``(Q_G ⊗ Q_A) diag(1 / (λ_i μ_j + δ)) (Q_G ⊗ Q_A)ᵀ``.
            - ``"pi"``: factor-wise damping with Martens & Grosse's π correction,
              ``(G + (√δ/π) I)⁻¹ ⊗ (A + π√δ I)⁻¹``, ``π² = (tr A / dim A) / (tr G / dim G)``
              (π = 1 if either trace is 0). Not ``(K + δI)⁻¹``: a cheaper heuristic.
            - ``"plain"``: ``(G + √δ I)⁻¹ ⊗ (A + √δ I)⁻¹``.

        Raises
        ------
        ValueError
            Unknown method; ``δ`` negative or not finite; ``δ = 0`` where not allowed.
        """
        if method not in INVERSE_METHODS:
            raise ValueError(f"method must be one of {INVERSE_METHODS}, got {method!r}")
        if method == "exact":
            return super().inverse(damping)
        delta = _check_damping(damping, allow_zero=False)
        forms = []
        root = math.sqrt(delta)
        for b, e in zip(self.blocks, self.eigendecomposition()):
            pi = 1.0
            if method == "pi":
                tr_a = float(torch.trace(b.A)) / b.A.shape[0]
                tr_g = float(torch.trace(b.G)) / b.G.shape[0]
                pi = math.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0
            lg = e.G_eigenvalues.clamp_min(0) + root / pi
            la = e.A_eigenvalues.clamp_min(0) + root * pi
            forms.append((e.G_eigenvectors, e.A_eigenvectors, 1.0 / torch.outer(lg, la)))
        return KroneckerInverseOperator(self, forms, description=f"{method}, damping={delta:g}")

    def __repr__(self) -> str:
        return (f"KFACOperator(D={self.shape[0]}, blocks={len(self.blocks)}, fisher_type={self.fisher_type!r}, "
                f"kfac_approx={self.kfac_approx!r}, loss={self.loss.kind}/{self.loss.reduction}, "
                f"dtype={self.torch_dtype}, device={self.device})")


# ============================================================== inverse
class KroneckerInverseOperator(TorchLinearOperator):
    """A block-diagonal operator ``(Q_G ⊗ Q_A) diag(vec D) (Q_G ⊗ Q_A)ᵀ`` per block.

    Returned by ``inverse()`` of :class:`KFACOperator` and :class:`EKFACOperator`: a
    symmetric positive definite scipy ``LinearOperator`` (D, D) in the parent's layout
    that multiplies numpy arrays and torch tensors (dispatch and checks from
    :class:`~curvops.operators.base.TorchLinearOperator`).
    """

    is_symmetric = True

    def __init__(self, parent: _KroneckerOperator, forms: list[tuple[Tensor, Tensor, Tensor]],
                 description: str) -> None:
        super().__init__(parent.shape, parent.torch_dtype, parent.device)
        self.param_names = parent.param_names
        self.param_shapes = parent.param_shapes
        self.param_numels = parent.param_numels
        self._forms = forms
        self._block_layout = parent._block_layout
        self._parent_name = type(parent).__name__
        self._description = description

    @property
    def is_positive_semidefinite(self) -> bool:
        return True

    def _apply(self, X: Tensor) -> Tensor:
        k = X.shape[1]
        V = [t.reshape(k, *s) for t, s in zip(X.T.split(self.param_numels, dim=1), self.param_shapes)]

        def apply(i: int, M: Tensor) -> Tensor:
            QG, QA, D = self._forms[i]
            return QG @ ((QG.T @ M @ QA) * D) @ QA.T
        out = _blockwise(V, self._block_layout, self.param_shapes, apply)
        result = torch.cat([o.reshape(k, -1) for o in out], dim=1).T.contiguous()
        if not all_finite(result):
            raise FloatingPointError("the inverse product overflowed (NaN or Inf)")
        return result

    # symmetric: scipy's adjoint/transpose are the operator itself
    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> "KroneckerInverseOperator":
        return self

    def _transpose(self) -> "KroneckerInverseOperator":
        return self

    def _parameter_shapes(self) -> list[torch.Size]:
        return list(self.param_shapes)

    def __repr__(self) -> str:
        return f"KroneckerInverseOperator(D={self.shape[0]}, of={self._parent_name}, {self._description})"


# ============================================================== helpers
Layout = list[tuple[int | None, int | None, int]]


def _blockwise(V: list[Tensor], layout: Layout, shapes: list[torch.Size],
               apply: Callable[[int, Tensor], Tensor]) -> list[Tensor]:
    """Apply ``apply(i, M)`` to every block's part ``M = [V_W | v_b]`` (k, out, q) of ``V``.

    For ``k = 1`` ``M`` is passed as a matrix (out, q); ``apply`` must handle both.

    ``V`` holds one tensor ``(k, *param.shape)`` per parameter; ``layout[i]`` is block i's
    (weight position, bias position, out). Returns the results in the same format.
    """
    out: list[Tensor | None] = [None] * len(V)
    for i, (weight, bias, p) in enumerate(layout):
        k = V[0].shape[0]
        parts = []
        if weight is not None:
            parts.append(V[weight].reshape(k, p, -1))
        if bias is not None:
            parts.append(V[bias].reshape(k, p, 1))
        M = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        # One vector: plain 2-D matrix products (no batched-GEMM dispatch).
        M = apply(i, M[0]).unsqueeze(0) if k == 1 else apply(i, M)
        if weight is not None and bias is not None:
            out[weight] = M[:, :, :-1].reshape(k, *shapes[weight])
            out[bias] = M[:, :, -1].reshape(k, *shapes[bias])
        elif weight is not None:
            out[weight] = M.reshape(k, *shapes[weight])
        else:
            out[bias] = M.reshape(k, *shapes[bias])
    return out  # type: ignore[return-value]


def _check_damping(damping: float, *, allow_zero: bool) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) and not (torch.is_tensor(damping) and damping.numel() == 1):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    value = float(damping)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"damping must be finite and {need}, got {value}")
    return value


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Parameter id -> the (module name, module, attribute) registrations holding it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            owners.setdefault(id(p), []).append((mod_name, module, attr))
    return owners


def _classify(names: list[str], params: list[nn.Parameter], owners: dict[int, list[tuple[str, nn.Module, str]]],
              unsupported: str) -> tuple[list[nn.Parameter], list[str]]:
    """Split the selection into supported parameters and the rest; raise as configured."""
    keep, bad = [], []
    for name, p in zip(names, params):
        regs = owners.get(id(p), [])
        if len(regs) > 1:
            where = ", ".join(f"{m!r}.{a} ({type(mod).__name__})" for m, mod, a in regs)
            raise ValueError(
                f"parameter {name!r} is shared by several layers ({where}); tied parameters have no "
                "Kronecker-factored block: leave it out with params=..."
            )
        if regs:
            mod_name, module, attr = regs[0]
            if isinstance(module, _SUPPORTED_LAYERS) and attr in ("weight", "bias"):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise ValueError(
                        f"parameter {name!r} belongs to Conv2d {mod_name!r} with groups={module.groups}; "
                        "KFAC supports groups=1 only: leave it out with params=..."
                    )
                keep.append(p)
                continue
            bad.append(f"{name} ({type(module).__name__})")
        else:  # pragma: no cover - every parameter of a model is registered somewhere
            bad.append(name)
    if bad and unsupported == "raise":
        raise ValueError(
            f"parameters {bad} are not the weight or bias of an nn.Linear or nn.Conv2d layer; KFAC "
            "has no Kronecker factors for them. Select the supported layers with params=..., or "
            "pass unsupported='exclude' to leave them out of the operator"
        )
    if not keep:
        raise ValueError(f"no selected parameter belongs to a supported layer (nn.Linear, nn.Conv2d); excluded: {bad}")
    return keep, [b.split(" (")[0] for b in bad]


def _conv_padding(module: nn.Conv2d) -> tuple[list[int], str]:
    """Explicit padding ``[left_w, right_w, top_h, bottom_h]`` for ``F.pad`` and its mode."""
    pads: list[int] = []
    for dim in (1, 0):  # F.pad wants the last dimension first
        if isinstance(module.padding, str):
            if module.padding == "valid":
                left = right = 0
            else:  # "same": torch puts the odd extra element on the right
                total = module.dilation[dim] * (module.kernel_size[dim] - 1)
                left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[dim]
        pads += [left, right]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return pads, mode


def _conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Input patches of a Conv2d, ``(N, L, c_in·k1·k2)`` with L the output locations.

    The patch order ``(c_in, k1, k2)`` is that of the weight flattened row-major.
    """
    pads, mode = _conv_padding(module)
    padding: tuple[int, int] = (0, 0)
    if mode == "constant" and pads[0] == pads[1] and pads[2] == pads[3]:
        padding = (pads[2], pads[0])  # symmetric zero padding: let unfold pad, no copy
    elif any(pads):
        x = F.pad(x, pads, mode=mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return patches.transpose(1, 2)
