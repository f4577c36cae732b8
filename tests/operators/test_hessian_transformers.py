"""Hessian products of transformer language models by reverse over forward.

Hugging Face GPT-2 and Llama, built from tiny configs, through :mod:`curvops.lm` as a user
builds them: the single-vector product goes by reverse over forward (the layer-norm, softmax
and attention rules of ``_forward_ad``) and equals double backward. A model that runs an
operation without a verified rule is refused before any product's memory is spent.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from curvops import HessianOperator, ProductStrategy
from curvops.lm import causal_lm_operator
from tests.operators.references import dense_hessian

transformers = pytest.importorskip("transformers")

VOCAB = 37
REVERSE_OVER_FORWARD = ProductStrategy(hessian_vector="reverse_over_forward")
DOUBLE_BACKWARD = ProductStrategy(hessian_vector="double_backward")
#: float64 products: both ways sum the same terms in other orders, through ~10² operations in
#: sequence with reductions of ≲ 10² terms (hidden size, vocabulary, tokens): ≲ 10⁴ u, and a
#: factor 10 for cancellation between the terms.
RTOL_FLOAT64 = 1e5 * torch.finfo(torch.float64).eps
#: Llama's RMSNorm and eager softmax compute in float32 whatever the model's dtype: the two ways
#: round differently there, ≲ 10³ u of float32 by the same count.
RTOL_FLOAT32 = 1e3 * torch.finfo(torch.float32).eps


def _gpt2(attention: str) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        attn_implementation=attention,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(attention: str) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        vocab_size=VOCAB,
        max_position_embeddings=16,
        attn_implementation=attention,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights (ones at initialisation)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _llama_float64_norms(attention: str) -> nn.Module:
    """Llama with its RMSNorms as ``nn.RMSNorm`` (``F.rms_norm``, same weights and eps), which
    computes in the model's dtype, where Llama's casts to float32."""
    model = _llama(attention)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                weight, eps = child.get_parameter("weight"), float(child.variance_epsilon)  # type: ignore[arg-type]  # a float attribute of Llama's norm
                norm = nn.RMSNorm(weight.shape, eps=eps)
                with torch.no_grad():
                    norm.weight.copy_(weight)
                setattr(parent, name, norm)
    return model


#: id -> (model factory, tolerance of float64 products)
MODELS = {
    "gpt2-eager": (lambda: _gpt2("eager"), RTOL_FLOAT64),
    "gpt2-sdpa": (lambda: _gpt2("sdpa"), RTOL_FLOAT64),
    "llama-sdpa-rms_norm": (lambda: _llama_float64_norms("sdpa"), RTOL_FLOAT64),
    "llama-eager": (lambda: _llama("eager"), RTOL_FLOAT32),
    "llama-sdpa": (lambda: _llama("sdpa"), RTOL_FLOAT32),
}


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches of unequal sizes and lengths, one with right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t, pad in [(2, 7, 2), (3, 5, 0)]:
        ids = torch.randint(0, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            mask[1, -pad:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def _vector(dim: int, seed: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reverse_over_forward_equals_double_backward_float64(name):
    make, rtol = MODELS[name]
    model = make().double()
    batches = _batches()
    H = causal_lm_operator("hessian", model, batches, strategy=REVERSE_OVER_FORWARD)
    reference = causal_lm_operator("hessian", model, batches, strategy=DOUBLE_BACKWARD)
    for seed in range(2):
        v = _vector(H.shape[0], seed)
        expected = reference @ v
        assert _relative_error(H @ v, expected) <= rtol
    assert H.single_vector_method == "reverse_over_forward"  # no operation was refused


@pytest.mark.parametrize("name", ["gpt2-eager", "llama-sdpa"])
def test_reverse_over_forward_float32_against_float64(name):
    """In float32 the product is as close to the float64 Hessian product as double backward's
    float32 rounding allows (the same bound for both ways)."""
    make, _ = MODELS[name]
    model = make().float()
    batches = _batches(seed=1)
    H = causal_lm_operator("hessian", model, batches, strategy=REVERSE_OVER_FORWARD)
    reference = causal_lm_operator("hessian", make().double(), batches, strategy=DOUBLE_BACKWARD)
    v = _vector(H.shape[0], 2)
    expected = reference @ v
    assert _relative_error(H @ v.float(), expected) <= RTOL_FLOAT32
    assert H.single_vector_method == "reverse_over_forward"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2-eager", "gpt2-sdpa", "llama-sdpa"])
def test_reverse_over_forward_on_cuda_against_float64(name):
    """The same on the GPU (its kernels, and the fused cross-entropy seeds where they apply)."""
    make, _ = MODELS[name]
    batches = _batches(seed=1)
    H = causal_lm_operator("hessian", make().float().cuda(), batches, strategy=REVERSE_OVER_FORWARD)
    reference = causal_lm_operator("hessian", make().double(), batches, strategy=DOUBLE_BACKWARD)
    v = _vector(H.shape[0], 2)
    expected = reference @ v
    assert _relative_error((H @ v.float().cuda()).cpu(), expected) <= RTOL_FLOAT32
    assert H.single_vector_method == "reverse_over_forward"


class _RecordsTangents(nn.Module):
    """Linear → an operation without a verified rule → linear; records whether a forward pass
    received a tangent (forward-mode AD), i.e. whether a reverse-over-forward product ran."""

    def __init__(self, unverified: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.unverified = unverified
        self.saw_tangent = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.saw_tangent |= fwAD.unpack_dual(h).tangent is not None
        if self.unverified == "aten_layer_norm":  # torch's own layer norm: no rule sees it
            h = torch.ops.aten.native_layer_norm(h, (6,), None, None, 1e-5)[0]
        else:
            h = torch.ops.aten._softmax(h, -1, False)
        return self.b(h)


@pytest.mark.parametrize("unverified", ["aten_layer_norm", "aten_softmax"])
def test_unverified_operation_is_refused_before_a_product_runs(unverified):
    """The graph of a plain forward pass (less memory than any product) is checked first: a model
    that reverse over forward cannot serve never runs its dual forward pass, which keeps the
    graphs of the output and of its tangent (on a large model, more memory than double backward)."""
    torch.manual_seed(0)
    model = _RecordsTangents(unverified).double()
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for n in (5, 2)
    ]
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, data, strategy=REVERSE_OVER_FORWARD)
    reference = dense_hessian(model, loss_fn, data, H.params)
    v = _vector(H.shape[0], 0)
    assert _relative_error(H @ v, reference @ v) <= RTOL_FLOAT64
    assert H.single_vector_method == "double_backward"
    assert not model.saw_tangent


def test_batch_norm_in_train_mode_goes_by_double_backward():
    """Batch statistics: batch norm's rule is wrong when differentiated, and no rule replaces it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().train()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, data, strategy=REVERSE_OVER_FORWARD)
    reference = dense_hessian(model, loss_fn, data, H.params)
    v = _vector(H.shape[0], 1)
    assert _relative_error(H @ v, reference @ v) <= RTOL_FLOAT64
    assert H.single_vector_method == "double_backward"


class _OutOfMemoryWithTangents(nn.Module):
    """Raises the allocator's out-of-memory error in a forward pass that carries tangents, as a
    reverse-over-forward product larger than the device would."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if fwAD.unpack_dual(h).tangent is not None:
            raise torch.OutOfMemoryError("out of memory (simulated): tried to allocate 80.00 GiB")
        return self.b(torch.tanh(h))


def test_reverse_over_forward_out_of_memory_goes_by_double_backward():
    """Where the dual forward pass (graphs of the output and of its tangent) does not fit, the
    product is computed by double backward, and so are the later ones."""
    torch.manual_seed(0)
    model = _OutOfMemoryWithTangents().double()
    g = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for n in (5, 2)
    ]
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, data, strategy=REVERSE_OVER_FORWARD)
    reference = dense_hessian(model, loss_fn, data, H.params)
    for seed in range(2):
        v = _vector(H.shape[0], seed)
        assert _relative_error(H @ v, reference @ v) <= RTOL_FLOAT64
        assert H.single_vector_method == "double_backward"
