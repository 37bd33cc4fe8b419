"""`python -m src.nanollama.runs`: real tiny GSSM runs that finished, failed (nan), were preempted (SIGTERM)
and are running (a live process holds the lock), one nested as a sweep's would be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.nanollama import runs
from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.monitor.lock import LogDirLock
from tests.conftest import GSSM_TINY, ROOT, child_env, crash_after, run_module

TRAIN = [sys.executable, "-m", "src.apps.gssm.train", "config=src/apps/gssm/configs/debug.yaml", *GSSM_TINY]
DONE = ["optim.steps=4", "orchestration.checkpoint.period=2", "evaluation.period=2"]
HOLD = "import sys; from src.nanollama.monitor.lock import LogDirLock; LogDirLock(sys.argv[1]).acquire(); "
HOLD += "print('held', flush=True); sys.stdin.read()"


def start(log_dir: Path, name: str, *args: str) -> subprocess.Popen:
    cmd = [*TRAIN, f"orchestration.log_dir={log_dir}", f"orchestration.name={name}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def copy_at_step(src: Path, dst: Path, name: str, step: int) -> None:
    """A copy of a finished run as a run killed (SIGKILL, a lost node) after its step `step` looks: its
    metrics end there, its checkpoints too (conftest's crash_after, which keeps the later lines)."""
    crash_after(src, dst, step)
    raw = dst / "metrics" / "raw_0.jsonl"
    raw.write_text("".join(line for line in raw.read_text().splitlines(keepends=True)[:step]))
    config = dst / "config.yaml"
    config.write_text(config.read_text().replace("name: done", f"name: {name}"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two real runs at once (one SIGTERMed), then copies of the finished one as a killed run (in a sweep
    folder) and as a live one (a process holds its lock)."""
    root = tmp_path_factory.mktemp("runs")
    done = start(root / "done", "done", *DONE)
    preempted = start(root / "preempted", "preempted", "optim.steps=400", "evaluation.period=0")
    raw = root / "preempted" / "metrics" / "raw_0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not raw.exists() or len(raw.read_text().splitlines()) < 3):
        time.sleep(0.1)
    preempted.send_signal(signal.SIGTERM)
    assert preempted.wait(60) == 0, preempted.stderr.read().decode()[-3000:]
    assert done.wait(120) == 0, done.stderr.read().decode()[-3000:]
    copy_at_step(root / "done", root / "sweep" / "runs" / "0", "failed", 2)
    copy_at_step(root / "done", root / "running", "running", 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root / "running")],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    yield root
    holder.stdin.close()
    holder.wait(30)


def rows(capsys, *argv: str) -> list[list[str]]:
    assert runs.main(list(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [line.split() for line in lines[1:]]


def test_list_names_states_and_steps(root, capsys):
    found = {r.name: r for r in runs.list_runs(root)}
    assert {name: r.state for name, r in found.items()} == {
        "done": "done",
        "failed": "failed",
        "preempted": "preempted",
        "running": "running",
    }
    assert {r.app for r in found.values()} == {"gssm"}
    assert (found["done"].step, found["done"].total, found["running"].step) == (4, 4, 2)
    assert 0 < found["preempted"].step < 400 and found["failed"].step == 2
    assert set(found["done"].eval) >= {"loss", "bayes_loss", "gap"}
    assert found["failed"].path == root / "sweep" / "runs" / "0"  # nested runs are found
    table = rows(capsys, "list", str(root))
    assert {row[0] for row in table} == set(found)
    done = next(row for row in table if row[0] == "done")
    assert done[1:3] == ["gssm", "4/4"] and float(done[3]) == pytest.approx(found["done"].loss, rel=1e-3)


def test_sort_and_limit(root, capsys):
    by_step = [row[0] for row in rows(capsys, "list", str(root), "--sort", "step")]
    steps = {r.name: r.step for r in runs.list_runs(root)}
    assert [steps[name] for name in by_step] == sorted(steps.values(), reverse=True)
    by_loss = runs.list_runs(root, sort="loss")
    assert [r.loss for r in by_loss] == sorted(r.loss for r in by_loss)
    assert [row[0] for row in rows(capsys, "list", str(root), "--sort", "loss", "--limit", "2")] == [
        r.name for r in by_loss[:2]
    ]
    by_date = runs.list_runs(root, sort="date")
    assert [r.started for r in by_date] == sorted((r.started for r in by_date), reverse=True)


def test_show_config_differences_and_checkpoint_flags(root, capsys):
    done = root / "done"
    (list_checkpoints(done / "checkpoints")[0] / "eval").touch()  # an evaluation of step 2 pending
    try:
        assert runs.main(["show", str(done)]) == 0
    finally:
        (list_checkpoints(done / "checkpoints")[0] / "eval").unlink()
    out = capsys.readouterr().out
    assert "app gssm (src.apps.gssm.train), done, step 4/4" in out
    assert "  optim.steps: 1000 -> 4" in out and "  model.dim: 64 -> 32" in out
    assert "orchestration.seed" not in out  # the default, unchanged
    assert "  0000000002  eval pending, confirmed" in out
    assert "  0000000004  -" in out  # the last one: no step after it confirmed it


def test_bad_root_and_path_exit_2_with_one_line(root, tmp_path, capsys):
    def one_line() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    bad = ((["list", str(tmp_path / "missing")], "ROOT"), (["show", str(root)], "not a run folder"))
    for argv, words in bad:
        with pytest.raises(SystemExit) as exit:
            runs.main(argv)
        assert exit.value.code == 2 and words in one_line()
    for argv in (["list", "--sort", "speed"], ["list", "--limit", "x"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit:
            runs.main(argv)
        assert exit.value.code == 2
        one_line()
    out = run_module("src.nanollama.runs", "list", str(tmp_path / "missing"))
    assert (
        out.returncode == 2 and out.stderr.strip() == f"error: ROOT: {tmp_path / 'missing'} is not a folder"
    )


def test_a_lock_held_by_this_process_reads_as_held_and_stays_held(tmp_path):
    """lockf locks belong to the process: probing our own lock by opening and closing the file would
    drop it, so the holder line decides."""
    lock = LogDirLock(tmp_path)
    assert lock.acquire() is None
    try:
        assert runs.lock_held(tmp_path) and runs.lock_held(tmp_path)
        probe = "import sys; from src.nanollama.monitor.lock import LogDirLock; "
        probe += "print(LogDirLock(sys.argv[1]).acquire() is not None)"
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True)
        assert out.stdout.strip() == b"True"  # still ours
    finally:
        lock.release()
    assert not runs.lock_held(tmp_path)


def test_a_closed_pipe_ends_quietly(root):
    """`runs show RUN | head -1`: the reader is gone before the output is written, no traceback."""
    read, write = os.pipe()
    os.close(read)
    cmd = [sys.executable, "-m", "src.nanollama.runs", "list", str(root)]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert out.returncode == 1 and out.stderr == ""
