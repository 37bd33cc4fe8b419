"""The launcher against a real one-node SLURM started on this machine by `launcher/slurm_local.sh`.

Slow (about three minutes): run with `make test-slow`. Skipped, with the reason, where SLURM cannot be
installed or started (no root, no apt).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from src.nanollama.jobs import squeue_jobs
from src.nanollama.monitor.checkpoint import has_eval_flag, list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.monitor.results import load_sweep, sweep_status
from tests.conftest import (
    LAUNCHER_SWEEP,
    LAUNCHER_TINY,
    LAUNCHER_TRAIN,
    ROOT,
    child_env,
    launch,
    losses,
    run_module,
)

pytestmark = pytest.mark.slow

SWEEP, TRAIN, TINY = LAUNCHER_SWEEP, LAUNCHER_TRAIN, LAUNCHER_TINY

SLURM_DIR = Path(os.environ.get("NANOLLAMA_SLURM_DIR", "/tmp/nanollama-slurm"))


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    """Start the local SLURM for this module (or use the one already running), stop it if we started it."""
    script = ROOT / "launcher" / "slurm_local.sh"
    was_running = (
        "slurmctld: running"
        in subprocess.run(["bash", str(script), "status"], capture_output=True, text=True).stdout
    )
    if not was_running:
        start = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600)
        if start.returncode != 0:
            pytest.skip(f"no local SLURM: {start.stderr.strip() or start.stdout.strip()}")
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    yield
    if not was_running:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120)


def launch_debug(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The GSSM debug run as a one-task job on the local SLURM."""
    config = ROOT / "src/apps/gssm/configs/debug.yaml"
    return launch(
        f"script={TRAIN}", f"config={config}", "launcher=sbatch", f"launcher.log_dir={log_dir}", *args
    )


def submitted_job(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    words = out.stdout.split("submitted job ")[1].split(":")[0]
    return words.strip()


def wait_for(job_id: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while squeue_jobs(job_id):
        assert time.time() < deadline, f"job {job_id} still queued: {squeue_jobs(job_id)}"
        time.sleep(1)


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sweep_through_sbatch_runs_every_task(tmp_path):
    log_dir = tmp_path / "sweep"
    out = launch(
        f"script={TRAIN}", f"config={SWEEP}", "launcher=sbatch", f"launcher.log_dir={log_dir}", *TINY
    )
    job = submitted_job(out)
    assert "4 task(s)" in out.stdout
    script = next((log_dir / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%4" in script and "#SBATCH --signal=USR2@60" in script
    wait_for(job)
    status = sweep_status(log_dir)
    assert list(status["state"]) == ["done"] * 4, status
    for task in status.to_dict("records"):
        run = yaml.safe_load((log_dir / "runs" / str(task["task"]) / "config.yaml").read_text())
        assert (run["optim"]["lr"], run["model"]["dim"]) == (task["optim.lr"], task["model.dim"])
        assert losses(log_dir / "runs" / str(task["task"]))
    assert len(load_sweep(log_dir)) == 8


def test_signalled_task_checkpoints_requeues_and_ends_like_an_uninterrupted_run(tmp_path):
    log_dir = tmp_path / "sweep"
    args = [*TINY, "optim.steps=300", "orchestration.logging.period=10", "model.n_layers=1"]
    out = launch_debug(log_dir, *args)
    job = submitted_job(out)
    raw = log_dir / "runs" / "0" / "metrics" / "raw_0.jsonl"
    wait_until(lambda: raw.is_file() and len(raw.read_text().splitlines()) >= 3, what="training to start")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before the time limit
    status = log_dir / "tasks" / "0.status"
    wait_until(lambda: '"requeued"' in status.read_text(), what="the requeue")
    # the local SLURM lets a requeued job start again after cred_expire=10 s (SLURM's default: 2 minutes)
    wait_until(lambda: '"done"' in status.read_text() or not squeue_jobs(job), timeout=300, what="the rerun")
    assert '"done"' in status.read_text(), (log_dir / "submitit" / f"{job}_0_log.err").read_text()[-2000:]
    steps = [int(p.name) for p in list_checkpoints(log_dir / "runs" / "0" / "checkpoints")]
    assert steps[-1] == 300
    reference = tmp_path / "reference"
    done = run_module(TRAIN, f"config={log_dir / 'tasks' / '0.yaml'}", f"orchestration.log_dir={reference}")
    assert done.returncode == 0, done.stderr
    assert losses(log_dir / "runs" / "0") == losses(reference)
    assert "preempted" in (log_dir / "runs" / "0" / "logs" / "rank_0.log").read_text()


def test_torchrun_task_runs_two_processes_on_one_node(tmp_path):
    log_dir = tmp_path / "sweep"
    torchrun = ["torchrun=true", "launcher.nproc_per_node=2", "launcher.slurm.cpus_per_task=2"]
    out = launch_debug(log_dir, *torchrun, *TINY)
    wait_for(submitted_job(out))
    assert list(sweep_status(log_dir)["state"]) == ["done"]
    run = log_dir / "runs" / "0"
    assert losses(run, 0).keys() == losses(run, 1).keys() == {3, 6}


def test_async_eval_job_on_slurm_clears_its_flag(tmp_path):
    log_dir = tmp_path / "sweep"
    args = [*TINY, "evaluation.period=3", "evaluation.asynchronous=true", "model.n_layers=1"]
    out = launch_debug(log_dir, *args)
    wait_for(submitted_job(out))
    run = log_dir / "runs" / "0"
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [int(p.name) for p in checkpoints] == [3, 6]
    wait_until(lambda: not squeue_jobs(""), timeout=300, what="the eval jobs")
    assert not any(has_eval_flag(p) for p in checkpoints)
    lines = [r for r in read_jsonl(run / "metrics" / "eval_0.jsonl") if "checkpoint" in r]
    assert sorted(r["step"] for r in lines) == [3, 6]
    assert "submitted for" in (run / "logs" / "rank_0.log").read_text()


def test_same_sweep_through_bash(tmp_path):
    log_dir = tmp_path / "sweep"
    out = launch(f"script={TRAIN}", f"config={SWEEP}", "launcher=bash", f"launcher.log_dir={log_dir}", *TINY)
    assert out.returncode == 0, out.stderr
    assert list(sweep_status(log_dir)["state"]) == ["done"] * 4
    assert sorted(set(load_sweep(log_dir)["task"])) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------- stop


def free_port_pair() -> int:
    """A port p with p + 1 free too (slurmctld's and slurmd's), away from the module's SLURM."""
    for port in range(6900, 7000, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    pytest.skip("no free port pair in 6900-6999")


def processes_of(conf: Path) -> list[str]:
    """Command lines of the live processes (zombies are dead) with SLURM_CONF=conf in their environment:
    the daemons' slurmstepds and every job process (the submitter's environment travels with the job)."""
    needle = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0") or not alive(int(proc.name)):
                continue
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:  # gone meanwhile
            continue
        found.append(f"{proc.name}: " + " ".join(a.decode(errors="replace") for a in argv))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_cancels_running_jobs_and_leaves_none_of_their_processes():
    """`stop` while a job runs: its srun and slurmstepds would wait forever on the stopped controller; they
    must be cancelled and gone, then the daemons. Twice: a job that ends on SLURM's SIGTERM, then one whose
    task ignores it (killed once the bounded wait is over), the SLURM restarted in between. On a SLURM of
    its own (its own folder and ports), so the module's SLURM and its jobs are untouched."""
    script = ROOT / "launcher" / "slurm_local.sh"
    folder = Path(tempfile.mkdtemp(prefix="nanollama-slurm-stop-", dir="/tmp"))  # short: a socket lives there
    env = child_env(NANOLLAMA_SLURM_DIR=str(folder), NANOLLAMA_SLURM_PORT=str(free_port_pair()))
    conf = folder / "slurm.conf"

    def local(command: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(script), command], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )

    def stop_while_running(task: str, seconds: str, **extra: str) -> tuple[str, float]:
        started = local("start")
        assert started.returncode == 0 and "idle" in started.stdout, started.stderr + started.stdout
        daemons = [int((folder / f"{name}.pid.bg").read_text()) for name in ("slurmctld", "slurmd", "munged")]
        sbatch = ["sbatch", "-o", str(folder / "job.out"), "--wrap", f"srun {task}"]
        job_env = {**env, "SLURM_CONF": str(conf)}
        job = subprocess.run(sbatch, env=job_env, capture_output=True, text=True, check=True).stdout.split()[
            -1
        ]
        wait_until(
            lambda: any(p.endswith(f"sleep {seconds}") for p in processes_of(conf) if "srun" not in p),
            timeout=60,
            what=f"job {job}'s task to start",
        )
        running = processes_of(conf)
        assert any("slurmstepd" in p for p in running) and any("srun" in p for p in running), running
        t0 = time.time()
        stopped = local("stop", **extra)
        took = time.time() - t0
        assert stopped.returncode == 0 and "SLURM stopped" in stopped.stdout, stopped.stderr
        assert f"cancelling job(s) {job}" in stopped.stdout
        assert processes_of(conf) == []  # no slurmstepd, srun or sleep of the job, no daemon
        assert not any(alive(pid) for pid in daemons)
        return stopped.stdout, took

    try:
        out, took = stop_while_running("sleep 3171", "3171")
        assert "leftover" not in out and took < 20, (out, took)  # ends on SIGTERM: no waiting out the bound
        ignoring = "bash -c \"trap '' TERM; sleep 3172\""  # outlives SLURM's SIGTERM (KillWait is 30 s)
        out, took = stop_while_running(ignoring, "3172", NANOLLAMA_SLURM_STOP_WAIT="3")
        assert "killing leftover job processes" in out and took < 20, (out, took)
    finally:
        local("stop")
        shutil.rmtree(folder, ignore_errors=True)
    assert processes_of(conf) == []
