"""``benchmarks/bench_llama_1b.py --small`` on the CPU: its report, and its numbers against dense references.

The script's tiny Llama (D = 1704 parameters) is small enough for the whole GGN as a matrix:
``op @ eye`` of the float32 operator the script multiplies with, and of the same model in
float64 (the reference). The Lanczos eigenvalues, the XTrace trace and the SLQ support are
checked against the reference's ``numpy.linalg.eigh`` with bounds derived below.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from curvops.lm import causal_lm_operator

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SMALL_RUN = [
    "--small",
    "--device",
    "cpu",
    "--repeats",
    "1",
    "--lanczos-iters",
    "40",
    "--trace-products",
    "8",
    "--slq-probes",
    "2",
    "--slq-steps",
    "6",
    "--budget-s",
    "0",
]


def _script() -> ModuleType:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_llama_1b", ROOT / "benchmarks" / "bench_llama_1b.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reject(constant: str) -> float:
    """``json.loads``' hook for NaN and Infinity, which strict JSON does not have."""
    raise ValueError(f"the record holds {constant}")


def _numbers(value: Any) -> list[float]:
    """Every number in a JSON record (None for a memory figure on the CPU is not a number)."""
    if isinstance(value, dict):
        return [x for item in value.values() for x in _numbers(item)]
    if isinstance(value, list):
        return [x for item in value for x in _numbers(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def _dense_ggn(bench: ModuleType, dtype: torch.dtype, seq_len: int) -> np.ndarray:
    """The script's GGN (same model, same batches) as a float64 matrix, from ``op @ eye``."""
    model = bench.build_model(True, torch.float32, "eager", CPU).to(dtype)
    batches = bench.token_batches(2, 1, seq_len, model.config.vocab_size, CPU)
    operator = causal_lm_operator("ggn", model, batches)
    dim = operator.shape[0]
    return (operator @ torch.eye(dim, dtype=dtype)).double().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_run_reports_and_matches_the_dense_ggn(tmp_path: Path, dtype: str) -> None:
    bench = _script()
    results = bench.main([*SMALL_RUN, "--dtype", dtype, "--out", str(tmp_path)])

    variant = "" if dtype == "float32" else "-ggn-bfloat16"
    report = tmp_path / f"llama_1b{variant}_cpu_{results['env']['date']}.md"
    assert results["files"][:2] == [str(report), str(report.with_suffix(".json"))]
    text = report.read_text(encoding="utf-8")
    for heading in ("## One product", "## Phases", "## Top 5 eigenvalues", "## Trace: XTrace", "## Spectral"):
        assert heading in text
    assert "in gradients" in text
    assert "Total wall time" in text
    # Strict JSON (no NaN), every number finite, the fields the report promises present.
    record = json.loads(report.with_suffix(".json").read_text(encoding="utf-8"), parse_constant=_reject)
    assert all(math.isfinite(x) for x in _numbers(record))
    assert record["setup"]["num_params"] == 1704
    assert record["setup"]["tokens"] == 2 * 1 * 16
    assert record["product"]["gradient"]["median_s"] > 0
    assert record["product"]["product"]["median_s"] > 0
    for phase in ("lanczos", "xtrace", "slq"):
        assert "skipped" not in record[phase], record[phase]
        assert record[phase]["num_matvecs"] > 0
        assert record[phase]["wall_s"] > 0
    lanczos = record["lanczos"]
    assert len(lanczos["eigenvalues"]) == len(lanczos["residual_norms"]) == 5
    assert record["slq"]["num_probes"] == 2
    assert record["slq"]["lanczos_steps"] == 6
    assert record["total_s"] > 0

    reference = _dense_ggn(bench, torch.float64, 16)
    multiplied = _dense_ggn(bench, bench.DTYPES[dtype], 16)
    spectrum = np.linalg.eigvalsh((reference + reference.T) / 2)  # ascending
    # The products' distance from the float64 operator in the run's dtype, measured on all D
    # columns: what a product's rounding adds to a residual computed from such products.
    rounding = float(np.linalg.norm(multiplied - reference, 2))

    # A symmetric matrix has an eigenvalue within ||A v - theta v|| of a Ritz value theta
    # (Parlett, The Symmetric Eigenvalue Problem, Thm 4.5.1); the script's residual norm is of
    # the run's products, so the float64 operator's residual is within `rounding` of it. The
    # i-th Ritz value must be within that bound of the i-th largest eigenvalue: the search
    # found the top of the spectrum, none skipped.
    top = spectrum[::-1][:6]
    bounds = np.asarray(lanczos["residual_norms"]) + rounding
    for theta, bound, expected in zip(lanczos["eigenvalues"], bounds, top):
        assert abs(theta - expected) <= bound, (theta, expected, bound)
    # The match names the eigenvalue only where no other lies within twice the bound: so for
    # the top two at least (the others may sit closer together than a float32 residual).
    gaps = -np.diff(top)
    assert gaps[0] > 2 * bounds[0]
    assert min(gaps[0], gaps[1]) > 2 * bounds[1]

    # XTrace: +-2 jackknife standard errors cover the trace at least 95% of the time (xtrace's
    # docstring); the probes are seeded, so this is one fixed draw, checked at 3 errors.
    trace = record["xtrace"]
    assert abs(trace["estimate"] - np.trace(reference)) <= 3 * trace["standard_error"]

    # SLQ: Gauss quadrature nodes (Ritz values) lie in the spectral interval of the operator
    # multiplied (Cauchy interlacing), up to the products' distance from the reference and the
    # float32 recurrence's rounding, eps * ||A|| per step (Paige 1976).
    low, high = record["slq"]["support"]
    slack = rounding + record["slq"]["lanczos_steps"] * np.finfo(np.float32).eps * spectrum[-1]
    assert spectrum[0] - slack <= low <= high <= spectrum[-1] + slack


def test_a_budget_too_small_skips_the_phases_and_says_so(tmp_path: Path) -> None:
    bench = _script()
    run = [*SMALL_RUN[:-2], "--budget-s", "1e-6", "--out", str(tmp_path)]
    results = bench.main(run)
    for phase in ("lanczos", "xtrace", "slq"):
        assert "skipped" in results[phase]
        assert any("--budget-s" in note for note in results[phase]["notes"])
    assert results["markdown"].count("skipped:") == 3


@pytest.mark.gpu
def test_small_run_on_the_gpu_reports_memory(tmp_path: Path) -> None:
    bench = _script()
    run = [*SMALL_RUN, "--out", str(tmp_path)]
    run[run.index("--device") + 1] = "cuda"
    results = bench.main(run)
    assert results["product"]["resident_gib"] > 0
    assert results["product"]["product"]["peak_extra_gib"] > 0
    assert results["product"]["free_for_algorithms_gib"] > 0
    for phase in ("lanczos", "xtrace", "slq"):
        assert "skipped" not in results[phase], results[phase]
        assert 0 < results[phase]["peak_extra_gib"] <= results[phase]["peak_gib"]
    assert f"llama_1b_{bench.machine_name(torch.device('cuda'))}_" in results["files"][0]
    assert "--out DIR" in results["markdown"]
