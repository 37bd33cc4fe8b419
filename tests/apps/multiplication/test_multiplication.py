"""End-to-end runs of the multiplication app as real processes: every mode, resume across a stage change,
two-rank evaluation, compare, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.apps.multiplication.compare import main as compare_main
from src.apps.multiplication.data import format_line, make_problem
from src.apps.multiplication.eval import main as eval_main
from src.apps.multiplication.train import main
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import MULTIPLICATION_TINY, crash_after, losses, run_module

CONFIG = "config=src/apps/multiplication/configs/debug.yaml"
TINY = MULTIPLICATION_TINY
TIMING = ("answers_per_s", "answer_tokens_per_s")


def train_here(log_dir: Path, *args: str) -> None:
    """In this process: no interpreter start-up and torch import per run (the mode tests are many)."""
    main([CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args])


def assert_bad_input_here(capsys, needle: str, log_dir: Path, *args: str) -> None:
    """As `assert_bad_input`, in this process (cli_main's own exit): exit 2, one line, no log dir."""
    with pytest.raises(SystemExit) as exit_:
        main([CONFIG, f"orchestration.log_dir={log_dir}", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not log_dir.exists()


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


MODES = {
    "plain": ["train.mode=plain"],
    "cot": ["train.mode=cot"],
    "latent_learned": ["train.mode=latent", "train.latent.num_latent=3"],
    "latent_continuous": ["train.mode=latent", "train.latent.kind=continuous", "train.latent.num_latent=3"],
    "internalize": ["train.mode=internalize", "train.curriculum.stage_steps=12", "train.internalize.delta=4"],
    "cot_tf_aux": [
        "train.mode=cot",
        "train.teacher_forcing.schedule=linear",
        "train.teacher_forcing.ramp_steps=10",
        "train.aux.weight=0.5",
        "train.answer_weight=2.0",
    ],
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_and_its_loss_falls(tmp_path, mode):
    log_dir = tmp_path / mode
    train_here(log_dir, "optim.steps=24", "evaluation.period=0", *MODES[mode])
    loss = losses(log_dir)
    end = 12 if mode == "internalize" else 24  # internalize: within stage 0 (removal raises the loss)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in range(end - 2, end + 1)) / 3
    assert last < 0.9 * first, (first, last)
    (result,) = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    for key in ("loss", "accuracy", "digit_accuracy", "digit_accuracy_0", "digit_accuracy_3", *TIMING):
        assert key in result, key
    assert result["n"] == 16 and result["accuracy"] <= result["digit_accuracy"] + 1e-9
    raw = read_jsonl(log_dir / "metrics" / "raw_0.jsonl")
    if mode == "cot_tf_aux":
        assert raw[0]["tf_share"] == 0 and raw[-1]["tf_share"] == 0.25 and "aux_loss" in raw[-1]
    if mode == "internalize":
        assert [r["stage"] for r in raw][10:14] == [0, 0, 1, 1]


def test_exact_resume_across_a_stage_change_resets_the_optimizer_once(tmp_path, capsys):
    """Stages change at steps 4 and 8; the crashed run resumes from its checkpoint at step 6."""
    args = [
        "optim.steps=10",
        "orchestration.checkpoint.period=6",
        "evaluation.period=5",
        "train.mode=latent",
        "train.latent.kind=continuous",
        "train.curriculum.stage_steps=4",
        "train.curriculum.max_stage=2",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_here(full, *args)
    crash_after(full, resumed, 6)
    train_here(resumed, *args)
    assert losses(resumed) == losses(full)  # exactly, step by step
    eval_full = untimed(read_jsonl(full / "metrics" / "eval_0.jsonl"))
    assert untimed(read_jsonl(resumed / "metrics" / "eval_0.jsonl")) == eval_full
    events = [e for e in read_jsonl(resumed / "metrics" / "events_0.jsonl") if e["event"] != "config_change"]
    assert events == read_jsonl(full / "metrics" / "events_0.jsonl")
    resets = [(e["step"], e["stage"]) for e in events if e["event"] == "stage_optimizer_reset"]
    assert resets == [(4, 1), (8, 2)]
    assert "training from step 6 to 10" in (resumed / "logs" / "rank_0.log").read_text()
    (row,) = compare_main([str(resumed)])  # stage 2: both chain steps are 2 thoughts
    assert row["mode"] == "latent/continuous" and row["positions"] == 6 + 2 + 1 + 5
    assert row["last acc"] == eval_full[-1]["accuracy"] and row["FLOPs/answer"] > 0


@pytest.mark.slow  # a torchrun of 2 ranks: ~30 s on a busy 2-core machine
def test_eval_on_two_ranks_sums_counts_and_compare_prints_the_table(tmp_path, capsys):
    log_dir = tmp_path / "run"
    train_here(log_dir, "optim.steps=20", "evaluation.period=10", "evaluation.n_problems=23")
    eval_main([f"config={log_dir}/config.yaml", "split=test"])
    assert "step 20: cot 2x2 test accuracy" in capsys.readouterr().out
    single = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert single["n"] == 23
    out = run_module("src.apps.multiplication.eval", f"config={log_dir}/config.yaml", "split=test", nproc=2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(23 problems" in out.stdout
    for rank in (0, 1):  # 12 and 11 problems: the counts are summed, not the ratios averaged
        two = read_jsonl(log_dir / "metrics" / f"eval_{rank}.jsonl")[-1]
        assert two["n"] == 23 and two["split"] == "test"
        for key in ("loss", "accuracy", "digit_accuracy", "digit_accuracy_1"):
            assert two[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    (row,) = compare_main([str(log_dir)])
    table = capsys.readouterr().out
    for needle in ("params", "best acc", "FLOPs/answer", "answers/s", "run"):
        assert needle in table, table
    assert row["test acc"] == single["accuracy"] and row["positions"] == 26 and row["params"] > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train.mode=magic"], "train.mode"),
        (["data.k=0"], "data.k"),
        (["train.mode=internalize"], "train.curriculum.stage_steps"),
        (["data.batch_size=7", "optim.accumulation_steps=2"], "data.batch_size"),
        (["data.train_file=/nonexistent/train.txt"], "/nonexistent/train.txt"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_log_dir(tmp_path, capsys, args, needle):
    log_dir = tmp_path / "run"
    assert_bad_input_here(capsys, needle, log_dir, *args)


def test_bad_line_in_a_data_file_exits_2_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "valid.txt"
    good = format_line(make_problem(12, 34, 2, 2))
    path.write_text(f"{good}\n{good}\n1 2 * 3 4||1 2 #### 1 2 3\n")  # a 3-digit answer to 2x2
    log_dir = tmp_path / "run"
    assert_bad_input_here(capsys, f"{path}:3", log_dir, f"data.valid_file={path}")
