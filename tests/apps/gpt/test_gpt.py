"""End-to-end runs of the GPT app as real processes: training, eval, generation, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from src.apps.gpt.train import TrainConfig
from src.nanollama.config import load_config
from src.nanollama.data.packing import TextStream
from src.nanollama.data.text import ByteTokenizer
from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import GPT_TINY, assert_bad_input, crash_after, losses, run_module, write_corpus

CONFIG = "config=src/apps/gpt/configs/debug.yaml"
TINY = GPT_TINY


def train(log_dir: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    out = run_module(
        "src.apps.gpt.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args, nproc=nproc
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def data_records(log_dir: Path, rank: int = 0) -> list[dict]:
    """What each checkpoint recorded of the data it had consumed."""
    paths = list_checkpoints(log_dir / "checkpoints")
    return [json.loads((path / f"data_{rank}.json").read_text()) for path in paths]


def test_log_dir_defaults_to_the_run_name():
    cfg = load_config(TrainConfig, ["config=src/apps/gpt/configs/small.yaml"])
    assert cfg.orchestration.log_dir == "runs/gpt_small"


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
    assert_bad_input(out, needle, log_dir)


def test_eval_of_a_missing_checkpoint_exits_2(tmp_path):
    out = run_module("src.apps.gpt.eval", CONFIG, f"checkpoint={tmp_path}/nope")
    assert out.returncode == 2 and "checkpoint" in out.stderr


def epochs_run(tmp_path: Path, log_dir: Path, *args: str, nproc: int = 1) -> TrainConfig:
    """Three epochs of a 40-document corpus: the run's length comes from the data, not `optim.steps`."""
    corpus = write_corpus(tmp_path / "corpus", "doc", 40)
    data = [f"data.sources=[{{path: {corpus}}}]", "data.valid_fraction=0.2", "data.epochs=3"]
    train(log_dir, *data, "optim.steps=1000", "orchestration.checkpoint.period=4", *args, nproc=nproc)
    return load_config(TrainConfig, [f"config={log_dir}/config.yaml"])


def test_epochs_end_the_run_and_each_checkpoint_records_the_data_it_consumed(tmp_path):
    log_dir = tmp_path / "run"
    cfg = epochs_run(tmp_path, log_dir, "optim.accumulation_steps=2")
    steps = cfg.optim.steps  # set from the data in the run's config
    micro = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // 2)
    assert steps == len(list(TextStream(micro, ByteTokenizer()))) // 2 > 8
    assert list(losses(log_dir)) == list(range(1, steps + 1))
    log = (log_dir / "logs" / "rank_0.log").read_text()
    assert f"training from step 0 to {steps} (3 epochs of the data)" in log

    records = data_records(log_dir)
    assert [r["step"] for r in records] == [*range(4, steps, 4), steps]
    sources = [r["sources"][0] for r in records]
    for a, b in zip(sources, sources[1:]):  # every checkpoint has read further than the one before
        assert a["epochs"] < b["epochs"] and a["documents"] < b["documents"] and a["tokens"] < b["tokens"]
    assert sources[0]["epoch"] == 0 and 2.5 < sources[-1]["epochs"] <= 3
    assert sources[-1]["path"] == cfg.data.sources[0].path
    assert f"data consumed at step 4: source=0 path={cfg.data.sources[0].path} epoch=0" in log

    for path, record in zip(list_checkpoints(log_dir / "checkpoints"), records):  # the record is the state's
        state = torch.load(path / "state_0.pt", weights_only=False)["data"]
        stream = TextStream(micro, ByteTokenizer())
        stream.load_state_dict(state)
        assert stream.consumed() == record["sources"]
        rows = record["step"] * cfg.data.batch_size * (cfg.data.seq_len + 1)
        assert record["sources"][0]["tokens"] == rows + len(stream.buffer)
    assert len(list(stream)) < 2  # the stream is spent: less than one optimizer step left


@pytest.mark.slow
def test_epochs_stop_every_rank_at_the_same_step(tmp_path):
    log_dir = tmp_path / "run"
    cfg = epochs_run(tmp_path, log_dir, nproc=2)
    micro = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // 2)
    lengths = [len(list(TextStream(micro, ByteTokenizer(), rank=r, world_size=2))) for r in range(2)]
    assert cfg.optim.steps == min(lengths)  # the shorter shard ends the run
    last = [data_records(log_dir, rank)[-1] for rank in range(2)]
    assert [r["step"] for r in last] == [cfg.optim.steps] * 2
    assert all(2.5 < r["sources"][0]["epochs"] <= 3 for r in last)
