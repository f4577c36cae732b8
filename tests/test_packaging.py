"""Packaging: import cost, the console entry point and the declared extras."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_curvops_does_not_import_optional_dependencies() -> None:
    code = (
        "import sys, curvops\n"
        # (tqdm is not checked: `import torch` itself imports it, through torch.hub.)
        "heavy = [m for m in ('matplotlib', 'transformers', 'triton', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import curvops imported {result.stdout.strip()}"


def test_pyproject_declares_script_and_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["curvops"] == "curvops.cli:main"
    extras = project["optional-dependencies"]
    assert {"plot", "hf", "test", "docs"} <= set(extras)
    names = {req.split("[")[0].split(">")[0].split("=")[0].strip().lower() for req in extras["test"]}
    assert {"pytest", "matplotlib", "scikit-learn", "tqdm", "triton", "nbclient", "ipykernel",
            "mkdocs", "mkdocs-material", "mkdocstrings", "transformers"} <= names
    torch = [req for req in project["dependencies"] if req.startswith("torch")]
    assert torch and "==" not in torch[0]  # the README installs a pinned torch first


def test_cli_module_help_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "curvops", "spectrum", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "--curvature" in result.stdout
