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

import curvops
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

    def interrupted():
        raise KeyboardInterrupt
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------- --help
def test_help_shows_each_default_once(capsys) -> None:
    """Options whose help states the default, or that have none, get no "(default: ...)" added."""
    with pytest.raises(SystemExit) as exit_:
        main(["spectrum", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert "default: all)" in text
    assert "default: all) (default" not in text
    assert "torch's default otherwise) (default" not in text
    assert "number of top eigenvalues (default: 10)" in text  # the others still show theirs
    assert "(default: 0)" in text  # --seed's 0 is a value, not "not given"


# ---------------------------------------------------------------------- Ctrl-C and --resume
USER_ARGS = [
    "spectrum",
    "-q",
    "--model",
    "usermod:make_model",
    "--data",
    "usermod:make_data",
    "-k",
    "2",
    "--probes",
    "2",
    "--lanczos-steps",
    "6",
    "--trace-matvecs",
    "10",
    "--no-plot",
    "-o",
    "out",
]
# The public functions behind the three steps of `curvops spectrum`.
STEP_FUNCTIONS = ("lanczos", "xtrace", "spectral_density")


def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermod", None)


def _count_steps(monkeypatch: pytest.MonkeyPatch, interrupt: str | None = None) -> dict[str, int]:
    """Count the calls of each step's function; Ctrl-C (KeyboardInterrupt) in ``interrupt``."""
    calls = dict.fromkeys(STEP_FUNCTIONS, 0)
    for name in STEP_FUNCTIONS:
        original = getattr(curvops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            if _name == interrupt:
                raise KeyboardInterrupt
            return _original(*args, **kwargs)

        monkeypatch.setattr(curvops, name, counted)
    return calls


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_interrupt_in_density_step_writes_finished_steps_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _user_module(tmp_path, monkeypatch)
    _count_steps(monkeypatch, interrupt="spectral_density")
    code = main(USER_ARGS)
    captured = capsys.readouterr()
    assert code == 130
    line = _one_line(captured.err)
    assert line.startswith("curvops spectrum: interrupted; wrote ")
    assert "--resume" in line
    assert "missing: density" in line
    assert captured.out == ""
    record = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert record["complete"] is False
    assert record["missing"] == ["density"]
    assert len(record["eigenvalues"]["values"]) == 2
    assert math.isfinite(record["trace"]["estimate"])
    assert record["trace"]["num_matvecs"] <= 10
    assert "density" not in record
    assert record["settings"]["probes"] == 2
    assert not list((tmp_path / "out").glob("*.partial"))  # written in full, then renamed


def test_interrupt_before_any_step_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C while the user's model is built: exit 130, one line, no file."""
    _user_module(tmp_path, monkeypatch)
    argv = [arg if arg != "usermod:make_model" else "usermod:interrupted" for arg in USER_ARGS]
    code = main(argv)
    assert code == 130
    assert "nothing written" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("interrupt", ["xtrace", "spectral_density"])
def test_resume_skips_finished_steps_and_matches_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, interrupt: str
) -> None:
    _user_module(tmp_path, monkeypatch)
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()

    monkeypatch.chdir(tmp_path / "whole")
    with monkeypatch.context() as patch:
        _count_steps(patch)
        assert main(USER_ARGS) == 0
    whole = json.loads((tmp_path / "whole" / "out" / "spectrum.json").read_text())
    whole_out = capsys.readouterr().out

    monkeypatch.chdir(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        _count_steps(patch, interrupt=interrupt)
        assert main(USER_ARGS) == 130
    capsys.readouterr()
    with monkeypatch.context() as patch:
        calls = _count_steps(patch)
        assert main([*USER_ARGS, "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "out" / "spectrum.json").read_text())
    resumed_out = capsys.readouterr().out

    finished = STEP_FUNCTIONS[: STEP_FUNCTIONS.index(interrupt)]
    assert calls == {name: 0 if name in finished else 1 for name in STEP_FUNCTIONS}
    assert resumed["complete"] is True
    assert resumed["missing"] == []
    # Every number and setting as in one uninterrupted run; only the timings differ.
    assert set(resumed["timings_s"]) == set(whole["timings_s"])
    del resumed["timings_s"], whole["timings_s"]
    assert resumed == whole
    assert "--resume" not in resumed["command"]  # the command that recomputes it all
    assert resumed_out.split("time:")[0] == whole_out.split("time:")[0]


def test_resume_refuses_other_options_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _user_module(tmp_path, monkeypatch)
    with monkeypatch.context() as patch:
        _count_steps(patch, interrupt="spectral_density")
        assert main(USER_ARGS) == 130
    capsys.readouterr()
    argv = [*USER_ARGS, "--resume"]
    argv[argv.index("--probes") + 1] = "3"
    calls = _count_steps(monkeypatch)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "--probes 2" in err
    assert "--probes 3" in err
    assert "without --resume" in err
    assert calls == dict.fromkeys(STEP_FUNCTIONS, 0)
    # The partial file is left for a rerun with the right options.
    assert json.loads((tmp_path / "out" / "spectrum.json").read_text())["complete"] is False


def test_resume_without_a_previous_file_says_how_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _user_module(tmp_path, monkeypatch)
    code = main([*USER_ARGS, "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no out/spectrum.json to continue from" in err
    assert "without --resume" in err


SITECUSTOMIZE_INTERRUPTING_TORCH = textwrap.dedent(
    """
    import sys

    class _CtrlCDuringTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, _CtrlCDuringTorchImport())
    """
)


@pytest.mark.slow
def test_interrupt_while_importing_torch_is_one_line_exit_130(tmp_path: Path) -> None:
    """Ctrl-C in the first seconds (torch still importing): exit 130, one line, no traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE_INTERRUPTING_TORCH)
    result = subprocess.run(
        [sys.executable, "-m", "curvops", "spectrum", "-q", "--no-plot", "-o", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": f"{site}{__import__('os').pathsep}{ROOT}"},
    )
    assert result.returncode == 130, result.stderr
    assert _one_line(result.stderr).startswith("curvops spectrum: interrupted")


# ---------------------------------------------------------------------- figure
@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures saved during the test with the renderer that drew them."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures: list = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        original(self, *args, **kwargs)
        figures.append((self, self.canvas.get_renderer()))  # closing the figure drops its canvas

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _figure_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, saved_figures: list, k: int):
    _user_module(tmp_path, monkeypatch)
    argv = [arg for arg in USER_ARGS if arg != "--no-plot"]
    argv[argv.index("-k") + 1] = str(k)
    assert main(argv) == 0
    assert (tmp_path / "out" / "spectrum.png").exists()
    ((figure, renderer),) = saved_figures
    return figure, renderer, capsys.readouterr().out


def test_figure_states_the_trace_as_the_summary_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, saved_figures: list
) -> None:
    """The same value ± error, both labelled 1 s.e., in the figure's box and on stdout."""
    figure, _, out = _figure_run(tmp_path, monkeypatch, capsys, saved_figures, k=2)
    printed = next(line.strip() for line in out.splitlines() if "XTrace" in line)
    (box,) = figure.findobj(lambda a: a.get_gid() == "trace-summary")
    shown = box.get_text().splitlines()
    value = printed.split(" (")[0]  # "tr(H) = 2.8 ± 1.3"
    assert "±" in value
    assert shown[0] == value
    assert printed.startswith(value + " (1 s.e.;")
    assert shown[1].startswith("(1 s.e.;")


def test_figure_labels_the_top_eigenvalues_and_thins_crowded_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, saved_figures: list
) -> None:
    """Labels λ1, λ2, ... that do not overlap; markers no closer than their width; the
    legend, labels and title inside the saved image."""
    figure, renderer, _ = _figure_run(tmp_path, monkeypatch, capsys, saved_figures, k=8)
    record = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    eigenvalues = record["eigenvalues"]["values"]
    labels = figure.findobj(lambda a: a.get_gid() == "eigenvalue-label")
    assert 1 <= len(labels) <= 3
    assert labels[0].get_text() == r"$\lambda_{1}$"
    boxes = [label.get_window_extent(renderer) for label in labels]
    for index, box in enumerate(boxes):
        assert all(not box.overlaps(other) for other in boxes[index + 1 :])
    markers = figure.findobj(lambda a: a.get_gid() == "eigenvalue-marker")
    # The eigenvalues of this model crowd: some markers would overlap and are left out.
    assert len(labels) <= len(markers) < len(eigenvalues)
    points = sorted(
        (marker.get_transform().transform((marker.get_xdata()[0], 1.0))[0], marker.get_markersize())
        for marker in markers
    )
    pixels_per_point = figure.dpi / 72
    for (left, left_size), (right, right_size) in zip(points, points[1:]):
        assert right - left >= (left_size + right_size) / 2 * pixels_per_point
    for artist in [*labels, *figure.legends, *figure.axes[0].texts]:
        box = artist.get_window_extent(renderer)
        assert figure.bbox.x0 <= box.x0, artist
        assert box.x1 <= figure.bbox.x1, artist
        assert figure.bbox.y0 <= box.y0, artist
        assert box.y1 <= figure.bbox.y1, artist
    ax = figure.axes[0]
    assert ax.get_tightbbox(renderer).y1 <= figure.bbox.y1  # the title above the labels


def test_without_matplotlib_the_hint_is_an_install_that_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """curvops is not on the package index: the hint names matplotlib, not ``curvops[plot]``."""
    _user_module(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import and find_spec see no matplotlib
    argv = [arg for arg in USER_ARGS if arg != "--no-plot"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err
    assert "curvops[plot]" not in err
    assert (tmp_path / "out" / "spectrum.json").exists()
    assert not (tmp_path / "out" / "spectrum.png").exists()
