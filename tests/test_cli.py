"""The ``curvops`` command line: a real (small) run, the user-model path and bad arguments."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from curvops.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Small sizes: the test checks the plumbing and the numbers' consistency, not the default sizes.
SMALL = ["--epochs", "1", "-k", "3", "--probes", "3", "--lanczos-steps", "12", "--trace-matvecs", "12"]

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def make_model_and_loss():
        return make_model(), nn.CrossEntropyLoss(reduction="sum")

    def make_data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]

    def one_shot():
        return iter(make_data())

    def fails():
        raise RuntimeError("kaboom")
    """
)


def _run(args: list[str], cwd: Path, *, script: bool = False) -> subprocess.CompletedProcess:
    if script:
        console_script = shutil.which("curvops")
        assert console_script is not None, "the curvops console script is not installed"
        command = [console_script]
    else:
        command = [sys.executable, "-m", "curvops"]
    return subprocess.run(
        command + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


# A subprocess that trains the digits MLP; test_user_model_each_curvature runs the estimates in process.
@pytest.mark.slow
def test_builtin_example_end_to_end(tmp_path: Path) -> None:
    """`python -m curvops spectrum` trains, estimates, prints, and writes JSON and PNG."""
    result = _run(["spectrum", *SMALL, "--output", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Top 3 eigenvalues" in result.stdout
    assert "tr(H) =" in result.stdout
    assert "training" in result.stderr  # the tqdm bars go to stderr
    record = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    png = (tmp_path / "out" / "spectrum.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 10_000

    eig = record["eigenvalues"]
    assert len(eig["values"]) == 3
    assert eig["values"] == sorted(eig["values"], reverse=True)
    assert all(r >= 0 for r in eig["residual_norms"])
    assert record["num_parameters"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    trace = record["trace"]
    assert trace["method"] == "xtrace"
    assert trace["num_matvecs"] <= 12
    assert math.isfinite(trace["estimate"])
    assert trace["standard_error"] > 0
    density = record["density"]
    assert density["num_probes"] == 3
    assert density["lanczos_steps"] == 12
    weights = np.asarray(density["slq"]["weights"])
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-10)
    # The largest Ritz value of SLQ cannot exceed the top eigenvalue (up to Lanczos accuracy).
    assert density["spectral_range"][1] <= eig["values"][0] + 10 * max(eig["residual_norms"][0], 1e-6)
    assert record["seed"] == 0
    assert record["settings"]["epochs"] == 1
    assert set(record["versions"]) >= {"curvops", "torch", "numpy", "scipy", "python"}
    training = record["problem"]["training"]
    assert len(training["epoch_losses"]) == 1
    assert 0 <= training["test_accuracy"] <= 1


def test_console_script_version() -> None:
    script = shutil.which("curvops")
    if script is None:
        pytest.skip("console script not installed (pip install -e . installs it)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("curvops ")


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "kfac"])
def test_user_model_each_curvature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, curvature: str
) -> None:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(
        [
            "spectrum",
            "-q",
            "--model",
            "usermod:make_model",
            "--data",
            "usermod:make_data",
            "--curvature",
            curvature,
            "-k",
            "2",
            "--probes",
            "2",
            "--lanczos-steps",
            "8",
            "--trace-matvecs",
            "200",
            "--dtype",
            "float64",
            "--no-plot",
            "-o",
            "out",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert record["num_parameters"] == 5 * 6 + 6 + 6 * 3 + 3
    assert record["settings"]["dtype"] == "float64"
    assert not (tmp_path / "out" / "spectrum.png").exists()
    # budget >= D: the trace is exact, and must equal the SLQ-free dense trace.
    usermod = importlib.import_module("usermod")  # written to tmp_path by this test

    from curvops import FisherOperator, GGNOperator
    from curvops.operators.kfac import KFACOperator

    model = usermod.make_model().double().eval()
    data = [(x.double(), y) for x, y in usermod.make_data()]
    cls = {"ggn": GGNOperator, "fisher": FisherOperator, "kfac": KFACOperator}[curvature]
    dense = cls(model, torch.nn.CrossEntropyLoss(), data).to_dense()
    assert record["trace"]["exact"]
    np.testing.assert_allclose(record["trace"]["estimate"], float(torch.trace(dense)), rtol=1e-8)
    top = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
    np.testing.assert_allclose(record["eigenvalues"]["values"], top, rtol=1e-6, atol=1e-9)
    assert "exact" in out


def test_model_returning_loss_and_file_path(tmp_path: Path, capsys) -> None:
    path = tmp_path / "usermod_file.py"
    path.write_text(USER_MODULE)
    code = main(
        [
            "spectrum",
            "-q",
            "--model",
            f"{path}:make_model_and_loss",
            "--data",
            f"{path}:make_data",
            "-k",
            "2",
            "--probes",
            "2",
            "--lanczos-steps",
            "5",
            "--trace-matvecs",
            "10",
            "--no-plot",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert record["problem"]["loss"] == "CrossEntropyLoss"


BAD_ARGUMENTS = [
    (["spectrum", "-k", "0"], "positive integer"),
    (["spectrum", "-k", "three"], "positive integer"),
    (["spectrum", "--probes", "-2"], "positive integer"),
    (["spectrum", "--curvature", "laplacian"], "invalid choice"),
    (["spectrum", "--dtype", "float16"], "invalid choice"),
    (["spectrum", "--seed", "-1"], "seed"),
    (["spectrum", "--model", "no_colon"], "MODULE:FUNCTION"),
    (["spectrum", "--model", "usermod:make_model"], "given together"),
    (["spectrum", "--model", "not_a_module_xyz:f", "--data", "usermod:make_data"], "cannot import"),
    (["spectrum", "--model", "usermod:missing", "--data", "usermod:make_data"], "no attribute"),
    (["spectrum", "--model", "usermod:make_model", "--data", "usermod:one_shot"], "one-shot"),
    (
        ["spectrum", "--model", "usermod:make_model", "--data", "usermod:make_data", "-k", "500"],
        "smaller than",
    ),
    (
        ["spectrum", "--model", "usermod:make_model", "--data", "usermod:make_data", "--params", "nothing.*"],
        "no parameter name matches",
    ),
    (["spectrum", "--device", "not-a-device"], "device"),
    (["spectrum", "--device", "cuda:7"], "cuda"),
    (["spectrum", "--output", "usermod.py"], "not a directory"),
    (["spectrum", "--bogus-flag"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str], message: str
) -> None:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermod", None)
    code: int | str | None
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert message.lower() in err.lower()
    assert len(err.strip().splitlines()) <= 4  # usage line(s) + one error line


def test_error_in_user_code_is_one_line_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["spectrum", "--model", "usermod:fails", "--data", "usermod:make_data"])
    err = capsys.readouterr().err
    assert code == 1
    assert "kaboom" in err
    assert "Traceback" not in err


def test_bad_arguments_in_a_subprocess(tmp_path: Path) -> None:
    """The real process: exit status 2, a short message on stderr, nothing on stdout."""
    for args in (["spectrum", "-k", "0"], ["spectrum", "--device", "cuda:99"]):
        result = _run(args, tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "error:" in result.stderr
        assert result.stdout == ""


def test_user_module_import_leaves_sys_path_as_it_was(tmp_path: Path) -> None:
    """`--model mod:fn` puts the working directory on sys.path for that import only: a stray
    matplotlib.py there must not replace the real one when the spectrum is plotted later.

    A subprocess with ``-P`` (no script directory or cwd on sys.path), as the console script
    runs: ``python -m`` itself would put the working directory first.
    """
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    (tmp_path / "matplotlib.py").write_text("raise ImportError('the stray ./matplotlib.py was imported')\n")
    code = (
        "import sys; from curvops.cli import main; "
        "sys.exit(main(['spectrum', '-q', '--model', 'usermod:make_model', '--data', 'usermod:make_data', "
        "'-k', '2', '--probes', '2', '--lanczos-steps', '5', '--trace-matvecs', '10', '-o', 'out']))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "stray" not in result.stderr
    assert (tmp_path / "out" / "spectrum.png").exists()
