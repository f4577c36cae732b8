"""The factor-collection step of KFAC and EKFAC: passes over the data that return Kronecker factors.

``KFACComputer`` runs the model once over the data with hooks on the supported
layers (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``) and returns one
``KroneckerBlock`` ``G ⊗ A`` per block, as defined in
``curvops.operators.kfac`` (Martens & Grosse 2015; convolutions: Grosse & Martens
2016; "expand" and "reduce": Eschenhagen et al. 2023):

    A = (1/M) Σ_rows a aᵀ,        G = c Σ_rows Σ_k g_k g_kᵀ,

``a`` the layer input rows, ``g_k`` the gradients w.r.t. the layer output of
``Σ ⟨output, s_k⟩`` for the output-space vectors ``s_k`` of the chosen ``fisher_type``,
``M`` the number of rows and ``c`` the objective's scale. Under DDP the sums are added
over the ranks once, at the end.

``EKFACComputer`` refuses the outputs whose per-sample gradients do not factorise
the curvature block (see ``curvops.operators.ekfac``) already during that pass, and
adds the second pass of George et al. (2018): the corrected eigenvalues
``S[i, j] = c Σ_n Σ_k (Q_Gᵀ Γ_{n,k} Q_A)[i, j]²`` of the per-sample gradients ``Γ``.

Both read the model, the data and the objective from a
[`CurvatureOperator`][curvops.CurvatureOperator] (its ``_batches``, ``forward``,
``loss``, ``scale``, parameter selection and ``_sum_over_ranks``); they never multiply
vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvops._finite import all_finite
from curvops.operators._loss import LossSpec
from curvops.operators.base import CurvatureOperator, ParamSelection, _select_parameters
from curvops.operators.kronecker import KroneckerBlock

#: Curvatures a KFAC ``G`` can approximate (see ``KFACComputer``).
FISHER_TYPES = ("type-2", "mc", "empirical")
#: Treatments of weight-sharing dimensions (Eschenhagen et al. 2023).
KFAC_APPROXIMATIONS = ("expand", "reduce")
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
# Elements per chunk when per-sample quantities are formed (EKFAC): bounds peak memory.
_CHUNK_ELEMENTS = 1 << 24

Owners = dict[int, list[tuple[str, nn.Module, str]]]


@dataclass
class KFACLayer:
    """A supported layer whose parameters are (partly) selected.

    Attributes
    ----------
    name : str
        Module name in the model.
    module : nn.Module
        The ``nn.Linear`` or ``nn.Conv2d``.
    weight, bias : int or None
        Positions of its weight and bias in the selected parameters (None: not selected).
    joint : bool
        Whether weight and bias form one block (the bias as the last input column of ``A``).
    out_features : int
        Rows of the weight matrix.
    in_features : int
        Columns of the weight matrix (``c_in·k1·k2`` for a Conv2d).
    """

    name: str
    module: nn.Module
    weight: int | None
    bias: int | None
    joint: bool
    out_features: int
    in_features: int

    def block_positions(self) -> list[tuple[int | None, int | None]]:
        """(weight, bias) positions of the layer's blocks: one joint block, or one per parameter."""
        if self.joint or self.bias is None or self.weight is None:
            return [(self.weight, self.bias)]
        return [(self.weight, None), (None, self.bias)]


# ============================================================== parameter selection
def select_supported_parameters(
    model: nn.Module, params: ParamSelection, unsupported: str
) -> tuple[list[nn.Parameter], list[str]]:
    """Split a parameter selection into the weights/biases of supported layers and the rest.

    Parameters
    ----------
    model : nn.Module
        The (unwrapped) model.
    params : None, str, list of str, or list of parameters
        The selection, as for every curvature operator.
    unsupported : {"raise", "exclude"}
        What to do with selected parameters that are not the weight or bias of a supported layer.

    Returns
    -------
    keep : list of nn.Parameter
        The supported parameters, in ``named_parameters()`` order.
    excluded : list of str
        Names of the parameters left out (``unsupported="exclude"``).

    Raises
    ------
    ValueError
        A parameter shared by several layers; a Conv2d with ``groups > 1``; unsupported
        parameters with ``unsupported="raise"``; no supported parameter at all.
    """
    names, chosen = _select_parameters(model, params)
    owners = _owners(model)
    keep, bad = [], []
    for name, p in zip(names, chosen):
        registrations = owners.get(id(p), [])
        if len(registrations) > 1:
            where = ", ".join(f"{m!r}.{a} ({type(mod).__name__})" for m, mod, a in registrations)
            raise ValueError(
                f"parameter {name!r} is shared by several layers ({where}); tied parameters have no "
                "Kronecker-factored block: leave it out with params=..."
            )
        if registrations:
            mod_name, module, attr = registrations[0]
            if isinstance(module, SUPPORTED_LAYERS) and attr in ("weight", "bias"):
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
        raise ValueError(
            f"no selected parameter belongs to a supported layer (nn.Linear, nn.Conv2d); excluded: {bad}"
        )
    return keep, [b.split(" (")[0] for b in bad]


def _owners(model: nn.Module) -> Owners:
    """Parameter id -> the (module name, module, attribute) registrations holding it."""
    owners: Owners = {}
    seen: set[tuple[int, str]] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            owners.setdefault(id(p), []).append((mod_name, module, attr))
    return owners


# ============================================================== KFAC
class KFACComputer:
    """KFAC's factor-collection step: one pass over the data, the Kronecker factors of every block.

    Parameters
    ----------
    source : CurvatureOperator
        Model, data, loss, objective scale and parameter selection (all of whose parameters
        are weights/biases of supported layers, see ``select_supported_parameters``).
    fisher_type : {"type-2", "mc", "empirical"}
        Output-space vectors ``s_k`` backpropagated for ``G``: the columns of a symmetric
        factorisation of the loss Hessian (``LossSpec.hessian_sqrt_columns``; the GGN),
        output gradients with labels drawn from the model (divided by ``sqrt(mc_samples)``;
        the same draws as [`FisherOperator`][curvops.FisherOperator] with the same ``seed``), or the
        gradient of the batch loss (the empirical Fisher).
    mc_samples : int
        Label draws per loss term for ``"mc"``.
    kfac_approx : {"expand", "reduce"}
        ``"expand"``: every weight-sharing position of every sample is a row; ``"reduce"``:
        output gradients summed and inputs averaged over the weight-sharing dimensions.
    separate_weight_and_bias : bool
        Separate blocks for a layer's weight and bias instead of one joint block.
    seed : int
        Seed of the ``"mc"`` label draws.
    check_structure : bool
        Check on the first batch that every parameter's gradient is that of its layer.
    owner : str
        Name of the operator being built, for messages.
    """

    def __init__(
        self,
        source: CurvatureOperator,
        *,
        fisher_type: str,
        mc_samples: int,
        kfac_approx: str,
        separate_weight_and_bias: bool,
        seed: int,
        check_structure: bool,
        owner: str,
    ) -> None:
        self.source = source
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self.seed = seed
        self.owner = owner
        self._check_structure = check_structure
        self.layers = self._find_layers(separate_weight_and_bias)
        # Layers whose output a later in-place operation overwrites (found by _record_forward).
        self._clone_outputs: set[str] = set()

    def _find_layers(self, separate_weight_and_bias: bool) -> list[KFACLayer]:
        owners = _owners(self.source.model)
        by_module: dict[int, KFACLayer] = {}
        order: list[KFACLayer] = []
        for index, p in enumerate(self.source.params):
            mod_name, module, attr = owners[id(p)][0]
            layer = by_module.get(id(module))
            if layer is None:
                weight = cast(Tensor, module.weight)  # a supported layer (select_supported_parameters)
                layer = KFACLayer(
                    name=mod_name,
                    module=module,
                    weight=None,
                    bias=None,
                    joint=False,
                    out_features=int(weight.shape[0]),
                    in_features=weight[0].numel(),
                )
                by_module[id(module)] = layer
                order.append(layer)
            setattr(layer, attr, index)
        for layer in order:
            layer.joint = layer.weight is not None and layer.bias is not None and not separate_weight_and_bias
        return order

    # ------------------------------------------------------------ the pass
    def blocks(self) -> list[KroneckerBlock]:
        """One pass over the data: the factors ``G ⊗ A`` of every block, in parameter order.

        Returns
        -------
        list of KroneckerBlock
            One per block; a joint block's ``A`` has the bias as its last row and column.

        Raises
        ------
        ValueError
            A layer called more than once per forward or not through its forward; a
            parameter whose gradient is not that of its layer; an output the chosen
            ``fisher_type`` cannot factorise (see ``check_output``).
        FloatingPointError
            A non-finite model output or factor.
        """
        A, G = self._kronecker_factors()
        source = self.source
        one = torch.ones(1, 1, dtype=source.torch_dtype, device=source.device)
        blocks = []
        for layer in self.layers:
            for weight, bias in layer.block_positions():
                factor_A = one if weight is None else A[layer.name]
                names = tuple(source.param_names[i] for i in (weight, bias) if i is not None)
                blocks.append(KroneckerBlock(layer.name, names, weight, bias, G[layer.name], factor_A))
        return blocks

    def _kronecker_factors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``A`` and ``G`` of every layer (see the module docstring)."""
        source = self.source
        reduce = self.kfac_approx == "reduce"
        layers = {layer.name: layer for layer in self.layers}
        # Running sums, updated in place: Σ aᵀa, Σ a (the bias row of a joint A), rows, Σ gᵀg.
        gram: dict[str, Tensor] = {}
        total: dict[str, Tensor] = {}
        num_rows: dict[str, int] = {layer.name: 0 for layer in self.layers}
        G_sum = {
            layer.name: torch.zeros(
                layer.out_features, layer.out_features, dtype=source.torch_dtype, device=source.device
            )
            for layer in self.layers
        }
        check = self._check_structure

        def on_input(layer: KFACLayer, x: Tensor) -> tuple[Tensor, Tensor, int, Tensor | None] | None:
            if layer.weight is None:  # bias only: A = [[1]], no input statistics needed
                return None
            per_sample = input_rows(layer.module, x)
            a = per_sample.mean(1) if reduce else per_sample.reshape(-1, per_sample.shape[-1])
            rows = per_sample.clone() if check else None  # kept for the structure check only
            return a.T @ a, a.sum(0), a.shape[0], rows

        for index, inputs, target in source._batches():
            output, results, outputs = self._record_forward(inputs, on_input)
            # NaN/Inf in a layer reaches the output; the sums below carry it to the factors,
            # which are checked once at the end. Checking the (small) output names the batch.
            if not all_finite(output):
                raise FloatingPointError(f"the model output of batch {index} is NaN or Inf")
            self.check_output(output, outputs, index)
            if check:
                self._check_layer_gradients(
                    output, target, outputs, {n: r[3] for n, r in results.items() if r}
                )
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
                    rows = grad_rows(layers[name].module, g)
                    rows = rows.sum(1) if reduce else rows.reshape(-1, rows.shape[-1])
                    G_sum[name].addmm_(rows.T, rows)
            del output, outputs
        if source.parallel is not None:  # DDP: the factors of the global data set
            counts = torch.tensor(
                [float(num_rows[n]) for n in sorted(num_rows)], dtype=torch.float64, device=source.device
            )
            source._sum_over_ranks(
                [counts]
                + [gram[n] for n in sorted(gram)]
                + [total[n] for n in sorted(total)]
                + [G_sum[n] for n in sorted(G_sum)]
            )
            num_rows = {n: int(r) for n, r in zip(sorted(num_rows), counts.tolist())}
        A: dict[str, Tensor] = {}
        G: dict[str, Tensor] = {}
        for layer in self.layers:
            G[layer.name] = G_sum[layer.name] * source.scale
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
                raise FloatingPointError(
                    f"the Kronecker factors of layer {layer.name!r} are NaN or Inf (overflow?)"
                )
        return A, G

    def check_output(self, output: Tensor, outputs: dict[str, Tensor], index: int) -> None:
        """Refuse a batch (model output, layer outputs) before its statistics are summed.

        MSE and BCE factorise their Hessian with one column per index of the output's last
        dimension (``LossSpec.hessian_sqrt_columns``): the last dimension is the feature
        dimension. A Conv2d's ``(N, C, H, W)`` map as the model output has a spatial last
        dimension, so every column would hold all channels of a location and ``G`` would get
        products between channels that the loss Hessian does not have (rank-deficient ``G``
        even for one conv layer and one datum, where KFAC is exact).

        Parameters
        ----------
        output : Tensor
            The model output of batch ``index`` (with its graph).
        outputs : dict of str to Tensor
            Each layer's output in that forward pass.
        index : int
            The batch's index, for messages.

        Raises
        ------
        ValueError
            For ``fisher_type="type-2"`` with MSE or BCE on a Conv2d's ``(N, C, H, W)`` map.
        """
        loss = self.source.loss
        if self.fisher_type != "type-2" or loss.kind not in ("mse", "bce") or loss.flat is not None:
            return
        for layer in self.layers:
            if (
                isinstance(layer.module, nn.Conv2d)
                and outputs.get(layer.name) is output
                and output.dim() == 4
            ):
                name = "nn.MSELoss" if loss.kind == "mse" else "nn.BCEWithLogitsLoss"
                raise ValueError(
                    f"{self.owner}(fisher_type='type-2') with {name} takes the output's last dimension "
                    f"as the feature dimension, but the model output (shape {tuple(output.shape)}) is the "
                    f"(N, C, H, W) map of Conv2d {layer.name!r}, whose last dimension is spatial: the loss "
                    "Hessian's columns would couple the channels of every location and G would be wrong. "
                    "Put the channels last (return output.permute(0, 2, 3, 1) and permute the targets "
                    "alike), or use fisher_type='mc'"
                )

    # ------------------------------------------------------------ one batch
    def _record_forward(
        self, inputs: Any, on_input: Callable[[KFACLayer, Tensor], Any]
    ) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
        """Forward pass with hooks on the layers.

        Returns the model output, ``on_input(layer, x)`` per layer (computed inside the
        hook, before later in-place operations can change ``x``), and each layer's output
        tensor (with its graph), guarded against in-place modification downstream.
        """
        for _ in range(2):
            results: dict[str, Any] = {}
            outputs: dict[str, tuple[Tensor, int]] = {}

            def hook(
                module: nn.Module,
                args: tuple,
                kwargs: dict,
                output: Tensor,
                layer: KFACLayer,
                results: dict[str, Any] = results,
                outputs: dict[str, tuple[Tensor, int]] = outputs,
            ) -> Tensor | None:
                if layer.name in outputs:
                    raise ValueError(
                        f"layer {layer.name!r} is called more than once in one forward pass (weight "
                        "sharing across calls); KFAC supports one call per layer: leave its "
                        "parameters out with params=..."
                    )
                x: Tensor = args[0] if args else kwargs["input"]
                results[layer.name] = on_input(layer, x.detach())
                outputs[layer.name] = (output, output._version)
                if layer.name in self._clone_outputs:
                    # A later in-place op (e.g. ReLU(inplace=True)) would overwrite the
                    # output; hand the network a copy and keep the original.
                    return output.clone()
                return None

            handles = [
                layer.module.register_forward_hook(partial(hook, layer=layer), with_kwargs=True)
                for layer in self.layers
            ]
            try:
                with torch.enable_grad():
                    output = self.source.forward(inputs)
            finally:
                for h in handles:
                    h.remove()
            missing = [layer.name for layer in self.layers if layer.name not in outputs]
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
        """The output-space vectors ``s_k`` of one batch (see ``fisher_type``)."""
        loss = self.source.loss
        if self.fisher_type == "type-2":
            yield from loss.hessian_sqrt_columns(output, target)
        elif self.fisher_type == "empirical":
            yield loss.output_gradient(output, target)
        else:
            generator = torch.Generator(device=output.device)
            # The stream of FisherOperator(kind="mc"): one per (seed, batch).
            generator.manual_seed((self.seed * 1_000_003 + index) % (2**63 - 1))
            samples = loss.sample_output_gradients(output, target, self.mc_samples, generator)
            yield from (samples / math.sqrt(self.mc_samples)).unbind(0)

    @staticmethod
    def _layer_grads(output: Tensor, outputs: dict[str, Tensor], column: Tensor) -> dict[str, Tensor | None]:
        """Gradients of ``⟨output, column⟩`` w.r.t. every layer output (None if unused)."""
        names = list(outputs)
        grads = torch.autograd.grad(
            output, [outputs[n] for n in names], grad_outputs=column, retain_graph=True, allow_unused=True
        )
        return dict(zip(names, grads))

    def _check_layer_gradients(
        self, output: Tensor, target: Any, outputs: dict[str, Tensor], rows: dict[str, Tensor]
    ) -> None:
        """Check on one batch that each layer's parameter gradient is ``Σ_rows g aᵀ``.

        A mismatch means a parameter is used outside its layer's forward (tied weights, a
        functional call) or the layer computes something else than ``W a + b``: KFAC would
        silently be the curvature of a different model.
        """
        source = self.source
        loss = source.loss.batch_sum(output, target)
        names = list(outputs)
        grads = torch.autograd.grad(
            loss,
            [outputs[n] for n in names] + list(source.params),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        by_name = dict(zip(names, grads[: len(names)]))
        param_grads = grads[len(names) :]
        tol = float(torch.finfo(source.torch_dtype).eps) ** 0.5
        for layer in self.layers:
            g = grad_rows(layer.module, by_name[layer.name]).reshape(-1, layer.out_features)
            checks = []
            if layer.weight is not None:
                a = rows[layer.name].reshape(-1, layer.in_features)
                checks.append((layer.weight, g.T @ a, float(g.norm() * a.norm())))
            if layer.bias is not None:
                checks.append((layer.bias, g.sum(0), float(g.norm()) * g.shape[0] ** 0.5))
            for index, ours, bound in checks:
                theirs = param_grads[index].reshape(ours.shape)
                err = float((ours - theirs).norm())
                if not err <= tol * (bound + float(theirs.norm())) + torch.finfo(source.torch_dtype).tiny:
                    raise ValueError(
                        f"the gradient of parameter {source.param_names[index]!r} is not that of its layer "
                        f"{layer.name!r} (relative mismatch {err / max(float(theirs.norm()), 1e-300):.3g}): "
                        "the parameter is used outside the layer's forward (tied weights, a functional "
                        "call) or the layer is not a plain Linear/Conv2d; KFAC cannot represent it"
                    )


# ============================================================== EKFAC
class EKFACComputer(KFACComputer):
    """EKFAC's factor collection: KFAC's pass (with EKFAC's refusals), then the corrected eigenvalues.

    Per-sample gradients (``out × in`` each) are not formed where avoidable: without weight
    sharing ``S = (ĝ∘ĝ)ᵀ (â∘â)`` from the projected rows ``ĝ = g Q_G``, ``â = a Q_A``; with
    weight sharing ``R`` the cheaper in memory of the Gramian contraction
    (``N R² (out + in)`` numbers) and the projected per-sample gradients (``N out in``),
    in chunks of samples.

    Parameters are those of ``KFACComputer``.
    """

    def check_output(self, output: Tensor, outputs: dict[str, Tensor], index: int) -> None:
        """Refuse the outputs whose per-sample gradients do not factorise the block of ``fisher_type``.

        Besides KFAC's refusal (``KFACComputer.check_output``): a layer whose first
        dimension is not the output's sample dimension; ``"type-2"`` with several loss rows
        per sample; ``"empirical"`` cross-entropy over several positions per sample (see
        ``curvops.operators.ekfac``).

        Parameters
        ----------
        output : Tensor
            The model output of batch ``index``.
        outputs : dict of str to Tensor
            Each layer's output in that forward pass.
        index : int
            The batch's index, for messages.

        Raises
        ------
        ValueError
            On any of the refusals above.
        """
        loss = self.source.loss
        samples = _output_samples(loss, output)
        modules = {layer.name: layer.module for layer in self.layers}
        for name, z in outputs.items():
            layer_samples = _layer_samples(z, modules[name])
            if layer_samples != samples:
                raise ValueError(
                    f"EKFACOperator: layer {name!r} sees {layer_samples} samples in batch {index} where "
                    f"the model output (shape {tuple(output.shape)}) has {samples}: the corrected "
                    "eigenvalues need per-sample gradients, with every layer's first dimension indexing "
                    "the output's samples (a reshape that folds positions into the batch dimension mixes "
                    "them). Use KFACOperator, or keep the batch dimension first through the model"
                )
        rows = _loss_rows(loss, output) // max(samples, 1)
        if rows > 1 and self.fisher_type == "type-2":
            raise ValueError(
                f"EKFACOperator(fisher_type='type-2') with {rows} loss rows per sample (model output of "
                f"batch {index}: shape {tuple(output.shape)}) is not supported: the exact corrected "
                "eigenvalues need the gradient of every row's Hessian square-root columns separately, "
                f"{rows} times KFAC's "
                "backward passes, and summing the rows first would add cross-row products (silently wrong). "
                "Use fisher_type='mc' (an unbiased estimate of the same eigenvalues), KFACOperator, or give "
                "each sample one loss row (fold the positions into the batch dimension of the data if the "
                "model treats them independently)"
            )
        if rows > 1 and self.fisher_type == "empirical" and loss.kind == "cross_entropy":
            raise ValueError(
                f"EKFACOperator(fisher_type='empirical') with cross-entropy over {rows} positions per "
                f"sample (model output of batch {index}: shape {tuple(output.shape)}) is not supported: "
                "the empirical Fisher's terms are the positions (as in FisherOperator(kind='empirical')), "
                f"whose gradients would each need a backward pass ({rows} times KFAC's), and summing them "
                "per sample would add "
                "cross-position products (silently wrong). Use fisher_type='mc', "
                "KFACOperator(fisher_type='empirical'), or one position per sample"
            )
        super().check_output(output, outputs, index)

    def corrected_eigenvalues(
        self, blocks: list[KroneckerBlock], G_eigenvectors: list[Tensor], A_eigenvectors: list[Tensor]
    ) -> list[Tensor]:
        """Second pass over the data: ``S`` of every block in the given eigenbases.

        Parameters
        ----------
        blocks : list of KroneckerBlock
            The blocks of ``blocks``.
        G_eigenvectors, A_eigenvectors : list of Tensor
            Per block ``Q_G`` (out, out) and ``Q_A`` (q, q).

        Returns
        -------
        list of Tensor
            Per block ``S`` (out, q), scaled by the objective's ``c`` and summed over ranks.

        Raises
        ------
        FloatingPointError
            If a block's sums become NaN or Inf (the batch is named).
        """
        source = self.source
        by_layer: dict[str, list[int]] = {}
        for i, b in enumerate(blocks):
            by_layer.setdefault(b.name, []).append(i)
        modules = {layer.name: layer.module for layer in self.layers}
        sums = [
            torch.zeros(b.G.shape[0], b.A.shape[0], dtype=source.torch_dtype, device=source.device)
            for b in blocks
        ]

        def on_input(layer: KFACLayer, x: Tensor) -> list[Tensor | None]:
            # Projected per-sample input rows â (N, R, q) per block, formed inside the hook
            # (later in-place operations cannot change them); None for a bias-only block.
            rows = input_rows(layer.module, x) if layer.weight is not None else None
            projected: list[Tensor | None] = []
            for i in by_layer[layer.name]:
                block = blocks[i]
                if block.weight is None or rows is None:
                    projected.append(None)
                    continue
                a = rows
                if block.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                projected.append(a @ A_eigenvectors[i])
            return projected

        for index, inputs, target in source._batches():
            output, projected, outputs = self._record_forward(inputs, on_input)
            for column in self._columns(output.detach(), target, index):
                for name, g in self._layer_grads(output, outputs, column).items():
                    if g is None:
                        continue
                    rows = grad_rows(modules[name], g)
                    for i, a_hat in zip(by_layer[name], projected[name]):
                        g_hat = rows @ G_eigenvectors[i]
                        sums[i] += projected_second_moment(g_hat, a_hat)
            del output, outputs
            for i, s in enumerate(sums):
                if not all_finite(s):
                    raise FloatingPointError(
                        f"the corrected eigenvalues of layer {blocks[i].name!r} are NaN or Inf on batch "
                        f"{index}"
                    )
        source._sum_over_ranks(sums)
        return [s * source.scale for s in sums]


def projected_second_moment(g_hat: Tensor, a_hat: Tensor | None) -> Tensor:
    """``Σ_n (Σ_r g_hat[n, r] a_hat[n, r]ᵀ)²`` elementwise: the per-sample gradients' second moment.

    Parameters
    ----------
    g_hat : Tensor
        Projected output-gradient rows (N, R, p): N samples, R weight-sharing positions.
    a_hat : Tensor or None
        Projected input rows (N, R, q); None for a bias alone (``a = 1``, ``Q_A = [±1]``).

    Returns
    -------
    Tensor
        (p, q); (p, 1) for a bias alone.
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
            g = g_hat[start : start + step]
            a = a_hat[start : start + step]
            gram_g = (g.unsqueeze(2) * g.unsqueeze(1)).reshape(-1, p)
            gram_a = (a.unsqueeze(2) * a.unsqueeze(1)).reshape(-1, q)
            total += gram_g.T @ gram_a
    else:
        # Projected per-sample gradients, N p q numbers, chunked over samples.
        step = max(1, _CHUNK_ELEMENTS // (p * q))
        for start in range(0, N, step):
            per_sample = g_hat[start : start + step].transpose(1, 2) @ a_hat[start : start + step]
            total += per_sample.square().sum(0)
    return total


# ============================================================== layer rows
def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Per-sample input rows ``(N, R, in)`` of one layer call (R = weight-sharing size).

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer.
    x : Tensor
        Its input: (..., in) for Linear, (N, C, H, W) or (C, H, W) for Conv2d.

    Returns
    -------
    Tensor
        (N, R, in): a Conv2d's patches (R output locations, ``in = c_in·k1·k2``), a Linear's
        input with all middle dimensions as R.
    """
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        return _conv_patches(module, x)
    if x.dim() == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grad_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Per-sample output-gradient rows ``(N, R, out)``, in the order of ``input_rows``.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The layer.
    g : Tensor
        Gradient w.r.t. its output, shaped like the output.

    Returns
    -------
    Tensor
        (N, R, out).
    """
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    if g.dim() == 1:
        return g.reshape(1, 1, -1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


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


# ============================================================== EKFAC sample counting
def _output_samples(loss: LossSpec, output: Tensor) -> int:
    """Number of samples of a model output: its first dimension (an unbatched output is one)."""
    unbatched = output.dim() == 0 or (
        output.dim() == 1 and loss.kind == "cross_entropy" and loss.flat is None
    )
    return 1 if unbatched else int(output.shape[0])


def _loss_rows(loss: LossSpec, output: Tensor) -> int:
    """Number of loss rows of a model output (the blocks of ``LossSpec.hessian_sqrt_columns``)."""
    if loss.flat is not None:
        return int(cast(Any, loss.fn).flat_output(output.detach()).shape[0])
    if loss.kind == "cross_entropy":
        return 1 if output.dim() <= 1 else math.prod(output.shape) // int(output.shape[1])
    if output.dim() <= 1:
        return max(output.numel(), 1)
    return math.prod(output.shape[:-1])


def _layer_samples(z: Tensor, module: nn.Module) -> int:
    """Number of samples of a layer output, as ``grad_rows`` splits it."""
    unbatched = z.dim() == 3 if isinstance(module, nn.Conv2d) else z.dim() <= 1
    return 1 if unbatched else int(z.shape[0])
