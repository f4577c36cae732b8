"""Execute every notebook in notebooks/ (small sizes) and fail on any error."""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs without an error (CURVOPS_NOTEBOOK_FAST sizes); the committed copy has outputs."""
    # The kernel inherits the environment: small sizes, the checkout importable, one thread
    # per BLAS pool (2-core CI), and files the notebooks write go to tmp_path.
    monkeypatch.setenv("CURVOPS_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors
    # The committed copy must carry outputs (the notebooks are documentation).
    committed = nbformat.read(path, as_version=4)
    assert any(cell.get("outputs") for cell in committed.cells if cell.cell_type == "code"), (
        f"{path.name} is committed without outputs"
    )
