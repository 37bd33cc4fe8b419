"""End-to-end runs of the GSSM app as real processes: layout, errors, resume, signals, eval guard."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.nanollama.monitor.checkpoint import has_eval_flag, list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import (
    GSSM_DEBUG,
    GSSM_TINY,
    ROOT,
    assert_bad_input,
    child_env,
    crash_after,
    losses,
    run_module,
)
from tests.conftest import train_gssm as train

CONFIG, TINY = GSSM_DEBUG, GSSM_TINY
CYCLE = "[{name: a, parents: [b]}, {name: b, parents: [a]}, {name: x, parents: [a], observed: true}]"


def profile_steps(log_dir: Path, rank: int = 0) -> list[int]:
    with open(log_dir / "metrics" / f"profile_{rank}.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_debug_run_writes_the_contracted_layout(tmp_path):
    log_dir = tmp_path / "run"
    train(log_dir, "optim.steps=6", "orchestration.checkpoint.period=3", "evaluation.period=3")
    assert (log_dir / "config.yaml").is_file()
    raw = read_jsonl(log_dir / "metrics" / "raw_0.jsonl")
    assert [r["step"] for r in raw] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "mfu", "memory_gib"} <= raw[0].keys()
    assert all(0 < r["mfu"] < 1 and r["memory_gib"] > 0 for r in raw)
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert e["gap"] == pytest.approx(e["loss"] - e["bayes_loss"])
        assert 0 < e["bayes_loss"] < e["loss"]
    assert profile_steps(log_dir) == list(range(1, 7))
    assert [p.name for p in list_checkpoints(log_dir / "checkpoints")] == ["0000000003", "0000000006"]
    log = (log_dir / "logs" / "rank_0.log").read_text()
    assert "host=" in log and "available memory" in log
    assert re.search(
        r"step 6/6 \| loss [\d.]+ \| .* tok/s \| MFU [\d.]+% \| mem [\d.]+ GiB \| ETA 0:00:00", log
    )
    assert re.search(r"done: steps 0->6 \(6 this run\), [\d.]+k? tokens, wall \d:\d\d:\d\d, .* mean MFU", log)


def test_early_stopping_on_finite_data_stops_and_stays_stopped(tmp_path):
    data, log_dir = tmp_path / "data", tmp_path / "run"
    out = run_module("src.apps.gssm.make_data", CONFIG, *TINY, f"data.path={data}", "n_train=16", "n_test=16")
    assert out.returncode == 0, out.stderr
    args = [f"data.path={data}", "optim.steps=400", "optim.lr=0.03", "evaluation.period=4"]
    args += [
        "evaluation.n_sequences=0",
        "evaluation.early_stop_patience=2",
        "orchestration.checkpoint.period=4",
    ]
    train(log_dir, *args)
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    events = [e for e in read_jsonl(log_dir / "metrics" / "events_0.jsonl") if e["event"] == "early_stop"]
    assert len(events) == 1 and events[0]["step"] == evals[-1]["step"] < 400  # 16 sequences overfit fast
    best = min(evals, key=lambda e: e["loss"])
    assert (events[0]["best_step"], events[0]["best_loss"]) == (best["step"], best["loss"])
    assert [e["step"] for e in evals[-2:]] == [best["step"] + 4, best["step"] + 8]  # patience 2
    raw_lines = len(read_jsonl(log_dir / "metrics" / "raw_0.jsonl"))
    train(log_dir, *args)  # a restart (a requeue) replays the evaluations: no step more
    assert len(read_jsonl(log_dir / "metrics" / "raw_0.jsonl")) == raw_lines


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model.dimm=3"], "model.dimm"),
        (["optim.lr=fast"], "optim.lr"),
        (["optim.lr=1e38"], "optim.lr: 1e+38 / (1 - beta1) overflows float32"),
        (["optim.scheduler=zigzag"], "optim.scheduler"),
        ([f"data.gssm.nodes={CYCLE}"], "cycle"),
        (["config=missing.yaml"], "missing.yaml"),
        (["data.batch_size=7", "optim.accumulation_steps=2"], "data.batch_size"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_log_dir(tmp_path, args, needle):
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *args)
    assert_bad_input(out, needle, log_dir)


def test_resume_gives_the_same_losses(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["optim.steps=10", "orchestration.checkpoint.period=4", "evaluation.period=5"]
    train(full, *args)
    crash_after(full, resumed, 4)
    train(resumed, *args)
    assert losses(resumed) == losses(full)  # exactly, step by step
    assert read_jsonl(resumed / "metrics" / "eval_0.jsonl") == read_jsonl(full / "metrics" / "eval_0.jsonl")
    assert profile_steps(resumed) == list(range(1, 11))  # no gap, no duplicated step
    assert "training from step 4 to 10" in (resumed / "logs" / "rank_0.log").read_text()


def test_resume_with_accumulation_and_disk_data(tmp_path):
    data = tmp_path / "data"
    out = run_module("src.apps.gssm.make_data", CONFIG, *TINY, f"data.path={data}", "n_train=40", "n_test=16")
    assert out.returncode == 0, out.stderr[-2000:]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [
        f"data.path={data}",
        "optim.steps=8",
        "optim.accumulation_steps=2",
        "orchestration.checkpoint.period=3",
    ]
    train(full, *args)
    crash_after(full, resumed, 6)  # 40 sequences / 8 a step: step 6 is past the first epoch
    train(resumed, *args)
    assert losses(resumed) == losses(full)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_resume_and_rank_data(tmp_path, parallelism):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["optim.steps=6", "orchestration.checkpoint.period=3", f"cluster.parallelism={parallelism}"]
    train(full, *args, nproc=2)
    crash_after(full, resumed, 3)
    train(resumed, *args, nproc=2)
    assert losses(resumed) == losses(full)
    assert losses(full, 1) == losses(full)  # every rank logs the same global loss
    rank0 = read_jsonl(full / "metrics" / "raw_0.jsonl")[0]["rank_loss"]
    rank1 = read_jsonl(full / "metrics" / "raw_1.jsonl")[0]["rank_loss"]
    assert rank0 != rank1  # same weights at step 1, so different losses mean different data
    assert profile_steps(resumed, 1) == list(range(1, 7))
    # the consolidated model.pt of a sharded run evaluates, in one process, to the in-loop result
    in_loop = read_jsonl(full / "metrics" / "eval_0.jsonl")[-1]
    out = run_module("src.apps.gssm.eval", f"config={full}/config.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    offline = read_jsonl(full / "metrics" / "eval_0.jsonl")[-1]
    assert offline["step"] == in_loop["step"] == 6
    assert offline["loss"] == pytest.approx(in_loop["loss"], rel=1e-5)


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = ["optim.steps=400", "evaluation.period=0"]
    cmd = [
        sys.executable,
        "-m",
        "src.apps.gssm.train",
        CONFIG,
        f"orchestration.log_dir={stopped}",
        *TINY,
        *args,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw = stopped / "metrics" / "raw_0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not raw.exists() or len(raw.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpts = list_checkpoints(stopped / "checkpoints")
    assert len(ckpts) == 1 and 5 <= int(ckpts[0].name) < 400
    train(stopped, *args)  # resumes from the signal's checkpoint and finishes
    train(full, *args)
    assert losses(stopped) == losses(full)


def test_async_eval_guard_and_eval_script_clears_flag(tmp_path):
    log_dir = tmp_path / "run"
    args = ["optim.steps=6", "evaluation.period=2", "evaluation.asynchronous=true"]
    train(log_dir, *args, "orchestration.checkpoint.keep_only=1")
    ckpts = list_checkpoints(log_dir / "checkpoints")
    assert [p.name[-1] for p in ckpts] == ["2", "4", "6"]  # keep_only=1 spared the pending ones
    assert all(has_eval_flag(p) for p in ckpts)
    out = run_module("src.apps.gssm.eval", f"config={log_dir}/config.yaml", f"checkpoint={ckpts[0]}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bayes loss" in out.stdout
    assert not has_eval_flag(ckpts[0]) and has_eval_flag(ckpts[1])  # exactly the flag it was given
    (line,) = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert line["step"] == 2 and line["gap"] == pytest.approx(line["loss"] - line["bayes_loss"])
    bad = run_module("src.apps.gssm.eval", f"config={log_dir}/config.yaml", f"checkpoint={tmp_path}/nope")
    assert bad.returncode == 2 and "checkpoint" in bad.stderr


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    log_dir = tmp_path / "run"
    out = run_module(
        "src.apps.gssm.train",
        CONFIG,
        f"orchestration.log_dir={log_dir}",
        *TINY,
        "optim.steps=40",
        "orchestration.checkpoint.period=1",
        "optim.lr=1e30",
        "optim.clip=0",
        "optim.warmup=0",
    )
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: NonFiniteLossError: ")
    named = line.rsplit("last good checkpoint: ", 1)[1]
    kept = list_checkpoints(log_dir / "checkpoints")
    assert named == (str(kept[-1]) if kept else "none")
    # lr=1e30 ruins the weights at step 1: every checkpoint gave nan gradients, and is moved aside, not lost
    assert list((log_dir / "checkpoints").glob(".nonfinite-*"))


def test_flex_falls_back_to_sdpa_on_cpu_and_bf16_autocast(tmp_path):
    log_dir = tmp_path / "run"
    train(log_dir, "optim.steps=2", "model.attention=flex", "cluster.dtype=bfloat16")
    assert "training with sdpa instead" in (log_dir / "logs" / "rank_0.log").read_text()
    assert len(losses(log_dir)) == 2


def test_wandb_offline_resumes_the_same_run_and_gets_traces(tmp_path):
    log_dir = tmp_path / "run"
    args = ["optim.steps=4", "orchestration.wandb.mode=offline", "orchestration.checkpoint.period=2"]
    train(log_dir, *args, "orchestration.profiler.heavy.start=2", "orchestration.profiler.heavy.steps=1")
    run_id = (log_dir / "wandb" / "run_id").read_text()
    first = sorted((log_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and first[0].name.endswith(run_id)
    (trace,) = (log_dir / "profiler").glob("trace_rank0_*.json")
    assert (first[0] / "files" / trace.name).is_file()  # the profiler trace is attached to the run
    shutil.rmtree(list_checkpoints(log_dir / "checkpoints")[-1])
    train(log_dir, *args)
    runs = sorted(p.name for p in (log_dir / "wandb").glob("offline-run-*"))
    assert all(r.endswith(run_id) for r in runs) and len(runs) == 2


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(eager, "optim.steps=3")
    train(compiled, "optim.steps=3", "cluster.compile=true")
    for step, loss in losses(eager).items():
        assert losses(compiled)[step] == pytest.approx(loss, rel=1e-4)


@pytest.mark.slow
def test_debug_config_gets_within_005_nats_of_bayes(tmp_path):
    """The claim `make run` makes: the debug model ends within 0.05 nats/token of the true model."""
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    final = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert final["gap"] < 0.05, final


def test_bf16_autocast_resumes_exactly_and_tracks_fp32(tmp_path):
    full, resumed, fp32 = tmp_path / "full", tmp_path / "resumed", tmp_path / "fp32"
    args = ["optim.steps=12", "orchestration.checkpoint.period=6"]
    train(full, *args, "cluster.dtype=bfloat16")
    crash_after(full, resumed, 6)
    train(resumed, *args, "cluster.dtype=bfloat16")
    assert losses(resumed) == losses(full)  # exactly, in bf16 too
    train(fp32, *args)
    bf16, ref = losses(full), losses(fp32)
    assert bf16 != ref  # the autocast really ran
    assert all(abs(bf16[s] - ref[s]) < 0.02 * ref[s] for s in ref)  # within 2% at every step
