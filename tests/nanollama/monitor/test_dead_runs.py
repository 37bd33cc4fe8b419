"""A run whose gradients died (not finite, or exactly 0: a collapsed model) is no success: it stops with
one line and exit 1 after `orchestration.max_skipped_steps` dead steps in a row, or at its end however
few there were, saves nothing of the dead weights, and `runs list` shows it failed."""

from __future__ import annotations

from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.runs import read_run
from tests.conftest import GSSM_TINY, run_module

GSSM = ["config=src/apps/gssm/configs/debug.yaml", *GSSM_TINY]
DIVERGE = ["optim.steps=10", "optim.warmup=0", "optim.lr=1e6", "orchestration.checkpoint.period=1"]


def one_error_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def test_a_run_that_ends_on_skipped_steps_fails(tmp_path):
    log_dir = tmp_path / "run"
    args = [*GSSM, *DIVERGE, f"orchestration.log_dir={log_dir}", "orchestration.max_skipped_steps=50"]
    line = one_error_line(run_module("src.apps.gssm.train", *args))
    assert "the run ended at step 10 on" in line and "dead steps in a row" in line
    assert "last good checkpoint: " in line
    kept = [int(p.name) for p in list_checkpoints(log_dir / "checkpoints")]
    assert 10 not in kept  # nothing saved of the weights that gave the dead gradients
    assert kept == sorted(kept) and all(step < 3 for step in kept), kept
    assert read_run(log_dir).state == "failed"


def test_a_streak_of_dead_steps_stops_the_run(tmp_path):
    log_dir = tmp_path / "run"
    args = [*GSSM, *DIVERGE, f"orchestration.log_dir={log_dir}", "orchestration.max_skipped_steps=2"]
    line = one_error_line(run_module("src.apps.gssm.train", *args))
    assert "for 3 steps in a row" in line and "max_skipped_steps=2" in line
    assert read_run(log_dir).state == "failed"


def test_a_collapsed_model_with_zero_gradients_fails(tmp_path):
    log_dir = tmp_path / "run"
    config = "config=src/apps/multiplication/configs/debug.yaml"
    args = [
        config,
        "optim.lr=1e4",
        "optim.steps=30",
        "evaluation.period=0",
        f"orchestration.log_dir={log_dir}",
    ]
    out = run_module("src.apps.multiplication.train", *args)
    line = one_error_line(out)
    assert "gradient norm 0.0 for 9 steps in a row" in line, line


def test_a_healthy_run_is_done(tmp_path):
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gssm.train", *GSSM, "optim.steps=4", f"orchestration.log_dir={log_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_run(log_dir).state == "done"
