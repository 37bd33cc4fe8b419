"""A copied run folder (`cp -r runs/a runs/b`) never acts on the original through the `log_dir` its
config.yaml still names: eval reads the copy, train refuses to guess (exit 2 naming both folders)."""

from __future__ import annotations

import shutil

from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import GSSM_TINY, assert_bad_input, losses, run_module

GSSM = ["config=src/apps/gssm/configs/debug.yaml", *GSSM_TINY, "optim.steps=4"]


def test_a_copied_run_is_trained_and_evaluated_as_itself(tmp_path):
    original, copy = tmp_path / "a", tmp_path / "b"
    out = run_module("src.apps.gssm.train", *GSSM, f"orchestration.log_dir={original}")
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copytree(original, copy)
    before = (original / "metrics" / "raw_0.jsonl").read_text()

    out = run_module("src.apps.gssm.train", f"config={copy / 'config.yaml'}", "optim.steps=6")
    assert_bad_input(out, "orchestration.log_dir")
    assert str(copy) in out.stderr and str(original) in out.stderr

    out = run_module("src.apps.gssm.eval", f"config={copy / 'config.yaml'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["checkpoint"] for r in read_jsonl(copy / "metrics" / "eval_0.jsonl") if "checkpoint" in r] == [
        str(copy / "checkpoints" / "0000000004")
    ]
    assert not any("checkpoint" in r for r in read_jsonl(original / "metrics" / "eval_0.jsonl"))

    args = [f"config={copy / 'config.yaml'}", "optim.steps=6", f"orchestration.log_dir={copy}"]
    out = run_module("src.apps.gssm.train", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert max(losses(copy)) == 6
    assert (original / "metrics" / "raw_0.jsonl").read_text() == before  # the original untouched


def test_a_runs_own_config_in_place_still_resumes(tmp_path):
    log_dir = tmp_path / "a"
    out = run_module("src.apps.gssm.train", *GSSM, f"orchestration.log_dir={log_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_module("src.apps.gssm.train", f"config={log_dir / 'config.yaml'}", "optim.steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert max(losses(log_dir)) == 6
