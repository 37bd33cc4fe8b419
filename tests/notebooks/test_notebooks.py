"""The notebooks execute headless (nbclient) with parameters appended to their first code cell, as
papermill would, and write their plotly figures as HTML."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from tests.conftest import NOTEBOOK_TINY_TRAINING, ROOT, fake_sweep, scaling_config, scaling_evals
from tests.notebook_helpers import assert_plotly_html, execute, printed


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, Path]:
    """probing.ipynb, training its own small model: (the run it trained, its figures)."""
    tmp = tmp_path_factory.mktemp("notebooks")
    run, out = tmp / "run", tmp / "figures"
    execute(
        "probing.ipynb",
        work_dir=str(run),
        train_args=NOTEBOOK_TINY_TRAINING,
        n_sequences=64,
        out_dir=str(out),
    )
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


# ----------------------------------------------------------------------------- scaling.ipynb


def test_scaling_notebook_recovers_known_laws_from_fake_sweeps(tmp_path):
    """Sweeps whose losses follow L = E + A/N^alpha + B/D^beta exactly: a one-variable fit's E is the
    floor of what its sweep held fixed, the joint fit's E the true one."""
    import pandas as pd

    from src.nanollama.monitor.results import non_embedding_parameters

    E, A, alpha, B, beta = 1.3, 20.0, 0.5, 3.0, 0.5

    def law(N, D):
        return E + A * N**-alpha + B * D**-beta

    N = {dim: non_embedding_parameters(scaling_config(dim)["model"]) for dim in (16, 32, 48, 64)}
    tasks = []  # 2 learning rates a size, the worse one 5% above: the notebook keeps the better
    for dim in N:
        for lr, worse in ((1e-3, 1.05), (1e-2, 1.0)):
            # best at step 20 of batch 8: D = 160 fresh sequences
            losses = (law(N[dim], 80) * worse, law(N[dim], 160) * worse, law(N[dim], 160) * worse * 1.01)
            tasks.append(
                {
                    "values": {"model.dim": dim, "optim.lr": lr},
                    "config": scaling_config(dim, lr),
                    "evals": scaling_evals(*losses, bayes=E),
                }
            )
    model_sweep = fake_sweep(tmp_path / "model", tasks)
    tasks = []
    for n in (32, 64, 128, 256, 512):
        path = tmp_path / f"d{n}"
        path.mkdir()
        meta = {"graph": scaling_config(32)["data"]["gssm"], "n_sequences": {"train": n, "test": 32}}
        (path / "meta.json").write_text(json.dumps(meta))
        cfg = scaling_config(32, 1e-2, path=str(path))
        tasks.append(
            {
                "values": {"data.path": str(path)},
                "config": cfg,
                "evals": scaling_evals(law(N[32], n), bayes=E),
            }
        )
    data_sweep = fake_sweep(tmp_path / "data", tasks)
    out = tmp_path / "figures"
    notebook = execute(
        "scaling.ipynb",
        model_sweep=str(model_sweep),
        data_sweep=str(data_sweep),
        out_dir=str(out),
        n_bootstrap=20,
    )
    for kind in ("model", "data"):
        assert_plotly_html(out / f"scaling_{kind}.html")
        assert "Bayes loss 1.300" in (out / f"scaling_{kind}.html").read_text()
    fits = pd.read_csv(out / "fits.csv").set_index(["sweep", "fit"])
    assert list(fits["true E"]) == [E] * 4
    model, data = fits.loc[("model", "E free")], fits.loc[("data", "E free")]
    assert model["E"] == pytest.approx(E + B * 160**-beta, rel=1e-3)
    assert model["exponent"] == pytest.approx(alpha, rel=0.02) and abs(model["holdout err"]) < 1e-3
    assert model["exp 5%"] - 1e-4 <= model["exponent"] <= model["exp 95%"] + 1e-4  # exact data: a point
    assert data["E"] == pytest.approx(E + A * N[32] ** -alpha, rel=1e-3)
    assert data["exponent"] == pytest.approx(beta, rel=0.02)
    joint = pd.read_csv(out / "joint_fit.csv").set_index("fit")
    assert joint.loc["E free", "E"] == pytest.approx(E, rel=0.01)
    assert joint.loc["E = Bayes", ["alpha", "beta"]].tolist() == pytest.approx([alpha, beta], rel=0.02)
    text = printed(notebook)
    assert "model-size sweep, 4 sizes" in text and "data-size sweep, 5 sizes" in text
    assert "true E" in text and f"{model['E']:.4g}" in text and f"{data['E']:.4g}" in text


def test_scaling_notebook_says_which_sweep_is_missing_and_how_to_make_it(tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError) as error:
        nowhere = str(tmp_path / "nowhere")  # and no shipped points to fall back on
        execute("scaling.ipynb", model_sweep=nowhere, data_sweep="", out_dir=str(tmp_path), shipped_points="")
    assert error.value.ename == "FileNotFoundError"
    message = error.value.evalue  # one line: which folder, and the command that makes it
    assert message.startswith(f"no model-size sweep in {tmp_path / 'nowhere'}: make it with python -m")
    assert "config=configs/sweeps/gssm_model_size.yaml" in message and "data-size" not in message
    assert "\n" not in message


@pytest.mark.slow
def test_scaling_notebook_fits_tiny_sweeps_made_by_the_launcher(tmp_path):
    """The real thing, small: a model-size and a data-size sweep of the debug graph through the launcher
    (4 tasks each, 20 steps), then the notebook on them."""
    import pandas as pd
    import yaml

    from src.apps.gssm.make_data import MakeDataConfig, make_data
    from src.nanollama.config import build_config
    from tests.conftest import run_module

    run = yaml.safe_load((ROOT / "src/apps/gssm/configs/debug.yaml").read_text())
    run["orchestration"] |= {"checkpoint": {"period": 0, "keep_only": 0}, "logging": {"period": 10}}
    run["optim"] |= {"steps": 20, "warmup": 2, "lr": 1e-2}
    run["model"] |= {"dim": 32, "n_layers": 1, "n_heads": 2}
    run["data"] |= {"seq_len": 16, "batch_size": 8}
    run["evaluation"] = {"period": 10, "n_sequences": 16, "batch_size": 8}
    paths = []
    for n in (32, 64, 128, 256):
        paths.append(str(tmp_path / f"d{n}"))
        overrides = [f"data.path={paths[-1]}", f"n_train={n}", "n_test=32", "data.seq_len=16"]
        make_data(build_config(MakeDataConfig, run, overrides))
    sweeps = {"model": {"model": {"dim": [16, 32, 48, 64]}}, "data": {"data": {"path": paths}}}
    for kind, grid in sweeps.items():
        (tmp_path / f"{kind}.yaml").write_text(
            yaml.safe_dump({"launcher": {"name": kind}, "grid": grid, **run})
        )
        out = run_module(
            "src.nanollama.launcher",
            "script=src.apps.gssm.train",
            f"config={tmp_path / f'{kind}.yaml'}",
            "launcher=bash",
            f"launcher.log_dir={tmp_path / kind}",
        )
        assert out.returncode == 0, out.stderr[-3000:]
    figures = tmp_path / "figures"
    notebook = execute(
        "scaling.ipynb",
        model_sweep=str(tmp_path / "model"),
        data_sweep=str(tmp_path / "data"),
        out_dir=str(figures),
        n_bootstrap=50,
    )
    for kind in sweeps:
        assert_plotly_html(figures / f"scaling_{kind}.html")
    fits = pd.read_csv(figures / "fits.csv")
    assert set(zip(fits["sweep"], fits["fit"])) == {(k, f) for k in sweeps for f in ("E free", "E = Bayes")}
    # the true E is the runs' own Bayes loss; the largest size is predicted within 10%
    for kind in sweeps:
        bayes = {
            json.loads(line)["bayes_loss"] for line in open(tmp_path / kind / "runs/0/metrics/eval_0.jsonl")
        }
        rows = fits[fits.sweep == kind]
        assert rows["true E"].tolist() == pytest.approx([bayes.pop()] * 2, rel=1e-9)
        assert (rows["E"] >= 0).all() and rows["holdout err"].abs().max() < 0.1
    text = printed(notebook)
    assert "true E" in text and "holdout err" in text
    assert all(f"{v:.4g}" in text for v in fits["E"]) and f"{fits['true E'][0]:.4g}" in text
    assert (figures / "joint_fit.csv").is_file()  # pooled: 4 distinct N, 5 distinct D (160 and 32 to 256)
