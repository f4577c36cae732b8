"""KFACOperator: the KFAC tutorial's test matrix (Dangel et al. 2025), closed forms, inverse,
curvlinops cross-check and bad input. float64 throughout.

Tolerances
----------
``EXACT_RTOL = 1e4·u`` (u = 2⁻⁵³ ≈ 1.1e-16), relative to the largest entry of the reference:
where KFAC is exact, ours and the reference are two exact float64 computations of the same
sums in different orders (Kronecker factors vs Jacobian products through autograd); their
rounding differs by ≲ (number of summands ≈ 10²) × (cancellation ≲ 10) × u per entry, so
1e4·u leaves a 10× margin, while a wrong normalisation or a missing cross term is O(1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator
from curvops.operators.kfac import KFACOperator

DTYPE = torch.float64
U = torch.finfo(DTYPE).eps / 2
EXACT_RTOL = 1e4 * U


# --------------------------------------------------------------------------- helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def block_mask(op) -> torch.Tensor:
    """Boolean (D, D) mask of the operator's diagonal blocks (parameter groups of ``op.blocks``)."""
    offsets = np.cumsum([0] + op.param_numels)
    mask = torch.zeros(op.shape, dtype=torch.bool)
    for block in op.blocks:
        idx = torch.cat(
            [torch.arange(offsets[i], offsets[i + 1]) for i in (block.weight, block.bias) if i is not None]
        )
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    return mask


def _seeded(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=gen, dtype=DTYPE)


def mlp(sizes, act: nn.Module | None, seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if act is not None and i < len(sizes) - 2:
            layers.append(act)
    return nn.Sequential(*layers).to(DTYPE).eval()


def regression_data(in_shape, out_shape, sizes=(5, 3, 2), seed=1):
    randn = _seeded(seed)
    return [(randn(n, *in_shape), randn(n, *out_shape)) for n in sizes]


def classification_data(in_dim, classes, sizes=(5, 3, 2), seed=1):
    randn = _seeded(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return [(randn(n, in_dim), torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


class MeanOverSequence(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


# =========================================================================== exactness
ACTS = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "relu": nn.ReLU()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", list(ACTS))
def test_single_datum_mlp_equals_ggn_and_ef_blocks(act, loss, reduction):
    model = mlp([4, 5, 3], ACTS[act], seed=2)
    if loss == "mse":
        loss_fn, data = nn.MSELoss(reduction=reduction), regression_data((4,), (3,), sizes=(1,))
    else:
        loss_fn, data = nn.CrossEntropyLoss(reduction=reduction), classification_data(4, 3, sizes=(1,))
    for separate in (False, True):
        K = KFACOperator(model, loss_fn, data, separate_weight_and_bias=separate)
        mask = block_mask(K)
        ggn = GGNOperator(model, loss_fn, data).to_dense()
        assert _rel(K.to_dense(), ggn * mask) <= EXACT_RTOL
        E = KFACOperator(model, loss_fn, data, fisher_type="empirical", separate_weight_and_bias=separate)
        ef = FisherOperator(model, loss_fn, data, kind="empirical").to_dense()
        assert _rel(E.to_dense(), ef * mask) <= EXACT_RTOL
    # Cross terms are really there in the joint block and absent with separate blocks.
    assert int(block_mask(KFACOperator(model, loss_fn, data)).sum()) > int(mask.sum())


def test_single_datum_mc_equals_mc_fisher_blocks():
    # Same seed => the same label draws as FisherOperator(kind="mc"), so exact equality.
    model = mlp([4, 5, 3], nn.Tanh(), seed=3)
    data = classification_data(4, 3, sizes=(1,))
    K = KFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type="mc", mc_samples=3, seed=7)
    fisher = FisherOperator(model, nn.CrossEntropyLoss(), data, kind="mc", mc_samples=3, seed=7).to_dense()
    assert _rel(K.to_dense(), fisher * block_mask(K)) <= EXACT_RTOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_network_equals_ggn_blocks(reduction):
    # Unequal batches (5, 3, 2): a per-batch instead of whole-dataset normalisation breaks this.
    model = mlp([4, 5, 6, 3], None, seed=4)
    data = regression_data((4,), (3,))
    K = KFACOperator(model, nn.MSELoss(reduction=reduction), data)
    ggn = GGNOperator(model, nn.MSELoss(reduction=reduction), data).to_dense()
    assert _rel(K.to_dense(), ggn * block_mask(K)) <= EXACT_RTOL
    # Nonlinear networks with several data points: KFAC is an approximation (sanity: it is not exact).
    nonlinear = mlp([4, 5, 6, 3], nn.Tanh(), seed=4)
    K2 = KFACOperator(nonlinear, nn.MSELoss(reduction=reduction), data)
    assert (
        _rel(
            K2.to_dense(),
            GGNOperator(nonlinear, nn.MSELoss(reduction=reduction), data).to_dense() * block_mask(K2),
        )
        > 1e-4
    )


def test_deep_linear_sequence_expand_equals_ggn_blocks():
    # Weight sharing: inputs (N, T, in), the loss on every position.
    model = mlp([4, 5, 3], None, seed=5)
    data = regression_data((6, 4), (6, 3))
    K = KFACOperator(model, nn.MSELoss(), data, kfac_approx="expand")
    ggn = GGNOperator(model, nn.MSELoss(), data).to_dense()
    assert _rel(K.to_dense(), ggn * block_mask(K)) <= EXACT_RTOL
    R = KFACOperator(model, nn.MSELoss(), data, kfac_approx="reduce")
    assert _rel(R.to_dense(), ggn * block_mask(R)) > 1e-3  # reduce is the wrong one here


def test_deep_linear_sequence_reduce_equals_ggn_blocks():
    # The shared dimension is averaged before the loss.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), MeanOverSequence(), nn.Linear(6, 3)).to(DTYPE)
    data = regression_data((7, 4), (3,))
    K = KFACOperator(model, nn.MSELoss(reduction="sum"), data, kfac_approx="reduce")
    ggn = GGNOperator(model, nn.MSELoss(reduction="sum"), data).to_dense()
    assert _rel(K.to_dense(), ggn * block_mask(K)) <= EXACT_RTOL
    X = KFACOperator(model, nn.MSELoss(reduction="sum"), data, kfac_approx="expand")
    assert _rel(X.to_dense(), ggn * block_mask(X)) > 1e-3


def _conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(DTYPE)


def test_conv_reduce_equals_ggn_block_of_last_layer():
    model = _conv_net(7)
    data = regression_data((2, 6, 6), (4,))
    params = [p for n, p in model.named_parameters() if n.startswith("2.")]
    K = KFACOperator(model, nn.MSELoss(), data, kfac_approx="reduce")
    ggn = GGNOperator(model, nn.MSELoss(), data, params=params).to_dense()
    last = torch.cat([torch.full((p.numel(),), i in (2, 3)) for i, p in enumerate(K.params)])
    assert _rel(K.to_dense()[last][:, last], ggn) <= EXACT_RTOL
    # The same through the params= selection: the operator over the last layer alone.
    K_last = KFACOperator(model, nn.MSELoss(), data, kfac_approx="reduce", params="2.*")
    assert _rel(K_last.to_dense(), ggn) <= EXACT_RTOL


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv_padding_variants_single_datum(padding_mode):
    # One datum, one conv layer on the output: exact (covers "same" padding and padding modes).
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode=padding_mode), nn.Flatten()
    ).to(DTYPE)
    data = regression_data((2, 5, 5), (75,), sizes=(1,))
    # expand with a per-location loss and a linear layer: rows are independent, KFAC is exact
    K = KFACOperator(model, nn.MSELoss(), data)
    assert _rel(K.to_dense(), GGNOperator(model, nn.MSELoss(), data).to_dense()) <= EXACT_RTOL


class ChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_conv_map_with_elementwise_loss_needs_channels_last(loss_fn):
    # MSE/BCE columns run over the output's last dimension. On a Conv2d's (N, C, H, W) map that
    # is a spatial dimension: the columns couple the channels of every location, so G would be
    # wrong even for one conv layer under MSE (where KFAC-expand is exact) — refused.
    torch.manual_seed(10)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    data = [(x, y.sigmoid()) for x, y in regression_data((2, 4, 4), (3, 4, 4), sizes=(2, 1))]
    with pytest.raises(ValueError, match=r"last dimension is spatial.*channels last.*fisher_type='mc'"):
        KFACOperator(nn.Sequential(conv), loss_fn, data)
    KFACOperator(nn.Sequential(conv), loss_fn, data, fisher_type="mc")  # independent draws per entry: fine
    # Channels last: the last dimension is the feature dimension; with MSE (constant Hessian)
    # one conv layer is exact for any number of data.
    model = nn.Sequential(conv, ChannelsLast())
    data_last = [(x, y.permute(0, 2, 3, 1)) for x, y in data]
    K = KFACOperator(model, loss_fn, data_last)
    if isinstance(loss_fn, nn.MSELoss):
        assert _rel(K.to_dense(), GGNOperator(model, loss_fn, data_last).to_dense()) <= EXACT_RTOL


def test_mc_converges_to_type2():
    model = mlp([4, 5, 3], nn.Tanh(), seed=9)
    data = classification_data(4, 3)
    exact = KFACOperator(model, nn.CrossEntropyLoss(), data)
    errors = {}
    for m in (16, 1024):
        mc = KFACOperator(model, nn.CrossEntropyLoss(), data, fisher_type="mc", mc_samples=m, seed=0)
        errors[m] = max(float((a.G - b.G).norm() / b.G.norm()) for a, b in zip(mc.blocks, exact.blocks))
        for a, b in zip(mc.blocks, exact.blocks):
            assert torch.equal(a.A, b.A)  # sampling touches G only
    # A Monte-Carlo mean of m draws has relative error ≈ σ/√m: 64× the draws should cut the
    # error ≈ 8×; we require ≥ 3× (a fixed seed makes this deterministic, the 8/3 margin covers
    # the spread of one realisation) and ≤ 5% absolute at m = 1024 (σ ≈ 0.5 here).
    assert errors[1024] < errors[16] / 3
    assert errors[1024] < 0.05


def test_inplace_activation_after_layer():
    # ReLU(inplace=True) overwrites the layer output; the factors must not see the change.
    model = mlp([4, 5, 3], nn.ReLU(inplace=True), seed=2)
    reference = mlp([4, 5, 3], nn.ReLU(), seed=2)
    data = classification_data(4, 3, sizes=(1,))
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    ggn = GGNOperator(reference, nn.CrossEntropyLoss(), data).to_dense()
    assert _rel(K.to_dense(), ggn * block_mask(K)) <= EXACT_RTOL


def test_ce_ignore_index_sequence_logits_normalisation():
    # (N, C, T) logits with ignore_index, unequal batches: the mean normaliser is the number of
    # counted targets of the whole data set (here 2 + 3 = 5 of 8), and ignored positions add
    # nothing to G. Checked against the sum reduction and against dropping the ignored rows.
    torch.manual_seed(10)

    class SeqNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).transpose(1, 2)  # (N, C, T)

    model = SeqNet().to(DTYPE)
    randn = _seeded(11)
    data = [
        (randn(1, 4, 4), torch.tensor([[0, -100, 2, -100]])),
        (randn(1, 4, 4), torch.tensor([[1, 1, -100, 0]])),
    ]
    K = KFACOperator(model, nn.CrossEntropyLoss(ignore_index=-100), data)
    K_sum = KFACOperator(model, nn.CrossEntropyLoss(ignore_index=-100, reduction="sum"), data)
    assert _rel(K.to_dense() * 5, K_sum.to_dense()) <= EXACT_RTOL
    counted = [(x[:, t : t + 1], y[:, t : t + 1]) for x, y in data for t in range(4) if y[0, t] != -100]
    K_counted = KFACOperator(model, nn.CrossEntropyLoss(reduction="sum"), counted)
    assert _rel(K_sum.blocks[0].G, K_counted.blocks[0].G) <= EXACT_RTOL
    # ... while A averages over all 8 rows, ignored ones included (documented limitation).
    rows = torch.cat([x.reshape(-1, 4) for x, _ in data])
    rows = torch.cat([rows, torch.ones(8, 1, dtype=DTYPE)], dim=1)
    assert _rel(K.blocks[0].A, rows.T @ rows / 8) <= EXACT_RTOL


# =========================================================================== closed forms
@pytest.fixture(scope="module")
def small_kfac():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(DTYPE)
    torch.manual_seed(12)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    gen = torch.Generator().manual_seed(13)
    data = [
        (torch.randn(n, 2, 4, 4, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen))
        for n in (4, 3)
    ]
    return {
        sep: KFACOperator(model, nn.CrossEntropyLoss(), data, separate_weight_and_bias=sep)
        for sep in (False, True)
    }


@pytest.mark.parametrize("separate", [False, True])
def test_closed_forms_match_dense(small_kfac, separate):
    K = small_kfac[separate]
    dense = K.to_dense()
    # Closed forms vs dense linear algebra on the same matrix: rounding of a D≈100 eigensolver,
    # ≲ D·u·‖K‖ ≈ 1e-14 relative; 1e4·u as above.
    assert abs(float(K.trace()) - float(torch.trace(dense))) <= EXACT_RTOL * float(dense.abs().sum())
    assert math.isclose(float(K.frobenius_norm()), float(torch.linalg.matrix_norm(dense)), rel_tol=EXACT_RTOL)
    assert _rel(K.diagonal(), torch.diagonal(dense)) <= EXACT_RTOL
    evals = torch.linalg.eigvalsh(dense)
    assert float((K.eigenvalues() - evals).abs().max()) <= 1e3 * EXACT_RTOL * float(evals.abs().max())
    for delta in (1e-3, 0.5):
        ref = torch.linalg.slogdet(dense + delta * torch.eye(dense.shape[0], dtype=DTYPE))
        assert ref.sign > 0
        # logdet sums D ≈ 100 logs, each off by ≲ cond·u for its eigenvalue (cond ≲ ‖K‖/δ ≈ 10³):
        # ≲ 1e-11 absolute; 1e-9 leaves margin, a wrong block would be O(1).
        assert abs(float(K.logdet(delta)) - float(ref.logabsdet)) <= 1e-9 * max(
            1.0, abs(float(ref.logabsdet))
        )
    assert float(K.logdet()) == -math.inf or math.isfinite(float(K.logdet()))


@pytest.mark.parametrize("separate", [False, True])
def test_exact_inverse(small_kfac, separate):
    K = small_kfac[separate]
    delta = 1e-2
    inv = K.inverse(delta)
    gen = torch.Generator().manual_seed(14)
    V = torch.randn(K.shape[0], 3, generator=gen, dtype=DTYPE)
    # (K + δI) K⁻¹ V = V; error ≲ cond(K + δI)·u·‖V‖ with cond ≲ (‖K‖ + δ)/δ ≈ 1e2..1e3.
    back = K @ (inv @ V) + delta * (inv @ V)
    assert float((back - V).abs().max()) <= 1e6 * U * float(V.abs().max())
    # numpy in, numpy out; matvec and matmat, scipy semantics
    v = V[:, 0].numpy()
    assert isinstance(inv @ v, np.ndarray)
    assert isinstance(inv.matvec(v), np.ndarray)
    assert np.allclose(inv.matmat(V.numpy()), (inv @ V).numpy(), rtol=1e-13, atol=0)
    dense_inv = torch.linalg.inv(K.to_dense() + delta * torch.eye(K.shape[0], dtype=DTYPE))
    assert _rel(inv.to_dense(), dense_inv) <= 1e6 * U
    # scipy solvers accept both operators
    x, info = sla.cg(K + delta * sla.aslinearoperator(np.eye(K.shape[0])), v, M=inv, rtol=1e-12)
    assert info == 0
    assert np.allclose(x, inv @ v, rtol=1e-8, atol=1e-10)


def test_factorwise_inverses():
    # Single bias-free layer: the block is exactly kron(G, A) (no permutation), so the
    # factor-wise inverses can be written down densely.
    model = mlp([4, 3], None, seed=15, bias=False)
    data = classification_data(4, 3)
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    (block,) = K.blocks
    eye_g, eye_a = torch.eye(3, dtype=DTYPE), torch.eye(4, dtype=DTYPE)
    assert _rel(K.to_dense(), torch.kron(block.G, block.A)) <= EXACT_RTOL
    delta = 0.3
    pi = math.sqrt((float(torch.trace(block.A)) / 4) / (float(torch.trace(block.G)) / 3))
    expected = {
        "plain": torch.kron(
            torch.linalg.inv(block.G + delta**0.5 * eye_g), torch.linalg.inv(block.A + delta**0.5 * eye_a)
        ),
        "pi": torch.kron(
            torch.linalg.inv(block.G + delta**0.5 / pi * eye_g),
            torch.linalg.inv(block.A + pi * delta**0.5 * eye_a),
        ),
    }
    for method, ref in expected.items():
        assert _rel(K.inverse(delta, method=method).to_dense(), ref) <= 1e3 * EXACT_RTOL
    # torch vector in, torch out
    v = torch.randn(12, dtype=DTYPE)
    assert torch.is_tensor(K.inverse(delta, method="pi") @ v)


def test_works_with_scipy_and_library_algorithms(small_kfac):
    K = small_kfac[False]
    top = np.sort(sla.eigsh(K, k=3, which="LA", return_eigenvectors=False))
    ref = K.eigenvalues()[-3:].numpy()
    assert np.allclose(top, ref, rtol=1e-10)
    assert K.device == torch.device("cpu")
    assert K.torch_dtype == DTYPE
    assert K.matmat_torch(torch.eye(K.shape[0], dtype=DTYPE)[:, :5]).shape == (K.shape[0], 5)
    from curvops import algorithms

    result = algorithms.lanczos(K, k=3, which="LA", seed=0)
    got = np.sort(np.asarray(torch.as_tensor(result.eigenvalues)))
    assert np.allclose(got, ref, rtol=1e-8)


# =========================================================================== curvlinops
def _curvlinops_dense(cls_name, model, loss_fn, data, params, **kwargs):
    curvlinops = pytest.importorskip("curvlinops")
    op = getattr(curvlinops, cls_name)(model, loss_fn, params, data, check_deterministic=False, **kwargs)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=DTYPE)


@pytest.mark.parametrize(
    ("name", "fisher_type", "approx", "separate"),
    [
        ("mlp_ce_mean", "type-2", "expand", False),
        ("mlp_ce_mean", "empirical", "expand", True),
        ("mlp_mse_sum", "type-2", "expand", False),
        ("cnn_ce_mean", "type-2", "expand", False),
        ("cnn_ce_mean", "type-2", "reduce", True),
        ("seq_mse_mean", "type-2", "expand", False),
    ],
)
def test_agrees_with_curvlinops(name, fisher_type, approx, separate):
    """curvlinops' KFACLinearOperator in the matching configuration.

    Conventions: curvlinops orders vectors like the ``params`` list it is given (we pass
    ours, i.e. ``named_parameters()`` order), flattens each parameter row-major like us,
    defaults to separate weight/bias blocks (we default to joint ones: both are compared
    explicitly) and to the MC Fisher with its own sampler (only the deterministic types are
    compared). Batches of 5, 3, 2: both normalise by the whole data set.
    """
    if name.startswith("mlp"):
        model = mlp([4, 5, 3], nn.Tanh(), seed=16)
        data = classification_data(4, 3) if "ce" in name else regression_data((4,), (3,))
    elif name.startswith("cnn"):
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
        ).to(DTYPE)
        gen = torch.Generator().manual_seed(17)
        data = [
            (torch.randn(n, 2, 5, 5, generator=gen, dtype=DTYPE), torch.randint(0, 4, (n,), generator=gen))
            for n in (5, 3, 2)
        ]
    else:
        model = mlp([4, 5, 3], nn.Tanh(), seed=18)
        data = regression_data((6, 4), (6, 3))
    loss_fn = (
        nn.CrossEntropyLoss() if "ce" in name else nn.MSELoss(reduction="sum" if "sum" in name else "mean")
    )
    K = KFACOperator(
        model, loss_fn, data, fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=separate
    )
    theirs = _curvlinops_dense(
        "KFACLinearOperator",
        model,
        loss_fn,
        data,
        K.params,
        fisher_type=fisher_type,
        kfac_approx=approx,
        separate_weight_and_bias=separate,
    )
    assert _rel(K.to_dense(), theirs) <= EXACT_RTOL


# =========================================================================== bad input
class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.a(x)), self.a.weight)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, idx):
        return self.fc(self.norm(self.emb(idx)))


def _cls_data(in_dim=3, classes=3):
    return classification_data(in_dim, classes, sizes=(4, 2))


def test_unsupported_layers_are_named_or_excluded():
    model = WithNorm().to(DTYPE)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 5, (4,), generator=gen), torch.randint(0, 2, (4,), generator=gen))]
    with pytest.raises(ValueError, match=r"emb\.weight \(Embedding\).*norm\.weight \(LayerNorm\)"):
        KFACOperator(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match=r"norm\.bias"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, params=["norm.*", "fc.*"])
    K = KFACOperator(model, nn.CrossEntropyLoss(), data, unsupported="exclude")
    assert K.param_names == ["fc.weight", "fc.bias"]
    assert K.excluded_params == ["emb.weight", "norm.weight", "norm.bias"]
    with pytest.raises(ValueError, match="no selected parameter"):
        KFACOperator(model, nn.CrossEntropyLoss(), data, params="norm.*", unsupported="exclude")


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (TwoCalls(), "called more than once"),
        (Tied(), r"shared by several layers"),
        (FunctionalReuse(), r"gradient of parameter 'a\.weight' is not that of its layer"),
        (nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(18, 3)), "groups=2"),
    ],
)
def test_structural_errors(model, match):
    model = model.to(DTYPE)
    if isinstance(model, nn.Sequential):
        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(2, 2, 3, 3, generator=gen, dtype=DTYPE), torch.tensor([0, 1]))]
    else:
        data = _cls_data()
    with pytest.raises(ValueError, match=match):
        KFACOperator(model, nn.CrossEntropyLoss(), data)


def test_functional_layer_is_reported():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].mean(1)

    model = Attn().to(DTYPE).eval()
    data = regression_data((3, 4), (4,), sizes=(2,))
    with pytest.raises(ValueError, match="in_proj_weight"):  # a bare Parameter of the MHA module
        KFACOperator(model, nn.MSELoss(), data)
    with pytest.raises(ValueError, match=r"attn\.out_proj.*not called through their forward"):
        KFACOperator(model, nn.MSELoss(), data, params="attn.out_proj.*")


def test_bad_options_and_losses():
    model = mlp([3, 4, 3], nn.Tanh())
    data = _cls_data()
    ce = nn.CrossEntropyLoss()
    for kwargs, exc, match in [
        ({"fisher_type": "type-1"}, ValueError, "fisher_type"),
        ({"kfac_approx": "shrink"}, ValueError, "kfac_approx"),
        ({"mc_samples": 0, "fisher_type": "mc"}, ValueError, "mc_samples"),
        ({"mc_samples": 4}, ValueError, "mc_samples"),
        ({"unsupported": "ignore"}, ValueError, "unsupported"),
    ]:
        with pytest.raises(exc, match=match):
            KFACOperator(model, ce, data, **kwargs)
    custom = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    for fisher_type in ("type-2", "mc"):
        with pytest.raises(ValueError, match="nn.CrossEntropyLoss, nn.MSELoss"):
            KFACOperator(model, custom, data, fisher_type=fisher_type)
    with pytest.raises(ValueError, match="reduction"):
        KFACOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    # a custom loss is fine for the empirical Fisher: it only needs the gradient
    E = KFACOperator(model, custom, data, fisher_type="empirical")
    assert _rel(E.to_dense(), KFACOperator(model, ce, data, fisher_type="empirical").to_dense()) <= EXACT_RTOL


def test_bad_damping():
    K = KFACOperator(
        mlp([3, 2], None, bias=False), nn.CrossEntropyLoss(), classification_data(3, 2, sizes=(1,))
    )
    for method in ("pi", "plain"):
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match="damping"):
                K.inverse(bad, method=method)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1e-3)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(float("nan"))
    with pytest.raises(TypeError, match="damping"):
        K.inverse("0.1")
    with pytest.raises(ValueError, match="singular"):
        K.inverse(0.0)  # one datum, rank-1 factors
    with pytest.raises(ValueError, match="method"):
        K.inverse(0.1, method="cholesky")
    with pytest.raises(ValueError, match="damping"):
        K.logdet(-1.0)
    assert float(K.logdet()) == -math.inf
    # vector checks come from the base class
    with pytest.raises(ValueError, match="shape"):
        K @ torch.ones(K.shape[0] + 1, dtype=DTYPE)
    with pytest.raises(TypeError, match="dtype"):
        K.inverse(0.1) @ torch.ones(K.shape[0], dtype=torch.float32)


# =========================================================================== the operator's contract
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("separate", [False, True])
def test_out_is_written_in_place(small_kfac, separate, k):
    """``matmat_torch(X, out=...)`` returns ``out`` holding ``K X`` and touches nothing else:
    rows of a larger buffer (a Lanczos basis: contiguous rows) and a column-major block."""
    K = small_kfac[separate]
    dim = K.shape[0]
    X = torch.randn(dim, k, generator=torch.Generator().manual_seed(30 + k), dtype=DTYPE)
    expected = K @ X
    buffer = torch.full((k + 2, dim), float("nan"), dtype=DTYPE)
    out = buffer[1 : 1 + k].T
    assert K.matmat_torch(X, out=out) is out
    assert torch.equal(out, expected)  # the same arithmetic, whichever destination
    assert torch.isnan(buffer[0]).all()
    assert torch.isnan(buffer[-1]).all()
    column_major = torch.full((dim, k), float("nan"), dtype=DTYPE)
    assert K.matmat_torch(X, out=column_major) is column_major
    assert torch.equal(column_major, expected)
    # one vector (2-D matrix products, not batched ones: rounding apart) agrees with the block
    assert _rel(K @ X[:, 0], expected[:, 0]) <= EXACT_RTOL
    assert torch.equal(K.matvec(X[:, 0]), K @ X[:, 0])


def test_symmetric_transpose_and_parameter_lists(small_kfac):
    K = small_kfac[False]
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(31), dtype=DTYPE)
    assert K.T is K
    assert K.H is K
    assert K.is_symmetric
    assert K.is_positive_semidefinite
    assert np.array_equal(K.rmatvec(v.numpy()), K.matvec(v.numpy()))
    out = K @ list(K.unflatten(v).values())
    assert torch.equal(K.flatten(out), K @ v)


def test_eigendecomposition_reconstructs_the_factors(small_kfac):
    K = small_kfac[False]
    for block, eig in zip(K.blocks, K.eigendecomposition()):
        assert eig.name == block.name
        assert eig.param_names == block.param_names
        G = eig.G_eigenvectors @ torch.diag(eig.G_eigenvalues) @ eig.G_eigenvectors.T
        A = eig.A_eigenvectors @ torch.diag(eig.A_eigenvalues) @ eig.A_eigenvectors.T
        # eigh's backward error: ≲ dim·u·‖F‖ with dim ≤ 13
        assert _rel(G, block.G) <= EXACT_RTOL
        assert _rel(A, block.A) <= EXACT_RTOL


def test_loss_and_gradient_is_the_objectives(small_kfac):
    """The objective (model, data, normalisation) is that of every curvature operator."""
    K = small_kfac[False]
    ggn = GGNOperator(K.model, nn.CrossEntropyLoss(), K.data)
    loss, grad = K.loss_and_gradient()
    loss_ref, grad_ref = ggn.loss_and_gradient()
    assert torch.equal(loss, loss_ref)
    assert torch.equal(grad, grad_ref)
    assert (K.num_batches, K.normaliser, K.scale) == (ggn.num_batches, ggn.normaliser, ggn.scale)


def test_overflowing_products_are_reported():
    # Finite input, finite factors, a product beyond float64's range: the product is
    # refused, naming the Kronecker factors (no data pass can be blamed).
    model = mlp([3, 2], None, seed=32)
    data = [(1e3 * x, y) for x, y in regression_data((3,), (2,), sizes=(4,))]  # A's entries ≈ 1e6
    K = KFACOperator(model, nn.MSELoss(), data)
    huge = torch.full((K.shape[0],), 1e308, dtype=DTYPE)
    with pytest.raises(FloatingPointError, match="Kronecker-factored product overflowed"):
        K @ huge
    with pytest.raises(FloatingPointError, match="inverse product overflowed"):
        K.inverse(1e-12) @ huge


# =========================================================================== KroneckerOperator
def _layout_dense(op, blocks_dense):
    """The dense (D, D) matrix of a KroneckerOperator from each block's dense [W | b] matrix."""
    offsets = np.cumsum([0] + op.param_numels)
    dense = torch.zeros(op.shape, dtype=DTYPE)
    for (weight, bias), B in zip(op.positions, blocks_dense):
        anchor = weight if weight is not None else bias
        out = op.param_shapes[anchor][0]
        cols = []
        if weight is not None:
            cols.append(torch.arange(op.param_numels[weight]).reshape(out, -1) + int(offsets[weight]))
        if bias is not None:
            cols.append(torch.arange(out).reshape(out, 1) + int(offsets[bias]))
        idx = torch.cat(cols, dim=1).reshape(-1)
        dense[idx.unsqueeze(1), idx.unsqueeze(0)] = B
    return dense


def test_kronecker_operator_from_factors_and_eigen_forms():
    """A KroneckerOperator built by hand: products, closed forms and inverse against dense
    linear algebra (rounding of D ≈ 40 eigen-solves: 1e4·u relative, as above)."""
    from curvops.operators.kronecker import KroneckerEigenForm, KroneckerFactors, KroneckerOperator

    randn = _seeded(33)

    def spd(n):
        M = randn(n, n)
        return M @ M.T + 0.1 * torch.eye(n, dtype=DTYPE)

    # parameters: a (3, 4) weight with its bias (joint), a conv-shaped (2, 1, 2, 2) weight
    # alone, and a (2,) bias alone in eigen form
    shapes = [torch.Size([3, 4]), torch.Size([3]), torch.Size([2, 1, 2, 2]), torch.Size([2])]
    Q = torch.linalg.qr(randn(2, 2)).Q
    D = randn(2, 1).square()
    forms = [
        KroneckerFactors(spd(3), spd(5)),
        KroneckerFactors(spd(2), spd(4)),
        KroneckerEigenForm(Q, torch.ones(1, 1, dtype=DTYPE), D),
    ]
    op = KroneckerOperator(
        ["a.weight", "a.bias", "c.weight", "b"],
        shapes,
        [(0, 1), (2, None), (None, 3)],
        forms,
        DTYPE,
        torch.device("cpu"),
    )
    dense_blocks = [
        torch.kron(forms[0].G, forms[0].A),
        torch.kron(forms[1].G, forms[1].A),
        Q @ torch.diag(D[:, 0]) @ Q.T,
    ]
    dense = _layout_dense(op, dense_blocks)
    assert _rel(op.to_dense(), dense) <= EXACT_RTOL
    X = randn(op.shape[0], 2)
    assert _rel(op @ X, dense @ X) <= EXACT_RTOL
    assert isinstance(op @ X[:, 0].numpy(), np.ndarray)
    assert math.isclose(float(op.trace()), float(torch.trace(dense)), rel_tol=EXACT_RTOL)
    assert math.isclose(
        float(op.frobenius_norm()), float(torch.linalg.matrix_norm(dense)), rel_tol=EXACT_RTOL
    )
    assert _rel(op.diagonal(), torch.diagonal(dense)) <= EXACT_RTOL
    evals = torch.linalg.eigvalsh(dense)
    assert _rel(op.eigenvalues(), evals) <= EXACT_RTOL
    eye = torch.eye(op.shape[0], dtype=DTYPE)
    assert math.isclose(
        float(op.logdet(0.5)), float(torch.linalg.slogdet(dense + 0.5 * eye).logabsdet), rel_tol=EXACT_RTOL
    )
    inv = op.inverse(0.5)
    assert _rel(inv.to_dense(), torch.linalg.inv(dense + 0.5 * eye)) <= EXACT_RTOL
    assert "of=KroneckerOperator" in repr(inv)
    with pytest.raises(ValueError, match="method='exact' only"):
        op.inverse(0.5, method="pi")  # an eigen-form block has no factors to damp
    with pytest.raises(ValueError, match="exactly one block"):
        KroneckerOperator(["w"], [torch.Size([2, 2])], [], [], DTYPE, torch.device("cpu"))
