"""End-to-end runs of the GPT app as real processes: training, eval, generation, resume, bad input."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import crash_after, losses, run_module

CONFIG = "config=src/apps/gpt/configs/debug.yaml"
TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "data.seq_len=32",
    "data.batch_size=8",
    "optim.warmup=2",
    "orchestration.logging.period=1",
    "evaluation.batches=2",
    "evaluation.batch_size=8",
    "generation.max_new_tokens=8",
    "orchestration.checkpoint.keep_only=0",
]


def train(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    out = run_module("src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_debug_run_learns_evaluates_and_generates(tmp_path):
    log_dir = tmp_path / "run"
    train(log_dir, "optim.steps=30", "evaluation.period=15", "generation.period=15", "optim.lr=1e-2")
    loss = losses(log_dir)
    assert list(loss) == list(range(1, 31)) and loss[1] > loss[30]
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [15, 30]
    for e in evals:
        assert e["perplexity"] == pytest.approx(math.exp(e["loss"]))
        assert e["bpb"] == pytest.approx(e["loss"] * e["n_tokens"] / (math.log(2) * e["n_bytes"]))
    assert evals[1]["loss"] < evals[0]["loss"]
    assert "sample at step 30: 'The '" in (log_dir / "logs" / "rank_0.log").read_text()

    out = run_module("src.apps.gpt.eval", f"config={log_dir}/config.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bits/byte" in out.stdout
    offline = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert offline["step"] == 30 and offline["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)

    out = run_module(
        "src.apps.gpt.generate", f"config={log_dir}/config.yaml", "prompt=Python is", "max_new_tokens=16"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Python is") and len(out.stdout.rstrip("\n")) > len("Python is")


def test_resume_gives_the_same_losses(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [
        "optim.steps=8",
        "optim.accumulation_steps=2",
        "orchestration.checkpoint.period=3",
        "evaluation.period=4",
        "generation.period=2",
    ]
    train(full, *args)
    crash_after(full, resumed, 3)
    train(resumed, *args)
    assert losses(resumed) == losses(full)  # exactly, step by step
    assert read_jsonl(resumed / "metrics" / "eval_0.jsonl") == read_jsonl(full / "metrics" / "eval_0.jsonl")
    assert "training from step 3 to 8" in (resumed / "logs" / "rank_0.log").read_text()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model.dimm=3"], "model.dimm"),
        (["tokenizer.kind=words"], "tokenizer.kind"),
        (["model.vocab_size=100"], "model.vocab_size"),
        (["data.batch_size=7", "optim.accumulation_steps=2"], "data.batch_size"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_log_dir(tmp_path, args, needle):
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", *args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert not log_dir.exists()


def test_eval_of_a_missing_checkpoint_exits_2(tmp_path):
    out = run_module("src.apps.gpt.eval", CONFIG, f"checkpoint={tmp_path}/nope")
    assert out.returncode == 2 and "checkpoint" in out.stderr
