"""What the eager operators do with a model compiled by ``torch.compile(model)`` (docs/howto/compile.md).

A float64 MLP (4-5-4-3, tanh, cross-entropy, batches of 5, 3 and 2: the test case
``mlp_tanh-ce_mean``), compiled with the default backend, handed to ``loss_and_gradient``,
``HessianOperator`` (both single-vector strategies, a block, finite differences) and
``GGNOperator`` (both tangent strategies, a block). Each line says whether the call works and,
if it does, its relative difference to the dense float64 reference (or to the uncompiled
model's gradient). Finite differences are also run with their hidden-dependence check skipped
(a private attribute: this is a probe), to show that the refusal is the check's, not the
product's.

Run: ``python benchmarks/probe_compile_model.py`` (CPU, about a minute).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
import torch._functorch.config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvops import GGNOperator, HessianOperator, ProductStrategy
from tests.operators.cases import get_case
from tests.operators.references import dense_ggn, dense_hessian


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def attempt(name: str, call: Callable[[], float]) -> None:
    """Print ``name``, then the relative difference ``call`` returns or the error it raises."""
    try:
        print(f"{name}: works, relative difference {call():.1e}", flush=True)
    except Exception as error:  # the outcome under study
        print(f"{name}: fails, {type(error).__name__}: {str(error).splitlines()[0][:240]}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    model, loss_fn, data = get_case("mlp_tanh-ce_mean").make()
    params = list(model.parameters())
    H = dense_hessian(model, loss_fn, data, params)
    G = dense_ggn(model, loss_fn, data, params)
    assert isinstance(G, torch.Tensor)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(H.shape[0], dtype=H.dtype, generator=generator)
    V = torch.randn(H.shape[0], 3, dtype=H.dtype, generator=generator)
    compiled: Any = torch.compile(model)
    print(f"torch {torch.__version__}; model {get_case('mlp_tanh-ce_mean').id}, D = {H.shape[0]}, float64")

    def gradient() -> float:
        expected = HessianOperator(model, loss_fn, data).loss_and_gradient()[1]
        return relative(HessianOperator(compiled, loss_fn, data).loss_and_gradient()[1], expected)

    attempt("loss_and_gradient", gradient)
    for flag in (True, False):
        torch._functorch.config.donated_buffer = flag
        for strategy in ("reverse_over_forward", "double_backward"):
            chosen = ProductStrategy(hessian_vector=strategy)

            def hessian(chosen: ProductStrategy = chosen) -> float:
                return relative(HessianOperator(compiled, loss_fn, data, strategy=chosen) @ v, H @ v)

            attempt(f"HessianOperator autograd, {strategy}, donated_buffer={flag}", hessian)
        attempt(
            f"HessianOperator autograd, (D, 3) block, donated_buffer={flag}",
            lambda: relative(HessianOperator(compiled, loss_fn, data) @ V, H @ V),
        )
    torch._functorch.config.donated_buffer = True
    attempt(
        "HessianOperator finite_difference",
        lambda: relative(HessianOperator(compiled, loss_fn, data, method="finite_difference") @ v, H @ v),
    )

    def unchecked_finite_differences() -> float:
        op = HessianOperator(compiled, loss_fn, data, method="finite_difference")
        op._structure_checked.update(range(op.num_batches))
        return relative(op @ v, H @ v)

    attempt(
        "HessianOperator finite_difference, hidden-dependence check skipped", unchecked_finite_differences
    )
    for tangent in ("dual_forward_with_graph", "separate_tangent_pass"):
        chosen = ProductStrategy(output_tangent=tangent)

        def ggn(chosen: ProductStrategy = chosen) -> float:
            return relative(GGNOperator(compiled, loss_fn, data, strategy=chosen) @ v, G @ v)

        attempt(f"GGNOperator, {tangent}", ggn)
    attempt("GGNOperator, (D, 3) block", lambda: relative(GGNOperator(compiled, loss_fn, data) @ V, G @ V))


if __name__ == "__main__":
    main()
