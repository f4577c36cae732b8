"""Compiled products (:mod:`curvops.operators.compiled`) against the dense float64 references.

Each per-batch product is one ``torch.func`` function under ``torch.compile``. The matrix of
tests traces with the ``aot_eager`` backend (dynamo and AOTAutograd: the tracing,
decompositions and functionalisation that decide which derivative rules run, without
generating kernels), which builds in seconds; one test per operator also generates inductor
kernels (marked slow: a C++ compilation per graph on the CPU). Batches of one shape keep it to one
graph per operator.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from curvops.operators.compiled import CompiledGGNOperator, CompiledHessianOperator
from tests.operators.cases import Batch, CaseTuple, LossWithReduction, get_case
from tests.operators.references import dense_ggn, dense_hessian

# Both sides are float64 sums of the same O(D) products in different orders: their
# difference is a few units of roundoff (1.1e-16) times the cancellation in those sums,
# which on these problems of a few hundred parameters stays far below 1e4. The rule this
# path avoids, reverse over forward through layer_norm, misses by 2e-2 on the transformer.
RTOL = 1e-10

# One shape per batch (one compiled graph); the LayerNorm transformer keeps its ignored
# targets, so the batches still differ in their number of counted terms.
CASES = [
    pytest.param("mlp_tanh-ce_mean", marks=pytest.mark.slow),
    "transformer_ln-ce_seq_ignore_mean",
    pytest.param("tied_embed-ce_mean", marks=pytest.mark.slow),
    pytest.param("dict_mlp-bce_sum-tiny_last", marks=pytest.mark.slow),
]
TRACE_ONLY = {"backend": "aot_eager"}


def _make(case_id: str) -> CaseTuple:
    return dataclasses.replace(get_case(case_id), batch_sizes=(3, 3)).make()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = float(torch.linalg.vector_norm(actual - expected))
    scale = float(torch.linalg.vector_norm(expected))
    assert error <= RTOL * scale, f"relative error {error / scale:.3e} > {RTOL:.0e}"


def _dense(kind: str, model: nn.Module, loss_fn: LossWithReduction, data: list[Batch]) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return (dense_hessian if kind == "hessian" else dense_ggn)(model, loss_fn, data, params)  # type: ignore[return-value]  # dense_ggn returns a tensor without return_factors


_OPERATORS = {"hessian": CompiledHessianOperator, "ggn": CompiledGGNOperator}


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("case_id", CASES)
def test_compiled_products_equal_dense_references(kind: str, case_id: str) -> None:
    """A single vector and a (D, 2) block: LayerNorm, attention, ignored targets, tied weights, dicts."""
    model, loss_fn, data = _make(case_id)
    dense = _dense(kind, model, loss_fn, data)
    op = _OPERATORS[kind](model, loss_fn, data, compile_options=TRACE_ONLY)
    generator = torch.Generator().manual_seed(0)
    V = torch.randn(dense.shape[0], 2, dtype=dense.dtype, generator=generator)
    _assert_close(op @ V[:, 0], dense @ V[:, 0])
    _assert_close(op @ V, dense @ V)


def test_compiled_products_of_a_parameter_subset() -> None:
    """Parameters outside the selection enter as constants: the product is the dense submatrix."""
    model, loss_fn, data = _make("mlp_tanh-ce_mean")
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if n.endswith("weight")]
    params = [p for n, p in model.named_parameters() if n in chosen]
    dense = dense_hessian(model, loss_fn, data, params)
    op = CompiledHessianOperator(model, loss_fn, data, params=chosen, compile_options=TRACE_ONLY)
    v = torch.randn(dense.shape[0], dtype=dense.dtype, generator=torch.Generator().manual_seed(1))
    _assert_close(op @ v, dense @ v)


def _inductor_available() -> bool:
    try:
        torch.compile(lambda x: x + 1)(torch.ones(2))
    except Exception:  # any failure to build a kernel means no inductor here
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_inductor_products_equal_dense_references(kind: str) -> None:
    """The default backend: generated kernels give the same products."""
    if not _inductor_available():
        pytest.skip("torch.compile's inductor backend cannot build kernels here (no C++ compiler?)")
    model, loss_fn, data = _make("mlp_tanh-ce_mean")
    dense = _dense(kind, model, loss_fn, data)
    op = _OPERATORS[kind](model, loss_fn, data)
    v = torch.randn(dense.shape[0], dtype=dense.dtype, generator=torch.Generator().manual_seed(2))
    _assert_close(op @ v, dense @ v)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_refuses_a_forward_that_writes_buffers(kind: str) -> None:
    """A train-mode batch norm updates running statistics, which a traced pure function cannot."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    with pytest.raises(ValueError, match="batch norm layer in train mode"):
        _OPERATORS[kind](model, nn.CrossEntropyLoss(), data, compile_options=TRACE_ONLY)


def test_refuses_compile_options_that_are_not_a_mapping() -> None:
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.raises(TypeError, match="compile_options must be a mapping"):
        CompiledGGNOperator(model, nn.CrossEntropyLoss(), data, compile_options=["aot_eager"])  # type: ignore[arg-type]  # the wrong type under test


def test_refuses_a_compiled_module() -> None:
    """The operator compiles the product; a compiled module has no forward-mode AD to trace."""
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match="pass the uncompiled module"):
        CompiledHessianOperator(torch.compile(model), nn.CrossEntropyLoss(), data, compile_options=TRACE_ONLY)  # type: ignore[arg-type]  # torch.compile's return type is a callable, here a module


@pytest.mark.parametrize("cls", [CompiledHessianOperator, CompiledGGNOperator], ids=lambda c: c.__name__)
@pytest.mark.parametrize("problem", ["no_grad_region", "detached_region"])
def test_values_hidden_from_reverse_mode_are_refused(cls, problem):
    """Forward mode would differentiate through a no-grad region or a detach that autograd's
    matrix treats as constant: refused before anything is compiled."""
    from tests.operators.test_forward_mode_consistency import PROBLEMS

    model, loss_fn, data = PROBLEMS[problem]()
    op = cls(model, loss_fn, data, compile_options={"backend": "aot_eager"})
    with pytest.raises(ValueError, match="uncompiled operator"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("cls", [CompiledHessianOperator, CompiledGGNOperator], ids=lambda c: c.__name__)
def test_padding_rows_are_constants_as_in_reverse_mode(cls):
    from tests.operators.test_forward_mode_consistency import PROBLEMS

    model, loss_fn, data = PROBLEMS["padding_idx"]()
    op = cls(model, loss_fn, data, compile_options={"backend": "aot_eager"})
    reference = (dense_hessian if cls is CompiledHessianOperator else dense_ggn)(
        model, loss_fn, data, op.params
    )
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op @ v, reference @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_process_can_build_more_operators_than_dynamos_recompile_limit():
    """Each operator compiles its own copy of the product: the eleventh operator (a new shape,
    so no cached graph fits) compiles instead of failing with dynamo's recompile limit (8)."""
    operators = []
    for width in range(2, 13):
        torch.manual_seed(width)
        model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
        data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
        op = CompiledGGNOperator(model, nn.CrossEntropyLoss(), data, compile_options=TRACE_ONLY)
        operators.append(op)  # alive: their cached graphs stay too
        v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        reference = dense_ggn(model, nn.CrossEntropyLoss(), data, op.params) @ v
        torch.testing.assert_close(op @ v, reference, rtol=1e-10, atol=1e-12)
