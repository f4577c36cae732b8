"""Causal-LM helpers: loss, data, parameter filters, and operators against dense references.

The Hugging Face tests build a tiny GPT-2 from a config (no download; skipped when
``transformers`` is not installed). References use plain autograd on the concatenated
data (batches right-padded to one length, padding labelled -100), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.lm import (
    CausalLMLoss,
    attention_params,
    block_params,
    causal_lm_data,
    causal_lm_operator,
    mlp_params,
    transformer_blocks,
)

DT = torch.float64
VOCAB = 101


# ----------------------------------------------------------------------- models and data
def tiny_gpt2(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(DT).eval()


def hf_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three dict batches of unequal sizes and lengths, with right padding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t, pad in [(2, 8, 3), (3, 6, 1), (1, 8, 0)]:
        ids = torch.randint(0, VOCAB, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            mask[0, -pad:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def concatenated(batches: list[dict[str, torch.Tensor]], length: int = 8) -> tuple[dict, torch.Tensor]:
    """One batch of all sequences, right-padded to ``length``; labels -100 on padding."""
    id_rows, mask_rows = [], []
    for batch in batches:
        extra = length - batch["input_ids"].shape[1]
        id_rows.append(F.pad(batch["input_ids"], (0, extra), value=0))
        mask_rows.append(F.pad(batch["attention_mask"], (0, extra), value=0))
    ids, mask = torch.cat(id_rows), torch.cat(mask_rows)
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


class TinyLM(nn.Module):
    """A plain causal LM: embedding, causal running mean, MLP, bias-free head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
        for block in self.blocks:
            x = x + block(x.cumsum(dim=1) / steps)
        return self.head(x)


def selected(model: nn.Module, patterns) -> list[nn.Parameter]:
    op = GGNOperator(
        model,
        CausalLMLoss(),
        [(torch.zeros(1, 2, dtype=torch.long),) * 2],
        params=patterns,
        check_deterministic=False,
    )
    return op.params


# ----------------------------------------------------------------------- references
def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in the logits' dtype (Hugging Face's upcasts to float32)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)


def dense_hessian(loss_of, params: list[nn.Parameter]) -> torch.Tensor:
    """Hessian of ``loss_of()`` w.r.t. ``params`` by plain double backward, one column at a time."""
    grads = torch.autograd.grad(loss_of(), params, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    cols = []
    for i in range(g.numel()):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True, materialize_grads=True)
        cols.append(torch.cat([x.reshape(-1) for x in row]))
    return torch.stack(cols)


def dense_ggn(logits_of, model: nn.Module, params: list[nn.Parameter], labels: torch.Tensor) -> torch.Tensor:
    """``Jᵀ H J``: J by forward-mode AD per parameter direction, the CE Hessian by autograd.

    ``logits_of(overrides)`` runs the model with the named parameters replaced
    (``torch.func.functional_call``).
    """
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    primals = tuple(p.detach() for p in params)
    numels = [p.numel() for p in params]
    cols = []
    for i in range(sum(numels)):
        e = torch.zeros(sum(numels), dtype=DT)
        e[i] = 1
        tangents = tuple(t.view_as(p) for t, p in zip(e.split(numels), params))
        # [1]: torch annotates jvp's result as a 2- or 3-tuple (has_aux), so no unpacking.
        jv = torch.func.jvp(lambda *ps: logits_of(dict(zip(names, ps))), primals, tangents)[1]
        cols.append(jv.reshape(-1))
    jac = torch.stack(cols, dim=1)  # (B·T·V, D)
    z = logits_of({}).detach().requires_grad_(True)
    vocab = z.shape[-1]
    loss = shifted_loss(z, labels)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    # The CE Hessian is block-diagonal over positions: class k's column of every block at once.
    blocks = torch.stack(
        [torch.autograd.grad(g[..., k].sum(), z, retain_graph=True)[0] for k in range(vocab)], dim=-1
    )
    jac = jac.reshape(*z.shape, -1)
    return torch.einsum("btkd,btkl,btle->de", jac, blocks, jac)


# ----------------------------------------------------------------------- loss and data
def test_loss_equals_hf_labels_loss():
    model = tiny_gpt2()
    inputs, labels = concatenated(hf_batches())
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        ours = CausalLMLoss()(out, labels)
        ours32 = CausalLMLoss()(out.logits.float(), labels)
    # Hugging Face's loss upcasts the logits to float32 (from float64 here).
    assert out.loss.dtype == torch.float32
    assert torch.allclose(ours32, out.loss, rtol=1e-6)
    assert torch.allclose(ours.float(), out.loss, rtol=1e-6)
    assert torch.equal(ours, CausalLMLoss()(out.logits, labels))


def test_operator_loss_counts_tokens_across_batches():
    """The operators' mean loss is over all counted tokens of all batches (not a mean of batch means)."""
    model = tiny_gpt2()
    batches = hf_batches()
    op = causal_lm_operator("ggn", model, batches, params="transformer.ln_f.*")
    inputs, labels = concatenated(batches)
    counted = int((labels[:, 1:] != -100).sum())
    assert op.normaliser == counted
    with torch.no_grad():
        ref = shifted_loss(model(**inputs).logits, labels)
        hf = model(**inputs, labels=labels).loss
    loss, _ = op.loss_and_gradient()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(loss.float(), hf, rtol=1e-6)


def test_causal_lm_data_conversions():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = torch.tensor([[7, 8, -100], [9, 9, 9]])
    data = causal_lm_data(
        [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "labels": labels}, ids, (ids, labels)]
    )
    batches = list(data)
    assert len(data) == 4
    assert len(list(data)) == 4
    assert torch.equal(batches[0][1], torch.tensor([[1, 2, -100], [4, 5, 6]]))
    assert batches[0][0].keys() == {"input_ids", "attention_mask"}
    assert torch.equal(batches[1][1], labels)
    assert "labels" not in batches[1][0]
    assert batches[2][0] is ids
    assert batches[2][1] is ids
    assert batches[3][1] is labels
    with pytest.raises(TypeError):
        causal_lm_data(iter([ids]))


def test_flat_target_shifts():
    loss = CausalLMLoss()
    assert torch.equal(
        loss.flat_target(torch.tensor([[1, 2, 3], [4, -100, 6]])), torch.tensor([2, 3, -100, -100, 6, -100])
    )


# ----------------------------------------------------------------------- parameter filters
def test_parameter_filters_gpt2():
    model = tiny_gpt2()
    assert transformer_blocks(model) == ("transformer.h", 2)
    assert block_params(model, 0) == ["transformer.h.0.*"]
    assert block_params(model, -1) == ["transformer.h.1.*"]
    assert attention_params(model) == ["transformer.h.0.attn.*", "transformer.h.1.attn.*"]
    assert mlp_params(model, [1]) == ["transformer.h.1.mlp.*"]
    by_helper = selected(model, attention_params(model))
    by_glob = selected(model, "transformer.h.*.attn.*")
    assert [id(p) for p in by_helper] == [id(p) for p in by_glob]
    assert len(by_glob) == 8
    with pytest.raises(IndexError):
        block_params(model, 2)


def test_parameter_filters_plain_module():
    model = TinyLM()
    assert transformer_blocks(model) == ("blocks", 2)
    assert block_params(model, 1) == ["blocks.1.*"]
    with pytest.raises(ValueError, match="no attention"):
        attention_params(model)


# ----------------------------------------------------------------------- operators, HF GPT-2
SMALL = ["transformer.h.0.attn.c_proj.bias", "transformer.h.1.attn.c_attn.bias", "transformer.ln_f.*"]


def test_hessian_matches_dense_reference_gpt2():
    model = tiny_gpt2()
    batches = hf_batches()
    op = causal_lm_operator("hessian", model, batches, params=SMALL)
    inputs, labels = concatenated(batches)
    ref = dense_hessian(lambda: shifted_loss(model(**inputs).logits, labels), op.params)
    dense = op.to_dense()
    assert dense.shape == (192, 192)
    assert torch.allclose(dense, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_head"])
def test_ggn_matches_dense_reference_gpt2(fused):
    model = tiny_gpt2()
    batches = hf_batches()
    op = causal_lm_operator("ggn", model, batches, params=SMALL, fused_head=fused, head_chunk_rows=5)
    inputs, labels = concatenated(batches)
    ref = dense_ggn(
        lambda o: torch.func.functional_call(model, o, (), inputs).logits, model, op.params, labels
    )
    assert torch.allclose(op.to_dense(), ref, rtol=1e-9, atol=1e-11)


def test_attention_of_every_layer_block_products_gpt2():
    """(D, k) blocks with D = 8,448 (all attention weights) against reference products."""
    model = tiny_gpt2()
    batches = hf_batches()
    params = attention_params(model)
    H = causal_lm_operator("hessian", model, batches, params=params)
    G = causal_lm_operator("ggn", model, batches, params=params)
    Gf = causal_lm_operator("ggn", model, batches, params=params, fused_head=True)
    V = torch.randn(H.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    inputs, labels = concatenated(batches)
    loss = shifted_loss(model(**inputs).logits, labels)
    grads = torch.autograd.grad(loss, H.params, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    ref = torch.stack(
        [
            torch.cat([x.reshape(-1) for x in torch.autograd.grad(g @ V[:, i], H.params, retain_graph=True)])
            for i in range(V.shape[1])
        ],
        dim=1,
    )
    assert torch.allclose(H @ V, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    ggn = G @ V
    assert torch.allclose(Gf @ V, ggn, rtol=1e-10, atol=1e-13 * float(ggn.abs().max()))
    # GGN = Hessian of the loss of the linearised model: check one column through that route.
    assert float(V[:, 0] @ ggn[:, 0]) > 0


@pytest.mark.parametrize(
    "output_tangent",
    ["alongside_forward", "dual_forward_with_graph", "separate_tangent_pass"],
    ids=["tangent_alongside", "tangent_with_graph", "separate_forward"],
)
@pytest.mark.parametrize("batched_columns", [True, False], ids=["batched", "column_by_column"])
def test_fused_head_all_parameters_tied_embedding_gpt2(output_tangent, batched_columns):
    """Every parameter, including the head weight tied to the input embedding; both ways of
    forming ``J v`` (the CPU default keeps the graph in the dual forward, CUDA's does not)
    and both ways of organising a block's tangents."""
    from curvops import ProductStrategy

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    batches = hf_batches()
    G = causal_lm_operator("ggn", model, batches)
    V = torch.randn(G.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    ggn = G @ V
    strategy = ProductStrategy(output_tangent=output_tangent, batched_columns=batched_columns)
    Gf = causal_lm_operator("ggn", model, batches, fused_head=True, head_chunk_rows=4, strategy=strategy)
    assert torch.allclose(Gf @ V, ggn, rtol=1e-10, atol=1e-13 * float(ggn.abs().max()))
    assert torch.allclose(Gf @ V[:, 1], ggn[:, 1], rtol=1e-10, atol=1e-13 * float(ggn.abs().max()))


def test_fisher_through_causal_lm_loss_equals_flattened_plain_ce():
    """MC and empirical Fisher on CausalLMLoss equal the same Fisher of explicitly shifted rows."""
    model = tiny_gpt2()
    batches = hf_batches()

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            return self.inner(**inputs).logits.reshape(-1, VOCAB)

    flat_data = [
        (
            b,
            F.pad(
                b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)[:, 1:], (0, 1), value=-100
            ).reshape(-1),
        )
        for b in batches
    ]
    wrapped = Shifted(model)
    V = torch.randn(1056, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    for kind in ("mc", "empirical"):
        ours = causal_lm_operator("fisher", model, batches, params="transformer.h.0.attn.c_proj.*", kind=kind)
        ref = FisherOperator(
            wrapped, nn.CrossEntropyLoss(), flat_data, params="inner.transformer.h.0.attn.c_proj.*", kind=kind
        )
        expected = ref @ V
        assert torch.allclose(ours @ V, expected, rtol=1e-10, atol=1e-13 * float(expected.abs().max()))


def test_fused_head_rejects_post_processed_logits():
    model = tiny_gpt2()

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            return self.inner(**inputs).logits * 0.5

    op = GGNOperator(
        Scaled(model),
        CausalLMLoss(),
        causal_lm_data(hf_batches()),
        params="inner.transformer.ln_f.*",
        fused_head=True,
    )
    with pytest.raises(ValueError, match="not the head's output"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_fused_head_needs_bias_free_linear():
    model = TinyLM().to(DT)
    model.head = nn.Linear(12, VOCAB, bias=True).to(DT)
    with pytest.raises(ValueError, match="without bias"):
        GGNOperator(model, CausalLMLoss(), [(torch.zeros(1, 3, dtype=torch.long),) * 2], fused_head=True)


# ----------------------------------------------------------------------- operators, plain module
def plain_data(seed: int = 0, vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, t in [(3, 5), (2, 7)]:
        ids = torch.randint(0, vocab, (b, t), generator=gen)
        labels = ids.clone()
        labels[0, :2] = -100  # a "prompt" that does not count
        out.append((ids, labels))
    return out


def test_plain_module_lm_hessian_and_ggn():
    torch.manual_seed(0)
    vocab = 7
    model = TinyLM(vocab=vocab, dim=6).to(DT).eval()
    data = plain_data(vocab=vocab)
    params = ["blocks.1.*", "head.weight"]
    H = HessianOperator(model, CausalLMLoss(), data, params=params)
    G = GGNOperator(model, CausalLMLoss(), data, params=params)
    Gf = GGNOperator(model, CausalLMLoss(), data, params=params, fused_head="head", head_chunk_rows=3)
    counted = sum(int((y[:, 1:] != -100).sum()) for _, y in data)

    def total_loss():
        # Sum over batches of per-batch sums, divided by the whole-data count.
        s = 0
        for x, y in data:
            z = model(x)
            s = s + F.cross_entropy(z[:, :-1].reshape(-1, vocab), y[:, 1:].reshape(-1), reduction="sum")
        return s / counted

    assert torch.allclose(H.to_dense(), dense_hessian(total_loss, H.params), rtol=1e-9, atol=1e-12)
    ref_ggn = sum(
        dense_ggn(lambda o, x=x: torch.func.functional_call(model, o, (x,)), model, G.params, y)
        * (int((y[:, 1:] != -100).sum()) / counted)
        for x, y in data
    )
    assert torch.allclose(G.to_dense(), ref_ggn, rtol=1e-9, atol=1e-12)
    assert torch.allclose(Gf.to_dense(), ref_ggn, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_gpt2_vocab_50257_fused_head_and_hessian():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=64, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config).cuda().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 50257, (2, 32), generator=gen),
            "attention_mask": torch.ones(2, 32, dtype=torch.long),
        }
        for _ in range(2)
    ]
    params = ["transformer.h.1.*", "transformer.wte.weight"]
    G = causal_lm_operator("ggn", model, batches, params=params)
    Gf = causal_lm_operator("ggn", model, batches, params=params, fused_head=True, head_chunk_rows=40)
    H = causal_lm_operator("hessian", model, batches, params=params)
    v = torch.randn(G.shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ggn = G @ v
    assert float((Gf @ v - ggn).norm() / ggn.norm()) < 1e-3
    # Float64 reference of the Hessian product on the GPU: the same model in float64.
    model64 = transformers.GPT2LMHeadModel(config).cuda().eval()
    model64.load_state_dict(model.state_dict())
    model64 = model64.double()
    H64 = causal_lm_operator("hessian", model64, batches, params=params)
    ref = H64 @ v.double()
    assert float(((H @ v).double() - ref).norm() / ref.norm()) < 1e-3
