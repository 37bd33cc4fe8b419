"""The core's promises under hostile use, through real GSSM runs: nothing non-finite is saved, a resume
cannot silently change what its checkpoints mean, one run per log dir, corrupt checkpoints are set aside,
a full or read-only disk ends with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.nanollama.monitor.checkpoint import list_checkpoints, verify_checkpoint
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import GSSM_TINY, ROOT, assert_bad_input, child_env, losses, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"
TINY = GSSM_TINY


def gssm(module: str, log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module(f"src.apps.gssm.{module}", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args)


def finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def one_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def test_the_nan_command_saves_only_finite_checkpoints_and_a_sane_lr_continues(tmp_path):
    """Issue 9's command: lr 1e6 ruins the weights at step 1 (step 2's gradient is exactly 0, then nan).
    Every checkpoint written is finite; those whose weights gave dead gradients, step 1's included, are
    moved aside, the error says none is left, and a restart with a sane LR starts afresh and learns."""
    log_dir = tmp_path / "nan"
    command = [
        "config=src/apps/gssm/configs/debug.yaml",
        "optim.lr=1e6",
        "optim.warmup=0",
        "optim.steps=50",
        "orchestration.checkpoint.period=1",
        "orchestration.checkpoint.keep_only=1",
        "orchestration.logging.period=1",
        f"orchestration.log_dir={log_dir}",
    ]
    out = run_module("src.apps.gssm.train", *command)
    assert out.returncode == 1
    line = one_line(out)
    assert "NonFiniteLossError" in line and line.endswith("last good checkpoint: none")
    saved = list((log_dir / "checkpoints").iterdir())
    assert saved and all(finite(p) for p in saved)  # moved aside, and nothing saved holds nan
    assert list_checkpoints(log_dir / "checkpoints") == []
    assert ".nonfinite-0000000001" in [p.name for p in saved]
    dead = [e for e in read_jsonl(log_dir / "metrics" / "events_0.jsonl") if e["event"] == "skipped_step"]
    assert [e["grad_norm"] for e in dead[:2]] == ["0.0", "nan"]

    out = run_module("src.apps.gssm.train", f"config={log_dir}/config.yaml", "optim.lr=1e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" not in (log_dir / "logs" / "rank_0.log").read_text()
    raw = read_jsonl(log_dir / "metrics" / "raw_0.jsonl")
    assert raw[-1]["step"] == 50 and raw[-1]["loss"] < 2.0  # below ln 8: it learns again
    assert all(finite(p) for p in list_checkpoints(log_dir / "checkpoints"))


def test_resume_refuses_a_shape_change_and_leaves_config_yaml_alone(tmp_path):
    log_dir = tmp_path / "run"
    args = ["optim.steps=4", "optim.scheduler=constant"]
    assert gssm("train", log_dir, *args).returncode == 0
    saved = (log_dir / "config.yaml").read_bytes()

    out = gssm("train", log_dir, *args, "model.dim=64")
    assert out.returncode == 2
    assert one_line(out).startswith("error: model.dim: 64 here, 32 in ")
    assert (log_dir / "config.yaml").read_bytes() == saved
    assert gssm("eval", log_dir).returncode == 0  # the run's own config still loads its checkpoints

    # what only steers the run from here may change: it is logged, recorded, and takes effect
    out = gssm("train", log_dir, "optim.steps=6", "optim.scheduler=constant", "optim.lr=0.01")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["lr"] for r in read_jsonl(log_dir / "metrics" / "raw_0.jsonl")][-2:] == [0.01, 0.01]
    changes = [e["change"] for e in read_jsonl(log_dir / "metrics" / "events_0.jsonl")]
    assert changes == ["optim.steps: 4 -> 6", "optim.lr: 0.003 -> 0.01"]  # debug.yaml: 3e-3
    assert "steps: 6" in (log_dir / "config.yaml").read_text()


def test_eval_with_a_config_that_does_not_fit_the_checkpoint_exits_2(tmp_path):
    log_dir = tmp_path / "run"
    assert gssm("train", log_dir, "optim.steps=2").returncode == 0
    out = run_module("src.apps.gssm.eval", f"config={log_dir}/config.yaml", "model.dim=64")
    assert_bad_input(out, "model.dim: 64 here, 32 in")
    ckpt = log_dir / "checkpoints" / "0000000002"
    other = tmp_path / "other"  # a checkpoint given by path, whose run config is gone: the shapes speak
    other.mkdir()
    os.rename(ckpt, other / ckpt.name)
    out = run_module(
        "src.apps.gssm.eval",
        f"config={log_dir}/config.yaml",
        "model.dim=64",
        f"checkpoint={other / ckpt.name}",
    )
    assert_bad_input(out, "tok_embeddings.weight has shape (8, 32), the config gives (8, 64)")


def test_a_second_run_on_the_same_log_dir_exits_2_naming_the_holder(tmp_path):
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY]
    first = subprocess.Popen(
        [*cmd, "optim.steps=100000"],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        raw = log_dir / "metrics" / "raw_0.jsonl"
        deadline = time.time() + 120
        while not (raw.exists() and raw.stat().st_size) and time.time() < deadline:
            time.sleep(0.2)
        out = gssm("train", log_dir, "optim.steps=100000")
        assert out.returncode == 2
        assert one_line(out).endswith(
            f"is in use by another run (host {os.uname().nodename}, pid {first.pid})"
        )
    finally:
        first.kill()  # kill -9: the kernel releases the lock, nothing stale is left
        first.wait()
    out = gssm("train", log_dir, "optim.steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(log_dir / "metrics" / "raw_0.jsonl")]
    assert steps == sorted(set(steps))  # one writer: no step twice, none out of order


@pytest.mark.slow
def test_a_truncated_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    args = ["optim.steps=6", "orchestration.checkpoint.period=3"]
    assert gssm("train", full, *args).returncode == 0
    assert gssm("train", run, *args).returncode == 0
    newest = run / "checkpoints" / "0000000006"
    shard = newest / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])

    out = run_module("src.apps.gssm.eval", f"config={run}/config.yaml")
    assert_bad_input(out, f"corrupt checkpoint {newest}")

    out = gssm("train", run, "optim.steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / ".corrupt-0000000006" / "dcp" / "__0_0.distcp").stat().st_size == 100
    assert f"corrupt checkpoint {newest}" in (run / "logs" / "rank_0.log").read_text()
    assert losses(run) == losses(full)  # resumed from step 3, exactly
    assert verify_checkpoint(newest) is None


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (root only; skipped elsewhere), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_with_one_line_and_a_rerun_cleans_up_first(tiny_disk):
    log_dir = tiny_disk / "run"
    args = ["optim.steps=200", "orchestration.checkpoint.period=1"]
    out = gssm("train", log_dir, *args)
    assert out.returncode == 1
    line = one_line(out)
    assert "No space left on device" in line and str(log_dir) in line
    assert not list((log_dir / "checkpoints").glob(".tmp-*"))
    kept = list_checkpoints(log_dir / "checkpoints")
    assert kept and all(verify_checkpoint(p) is None for p in kept)
    saved = (log_dir / "config.yaml").read_text()

    stale = log_dir / "checkpoints" / ".tmp-0000009999"  # as a kill -9 mid-save leaves it, filling the disk
    stale.mkdir()
    with open(stale / "shard", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
    out = gssm("train", log_dir, *args)  # removes it before writing anything, resumes, fills the disk again
    assert out.returncode == 1 and "No space left on device" in one_line(out)
    assert not stale.exists() and not (log_dir / "config.yaml.tmp").exists()
    assert "removed incomplete checkpoint folder" in (log_dir / "logs" / "rank_0.log").read_text()
    assert (log_dir / "config.yaml").read_text() == saved
    assert set(kept) <= set(list_checkpoints(log_dir / "checkpoints"))
    kept = list_checkpoints(log_dir / "checkpoints")

    with open(tiny_disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):  # full again
        while True:
            f.write(b"\0" * 4096)
    out = run_module("src.apps.gssm.eval", f"config={log_dir}/config.yaml")  # the result, then the failure
    assert out.returncode == 1 and out.stdout.startswith(f"step {kept[-1].name.lstrip('0')}: eval loss")
    assert one_line(out).endswith(f"No space left on device: '{log_dir}/metrics/eval_0.jsonl'")
    for jsonl in (log_dir / "metrics").glob("*.jsonl"):  # no torn line anywhere
        assert all(json.loads(line) for line in jsonl.read_text().splitlines())


@pytest.mark.slow
def test_a_read_only_run_prints_its_eval_and_refuses_to_train_in_one_line(tiny_disk):
    log_dir = tiny_disk / "run"
    assert gssm("train", log_dir, "optim.steps=2").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    out = run_module("src.apps.gssm.eval", f"config={log_dir}/config.yaml")
    assert out.returncode == 1
    assert out.stdout.startswith("step 2: eval loss ")  # the result first, then the failed record
    assert "Read-only file system" in one_line(out)
    out = gssm("train", log_dir, "optim.steps=4")
    assert_bad_input(out, "Read-only file system")
    args = [CONFIG, f"orchestration.log_dir={tiny_disk / 'new'}", *TINY]
    out = run_module("src.apps.gssm.train", *args, nproc=2, timeout=120)  # rank 1 must not wait forever
    assert out.returncode != 0 and "rank 0 could not take the log dir's lock" in out.stderr


@pytest.mark.slow
def test_two_ranks_fall_back_from_a_corrupt_checkpoint_and_refuse_a_world_size_change(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    args = ["optim.steps=6", "orchestration.checkpoint.period=3", "cluster.parallelism=fsdp"]
    for log_dir in (full, run):
        out = run_module(
            "src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args, nproc=2
        )
        assert out.returncode == 0, out.stderr[-3000:]
    saved = (run / "config.yaml").read_bytes()
    out = gssm("train", run, *args)  # one process on a 2-rank FSDP run
    assert out.returncode == 2 and "was saved by 2 ranks, this run has 1" in one_line(out)
    assert (run / "config.yaml").read_bytes() == saved

    shard = run / "checkpoints" / "0000000006" / "dcp" / "__1_0.distcp"  # rank 1's shard
    shard.write_bytes(shard.read_bytes()[:50])
    out = run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={run}", *TINY, *args, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / ".corrupt-0000000006").is_dir()
    assert losses(run) == losses(full) and losses(run, 1) == losses(full, 1)
