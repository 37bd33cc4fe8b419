"""runs.ipynb on a fresh clone, before `make run`: its run folder does not exist, so it trains the GSSM
debug run there itself (as probing.ipynb does) and says so, instead of failing deep in a cell."""

from __future__ import annotations

from tests.conftest import NOTEBOOK_TINY_TRAINING
from tests.notebook_helpers import assert_plotly_html, execute, printed

FEW_STEPS = [*NOTEBOOK_TINY_TRAINING, "optim.steps=8", "evaluation.period=4", "orchestration.probe.period=4"]


def test_runs_notebook_trains_the_debug_run_when_there_is_none(tmp_path):
    log_dir, out = tmp_path / "runs" / "gssm_debug", tmp_path / "figures"
    assert not log_dir.exists()
    notebook = execute("runs.ipynb", log_dir=str(log_dir), out_dir=str(out), train_args=FEW_STEPS)
    assert f"{log_dir} is not a run yet: training the GSSM debug run there" in printed(notebook)
    assert (log_dir / "config.yaml").is_file() and (log_dir / "checkpoints" / "0000000008").is_dir()
    for name in ("loss", "lr", "throughput", "activations"):
        assert_plotly_html(out / f"{name}.html")

    # a second time on the run it made: nothing trained again, the same figures
    notebook = execute("runs.ipynb", log_dir=str(log_dir), out_dir=str(out), train_args=FEW_STEPS)
    assert "not a run yet" not in printed(notebook)
