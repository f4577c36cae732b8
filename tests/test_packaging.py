"""Packaging: import cost, the version, the console entry point, the declared extras, a built
wheel, and the checks of the development set-up (``scripts/setup.sh``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the test extra installs tomli, the same parser
    import tomli as tomllib

import curvops

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_import_curvops_does_not_import_optional_dependencies() -> None:
    """``import curvops`` imports none of the optional extras (plotting, LMs, Triton, the demo)."""
    code = (
        "import sys, curvops\n"
        # (tqdm is not checked: `import torch` itself imports it, through torch.hub.)
        "heavy = [m for m in ('matplotlib', 'transformers', 'triton', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import curvops imported {result.stdout.strip()}"


def test_version_is_pep440_and_the_installed_metadata() -> None:
    """``curvops.__version__`` is the installed distribution's version (``0+unknown`` if none)."""
    Version(curvops.__version__)  # raises InvalidVersion for a string that is not PEP 440
    try:
        installed = importlib.metadata.version("curvops")
    except importlib.metadata.PackageNotFoundError:
        installed = "0+unknown"
    assert curvops.__version__ == installed


def test_version_of_a_tree_that_is_not_installed() -> None:
    """Imported from a source tree without installed metadata, ``__version__`` is ``0+unknown``."""
    code = textwrap.dedent(
        """
        import importlib.metadata

        def not_installed(name):
            raise importlib.metadata.PackageNotFoundError(name)

        importlib.metadata.version = not_installed
        import curvops
        print(curvops.__version__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0+unknown"


def test_version_comes_from_the_git_tags() -> None:
    """No version string in pyproject.toml: setuptools-scm derives it, with a fallback."""
    pyproject = _pyproject()
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    build = {Requirement(req).name for req in pyproject["build-system"]["requires"]}
    assert "setuptools-scm" in build
    assert Version(pyproject["tool"]["setuptools_scm"]["fallback_version"])


def test_pyproject_declares_script_and_extras() -> None:
    """The console script, the extras the README installs, and an unpinned torch."""
    project = _pyproject()["project"]
    assert project["scripts"]["curvops"] == "curvops.cli:main"
    extras = project["optional-dependencies"]
    assert {"plot", "hf", "test", "docs"} <= set(extras)
    names = {Requirement(req).name.lower() for req in extras["test"]}
    assert {
        "pytest",
        "hypothesis",
        "matplotlib",
        "scikit-learn",
        "tqdm",
        "triton",
        "nbclient",
        "nbformat",
        "ipykernel",
        "mkdocs",
        "mkdocs-material",
        "mkdocstrings",
        "transformers",
        "ruff",
        "mypy",
        "pre-commit",
    } <= names
    torch = [Requirement(req) for req in project["dependencies"] if Requirement(req).name == "torch"]
    assert len(torch) == 1
    # The README installs a pinned CPU build first; the library itself accepts a range.
    assert not any(spec.operator == "==" for spec in torch[0].specifier)


@pytest.mark.slow  # `python -m curvops` also runs in test_cli.py's test_bad_arguments_in_a_subprocess
def test_cli_module_help_runs() -> None:
    """``python -m curvops spectrum --help`` works (the ``__main__`` module)."""
    result = subprocess.run(
        [sys.executable, "-m", "curvops", "spectrum", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "--curvature" in result.stdout


def _requirements(lines: list[str], extra: str) -> list[Requirement]:
    """The requirements among ``lines`` that apply here, with ``extra`` requested."""
    requirements = [Requirement(line.strip()) for line in lines]
    return [req for req in requirements if req.marker is None or req.marker.evaluate({"extra": extra})]


def _declared_dependencies(wheel: Path, extra: str, site_dir: Path) -> None:
    """Fill ``site_dir`` with links to the installed distributions that ``wheel[extra]``
    declares, with their own dependencies, and nothing else.

    The fresh environment of the wheel test sees its dependencies there (torch is not downloaded
    again), but neither this checkout's ``curvops`` nor a package the wheel does not declare: an
    import of an undeclared package fails there as it would for a user.
    """
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode("utf-8")
    declared = [line.split(":", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    pending = _requirements(declared, extra)
    site_dir.mkdir()
    seen: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        distribution = importlib.metadata.distribution(requirement.name)
        root = Path(str(distribution.locate_file("")))
        # Each file's first path component below the site directory (the package, its
        # .dist-info); files outside it (console scripts in bin/) are not needed.
        files = [Path(str(f)) for f in distribution.files or []]
        for top in {f.parts[0] for f in files if ".." not in f.parts}:
            if not (site_dir / top).exists():
                (site_dir / top).symlink_to(root / top)
        pending += _requirements(distribution.requires or [], extra="")


@pytest.mark.slow
def test_built_wheel_installs_and_runs_the_command_line(tmp_path: Path) -> None:
    """``python -m build`` makes a wheel that installs into a fresh environment with its
    declared dependencies (the ``cli`` extra) and whose ``curvops spectrum`` runs the built-in
    example (docs/index.md, "Install")."""
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("curvops-*.whl")
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
        assert "curvops/cli.py" in archive.namelist()
    # The package and its metadata only: no tests, benchmarks, docs or notebooks.
    assert top_level == {"curvops", f"curvops-{version}.dist-info"}, top_level

    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True, timeout=300)
    python = environment / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    dependencies = tmp_path / "dependencies"
    _declared_dependencies(wheel, "cli", dependencies)
    # A .pth line that starts with "import" runs: the dependencies' own .pth files are read too.
    (Path(purelib) / "dependencies.pth").write_text(f"import site; site.addsitedir({str(dependencies)!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # --no-index: every dependency must be satisfied by what the environment sees; a missing or
    # wrongly declared one fails here instead of downloading.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", f"{wheel}[cli]"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    installed = subprocess.run(
        [str(python), "-c", "import curvops; print(curvops.__file__); print(curvops.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    location, reported = installed.stdout.split()
    assert Path(location).is_relative_to(environment), location
    assert reported == version

    output = tmp_path / "out"
    run = subprocess.run(
        [
            *(str(environment / "bin" / "curvops"), "spectrum", "--epochs", "1", "-k", "2"),
            *("--probes", "2", "--lanczos-steps", "10", "--trace-matvecs", "10"),
            *("--quiet", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((output / "spectrum.json").read_text(encoding="utf-8"))["eigenvalues"]
    assert (output / "spectrum.png").stat().st_size > 0


def _run_setup(tmp_path: Path, command: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``command`` in bash, in a folder holding the set-up script and a copy of pyproject.toml.

    A copy, not the checkout: a set-up that went further than its checks allow installs into
    the copy's own ``.venv``, never into the developer's.
    """
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **environment},
    )


def test_setup_outside_the_repository_root_names_the_fix(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "setup.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "run it from the root of the curvops repository" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_with_an_old_python_names_the_fix(tmp_path: Path) -> None:
    old_python = tmp_path / "python3.9"
    old_python.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.18"\nexit 1\n')
    old_python.chmod(0o755)
    result = _run_setup(tmp_path, "bash scripts/setup.sh", PYTHON=str(old_python))
    assert result.returncode == 2
    assert "needs Python 3.10 or newer" in result.stderr
    assert "Python 3.9.18" in result.stderr
    assert "PYTHON=python3.11 . scripts/setup.sh" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_sourced_setup_that_fails_returns_to_the_calling_shell(tmp_path: Path) -> None:
    """Sourced (the README's ``. scripts/setup.sh``), a failure returns its status to the
    caller's shell instead of ending it, and leaves no shell option or variable behind."""
    result = _run_setup(
        tmp_path,
        '. scripts/setup.sh; echo "status $?"; case $- in *e*|*u*) echo "options left: $-";; esac; '
        "set | grep '^_curvops'; true",
        PYTHON=str(tmp_path / "no-such-python"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["status 2"]
    assert f"no Python interpreter '{tmp_path / 'no-such-python'}' found" in result.stderr
    assert "PYTHON=python3.11 . scripts/setup.sh" in result.stderr
