"""``J v`` carried alongside the forward pass that keeps the graph (``output_tangent="alongside_forward"``).

The tangent must be torch's forward-mode ``J v`` with reverse mode's conventions (padding rows and
no-grad regions are constants); where the forward pass does something the mode cannot carry
exactly, the operator must notice, say why, and still give the right product. References are built
by reverse mode only (``tests/operators/references.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, ProductStrategy
from curvops.operators._tangent_propagation import TangentNotCarried, TangentsAlongside
from tests.operators.references import dense_empirical_fisher, dense_ggn
from tests.operators.test_forward_mode_consistency import PROBLEMS, _assert_close, _vector

DTYPE = torch.float64
ALONGSIDE = ProductStrategy(output_tangent="alongside_forward")


class _Double(torch.autograd.Function):
    """A custom autograd.Function: its forward runs with gradients disabled, out of the mode's sight."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad

    @staticmethod
    def jvp(ctx, tangent):
        return 2 * tangent


class _Mlp(nn.Module):
    def __init__(self, middle: str = "plain") -> None:
        super().__init__()
        self.middle = middle
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.middle == "custom_function":
            h = _Double.apply(h)
        elif self.middle == "in_place":
            h = h.clone()
            h[:, 0] = 0.5  # an in-place write into a tensor that carries a tangent
            h.mul_(3)
        return self.b(h)


def _problem(middle: str):
    torch.manual_seed(0)
    model = _Mlp(middle).to(DTYPE)
    g = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(5, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (5,), generator=g))
        for _ in range(2)
    ]
    return model, nn.CrossEntropyLoss(), data


def test_tangent_equals_forward_mode_jvp_through_a_transformer():
    """Attention, layer norm, GELU, tied embeddings: the carried tangent is ``torch.func.jvp``'s."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=12, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config).to(DTYPE).eval()
    ids = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(5)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=DTYPE) for n, p in params.items()}
    with TangentsAlongside((p, tangents[n]) for n, p in params.items()) as mode:
        logits = model(input_ids=ids, use_cache=False).logits
    carried = mode.tangent_of(logits)
    assert carried is not None
    assert logits.requires_grad
    assert not carried.requires_grad

    def run(ps):
        return torch.func.functional_call(model, ps, (ids,), {"use_cache": False}).logits

    reference = torch.func.jvp(run, (params,), (tangents,))[1]
    _assert_close(carried, reference.detach())
    with pytest.raises(RuntimeError):  # the dual level is closed again: no tangents outside
        torch.autograd.forward_ad.make_dual(torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_reverse_mode_conventions_padding_and_no_grad_regions(problem):
    """Padding rows of embeddings and no-grad or detached regions are constants, as in reverse mode."""
    model, loss_fn, data = PROBLEMS[problem]()
    G = GGNOperator(model, loss_fn, data, strategy=ALONGSIDE)
    v = _vector(G.shape[0])
    _assert_close(G @ v, dense_ggn(model, loss_fn, data, G.params) @ v)
    F = FisherOperator(model, loss_fn, data, kind="empirical", strategy=ALONGSIDE)
    _assert_close(F @ v, dense_empirical_fisher(model, loss_fn, data, F.params) @ v)
    assert G.tangent_alongside_refusal is None
    assert F.tangent_alongside_refusal is None


@pytest.mark.parametrize(
    "middle,reason",
    [("custom_function", "custom autograd.Function"), ("in_place", "in-place operation __setitem__")],
)
def test_what_cannot_be_carried_is_detected_and_served_by_a_separate_pass(middle, reason):
    model, loss_fn, data = _problem(middle)
    G = GGNOperator(model, loss_fn, data, strategy=ALONGSIDE)
    reference = dense_ggn(model, loss_fn, data, G.params)
    v = _vector(G.shape[0])
    _assert_close(G @ v, reference @ v)
    assert G.tangent_alongside_refusal is not None
    assert reason in G.tangent_alongside_refusal
    _assert_close(G @ v, reference @ v)  # later products: the separate pass from the start


def test_mode_refuses_a_tensor_it_did_not_see_created():
    model, _, data = _problem("custom_function")
    tangents = [(p, torch.ones_like(p)) for p in model.parameters()]
    with pytest.raises(TangentNotCarried, match="custom autograd.Function"), TangentsAlongside(tangents):
        model(data[0][0])


def test_plain_model_is_not_refused():
    model, loss_fn, data = _problem("plain")
    G = GGNOperator(model, loss_fn, data, strategy=ALONGSIDE)
    v = _vector(G.shape[0])
    _assert_close(G @ v, dense_ggn(model, loss_fn, data, G.params) @ v)
    assert G.tangent_alongside_refusal is None


def _peak_cpu_bytes(call) -> int:
    """Peak of the bytes allocated on the CPU during ``call``, from torch's memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # Each event's own (net) allocations: an operator's total would count its children's again.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def test_tangents_are_not_kept_alive_by_the_graph():
    """Deep narrow MLP: the saved activations dominate memory. Carrying tangents alongside must
    hold no more than the separate tangent pass (whose tangents die with their no-graph pass),
    where the dual forward that keeps the graph holds every saved activation's tangent too."""
    torch.manual_seed(0)
    width, depth, rows = 64, 24, 1024
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 3)).to(DTYPE)
    data = [(torch.randn(rows, width, dtype=DTYPE), torch.randint(0, 3, (rows,)))]
    peaks = {}
    v = _vector(sum(p.numel() for p in model.parameters()))
    for method in ("alongside_forward", "separate_tangent_pass", "dual_forward_with_graph"):
        G = GGNOperator(model, nn.CrossEntropyLoss(), data, strategy=ProductStrategy(output_tangent=method))
        G @ v  # the one-time checks outside the measurement
        peaks[method] = _peak_cpu_bytes(lambda G=G: G @ v)
    activation = rows * width * 8
    # Two saved activations per layer (the linear's input, tanh's output); their tangents are
    # held by the dual forward that keeps the graph, not by the tangents carried alongside.
    assert peaks["dual_forward_with_graph"] - peaks["alongside_forward"] > depth * activation, peaks
    # Carried alongside, a tangent dies with its primal's Python object (a couple alive at a time).
    assert peaks["alongside_forward"] <= peaks["separate_tangent_pass"] + 2 * activation, peaks
