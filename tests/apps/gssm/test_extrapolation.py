"""Length extrapolation: a tiny model trained at L is evaluated by eval.py at 4L with every RoPE scaling;
eval lines carry per-position-bucket losses whose token-weighted mean is the overall loss."""

from __future__ import annotations

import math

import pytest

from src.apps.gssm import eval as gssm_eval
from src.apps.gssm.data import DataConfig, eval_seq_len
from src.apps.gssm.evaluation import bucket_edges, check_evaluation
from src.apps.gssm.train import TrainConfig
from src.nanollama.config import ConfigError
from src.nanollama.model.rope import SCALINGS
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import run_module
from tests.conftest import train_gssm as train

L, BUCKETS = 16, 4
VOCAB = 8  # the observed node of the debug graph


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps at L with 2 position buckets in the loop's own evaluation."""
    log_dir = tmp_path_factory.mktemp("extrapolation") / "run"
    train(log_dir, "optim.steps=3", "evaluation.position_buckets=2")
    return log_dir


def eval_args(log_dir, scaling: str) -> list[str]:
    args = [f"config={log_dir}/config.yaml", f"evaluation.seq_len={4 * L}"]
    args += [f"evaluation.position_buckets={BUCKETS}", f"model.rope_scaling={scaling}"]
    return args + (["model.rope_factor=4", f"model.rope_original_length={L}"] if scaling != "none" else [])


def check_buckets(line: dict, buckets: int) -> None:
    """Every bucket's fields, token counts adding up, and token-weighted means equal to the totals."""
    counts = [line[f"n_tokens_pos_{i}"] for i in range(buckets)]
    assert sum(counts) == line["n_tokens"] and len(set(counts)) == 1
    for key in ("loss", "bayes_loss"):
        mean = sum(n * line[f"{key}_pos_{i}"] for i, n in enumerate(counts)) / sum(counts)
        assert mean == pytest.approx(line[key], rel=1e-9)
    for i in range(buckets):
        assert line[f"gap_pos_{i}"] == pytest.approx(line[f"loss_pos_{i}"] - line[f"bayes_loss_pos_{i}"])
        assert 0 < line[f"bayes_loss_pos_{i}"] < math.log(VOCAB)  # better than uniform, never free
    assert f"loss_pos_{buckets}" not in line


def at_4x(log_dir) -> list[dict]:
    return [line for line in read_jsonl(log_dir / "metrics" / "eval_0.jsonl") if line["seq_len"] == 4 * L]


def test_in_loop_evaluation_has_position_buckets(run):
    (line,) = read_jsonl(run / "metrics" / "eval_0.jsonl")[:1]
    assert line["seq_len"] == L and line["n_tokens"] == 16 * L
    check_buckets(line, 2)


def test_eval_at_4x_length_with_every_scaling(run, capsys):
    """One real process (the README's command, yarn), the others through eval.py's main in process."""
    out = run_module("src.apps.gssm.eval", *eval_args(run, "yarn"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"at seq_len {4 * L} (trained at {L}), rope yarn x4" in out.stdout
    assert out.stdout.count("positions") == BUCKETS
    for scaling in ("none", "linear", "ntk"):
        gssm_eval.main(eval_args(run, scaling))
    lines = {line["rope_scaling"]: line for line in at_4x(run)}
    assert sorted(lines) == sorted(SCALINGS)
    for scaling, line in lines.items():
        assert line["seq_len"] == 4 * L and line["n_tokens"] == 16 * 4 * L and line["step"] == 3
        expected = (1.0, 0) if scaling == "none" else (4.0, L)
        assert (line["rope_factor"], line["rope_original_length"]) == expected
        check_buckets(line, BUCKETS)
        for i in range(BUCKETS):  # the same held-out sequences whatever the scaling
            assert line[f"bayes_loss_pos_{i}"] == lines["none"][f"bayes_loss_pos_{i}"]
    assert len({line["loss"] for line in lines.values()}) == len(SCALINGS)  # each scaling changes the model


def test_eval_at_the_training_length_matches_the_loop(run):
    gssm_eval.main([f"config={run}/config.yaml", "evaluation.position_buckets=2"])
    lines = read_jsonl(run / "metrics" / "eval_0.jsonl")
    in_loop, offline = lines[0], lines[-1]
    assert offline["seq_len"] == L and offline["rope_scaling"] == "none"
    for key in ("loss", "bayes_loss", "loss_pos_0", "loss_pos_1", "bayes_loss_pos_1"):
        assert offline[key] == pytest.approx(in_loop[key], rel=1e-6)


def test_bad_eval_lengths_exit_2_naming_the_key(run, tmp_path, capsys):
    cases = [
        (["model.rope_scaling=yarn", "model.rope_factor=4"], "model.rope_original_length"),
        (["evaluation.seq_len=8", "evaluation.position_buckets=9"], "evaluation.position_buckets"),
        (["evaluation.seq_len=-1"], "evaluation.seq_len"),
        ([f"data.path={tmp_path}", "evaluation.seq_len=64"], "evaluation.seq_len"),
    ]
    for args, key in cases:
        with pytest.raises(SystemExit) as exit_info:
            gssm_eval.main([f"config={run}/config.yaml", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key}:") and err.count("\n") == 1, err


def test_eval_lengths_and_buckets():
    assert eval_seq_len(DataConfig(seq_len=32)) == 32 and eval_seq_len(DataConfig(seq_len=32), 128) == 128
    assert eval_seq_len(DataConfig(seq_len=32, path="data"), 32) == 32  # the dataset's own length is fine
    with pytest.raises(ConfigError, match="evaluation.seq_len"):
        eval_seq_len(DataConfig(seq_len=32, path="data"), 128)
    assert bucket_edges(64, 4) == [0, 16, 32, 48, 64] and bucket_edges(10, 3) == [0, 3, 6, 10]
    cfg = TrainConfig()
    cfg.evaluation.seq_len, cfg.evaluation.position_buckets = 128, 4
    assert check_evaluation(cfg.evaluation, cfg.data) == 128


@pytest.mark.slow
def test_buckets_reduce_across_ranks(run):
    """Under torchrun with 2 ranks, each rank evaluates half of every batch: same figures as 1 process."""
    out = run_module("src.apps.gssm.eval", *eval_args(run, "ntk"), nproc=2)
    assert out.returncode == 0, out.stderr[-2000:]
    distributed = read_jsonl(run / "metrics" / "eval_0.jsonl")[-1]
    single = run_module("src.apps.gssm.eval", *eval_args(run, "ntk"))
    assert single.returncode == 0, single.stderr[-2000:]
    one = read_jsonl(run / "metrics" / "eval_0.jsonl")[-1]
    assert distributed["rope_scaling"] == one["rope_scaling"] == "ntk"
    assert read_jsonl(run / "metrics" / "eval_1.jsonl")[-1] == distributed  # every rank has the same line
    for i in range(BUCKETS):
        assert distributed[f"loss_pos_{i}"] == pytest.approx(one[f"loss_pos_{i}"], rel=1e-5)
        assert distributed[f"bayes_loss_pos_{i}"] == pytest.approx(one[f"bayes_loss_pos_{i}"], rel=1e-9)
