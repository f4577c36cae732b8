"""Curvature of causal language models: loss, data and parameter helpers.

A causal LM predicts token ``t + 1`` from tokens ``≤ t``: the logits (B, T, V) of
position ``t`` are scored against the label of position ``t + 1``, and labels equal to
``ignore_index`` (-100, Hugging Face's convention for padding and prompt tokens) do
not count. The pieces here make the operators compute the curvature of exactly that
objective, averaged over **all counted tokens of all batches**:

- [`CausalLMLoss`][curvops.lm.CausalLMLoss]: the loss (an ``nn.CrossEntropyLoss`` over shifted
  positions); every operator recognises it (the loss-Hessian products, Monte-Carlo sampling
  and normaliser run on the shifted rows, with the fused cross-entropy kernel).
- [`causal_lm_data`][curvops.lm.causal_lm_data]: turns Hugging Face style batches (dicts with
  ``input_ids``, ``attention_mask``, ``labels``) into the operators' ``(inputs, labels)`` pairs.
- [`causal_lm_operator`][curvops.lm.causal_lm_operator]: builds a Hessian, GGN or Fisher operator
  from a model and such batches in one call.
- [`block_params`][curvops.lm.block_params], [`attention_params`][curvops.lm.attention_params],
  [`mlp_params`][curvops.lm.mlp_params]: ``params=`` glob patterns that select one transformer
  block, or the attention (MLP) of every block.

Works for Hugging Face causal LMs (``transformers``, the optional extra ``hf``: output a
``ModelOutput`` with ``logits``) and for plain ``nn.Module`` LMs whose forward returns
logits (B, T, V). Use ``attn_implementation="eager"`` (or ``"sdpa"``, which curvops
routes to the math kernel) for Hessian and GGN products: flash / flex attention have
no double backward nor forward-mode derivatives.

Example
-------
>>> from transformers import GPT2Config, GPT2LMHeadModel           # doctest: +SKIP
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101,
...                                    attn_implementation="eager")).eval()
>>> batches = [{"input_ids": ids, "attention_mask": mask} for ids, mask in ...]
>>> G = causal_lm_operator("ggn", model, batches, params=attention_params(model))
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalLMLoss",
    "CausalLMData",
    "causal_lm_data",
    "causal_lm_operator",
    "transformer_blocks",
    "block_params",
    "attention_params",
    "mlp_params",
]


class CausalLMLoss(nn.CrossEntropyLoss):
    """Next-token cross-entropy of a causal LM: logits (B, T, V) against labels (B, T).

    Position ``t`` of the logits is scored against ``labels[:, t + 1]``; the last
    position and labels equal to ``ignore_index`` do not count. Equals Hugging Face's
    ``model(**inputs, labels=labels).loss`` (the labels are shifted inside, as there)
    for ``reduction="mean"``.

    Parameters
    ----------
    ignore_index : int, optional
        Label that does not count (default -100).
    reduction : {"mean", "sum"}, optional
        ``"mean"`` (default): over the counted tokens (for an operator: over the
        counted tokens of all its batches); ``"sum"``.
    weight, label_smoothing
        As in ``torch.nn.CrossEntropyLoss`` (the ``mean`` with label smoothing
        and ignored tokens is torch's, which divides the smoothing term by all rows).

    Notes
    -----
    The operators see this loss through two methods, [`flat_output`][curvops.lm.CausalLMLoss.flat_output] and
    [`flat_target`][curvops.lm.CausalLMLoss.flat_target], which present the logits as rows (B·T, V) (a view)
    and the labels as the matching shifted targets (B·T,); see
    ``curvops.operators._loss.LossSpec``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )

    def flat_output(self, x: Tensor) -> Tensor:
        """A logit-shaped tensor as rows, one per position.

        Parameters
        ----------
        x : Tensor, shape (…, T, V)
            Logits (or a tangent of them).

        Returns
        -------
        Tensor, shape (…·T, V)
            A view where the layout allows, else a copy.
        """
        return x.reshape(-1, x.shape[-1])

    def flat_target(self, labels: Tensor) -> Tensor:
        """Labels as the targets of the rows of ``flat_output``: shifted by one position.

        Parameters
        ----------
        labels : Tensor, shape (…, T), integer
            Token labels; ``ignore_index`` where a position does not count.

        Returns
        -------
        Tensor, shape (…·T,)
            Position ``t`` gets label ``t + 1``; the last position gets ``ignore_index``.

        Raises
        ------
        TypeError
            If ``labels`` is not an integer tensor.
        """
        if not torch.is_tensor(labels) or labels.is_floating_point():
            raise TypeError("CausalLMLoss needs integer token labels of shape (batch, sequence)")
        shifted = F.pad(labels[..., 1:], (0, 1), value=self.ignore_index)
        return shifted.reshape(-1)

    def forward(self, logits: Any, labels: Tensor) -> Tensor:
        """The next-token loss.

        Parameters
        ----------
        logits : Tensor, shape (…, T, V), or a model output with a ``logits`` tensor
            The model's output (Hugging Face ``ModelOutput`` or plain logits).
        labels : Tensor, shape (…, T), integer
            Token labels, unshifted (position ``t`` of the logits is scored against
            ``labels[..., t + 1]``).

        Returns
        -------
        Tensor, 0-d
            The mean (over counted tokens) or sum, as ``reduction`` says.

        Raises
        ------
        ValueError
            If the shapes of ``logits`` and ``labels`` do not match.
        TypeError
            If ``logits`` is neither a tensor nor has a ``logits`` tensor, or ``labels``
            is not an integer tensor.
        """
        logits = _logits_of(logits)
        if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                "logits (…, T, V) and labels (…, T) do not match: "
                f"{tuple(logits.shape)} vs {tuple(labels.shape)}"
            )
        return F.cross_entropy(
            self.flat_output(logits),
            self.flat_target(labels),
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


def _logits_of(output: Any) -> Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise TypeError(f"expected logits or a model output with a 'logits' tensor, got {type(output).__name__}")


class CausalLMData:
    """Re-iterable ``(inputs, labels)`` view of causal-LM batches (made by ``causal_lm_data``).

    Parameters
    ----------
    batches : iterable
        Re-iterable batches: dicts of tensors, tensors of token ids (B, T), or
        ``(inputs, labels)`` pairs (see [`causal_lm_data`][curvops.lm.causal_lm_data]).
    labels_key : str, optional
        Key of the labels in dict batches (default ``"labels"``).
    ignore_index : int, optional
        Label given to padding (``attention_mask == 0``) when the labels are made from
        ``input_ids`` (default -100).

    Raises
    ------
    TypeError
        If ``batches`` is a one-shot iterator (the operators pass over the data many times).
    """

    def __init__(self, batches: Iterable[Any], labels_key: str = "labels", ignore_index: int = -100) -> None:
        if iter(batches) is batches:
            raise TypeError(
                "batches must be re-iterable (a list or a non-shuffling DataLoader), not a one-shot iterator"
            )
        self.batches = batches
        self.labels_key = labels_key
        self.ignore_index = ignore_index

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for index, batch in enumerate(self.batches):
            yield self._convert(batch, index)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _convert(self, batch: Any, index: int) -> tuple[Any, Tensor]:
        if torch.is_tensor(batch):
            if batch.is_floating_point():
                raise TypeError(f"batch {index}: token ids must be integers")
            return batch, batch
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != self.labels_key}
            if self.labels_key in batch:
                return inputs, batch[self.labels_key]
            ids = inputs.get("input_ids")
            if not torch.is_tensor(ids):
                raise KeyError(f"batch {index} has neither {self.labels_key!r} nor 'input_ids'")
            labels = ids.clone()
            mask = inputs.get("attention_mask")
            if mask is not None:
                # Padding does not count: Hugging Face's collators do the same.
                labels = labels.masked_fill(mask == 0, self.ignore_index)
            return inputs, labels
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(
            f"batch {index} must be token ids, a dict of tensors or an (inputs, labels) pair, "
            f"got {type(batch).__name__}"
        )


def causal_lm_data(
    batches: Iterable[Any], *, labels_key: str = "labels", ignore_index: int = -100
) -> CausalLMData:
    """The operators' ``(inputs, labels)`` batches from causal-LM batches.

    Parameters
    ----------
    batches : iterable
        Re-iterable batches, each one of:

        - a dict of tensors (``input_ids``, ``attention_mask``, ...): the inputs are the
          dict without ``labels_key``, passed to the model as keyword arguments; the
          labels are ``batch[labels_key]`` if present, else ``input_ids`` with padding
          (``attention_mask == 0``) set to ``ignore_index``;
        - a tensor of token ids (B, T): inputs and labels are the ids;
        - an ``(inputs, labels)`` pair, passed through.
    labels_key : str, optional
        Key of the labels in dict batches (default ``"labels"``).
    ignore_index : int, optional
        Label of positions that do not count (default -100).

    Returns
    -------
    CausalLMData
        Re-iterable; converts each batch as it is iterated (no copy of the data set).
    """
    return CausalLMData(batches, labels_key=labels_key, ignore_index=ignore_index)


def causal_lm_operator(
    curvature: str,
    model: nn.Module,
    batches: Iterable[Any],
    *,
    params: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    **kwargs: Any,
) -> Any:
    """A curvature operator of a causal LM's next-token loss over ``batches``.

    Parameters
    ----------
    curvature : {"hessian", "ggn", "fisher"}
        [`HessianOperator`][curvops.HessianOperator], [`GGNOperator`][curvops.GGNOperator] or
        [`FisherOperator`][curvops.FisherOperator].
    model : nn.Module
        A Hugging Face causal LM (its ``ModelOutput.logits`` are used) or any module
        returning logits (B, T, V). Put it in ``eval()`` mode (dropout off).
    batches : iterable
        As for [`causal_lm_data`][curvops.lm.causal_lm_data].
    params : optional
        As for the operators: glob patterns such as [`block_params`][curvops.lm.block_params] or
        [`attention_params`][curvops.lm.attention_params] return, a list of parameters, or None (all).
    ignore_index, reduction
        As for [`CausalLMLoss`][curvops.lm.CausalLMLoss].
    **kwargs
        Passed to the operator (``method=`` for the Hessian, ``fused_head=`` for the GGN,
        ``kind=``/``mc_samples=`` for the Fisher, ``check_deterministic=``).

    Returns
    -------
    HessianOperator, GGNOperator or FisherOperator
        The operator of the mean next-token loss over all counted tokens of ``batches``
        (or their sum, with ``reduction="sum"``), shape (D, D).

    Raises
    ------
    ValueError
        If ``curvature`` is not one of the three (and whatever the operator raises for its
        arguments).
    """
    from curvops.operators import FisherOperator, GGNOperator, HessianOperator

    classes = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}
    if curvature not in classes:
        raise ValueError(f"curvature must be one of {tuple(classes)}, got {curvature!r}")
    loss = CausalLMLoss(ignore_index=ignore_index, reduction=reduction)
    data = causal_lm_data(batches, ignore_index=ignore_index)
    return classes[curvature](model, loss, data, params=params, **kwargs)


# ----------------------------------------------------------------- parameter filters
def transformer_blocks(model: nn.Module) -> tuple[str, int]:
    """Qualified name and length of the model's stack of transformer blocks.

    The stack is the longest ``nn.ModuleList`` of modules with parameters (GPT-2:
    ``"transformer.h"``, Llama: ``"model.layers"``); ties go to the first registered.

    Parameters
    ----------
    model : nn.Module
        A transformer language model.

    Returns
    -------
    tuple of (str, int)
        The stack's qualified name in ``model.named_modules()`` and its number of blocks.

    Raises
    ------
    ValueError
        If the model has no ``nn.ModuleList`` of parameterised modules.
    """
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) > 0):
            continue
        parameterised = all(any(True for _ in m.parameters()) for m in module)
        if parameterised and (best is None or len(module) > best[1]):
            best = (name, len(module))
    if best is None:
        raise ValueError("the model has no nn.ModuleList of blocks; pass glob patterns to params= instead")
    return best


def _layers(model: nn.Module, layers: int | Sequence[int] | None) -> tuple[str, list[int]]:
    prefix, count = transformer_blocks(model)
    if layers is None:
        return prefix, list(range(count))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    for i in chosen:
        if not -count <= i < count:
            raise IndexError(f"layer {i} out of range: {prefix} has {count} blocks")
    return prefix, [i % count for i in chosen]


def block_params(model: nn.Module, layer: int) -> list[str]:
    """``params=`` patterns selecting every parameter of one transformer block.

    GPT-2: ``block_params(model, 0) == ["transformer.h.0.*"]``.

    Parameters
    ----------
    model : nn.Module
        A transformer language model (its blocks found by
        [`transformer_blocks`][curvops.lm.transformer_blocks]).
    layer : int
        Index of the block; negative counts from the end.

    Returns
    -------
    list of str
        One glob pattern, for ``params=`` of an operator.

    Raises
    ------
    IndexError
        If ``layer`` is out of range.
    ValueError
        If the model has no stack of blocks.
    """
    prefix, chosen = _layers(model, layer)
    return [f"{prefix}.{chosen[0]}.*"]


def _part_params(
    model: nn.Module, layers: int | Sequence[int] | None, keys: tuple[str, ...], what: str
) -> list[str]:
    prefix, chosen = _layers(model, layers)
    blocks = model.get_submodule(prefix)
    assert isinstance(blocks, nn.ModuleList)  # transformer_blocks found a ModuleList there
    patterns = []
    for i in chosen:
        names = [
            n
            for n, m in blocks[i].named_children()
            if any(fnmatch.fnmatchcase(n.lower(), k) for k in keys) and any(True for _ in m.parameters())
        ]
        if not names:
            raise ValueError(
                f"block {prefix}.{i} has no {what} submodule (children: "
                f"{[n for n, _ in blocks[i].named_children()]})"
            )
        patterns += [f"{prefix}.{i}.{n}.*" for n in names]
    return patterns


def attention_params(model: nn.Module, layers: int | Sequence[int] | None = None) -> list[str]:
    """``params=`` patterns selecting the attention of every block (or of ``layers``).

    The attention of a block is its child module whose name contains ``attn`` or
    ``attention`` (GPT-2 ``attn``, Llama ``self_attn``, BERT ``attention``). GPT-2:
    ``["transformer.h.0.attn.*", "transformer.h.1.attn.*", ...]``; the single glob
    ``"transformer.h.*.attn.*"`` selects the same.

    Parameters
    ----------
    model : nn.Module
        A transformer language model (its blocks found by
        [`transformer_blocks`][curvops.lm.transformer_blocks]).
    layers : int or sequence of int, optional
        Block indices (negative count from the end); default every block.

    Returns
    -------
    list of str
        Glob patterns, one per selected child module, for ``params=`` of an operator.

    Raises
    ------
    IndexError
        If a layer index is out of range.
    ValueError
        If the model has no stack of blocks, or a selected block has no such child.
    """
    return _part_params(model, layers, ("*attn*", "*attention*"), "attention")


def mlp_params(model: nn.Module, layers: int | Sequence[int] | None = None) -> list[str]:
    """``params=`` patterns selecting the MLP (feed-forward) of every block (or of ``layers``).

    The MLP of a block is its child module whose name contains ``mlp``, ``ffn`` or
    ``feed_forward``.

    Parameters
    ----------
    model : nn.Module
        A transformer language model (its blocks found by
        [`transformer_blocks`][curvops.lm.transformer_blocks]).
    layers : int or sequence of int, optional
        Block indices (negative count from the end); default every block.

    Returns
    -------
    list of str
        Glob patterns, one per selected child module, for ``params=`` of an operator.

    Raises
    ------
    IndexError
        If a layer index is out of range.
    ValueError
        If the model has no stack of blocks, or a selected block has no such child.
    """
    return _part_params(model, layers, ("*mlp*", "*ffn*", "*feed_forward*"), "MLP")
