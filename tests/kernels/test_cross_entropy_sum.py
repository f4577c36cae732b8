"""cross_entropy_sum: value, gradient and double backward equal F.cross_entropy's (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvops.kernels.cross_entropy_sum as ces
from curvops.kernels.cross_entropy_sum import cross_entropy_sum

DT = torch.float64


def _torch_sum(z, t, **kw):
    return F.cross_entropy(z, t, reduction="sum", **kw)


def _derivatives(fn, z, t, u, **kw):
    z = z.detach().requires_grad_(True)
    value = fn(z, t, **kw)
    (g,) = torch.autograd.grad(value, z, create_graph=True)
    (hu,) = torch.autograd.grad(g, z, grad_outputs=u)
    return value.detach(), g.detach(), hu


def _problem(shape, num_classes, prob, seed, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(shape[0], num_classes, *shape[1:], dtype=DT, generator=gen)
    u = torch.randn(z.shape, dtype=DT, generator=gen)
    if prob:
        t = torch.softmax(torch.randn(z.shape, dtype=DT, generator=gen), dim=1)
    else:
        t = torch.randint(0, num_classes, (shape[0], *shape[1:]), generator=gen)
        t.view(-1)[::3] = ignore_index  # every third position ignored
    return z, t, u


CONFIGS = {
    "plain": {},
    "ignore7": {"ignore_index": 2},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": 0.15},
    "weight_smooth": {"weight": True, "label_smoothing": 0.15},
}


@pytest.mark.parametrize("num_classes", [7, 100, 3001])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("shape", [(6,), (3, 4)], ids=["NC", "NCd"])
def test_matches_torch_double_backward(num_classes, config, prob, shape):
    kw = dict(CONFIGS[config])
    if prob and "ignore_index" in kw:
        pytest.skip("probability targets have no ignore_index")
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(num_classes, dtype=DT, generator=torch.Generator().manual_seed(1)) + 0.1
    z, t, u = _problem(shape, num_classes, prob, seed=num_classes, ignore_index=kw.get("ignore_index", -100))
    ours = _derivatives(cross_entropy_sum, z, t, u, **kw)
    ref = _derivatives(_torch_sum, z, t, u, **kw)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * (1 + float(b.abs().max())))


def test_unbatched_logits():
    z = torch.randn(11, dtype=DT)
    u = torch.randn(11, dtype=DT)
    for t in (torch.tensor(4), torch.softmax(torch.randn(11, dtype=DT), 0)):
        for a, b in zip(_derivatives(cross_entropy_sum, z, t, u), _derivatives(_torch_sum, z, t, u)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_double_backward_calls_the_kernel(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    original = ces.cross_entropy_hvp
    monkeypatch.setattr(ces, "cross_entropy_hvp", counting)
    z, t, u = _problem((5,), 9, False, seed=0)
    _derivatives(cross_entropy_sum, z, t, u)
    assert calls == [torch.Size([5, 9])]


def test_gradient_wrt_grad_output():
    """d/ds of ⟨∇_z (s · loss), u⟩ is ⟨∇_z loss, u⟩: the backward's dependence on its seed."""
    z, t, u = _problem((4,), 6, False, seed=3)
    res = []
    for fn in (cross_entropy_sum, _torch_sum):
        zz = z.clone().requires_grad_(True)
        s = torch.tensor(1.7, dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(s * fn(zz, t), zz, create_graph=True)
        res.append(torch.autograd.grad((g * u).sum(), (zz, s)))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_third_derivative_raises():
    z, t, u = _problem((4,), 6, False, seed=4)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(cross_entropy_sum(z, t), z, create_graph=True)
    (hu,) = torch.autograd.grad(g, z, grad_outputs=u, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(hu.sum(), z)


def test_forward_ad_falls_back_to_torch():
    import torch.autograd.forward_ad as fwAD

    z, t, u = _problem((4,), 6, False, seed=5)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(cross_entropy_sum(fwAD.make_dual(z, u), t)).tangent
        ref = fwAD.unpack_dual(_torch_sum(fwAD.make_dual(z, u), t)).tangent
    assert torch.allclose(ours, ref, rtol=1e-12)


def test_out_of_range_target_raises():
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy_sum(torch.randn(3, 4, dtype=DT), torch.tensor([0, 4, 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_against_float64(dtype):
    z, t, u = _problem((64,), 3001, False, seed=6)
    z, u = z.to(dtype), u.to(dtype)  # the reference sees the same rounded inputs, in float64
    ours = _derivatives(cross_entropy_sum, z, t, u)
    ref = _derivatives(_torch_sum, z.double(), t, u.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        assert float((a.double() - b).norm() / b.norm()) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vocab_50257(dtype):
    z, t, u = _problem((256,), 50257, False, seed=7)
    z, u, t = z.to(dtype).cuda(), u.to(dtype).cuda(), t.cuda()
    ours = _derivatives(cross_entropy_sum, z, t, u)
    ref = _derivatives(_torch_sum, z.double(), t, u.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(ours, ref):
        assert float((a.double() - b).norm() / b.norm()) < tol
