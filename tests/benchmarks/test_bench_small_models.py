"""``benchmarks/bench_small_models.py --small`` on the CPU: it runs, and its products agree.

Every curvops product the script times is compared, inside the script, with the plain torch
product of its family; here those relative errors are held to float32 rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_run_reports_every_curvops_product_equal_to_plain_torch(tmp_path: Path) -> None:
    out, raw = tmp_path / "report.md", tmp_path / "raw.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_small_models.py"), "--small"]
    command += ["--device", "cpu", "--batchnorm", "--rounds", "1", "--warmup", "0", "--threads", "1"]
    command += ["--out", str(out), "--json", str(raw)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    report = out.read_text()
    results = json.loads(raw.read_text())
    assert set(results) == {"mlp", "cnn"}
    # Two float32 evaluations of the same exact product differ by summation order only: at
    # most about n·u relative, n the longest sum (a batch of 16 times a width of 16: 256 terms).
    tolerance = 256 * torch.finfo(torch.float32).eps / 2
    for name, problem in results.items():
        curvops_errors = {m: e for m, e in problem["errors"].items() if m.startswith("curvops")}
        assert {"curvops_hessian", "curvops_hessian_db", "curvops_ggn"} <= set(curvops_errors), name
        for method, error in curvops_errors.items():
            assert error <= tolerance, f"{name}/{method}: relative error {error:.2e} > {tolerance:.1e}"
            assert f"| {method} |" in report
