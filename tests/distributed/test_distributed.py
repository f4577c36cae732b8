"""DDP and FSDP2 on the CPU: 2 processes on the gloo backend, spawned by the tests.

Every scenario runs once per wrapper (module-scoped fixtures); each rank compares with the
single-process run on the global data and writes its numbers, which the tests check.

Tolerances. DDP products are autograd products summed in another order: float64 rounding,
``1e-13``. FSDP products are central finite differences (Hessian: of gradients; GGN and
Fisher: of the model output), whose relative error is ``O(u^(2/3)) ≈ 2e-11`` in float64
times the model's third-derivative constants (1e-11 to 5e-10 for this model): ``1e-8``.
Eigenvalues, traces and quadrature nodes inherit the product error.

Speed. Each scenario spawns a process group (seconds of start-up per job): the DDP products
scenario runs by default, as a smoke test of the distributed path; every other job is marked
``slow`` (CI runs it).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import workers

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
pytestmark = needs_gloo

PRODUCT_TOLERANCE = {"ddp": 1e-13, "fsdp": 1e-8}
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(scenario: str, kind: str, out: Path) -> list[dict[str, Any]] | BaseException:
    """Run ``scenario`` on 2 spawned ranks; their results, or the exception the job died with."""
    context = mp.start_processes(
        workers.run,
        args=(scenario, kind, str(out), _free_port()),
        nprocs=workers.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{scenario}/{kind} did not finish within {TIMEOUT_S} s: a rank hangs")
    except mp.ProcessRaisedException as error:
        return error
    return [
        json.loads((out / f"{scenario}-{kind}-rank{r}.json").read_text()) for r in range(workers.WORLD_SIZE)
    ]


def _scenario(name: str, kind: str, factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    results = launch(name, kind, factory.mktemp(f"{name}-{kind}"))
    if isinstance(results, BaseException):
        raise results
    return kind, results


@pytest.fixture(scope="module", params=["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def products(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[dict]]:
    return _scenario("products_and_algorithms", request.param, tmp_path_factory)


@pytest.fixture(
    scope="module", params=[pytest.param(kind, marks=pytest.mark.slow) for kind in ("ddp", "fsdp")]
)
def bad_input(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[dict]]:
    return _scenario("bad_input", request.param, tmp_path_factory)


def test_layout(products):
    kind, ranks = products
    for r in ranks:
        assert r["dim"] == [66, 66]
        assert r["parameter_subset_dim"][0] == 24  # "2.*": the 3x7 weight and 3 biases
    if kind == "ddp":
        assert [r["local_dim"] for r in ranks] == [66, 66]
        assert ranks[0]["uneven"] is None
        return
    # 7- and 3-row layers over 2 ranks: shards of 4+3 and 2+1 rows, 40 and 26 entries.
    assert [r["local_dim"] for r in ranks] == [40, 26]
    pieces = sorted(tuple(p) for r in ranks for p in r["uneven"])
    assert pieces[0][0] == 0
    assert pieces[-1][1] == 66
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # disjoint, no gap


@pytest.mark.parametrize(
    "name",
    [
        "hessian_product",
        "hessian_vector",
        "hessian_product_into",
        "gradient",
        "ggn",
        "fisher_empirical",
        "diagonal",
        "xdiag",
        "parameter_subset",
    ],
)
def test_products_equal_single_process(products, name):
    kind, ranks = products
    for r in ranks:
        assert r[name] < PRODUCT_TOLERANCE[kind], (kind, name, r[name])


def test_out_rows_reduced_as_contiguous_tensors(products):
    """A product into a column-major ``out`` (rows of a Lanczos basis) all-reduces only
    contiguous tensors, as NCCL requires."""
    kind, ranks = products
    for r in ranks:
        assert r["into_reduces_contiguous"], kind


def test_loss_and_state_untouched(products):
    kind, ranks = products
    for r in ranks:
        assert r["loss"] < 1e-14
        assert r["params_restored"]
        assert r["grads_preserved"]


def test_lanczos_equals_single_process_and_eigh(products):
    kind, ranks = products
    tolerance = PRODUCT_TOLERANCE[kind] * 10
    for r in ranks:
        for ours, single, exact in zip(r["lanczos"], r["lanczos_reference"], r["eigh_top3"]):
            assert abs(ours - single) <= tolerance * abs(exact)
            assert abs(ours - exact) <= tolerance * abs(exact)
        assert r["eigenvector_shape"] == [r["local_dim"], 3]  # each rank holds its rows
        assert r["eigenvector_alignment"] > 1 - 1e-6
        assert r["eigenvector_residual"] < 1e-6


@pytest.mark.parametrize("name", ["hutchinson", "hutchpp", "xtrace", "trace_exact"])
def test_traces_equal_single_process(products, name):
    """The same seed gives the same probes on the shards as in one process."""
    kind, ranks = products
    for r in ranks:
        ours, single = r[name]
        assert abs(ours - single) <= PRODUCT_TOLERANCE[kind] * 10 * max(1.0, abs(single))
    exact = ranks[0]["trace_exact"][0]
    assert abs(exact - ranks[0]["trace_dense"]) <= PRODUCT_TOLERANCE[kind] * 10 * abs(exact)


def test_power_iteration_and_mc_fisher(products):
    kind, ranks = products
    for r in ranks:
        ours, single = r["power_iteration"]
        assert abs(ours - single) <= PRODUCT_TOLERANCE[kind] * 100 * abs(single)
        fisher = r["fisher_mc"]
        assert fisher["finite"]
        assert min(fisher["quadratic_form"]) >= 0
        # x0ᵀ F x1 = x1ᵀ F x0 (the operator is the same symmetric matrix on every product);
        # under FSDP J v comes from finite differences, so symmetry holds to their accuracy.
        assert fisher["symmetry_gap"] < PRODUCT_TOLERANCE[kind] * 100


def test_spectral_density_equals_single_process(products):
    kind, ranks = products
    for r in ranks:
        assert r["density_nodes"] < PRODUCT_TOLERANCE[kind] * 100
        assert r["density_weights"] < PRODUCT_TOLERANCE[kind] * 100


def test_unsupported_and_uneven(products):
    kind, ranks = products
    for r in ranks:
        if kind == "ddp":
            assert r["kfac"] < 1e-13
            # Both solves reach relative residual 1e-10 (summation order differs), so they differ
            # by at most about cond(G + 0.1 I) · 2e-10 ≈ 8 · 2e-10 here (λ_max(G) ≈ 0.7).
            assert r["cg"] < 2e-9
            assert r["uneven_batches"] < 1e-13  # 3 and 1 batches per rank: summed per product
        else:
            assert r["fsdp_autograd"]["error"] == "NotImplementedError"
            assert "finite_difference" in r["fsdp_autograd"]["message"]
            assert r["fsdp_kfac"]["error"] == "NotImplementedError"
            assert r["fsdp_numpy"]["error"] == "TypeError"
            assert "sharded" in r["fsdp_numpy"]["message"]
            assert r["uneven_batches"]["error"] == "ValueError"
            assert "[3, 1]" in r["uneven_batches"]["message"]


@pytest.mark.parametrize(
    "name,error",
    [("nan_vector", "ValueError"), ("wrong_shape", "ValueError"), ("nan_data", "FloatingPointError")],
)
def test_error_on_one_rank_raises_on_all(bad_input, name, error):
    _, ranks = bad_input
    for r in ranks:
        assert r[name]["error"] == error
        assert "rank 1:" in r[name]["message"]
        assert "rank 0:" not in r[name]["message"]
    assert ranks[0][name]["message"] == ranks[1][name]["message"]


def test_operator_usable_after_errors(bad_input):
    _, ranks = bad_input
    assert all(isinstance(r["still_works"], float) for r in ranks)


def test_empty_rank_and_ddp_checks(bad_input):
    kind, ranks = bad_input
    for r in ranks:
        if kind == "fsdp":
            assert r["empty_rank"]["error"] == "ValueError"
            assert "[2, 0]" in r["empty_rank"]["message"]
        else:
            assert r["empty_rank"]["error"] is None  # DDP: a rank without batches contributes 0
            assert r["unreplicated"]["error"] == "ValueError"
            assert "same vectors" in r["unreplicated"]["message"]
            assert r["dropout"]["error"] == "ValueError"
            assert "model.eval()" in r["dropout"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_rank_that_raises_fails_the_job(kind, tmp_path):
    """Rank 1's model raises mid-product (rank 0 waits in a collective): no hang."""
    started = time.monotonic()
    outcome = launch("crash", kind, tmp_path)
    assert isinstance(outcome, mp.ProcessRaisedException), outcome
    assert "boom on rank 1" in str(outcome)
    assert time.monotonic() - started < TIMEOUT_S


@pytest.mark.slow
def test_torchrun_example_matches_one_process(tmp_path):
    """examples/distributed_spectrum.py under torchrun (FSDP2, 2 ranks) = the plain run."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "distributed_spectrum.py"
    tiny = [
        "--width",
        "16",
        "--vocab",
        "32",
        "--context",
        "8",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch-size",
        "3",
        "--batches",
        "2",
        "--dtype",
        "float64",
        "--steps",
        "8",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for wrap, launcher in [
        (
            "fsdp",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_free_port()),
            ],
        ),
        ("none", [sys.executable]),
    ]:
        out = tmp_path / f"{wrap}.json"
        completed = subprocess.run(
            [*launcher, str(script), "--wrap", wrap, "--out", str(out), *tiny],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert "top 3 Hessian eigenvalues" in completed.stdout
        runs[wrap] = json.loads(out.read_text())
    assert runs["fsdp"]["world_size"] == 2
    assert runs["fsdp"]["dim"] == runs["none"]["dim"]
    assert runs["fsdp"]["local_dim"] < runs["none"]["dim"]
    # Same seed, same start vector: the runs differ only by the finite-difference error of the
    # products (~1e-10 relative), far below the looser 1e-6 allowed here.
    for ours, single in zip(runs["fsdp"]["top_eigenvalues"], runs["none"]["top_eigenvalues"]):
        assert abs(ours - single) <= 1e-6 * abs(single)
