"""Matrix of small float64 model/loss/data cases for the curvature-operator tests.

Every case is a :class:`Case`: a named, seeded factory returning ``(model, loss_fn, data)``.

Conventions
-----------
- Everything is ``torch.float64`` and built inside :func:`torch.random.fork_rng`, so building
  a case never touches the global RNG and always gives bit-identical tensors.
- ``data`` is a list of ``(inputs, targets)`` batches of **unequal** sizes (default 5, 3, 2
  samples; the ``tiny_last`` cases end with a batch of 1 sample). Unequal sizes are what make
  a wrong per-batch weighting visible: the exact ``mean`` objective weights batch ``b`` by its
  share of the *whole-dataset* normaliser, not by ``1 / num_batches``.
- ``inputs`` is a tensor, or a dict of tensors (Hugging Face style). A dict is passed to the
  model as keyword arguments: ``model(**inputs)``; a tensor positionally: ``model(inputs)``.
  :func:`call_model` does exactly that.
- Models are in ``eval()`` mode (BatchNorm uses its non-trivial running statistics) and have no
  dropout, so the objective is a deterministic function of the parameters.
- The parameters of a case are :func:`trainable_params` ``(model)``: ``model.parameters()`` in
  registration order, a tied parameter listed once (``nn.Module.parameters`` de-duplicates).
- The number of parameters D stays between ~40 and ~220, so dense (D, D) matrices are cheap.

Subsets
-------
``CASES``               all cases.
``SMOOTH_CASES``        no ReLU / max-pool kinks: central finite differences of the gradient
                        converge at O(eps²) (used to check the dense references).
``NO_NORM_CASES``       no LayerNorm / BatchNorm: safe to cross-check against curvlinops 3.0.1,
                        whose vmap(jvp(jacrev)) Hessian is wrong through normalisation layers
                        on this torch (see ``/work/shared/reference/anchors.md``).
``TINY_LAST_BATCH_CASES`` the last batch holds a single sample.

Use ``pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))`` (or ``ids=str``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPE = torch.float64

Inputs = Tensor | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]


class LossWithReduction(Protocol):
    """A loss ``loss_fn(output, target) -> Tensor`` with torch's ``reduction`` attribute
    (``"mean"`` or ``"sum"``): torch's loss modules, and the custom callables of the property
    tests."""

    reduction: str

    def __call__(self, output: Tensor, target: Tensor, /) -> Tensor: ...


CaseTuple = tuple[nn.Module, LossWithReduction, list[Batch]]

DEFAULT_BATCH_SIZES = (5, 3, 2)
TINY_LAST_BATCH_SIZES = (4, 3, 1)


# --------------------------------------------------------------------------- helpers
def call_model(model: nn.Module, inputs: Inputs) -> Tensor:
    """Run ``model`` on one batch's inputs: a dict as keyword arguments, a tensor positionally."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the curvature is taken with respect to, in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_samples(inputs: Inputs) -> int:
    """Number of samples (size of dimension 0) of one batch's inputs."""
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def _split(inputs: Inputs, targets: Tensor, sizes: Sequence[int]) -> list[Batch]:
    """Split concatenated inputs/targets into batches of the given (unequal) sizes."""
    assert num_samples(inputs) == sum(sizes) == targets.shape[0]
    ys = targets.split(list(sizes))
    if isinstance(inputs, Mapping):
        parts = {k: v.split(list(sizes)) for k, v in inputs.items()}
        xs = [{k: parts[k][i] for k in inputs} for i in range(len(sizes))]
    else:
        xs = list(inputs.split(list(sizes)))
    # .clone() so batches do not share storage with each other (a test mutating one batch must
    # not silently change another)
    out: list[Batch] = []
    for x, y in zip(xs, ys):
        x = {k: v.clone() for k, v in x.items()} if isinstance(x, Mapping) else x.clone()
        out.append((x, y.clone()))
    return out


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Fully connected net ``Linear -> act -> ... -> Linear`` applied over the last dimension.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first, output last.
    act : callable
        Element-wise activation between the linear layers.
    """

    def __init__(self, sizes: Sequence[int], act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class DictMLP(nn.Module):
    """MLP taking Hugging-Face-style keyword inputs ``x`` and a float ``mask`` of the same shape."""

    def __init__(self, sizes: Sequence[int]):
        super().__init__()
        self.mlp = MLP(sizes, torch.tanh)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.mlp(x * mask)


class SmallCNN(nn.Module):
    """``Conv2d -> [BatchNorm2d] -> act -> pool -> flatten -> Linear``; outputs (N, C) logits.

    Input (N, 2, 5, 5); the conv keeps 5×5 (padding 1), the 2×2 pool floors it to 2×2.
    """

    def __init__(self, act: Callable[[Tensor], Tensor], pool: nn.Module, batchnorm: bool, n_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(3) if batchnorm else None
        self.act = act
        self.pool = pool
        self.fc = nn.Linear(3 * 2 * 2, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        h = self.pool(self.act(h))
        return self.fc(h.flatten(1))


class TinyTransformer(nn.Module):
    """One pre-norm transformer block on token ids, per-position logits of shape (N, C, T).

    Attention is written with explicit matmuls and softmax (not fused SDPA, which has no double
    backward / forward-mode AD on CPU). Causal plus optional key-padding mask (``attention_mask``
    1 = keep, 0 = pad, as in Hugging Face). With ``layernorm=False`` the two LayerNorms are
    replaced by the identity (for curvlinops cross-checks).
    """

    def __init__(
        self,
        vocab: int = 5,
        d: int = 4,
        seq_len: int = 4,
        hidden: int = 6,
        n_classes: int = 5,
        layernorm: bool = True,
    ):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.3 * torch.randn(seq_len, d))
        self.ln1 = nn.LayerNorm(d) if layernorm else nn.Identity()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d) if layernorm else nn.Identity()
        self.ff1 = nn.Linear(d, hidden)
        self.ff2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, n_classes)
        if layernorm:
            # non-trivial affine parameters, so the LayerNorm weight/bias blocks are generic
            with torch.no_grad():
                for ln in (self.ln1, self.ln2):
                    assert isinstance(ln, nn.LayerNorm)  # layernorm=True: both are LayerNorms
                    ln.weight.add_(0.3 * torch.randn_like(ln.weight))
                    ln.bias.add_(0.2 * torch.randn_like(ln.bias))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        N, T = input_ids.shape
        h = self.emb(input_ids) + self.pos[:T]
        a = self.ln1(h)
        q, k, v = self.q(a), self.k(a), self.v(a)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        keep = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril().expand(N, T, T)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, :]
        # every query keeps at least key 0 (position 0 is never padded), so no row is all -inf
        scores = scores.masked_fill(~keep, float("-inf"))
        h = h + self.o(torch.softmax(scores, dim=-1) @ v)
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(h).transpose(1, 2)  # (N, T, C) -> (N, C, T) as CrossEntropyLoss wants


class TiedEmbeddingModel(nn.Module):
    """Token -> embedding -> tanh(Linear) -> logits with the output weight TIED to the embedding.

    ``head.weight`` is the same ``nn.Parameter`` as ``emb.weight`` (registered under two names,
    as Hugging Face ties input and output embeddings); ``parameters()`` lists it once, and the
    curvature must add the contributions of both uses.
    """

    def __init__(self, vocab: int = 6, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight  # tie

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(input_ids))))


# --------------------------------------------------------------------------- the case type
@dataclass(frozen=True)
class Case:
    """A named, seeded ``(model, loss_fn, data)`` factory plus the properties tests filter on.

    Attributes
    ----------
    id : str
        ``model-loss[-variant]``; unique, usable as a pytest id.
    build : callable
        ``(batch_sizes) -> (model, loss_fn, data)``; called inside a forked, seeded RNG.
    seed : int
        Seed of the forked RNG.
    batch_sizes : tuple of int
        Samples per batch (unequal).
    smooth : bool
        No ReLU / max-pool kinks (finite differences converge at O(eps²)).
    has_norm : bool
        Contains LayerNorm or BatchNorm.
    dict_inputs : bool
        Batch inputs are dicts passed as keyword arguments.
    ignored_targets : bool
        Some targets equal the cross-entropy ``ignore_index`` (-100).
    output_2d : bool
        Model output is (N, C); otherwise it has extra dimensions ((N, C, T) or (N, T, K)).
    tied : bool
        One parameter is used twice (tied weights).
    linear_in_params : bool
        The model output is linear (affine) in the parameters, so Hessian == GGN exactly.
    """

    id: str
    build: Callable[[tuple[int, ...]], CaseTuple] = field(repr=False)
    seed: int
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    smooth: bool = True
    has_norm: bool = False
    dict_inputs: bool = False
    ignored_targets: bool = False
    output_2d: bool = True
    tied: bool = False
    linear_in_params: bool = False

    def make(self) -> CaseTuple:
        """Build a fresh ``(model, loss_fn, data)``; bit-identical on every call."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model, loss_fn, data = self.build(self.batch_sizes)
        model.eval()
        return model, loss_fn, data

    __call__ = make

    @property
    def tiny_last(self) -> bool:
        """Whether the last batch holds a single sample."""
        return self.batch_sizes[-1] == 1

    def __str__(self) -> str:  # so that ``ids=str`` works too
        return self.id


def case_ids(cases: Sequence[Case]) -> list[str]:
    """Pytest ids for ``cases``."""
    return [c.id for c in cases]


# --------------------------------------------------------------------------- builders
def _mlp_builder(
    sizes: Sequence[int],
    act: Callable[[Tensor], Tensor],
    loss: str,
    reduction: str,
    *,
    seq: int | None = None,
    pos_weight: Sequence[float] | None = None,
) -> Callable[[tuple[int, ...]], CaseTuple]:
    """MLP on (N, sizes[0]) inputs (or (N, seq, sizes[0]) when ``seq``) with loss ``loss``."""

    def build(batch_sizes: tuple[int, ...]) -> CaseTuple:
        model = MLP(sizes, act).to(DTYPE)
        n = sum(batch_sizes)
        lead = (n,) if seq is None else (n, seq)
        x = torch.randn(*lead, sizes[0], dtype=DTYPE)
        k = sizes[-1]
        if loss == "ce":
            y = torch.randint(0, k, lead)
            loss_fn: LossWithReduction = nn.CrossEntropyLoss(reduction=reduction)
        elif loss == "mse":
            y = torch.randn(*lead, k, dtype=DTYPE)
            loss_fn = nn.MSELoss(reduction=reduction)
        elif loss == "bce":
            y = torch.bernoulli(torch.full((*lead, k), 0.5, dtype=DTYPE))
            pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=DTYPE)
            loss_fn = nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=pw)
        else:
            raise ValueError(loss)
        return model, loss_fn, _split(x, y, batch_sizes)

    return build


def _linear_builder(batch_sizes: tuple[int, ...]) -> CaseTuple:
    """Linear regression 4 -> 3 under MSE(mean): Hessian == GGN == (2/(N·K)) I ⊗ [X 1]ᵀ[X 1]."""
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    n = sum(batch_sizes)
    x = torch.randn(n, 4, dtype=DTYPE)
    y = torch.randn(n, 3, dtype=DTYPE)
    return model, nn.MSELoss(), _split(x, y, batch_sizes)


def _linear_ce_builder(batch_sizes: tuple[int, ...]) -> CaseTuple:
    """Multinomial logistic regression 4 -> 3 under CE(sum): linear in θ, so Hessian == GGN."""
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    n = sum(batch_sizes)
    x = torch.randn(n, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (n,))
    return model, nn.CrossEntropyLoss(reduction="sum"), _split(x, y, batch_sizes)


def _cnn_builder(
    act: Callable[[Tensor], Tensor], pool: str, batchnorm: bool, reduction: str
) -> Callable[[tuple[int, ...]], CaseTuple]:
    def build(batch_sizes: tuple[int, ...]) -> CaseTuple:
        pool_mod = nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)
        model = SmallCNN(act, pool_mod, batchnorm).to(DTYPE)
        if batchnorm:
            # non-trivial running statistics and affine parameters: eval-mode BN is then a
            # generic per-channel affine map, and a bug that used batch statistics (or ignored
            # the running ones) changes the curvature visibly
            with torch.no_grad():
                bn = model.bn
                assert bn is not None  # batchnorm=True
                # BatchNorm2d(3) tracks running statistics (buffers, never None here)
                assert bn.running_mean is not None
                assert bn.running_var is not None
                bn.running_mean.copy_(0.5 * torch.randn(3, dtype=DTYPE))
                bn.running_var.copy_(0.5 + torch.rand(3, dtype=DTYPE))
                bn.weight.copy_(1.0 + 0.3 * torch.randn(3, dtype=DTYPE))
                bn.bias.copy_(0.2 * torch.randn(3, dtype=DTYPE))
        n = sum(batch_sizes)
        x = torch.randn(n, 2, 5, 5, dtype=DTYPE)
        y = torch.randint(0, 3, (n,))
        return model, nn.CrossEntropyLoss(reduction=reduction), _split(x, y, batch_sizes)

    return build


def _seq_builder(
    layernorm: bool, reduction: str, *, dict_inputs: bool, ignore: bool
) -> Callable[[tuple[int, ...]], CaseTuple]:
    """Token sequences (T=4, vocab 5), per-position CE over 5 classes on (N, C, T) logits.

    With ``ignore``, padded positions (``attention_mask == 0``, trailing, never position 0)
    and a few extra random positions get target -100, so batches have different numbers of
    counted targets and the ``mean`` normaliser is NOT proportional to the batch size.
    """

    def build(batch_sizes: tuple[int, ...]) -> CaseTuple:
        T, vocab, C = 4, 5, 5
        model = TinyTransformer(vocab=vocab, d=4, seq_len=T, hidden=6, n_classes=C, layernorm=layernorm).to(
            DTYPE
        )
        n = sum(batch_sizes)
        ids = torch.randint(0, vocab, (n, T))
        y = torch.randint(0, C, (n, T))
        mask = torch.ones(n, T, dtype=torch.long)
        if ignore:
            lengths = torch.randint(1, T + 1, (n,))  # >= 1: position 0 is never padded
            mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
            y = y.masked_fill(mask == 0, -100)
            extra = torch.rand(n, T) < 0.2
            extra[:, 0] = False
            # position 0 is never ignored, so every batch has counted targets (a `mean` batch
            # loss would otherwise be 0/0 = nan)
            y = y.masked_fill(extra, -100)
        inputs: Inputs = {"input_ids": ids, "attention_mask": mask} if dict_inputs else ids
        loss_fn = nn.CrossEntropyLoss(reduction=reduction, ignore_index=-100)
        return model, loss_fn, _split(inputs, y, batch_sizes)

    return build


def _tied_builder(reduction: str) -> Callable[[tuple[int, ...]], CaseTuple]:
    def build(batch_sizes: tuple[int, ...]) -> CaseTuple:
        model = TiedEmbeddingModel(vocab=6, d=4).to(DTYPE)
        n = sum(batch_sizes)
        ids = torch.randint(0, 6, (n,))
        y = torch.randint(0, 6, (n,))
        return model, nn.CrossEntropyLoss(reduction=reduction), _split(ids, y, batch_sizes)

    return build


def _dict_mlp_builder(loss: str, reduction: str) -> Callable[[tuple[int, ...]], CaseTuple]:
    def build(batch_sizes: tuple[int, ...]) -> CaseTuple:
        model = DictMLP([4, 5, 3]).to(DTYPE)
        n = sum(batch_sizes)
        x = torch.randn(n, 4, dtype=DTYPE)
        mask = torch.bernoulli(torch.full((n, 4), 0.75, dtype=DTYPE))
        if loss == "mse":
            y = torch.randn(n, 3, dtype=DTYPE)
            loss_fn: LossWithReduction = nn.MSELoss(reduction=reduction)
        else:
            y = torch.bernoulli(torch.full((n, 3), 0.5, dtype=DTYPE))
            loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
        return model, loss_fn, _split({"x": x, "mask": mask}, y, batch_sizes)

    return build


# --------------------------------------------------------------------------- the matrix
CASES: list[Case] = [
    # MLPs: activations × losses × reductions
    Case("mlp_tanh-ce_mean", _mlp_builder([4, 5, 4, 3], torch.tanh, "ce", "mean"), seed=1),
    Case("mlp_tanh-ce_sum", _mlp_builder([4, 5, 4, 3], torch.tanh, "ce", "sum"), seed=2),
    Case("mlp_relu-mse_mean", _mlp_builder([4, 6, 2], torch.relu, "mse", "mean"), seed=3, smooth=False),
    Case("mlp_relu-bce_sum", _mlp_builder([4, 6, 3], torch.relu, "bce", "sum"), seed=4, smooth=False),
    Case("mlp_gelu-mse_sum", _mlp_builder([4, 5, 3], F.gelu, "mse", "sum"), seed=5),
    Case("mlp_gelu-bce_mean", _mlp_builder([4, 5, 3], F.gelu, "bce", "mean"), seed=6),
    Case(
        "mlp_tanh-bce_posweight_mean-tiny_last",
        _mlp_builder([4, 5, 3], torch.tanh, "bce", "mean", pos_weight=[0.5, 2.0, 3.0]),
        seed=7,
        batch_sizes=TINY_LAST_BATCH_SIZES,
    ),
    Case(
        "mlp_tanh-mse_mean_seq_output",
        _mlp_builder([4, 5, 2], torch.tanh, "mse", "mean", seq=3),
        seed=8,
        output_2d=False,
    ),
    Case(
        "mlp_tanh-mse_sum-tiny_last",
        _mlp_builder([4, 5, 2], torch.tanh, "mse", "sum"),
        seed=9,
        batch_sizes=TINY_LAST_BATCH_SIZES,
    ),
    # linear in the parameters: Hessian == GGN exactly
    Case("linear-mse_mean", _linear_builder, seed=10, linear_in_params=True),
    Case("linear-ce_sum", _linear_ce_builder, seed=11, linear_in_params=True),
    # CNNs
    Case("cnn_tanh_avgpool-ce_mean", _cnn_builder(torch.tanh, "avg", False, "mean"), seed=12),
    Case(
        "cnn_relu_maxpool-ce_sum-tiny_last",
        _cnn_builder(torch.relu, "max", False, "sum"),
        seed=13,
        smooth=False,
        batch_sizes=TINY_LAST_BATCH_SIZES,
    ),
    Case("cnn_bn_eval-ce_mean", _cnn_builder(torch.tanh, "avg", True, "mean"), seed=14, has_norm=True),
    # transformer block with LayerNorm, dict inputs, per-position CE with ignore_index
    Case(
        "transformer_ln-ce_seq_ignore_mean",
        _seq_builder(True, "mean", dict_inputs=True, ignore=True),
        seed=15,
        has_norm=True,
        dict_inputs=True,
        ignored_targets=True,
        output_2d=False,
    ),
    Case(
        "transformer_ln-ce_seq_ignore_sum-tiny_last",
        _seq_builder(True, "sum", dict_inputs=True, ignore=True),
        seed=16,
        batch_sizes=TINY_LAST_BATCH_SIZES,
        has_norm=True,
        dict_inputs=True,
        ignored_targets=True,
        output_2d=False,
    ),
    # the same block without LayerNorm (curvlinops-checkable)
    Case(
        "attn_nonorm-ce_seq_mean",
        _seq_builder(False, "mean", dict_inputs=False, ignore=False),
        seed=17,
        output_2d=False,
    ),
    Case(
        "attn_nonorm-ce_seq_ignore_sum",
        _seq_builder(False, "sum", dict_inputs=True, ignore=True),
        seed=18,
        dict_inputs=True,
        ignored_targets=True,
        output_2d=False,
    ),
    Case(
        "attn_nonorm-ce_seq_ignore_mean",
        _seq_builder(False, "mean", dict_inputs=True, ignore=True),
        seed=19,
        dict_inputs=True,
        ignored_targets=True,
        output_2d=False,
    ),
    # tied weights
    Case("tied_embed-ce_mean", _tied_builder("mean"), seed=20, tied=True),
    Case(
        "tied_embed-ce_sum-tiny_last",
        _tied_builder("sum"),
        seed=21,
        tied=True,
        batch_sizes=TINY_LAST_BATCH_SIZES,
    ),
    # dict (keyword) inputs
    Case("dict_mlp-mse_mean", _dict_mlp_builder("mse", "mean"), seed=22, dict_inputs=True),
    Case(
        "dict_mlp-bce_sum-tiny_last",
        _dict_mlp_builder("bce", "sum"),
        seed=23,
        dict_inputs=True,
        batch_sizes=TINY_LAST_BATCH_SIZES,
    ),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

SMOOTH_CASES: list[Case] = [c for c in CASES if c.smooth]
NO_NORM_CASES: list[Case] = [c for c in CASES if not c.has_norm]
TINY_LAST_BATCH_CASES: list[Case] = [c for c in CASES if c.tiny_last]
CASES_BY_ID: dict[str, Case] = {c.id: c for c in CASES}


def get_case(case_id: str) -> Case:
    """The case named ``case_id``."""
    return CASES_BY_ID[case_id]


__all__ = [
    "CASES",
    "CASES_BY_ID",
    "Case",
    "DTYPE",
    "NO_NORM_CASES",
    "SMOOTH_CASES",
    "TINY_LAST_BATCH_CASES",
    "call_model",
    "case_ids",
    "get_case",
    "num_samples",
    "trainable_params",
]
