"""Tests of the dense references themselves (``references.py``) and of the case matrix.

The references are the oracle for every operator test, so they are checked from several
independent directions: symmetry, central finite differences of the gradient, closed forms for
linear models, PSD-ness of the GGN, an empirical Fisher rebuilt from separate per-term forward
passes, and curvlinops 3.0.1 where its conventions coincide with ours.

Tolerances (float64, unit roundoff u = 2⁻⁵³ ≈ 1.1e-16)
---------------------------------------------------------
- Two exact float64 computations of the same matrix by different operation orders
  (reference vs curvlinops, Hessian vs GGN of a linear model) differ by rounding only: each
  entry is a sum of K ≲ 10³ products, |error| ≲ K·u·(Σ|products|) and Σ|products| ≲ 10·max|A|
  for these small models, so ``DENSE_RTOL = 1e4·u ≈ 1.1e-12`` relative to max|A|. Measured:
  ≤ 5u. A real bug (a wrong block, a wrong batch weight) is ≥ 1e-3 relative.
- Finite differences: see :func:`fd_tolerance`.
- PSD: see :func:`test_ggn_is_psd`.

curvlinops 3.0.1 facts this file relies on (read from its source in the venv)
---------------------------------------------------------------------------
- Constructor ``Op(model_func, loss_func, params, data, *, check_deterministic=True,
  num_data=None, batch_size_fn=None, ...)``. ``model_func`` is called with ONE positional
  argument (``functional_call(model, params, (X,))``), so dict inputs go through a small
  adapter module calling ``model(**X)``; ``batch_size_fn`` is mandatory for dict inputs.
- It weights batch b by ``B_b / N`` (samples) for ``mean`` and by 1 for ``sum``. That is exact
  for unequal batch sizes whenever the mean normaliser is proportional to the number of samples
  (CE without ignored targets, MSE, BCE) - checked here on batches of 5, 3, 2 - but NOT for
  CE ``mean`` with ``ignore_index``, where the exact weight is (counted targets in b) /
  (counted targets overall): :func:`test_curvlinops_weights_ignore_index_batches_by_samples`.
- Its EF takes one term per output position for every loss (``(N, ..., C) -> (N·..., C)``);
  ours takes per-sample terms for MSE/BCE, so the EF is compared only where they coincide.
- Its Hessian (vmap over jvp(jacrev)) is wrong through LayerNorm; its GGN is right there.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.operators.cases import (
    CASES,
    NO_NORM_CASES,
    SMOOTH_CASES,
    TINY_LAST_BATCH_CASES,
    Case,
    LossWithReduction,
    call_model,
    case_ids,
    get_case,
    num_samples,
    trainable_params,
)
from tests.operators.references import (
    UNIT_ROUNDOFF,
    concat_batches,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    finite_difference_hessian,
    finite_difference_hvp,
    from_vector,
    loss_terms,
    num_params,
    to_vector,
    whole_dataset_gradient,
    whole_dataset_loss,
)

u = UNIT_ROUNDOFF
DENSE_RTOL = 1e4 * u  # see module docstring


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this module single-threaded, restoring the thread count afterwards.

    Every tensor here is tiny, so intra-op parallelism only adds synchronisation; on a loaded
    2-core machine 2 threads made the dense Hessians 10-50× slower than 1 thread (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    """max|actual - expected| ≤ rtol · max|expected| (a norm-wise, not entry-wise, test)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, (
        f"{what}: max|Δ| = {err:.3e} > {rtol:.1e} · {scale:.3e} (rel {err / scale:.2e})"
    )


# --------------------------------------------------------------------------- cached refs
@dataclass
class Refs:
    """One case built once, with its dense reference matrices (cached per case id)."""

    case: Case
    model: nn.Module
    loss_fn: LossWithReduction
    data: list
    params: list
    H: Tensor
    G: Tensor
    J: Tensor
    H_out: Tensor
    EF: Tensor


@functools.cache
def refs(case_id: str) -> Refs:
    """Build case ``case_id`` and its references (cached: they are reused by several tests)."""
    case = get_case(case_id)
    model, loss_fn, data = case.make()
    params = trainable_params(model)
    H = dense_hessian(model, loss_fn, data, params)
    G, J, H_out = dense_ggn(model, loss_fn, data, params, return_factors=True)
    EF = dense_empirical_fisher(model, loss_fn, data, params)
    return Refs(case, model, loss_fn, data, params, H, G, J, H_out, EF)


def _params_unchanged(r: Refs) -> None:
    """The cached matrices are only valid while nobody moved the parameters."""
    fresh = trainable_params(r.case.make()[0])
    assert all(torch.equal(a, b) for a, b in zip(r.params, fresh)), "a test left the parameters shifted"


# --------------------------------------------------------------------------- the case matrix
def test_case_matrix_properties():
    """Ids unique, D in range, float64, unequal batches, required coverage present."""
    assert len(set(case_ids(CASES))) == len(CASES)
    for case in CASES:
        model, loss_fn, data = case.make()
        D = num_params(trainable_params(model))
        assert 10 <= D <= 400, (case.id, D)
        assert all(p.dtype == torch.float64 for p in model.parameters()), case.id
        sizes = [num_samples(x) for x, _ in data]
        assert tuple(sizes) == case.batch_sizes, (case.id, sizes)
        assert len(set(sizes)) == len(sizes), (case.id, sizes)
        x0 = data[0][0]
        assert isinstance(x0, Mapping) == case.dict_inputs, case.id
        ys = torch.cat([y for _, y in data])
        assert bool((ys == -100).any()) == case.ignored_targets, case.id
        out = call_model(model, x0)
        assert (out.ndim == 2) == case.output_2d, case.id
        assert not model.training, case.id
    # coverage the operator tests rely on
    assert TINY_LAST_BATCH_CASES
    assert all(c.batch_sizes[-1] == 1 for c in TINY_LAST_BATCH_CASES)
    assert any(c.tied for c in NO_NORM_CASES)
    assert any(c.dict_inputs for c in NO_NORM_CASES)
    assert any(c.has_norm for c in CASES)
    assert not any(c.has_norm for c in NO_NORM_CASES)
    assert len(SMOOTH_CASES) < len(CASES)
    losses = {(type(c.make()[1]).__name__, c.make()[1].reduction) for c in CASES}
    for name in ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"):
        assert {(name, "mean"), (name, "sum")} <= losses, name


@pytest.mark.parametrize("case", CASES[:3], ids=case_ids(CASES[:3]))
def test_case_is_deterministic(case):
    """Two builds are bit-identical and building does not consume the global RNG."""
    state = torch.get_rng_state()
    (m1, _, d1), (m2, _, d2) = case.make(), case.make()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    def flat(x):
        return torch.cat([v.reshape(-1).double() for v in x.values()]) if isinstance(x, Mapping) else x

    for (x1, y1), (x2, y2) in zip(d1, d2):
        assert torch.equal(flat(x1), flat(x2))
        assert torch.equal(y1, y2)


def test_tied_parameter_is_shared():
    """The tied case really uses one Parameter under two names, listed once."""
    model, _, _ = get_case("tied_embed-ce_mean").make()
    assert model.head.weight is model.emb.weight
    assert sum(p is model.emb.weight for p in trainable_params(model)) == 1


def test_vector_roundtrip():
    """from_vector inverts to_vector, row-major, and rejects wrong lengths."""
    model, _, _ = CASES[0].make()
    params = trainable_params(model)
    v = to_vector(params)
    assert v.shape == (num_params(params),)
    assert torch.equal(v[: params[0].numel()], params[0].detach().reshape(-1))
    assert all(torch.equal(a, b) for a, b in zip(from_vector(v, params), params))
    expected = rf"expected a vector of {v.numel()} entries, got shape \({v.numel() - 1},\)"
    with pytest.raises(ValueError, match=expected):
        from_vector(v[:-1], params)


# --------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_whole_dataset_loss_is_normaliser_weighted_sum_of_batches(case):
    """L = Σ_b (n_b / n) L_b for mean (n_b = the batch's share of the normaliser), Σ_b L_b for sum.

    n_b comes from the per-batch normaliser (1/c_b of :func:`loss_terms`), i.e. counted
    targets for CE with ignore_index, output elements for MSE/BCE. For ``mean`` the plain
    average of batch means must differ, otherwise the case could not catch a wrong weighting.
    """
    model, loss_fn, data = case.make()
    with torch.no_grad():
        L = whole_dataset_loss(model, loss_fn, data)
        batch_losses, normalisers = [], []
        for x, y in data:
            out = call_model(model, x)
            batch_losses.append(loss_fn(out, y))
            _, c_b = loss_terms(loss_fn, out, y)
            normalisers.append(1.0 / c_b)
    if loss_fn.reduction == "sum":
        expected = sum(batch_losses)
    else:
        n = sum(normalisers)
        expected = sum(L_b * (n_b / n) for L_b, n_b in zip(batch_losses, normalisers))
        naive = sum(batch_losses) / len(batch_losses)
        assert (naive - L).abs() > 1e-6 * L.abs(), "batch weighting would go unnoticed"
    # a handful of additions and one division per batch: ≲ 10 rounding errors, ×10 margin
    assert (expected - L).abs() <= 100 * u * sum(b.abs() for b in batch_losses), (float(expected), float(L))


# --------------------------------------------------------------------------- Hessian
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_dense_hessian_is_symmetric(case):
    """(D, D), finite, symmetric to rounding (dense_hessian also asserts this internally)."""
    r = refs(case.id)
    D = num_params(r.params)
    assert r.H.shape == (D, D)
    assert torch.isfinite(r.H).all()
    assert_close_rel(r.H.T, r.H, DENSE_RTOL, "Hᵀ vs H")


def fd_tolerance(fd_eps: Tensor, fd_2eps: Tensor, grad_scale: float, eps: float) -> float:
    """Bound on max|FD(ε) - exact| for central differences of a float64 gradient.

    Truncation: FD(ε) = H v + a ε² + O(ε⁴), so FD(2ε) - FD(ε) ≈ 3 a ε², and the truncation
    error of FD(ε) is ≈ max|FD(2ε) - FD(ε)| / 3 (Richardson); we allow 2× that estimate (the
    O(ε⁴) term is ~ε² ≈ 1e-8 times smaller than the estimate at ε = 1e-4).
    Rounding: each gradient carries an error ≲ κ·u·(gradient scale) with κ the growth of
    rounding through the backward pass; the difference divides it by 2ε, so ≲ κ·u·scale/ε.
    Measured κ ≈ 2 (error floor at ε = 1e-6 is 2e-10·scale); we take κ = 100. With ε = 1e-4
    truncation (≈1e-8 relative) dominates rounding (≈1e-10), so the bound is tight: a
    reference wrong by more than ~1e-8 relative fails.
    """
    truncation = (fd_2eps - fd_eps).abs().max().item() / 3
    rounding = 100 * u * grad_scale / eps
    return 2 * truncation + rounding


FD_EPS = 1e-4  # ≈ optimal step u^(1/3) ≈ 5e-6 times 20: truncation-dominated, see fd_tolerance


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOOTH_CASES, ids=case_ids(SMOOTH_CASES))
def test_hessian_columns_match_finite_differences(case):
    """Every column H e_i equals central differences of the whole-dataset gradient."""
    r = refs(case.id)
    fd1 = finite_difference_hessian(r.model, r.loss_fn, r.data, r.params, FD_EPS)
    fd2 = finite_difference_hessian(r.model, r.loss_fn, r.data, r.params, 2 * FD_EPS)
    _params_unchanged(r)
    g = whole_dataset_gradient(r.model, r.loss_fn, r.data, r.params)
    # gradient scale: |g| itself plus how much it moves per unit parameter step (|H|), since
    # the rounding of g is relative to the magnitudes summed into it, not to |g| alone
    scale = g.abs().max().item() + r.H.abs().max().item()
    tol = fd_tolerance(fd1, fd2, scale, FD_EPS)
    err = (fd1 - r.H).abs().max().item()
    assert err <= tol, f"max|FD - H| = {err:.3e} > tol {tol:.3e}"
    # the check must be discriminating: tolerance far below the Hessian's own scale
    assert tol < 1e-6 * r.H.abs().max().item()


@pytest.mark.parametrize("case", SMOOTH_CASES[:4], ids=case_ids(SMOOTH_CASES[:4]))
def test_finite_difference_hvp_random_direction(case):
    """H v for a random v (all blocks at once) agrees with finite differences."""
    r = refs(case.id)
    v = torch.randn(num_params(r.params), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fd1 = finite_difference_hvp(r.model, r.loss_fn, r.data, r.params, v, FD_EPS)
    fd2 = finite_difference_hvp(r.model, r.loss_fn, r.data, r.params, v, 2 * FD_EPS)
    _params_unchanged(r)
    g = whole_dataset_gradient(r.model, r.loss_fn, r.data, r.params)
    scale = g.abs().max().item() + (r.H @ v).abs().max().item()
    assert (fd1 - r.H @ v).abs().max().item() <= fd_tolerance(fd1, fd2, scale, FD_EPS)


# --------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_ggn_is_psd(case):
    """G = Jᵀ H_out J is PSD because every loss here is convex in the output.

    Computed G carries an error E with ‖E‖₂ ≲ (M + D)·u·‖J‖₂²·‖H_out‖₂ (two matmuls with inner
    dimensions M and D, plus eigvalsh's backward error ≲ D·u·‖G‖), so λ_min(G) ≥ -that bound.
    Measured: λ_min ≥ -0.02 × bound. H_out itself is PSD to M·u·‖H_out‖ likewise.
    """
    r = refs(case.id)
    M, D = r.J.shape
    assert r.H_out.shape == (M, M)
    assert r.G.shape == (D, D)
    eig_out = torch.linalg.eigvalsh(r.H_out)
    norm_out = eig_out.abs().max().item()
    assert eig_out.min().item() >= -10 * M * u * norm_out
    norm_J = torch.linalg.matrix_norm(r.J, 2).item()
    bound = (M + D) * u * norm_J**2 * norm_out
    assert torch.linalg.eigvalsh(r.G).min().item() >= -bound
    assert_close_rel(r.G.T, r.G, 0.0, "Gᵀ vs G")  # symmetrised exactly inside dense_ggn


LINEAR_CASES = [c for c in CASES if c.linear_in_params]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=case_ids(LINEAR_CASES))
def test_ggn_equals_hessian_for_linear_model(case):
    """Output linear in θ ⇒ ∇²_θ f = 0 ⇒ H = Jᵀ H_out J exactly (any loss)."""
    r = refs(case.id)
    assert_close_rel(r.G, r.H, DENSE_RTOL, "GGN vs Hessian")


def _wb_order(n_out: int, n_in: int) -> Tensor:
    """Permutation from the (k, i) layout of [W | b] (k*(n_in+1)+i) to our flat [W, b] order."""
    idx = []
    for k in range(n_out):
        idx += [k * n_in + i for i in range(n_in)] + [n_out * n_in + k]
    return torch.tensor(idx)


@pytest.mark.parametrize("case_id", ["linear-mse_mean", "linear-ce_sum"])
def test_hessian_closed_form_linear_models(case_id):
    """Closed forms, which also pin the flattening order ([W row-major, b]).

    MSE mean over N·K elements: H = (2/(N·K)) I_K ⊗ ΦᵀΦ, Φ = [X, 1].
    CE sum: H = Σ_n (diag p_n - p_n p_nᵀ) ⊗ φ_n φ_nᵀ, p_n = softmax(W x_n + b).
    """
    r = refs(case_id)
    lin = r.model[0]
    x, y = concat_batches(r.data)
    phi = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    K, N = lin.out_features, x.shape[0]
    if case_id.startswith("linear-mse"):
        H_wb = torch.kron(torch.eye(K, dtype=x.dtype), 2.0 / (N * K) * phi.T @ phi)
    else:
        with torch.no_grad():
            p = torch.softmax(lin(x), dim=1)
        H_wb = sum(
            torch.kron(torch.diag(p[n]) - torch.outer(p[n], p[n]), torch.outer(phi[n], phi[n]))
            for n in range(N)
        )
    order = _wb_order(K, lin.in_features)
    expected = torch.empty_like(H_wb)
    expected[order[:, None], order[None, :]] = H_wb
    assert_close_rel(r.H, expected, DENSE_RTOL, "Hessian vs closed form")
    assert_close_rel(r.G, expected, DENSE_RTOL, "GGN vs closed form")


# --------------------------------------------------------------------------- empirical Fisher
def _slice(inputs, n: int):
    return {k: v[n : n + 1] for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs[n : n + 1]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_empirical_fisher_matches_separate_per_term_passes(case):
    """EF rebuilt with one forward/backward per term, without the term/normaliser code.

    A term's loss ℓ_t is the user's loss switched to ``reduction="sum"`` on one sample (MSE,
    BCE) or on one sample with every other position's target set to ``ignore_index`` (CE);
    c is the ratio loss / sum-loss on the whole data set (1 for ``sum``). Independent of
    :func:`loss_terms` except through the conventions it is meant to encode.
    """
    r = refs(case.id)
    x, y = concat_batches(r.data)
    sum_loss = copy.deepcopy(r.loss_fn)
    sum_loss.reduction = "sum"
    with torch.no_grad():
        out = call_model(r.model, x)
        c = (r.loss_fn(out, y) / sum_loss(out, y)).item()
    D = num_params(r.params)
    EF = torch.zeros(D, D, dtype=torch.float64)
    is_ce = isinstance(r.loss_fn, nn.CrossEntropyLoss)
    for n in range(y.shape[0]):
        x_n, y_n = _slice(x, n), y[n : n + 1]
        positions = (
            list(torch.cartesian_prod(*[torch.arange(s) for s in y_n.shape]).reshape(-1, y_n.ndim))
            if is_ce
            else [None]
        )
        for pos in positions:
            if pos is not None:
                if y_n[tuple(pos)] == r.loss_fn.ignore_index:
                    continue
                target = torch.full_like(y_n, r.loss_fn.ignore_index)
                target[tuple(pos)] = y_n[tuple(pos)]
            else:
                target = y_n
            loss_t = sum_loss(call_model(r.model, x_n), target)
            g = to_vector(torch.autograd.grad(loss_t, r.params, allow_unused=True, materialize_grads=True))
            EF += torch.outer(g, g)
    EF *= c
    assert_close_rel(r.EF, EF, DENSE_RTOL, "EF vs per-term passes")
    # rank ≤ number of terms, PSD to rounding (outer products are PSD; summation error ≲ T·u)
    assert torch.linalg.eigvalsh(r.EF).min().item() >= -D * u * r.EF.abs().max().item() * 10


# --------------------------------------------------------------------------- curvlinops
class _PositionalAdapter(nn.Module):
    """curvlinops calls ``model(X)``; our dict-input models want ``model(**X)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return call_model(self.model, inputs)


def curvlinops_dense(op_name: str, r: Refs) -> Tensor:
    """The (D, D) matrix of curvlinops' ``op_name`` operator (op @ I) on case ``r``."""
    curvlinops = pytest.importorskip("curvlinops")
    op_cls = getattr(curvlinops, op_name)
    # check_deterministic=False: the cases are deterministic by construction (eval mode, no
    # dropout), and the check costs extra passes
    op = op_cls(
        _PositionalAdapter(r.model),
        r.loss_fn,
        r.params,
        r.data,
        check_deterministic=False,
        batch_size_fn=num_samples,
    )
    return op @ torch.eye(num_params(r.params), dtype=torch.float64)


def _curvlinops_weighting_exact(c: Case) -> bool:
    """curvlinops weights batches by B_b / N: exact unless CE mean with ignored targets."""
    return not (c.ignored_targets and get_case(c.id).make()[1].reduction == "mean")


HESS_CL_CASES = [c for c in NO_NORM_CASES if _curvlinops_weighting_exact(c)]
GGN_CL_CASES = [c for c in CASES if _curvlinops_weighting_exact(c)]
# our EF terms = curvlinops' per-position terms when the output is (N, C) or the loss is CE
EF_CL_CASES = [c for c in GGN_CL_CASES if c.output_2d or isinstance(c.make()[1], nn.CrossEntropyLoss)]


@pytest.mark.parametrize("case", HESS_CL_CASES, ids=case_ids(HESS_CL_CASES))
def test_hessian_matches_curvlinops(case):
    """Unequal batches (5, 3, 2 / 4, 3, 1), dict inputs, tied weights: all at rounding level."""
    r = refs(case.id)
    assert_close_rel(curvlinops_dense("HessianLinearOperator", r), r.H, DENSE_RTOL, "curvlinops Hessian")


@pytest.mark.parametrize("case", GGN_CL_CASES, ids=case_ids(GGN_CL_CASES))
def test_ggn_matches_curvlinops(case):
    """Includes the LayerNorm/BatchNorm cases: the GGN needs only first derivatives of the model."""
    r = refs(case.id)
    assert_close_rel(curvlinops_dense("GGNLinearOperator", r), r.G, DENSE_RTOL, "curvlinops GGN")


@pytest.mark.parametrize("case", EF_CL_CASES, ids=case_ids(EF_CL_CASES))
def test_empirical_fisher_matches_curvlinops(case):
    r = refs(case.id)
    assert_close_rel(curvlinops_dense("EFLinearOperator", r), r.EF, DENSE_RTOL, "curvlinops EF")


def test_curvlinops_weights_ignore_index_batches_by_samples():
    """Documents a curvlinops limitation: CE mean + ignore_index over unequal batches.

    curvlinops = Σ_b (B_b / N) · GGN(batch b, its own mean), which differs from the GGN of the
    whole-dataset mean (normalised by ALL counted targets) by percent. Our reference is the
    whole-dataset one; this test pins down exactly what curvlinops computes instead.
    """
    r = refs("attn_nonorm-ce_seq_ignore_mean")
    cl = curvlinops_dense("GGNLinearOperator", r)
    N = sum(num_samples(x) for x, _ in r.data)
    batch_weighted = sum(
        (num_samples(x) / N) * dense_ggn(r.model, r.loss_fn, [(x, y)], r.params) for x, y in r.data
    )
    assert_close_rel(cl, batch_weighted, DENSE_RTOL, "curvlinops vs sample-weighted batch GGNs")
    rel = ((cl - r.G).abs().max() / r.G.abs().max()).item()
    assert rel > 1e-3, f"curvlinops now matches the whole-dataset GGN (rel diff {rel:.1e}): update the docs"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="curvlinops 3.0.1 Hessian (vmap(jvp(jacrev))) is wrong through LayerNorm on torch 2.13; "
    "strict: an XPASS means it was fixed and LayerNorm cases can join the Hessian cross-check",
)
def test_curvlinops_hessian_through_layernorm():
    """Sum reduction, so batch weighting is exact and only the LayerNorm path differs (~3e-2)."""
    r = refs("transformer_ln-ce_seq_ignore_sum-tiny_last")
    assert_close_rel(
        curvlinops_dense("HessianLinearOperator", r), r.H, DENSE_RTOL, "curvlinops Hessian (LayerNorm)"
    )


# --------------------------------------------------------------------------- the vmap pitfall
class _LayerNormProbe(nn.Module):
    """0.5·‖layer_norm(x + inputs; w, b) - t‖² with the input x itself a parameter.

    Making x a parameter puts the weight/input cross block ∂²L/∂w∂x - the block torch.func
    gets wrong - inside an ordinary parameter Hessian.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = nn.Parameter(torch.randn(3, 6, dtype=torch.float64, generator=g))
        self.w = nn.Parameter(torch.randn(6, dtype=torch.float64, generator=g))
        self.b = nn.Parameter(torch.randn(6, dtype=torch.float64, generator=g))

    def forward(self, inputs: Tensor) -> Tensor:
        return F.layer_norm(self.x + inputs, (6,), self.w, self.b)


def _layer_norm_probe():
    model = _LayerNormProbe()
    g = torch.Generator().manual_seed(1)
    data = [(torch.zeros(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64, generator=g))]
    return model, nn.MSELoss(reduction="sum"), data


def test_dense_hessian_through_layer_norm_matches_finite_differences():
    """Plain double backward is right through layer_norm (including the w/x cross block)."""
    model, loss_fn, data = _layer_norm_probe()
    params = trainable_params(model)
    H = dense_hessian(model, loss_fn, data, params)
    fd1 = finite_difference_hessian(model, loss_fn, data, params, FD_EPS)
    fd2 = finite_difference_hessian(model, loss_fn, data, params, 2 * FD_EPS)
    g = whole_dataset_gradient(model, loss_fn, data, params)
    tol = fd_tolerance(fd1, fd2, g.abs().max().item() + H.abs().max().item(), FD_EPS)
    assert (fd1 - H).abs().max().item() <= tol


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="torch.func.hessian through F.layer_norm returns a wrong, non-symmetric w/x cross "
    "block on torch 2.13 (anchors.md). strict: an XPASS means torch fixed it - then vmap-based "
    "references and operators become trustworthy for LayerNorm again",
)
def test_torch_func_hessian_through_layer_norm():
    """torch.func.hessian should equal the (finite-difference-checked) double-backward Hessian.

    Written as the property we WANT with a strict xfail, rather than asserting the bug: it
    reads as a spec, fails the suite the day torch fixes the bug (XPASS → failure under
    strict), and ``raises=AssertionError`` keeps any other error from counting as the expected
    failure.
    """
    model, loss_fn, data = _layer_norm_probe()
    params = trainable_params(model)
    H = dense_hessian(model, loss_fn, data, params)
    names = [n for n, _ in model.named_parameters()]
    ((inputs, targets),) = data

    def loss_of(*flat_params: Tensor) -> Tensor:
        out = torch.func.functional_call(model, dict(zip(names, flat_params)), (inputs,))
        return loss_fn(out, targets)

    blocks = torch.func.hessian(loss_of, argnums=tuple(range(len(params))))(*[p.detach() for p in params])
    H_func = torch.cat(
        [
            torch.cat(
                [blocks[i][j].reshape(params[i].numel(), params[j].numel()) for j in range(len(params))], 1
            )
            for i in range(len(params))
        ],
        0,
    )
    assert_close_rel(H_func, H, DENSE_RTOL, "torch.func.hessian vs double backward")
