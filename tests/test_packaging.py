"""Packaging: import cost, the version, the console entry point and the declared extras."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

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
