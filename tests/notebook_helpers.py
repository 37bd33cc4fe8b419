"""Notebook test helpers: execute a notebook headless (nbclient) with parameters appended to its first code
cell, as papermill would; check a plotly figure written as HTML; read back what its cells printed. A plain
module, not a test module (test modules import from here and from tests/conftest.py, never each other)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT, child_env


def execute(name: str, **parameters) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    first.source += "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute(env=child_env())
    return notebook


def assert_plotly_html(path: Path) -> None:
    assert path.is_file(), path
    html = path.read_text()
    assert "plotly-graph-div" in html and "Plotly.newPlot" in html, path


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed."""
    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    return "".join(o.get("text", "") for cell in cells for o in cell.outputs if o.output_type == "stream")
