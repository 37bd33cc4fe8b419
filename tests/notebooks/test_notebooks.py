"""The notebooks execute headless (nbclient) with parameters appended to their first code cell, as
papermill would, and write their plotly figures as HTML."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, child_env

TINY_TRAINING = [
    "model.dim=32",
    "data.seq_len=16",
    "data.batch_size=8",
    "optim.steps=40",
    "optim.warmup=2",
    "optim.lr=1e-2",
    "evaluation.period=20",
    "evaluation.n_sequences=16",
    "evaluation.batch_size=8",
    "orchestration.logging.period=5",
    "orchestration.probe.period=10",
]


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


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, Path]:
    """probing.ipynb, training its own small model: (the run it trained, its figures)."""
    tmp = tmp_path_factory.mktemp("notebooks")
    run, out = tmp / "run", tmp / "figures"
    execute("probing.ipynb", work_dir=str(run), train_args=TINY_TRAINING, n_sequences=64, out_dir=str(out))
    return run, out


def test_probing_notebook_trains_probes_and_plots(probed):
    run, out = probed
    assert (run / "metrics" / "probe_accuracy.json").is_file()
    assert_plotly_html(out / "probe_accuracy.html")


def test_runs_notebook_plots_a_run(probed, tmp_path):
    run, _ = probed
    execute("runs.ipynb", log_dir=str(run), out_dir=str(tmp_path))
    for name in ("loss", "lr", "throughput", "memory", "activations"):
        assert_plotly_html(tmp_path / f"{name}.html")
    assert "Bayes-optimal" in (tmp_path / "loss.html").read_text()


def test_notebooks_are_stored_without_outputs():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), path
