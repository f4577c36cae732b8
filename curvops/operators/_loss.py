"""Loss functions as the operators see them: a batch sum, a normaliser, and curvature.

Every operator represents the curvature of the *whole-dataset* objective

    L(θ) = c · Σ_b Σ_{t ∈ batch b} ℓ_t(f_θ(x_t), y_t),

with ``c = 1 / (total normaliser)`` for ``reduction="mean"`` and ``c = 1`` for
``reduction="sum"``. A `LossSpec` turns the user's loss into the pieces needed
for that: the unnormalised batch sum, the batch's share of the normaliser (counted
from the targets alone, so no forward pass is needed to count), and the loss Hessian
with respect to the model output in closed form (cross-entropy, MSE, BCE-with-logits)
or by double backward (any other callable).

A *loss term* ``t`` is the unit over which gradient outer products are taken by the
empirical and Monte-Carlo Fisher: for cross-entropy one output position (a row over
the class dimension 1, so every token of a sequence is a term); for every other loss
one sample (index of the first dimension).
"""

from __future__ import annotations

import inspect
import math
import numbers
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Cross-entropy with at least this many classes goes through the fused functions of
#: `curvops.kernels.cross_entropy_sum` (double backward without (N, C) temporaries: the
#: large-vocabulary case); below it ``F.cross_entropy``, whose double backward is cheaper
#: when rows are short (see benchmarks/results/ce_hvp_*).
FUSED_CE_MIN_CLASSES = 1024

_KINDS = ("cross_entropy", "mse", "bce", "custom")

#: First-argument names that mark a loss of the model and the batch (hessian-eigenthings'
#: ``loss_fn(model, batch)``), which curvops would call with the output in the model's place.
_MODEL_NAMES = frozenset({"model", "net", "network", "module"})

#: How to turn a loss of the model and the batch into one of the output and the targets.
_OUTPUT_LOSS_FIX = (
    "A loss of the model and the batch (hessian-eigenthings' loss_fn(model, batch)) becomes a "
    "loss of the output: pass nn.CrossEntropyLoss() (or lambda output, target: "
    "F.cross_entropy(output, target)) and the model separately, "
    "HessianOperator(model, loss_fn, data), with data yielding (inputs, targets) batches"
)


@dataclass(frozen=True)
class LossSpec:
    """A loss function normalised for curvature products.

    Attributes
    ----------
    kind : str
        ``"cross_entropy"``, ``"mse"``, ``"bce"`` (BCE with logits) or ``"custom"``.
    reduction : str
        ``"mean"`` or ``"sum"``.
    fn : callable
        The user's loss, ``(output, target) -> scalar``.
    flat : LossSpec or None
        For a cross-entropy loss that defines ``flat_output(x)`` (an output-shaped
        tensor as (rows, C) rows) and ``flat_target(target)`` (the matching (rows,)
        targets), such as [`CausalLMLoss`][curvops.lm.CausalLMLoss] (shifted labels): the plain
        cross-entropy spec every method delegates to on those rows. None otherwise.
    """

    kind: str
    reduction: str
    #: The user's loss; for the built-in kinds an ``nn`` loss module whose attributes
    #: (``weight``, ``ignore_index``, ...) the closed forms read.
    fn: Any
    flat: LossSpec | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_loss(cls, loss_fn: Callable[[Tensor, Any], Tensor]) -> LossSpec:
        """Classify ``loss_fn`` and check that its reduction is supported.

        Parameters
        ----------
        loss_fn : callable
            ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or any callable
            ``(output, target) -> scalar``.

        Returns
        -------
        LossSpec

        Raises
        ------
        TypeError
            If ``loss_fn`` is not callable, or its first parameter is named like a model
            (``model``, ``net``, ...: a loss of the model and the batch).
        ValueError
            If its ``reduction`` is neither ``"mean"`` nor ``"sum"``.
        """
        if not callable(loss_fn):
            raise TypeError(
                "loss_fn must be a loss module or a callable (output, target) -> scalar, "
                f"got {type(loss_fn).__name__}; the arguments are (model, loss_fn, data), "
                "e.g. HessianOperator(model, nn.CrossEntropyLoss(), data) (hessian-eigenthings "
                "takes the data second)"
            )
        first = _first_parameter_name(loss_fn)
        if first in _MODEL_NAMES:
            raise TypeError(
                f"loss_fn takes {first!r} as its first argument, but curvops calls "
                f"loss_fn(output, target) with the model's output and the batch's targets. "
                f"{_OUTPUT_LOSS_FIX}"
            )
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            kind = "cross_entropy"
        elif isinstance(loss_fn, nn.MSELoss):
            kind = "mse"
        elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
            kind = "bce"
        else:
            kind = "custom"
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn has reduction={reduction!r}; curvops needs a scalar loss with reduction "
                "'mean' or 'sum' (the curvature of a vector of losses is not defined)"
            )
        if kind == "cross_entropy" and callable(getattr(loss_fn, "flat_target", None)):
            return cls(
                kind=kind,
                reduction=reduction,
                fn=loss_fn,
                flat=cls(kind=kind, reduction=reduction, fn=loss_fn),
            )
        return cls(kind=kind, reduction=reduction, fn=loss_fn)

    # -------------------------------------------------------------- batch values
    def batch_sum(self, output: Tensor, target: Any, fused: bool = True) -> Tensor:
        """Unnormalised sum of the loss terms of one batch.

        Parameters
        ----------
        output : Tensor
            The model output of one batch (for cross-entropy the classes along dimension 1).
        target : Tensor or object
            The batch's targets, as the loss takes them.
        fused : bool, optional
            Large-vocabulary cross-entropy through the fused kernel's autograd Function
            (default True; its double backward applies the loss Hessian in one kernel). False:
            ``F.cross_entropy`` always, made of torch functions only, which ``torch.func``
            transforms can trace (the Function has no forward-mode rule).

        Returns
        -------
        Tensor
            0-d: the sum of the batch's loss terms (a custom ``mean`` loss: its value times
            the batch size).
        """
        f = self.fn
        if self.flat is not None:
            return self.flat.batch_sum(f.flat_output(output), f.flat_target(target), fused)
        if self.kind != "custom":
            self.check_shapes(output, target)
        if self.kind == "cross_entropy":
            num_classes = output.shape[1] if output.dim() > 1 else output.shape[0]
            if num_classes < FUSED_CE_MIN_CLASSES or not fused:
                try:
                    return F.cross_entropy(
                        output,
                        target,
                        weight=f.weight,
                        ignore_index=f.ignore_index,
                        reduction="sum",
                        label_smoothing=f.label_smoothing,
                    )
                except IndexError as error:  # torch's "Target 2 is out of bounds."
                    named = self._class_range_error(output, target)
                    if named is None:
                        raise
                    raise named from error
            # Same value as F.cross_entropy(reduction="sum"); its double backward (the
            # Hessian path) applies the loss Hessian through the fused kernel.
            from curvops.kernels.cross_entropy_sum import cross_entropy_sum

            return cross_entropy_sum(
                output,
                target,
                weight=f.weight,
                ignore_index=f.ignore_index,
                label_smoothing=f.label_smoothing,
            )
        if self.kind == "mse":
            return F.mse_loss(output, target, reduction="sum")
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(
                output, target, weight=f.weight, pos_weight=f.pos_weight, reduction="sum"
            )
        try:
            value = f(output, target)
        except TypeError as error:
            # A loss written for (model, batch) calls the output tensor as if it were the model.
            if "'Tensor' object is not callable" not in str(error):
                raise
            raise TypeError(
                f"loss_fn failed with {error} when called as loss_fn(output, target): curvops "
                f"passes the model's output and the batch's targets, not the model. {_OUTPUT_LOSS_FIX}"
            ) from error
        if value.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(value.shape)}")
        if self.reduction == "mean":
            # A custom mean-reduced loss is taken to average over the samples of the
            # batch (first dimension); weighting batches by their size then gives the
            # exact whole-dataset mean whenever every sample has the same number of
            # loss units.
            return value * _batch_size(output)
        return value

    def check_shapes(self, output: Tensor, target: Any) -> None:
        """Check that a built-in loss's targets fit the model output.

        torch broadcasts MSE targets of another shape (with a warning) and so computes a
        different loss; cross-entropy needs class indices of the output's shape without
        the class dimension 1, or class probabilities of the output's shape, and more than
        one class (over one class the softmax is constant: a model with one output under
        cross-entropy is a mistake, not a curvature).

        Parameters
        ----------
        output : Tensor
            The model output of one batch (for cross-entropy the classes along dimension 1).
        target : Tensor or object
            The batch's targets, as the loss takes them.

        Raises
        ------
        ValueError
            If they do not fit; the message says which shape they need.
        """
        name = type(self.fn).__name__
        if not torch.is_tensor(target):
            raise TypeError(f"{name} targets must be a tensor, got {type(target).__name__}")
        got, shape = tuple(target.shape), tuple(output.shape)
        if self.kind in ("mse", "bce"):
            if got != shape:
                raise ValueError(
                    f"{name}: the targets have shape {got} but the model output {shape}; torch would "
                    f"broadcast them into a different loss. Give targets of shape {shape} (expand "
                    "them explicitly if broadcasting is what you mean)"
                )
            return
        if (shape[1] if len(shape) > 1 else shape[0] if shape else 0) == 1:
            raise ValueError(
                f"{name}: the model output {shape} has 1 class along dimension "
                f"{1 if len(shape) > 1 else 0}, where the softmax is the constant 1 (loss and curvature "
                "0). Give the model one output per class (a last layer nn.Linear(..., C) for C "
                "classes), or for a binary target with one output use nn.BCEWithLogitsLoss() with "
                f"float targets of shape {shape}"
            )
        if target.is_floating_point():
            if got != shape:
                raise ValueError(
                    f"{name}: class-probability targets must have the output's shape {shape}, got {got}"
                )
            return
        indices = shape[:1] + shape[2:] if len(shape) > 1 else ()
        if got != indices:
            hint = (
                " (squeeze the class dimension: targets.squeeze(1))"
                if got == indices[:1] + (1,) + indices[1:]
                else ""
            )
            raise ValueError(
                f"{name}: class-index targets of an output of shape {shape} (classes along dimension "
                f"{1 if len(shape) > 1 else 0}) must have shape {indices}, got {got}{hint}"
            )

    def batch_normaliser(self, target: Any, inputs: Any = None) -> Tensor:
        """This batch's share of the ``mean`` normaliser, from the targets alone.

        Cross-entropy: the number of counted targets (``target != ignore_index``),
        weighted by the class weights if the loss has them, or the number of positions
        for probability targets. MSE and BCE: the number of target elements. Custom
        losses: the number of samples (first dimension).

        Parameters
        ----------
        target : Tensor or object
            The batch's targets.
        inputs : Tensor or mapping, optional
            The batch's inputs (what a custom loss counts samples of when its targets do
            not tell).

        Returns
        -------
        Tensor
            0-d, ``>= 0``.
        """
        f = self.fn
        if self.flat is not None:
            return self.flat.batch_normaliser(f.flat_target(target), inputs)
        if self.kind == "cross_entropy":
            if not torch.is_tensor(target):
                raise TypeError(f"cross-entropy targets must be a tensor, got {type(target).__name__}")
            if target.is_floating_point():
                # Class-probability targets (N, C, d1, ...): one term per position.
                return torch.tensor(
                    float(target.numel() // max(target.shape[1], 1)) if target.dim() > 1 else 1.0
                )
            valid = target != f.ignore_index
            if f.weight is None:
                return valid.sum()
            w = f.weight.to(target.device)[target.clamp(min=0, max=f.weight.numel() - 1)]
            return (w * valid).sum()
        if self.kind in ("mse", "bce"):
            if not torch.is_tensor(target):
                raise TypeError(f"{self.kind} targets must be a tensor, got {type(target).__name__}")
            return torch.tensor(float(target.numel()))
        ref = target if torch.is_tensor(target) else inputs
        return torch.tensor(float(_batch_size(ref)))

    # ----------------------------------------------------------------- curvature
    def output_hvp(self, output: Tensor, target: Any, u: Tensor) -> Tensor:
        """Product of the loss Hessian w.r.t. the output with ``u``, for the batch sum.

        Parameters
        ----------
        output : Tensor
            Model output of the batch, any shape the loss accepts.
        target : Any
            Targets of the batch.
        u : Tensor
            Tangent of the same shape as ``output``.

        Returns
        -------
        Tensor
            ``∇²_f (batch_sum) · u``, same shape as ``output``. Closed form for the
            built-in losses (cross-entropy's ``diag(p) − p pᵀ`` is never formed);
            double backward for custom losses.
        """
        if self.flat is not None:
            rows = self.flat.output_hvp(
                self.fn.flat_output(output), self.fn.flat_target(target), self.fn.flat_output(u)
            )
            return rows.reshape(output.shape)
        if self.kind == "cross_entropy":
            from curvops.kernels import cross_entropy_hvp

            coeff = self._ce_coefficients(output, target)
            logits2d, perm = _classes_last(output)
            u2d, _ = _classes_last(u)
            out2d = cross_entropy_hvp(logits2d, u2d, weight=coeff.reshape(-1), reduction="sum")
            return _classes_back(out2d, output.shape, perm)
        if self.kind == "mse":
            return 2.0 * u
        if self.kind == "bce":
            return self._bce_coefficients(output, target) * u
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.batch_sum(out, target), out, create_graph=True)
            (hu,) = torch.autograd.grad(g, out, grad_outputs=u, allow_unused=True)
        return torch.zeros_like(u) if hu is None else hu

    def output_gradient(self, output: Tensor, target: Any) -> Tensor:
        """Gradient of the batch sum w.r.t. the output.

        Parameters
        ----------
        output : Tensor
            The model output of one batch (for cross-entropy the classes along dimension 1).
        target : Tensor or object
            The batch's targets, as the loss takes them.

        Returns
        -------
        Tensor
            Detached, shaped like ``output``.
        """
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.batch_sum(out, target), out)
        return g

    def sample_output_gradients(
        self, output: Tensor, target: Any, num_samples: int, generator: torch.Generator
    ) -> Tensor:
        """Output gradients with labels drawn from the model's predictive distribution.

        Returns ``s`` of shape ``(num_samples, *output.shape)`` such that, for every loss
        term, ``E[s sᵀ]`` equals that term's loss Hessian w.r.t. the output. This is what
        makes the Monte-Carlo Fisher an unbiased estimate of the GGN.

        Parameters
        ----------
        output : Tensor
            The model output of one batch (for cross-entropy the classes along dimension 1).
        target : Tensor or object
            The batch's targets, as the loss takes them.
        num_samples : int
            Draws per loss term.
        generator : torch.Generator
            Source of the draws (on ``output``'s device).

        Raises
        ------
        ValueError
            For custom losses, which have no known predictive distribution.
        """
        out = output.detach()
        shape = (num_samples, *out.shape)
        _check_sample_memory(out, num_samples)
        if self.flat is not None:
            rows = self.flat.sample_output_gradients(
                self.fn.flat_output(out), self.fn.flat_target(target), num_samples, generator
            )
            return rows.reshape(shape)
        if self.kind == "cross_entropy":
            logits2d, perm = _classes_last(out)
            probs = torch.softmax(logits2d.float(), dim=-1)
            # A non-finite output row (NaN in the data) draws from a stand-in distribution, so
            # the product completes and reports that batch's NaN loss by name like every other
            # operator (torch.multinomial would raise a bare RuntimeError, on CUDA an assert).
            draws = torch.multinomial(
                probs.nan_to_num(nan=1.0), num_samples, replacement=True, generator=generator
            )
            onehot = F.one_hot(draws.T, probs.shape[-1]).to(probs.dtype)  # (M, rows, C)
            coeff = self._ce_coefficients(out, target).reshape(1, -1, 1)
            s2d = coeff.sqrt().to(probs.dtype) * (probs.unsqueeze(0) - onehot)
            s2d = s2d.to(out.dtype)
            return torch.stack([_classes_back(s2d[m], out.shape, perm) for m in range(num_samples)])
        if self.kind == "mse":
            # Loss Hessian of Σ (f − y)² is 2I: a Gaussian with covariance 2I.
            noise = torch.randn(shape, generator=generator, device=out.device, dtype=out.dtype)
            return math.sqrt(2.0) * noise
        if self.kind == "bce":
            prob = torch.sigmoid(out)
            # Non-finite outputs: a stand-in probability, as for cross-entropy above.
            draws = torch.bernoulli(prob.nan_to_num(nan=0.5).expand(shape), generator=generator)
            factor = self._bce_coefficients(out, target) / (prob * (1 - prob)).clamp_min(
                torch.finfo(out.dtype).tiny
            )
            return factor.sqrt() * (prob - draws)
        raise ValueError(
            "the Monte-Carlo Fisher needs the model's predictive distribution, known for "
            "nn.CrossEntropyLoss, nn.MSELoss and nn.BCEWithLogitsLoss only; use "
            "kind='empirical' or the GGNOperator for a custom loss"
        )

    def hessian_sqrt_columns(self, output: Tensor, target: Any) -> Iterator[Tensor]:
        """Columns ``s_k`` (each shaped like ``output``) of a symmetric factorisation of the loss Hessian.

        The Hessian of every built-in loss is block-diagonal over *rows*: for
        cross-entropy a row is one position (the class dimension 1), for MSE and
        BCE-with-logits the entries sharing all indices but the last (a 0-d or 1-d
        output is one row per entry). On every row, ``Σ_k s_k s_kᵀ`` restricted to the
        row equals the row's Hessian block of `batch_sum`:

        - cross-entropy ``a (diag p − p pᵀ)``: ``C`` columns ``sqrt(a p_c) (e_c − p)``;
        - MSE ``2 I``: one column ``sqrt(2) e_c`` per entry ``c`` of the last dimension;
        - BCE ``w σ(1 − σ)`` (diagonal): ``sqrt(w σ (1 − σ)) e_c`` likewise.

        Columns are generated lazily (one output-sized tensor at a time).

        Parameters
        ----------
        output : Tensor
            The model output of one batch (for cross-entropy the classes along dimension 1).
        target : Tensor or object
            The batch's targets, as the loss takes them.

        Yields
        ------
        Tensor
            One column ``s_k``, shaped like ``output``.

        Raises
        ------
        ValueError
            For custom losses, whose Hessian has no closed-form factorisation here.
        """
        out = output.detach()
        if self.flat is not None:
            for col in self.flat.hessian_sqrt_columns(self.fn.flat_output(out), self.fn.flat_target(target)):
                yield col.reshape(out.shape)
            return
        if self.kind == "cross_entropy":
            logits2d, moved = _classes_last(out)
            probs = torch.softmax(logits2d, dim=-1)
            coeff, _ = _classes_last(self._ce_coefficients(out, target))
            root = (coeff * probs).sqrt()  # (rows, C)
            for c in range(probs.shape[-1]):
                col = -probs.clone()
                col[:, c] += 1
                yield _classes_back(root[:, c : c + 1] * col, out.shape, moved)
            return
        if self.kind in ("mse", "bce"):
            if self.kind == "mse":
                diag = torch.full_like(out, math.sqrt(2.0))
            else:
                diag = self._bce_coefficients(out, target).sqrt()
            if out.dim() <= 1:
                yield diag
                return
            for c in range(out.shape[-1]):
                col = torch.zeros_like(out)
                col[..., c] = diag[..., c]
                yield col
            return
        raise ValueError(
            "a factorisation of the loss Hessian is known for nn.CrossEntropyLoss, "
            "nn.MSELoss and nn.BCEWithLogitsLoss only"
        )

    def fisher_middle(self, s: Tensor, jv: Tensor) -> Tensor:
        """Apply ``Σ_m s_m s_mᵀ`` term by term to an output tangent.

        Parameters
        ----------
        s : Tensor
            Output gradients, shape ``(M, *output.shape)``.
        jv : Tensor
            Output tangent ``J v``, shape ``output.shape``.

        Returns
        -------
        Tensor
            ``Σ_m s_m ⟨s_m, jv⟩_t`` where ``⟨·,·⟩_t`` sums over the components of each
            loss term (the class dimension for cross-entropy, all but the first
            dimension otherwise); shape ``output.shape``.
        """
        if self.flat is not None:
            rows = self.flat.fisher_middle(s.reshape(s.shape[0], -1, s.shape[-1]), self.fn.flat_output(jv))
            return rows.reshape(jv.shape)
        if self.kind == "cross_entropy" and jv.dim() > 1:
            inner = (s * jv).sum(dim=2, keepdim=True)
        else:
            dims = tuple(range(2, s.dim()))
            inner = (s * jv).sum(dim=dims, keepdim=True) if dims else s * jv
        return (s * inner).sum(dim=0)

    # ------------------------------------------------------------------- helpers
    def _class_range_error(self, output: Tensor, target: Tensor) -> ValueError | None:
        """The error naming the class-index targets outside the output's classes (None: all inside)."""
        shape = tuple(output.shape)
        num_classes = shape[1] if len(shape) > 1 else shape[0]
        ignore = self.fn.ignore_index
        outside = target[(target != ignore) & ((target < 0) | (target >= num_classes))]
        if outside.numel() == 0:
            return None
        values = sorted(int(v) for v in outside.unique().tolist())
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        largest = max(int(target[target != ignore].max()), num_classes - 1)
        return ValueError(
            f"{type(self.fn).__name__}: the targets hold class indices {shown}, outside the "
            f"{num_classes} classes of the model output {shape} (class indices 0..{num_classes - 1}, "
            f"or ignore_index={ignore}). Give the model one output per class (a last layer "
            f"nn.Linear(..., {largest + 1}) for classes 0..{largest}), or map the labels to "
            f"0..{num_classes - 1}"
        )

    def _ce_coefficients(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-position scalar ``a`` with Hessian ``a (diag p − p pᵀ)``; shape (N, 1, d1, ...)."""
        f = self.fn
        num_classes = output.shape[1] if output.dim() > 1 else output.shape[0]
        eps = f.label_smoothing
        w = None if f.weight is None else f.weight.to(device=output.device, dtype=output.dtype)
        if target.is_floating_point():
            q = target.to(output.dtype) * (1 - eps) + eps / num_classes
            a = q.sum(dim=1, keepdim=True) if w is None else (q * _class_view(w, q)).sum(dim=1, keepdim=True)
            return a
        valid = (target != f.ignore_index).to(output.dtype)
        if w is None:
            a = valid
        else:
            wy = w[target.clamp(min=0, max=num_classes - 1)]
            a = valid * ((1 - eps) * wy + eps * w.sum() / num_classes)
        return a.unsqueeze(1)

    def _bce_coefficients(self, output: Tensor, target: Tensor) -> Tensor:
        """Elementwise loss Hessian of BCE-with-logits: ``w (pw·y + 1 − y) σ(1 − σ)``."""
        f = self.fn
        prob = torch.sigmoid(output)
        h = prob * (1 - prob)
        if f.pos_weight is not None:
            t = target.to(output.dtype)
            h = h * (f.pos_weight.to(output.dtype) * t + 1 - t)
        if f.weight is not None:
            h = h * f.weight.to(output.dtype)
        return h


def check_mc_samples(mc_samples: Any) -> int:
    """Validate the number of Monte-Carlo label draws: a positive integer (not a bool)."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, numbers.Integral) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    return int(mc_samples)


def resolve_seed(seed: Any) -> int:
    """Validate the seed of the Monte-Carlo draws: a non-negative integer, or None for a fresh one.

    ``None`` draws a seed from the operating system's entropy, once: the caller stores it,
    so the operator stays one fixed matrix and its seed can be read back to reproduce it.
    """
    if seed is None:
        return secrets.randbits(62)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer or None, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _check_sample_memory(output: Tensor, num_samples: int) -> None:
    """Refuse Monte-Carlo draws whose tensors would not fit in the free memory of the output's device.

    The draws are an ``(num_samples, *output.shape)`` tensor built with about two temporaries of
    its size (one-hot labels, differences); a huge ``mc_samples`` would otherwise start an
    allocation of tens of GB and fail (or swap) deep inside torch.
    """
    need = 3 * num_samples * output.numel() * max(output.element_size(), 4)
    free = _free_memory(output.device)
    if free is not None and need > free:
        raise MemoryError(
            f"mc_samples={num_samples}: the label draws of one batch ({num_samples} samples of an "
            f"output of shape {tuple(output.shape)}) need about {need / 2**30:.3g} GiB, more than the "
            f"{free / 2**30:.3g} GiB free on {output.device}; use fewer samples or smaller batches "
            "(the Monte-Carlo Fisher approaches the GGN as the samples grow: GGNOperator gives "
            "that limit exactly)"
        )


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the allocator's view; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        # Free on the device plus what torch's caching allocator holds unused.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _first_parameter_name(fn: Any) -> str | None:
    """The name of the first parameter ``fn`` is called with (a module's ``forward``), or None."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # builtins and C extensions may have no signature
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return parameters[0].name if parameters and parameters[0].kind in positional else None


def _batch_size(x: Any) -> int:
    """Number of samples of a batch: the first dimension of a tensor or of a dict's first tensor."""
    if torch.is_tensor(x):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, dict):
        for value in x.values():
            if torch.is_tensor(value):
                return _batch_size(value)
    if isinstance(x, (list, tuple)) and x:
        return _batch_size(x[0])
    raise TypeError(f"cannot tell the batch size of {type(x).__name__}")


def _classes_last(x: Tensor) -> tuple[Tensor, bool]:
    """View (N, C, d1, ...) as rows (N·d1·..., C); the flag says whether dims were moved."""
    if x.dim() <= 2:
        return x.reshape(-1, x.shape[-1]), False
    return x.movedim(1, -1).reshape(-1, x.shape[1]), True


def _classes_back(x2d: Tensor, shape: torch.Size, moved: bool) -> Tensor:
    """Inverse of `_classes_last`."""
    if not moved:
        return x2d.reshape(shape)
    n, c, *rest = shape
    return x2d.reshape(n, *rest, c).movedim(-1, 1)


def _class_view(w: Tensor, like: Tensor) -> Tensor:
    """Reshape class weights (C,) to broadcast along dim 1 of ``like``."""
    return w.reshape(1, -1, *([1] * (like.dim() - 2)))
