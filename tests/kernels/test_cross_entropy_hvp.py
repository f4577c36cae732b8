"""Tests of curvops.kernels.cross_entropy_hvp (eager, compile, Triton and its interpreter)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from curvops.kernels import cross_entropy_hvp

# Tolerances, as ||out - ref|| / ||ref||. Every backend accumulates in float32
# and rounds once to the output dtype, so the error is the output rounding
# (unit roundoff u: 2^-8 bfloat16, 2^-11 float16) plus float32 arithmetic
# (~V * 2^-24, negligible here); 2u leaves room for the float32 part.
_UNIT_ROUNDOFF = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def _tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5  # float32 softmax and a V-term dot product: far under 1e-5
    if dtype == torch.float64:
        return 1e-12
    return 2 * _UNIT_ROUNDOFF[dtype]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _reference(z, u, target=None, ignore_index=-100, weight=None, reduction="mean", normalizer=None):
    """Float64 formula, written independently of the module."""
    z, u = z.double(), u.double()
    p = torch.softmax(z, dim=-1)
    hv = p * u - p * (p * u).sum(-1, keepdim=True)
    c = torch.ones(z.shape[0], dtype=torch.float64)
    if weight is not None:
        c = c * weight.double()
    if target is not None:
        c = c * (target != ignore_index).double()
    if normalizer is not None:
        c = c / float(normalizer)
    elif reduction == "mean":
        c = c / c.sum()
    return hv * c[:, None]


def _lse_reference(z):
    return torch.logsumexp(z.double(), dim=-1)


def _double_backward(z, u, target, **ce_kwargs):
    """H u through autograd of F.cross_entropy, float64."""
    z = z.detach().double().requires_grad_(True)
    loss = F.cross_entropy(z, target, **ce_kwargs)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    (hv,) = torch.autograd.grad(g, z, u.double())
    return hv


def _inputs(n, v, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(n, v, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    u = torch.randn(n, v, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    return z, u, t


# triton.jit chooses interpreter or compiler when it decorates, and triton's own
# library functions (tl.max, ...) are decorated when triton is first imported, so
# TRITON_INTERPRET=1 must be in the environment before that import. The
# interpreter tests therefore run here only when the whole process started with
# it; otherwise test_triton_interpreter_in_subprocess reruns them in a child
# process that does.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_HERE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))


@pytest.fixture
def interpret():
    pytest.importorskip("triton")
    if not _INTERPRETING:
        pytest.skip(
            "needs TRITON_INTERPRET=1 from process start; covered by test_triton_interpreter_in_subprocess"
        )


@pytest.mark.slow  # a pytest subprocess that imports torch and triton
@pytest.mark.skipif(_INTERPRETING, reason="this process already runs the interpreter tests")
def test_triton_interpreter_in_subprocess():
    pytest.importorskip("triton")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        _HERE,
        "-q",
        "-k",
        "interpreter and not subprocess",
        "-p",
        "no:cacheprovider",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout, res.stdout[-2000:]
    assert "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


# ---------------------------------------------------------------- eager, CPU


@pytest.mark.parametrize("v", [7, 100, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_matches_double_backward(v, dtype):
    z, u, t = _inputs(7, v, dtype)
    t[2] = -100
    ref = _double_backward(z, u, t)
    out = cross_entropy_hvp(z, u, target=t, backend="eager")
    assert out.dtype == dtype
    assert out.shape == (7, v)
    assert _rel(out, ref) < _tol(dtype)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_and_ignore_index_against_autograd(reduction):
    z, u, t = _inputs(9, 100)
    t[[0, 5]] = 3  # custom ignore index
    ref = _double_backward(z, u, t, ignore_index=3, reduction=reduction)
    out = cross_entropy_hvp(z, u, target=t, ignore_index=3, reduction=reduction)
    assert _rel(out, ref) < _tol(torch.float32)


def test_class_weights_as_per_token_weights():
    z, u, t = _inputs(11, 100)
    t[4] = -100
    w = torch.rand(100, dtype=torch.float64) + 0.5
    ref = _double_backward(z, u, t, weight=w)
    out = cross_entropy_hvp(z, u, target=t, weight=w[t.clamp(min=0)].float())
    assert _rel(out, ref) < _tol(torch.float32)


def test_label_smoothing_needs_no_parameter():
    z, u, t = _inputs(5, 100)
    ref = _double_backward(z, u, t, label_smoothing=0.1)
    assert _rel(cross_entropy_hvp(z, u, target=t), ref) < _tol(torch.float32)
    # With class weights the smoothed row weight is (1 - eps) w_t + eps/V sum(w).
    w = torch.rand(100, dtype=torch.float64) + 0.5
    eps = 0.2
    ref_w = _double_backward(z, u, t, weight=w, label_smoothing=eps)
    row_w = (1 - eps) * w[t] + eps / 100 * w.sum()
    out_w = cross_entropy_hvp(z, u, weight=row_w.float(), normalizer=w[t].sum())
    assert _rel(out_w, ref_w) < _tol(torch.float32)


def test_explicit_normalizer_and_weights():
    z, u, t = _inputs(7, 100)
    t[1] = -100
    w = torch.rand(7) + 0.1
    for reduction in ("mean", "sum"):
        for norm in (123.0, torch.tensor(123.0), 5):
            ref = _reference(z, u, t, weight=w, normalizer=norm)
            out = cross_entropy_hvp(z, u, target=t, weight=w, reduction=reduction, normalizer=norm)
            assert _rel(out, ref) < _tol(torch.float32)
    ref = _reference(z, u, t, weight=w, reduction="sum")
    assert _rel(cross_entropy_hvp(z, u, target=t, weight=w, reduction="sum"), ref) < _tol(torch.float32)


def test_batches_sum_to_whole_dataset_with_shared_normalizer():
    z, u, t = _inputs(9, 30)
    t[[1, 7]] = -100
    whole = _double_backward(z, u, t)
    n_valid = (t != -100).sum()
    parts = [
        cross_entropy_hvp(z[s], u[s], target=t[s], normalizer=n_valid) for s in (slice(0, 5), slice(5, 9))
    ]
    assert _rel(torch.cat(parts), whole) < _tol(torch.float32)


def test_all_ignored_gives_zeros():
    z, u, t = _inputs(3, 10)
    t[:] = -100
    assert (cross_entropy_hvp(z, u, target=t) == 0).all()


def test_non_contiguous_rows():
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(7, 130, generator=gen)
    z = big[:, 10:110]  # row stride 130 != V = 100
    u = torch.randn(7, 2, 100, generator=gen)[:, 1]
    x = torch.randn(2, 100, 3, 5, generator=gen)  # (B, V, H, W) as from a conv head
    zc = x.movedim(1, -1).reshape(-1, 100)
    uc = torch.randn_like(zc)
    for zz, uu in ((z, u), (zc, uc), (z.t().contiguous().t(), u)):
        ref = _reference(zz, uu)
        assert _rel(cross_entropy_hvp(zz, uu, backend="eager"), ref) < _tol(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    z, u, t = _inputs(7, 3001, dtype)
    t[0] = -100
    ref = _reference(z, u, t)  # exact function of the rounded inputs
    out = cross_entropy_hvp(z, u, target=t)
    assert out.dtype == dtype
    assert _rel(out, ref) < _tol(dtype)
    # Mixed: bf16 logits with a float32 tangent returns float32.
    out32 = cross_entropy_hvp(z, u.float(), target=t)
    assert out32.dtype == torch.float32
    assert _rel(out32, ref) < _tol(torch.float32)


def test_empty_batch():
    z = torch.zeros(0, 5)
    assert cross_entropy_hvp(z, z.clone(), reduction="sum").shape == (0, 5)


# torch.compile's first compilation on a CPU runs a C++ compiler: tens of seconds.
@pytest.mark.slow
def test_compile_backend_cpu():
    z, u, t = _inputs(5, 100)
    t[1] = -100
    out = cross_entropy_hvp(z, u, target=t, backend="compile")
    assert _rel(out, _reference(z, u, t)) < _tol(torch.float32)


@pytest.mark.parametrize("in_place", [True, False])
def test_out_and_lse_out_eager(in_place):
    z, u, t = _inputs(6, 40, torch.float32)
    t[1] = -100
    ref = _reference(z, u, t)
    z_before = z.clone()
    out = u if in_place else torch.full_like(u, float("nan"))
    lse = torch.full((6,), float("nan"), dtype=torch.float64)
    res = cross_entropy_hvp(z, u, target=t, out=out, lse_out=lse)
    assert res is out
    assert _rel(out, ref) < _tol(torch.float32)
    assert torch.equal(z, z_before)
    # Every row's log-sum-exp, the ignored one included (float32 arithmetic, then float64 storage).
    assert torch.allclose(lse, _lse_reference(z), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Triton interpreter


def test_triton_on_cpu_without_interpreter_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, u, _ = _inputs(2, 7)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cross_entropy_hvp(z, u, backend="triton")


@pytest.mark.parametrize("v", [7, 100, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_interpreter_public_api(interpret, v, dtype):
    z, u, t = _inputs(5, v, dtype)
    t[3] = -100
    w = torch.rand(5) + 0.5
    ref = _reference(z, u, t, weight=w)
    out = cross_entropy_hvp(z, u, target=t, weight=w, backend="triton")
    assert out.dtype == dtype
    assert _rel(out, ref) < _tol(dtype)
    assert (out[3] == 0).all()


@pytest.mark.parametrize("block", [16, 32, 64, 128])  # 7, 4, 2 and 1 chunks a row of V = 100
def test_triton_interpreter_split_rows(interpret, block):
    # Programs run one at a time here, so in each row the earlier chunks take the
    # whole-row fallback and the last chunk combines the published partials.
    from curvops.kernels import _ce_hvp_triton as K
    from curvops.kernels.cross_entropy_hvp import _row_coefficients

    gen = torch.Generator().manual_seed(2)
    big_z = torch.randn(7, 160, generator=gen) * 4
    z = big_z[:, 3:103]  # V = 100, row stride 160
    u = torch.randn(7, 100, generator=gen)
    t = torch.randint(0, 100, (7,), generator=gen)
    t[6] = -100
    coeff = _row_coefficients(z, u, t, -100, None, "sum", None)
    out = torch.full((7, 100), float("nan"))  # poison: every element must be written
    for ticket in (False, True):  # the interpreter always uses the fallback variant
        out.fill_(float("nan"))
        K.launch(z, u, coeff, out, K.KernelConfig(block, 4, ticket=ticket))
        assert _rel(out, _reference(z, u, t, reduction="sum")) < _tol(torch.float32)


@pytest.mark.parametrize("block", [16, 128])  # 7 chunks a row (fallback, copy path), 1 chunk (in place)
def test_triton_interpreter_in_place_and_lse(interpret, block):
    from curvops.kernels import _ce_hvp_triton as K
    from curvops.kernels.cross_entropy_hvp import _row_coefficients

    z, u, t = _inputs(6, 100)
    t[2] = -100
    ref = _reference(z, u, t, reduction="sum")
    u[2, 5] = float("inf")  # an ignored row's output stays zero even though it is computed for its lse
    coeff = _row_coefficients(z, u, t, -100, None, "sum", None)
    lse = torch.full((6,), float("nan"))
    out = K.ce_hvp_triton(z, u, coeff, config=K.KernelConfig(block, 4), out=u, lse=lse)
    assert out is u
    assert (u[2] == 0).all()
    assert _rel(u, ref) < _tol(torch.float32)
    assert torch.allclose(lse.double(), _lse_reference(z), rtol=1e-6, atol=0)


def test_triton_interpreter_public_out_and_lse(interpret):
    z, u, t = _inputs(5, 300, torch.bfloat16)
    t[0] = -100
    ref = _reference(z, u, t)
    lse = torch.empty(5)
    out = cross_entropy_hvp(z, u, target=t, backend="triton", out=u, lse_out=lse)
    assert out is u
    assert _rel(u, ref) < _tol(torch.bfloat16)
    assert torch.allclose(lse.double(), _lse_reference(z), rtol=1e-6, atol=0)


def test_triton_interpreter_matches_double_backward(interpret):
    z, u, t = _inputs(3, 50, torch.float64)
    t[0] = -100
    out = cross_entropy_hvp(z, u, target=t, reduction="sum", backend="triton")
    assert _rel(out, _double_backward(z, u, t, reduction="sum")) < 1e-12


# ---------------------------------------------------------------- bad input


def test_bad_inputs():
    z, u, t = _inputs(4, 10)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_hvp(z, u[:, :9])
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_hvp(z[0], u[0])
    with pytest.raises(TypeError, match="float"):
        cross_entropy_hvp(z.long(), u)
    with pytest.raises(TypeError, match="float"):
        cross_entropy_hvp(z, u.int())
    with pytest.raises(TypeError, match="Tensor"):
        cross_entropy_hvp(z.numpy(), u)
    with pytest.raises(ValueError, match="target"):
        cross_entropy_hvp(z, u, target=t[:3])
    with pytest.raises(ValueError, match="target"):
        cross_entropy_hvp(z, u, target=t[:, None])
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_hvp(z, u, target=t.float())
    with pytest.raises(ValueError, match="weight"):
        cross_entropy_hvp(z, u, weight=torch.ones(10))
    with pytest.raises(TypeError, match="floating"):
        cross_entropy_hvp(z, u, weight=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        cross_entropy_hvp(z, u, backend="cuda")
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_hvp(z, u, reduction="none")
    with pytest.raises(ValueError, match="normalizer"):
        cross_entropy_hvp(z, u, normalizer=torch.ones(2))


def test_bad_outputs():
    z, u, t = _inputs(4, 10)
    with pytest.raises(ValueError, match="out must be"):
        cross_entropy_hvp(z, u, out=torch.empty(4, 9))
    with pytest.raises(ValueError, match="out must be"):
        cross_entropy_hvp(z, u, out=torch.empty(4, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        cross_entropy_hvp(z, u, out=torch.empty(10, 4).t())
    with pytest.raises(ValueError, match="overlap"):
        cross_entropy_hvp(z, u, out=z)
    big = torch.randn(8, 10)
    with pytest.raises(ValueError, match="overlap"):  # rows 2-5 of one buffer: half of them are the logits
        cross_entropy_hvp(big[:4], u, out=big[2:6])
    with pytest.raises(ValueError, match="overlap"):  # a shifted view of u is not u
        cross_entropy_hvp(z, big[:4], out=big[1:5])
    with pytest.raises(TypeError, match="out must be"):
        cross_entropy_hvp(z, u, out=u.numpy())
    with pytest.raises(ValueError, match="lse_out"):
        cross_entropy_hvp(z, u, lse_out=torch.empty(3))
    with pytest.raises(ValueError, match="lse_out"):
        cross_entropy_hvp(z, u, lse_out=torch.empty(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="lse_out"):
        cross_entropy_hvp(z, u, lse_out=[0.0] * 4)


def test_import_does_not_import_triton():
    code = "import sys, curvops, curvops.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "compile", "eager", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_backends_v50257(backend, dtype):
    if backend == "compile" and dtype == torch.float64:
        pytest.skip("float64 compile adds no coverage over eager")
    z, u, t = _inputs(33, 50257, dtype, device="cuda")
    t[[0, 17]] = -100
    w = torch.rand(33, device="cuda") + 0.5
    ref = _reference(z.cpu(), u.cpu(), t.cpu(), weight=w.cpu())
    out = cross_entropy_hvp(z, u, target=t, weight=w, backend=backend)
    assert out.dtype == dtype
    assert _rel(out.cpu(), ref) < _tol(dtype)


@pytest.mark.gpu
def test_gpu_matches_double_backward():
    z, u, t = _inputs(9, 50257, torch.float32, device="cuda")
    t[4] = -100
    ref = _double_backward(z.cpu(), u.cpu(), t.cpu())
    assert _rel(cross_entropy_hvp(z, u, target=t).cpu(), ref) < _tol(torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("v", [7, 100, 3001, 50257, 128000])
def test_gpu_every_config_writes_everything_and_is_deterministic(v):
    from curvops.kernels import _ce_hvp_triton as K
    from curvops.kernels.cross_entropy_hvp import _row_coefficients

    n = 37
    big = torch.randn(n, v + 24, device="cuda", dtype=torch.bfloat16) * 3
    z = big[:, 8 : 8 + v]  # row stride != V
    u = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    t[5] = -100
    coeff = _row_coefficients(z, u, t, -100, None, "mean", None)
    ref = _reference(z.cpu(), u.cpu(), t.cpu())
    variants = [(cfg, None) for cfg in K.CONFIGS] + [
        (K.KernelConfig(4096, 8, ticket=False), None),
        (K.KernelConfig(1024, 4), None),  # V = 128000: grown to 2048 to keep <= 64 chunks
        (K.KernelConfig(4096, 4, fallback=True), None),
        # max_spin=0: every program but the last of its row takes the whole-row path.
        (K.KernelConfig(2048, 4, fallback=True), 0),
        (K.KernelConfig(2048, 4, ticket=False, fallback=True), 0),
    ]
    for cfg, spin in variants:
        outs = []
        for _ in range(2):
            out = torch.full((n, v), float("nan"), device="cuda", dtype=torch.bfloat16)
            outs.append(K.launch(z, u, coeff, out, cfg, max_spin=spin))
        torch.cuda.synchronize()
        assert _rel(outs[0].cpu(), ref) < _tol(torch.bfloat16), (cfg, spin)
        if spin is None:  # which partials combine, in which order, is fixed: bitwise repeatable
            assert torch.equal(outs[0], outs[1]), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("v", [3001, 50257, 128000])
def test_gpu_in_place_and_lse_every_config(v):
    from curvops.kernels import _ce_hvp_triton as K
    from curvops.kernels.cross_entropy_hvp import _row_coefficients

    n = 37
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16) * 3
    u0 = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    t[5] = -100
    coeff = _row_coefficients(z, u0, t, -100, None, "mean", None)
    ref = _reference(z.cpu(), u0.cpu(), t.cpu())
    lse_ref = _lse_reference(z.cpu())
    for cfg in K.CONFIGS + [K.KernelConfig(2048, 4, fallback=True), K.KernelConfig(4096, 8, ticket=False)]:
        u = u0.clone()
        lse = torch.full((n,), float("nan"), device="cuda")
        K.ce_hvp_triton(z, u, coeff, config=cfg, out=u, lse=lse)
        torch.cuda.synchronize()
        assert _rel(u.cpu(), ref) < _tol(torch.bfloat16), cfg
        assert torch.allclose(lse.cpu().double(), lse_ref, rtol=1e-6, atol=0), cfg


@pytest.mark.gpu
def test_gpu_autotuned_in_place_keeps_the_input_until_the_product():
    # The first large call autotunes: the timing launches must not write into u.
    from curvops.kernels import _ce_hvp_triton as K

    K._TUNED.clear()
    z = torch.randn(600, 50304, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(z)
    ref = _reference(z[:50].cpu(), u[:50].cpu(), normalizer=600)
    lse = torch.empty(600, device="cuda")
    cross_entropy_hvp(z, u, out=u, lse_out=lse)
    assert _rel(u[:50].cpu(), ref) < _tol(torch.bfloat16)
    assert torch.allclose(lse.cpu().double(), _lse_reference(z.cpu()), rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_gpu_autotuned_large_call_and_movedim_layout():
    x = torch.randn(4, 50304, 128, device="cuda", dtype=torch.bfloat16)  # (B, V, T) as from a conv head
    z = x.movedim(1, -1).reshape(-1, 50304)  # 512 rows; 25.8M elements: takes the autotuned path
    u = torch.randn_like(z)
    out = cross_entropy_hvp(z, u)
    ref = _reference(z[:64].cpu(), u[:64].cpu(), normalizer=512)
    assert _rel(out[:64].cpu(), ref) < _tol(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_column_strided():
    z = torch.randn(3001, 19, device="cuda").t()  # column stride 19
    u = torch.randn(19, 3001, device="cuda")
    assert _rel(cross_entropy_hvp(z, u).cpu(), _reference(z.cpu(), u.cpu())) < _tol(torch.float32)
