"""A model, its data and a parameter selection: ``ModelOperator``.

What every model-based operator shares: the model (DDP/FSDP unwrapped), the re-iterable
batches, the selected parameters and the layout of a parameter-space vector, the forward
pass, and the forward-mode (``J v``) and reverse-mode (``Jᵀ u``) products of the model
output. ``ParameterBlock`` is a ``(k, D)`` block of parameter-space vectors seen per
parameter, the accumulator every product adds into.

Parameter order
---------------
Vectors are laid out in ``model.named_parameters()`` order (shared parameters once),
restricted to the selected parameters, each flattened row-major (``p.reshape(-1)``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvops.operators._forward_ad import tangent_rules
from curvops.operators._interface import TorchLinearOperator
from curvops.operators._parallel import Sharded, detect_parallel, fingerprint, local_tensor, shard_layout

#: What ``params=`` accepts: None (all parameters that require grad), glob pattern(s) on the
#: parameter names, or the model's parameters themselves.
ParamSelection = None | str | Sequence[str] | Sequence[nn.Parameter]


class ParameterBlock:
    """A ``(k, D)`` block of parameter-space vectors and its per-parameter views.

    ``flat`` holds the k vectors as rows; ``parts[i]`` is the ``(k, *shape_i)`` view of
    parameter i's entries. A product adds into ``parts`` in place, so ``flat`` is its result
    without a concatenation (a D-sized copy per product: 0.5 GB for a 124M-parameter model
    in float32).

    Parameters
    ----------
    flat : Tensor
        ``(k, D)`` row-major storage of the block (contiguous). Its contents are kept.
    numels : sequence of int
        Entries of each parameter (summing to D).
    shapes : sequence of torch.Size
        Shape of each parameter.
    """

    def __init__(self, flat: Tensor, numels: Sequence[int], shapes: Sequence[torch.Size]) -> None:
        k = flat.shape[0]
        self.flat = flat
        self.parts = [t.view(k, *s) for t, s in zip(flat.split(list(numels), dim=1), shapes)]

    @classmethod
    def zeros(
        cls,
        k: int,
        numels: Sequence[int],
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        into: Tensor | None = None,
    ) -> ParameterBlock:
        """A zero block of k vectors, in ``into``'s memory if given.

        Parameters
        ----------
        k : int
            Number of vectors (rows).
        numels, shapes
            Entries and shape of each parameter, as in the constructor.
        dtype, device
            Of a newly allocated block.
        into : Tensor, optional
            Contiguous ``(k, D)`` tensor to zero and use as the block (a caller's ``out``
            rows: the product is then written there, without a D-sized buffer or copy).

        Returns
        -------
        ParameterBlock
        """
        if into is not None:
            flat = into.zero_()
        else:
            flat = torch.zeros(k, sum(numels), dtype=dtype, device=device)
        return cls(flat, numels, shapes)

    def zero_(self) -> None:
        """Set every entry to zero (a product that restarts its pass)."""
        self.flat.zero_()


class ModelOperator(TorchLinearOperator):
    """A ``TorchLinearOperator`` defined by a model, its data and a parameter selection.

    Holds what every model-based operator shares: the model, the re-iterable data, the
    selected parameters (names, shapes, order), the forward pass, the batch iterator,
    and the forward-mode (``J v``) and reverse-mode (``Jᵀ u``) products of the model
    output w.r.t. the selected parameters. Subclasses call ``_set_model`` and
    ``_set_data_and_params``, then ``TorchLinearOperator.__init__`` with their shape.
    """

    def _set_model(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # DDP: run the wrapped module (its reducer is for training steps; products are
        # all-reduced once each here). FSDP2: run the sharded model itself.
        self.model, self.parallel = detect_parallel(model)
        meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(
                f"the model's {', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''} are on the meta "
                "device (shapes without values): materialise the model before building an operator, "
                "e.g. model.to_empty(device='cpu') and load_state_dict, or build it outside "
                "torch.device('meta')"
            )

    def _set_data_and_params(self, data: Iterable[tuple[Any, Any]], params: ParamSelection) -> None:
        if iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list of (inputs, targets) batches or a "
                f"DataLoader); got a one-shot iterator of type {type(data).__name__}"
            )
        self.data = data
        error: Exception | None = None
        try:
            self._select_params(params)
        except (TypeError, ValueError) as caught:
            if self.parallel is None:
                raise
            error = caught
        if self.parallel is not None:
            # Before the first collective whose size depends on the selection (the shard layout's).
            self._agree_on_parameters(error)
        if isinstance(self.parallel, Sharded):
            self.sharding = shard_layout(self.params, self.parallel)
            self.device = local_tensor(self.params[0]).device
        # Shapes of the pieces of a vector this process holds (local shards under FSDP).
        self.param_shapes = [local_tensor(p).shape for p in self.params]
        self.param_numels = [local_tensor(p).numel() for p in self.params]
        #: Number of selected parameter entries (the parameter-space dimension).
        self.num_params: int = sum(p.numel() for p in self.params)
        selected = {id(p) for p in self.params}
        scaled = [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, nn.Embedding) and m.scale_grad_by_freq and id(m.weight) in selected
        ]
        if scaled:
            # Reverse mode divides each row's gradient by the row's count in the batch: not the
            # derivative of the output, so Jᵀu is not the adjoint of J v and the Hessian is not
            # the loss's (a GGN 15% asymmetric).
            raise ValueError(
                f"embedding {scaled[0]!r} has scale_grad_by_freq=True: autograd then returns a "
                "rescaled gradient, not the derivative, and every curvature product would be "
                "wrong; set scale_grad_by_freq=False on it for the curvature (the output is the "
                "same), or leave its weight out of params"
            )

    def _select_params(self, params: ParamSelection) -> None:
        self.param_names, self.params = _select_parameters(self.model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"selected parameters must share one dtype and device, got {dtypes} on {devices}")
        self.torch_dtype: torch.dtype = self.params[0].dtype
        self.device: torch.device = self.params[0].device
        if not self.torch_dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {self.torch_dtype}")

    def _agree_on_parameters(self, error: Exception | None) -> None:
        """Raise on every rank if a rank's selection failed (``error``) or the ranks selected
        different parameters."""
        parallel = self.parallel
        assert parallel is not None
        if error is not None:  # pairs with the other ranks' agreement below, and raises on all
            first = next(iter(self.model.parameters()), None)
            device = torch.device("cpu") if first is None else local_tensor(first).device
            parallel.agree(error, device)
        selection = ";".join(f"{n}:{tuple(p.shape)}" for n, p in zip(self.param_names, self.params))
        digest = f"{int(fingerprint(selection)):012x}"
        doing = (
            f"{type(self).__name__}(params: {len(self.params)} tensors, "
            f"{sum(p.numel() for p in self.params)} entries, {self.param_names[0]} ... "
            f"{self.param_names[-1]}, selection hash {digest})"
        )
        parallel.agree(None, local_tensor(self.params[0]).device, doing)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat parameter-space vector (D,) into named parameter-shaped views.

        Under FSDP the vector is this rank's shard and the views have the local shards' shapes.

        Parameters
        ----------
        vector : Tensor
            ``(D,)`` vector in the operator's layout, dtype and device.

        Returns
        -------
        dict of str to Tensor
            Views of ``vector``, one per selected parameter, by name, in parameter order.
        """
        rows = sum(self.param_numels)
        vector = self._check_torch(vector, rows)
        if vector.dim() != 1:
            raise ValueError(f"unflatten expects a vector of shape ({rows},), got {tuple(vector.shape)}")
        parts = vector.split(self.param_numels)
        return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.param_shapes)}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (by name or in order) into a vector (D,).

        Under FSDP: the local shards' shapes, giving this rank's shard of the vector.

        Parameters
        ----------
        tensors : mapping of str to Tensor, or sequence of Tensor
            One tensor per selected parameter, shaped like it: by name, or in parameter order.

        Returns
        -------
        Tensor
            ``(D,)`` vector on the operator's device and dtype.

        Raises
        ------
        ValueError
            If a tensor is missing or has the wrong shape.
        """
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"flatten: missing tensors for parameters {missing[:5]}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.params):
            raise ValueError(f"flatten expects {len(self.params)} tensors, got {len(tensors)}")
        for name, t, shape in zip(self.param_names, tensors, self.param_shapes):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"flatten: tensor for {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
        return torch.cat([t.reshape(-1) for t in tensors]).to(device=self.device, dtype=self.torch_dtype)

    def parameter_vector(self) -> Tensor:
        """Current values of the selected parameters as one flat vector (D,) (local shard under FSDP).

        Returns
        -------
        Tensor
            ``(D,)`` detached copy of the parameter values.
        """
        return torch.cat([local_tensor(p).detach().reshape(-1) for p in self.params])

    def _global_norm(self, tensors: Sequence[Tensor]) -> float:
        """Euclidean norm of a vector given by its pieces (summed over the shards under FSDP)."""
        # float64 accumulation (no overflow of squared float32 entries), without a float64 copy.
        norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
        square = (
            torch.stack(norms).square().sum()
            if norms
            else torch.zeros((), dtype=torch.float64, device=self.device)
        ).reshape(1)
        if isinstance(self.parallel, Sharded):
            self.parallel.all_reduce_(square)
        return float(square.sqrt())

    def _padding_rows(self) -> list[tuple[int, int]]:
        """(index into ``params``, row) of the padding row of every selected embedding weight."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return [
            (index[id(m.weight)], m.padding_idx)
            for m in self.model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and id(m.weight) in index
        ]

    def _without_padding_rows(self, V: list[Tensor], padding: list[tuple[int, int]]) -> list[Tensor]:
        """Directions ``V`` (pieces of shape ``(k, *param.shape)``) with the padding rows zeroed.

        Reverse mode gives an embedding's padding row no gradient, so its rows and columns of
        autograd's curvature are zero. Differences of values along it would see the row's
        real effect, so finite differences leave it out of the direction (then the
        finite-difference matrix is ``P C P`` with ``P`` zeroing those rows, which is
        autograd's ``C`` where nothing else reads them). The affected pieces are copied.
        """
        if not padding:
            return V
        V = [v.clone() if any(i == j for j, _ in padding) else v for i, v in enumerate(V)]
        for i, row in padding:
            V[i][:, row] = 0
        return V

    @contextlib.contextmanager
    def _shifted_parameters(self) -> Iterator[Callable[[list[Tensor], int, float], list[Tensor] | None]]:
        """Yield ``shift(V, col, amount)``, which moves the evaluation point to ``θ₀ + amount · V[col]``.

        On one process (and under DDP) nothing is modified: ``shift`` returns the shifted
        values as new tensors, to evaluate at with ``_loss_gradient(..., at=...)`` or
        ``forward(..., replace=...)``. The parameters, their version counters and so any
        graph the caller built before the product stay valid.

        Under FSDP the all-gather reads the parameters' own storage, so ``shift`` sets this
        rank's local shards in place (each rank perturbs only its own) and returns None.
        On exit ``θ₀`` is restored bit for bit, also after an exception, and so are the
        shards' version counters (in-place writes bump them, and a graph the caller built
        earlier would then refuse to backpropagate); restoring them needs
        ``torch._C._autograd._unsafe_set_version_counter``, without which they stay bumped.
        """
        if not isinstance(self.parallel, Sharded):

            def shifted(V: list[Tensor], col: int, amount: float) -> list[Tensor]:
                with torch.no_grad():
                    return [p.detach() + amount * v[col] for p, v in zip(self.params, V)]

            yield shifted
            return
        local = [local_tensor(p) for p in self.params]
        versions = [t._version for t in local]
        saved = [t.detach().clone() for t in local]

        def shift(V: list[Tensor], col: int, amount: float) -> None:
            with torch.no_grad():
                for t, t0, v in zip(local, saved, V):
                    if amount == 0.0:
                        t.copy_(t0)
                    else:
                        torch.add(t0, v[col], alpha=amount, out=t)

        try:
            yield shift
        finally:
            with torch.no_grad():
                for t, t0 in zip(local, saved):
                    t.copy_(t0)
            set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
            if set_versions is not None:
                set_versions(tuple(local), tuple(versions))

    def forward(self, inputs: Any, replace: Mapping[str, Tensor] | None = None) -> Tensor:
        """Run the model on a batch's inputs and return the output tensor.

        The model runs on copies of its buffers: what the forward pass writes into them
        (batch norm's running statistics in train mode) is discarded, and the buffers and
        their version counters stay as they were. (Within a pass over the data, a model
        that provably cannot write them reads its buffers themselves, see
        ``_PassStructure.forward_leaves_buffers_alone``.)

        Parameters
        ----------
        inputs : Tensor or mapping
            A batch's inputs (a mapping is passed as keyword arguments).
        replace : mapping of str to Tensor, optional
            Parameter names to tensors used in their place (for forward-mode AD through
            dual tensors, or evaluation at shifted parameters).

        Returns
        -------
        Tensor
            The model output (its ``logits`` for a Hugging Face ``ModelOutput``, the first
            element of a tuple).

        Raises
        ------
        TypeError
            If the model returns no tensor.
        """
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
        replace = {} if replace is None else dict(replace)
        structure = self.__dict__.get("_pass_structure")
        if not isinstance(self.parallel, Sharded) and not (
            structure is not None and structure.forward_leaves_buffers_alone
        ):
            buffers = list(self.model.named_buffers() if structure is None else structure.named_buffers())
            replace.update(zip((name for name, _ in buffers), _copies([b for _, b in buffers])))
        # Within a pass over the data the attention settings are already in place.
        with contextlib.nullcontext() if structure is not None else _attention_with_higher_derivatives():
            if not replace:
                output = self.model(*args, **kwargs)
            else:
                # Without tied tensors among the replaced names, torch's untying (a walk over
                # every parameter and buffer of the model) changes nothing.
                tie = structure is None or not structure.tied_names.isdisjoint(replace)
                output = torch.func.functional_call(self.model, replace, args, kwargs, tie_weights=tie)
        return output_tensor(output)

    def _batches(self, only: set[int] | None = None) -> Iterator[tuple[int, Any, Any]]:
        """Yield (index, inputs, targets) with tensors moved to the model's device.

        A whole pass of a curvature operator also counts the batches and their normaliser
        on the way (from the targets, as at construction), for ``_data_change_error``.
        """
        counting = only is None and hasattr(self, "_local_normaliser")
        shares: list[Any] = []
        count = 0
        for index, batch in enumerate(self.data):
            count += 1
            if only is not None and index not in only:
                continue
            inputs, target = _unpack(batch, index)
            if counting:
                shares.append(self._normaliser_share(index, target, inputs))
            yield index, _to_device(inputs, self.device), _to_device(target, self.device)
        if counting:
            self._pass_counts = (count, self._remember_shares(shares))

    def _normaliser_share(self, index: int, target: Any, inputs: Any) -> Any:
        """Batch ``index``'s share of the normaliser: a number remembered from an earlier pass
        if its targets are the same tensor, unmodified since, else a new count (a tensor).

        Counting reads the targets (cross-entropy counts the targets that are not
        ``ignore_index``): on a GPU kernels per batch and a transfer to the host. Unchanged
        targets have the same count, and a tensor changed in place through torch has a new
        version counter (what autograd checks its saved tensors by), so the count is
        remembered per batch along with the version and the loss's settings it depends on.
        """
        key = _share_key(target, self.loss.fn)
        if key is not None:
            remembered = self.__dict__.setdefault("_remembered_shares", {}).get(index)
            if remembered is not None and remembered[0]() is target and remembered[1] == key:
                return remembered[2]
        share = self.loss.batch_normaliser(target, inputs)
        return (share, index, target, key) if key is not None else share

    def _remember_shares(self, shares: list[Any]) -> list[Any]:
        """The pass's shares as numbers (one transfer from the device for the new counts), and
        the new ones remembered for the next pass (see ``_normaliser_share``)."""
        fresh = [s for s in shares if isinstance(s, tuple)]
        if not fresh:
            return shares
        values = _to_host_numbers([s[0] for s in fresh])
        remembered = self.__dict__.setdefault("_remembered_shares", {})
        for (_, index, target, key), value in zip(fresh, values):
            remembered[index] = (weakref.ref(target), key, value)
        numbers = iter(values)
        return [next(numbers) if isinstance(s, tuple) else s for s in shares]

    def _jvp(
        self, inputs: Any, tangents: list[Tensor], keep_graph: bool, tangent_graph: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Output and output tangent ``J v`` of one batch by forward-mode AD.

        With ``keep_graph`` the output carries the autograd graph w.r.t. the parameters;
        with ``tangent_graph`` too the tangent (``J v`` as a function of the parameters:
        the reverse-over-forward Hessian product differentiates it). Without ``keep_graph``
        all parameters are detached (no graph is recorded) but gradients stay enabled:
        ``tangent_rules`` recognises the model's own
        no-grad regions by the grad mode.
        """
        import torch.autograd.forward_ad as fwAD

        with torch.enable_grad(), fwAD.dual_level(), tangent_rules(differentiated=tangent_graph):
            duals = {} if keep_graph else self._detached_parameters()
            duals.update(
                (n, fwAD.make_dual(p if keep_graph else p.detach(), t))
                for n, p, t in zip(self.param_names, self.params, tangents)
            )
            output, tangent = fwAD.unpack_dual(self.forward(inputs, replace=duals))
        if tangent is None:  # the output does not depend on the selected parameters
            tangent = torch.zeros_like(output)
        return output, (tangent if tangent_graph else tangent.detach())

    def _jvp_block(self, inputs: Any, tangents: list[Tensor]) -> Tensor:
        """``J V`` for a block of tangents (leading dimension m), shape ``(m, *output.shape)``.

        Vectorised with ``torch.func.vmap`` over the tangents, so the primal forward is
        computed once for all of them; one dual forward per tangent for a model whose
        forward pass writes into buffers (batch or instance norm in train mode updating
        running statistics), which ``vmap`` cannot batch.
        """
        if self._forward_writes_buffers():
            return torch.stack(
                [
                    self._jvp(inputs, [t[col] for t in tangents], keep_graph=False)[1]
                    for col in range(tangents[0].shape[0])
                ]
            )
        primals = {n: p.detach() for n, p in zip(self.param_names, self.params)}
        others = self._detached_parameters()

        def output_of(params: dict[str, Tensor]) -> Tensor:
            return self.forward(inputs, replace={**others, **params})

        def tangent_of(*ts: Tensor) -> Tensor:
            return torch.func.jvp(output_of, (primals,), (dict(zip(self.param_names, ts)),))[1]

        # Gradients enabled (no graph: the primals are detached) for tangent_rules' no-grad regions.
        with torch.enable_grad(), tangent_rules(shortcuts=False):
            return torch.func.vmap(tangent_of)(*tangents)

    def _detached_parameters(self) -> dict[str, Tensor]:
        """All parameters of the model, detached: a tangent pass with gradients enabled (see
        ``_jvp``) then records no graph, also through parameters outside the selection.

        A new dict each call (callers add to it); within a pass over the data its detached
        tensors are made once.
        """
        structure = self.__dict__.get("_pass_structure")
        if structure is None:
            return {n: p.detach() for n, p in self.model.named_parameters()}
        if structure.detached_parameters is None:
            structure.detached_parameters = {n: p.detach() for n, p in self.model.named_parameters()}
        return dict(structure.detached_parameters)

    @contextlib.contextmanager
    def _data_pass(self) -> Iterator[None]:
        """Around one pass over the data: what every forward pass of it sets up, done once.

        The attention settings of ``_attention_with_higher_derivatives`` are entered once
        and the model's structure is read once (``_PassStructure``). Re-entrant: an inner
        pass shares the outer one's.
        """
        if "_pass_structure" in self.__dict__:
            yield
            return
        self._pass_structure = _PassStructure(self.model)
        try:
            with _attention_with_higher_derivatives():
                yield
        finally:
            del self._pass_structure

    def _forward_writes_buffers(self) -> bool:
        """Whether the model has a norm layer that updates running statistics in its forward pass."""
        return any(
            isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
            for m in self.model.modules()
        )

    def _vjp(self, output: Tensor, cotangent: Tensor, retain_graph: bool) -> tuple[Tensor, ...]:
        """``Jᵀ u`` per selected parameter: one backward pass from ``output`` (with graph) seeded
        by ``cotangent``."""
        if not output.requires_grad:  # the output does not depend on any parameter
            return tuple(torch.zeros_like(p) for p in self.params)
        return torch.autograd.grad(
            output,
            self.params,
            grad_outputs=cotangent,
            retain_graph=retain_graph,
            allow_unused=True,
            materialize_grads=True,
        )


@contextlib.contextmanager
def _stashed_gradients(model: nn.Module) -> Iterator[None]:
    """Run a ``backward()`` without touching the user's ``.grad``: stash them, restore after."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


#: How many ``_attention_with_higher_derivatives`` contexts this thread is inside.
_ATTENTION_CONTEXTS = threading.local()


@contextlib.contextmanager
def _attention_with_higher_derivatives() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel, and off the MHA fast path.

    The fused attention kernels have neither a double backward nor forward-mode AD;
    the math kernel is made of differentiable primitives, so Hessian and GGN products
    work through ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.
    Without autograd (the no-graph tangent forwards) ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` in eval mode take a fused "fast path" that has no
    forward-mode AD either; it is switched off for the duration.

    Nested entries (every forward pass of a pass over the data that entered it once) do
    nothing: setting and restoring torch's backend flags costs more than a small model's
    forward pass.
    """
    depth = getattr(_ATTENTION_CONTEXTS, "depth", 0)
    if depth:
        yield
        return
    _ATTENTION_CONTEXTS.depth = 1
    try:
        with _attention_backends_for_higher_derivatives():
            yield
    finally:
        _ATTENTION_CONTEXTS.depth = 0


@contextlib.contextmanager
def _attention_backends_for_higher_derivatives() -> Iterator[None]:
    """The settings of ``_attention_with_higher_derivatives``, set and restored."""
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - old torch
            yield
            return
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


class _PassStructure:
    """What a forward pass reads of the model's structure, read once per pass over the data.

    Within a pass the model's modules and the ties between its tensors stay as they are
    (what a forward pass writes into buffers is discarded, see
    [`ModelOperator.forward`][curvops.CurvatureOperator.forward]), so walking the module tree for every batch
    (every buffer, and every tensor for the ties of ``torch.func.functional_call``) repeats the
    same answer; on a small model on a GPU those walks cost more than the batch's kernels.
    The buffers themselves are read for every batch, from each module's own table, so a
    buffer a forward pass registers or replaces is seen as before.

    Parameters
    ----------
    model : torch.nn.Module
        The model (unwrapped from DDP).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: (prefix, module) of every module, in ``named_modules()`` order.
        self.modules = list(model.named_modules())
        self.detached_parameters: dict[str, Tensor] | None = None
        self._tied_names: frozenset[str] | None = None
        self._leaves_buffers_alone: bool | None = None

    @property
    def forward_leaves_buffers_alone(self) -> bool:
        """Whether no forward or backward pass of the model can write into its buffers.

        Provable for a model made only of torch's own modules, without hooks, whose modules
        with buffers are norm layers that only read their running statistics (eval mode, or
        not tracking them) and are not lazy: their forward passes then read the buffers and
        write nothing but their outputs, and the copies of
        [`ModelOperator.forward`][curvops.CurvatureOperator.forward] would hold the same values. Any other
        module (a user's ``forward`` may write anything) makes it False.
        """
        if self._leaves_buffers_alone is None:
            self._leaves_buffers_alone = _forward_leaves_buffers_alone([m for _, m in self.modules])
        return self._leaves_buffers_alone

    @property
    def tied_names(self) -> frozenset[str]:
        """Names of the parameters and buffers that share their tensor with another name."""
        if self._tied_names is None:
            names_of: dict[int, list[str]] = {}
            for name, tensor in (
                *self.model.named_parameters(remove_duplicate=False),
                *self.model.named_buffers(remove_duplicate=False),
            ):
                names_of.setdefault(id(tensor), []).append(name)
            self._tied_names = frozenset(n for names in names_of.values() if len(names) > 1 for n in names)
        return self._tied_names

    def named_buffers(self) -> list[tuple[str, Tensor]]:
        """``model.named_buffers()`` (the same names, tensors and order), without the tree walk."""
        seen: set[int] = set()
        found = []
        for prefix, module in self.modules:
            for name, buffer in module._buffers.items():
                if buffer is None or id(buffer) in seen:
                    continue
                seen.add(id(buffer))
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
        return found


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _forward_leaves_buffers_alone(modules: list[nn.Module]) -> bool:
    """See ``_PassStructure.forward_leaves_buffers_alone``."""
    registry = nn.modules.module
    if any(getattr(registry, name, True) for name in _GLOBAL_HOOKS):
        return False
    for module in modules:
        if not type(module).__module__.startswith("torch.nn.modules."):
            return False
        if any(getattr(module, name, True) for name in _MODULE_HOOKS):
            return False
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return False
        if any(b is not None for b in module._buffers.values()):
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                return False
            if module.training and module.track_running_stats:
                return False
    return True


def _copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` (as ``clone``: same values, dtype, device and strides).

    One multi-tensor copy per device and dtype rather than one kernel per tensor: a model with
    batch norm layers has three buffers per layer, copied for every forward pass.
    """
    if len(tensors) < 2 or any(t.requires_grad for t in tensors):
        return [t.clone() for t in tensors]
    copies = [torch.empty_like(t) for t in tensors]
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for members in groups.values():
        torch._foreach_copy_([copies[i] for i in members], [tensors[i] for i in members])
    return copies


def _share_key(target: Any, loss_fn: Any) -> tuple[Any, ...] | None:
    """What a batch's normaliser share depends on besides the target's identity (None: not a tensor).

    The target's version counter, storage, shape, dtype and device, and the loss settings the
    count reads (``ignore_index`` and the class weights, by identity and version).
    """
    if not torch.is_tensor(target):
        return None
    weight = getattr(loss_fn, "weight", None)
    weight_key = (id(weight), weight._version) if torch.is_tensor(weight) else None
    return (
        target._version,
        target.data_ptr(),
        target.shape,
        target.dtype,
        target.device,
        getattr(loss_fn, "ignore_index", None),
        weight_key,
    )


def _to_host_numbers(values: list[Any]) -> list[Any]:
    """Python numbers of 0-d tensors (and numbers), with one transfer per device and dtype.

    ``float`` of each result equals ``float`` of its tensor: ``tolist`` returns the exact value.
    """
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            groups.setdefault((v.device, v.dtype), []).append(i)
    numbers = list(values)
    for members in groups.values():
        stacked = torch.stack([values[i].reshape(()) for i in members]).tolist()
        for i, number in zip(members, stacked):
            numbers[i] = number
    return numbers


def _select_parameters(model: nn.Module, params: ParamSelection) -> tuple[list[str], list[nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameters that require grad")
        return [n for n, _ in chosen], [p for _, p in chosen]
    selection: list[Any] = [params] if isinstance(params, str) else list(params)
    if not selection:
        raise ValueError("params is empty")
    if all(isinstance(p, str) for p in selection):
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in selection)]
        if not chosen:
            names = ", ".join(n for n, _ in named[:8])
            raise ValueError(f"no parameter name matches {selection}; names look like: {names}, ...")
    elif all(isinstance(p, Tensor) for p in selection):
        by_id = {id(p): n for n, p in named}
        for i, p in enumerate(selection):
            if id(p) not in by_id:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model")
        wanted = {id(p) for p in selection}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
    else:
        raise TypeError("params must be None, glob pattern string(s), or a list of the model's parameters")
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"parameters {frozen[:5]} do not require grad; the curvature w.r.t. them is undefined here"
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"batch {index} must be an (inputs, targets) pair, got {type(batch).__name__}")


def _to_device(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _first_batch(data: Iterable[Any]) -> tuple[Any, Any]:
    for batch in data:
        return _unpack(batch, 0)
    raise ValueError("data is empty: it yielded no batches")


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            # NaN == NaN here: a NaN batch is reported as such later, not as shuffling.
            return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def output_tensor(output: Any) -> Tensor:
    """The tensor a model returned: itself, its ``logits`` (a Hugging Face ``ModelOutput``), or
    the first element of a tuple.

    Raises
    ------
    TypeError
        If the model returned no tensor.
    """
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"model output must be a tensor or have a 'logits' tensor, got {type(output).__name__}")
