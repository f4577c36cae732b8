"""Working memory of the randomized algorithms: planned up front, within budget, or refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from curvops.algorithms import spectral_density, xtrace

# The child process: xtrace (budget 100, s = 50 probes) on a cheap diagonal float32 operator of
# D = 2**19, so that its (D, s) blocks (100 MiB each) dominate the process's memory growth.
_CHILD = textwrap.dedent(
    """
    import resource, sys, torch
    from curvops.algorithms import xtrace

    class Diagonal:
        def __init__(self, values):
            self.values, self.shape = values, (values.numel(), values.numel())
            self.device, self.torch_dtype = values.device, values.dtype

        def matmat_torch(self, block):
            return self.values[:, None] * block

    dim, budget, memory_budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    operator = Diagonal(torch.linspace(1.0, 2.0, dim))
    xtrace(operator, 6, seed=0)  # loads every code path on a small sketch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = xtrace(operator, budget, seed=0, memory_budget=memory_budget)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before, result.estimate)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in kB is Linux's")
def test_xtrace_peak_memory_within_planned_budget():
    dim, budget, itemsize = 1 << 19, 100, 4
    probes = budget // 2
    column = dim * itemsize
    # Planned: 2 s columns (probes, Y overwritten by Q), the QR's workspace of three pieces of
    # 2**22 entries (8 columns each here), and 4 columns per column of a product; this budget
    # makes xtrace take its products 5 columns at a time.
    memory_budget = (2 * probes + 3 * (1 << 22) / dim + 4 * 5) * column
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, str(dim), str(budget), str(memory_budget)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    ).stdout.split()
    growth, estimate = int(output[0]), float(output[1])
    assert abs(estimate - 1.5 * dim) <= 1e-3 * dim  # tr(diag(linspace(1, 2))) = 1.5 D
    # The peak growth of the resident set stays within the plan (which leaves 10% to spare for
    # the allocator and the small (s, s) matrices): a copy of Y for the QR, one more 100 MiB
    # block, would exceed it.
    assert growth <= memory_budget, (growth, memory_budget)


def test_refused_up_front_with_bytes_and_fix():
    calls = []

    def product(vector):
        calls.append(1)
        return vector

    with pytest.raises(MemoryError, match=r"xtrace with budget 40 needs at least .* memory_budget="):
        xtrace(product, 40, seed=0, dim=1000, memory_budget=1000 * 8 * 20)  # 20 columns < 2 s + 4 + QR
    with pytest.raises(MemoryError, match=r"spectral_density with 30 Lanczos steps .*lanczos_steps"):
        spectral_density(product, 4, 30, seed=0, dim=1000, memory_budget=1000 * 8 * 30)
    assert not calls  # refused before any product


def test_spectral_density_batches_probes_to_fit(make_spectrum_matrix):
    # Room for the 5 starting vectors and two probes' bases at a time: batches of two chosen
    # automatically, and the same probes as all five at once (each probe's Lanczos run is
    # independent of the others'; only the block products' rounding differs).
    matrix = torch.as_tensor(make_spectrum_matrix(np.linspace(-1.0, 3.0, 200), seed=3)[0])
    steps = 20
    two_probes = (5 + 2 * (steps + 6)) * 200 * 8
    batched = spectral_density(matrix, 5, steps, seed=0, memory_budget=two_probes)
    together = spectral_density(matrix, 5, steps, seed=0, probe_batch_size=5)
    # Ritz values in [-1, 3] from float64 Lanczos with full reorthogonalization: 1e-10 leaves
    # room for rounding amplified by the ~20 steps, far below the spacing of the nodes.
    np.testing.assert_allclose(batched.nodes, together.nodes, rtol=0, atol=1e-10)
    with pytest.raises(
        MemoryError, match=r"probe_batch_size=5 needs .* \(at most 2 fit\): pass a smaller probe_batch_size"
    ):
        spectral_density(matrix, 5, steps, seed=0, probe_batch_size=5, memory_budget=two_probes)


def test_hutchinson_probe_blocks_fit_or_refuse(make_spectrum_matrix, torch_native_class):
    from curvops.algorithms import hutchinson_diagonal, hutchinson_trace

    matrix = make_spectrum_matrix(np.linspace(0.5, 2.0, 300), seed=4)[0]
    column = 300 * 8
    # 4 columns per probe (probe, product, operator temporaries): room for 3 probes per block.
    operator = torch_native_class(matrix)
    result = hutchinson_trace(operator, 10, seed=0, memory_budget=13 * column)
    assert [shape[1] for shape in operator.calls] == [3, 3, 3, 1]
    assert result.num_matvecs == 10
    with pytest.raises(MemoryError, match=r"hutchinson_trace with block_size=8 needs .* \(at most 3 fit\)"):
        hutchinson_trace(operator, 10, seed=0, block_size=8, memory_budget=13 * column)
    with pytest.raises(MemoryError, match=r"hutchinson_diagonal needs at least .* memory_budget="):
        hutchinson_diagonal(operator, 10, seed=0, memory_budget=10 * column)  # 4 + 7 per probe


_USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def make_data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))]
    """
)


def test_cli_memory_budget(tmp_path, monkeypatch, capsys):
    from curvops.cli import main

    (tmp_path / "budgetmod.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = [
        "spectrum",
        "-q",
        "--model",
        "budgetmod:make_model",
        "--data",
        "budgetmod:make_data",
        "-k",
        "2",
        "--probes",
        "3",
        "--lanczos-steps",
        "8",
        "--trace-matvecs",
        "12",
        "--no-plot",
    ]
    # 1 KiB: less than XTrace's 12 probe columns of D = 57 float32 entries alone.
    assert main([*common, "--memory-budget", str(2.0**-20), "-o", "tight"]) == 1
    assert "MemoryError: xtrace with budget 12 needs at least" in capsys.readouterr().err
    assert main([*common, "--memory-budget", "0.5", "-o", "roomy"]) == 0
    record = json.loads((tmp_path / "roomy" / "spectrum.json").read_text())
    assert record["settings"]["memory_budget_bytes"] == 2.0**29
    with pytest.raises(SystemExit) as error:
        main([*common, "--memory-budget", "0"])
    assert error.value.code == 2
