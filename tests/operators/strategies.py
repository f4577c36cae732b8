"""Hypothesis strategies for random small curvature problems (float64).

A drawn :class:`ProblemSpec` is a plain, printable description (so a failing example can be
read off hypothesis' report and rebuilt with :func:`build_problem`); building it is a pure
function of the spec, seeded by ``spec.seed`` through a private generator (the global RNG is
never touched).

What varies
-----------
- family: ``mlp`` (Linear stack), ``conv`` (Conv1d / Conv2d), ``tokens`` (Embedding with or
  without ``padding_idx``, optional self-attention by ``nn.MultiheadAttention`` or
  ``F.scaled_dot_product_attention``, output head optionally tied to the embedding),
  ``tied_linear`` (one ``nn.Linear`` applied twice);
- normalisation: LayerNorm, GroupNorm, BatchNorm in eval mode (non-trivial running
  statistics) or, for the Hessian only, in train mode (batch statistics: the objective is
  then the sum of the per-batch losses, see :func:`batchwise_objective`);
- activations tanh, relu, gelu, sigmoid;
- losses ``nn.CrossEntropyLoss`` (mean / sum, ``ignore_index``, class weights, label
  smoothing; per-position outputs (N, C, T) for token models), ``nn.MSELoss``,
  ``nn.BCEWithLogitsLoss`` (``pos_weight``), and a custom callable (:class:`LogCoshLoss`);
- 1-4 batches of uneven sizes (a batch may hold a single sample, or only ignored targets);
- parameter selection ``params=None``, a list of parameters in shuffled order, or glob
  patterns; sometimes one parameter frozen (``requires_grad=False``);
- ``.grad`` set on some parameters and a user forward pre-hook, so that "unchanged" has
  something to preserve.

The number of parameters D stays below ~300 and the number of output entries M below ~250,
so dense (D, D) references by one backward pass per row are cheap.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from tests.operators.cases import LossWithReduction

DTYPE = torch.float64

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
SMOOTH_ACTIVATIONS = ("tanh", "gelu", "sigmoid")
FAMILIES = ("mlp", "conv", "tokens", "tied_linear")
LOSSES = ("ce", "mse", "bce", "custom")


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class ProblemSpec:
    """A random problem, as drawn (everything :func:`build_problem` needs).

    Attributes
    ----------
    family : str
        One of :data:`FAMILIES`.
    seed : int
        Seed of the tensors (weights, inputs, targets, masks).
    act : str
        Activation (a key of :data:`ACTIVATIONS`).
    norm : str
        ``"none"``, ``"layer"``, ``"group"``, ``"batch"`` (eval mode) or ``"batch_train"``.
    width : int
        Hidden width (token models: embedding width).
    classes : int
        Output classes / channels C (token models with a tied head: the vocabulary).
    conv_dim : int
        1 or 2 (``conv`` family).
    padding_idx : bool
        Embedding with ``padding_idx=0`` and padding tokens in the data (``tokens``).
    attention : str
        ``"none"``, ``"mha"`` or ``"sdpa"`` (``tokens``).
    tie_head : bool
        Output head's weight is the embedding's (``tokens``).
    loss : str
        One of :data:`LOSSES`.
    reduction : str
        ``"mean"`` or ``"sum"``.
    ignore : bool
        Some cross-entropy targets equal ``ignore_index``.
    class_weights : bool
        Cross-entropy with class weights.
    label_smoothing : float
        Cross-entropy label smoothing.
    pos_weight : bool
        BCE-with-logits with ``pos_weight``.
    batch_sizes : tuple of int
        Samples per batch.
    selection : str
        ``"all"`` (``params=None``), ``"list"`` or ``"glob"``.
    chosen : tuple of int
        Indices (into the trainable named parameters) of the selected ones (``list``/``glob``).
    frozen : int or None
        Index (into the named parameters) of a parameter set to ``requires_grad=False``.
    with_grads : bool
        Give some parameters a ``.grad`` before the products.
    with_hook : bool
        Register a no-op forward pre-hook on the model.
    no_grad_gate : bool
        (``mlp``) A gate computed under ``torch.no_grad()`` from parameters that require
        grad: autograd treats it as a constant, and so must every product.
    fit_first_batch : bool
        (MSE and the custom loss, eval mode) The first batch's targets equal the model's
        outputs: a zero loss gradient there (distillation, pseudo-labels), which makes any
        check on the first batch alone blind to second-order terms of the loss gradient.
    first_batch_ignored : bool
        (cross-entropy with ``ignore``) Every target of the first batch is ignored (a
        padding-only batch): valid as long as the data set has counted targets.
    """

    family: str
    seed: int
    act: str
    norm: str
    width: int
    classes: int
    conv_dim: int
    padding_idx: bool
    attention: str
    tie_head: bool
    loss: str
    reduction: str
    ignore: bool
    class_weights: bool
    label_smoothing: float
    pos_weight: bool
    batch_sizes: tuple[int, ...]
    selection: str
    chosen: tuple[int, ...]
    frozen: int | None
    with_grads: bool
    with_hook: bool
    no_grad_gate: bool = False
    fit_first_batch: bool = False
    first_batch_ignored: bool = False

    @property
    def train_mode(self) -> bool:
        """Whether the model runs in train mode (train-mode BatchNorm: batch statistics)."""
        return self.norm == "batch_train"

    @property
    def smooth(self) -> bool:
        """No ReLU kinks: central differences of the gradient converge at O(ε²)."""
        return self.act in SMOOTH_ACTIVATIONS


@dataclass
class Problem:
    """A built problem: the model, loss and data, and the ``params`` argument to pass."""

    spec: ProblemSpec
    model: nn.Module
    loss_fn: LossWithReduction
    data: list[tuple[Tensor, Tensor]]
    params: list[str] | list[nn.Parameter] | None = field(default=None)
    #: Names (``named_parameters()`` order) of the parameters the operator must act on.
    selected: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- models
class SelfAttention(nn.Module):
    """Causal self-attention on (N, T, d): ``nn.MultiheadAttention`` or explicit SDPA."""

    def __init__(self, d: int, heads: int, kind: str):
        super().__init__()
        self.kind, self.heads = kind, heads
        if kind == "mha":
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        N, T, d = h.shape
        if self.kind == "mha":
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)  # True: masked
            return self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        q, k, v = self.qkv(h).view(N, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(N, T, d))


class NoGradGate(nn.Module):
    """``h · sigmoid(gate(h))`` with the gate computed under ``torch.no_grad()``.

    ``gate``'s parameters require grad but get none (autograd sees a constant gate), so the
    curvature has zero rows and columns for them and treats the gate as a constant elsewhere.
    """

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        with torch.no_grad():
            g = torch.sigmoid(self.gate(h))
        return h * g


class TokenModel(nn.Module):
    """ids (N, T) -> Embedding -> [h + attention(LayerNorm h)] -> act(Linear) -> head -> (N, C, T)."""

    def __init__(
        self,
        vocab: int,
        d: int,
        classes: int,
        act: str,
        norm: str,
        attention: str,
        padding_idx: bool,
        tie_head: bool,
    ):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0 if padding_idx else None)
        self.ln = nn.LayerNorm(d) if norm == "layer" else nn.Identity()
        self.attn = None if attention == "none" else SelfAttention(d, 2 if d % 2 == 0 else 1, attention)
        self.mix = nn.Linear(d, d)
        self.act = ACTIVATIONS[act]()
        self.head = nn.Linear(d, vocab if tie_head else classes)
        if tie_head:
            self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        if self.attn is not None:
            h = h + self.attn(self.ln(h))
        else:
            h = self.ln(h)
        return self.head(self.act(self.mix(h))).transpose(1, 2)


class TiedLinearModel(nn.Module):
    """x -> act(inp x) -> act(shared h) -> act(shared h) -> out h: ``shared`` used twice."""

    def __init__(self, d_in: int, width: int, classes: int, act: str):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.shared = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        h = self.act(self.shared(h))
        h = self.act(self.shared(h))
        return self.out(h)


def _norm_1d(norm: str, width: int) -> nn.Module:
    if norm == "layer":
        return nn.LayerNorm(width)
    if norm == "group":
        return nn.GroupNorm(1, width)
    if norm in ("batch", "batch_train"):
        return nn.BatchNorm1d(width)
    return nn.Identity()


def _norm_conv(norm: str, channels: int, conv_dim: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(1, channels)
    if norm in ("batch", "batch_train"):
        return (nn.BatchNorm1d if conv_dim == 1 else nn.BatchNorm2d)(channels)
    return nn.Identity()


D_IN = 3  # input features (mlp, tied_linear) / input channels are 2 (conv)
CONV_SIDE = 4  # spatial extent of the conv inputs (length 4, or 4 x 4)
SEQ_LEN = 3  # token sequence length
VOCAB = 5


def _make_model(spec: ProblemSpec, g: torch.Generator) -> nn.Module:
    if spec.family == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(D_IN, spec.width),
            _norm_1d(spec.norm, spec.width),
            ACTIVATIONS[spec.act](),
            NoGradGate(spec.width) if spec.no_grad_gate else nn.Identity(),
            nn.Linear(spec.width, spec.width),
            ACTIVATIONS[spec.act](),
            nn.Linear(spec.width, spec.classes),
        )
    elif spec.family == "conv":
        conv = nn.Conv1d if spec.conv_dim == 1 else nn.Conv2d
        channels = 3
        model = nn.Sequential(
            conv(2, channels, kernel_size=3, padding=1),
            _norm_conv(spec.norm, channels, spec.conv_dim),
            ACTIVATIONS[spec.act](),
            (nn.AvgPool1d if spec.conv_dim == 1 else nn.AvgPool2d)(2),
            nn.Flatten(),
            nn.Linear(channels * (CONV_SIDE // 2) ** spec.conv_dim, spec.classes),
        )
    elif spec.family == "tokens":
        model = TokenModel(
            VOCAB,
            spec.width,
            spec.classes,
            spec.act,
            spec.norm,
            spec.attention,
            spec.padding_idx,
            spec.tie_head,
        )
    else:
        model = TiedLinearModel(D_IN, spec.width, spec.classes, spec.act)
    model = model.to(DTYPE)
    with torch.no_grad():
        # Re-draw every parameter from the spec's generator (torch's initialisers use the
        # global RNG); O(1) entries so the curvature is generic.
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE) / math.sqrt(max(p.shape[-1], 1)) + 0.1)
        for m in model.modules():
            # (the norms built here are affine with a bias and track running statistics, so
            # the None checks below only narrow the types)
            if (
                isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d))
                and m.weight is not None
                and m.bias is not None
            ):
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=DTYPE))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=DTYPE))
            if (
                isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                and m.running_mean is not None
                and m.running_var is not None
            ):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g, dtype=DTYPE))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=DTYPE))
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()  # as nn.Embedding initialises it
    model.train(spec.train_mode)
    return model


# --------------------------------------------------------------------------- losses
class LogCoshLoss:
    """A custom loss callable: per sample ``Σ log cosh(out − y)``, mean (or sum) over samples.

    Convex in the output (second derivative sech² > 0), so its GGN is positive semi-definite.
    A mean over the batch's samples, as the operators assume for custom callables.
    """

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        x = output - target
        per_sample = (x + F.softplus(-2.0 * x) - math.log(2.0)).reshape(x.shape[0], -1).sum(1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()

    def __repr__(self) -> str:
        return f"LogCoshLoss(reduction={self.reduction!r})"


def _make_loss_and_targets(
    spec: ProblemSpec, output_shape: tuple[int, ...], n: int, g: torch.Generator
) -> tuple[LossWithReduction, Tensor]:
    C = output_shape[1]
    if spec.loss == "ce":
        positions = (n, *output_shape[2:])
        y = torch.randint(0, C, positions, generator=g)
        if spec.ignore:
            y = y.masked_fill(torch.rand(positions, generator=g) < 0.3, -100)
            if spec.first_batch_ignored:
                y[: spec.batch_sizes[0]] = -100
            y.view(-1)[-1] = 0  # one counted target in the data set (the first batch may have none)
        weight = (0.5 + 1.5 * torch.rand(C, generator=g, dtype=DTYPE)) if spec.class_weights else None
        return nn.CrossEntropyLoss(
            weight=weight, reduction=spec.reduction, ignore_index=-100, label_smoothing=spec.label_smoothing
        ), y
    shape = (n, *output_shape[1:])
    if spec.loss == "mse":
        return nn.MSELoss(reduction=spec.reduction), torch.randn(shape, generator=g, dtype=DTYPE)
    if spec.loss == "bce":
        y = torch.bernoulli(torch.full(shape, 0.5, dtype=DTYPE), generator=g)
        pw = (0.5 + 2.0 * torch.rand(shape[-1], generator=g, dtype=DTYPE)) if spec.pos_weight else None
        return nn.BCEWithLogitsLoss(reduction=spec.reduction, pos_weight=pw), y
    return LogCoshLoss(spec.reduction), torch.randn(shape, generator=g, dtype=DTYPE)


# --------------------------------------------------------------------------- building
def _inputs(spec: ProblemSpec, n: int, g: torch.Generator) -> Tensor:
    if spec.family == "conv":
        return torch.randn((n, 2) + (CONV_SIDE,) * spec.conv_dim, generator=g, dtype=DTYPE)
    if spec.family == "tokens":
        ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g)
        if spec.padding_idx:
            ids[torch.rand(n, SEQ_LEN, generator=g) < 0.3] = 0
            ids.view(-1)[0] = 0  # padding tokens do occur
        return ids
    return torch.randn(n, D_IN, generator=g, dtype=DTYPE)


def build_problem(spec: ProblemSpec) -> Problem:
    """Build the model, loss, data and parameter selection of ``spec`` (deterministic)."""
    g = torch.Generator().manual_seed(spec.seed)
    model = _make_model(spec, g)
    n = sum(spec.batch_sizes)
    x = _inputs(spec, n, g)
    with torch.no_grad():
        was = model.training
        model.eval()  # the output's shape only; no running-statistics update
        output_shape = tuple(model(x[:1]).shape)
        model.train(was)
    loss_fn, y = _make_loss_and_targets(spec, output_shape, n, g)
    if spec.fit_first_batch:
        with torch.no_grad():
            first = spec.batch_sizes[0]
            y[:first] = model(x[:first])
    data = [
        (xb.clone(), yb.clone())
        for xb, yb in zip(x.split(list(spec.batch_sizes)), y.split(list(spec.batch_sizes)))
    ]

    named = list(model.named_parameters())
    if spec.frozen is not None:
        named[spec.frozen % len(named)][1].requires_grad_(False)
    trainable = [(name, p) for name, p in named if p.requires_grad]
    params: list[str] | list[nn.Parameter] | None
    if spec.selection == "all":
        params, selected = None, [name for name, _ in trainable]
    else:
        picked = sorted({i % len(trainable) for i in spec.chosen})
        if spec.selection == "list":
            selected = [trainable[i][0] for i in picked]
            # the documented layout is named_parameters() order, whatever the list's order
            params = [trainable[i][1] for i in reversed(picked)]
        else:
            # a chosen name itself, or (odd indices) its module's "prefix.*" where that module
            # holds no frozen parameter (a pattern matching a frozen one is refused)
            frozen_names = [name for name, p in named if not p.requires_grad]
            patterns: list[str] = []
            for i in picked:
                name = trainable[i][0]
                prefix = name.rsplit(".", 1)[0] + "." if "." in name else None
                if i % 2 == 1 and prefix is not None and not any(n.startswith(prefix) for n in frozen_names):
                    patterns.append(prefix + "*")
                else:
                    patterns.append(name)
            params = patterns
            selected = [
                name for name, _ in trainable if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
            ]

    if spec.with_grads:
        for i, (_, p) in enumerate(trainable):
            if i % 2 == 0:
                p.grad = torch.randn(p.shape, generator=g, dtype=DTYPE)
    if spec.with_hook:
        model.register_forward_pre_hook(lambda module, args: None)
    return Problem(spec, model, loss_fn, data, params, selected)


# --------------------------------------------------------------------------- strategies
@st.composite
def problem_specs(
    draw,
    *,
    train_mode: bool = False,
    smooth: bool = False,
    losses: tuple[str, ...] = LOSSES,
    ce_weight_and_smoothing: bool = True,
    poisonable: bool = False,
) -> ProblemSpec:
    """Draw a :class:`ProblemSpec`.

    Parameters
    ----------
    train_mode : bool
        Allow train-mode BatchNorm (only the Hessian is defined per batch then).
    smooth : bool
        Only smooth activations (for finite differences).
    losses : tuple of str
        Losses to choose from.
    ce_weight_and_smoothing : bool
        Allow cross-entropy with class weights and label smoothing together.
    poisonable : bool
        At least two batches (a later batch can be made to fail after construction).
    """
    family = draw(st.sampled_from(FAMILIES))
    act = draw(st.sampled_from(SMOOTH_ACTIVATIONS if smooth else tuple(ACTIVATIONS)))
    if family == "mlp":
        norms = ("none", "layer", "group", "batch") + (("batch_train",) if train_mode else ())
    elif family == "conv":
        norms = ("none", "group", "batch") + (("batch_train",) if train_mode else ())
    elif family == "tokens":
        norms = ("none", "layer")
    else:
        norms = ("none",)
    norm = draw(st.sampled_from(norms))
    # Normalising over 2 values maps everything to ±(1, −1): the curvature through it is
    # exactly 0 and the computed one pure rounding noise, which no relative tolerance can
    # judge. So normalised widths (and train-mode batch sizes of BatchNorm1d) are >= 3.
    low = 3 if norm in ("layer", "group") else 2
    width = draw(st.integers(low, 6)) if family == "tokens" else draw(st.integers(low, 8))
    tie_head = family == "tokens" and draw(st.booleans())
    classes = VOCAB if tie_head else draw(st.integers(2, 4))
    loss = draw(st.sampled_from(losses))
    reduction = draw(st.sampled_from(("mean", "sum")))
    ignore = class_weights = pos_weight = False
    smoothing = 0.0
    first_batch_ignored = False
    if loss == "ce":
        ignore = draw(st.booleans())
        first_batch_ignored = ignore and draw(st.booleans())
        class_weights = draw(st.booleans())
        smoothing = draw(st.sampled_from((0.0, 0.1)))
        if class_weights and smoothing and not ce_weight_and_smoothing:
            smoothing = 0.0
    elif loss == "bce":
        pos_weight = draw(st.booleans())
    no_grad_gate = family == "mlp" and draw(st.booleans())
    fit_first_batch = loss in ("mse", "custom") and norm != "batch_train" and draw(st.booleans())
    min_batch = 3 if norm == "batch_train" and family == "mlp" else 1
    min_batches = 2 if poisonable else 1
    batch_sizes = tuple(draw(st.lists(st.integers(min_batch, 4), min_size=min_batches, max_size=4)))
    selection = draw(st.sampled_from(("all", "list", "glob")))
    chosen = tuple(draw(st.lists(st.integers(0, 20), min_size=1, max_size=4))) if selection != "all" else ()
    frozen = draw(st.one_of(st.none(), st.integers(0, 20)))
    return ProblemSpec(
        family=family,
        seed=draw(st.integers(0, 2**31 - 1)),
        act=act,
        norm=norm,
        width=width,
        classes=classes,
        conv_dim=draw(st.sampled_from((1, 2))) if family == "conv" else 0,
        padding_idx=family == "tokens" and draw(st.booleans()),
        attention=draw(st.sampled_from(("none", "mha", "sdpa"))) if family == "tokens" else "none",
        tie_head=tie_head,
        loss=loss,
        reduction=reduction,
        ignore=ignore,
        class_weights=class_weights,
        label_smoothing=smoothing,
        pos_weight=pos_weight,
        batch_sizes=batch_sizes,
        selection=selection,
        chosen=chosen,
        frozen=frozen,
        with_grads=draw(st.booleans()),
        with_hook=draw(st.booleans()),
        no_grad_gate=no_grad_gate,
        fit_first_batch=fit_first_batch,
        first_batch_ignored=first_batch_ignored and len(batch_sizes) > 1,
    )
