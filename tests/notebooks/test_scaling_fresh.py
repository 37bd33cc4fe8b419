"""scaling.ipynb on a fresh clone, before any sweep: it draws the model-size sweep that docs/scaling.md
reports, shipped as notebooks/data/scaling_points.csv, and says so; a sweep of your own comes first."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, fake_sweep, scaling_config, scaling_evals
from tests.notebook_helpers import assert_plotly_html, execute, printed

SHIPPED = "notebooks/data/scaling_points.csv"


def test_the_shipped_points_are_the_documented_sweep_of_the_preset_sizes():
    from src.nanollama.monitor.results import non_embedding_parameters

    points = pd.read_csv(ROOT / SHIPPED, comment="#")
    assert set(points.sweep) == {"model"}  # the docs record only 2 of the data-size sweep's 7 points
    for preset, N in zip(points.preset, points.N):
        model = yaml.safe_load((ROOT / "configs" / "models" / f"{preset}.yaml").read_text())["model"]
        assert non_embedding_parameters({**model, "vocab_size": 32}) == N, preset
    assert points.loss.tolist() == [1.4261, 1.4161, 1.4140, 1.4132, 1.4127, 1.4136]  # docs/scaling.md
    assert set(points.bayes_loss) == {1.4041}
    assert "1.4261, 1.4161, 1.4140, 1.4132, 1.4127, 1.4136" in (ROOT / "docs" / "scaling.md").read_text()


def test_scaling_notebook_draws_the_shipped_points_when_there_is_no_sweep(tmp_path):
    model, data, out = tmp_path / "runs/scaling_model", tmp_path / "runs/scaling_data", tmp_path / "figures"
    notebook = execute(
        "scaling.ipynb", model_sweep=str(model), data_sweep=str(data), out_dir=str(out), n_bootstrap=200
    )
    text = printed(notebook)
    assert f"no sweep in {model}: drawing the shipped points of {SHIPPED}" in text
    assert f"no data-size sweep in {data}: make it with python -m" in text and "skipped" in text
    assert "model-size sweep, 6 sizes" in text and "joint fit skipped: it needs both sweeps" in text
    assert_plotly_html(out / "scaling_model.html")
    assert "Bayes loss 1.404" in (out / "scaling_model.html").read_text()
    assert not (out / "scaling_data.html").exists()

    # the figures of docs/scaling.md (its losses are rounded to 1e-4, so are the refits' figures)
    fits = pd.read_csv(out / "fits.csv").set_index(["sweep", "fit"])
    assert list(fits.index) == [("model", "E free"), ("model", "E = Bayes")]
    free, fixed = fits.loc[("model", "E free")], fits.loc[("model", "E = Bayes")]
    assert list(fits["true E"]) == pytest.approx([1.4041] * 2)
    assert free["E"] == pytest.approx(1.413, abs=1e-3)  # the token budget's floor, 0.009 above the truth
    assert free["exponent"] == pytest.approx(1.17, abs=0.05)
    assert free["exp 5%"] == pytest.approx(0.39, abs=0.1) and free["exp 95%"] == pytest.approx(1.93, abs=0.2)
    assert fixed["exponent"] == pytest.approx(0.17, abs=0.01)
    assert fixed["exp 5%"] == pytest.approx(0.008, abs=0.005) and fixed["exp 95%"] == pytest.approx(
        0.36, abs=0.02
    )
    assert free["holdout err"] == pytest.approx(-0.0007, abs=2e-4)  # of the 804k model
    assert fixed["holdout err"] == pytest.approx(-0.0039, abs=2e-4)
    assert f"{free['E']:.4g}" in text


def test_scaling_notebook_prefers_a_sweep_of_your_own(tmp_path):
    tasks = [
        {"values": {"model.dim": dim}, "config": scaling_config(dim, 1e-2), "evals": scaling_evals(loss)}
        for dim, loss in ((16, 1.5), (32, 1.3), (48, 1.2), (64, 1.15))
    ]
    sweep = fake_sweep(tmp_path / "model", tasks)
    notebook = execute(
        "scaling.ipynb", model_sweep=str(sweep), data_sweep="", out_dir=str(tmp_path), n_bootstrap=20
    )
    text = printed(notebook)
    assert "drawing the shipped points" not in text and "model-size sweep, 4 sizes" in text
    assert list(pd.read_csv(tmp_path / "fits.csv")["true E"]) == [1.0] * 2


def test_scaling_notebook_without_shipped_points_says_how_to_make_the_missing_sweep(tmp_path):
    from nbclient.exceptions import CellExecutionError

    missing = tmp_path / "nowhere"
    with pytest.raises(CellExecutionError) as error:
        execute(
            "scaling.ipynb", model_sweep=str(missing), data_sweep="", shipped_points="", out_dir=str(tmp_path)
        )
    assert error.value.ename == "FileNotFoundError"
    assert error.value.evalue.startswith(f"no model-size sweep in {missing}: make it with python -m")
