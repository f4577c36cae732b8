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

CASES = ["mlp_tanh-ce_mean", "transformer_ln-ce_seq_ignore_mean", "cnn_bn_eval-ce_mean", "dict_mlp-bce_sum-tiny_last"]


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
    np.testing.assert_allclose(gpu @ V.numpy(), expected.numpy(), rtol=1e-11, atol=1e-13 * float(expected.abs().max()))
