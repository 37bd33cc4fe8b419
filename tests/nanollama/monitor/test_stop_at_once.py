"""A step that does not end does not hold a signalled run hostage: a second SIGTERM, or one pending past
`orchestration.preemption_grace_s`, stops it at once with one line, and what was saved stays whole."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from src.nanollama.monitor.checkpoint import list_checkpoints
from tests.conftest import ROOT, child_env, losses, run_module

# every step evaluates 16k sequences (seconds a step), so a signal lands mid-step
SLOW = ["config=src/apps/gssm/configs/debug.yaml", "optim.steps=3", "evaluation.period=1"]
SLOW += ["evaluation.n_sequences=16384", "evaluation.batch_size=64", "orchestration.checkpoint.period=1"]


def start(log_dir, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "src.apps.gssm.train", *SLOW, f"orchestration.log_dir={log_dir}", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(log_dir, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(log_dir / "checkpoints"):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    time.sleep(0.5)  # into step 2's evaluation


def stopped(proc: subprocess.Popen) -> tuple[float, str]:
    begin = time.monotonic()
    _, err = proc.communicate(timeout=60)
    return time.monotonic() - begin, err


def test_a_second_signal_stops_the_run_mid_step(tmp_path):
    log_dir = tmp_path / "run"
    proc = start(log_dir, "orchestration.preemption_grace_s=0")
    wait_for_checkpoint(log_dir, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    seconds, err = stopped(proc)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "received SIGTERM again" in lines[0], err[-2000:]
    assert seconds < 5  # not at the end of a step that takes several
    assert [p.name for p in list_checkpoints(log_dir / "checkpoints")] == ["0000000001"]  # whole
    out = run_module(
        "src.apps.gssm.train", *SLOW, "evaluation.n_sequences=64", f"orchestration.log_dir={log_dir}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (log_dir / "logs" / "rank_0.log").read_text() and max(losses(log_dir)) == 3


def test_a_signal_pending_past_the_grace_stops_the_run(tmp_path):
    log_dir = tmp_path / "run"
    proc = start(log_dir, "orchestration.preemption_grace_s=1")
    wait_for_checkpoint(log_dir, proc)
    proc.send_signal(signal.SIGTERM)
    seconds, err = stopped(proc)
    assert proc.returncode == 1 and "preemption_grace_s=1 s" in err, err[-2000:]
    assert seconds < 5
