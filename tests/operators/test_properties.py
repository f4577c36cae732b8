"""Property-based tests of the operator contract on random small problems (hypothesis).

Random models, losses, uneven batches and parameter selections (``tests/operators/
strategies.py``) against dense float64 references built here independently of ``curvops``,
with plain autograd only (no ``torch.func``, no ``vmap``, no forward mode):

- Hessian: one backward pass per row of the gradient of the documented objective, the
  loss of all batches concatenated (``CurvatureOperator``: the mean over all samples of all
  batches, or the sum) — or, with train-mode BatchNorm, whose batch statistics make every
  batch its own function, the sum of the per-batch sums over the whole normaliser;
- GGN: ``Jᵀ H_out J`` with ``J`` by one backward pass per output entry and ``H_out`` the
  loss Hessian w.r.t. the output in closed form (checked against double backward of the
  loss, so a slip in the closed form cannot hide);
- empirical Fisher: ``c Σ_t ∇ℓ_t ∇ℓ_tᵀ`` by one backward pass per loss term.

Properties: products (single vectors, blocks, ``to_dense``) match the references; numpy and
torch inputs give the same products; the matrices are symmetric and, for the GGN and both
Fishers, positive semi-definite; ``method="finite_difference"`` stays within its documented
error; and every product — also one that raises — leaves the model as it was (parameter
and buffer values, storages and version counters, ``.grad``, train/eval flags, hooks) and
does not touch torch's global state (grad mode, RNG).

Besides the random draws, every property runs fixed ``@example`` problems of issue 26
(``known(...)``: a padded Embedding, a ``no_grad`` region over parameters that require
grad, train-mode BatchNorm, a first batch with zero loss gradient or only ignored targets),
so those cases are checked in every profile.

Profiles (``tests/conftest.py``): ``dev`` by default, a few examples per property;
``ci`` (environment variable ``CI`` set) several times more. Both are derandomized and use
no example database, so a failure reproduces; hypothesis prints the falsifying
:class:`~tests.operators.strategies.ProblemSpec` (rebuild it with ``build_problem``).

Tolerances
----------
Operator and reference compute the same exact quantity by different sequences of float64
operations. A computed inner product of length n has error ≤ γ_n Σ|aᵢbᵢ| ≈ n·u·Σ|aᵢbᵢ|
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1), u = 2⁻⁵³; the
longest sums here run over the parameters and the output entries, n ≤ K = D + M, and a
backward pass chains a few such products (depth ≤ 5 here). Measured against the scale of
the whole matrix (‖A‖_F, or ‖A‖_F·‖v‖ for a product ``A v``, so that cancellation inside
one entry does not count), the relative difference is therefore ≲ depth·K·u·ρ with ρ the
ratio Σ|terms| / ‖A‖, which stays ≲ 10² for these O(1) random models. Hence
``rtol = 10³ · K · u`` (about 2e-11 for K = 200), which still fails on every modelling
error (a wrong normaliser, a missing batch, a wrong block is ≳ 1e-3 here).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, note, settings
from torch import Tensor, nn

from curvops import FisherOperator, GGNOperator, HessianOperator, JacobianOperator
from tests.operators.references import (
    concat_batches,
    dense_empirical_fisher,
    loss_output_hessian,
    model_jacobian,
)
from tests.operators.strategies import LogCoshLoss, Problem, ProblemSpec, build_problem, problem_specs

UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2

#: Upper end of the relative error that HessianOperator documents for
#: ``method="finite_difference"`` in float64 ("about 1e-10 to 1e-8").
DOCUMENTED_FD_RTOL = 1e-8


def _examples(fraction: float) -> settings:
    """The loaded profile's number of examples, scaled for a property's cost (at least 2)."""
    profile = settings.default
    assert profile is not None  # conftest.py loads a profile before collection
    return settings(max_examples=max(2, round(profile.max_examples * fraction)))


# =========================================================================== references
@contextlib.contextmanager
def _math_attention():
    """The math SDPA kernel: the fused CPU kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _reference_copy(problem: Problem) -> tuple[nn.Module, list[Tensor]]:
    """A deep copy of the model (the references must not touch the tested model) and its
    selected parameters, in ``named_parameters()`` order."""
    model = copy.deepcopy(problem.model)
    by_name = dict(model.named_parameters())
    return model, [by_name[name] for name in problem.selected]


def _flat_grad(out: Tensor, params: list[Tensor], create_graph: bool = False) -> Tensor:
    if not out.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=out.dtype)
    grads = torch.autograd.grad(out, params, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def _normaliser(loss_fn: Any, target: Tensor) -> float:
    """A batch's share of the ``mean`` normaliser (the denominators torch's losses divide by)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        counted = target != loss_fn.ignore_index
        if loss_fn.weight is None:
            return float(counted.sum())
        return float(loss_fn.weight[target[counted]].sum())
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return float(target.numel())
    return float(target.shape[0])  # a custom callable: a mean over samples


def _objective(problem: Problem, model: nn.Module) -> Tensor:
    """The documented whole-dataset objective, as a differentiable function of ``model``.

    Eval mode: the loss on all batches concatenated, called once. Train-mode BatchNorm: the
    output of a batch depends on the whole batch, so the objective is the sum of the batch
    losses, each turned into its batch *sum* and divided by the whole normaliser (``mean``).
    """
    loss_fn = problem.loss_fn
    if not problem.spec.train_mode:
        x, y = concat_batches(problem.data)
        return loss_fn(model(x), y)
    # reduce(add), not sum(): the same left-to-right additions, minus sum's leading 0 (not a Tensor)
    if loss_fn.reduction == "sum":
        return functools.reduce(operator.add, (loss_fn(model(x), y) for x, y in problem.data))
    total = sum(_normaliser(loss_fn, y) for _, y in problem.data)
    return functools.reduce(
        operator.add, (loss_fn(model(x), y) * (_normaliser(loss_fn, y) / total) for x, y in problem.data)
    )


def reference_hessian(problem: Problem) -> Tensor:
    """Dense Hessian of :func:`_objective`: row i = ∇_θ (∇_θ L)_i by a plain second backward."""
    model, params = _reference_copy(problem)
    with _math_attention():
        g = _flat_grad(_objective(problem, model), params, create_graph=True)
        return torch.stack([_flat_grad(g[i], params) for i in range(g.numel())])


def closed_form_output_hessian(loss_fn: Any, output: Tensor, target: Tensor) -> Tensor:
    """∂²L/∂vec(f)², (M, M), of the built-in losses in closed form (vec: row-major).

    Cross-entropy: per counted position t (a row over the class dimension 1),
    ``a_t (diag p − p pᵀ)`` with ``a_t = (1 − ε) w_{y_t} + ε Σ_c w_c / C`` (every ``−log p_c``
    has that Hessian), times ``1 / Σ_t w_{y_t}`` for ``mean``. MSE: ``2 c I``.
    BCE-with-logits: ``diag(c · (pw·y + 1 − y) σ(1 − σ))``. ``c`` = 1 / numel for ``mean``.
    """
    f = output.detach()
    M = f.numel()
    if isinstance(loss_fn, nn.MSELoss):
        c = 1.0 / M if loss_fn.reduction == "mean" else 1.0
        return 2.0 * c * torch.eye(M, dtype=f.dtype)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        c = 1.0 / M if loss_fn.reduction == "mean" else 1.0
        s = torch.sigmoid(f)
        pw = 1.0 if loss_fn.pos_weight is None else loss_fn.pos_weight
        return torch.diag((c * (pw * target + 1 - target) * s * (1 - s)).reshape(-1))
    assert isinstance(loss_fn, nn.CrossEntropyLoss)
    C = f.shape[1]
    w = torch.ones(C, dtype=f.dtype) if loss_fn.weight is None else loss_fn.weight
    eps = loss_fn.label_smoothing
    index = torch.arange(M).reshape(f.shape)
    H = torch.zeros(M, M, dtype=f.dtype)
    denominator = 0.0
    rows = f.movedim(1, -1).reshape(-1, C)
    row_index = index.movedim(1, -1).reshape(-1, C)
    for logits, idx, y in zip(rows, row_index, target.reshape(-1)):
        if int(y) == loss_fn.ignore_index:
            continue
        p = torch.softmax(logits, 0)
        a = (1 - eps) * w[y] + eps * w.sum() / C
        H[idx[:, None], idx[None, :]] += a * (torch.diag(p) - torch.outer(p, p))
        denominator += float(w[y])
    return H / denominator if loss_fn.reduction == "mean" else H


def reference_ggn(problem: Problem) -> Tensor:
    """Dense GGN ``Jᵀ H_out J`` on the concatenated data (eval mode)."""
    model, params = _reference_copy(problem)
    _, y = concat_batches(problem.data)
    with _math_attention():
        output, J = model_jacobian(model, problem.data, params)
    by_autograd = loss_output_hessian(problem.loss_fn, output, y)
    if isinstance(problem.loss_fn, LogCoshLoss):
        H_out = by_autograd
    else:
        H_out = closed_form_output_hessian(problem.loss_fn, output, y)
        gap = float((H_out - by_autograd).abs().max())
        assert gap <= 1e3 * H_out.shape[0] * UNIT_ROUNDOFF * float(H_out.abs().max()), (
            f"closed-form loss Hessian off by {gap:.3e}"
        )
    return J.T @ H_out @ J


def reference_empirical_fisher(problem: Problem) -> Tensor:
    """Dense empirical Fisher ``c Σ_t ∇ℓ_t ∇ℓ_tᵀ``; a custom loss's terms are its samples."""
    model, params = _reference_copy(problem)
    with _math_attention():
        if not isinstance(problem.loss_fn, LogCoshLoss):
            return dense_empirical_fisher(model, problem.loss_fn, problem.data, params)
        x, y = concat_batches(problem.data)
        output = model(x)
        c = 1.0 / output.shape[0] if problem.loss_fn.reduction == "mean" else 1.0
        grads = [
            _flat_grad(problem.loss_fn(output[n : n + 1], y[n : n + 1]), params)
            for n in range(output.shape[0])
        ]
        return c * functools.reduce(operator.add, (torch.outer(g, g) for g in grads))


# =========================================================================== model state
@dataclass
class _State:
    parameters: list[tuple[str, Tensor, int, int, bool, Tensor | None]]
    buffers: list[tuple[str, Tensor, int]]
    modes: list[tuple[str, bool]]
    hooks: list[tuple[str, tuple[int, ...]]]
    global_state: tuple[Any, ...]
    rng_state: Tensor


def snapshot(model: nn.Module) -> _State:
    """Everything a product must leave as it was."""
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    mha = getattr(torch.backends, "mha", None)
    return _State(
        parameters=[
            (
                name,
                p.detach().clone(),
                p._version,
                p.data_ptr(),
                p.requires_grad,
                None if p.grad is None else p.grad.clone(),
            )
            for name, p in model.named_parameters(remove_duplicate=False)
        ],
        buffers=[(name, b.clone(), b._version) for name, b in model.named_buffers(remove_duplicate=False)],
        modes=[(name, m.training) for name, m in model.named_modules()],
        hooks=[
            (name, tuple(len(getattr(m, d, {})) for d in hook_dicts)) for name, m in model.named_modules()
        ],
        global_state=(
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.get_default_dtype(),
            None if mha is None else mha.get_fastpath_enabled(),
        ),
        rng_state=torch.random.get_rng_state(),
    )


def assert_state_unchanged(before: _State, model: nn.Module, when: str) -> None:
    after = snapshot(model)
    for (name, value, version, ptr, req, grad), (_, value2, version2, ptr2, req2, grad2) in zip(
        before.parameters, after.parameters
    ):
        assert torch.equal(value, value2), f"{when}: parameter {name} changed value"
        assert ptr == ptr2, f"{when}: parameter {name} has a new storage"
        assert version == version2, (
            f"{when}: parameter {name}'s version counter moved {version} -> {version2}"
        )
        assert req == req2, f"{when}: parameter {name}'s requires_grad changed"
        assert (grad is None) == (grad2 is None), (
            f"{when}: parameter {name}'s .grad went {'from None' if grad is None else 'to None'}"
        )
        assert grad is None or (grad2 is not None and torch.equal(grad, grad2)), (
            f"{when}: parameter {name}'s .grad changed"
        )
    for (name, value, version), (_, value2, version2) in zip(before.buffers, after.buffers):
        assert torch.equal(value, value2), f"{when}: buffer {name} changed value"
        assert version == version2, f"{when}: buffer {name}'s version counter moved {version} -> {version2}"
    assert before.modes == after.modes, f"{when}: train/eval modes changed"
    assert before.hooks == after.hooks, f"{when}: hooks added or removed"
    assert before.global_state == after.global_state, (
        f"{when}: torch's global state (grad mode, default dtype, MHA fast path) changed"
    )
    assert torch.equal(before.rng_state, after.rng_state), (
        f"{when}: torch's global random number generator was used"
    )


# =========================================================================== helpers
def _rtol(op: Any, problem: Problem) -> float:
    """``10³ · (D + M) · u`` (module docstring), M the output entries of the whole data."""
    x, _ = concat_batches(problem.data)
    model = copy.deepcopy(problem.model).eval()
    with torch.no_grad(), _math_attention():
        M = model(x[:1]).numel() * x.shape[0]
    return 1e3 * (op.shape[0] + M) * UNIT_ROUNDOFF


#: A reference below this norm is a quantity that cancels exactly (a bias right before a
#: train-mode BatchNorm, which subtracts it again): both sides are then rounding of O(1) terms,
#: ~1e-30 here, which no relative tolerance can judge; the curvatures of these models that do
#: not cancel are 1e-4 or more.
CANCELLED = 1e-12


def _assert_close(actual: Tensor, expected: Tensor, scale: float, rtol: float, what: str) -> None:
    scale = max(scale, CANCELLED)
    err = float(torch.linalg.vector_norm(actual - expected))
    assert err <= rtol * scale, f"{what}: ‖difference‖ = {err:.3e} > {rtol:.1e} · {scale:.3e}"


def _random_block(D: int, k: int, seed: int) -> Tensor:
    return torch.randn(D, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_products(op: Any, reference: Tensor, rtol: float, name: str) -> Tensor:
    """Single vectors, blocks, ``to_dense`` and the numpy paths against ``reference``;
    returns ``op.to_dense()``."""
    D = reference.shape[0]
    assert op.shape == (D, D), f"{name}: shape {op.shape}, the selected parameters have D = {D}"
    ref_norm = float(torch.linalg.matrix_norm(reference))
    dense = op.to_dense()
    _assert_close(dense, reference, ref_norm, rtol, f"{name}.to_dense() vs reference")
    _assert_close(dense, dense.T, ref_norm, rtol, f"{name}.to_dense() symmetry")
    V = _random_block(D, 3, seed=D)
    scale = ref_norm * float(torch.linalg.matrix_norm(V))
    block = op @ V
    _assert_close(block, reference @ V, scale, rtol, f"{name} @ block")
    v = V[:, 0]
    single = op @ v
    _assert_close(single, reference @ v, ref_norm * float(v.norm()), rtol, f"{name} @ vector")
    # numpy in, numpy out: the same products (scipy's dispatch, host arrays)
    for numpy_result, torch_result, what in (
        (op @ v.numpy(), single, "op @ ndarray"),
        (op.matvec(v.numpy()), single, "op.matvec(ndarray)"),
        (op.matmat(V.numpy()), block, "op.matmat(ndarray)"),
    ):
        assert isinstance(numpy_result, np.ndarray), f"{name}: {what} returned {type(numpy_result).__name__}"
        _assert_close(
            torch.from_numpy(np.asarray(numpy_result)), torch_result, scale, rtol, f"{name}: {what} vs torch"
        )
    return dense


def _assert_psd(dense: Tensor, rtol: float, name: str) -> None:
    """min eigenvalue ≥ −rtol·‖A‖ (Weyl: a perturbation E moves eigenvalues by ≤ ‖E‖)."""
    sym = 0.5 * (dense + dense.T).numpy()
    eigenvalues = np.linalg.eigvalsh(sym)
    bound = rtol * float(np.linalg.norm(sym, 2))
    assert eigenvalues[0] >= -bound, f"{name} is not PSD: min eigenvalue {eigenvalues[0]:.3e} < -{bound:.3e}"


def known(**changes: Any) -> ProblemSpec:
    """A fixed spec (``@example``): the problems of issue 26 run in every profile, whatever
    the random draws; a plain tanh MLP under CE(mean) on uneven batches, with ``changes``."""
    base = {
        "family": "mlp",
        "seed": 26,
        "act": "tanh",
        "norm": "none",
        "width": 3,
        "classes": 3,
        "conv_dim": 0,
        "padding_idx": False,
        "attention": "none",
        "tie_head": False,
        "loss": "ce",
        "reduction": "mean",
        "ignore": False,
        "class_weights": False,
        "label_smoothing": 0.0,
        "pos_weight": False,
        "batch_sizes": (3, 2, 1),
        "selection": "all",
        "chosen": (),
        "frozen": None,
        "with_grads": True,
        "with_hook": True,
    }
    return ProblemSpec(**{**base, **changes})


#: Token model with an Embedding(padding_idx=0) and padding tokens in the data.
PADDED_EMBEDDING = known(family="tokens", width=3, padding_idx=True)
#: Part of the forward pass under torch.no_grad() while its parameters require grad.
NO_GRAD_GATE = known(no_grad_gate=True)
#: Train-mode BatchNorm (batch statistics; running statistics must not move).
TRAIN_BATCHNORM = known(norm="batch_train", batch_sizes=(3, 4))
#: LayerNorm, MSE, first batch's targets equal to the outputs (zero loss gradient there).
FITTED_FIRST_BATCH = known(norm="layer", loss="mse", fit_first_batch=True)
#: Cross-entropy whose first batch has only ignored targets.
IGNORED_FIRST_BATCH = known(ignore=True, first_batch_ignored=True)
#: The largest models drawn (D ≈ 250): attention, LayerNorm, a tied head, per-position CE.
LARGE_ATTENTION = known(
    family="tokens",
    width=6,
    classes=5,
    norm="layer",
    attention="mha",
    tie_head=True,
    ignore=True,
    class_weights=True,
    label_smoothing=0.1,
)
LARGE_SDPA = known(
    family="tokens",
    width=6,
    classes=4,
    norm="layer",
    attention="sdpa",
    loss="bce",
    pos_weight=True,
    reduction="sum",
)


def _describe(problem: Problem) -> None:
    note(f"model: {problem.model}")
    note(f"loss: {problem.loss_fn!r}, batch sizes {problem.spec.batch_sizes}, params {problem.selected}")


# =========================================================================== properties
@_examples(1.0)
@given(spec=problem_specs(train_mode=True))
@example(spec=TRAIN_BATCHNORM)
@example(spec=FITTED_FIRST_BATCH)
@example(spec=IGNORED_FIRST_BATCH)
@example(spec=PADDED_EMBEDDING)
@example(spec=LARGE_ATTENTION)
def test_hessian_matches_reference(spec):
    """Autograd Hessian: blocks (double backward), single vectors (reverse over forward where
    every operation is verified, else double backward), to_dense, numpy paths; symmetric, also
    when built column by column from single-vector products; no side effects."""
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    H = HessianOperator(problem.model, problem.loss_fn, problem.data, params=problem.params)
    assert H.param_names == problem.selected
    reference = reference_hessian(problem)
    rtol = _rtol(H, problem)
    _check_products(H, reference, rtol, "HessianOperator")
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    by_columns = torch.stack([H @ eye[:, i] for i in range(H.shape[0])], dim=1)
    ref_norm = float(torch.linalg.matrix_norm(reference))
    _assert_close(by_columns, reference, ref_norm, rtol, "Hessian from single-vector products vs reference")
    _assert_close(by_columns, by_columns.T, ref_norm, rtol, "Hessian from single-vector products: symmetry")
    assert_state_unchanged(before, problem.model, "after Hessian products")


def _hides_a_dependence_from_autograd(spec, H) -> bool:
    """Whether the selected parameters reach the loss through a value autograd treats as a
    constant: a no-grad region fed by an earlier selected layer or its own selected weights,
    or a padding row of an embedding weight that an output head also reads."""
    names = set(H.param_names)
    gate_fed = spec.no_grad_gate and any(n.startswith(("0.", "1.", "3.")) for n in names)
    tied_padding = spec.padding_idx and spec.tie_head and "emb.weight" in names
    return gate_fed or tied_padding


@_examples(0.5)
@given(spec=problem_specs(train_mode=True, smooth=True))
@example(spec=known())
@example(spec=PADDED_EMBEDDING)
@example(spec=NO_GRAD_GATE)
def test_finite_difference_hessian_within_documented_error(spec):
    """``method="finite_difference"``: to_dense and products agree with the reference within
    the documented error; parameters restored bit for bit, version counters included.

    The documented relative error is "at best O(u^(2/3)) times model constants — in float64
    about 1e-10 to 1e-8". The model constants (third derivatives) of a random tiny model can
    exceed those of the LMs the range was measured on (LayerNorm over 2 features, train-mode
    BatchNorm over 2-3 samples), so the bound adds an a-posteriori estimate of the truncation
    error: central differences give ``D(ε) = Hv + Tε² + O(ε⁴)``, so with the step doubled
    ``|D(2ε) − D(ε)| ≈ 3|T|ε²``; allowed is ``1e-8·‖H‖‖v‖ + 2·|D(2ε) − D(ε)|`` (6x the
    estimate), per column. A wrong scale, sign, batch weighting or restore is O(1) and fails.
    """
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    H = HessianOperator(
        problem.model, problem.loss_fn, problem.data, params=problem.params, method="finite_difference"
    )
    if _hides_a_dependence_from_autograd(spec, H):
        # Finite differences see the hidden dependence and autograd does not: a refusal.
        with pytest.raises(ValueError, match="method='autograd'"):
            H @ _random_block(H.shape[0], 1, seed=1)[:, 0]
        assert_state_unchanged(before, problem.model, "after a refused finite-difference product")
        return
    H2 = HessianOperator(
        problem.model,
        problem.loss_fn,
        problem.data,
        params=problem.params,
        method="finite_difference",
        fd_eps=2 * H.finite_difference_step(),
    )
    reference = reference_hessian(problem)
    ref_norm = float(torch.linalg.matrix_norm(reference))
    dense, dense2 = H.to_dense(), H2.to_dense()
    allowed = DOCUMENTED_FD_RTOL * ref_norm + 2.0 * torch.linalg.vector_norm(dense2 - dense, dim=0)
    errors = torch.linalg.vector_norm(dense - reference, dim=0)
    worst = int(torch.argmax(errors - allowed))
    relative_error = float(torch.linalg.matrix_norm(dense - reference)) / ref_norm
    note(f"finite-difference relative error {relative_error:.2e}")
    assert bool((errors <= allowed).all()), (
        f"finite-difference column {worst}: error {float(errors[worst]):.3e} "
        f"> allowed {float(allowed[worst]):.3e} "
        f"(documented {DOCUMENTED_FD_RTOL:.0e}·‖H‖ = {DOCUMENTED_FD_RTOL * ref_norm:.3e}, "
        f"truncation estimate {float(allowed[worst]) - DOCUMENTED_FD_RTOL * ref_norm:.3e})"
    )
    # ‖D − Dᵀ‖_F ≤ ‖D − H‖_F + ‖(D − H)ᵀ‖_F ≤ 2 ‖allowed‖ (H symmetric)
    asymmetry = float(torch.linalg.matrix_norm(dense - dense.T))
    assert asymmetry <= 2 * float(allowed.norm()), (
        f"finite-difference to_dense asymmetry {asymmetry:.3e} exceeds its error"
    )
    # Blocks: each column's own step (‖εv‖ is fixed), so each its own truncation estimate.
    V = _random_block(H.shape[0], 2, seed=1)
    block = H @ V
    allowed = DOCUMENTED_FD_RTOL * ref_norm * torch.linalg.vector_norm(
        V, dim=0
    ) + 2.0 * torch.linalg.vector_norm(H2 @ V - block, dim=0)
    errors = torch.linalg.vector_norm(block - reference @ V, dim=0)
    assert bool((errors <= allowed).all()), (
        f"finite-difference block product: errors {errors.tolist()} > allowed {allowed.tolist()}"
    )
    scale = ref_norm * float(torch.linalg.matrix_norm(V))
    _assert_close(
        torch.from_numpy(H.matmat(V.numpy())),
        H @ V,
        scale,
        _rtol(H, problem),
        "finite-difference numpy vs torch",
    )
    assert_state_unchanged(before, problem.model, "after finite-difference Hessian products")


@_examples(1.0)
@given(spec=problem_specs())
@example(spec=PADDED_EMBEDDING)
@example(spec=NO_GRAD_GATE)
@example(spec=LARGE_ATTENTION)
def test_ggn_matches_reference_and_is_psd(spec):
    """GGN = Jᵀ H_out J: products, to_dense, numpy paths; symmetric; PSD (every loss drawn is
    convex in the output); no side effects."""
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    G = GGNOperator(problem.model, problem.loss_fn, problem.data, params=problem.params)
    assert G.param_names == problem.selected
    reference = reference_ggn(problem)
    rtol = _rtol(G, problem)
    _assert_psd(_check_products(G, reference, rtol, "GGNOperator"), rtol, "GGNOperator")
    assert_state_unchanged(before, problem.model, "after GGN products")


@_examples(0.75)
@given(spec=problem_specs(ce_weight_and_smoothing=False))
@example(spec=PADDED_EMBEDDING)
@example(spec=NO_GRAD_GATE)
@example(spec=LARGE_SDPA)
def test_empirical_fisher_matches_reference_and_is_psd(spec):
    """Empirical Fisher c Σ_t ∇ℓ_t ∇ℓ_tᵀ: exact products; symmetric; PSD; no side effects."""
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    Fe = FisherOperator(problem.model, problem.loss_fn, problem.data, params=problem.params, kind="empirical")
    reference = reference_empirical_fisher(problem)
    rtol = _rtol(Fe, problem)
    _assert_psd(
        _check_products(Fe, reference, rtol, "FisherOperator(kind='empirical')"),
        rtol,
        "FisherOperator(kind='empirical')",
    )
    assert_state_unchanged(before, problem.model, "after empirical Fisher products")


@_examples(0.5)
@given(spec=problem_specs(losses=("ce", "mse", "bce")), mc_samples=...)
@example(spec=PADDED_EMBEDDING, mc_samples=False)
def test_mc_fisher_is_a_fixed_symmetric_psd_matrix(spec, mc_samples: bool):
    """Monte-Carlo Fisher: random, but a fixed matrix (repeated products agree), symmetric
    and PSD; block and single-vector products are columns of the same matrix; no side effects
    (the draws use the operator's own generator, not torch's global RNG)."""
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    Fm = FisherOperator(
        problem.model,
        problem.loss_fn,
        problem.data,
        params=problem.params,
        kind="mc",
        mc_samples=2 if mc_samples else 1,
        seed=spec.seed,
    )
    rtol = _rtol(Fm, problem)
    dense = Fm.to_dense()
    norm = float(torch.linalg.matrix_norm(dense))
    _assert_close(Fm.to_dense(), dense, norm, rtol, "MC Fisher: repeated to_dense")
    _assert_close(dense, dense.T, norm, rtol, "MC Fisher symmetry")
    _assert_psd(dense, rtol, "FisherOperator(kind='mc')")
    V = _random_block(Fm.shape[0], 2, seed=2)
    scale = norm * float(torch.linalg.matrix_norm(V))
    _assert_close(Fm @ V, dense @ V, scale, rtol, "MC Fisher block vs to_dense")
    _assert_close(Fm @ V[:, 1], dense @ V[:, 1], scale, rtol, "MC Fisher vector vs to_dense")
    _assert_close(torch.from_numpy(Fm.matmat(V.numpy())), Fm @ V, scale, rtol, "MC Fisher numpy vs torch")
    assert_state_unchanged(before, problem.model, "after MC Fisher products")


def reference_jacobian(problem: Problem) -> Tensor:
    """Dense model Jacobian, (M, D): batch by batch (train-mode BatchNorm couples the samples
    of a batch only), one backward pass per output entry, rows in the batches' order."""
    model, params = _reference_copy(problem)
    with _math_attention():
        return torch.cat([model_jacobian(model, [batch], params)[1] for batch in problem.data])


@_examples(0.75)
@given(spec=problem_specs(train_mode=True))
@example(spec=PADDED_EMBEDDING)
@example(spec=NO_GRAD_GATE)
@example(spec=TRAIN_BATCHNORM)
def test_jacobian_matches_reference_and_its_transpose(spec):
    """JacobianOperator: ``J @ V`` (forward mode) and ``J.T @ U`` (reverse mode) match the
    reference Jacobian, so each is the other's adjoint; numpy and torch paths agree; no side
    effects."""
    problem = build_problem(spec)
    _describe(problem)
    before = snapshot(problem.model)
    J = JacobianOperator(problem.model, problem.data, params=problem.params)
    reference = reference_jacobian(problem)
    M, D = reference.shape
    assert J.shape == (M, D), f"JacobianOperator shape {J.shape}, expected {(M, D)}"
    rtol = 1e3 * (M + D) * UNIT_ROUNDOFF  # as for the curvature products (module docstring)
    ref_norm = float(torch.linalg.matrix_norm(reference))
    _assert_close(J.to_dense(), reference, ref_norm, rtol, "JacobianOperator.to_dense() vs reference")
    V, U = _random_block(D, 2, seed=4), _random_block(M, 2, seed=5)
    JV, JtU = J @ V, J.T @ U
    _assert_close(JV, reference @ V, ref_norm * float(torch.linalg.matrix_norm(V)), rtol, "J @ V")
    _assert_close(JtU, reference.T @ U, ref_norm * float(torch.linalg.matrix_norm(U)), rtol, "J.T @ U")
    _assert_close(
        torch.from_numpy(J.matmat(V.numpy())),
        JV,
        ref_norm * float(torch.linalg.matrix_norm(V)),
        rtol,
        "J.matmat(ndarray) vs torch",
    )
    _assert_close(
        torch.from_numpy(J.T.matmat(U.numpy())),
        JtU,
        ref_norm * float(torch.linalg.matrix_norm(U)),
        rtol,
        "J.T.matmat(ndarray) vs torch",
    )
    assert_state_unchanged(before, problem.model, "after Jacobian products")


def _poison_last_batch(problem: Problem) -> type[Exception]:
    """Make the last batch fail inside a product, after construction (which reads batch 0
    and the targets only): NaN inputs, or a token id outside the vocabulary. Returns the
    exception the product must raise (NaN: FloatingPointError; the token: torch's IndexError)."""
    x, y = problem.data[-1]
    if x.is_floating_point():
        problem.data[-1] = (torch.full_like(x, float("nan")), y)
        return FloatingPointError
    x = x.clone()
    x.view(-1)[-1] = 10_000
    problem.data[-1] = (x, y)
    return IndexError


OPERATOR_KINDS = {
    "hessian": lambda p: HessianOperator(p.model, p.loss_fn, p.data, params=p.params),
    "hessian_fd": lambda p: HessianOperator(
        p.model, p.loss_fn, p.data, params=p.params, method="finite_difference"
    ),
    "ggn": lambda p: GGNOperator(p.model, p.loss_fn, p.data, params=p.params),
    "fisher_empirical": lambda p: FisherOperator(
        p.model, p.loss_fn, p.data, params=p.params, kind="empirical"
    ),
    "fisher_mc": lambda p: FisherOperator(p.model, p.loss_fn, p.data, params=p.params, kind="mc"),
}


@pytest.mark.parametrize("kind", list(OPERATOR_KINDS))
@_examples(0.5)
@given(spec=problem_specs(train_mode=True, poisonable=True))
@example(spec=TRAIN_BATCHNORM)
@example(spec=known())
def test_failed_product_leaves_model_unchanged(kind, spec):
    """A product that fails half-way (a later batch is NaN or holds an invalid token) raises
    — NaN inputs as a FloatingPointError naming the batch — and leaves the model and torch's
    global state exactly as they were."""
    problem = build_problem(spec)
    _describe(problem)
    assume(kind.startswith("hessian") or not spec.train_mode)  # train-mode BatchNorm: Hessian only
    assume(kind != "fisher_mc" or spec.loss != "custom")  # refused at construction (no sampling model)
    expected = _poison_last_batch(problem)
    last = len(problem.data) - 1
    before = snapshot(problem.model)
    op = OPERATOR_KINDS[kind](problem)
    refused = kind == "hessian_fd" and _hides_a_dependence_from_autograd(spec, op)
    if refused:  # refused on batch 0, before the poisoned batch is reached
        expected = ValueError
    v = _random_block(op.shape[0], 2, seed=3)
    for x in (v[:, 0], v):
        with pytest.raises(expected) as caught:
            op @ x
        if refused:
            assert "method='autograd'" in str(caught.value), f"{kind}: {caught.value}"
        elif expected is FloatingPointError:
            assert f"batch {last}" in str(caught.value), f"{kind}: {caught.value} does not name batch {last}"
        assert_state_unchanged(
            before, problem.model, f"after a failed {kind} product ({caught.type.__name__})"
        )
