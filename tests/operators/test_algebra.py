"""Operator algebra (``H + G``, ``2 * H``, ``H @ G``, ``-H``, ``H / 2``, ``H ** 2``, ``.T``) on the
torch path.

References are dense: the operands' ``to_dense()`` combined with torch's own arithmetic
(the composition is what is under test; the operands' products are tested elsewhere).
Tolerance: float64 with D = 26; a composite and its dense reference differ by the rounding of
a few length-D sums and products, ≲ 10·D·u·‖A‖‖x‖ ≈ 3e-14 relative; 1e-12 leaves a 30×
margin while a wrong sign, scale or factor order is O(1).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from curvops import GGNOperator, HessianOperator, JacobianOperator, inverse, lanczos, xtrace
from curvops.operators import TorchLinearOperator
from curvops.operators.inverse import tag

DTYPE = torch.float64
RTOL = 1e-12


def _rel(a, b) -> float:
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


class _Identity(TorchLinearOperator):
    """The identity on a given device (products are never run in these tests)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__((dim, dim), dtype, device)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        return X.clone()


@pytest.fixture(scope="module")
def operators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, generator=gen, dtype=DTYPE), torch.randint(0, 2, (6,), generator=gen))]
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    G = GGNOperator(model, nn.CrossEntropyLoss(), data)
    return model, data, H, G, H.to_dense(), G.to_dense()


def _expressions(H, G, Hd, Gd):
    return {
        "H + G": (H + G, Hd + Gd),
        "H - G": (H - G, Hd - Gd),
        "-H": (-H, -Hd),
        "2.0 * H": (2.0 * H, 2.0 * Hd),
        "H * 3": (H * 3, 3 * Hd),
        "np.float64(0.5) * G": (np.float64(0.5) * G, 0.5 * Gd),
        "H / 4": (H / 4, Hd / 4),
        "H @ G": (H @ G, Hd @ Gd),
        "H * G": (H * G, Hd @ Gd),
        "H ** 3": (H**3, Hd @ Hd @ Hd),
        "(H + G) @ (2 * H - G)": ((H + G) @ (2 * H - G), (Hd + Gd) @ (2 * Hd - Gd)),
        "(H @ G).T": ((H @ G).T, (Hd @ Gd).T),
        "(H @ G - G).H": ((H @ G - G).H, (Hd @ Gd - Gd).T),
        "(3 * (H @ G)).adjoint()": ((3 * (H @ G)).adjoint(), 3 * (Hd @ Gd).T),
    }


def test_composites_stay_on_the_torch_path_and_match_dense(operators):
    _, _, H, G, Hd, Gd = operators
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(H.shape[0], generator=gen, dtype=DTYPE)
    V = torch.randn(H.shape[0], 3, generator=gen, dtype=DTYPE)
    for name, (op, dense) in _expressions(H, G, Hd, Gd).items():
        out = op @ v
        assert isinstance(out, torch.Tensor), name
        assert out.dtype == DTYPE, name
        assert out.device == v.device, name
        assert _rel(out, dense @ v) <= RTOL, name
        for product in (op @ V, op.matmat(V), op.matmat_torch(V)):
            assert isinstance(product, torch.Tensor), name
            assert product.shape == (H.shape[0], 3), name
            assert _rel(product, dense @ V) <= RTOL, name
        assert isinstance(op.matvec(v), torch.Tensor), name
        host = op @ v.numpy()  # numpy in, numpy out (scipy semantics)
        assert isinstance(host, np.ndarray), name
        assert _rel(torch.from_numpy(host), dense @ v) <= RTOL, name
        assert _rel(op.to_dense(), dense) <= RTOL, name
        assert _rel(torch.from_numpy(op.rmatvec(v.numpy())), dense.T @ v) <= RTOL, name


def test_tags_are_propagated(operators):
    _, _, H, G, _, _ = operators
    G2 = 2.0 * G
    cases = {  # name: (operator, symmetric, positive semi-definite)
        "G + G2": (G + G2, True, True),
        "G / 2": (G / 2, True, True),
        "-G": (-G, True, False),
        "G - G2": (G - G2, True, False),
        "H + G": (H + G, True, False),  # the Hessian is not known to be PSD
        "H @ G": (H @ G, False, False),  # a product is not symmetric in general
        "G @ G": (G @ G, True, True),
        "H @ H": (H @ H, True, True),
        "H ** 2": (H**2, True, True),
        "H ** 3": (H**3, True, False),
        "G ** 3": (G**3, True, True),
        "0 * G": (0 * G, True, True),
    }
    for name, (op, symmetric, psd) in cases.items():
        assert op.is_symmetric is symmetric, name
        assert op.is_positive_semidefinite is psd, name


def test_parameter_list_products(operators):
    # As in curvlinops: a list shaped like the parameters in, such a list out.
    _, _, H, G, Hd, Gd = operators
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(H.shape[0], generator=gen, dtype=DTYPE)
    V = torch.randn(H.shape[0], 2, generator=gen, dtype=DTYPE)
    vs = list(H.unflatten(v).values())
    for op, dense in ((H, Hd), (H + G, Hd + Gd), (2 * G @ H, 2 * Gd @ Hd)):
        out = op @ vs
        assert isinstance(out, list)
        assert [t.shape for t in out] == [p.shape for p in H.params]
        assert _rel(H.flatten(out), dense @ v) <= RTOL
        out = op @ tuple(vs)
        assert _rel(H.flatten(out), dense @ v) <= RTOL
        # k vectors: a trailing dimension k on every tensor, kept in the result
        Vs = [t.reshape(*p.shape, 2) for t, p in zip(V.split(H.param_numels), H.params)]
        out = op @ Vs
        assert [t.shape for t in out] == [(*p.shape, 2) for p in H.params]
        assert _rel(torch.cat([t.reshape(-1, 2) for t in out]), dense @ V) <= RTOL
    with pytest.raises(ValueError, match="op.flatten / op.unflatten"):
        H @ vs[:-1]
    with pytest.raises(ValueError, match="op.flatten / op.unflatten"):
        H @ [t.reshape(-1) for t in vs]


def test_parameter_list_for_other_spaces_is_refused(operators):
    model, data, H, _, _, _ = operators
    J = JacobianOperator(model, data)
    vs = [torch.zeros_like(p) for p in H.params]
    with pytest.raises(TypeError, match="not lists of tensors"):
        J @ vs


def test_inverse_of_kfac_takes_parameter_lists(operators):
    from curvops import KFACOperator

    model, data, H, _, _, _ = operators
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    inv = K.inverse(0.5)
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    out = inv @ list(K.unflatten(v).values())
    assert _rel(K.flatten(out), inv @ v) <= RTOL
    # (K + δI)⁻¹ K + δ (K + δI)⁻¹ = I, composed in torch; exact eigen-inverse: error ≲ cond·u, cond ≲ 1e3
    identity = inv @ K + 0.5 * inv
    assert identity.is_symmetric is False  # a product is not known to be symmetric
    assert _rel(identity @ v, v) <= 1e-10


def test_mismatches_are_refused(operators):
    model, data, H, G, _, _ = operators
    last = GGNOperator(model, nn.CrossEntropyLoss(), data, params="2.*")
    with pytest.raises(ValueError, match="cannot add operators of shapes"):
        H + last
    with pytest.raises(ValueError, match="cannot multiply operators of shapes"):
        H @ JacobianOperator(model, data)
    single = GGNOperator(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.CrossEntropyLoss(),
        [(x.float(), y) for x, y in data],
    )
    with pytest.raises(TypeError, match="dtype torch.float64.*dtype torch.float32"):
        H + single
    on_meta = _Identity(H.shape[0], DTYPE, torch.device("meta"))
    with pytest.raises(ValueError, match="device cpu.*meta"):
        H @ on_meta
    with pytest.raises(ValueError, match="Scalar operands"):
        H @ 2.0
    with pytest.raises(ZeroDivisionError):
        H / 0
    with pytest.raises(ValueError, match="non-finite"):
        H * float("nan")
    with pytest.raises(TypeError, match="complex"):
        H * 1j
    with pytest.raises(ValueError, match="integer >= 0"):
        H**0.5
    with pytest.raises(ValueError, match="square"):
        JacobianOperator(model, data) ** 2
    with pytest.raises(TypeError, match="dtype"):
        (H + G) @ torch.zeros(H.shape[0], dtype=torch.float32)


def test_algorithms_and_scipy_accept_composites(operators):
    _, _, H, G, Hd, Gd = operators
    D = H.shape[0]
    S, Sd = G + 0.5 * (G @ G), Gd + 0.5 * Gd @ Gd  # symmetric PSD (G G of a symmetric G)
    A, Ad = H - 2 * G, Hd - 2 * Gd  # symmetric indefinite
    exact = torch.linalg.eigvalsh(Ad)
    result = lanczos(A, k=2, which="LA", tol=1e-10, seed=0)
    # Ritz values of converged pairs: |θ - λ| ≲ residual ≤ tol·‖A‖
    assert np.allclose(
        np.sort(np.asarray(result.eigenvalues)),
        exact[-2:].numpy(),
        rtol=0,
        atol=1e-8 * float(exact.abs().max()),
    )
    trace = xtrace(S, budget=2 * D, seed=0)  # budget ≥ D: exact from S e_i
    assert abs(trace.estimate - float(torch.trace(Sd))) <= RTOL * float(torch.trace(Sd))
    b = torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    solve = inverse(S, damping=0.1, method="cg", rtol=1e-12)  # CG needs the PSD tag of the sum
    x = solve @ b
    assert isinstance(x, torch.Tensor)
    reference = torch.linalg.solve(Sd + 0.1 * torch.eye(D, dtype=DTYPE), b)
    assert _rel(x, reference) <= 1e-9  # rtol 1e-12 times cond(S + 0.1 I) ≲ 1e3
    top = sla.eigsh(A, k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    assert np.allclose(np.sort(top), exact[-2:].numpy(), rtol=0, atol=1e-9 * float(exact.abs().max()))
    xs, info = sla.cg(S + tag(0.1 * torch.eye(D, dtype=DTYPE), symmetric=True), b.numpy(), rtol=1e-12, atol=0)
    assert info == 0
    assert _rel(torch.from_numpy(xs), reference) <= 1e-9


def test_plain_scipy_operands_fall_back_to_scipy(operators):
    # Documented: a plain scipy LinearOperator has no torch path; the result is scipy's composite.
    _, _, H, _, Hd, _ = operators
    eye = sla.aslinearoperator(np.eye(H.shape[0]))
    for op, dense in (
        (H + eye, Hd + torch.eye(H.shape[0], dtype=DTYPE)),
        (H @ eye, Hd),
        (H - eye, Hd - torch.eye(H.shape[0], dtype=DTYPE)),
    ):
        assert type(op).__module__.startswith("scipy")
        v = np.arange(H.shape[0], dtype=np.float64)
        assert _rel(torch.from_numpy(op @ v), dense @ torch.from_numpy(v)) <= RTOL
