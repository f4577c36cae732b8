"""The operators on a CUDA device: same numbers as on the CPU, tensors stay on the device.

Run on the device machine with ``python -m pytest -m gpu``; skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvops import FisherOperator, GGNOperator, HessianOperator
from tests.operators.cases import get_case

pytestmark = pytest.mark.gpu

CASES = [
    "mlp_tanh-ce_mean",
    "transformer_ln-ce_seq_ignore_mean",
    "cnn_bn_eval-ce_mean",
    "dict_mlp-bce_sum-tiny_last",
]


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator], ids=lambda c: c.__name__)
def test_cuda_matches_cpu(case_id, cls):
    model, loss_fn, data = get_case(case_id).make()
    kwargs = {"kind": "empirical"} if cls is FisherOperator else {}
    cpu = cls(model, loss_fn, data, **kwargs)
    V = torch.randn(cpu.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = cpu @ V
    gpu_model = model.to("cuda")
    gpu_loss = loss_fn.to("cuda") if isinstance(loss_fn, torch.nn.Module) else loss_fn
    # data stays on the CPU: the operator moves each batch to the model's device
    gpu = cls(gpu_model, gpu_loss, data, **kwargs)
    out = gpu @ V.cuda()
    assert out.device.type == "cuda"
    # float64 on both devices; different reduction orders: ~1e3 u relative
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-11, atol=1e-13 * float(expected.abs().max()))
    np.testing.assert_allclose(
        gpu @ V.numpy(), expected.numpy(), rtol=1e-11, atol=1e-13 * float(expected.abs().max())
    )


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator], ids=lambda c: c.__name__)
def test_out_rows_are_written_in_place_without_a_block_buffer(cls):
    """``matmat_torch(X, out=rows.T)`` accumulates into the caller's rows (a Lanczos basis row):
    its peak memory is at least a ``(k, D)`` block below that of ``matmat_torch(X)``, which
    allocates the block and its transposed copy, and the numbers are the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 10)
    ).cuda()
    data = [(torch.randn(4, 1024), torch.randint(0, 10, (4,)))]
    kwargs = {"kind": "empirical"} if cls is FisherOperator else {}
    op = cls(model, torch.nn.CrossEntropyLoss(), data, **kwargs)
    k = 2
    X = torch.randn(op.shape[0], k, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    basis = torch.zeros(k + 1, op.shape[0], device="cuda")
    block_bytes = k * op.shape[0] * 4

    def peak(call):
        call()  # warm-up: allocator caches, the reverse-over-forward check
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, result

    plain_peak, plain = peak(lambda: op.matmat_torch(X))
    out = basis[1:].T
    out_peak, written = peak(lambda: op.matmat_torch(X, out=out))
    assert written is out
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
    assert plain_peak - out_peak >= block_bytes, (plain_peak, out_peak, block_bytes)


@pytest.mark.parametrize("case_id", CASES)
def test_cuda_ggn_default_carries_the_tangent_alongside(case_id):
    """CUDA's default GGN/Fisher single-vector product carries ``J v`` alongside the forward
    pass (nothing in these models refuses it) and equals the CPU's float64 product."""
    model, loss_fn, data = get_case(case_id).make()
    for cls, kwargs in ((GGNOperator, {}), (FisherOperator, {"kind": "empirical"})):
        cpu = cls(model, loss_fn, data, **kwargs)
        v = torch.randn(cpu.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        expected = cpu @ v
        gpu_loss = loss_fn.to("cuda") if isinstance(loss_fn, torch.nn.Module) else loss_fn
        gpu = cls(model.to("cuda"), gpu_loss, data, **kwargs)
        out = (gpu @ v.cuda()).cpu()
        assert gpu.tangent_alongside_refusal is None
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-13 * float(expected.abs().max()))
        model.to("cpu")
