"""linear_cross_entropy_ggn equals the materialised head GGN product (float64 reference)."""

from __future__ import annotations

import pytest
import torch

from curvops.kernels.linear_cross_entropy_ggn import default_chunk_rows, linear_cross_entropy_ggn


def _problem(n, d, vocab, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, hd = (torch.randn(n, d, dtype=torch.float64, generator=gen) for _ in range(2))
    w, wd = (torch.randn(vocab, d, dtype=torch.float64, generator=gen) / d**0.5 * 3 for _ in range(2))
    c = torch.rand(n, dtype=torch.float64, generator=gen)
    c[::5] = 0  # ignored rows
    return [x.to(device=device, dtype=dtype) for x in (h, w, hd, wd)] + [c.to(device)]


def _materialised(h, w, hd, wd, c):
    """Float64 formula written out on (N, V) tensors."""
    h, w, hd, c = h.double(), w.double(), hd.double(), c.double()
    z = h @ w.T
    zd = hd @ w.T + (0 if wd is None else h @ wd.double().T)
    p = torch.softmax(z, dim=1)
    u = c[:, None] * (p * zd - p * (p * zd).sum(1, keepdim=True))
    return u @ w, u.T @ h, torch.logsumexp(z, dim=1)


STRATEGIES = [
    {"strategy": "rows"},
    {"strategy": "rows", "chunk_rows": 7},
    {"strategy": "vocab", "vocab_tile": 64},
    {"strategy": "vocab"},
]


@pytest.mark.parametrize("vocab", [7, 100, 3001])
@pytest.mark.parametrize("kw", STRATEGIES, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("with_wd", [True, False], ids=["Wdot", "noWdot"])
def test_matches_materialised_float64(vocab, kw, with_wd):
    h, w, hd, wd, c = _problem(23, 16, vocab, torch.float64, seed=vocab)
    wd = wd if with_wd else None
    out = linear_cross_entropy_ggn(h, w, hd, wd, c, **kw)
    ref = _materialised(h, w, hd, wd, c)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12 * float(b.abs().max()))


def test_no_weight_grad():
    h, w, hd, wd, c = _problem(9, 8, 50, torch.float64)
    for strategy in ("rows", "vocab"):
        out = linear_cross_entropy_ggn(h, w, hd, wd, c, weight_grad=False, strategy=strategy)
        assert out.grad_weight is None
        assert torch.allclose(out.grad_hidden, _materialised(h, w, hd, wd, c)[0], rtol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_cpu(dtype):
    h, w, hd, wd, c = _problem(40, 32, 3001, dtype, seed=3)
    ref = _materialised(h, w, hd, wd, c)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for strategy in ("rows", "vocab"):
        out = linear_cross_entropy_ggn(h, w, hd, wd, c, strategy=strategy, chunk_rows=16, vocab_tile=512)
        for a, b in zip(out, ref):
            assert float((a.double() - b).norm() / b.norm()) < tol


def test_without_lse():
    h, w, hd, wd, c = _problem(9, 8, 50, torch.float64)
    ref = _materialised(h, w, hd, wd, c)
    for strategy in ("rows", "vocab"):
        out = linear_cross_entropy_ggn(h, w, hd, wd, c, strategy=strategy, return_lse=False)
        assert out.lse is None
        assert torch.allclose(out.grad_weight, ref[1], rtol=1e-11)


def test_bad_input():
    h, w, hd, wd, c = _problem(4, 3, 5, torch.float64)
    with pytest.raises(ValueError, match="h_dot must have the shape of h"):
        linear_cross_entropy_ggn(h, w, hd[:2], wd, c)
    with pytest.raises(ValueError, match="strategy must be one of"):
        linear_cross_entropy_ggn(h, w, hd, wd, c, strategy="tiles")
    with pytest.raises(TypeError):
        linear_cross_entropy_ggn(h, w.float(), hd, wd, c)


def test_default_chunk_rows():
    assert default_chunk_rows(50304, torch.bfloat16) == 256 * 2**20 // (50304 * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_gpu_vocab_50257(dtype, strategy):
    h, w, hd, wd, c = _problem(512, 64, 50257, dtype, device="cuda", seed=5)
    out = linear_cross_entropy_ggn(h, w, hd, wd, c, strategy=strategy, chunk_rows=200)
    ref = _materialised(h, w, hd, wd, c)
    # float32 matrix products may run in TF32 on the GPU; bf16 products round their outputs.
    tol = 1e-2 if dtype == torch.float32 else 5e-2
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert float((a.double() - b).norm() / b.norm()) < tol
