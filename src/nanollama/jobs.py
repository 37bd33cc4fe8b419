"""Jobs outside this process: SLURM resources, submission through submitit, and clean child environments.

Used by the launcher (one SLURM array per sweep) and by the Monitor (one job per asynchronous evaluation).
A submitted `Command` runs its shell command in a child process. When SLURM signals the job before its
time limit (or on preemption), submitit calls `Command.checkpoint`: the training process has received
the same signal (SLURM signals every process of the step), so we wait for it to checkpoint and exit,
then submitit requeues the job, which runs the command again and resumes from that checkpoint.

Job states are never read from `sacct` (clusters without accounting have none): each command writes
its own status file, and `squeue` says what is still queued or running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .config import ConfigError

logger = logging.getLogger(__name__)

# What a job or a distributed run tells its processes about their place; a child job must not inherit it.
LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_", "TORCHELASTIC_", "PMI_", "PMIX_")
LEAKY_NAMES = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
}
KEPT = {"SLURM_CONF"}  # where the cluster's config is: clients need it, it says nothing about this job


@dataclass
class SlurmConfig:
    """Resources of one SLURM job (per array task for a sweep)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str = ""  # e.g. "64G"; empty: the partition's default
    time: int = 60  # minutes
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    signal_time: int = 120  # seconds before the time limit at which the job checkpoints and requeues
    max_parallel: int = 0  # array tasks running at once (0: no limit)

    def check(self) -> None:
        for key in ("nodes", "cpus_per_task", "time"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "signal_time", "max_parallel"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.signal_time >= self.time * 60:
            raise ConfigError("signal_time", f"{self.signal_time} s is not below the time limit")


@dataclass
class EvalJobConfig:
    """Where evaluations of eval-flagged checkpoints run (apps' `evaluation.asynchronous`)."""

    script: str = ""  # the app's eval module, e.g. src.apps.gssm.eval; empty: flagged checkpoints wait
    launcher: str = "local"  # local: a background process on this machine | sbatch: a SLURM job
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    setup: list[str] = field(default_factory=list)  # shell lines run before the SLURM job's command

    def check(self) -> None:
        if self.launcher not in ("local", "sbatch"):
            raise ConfigError("launcher", f"'{self.launcher}' is not one of local, sbatch")


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: ours) without the variables that place a process inside a job or a process group."""
    env = dict(os.environ if env is None else env)
    return {
        k: v for k, v in env.items() if k in KEPT or not (k in LEAKY_NAMES or k.startswith(LEAKY_PREFIXES))
    }


@contextlib.contextmanager
def clean_environment() -> Iterator[None]:
    """Run a submission as if from a fresh shell: sbatch reads SLURM_*/SBATCH_* input variables, and the
    job inherits our environment, so a job submitted from inside a job must not see the parent's."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_env(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def write_status(path: str | os.PathLike, state: str, **info: object) -> None:
    """A task's state (running, requeued, done, failed), written atomically for the launcher's tables."""
    record = {"state": state, "host": socket.gethostname(), "time": time.time(), **info}
    record["job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", ""))
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


class Command:
    """A command run by a SLURM job (through submitit) or in this process; requeued when signalled.

    `stdout`/`stderr` are appended to (a requeued job adds to the same files). The command (a sweep's
    `run.sh`) keeps its own `status` file (running, done, failed, stopped); this only adds `requeued`.
    """

    def __init__(
        self, argv: list[str], status: str = "", stdout: str = "", stderr: str = "", grace_s: float = 60.0
    ):
        self.argv, self.status, self.stdout, self.stderr = argv, status, stdout, stderr
        self.grace_s = grace_s  # how long a signalled command may take to checkpoint before the requeue
        self._pid = 0

    def _set_status(self, state: str, **info: object) -> None:
        if self.status and os.environ.get("SLURM_PROCID", "0") == "0":
            write_status(self.status, state, **info)

    def __call__(self) -> int:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(self.stdout, "a")) if self.stdout else None
            err = stack.enter_context(open(self.stderr, "a")) if self.stderr else None
            proc = subprocess.Popen(self.argv, stdout=out, stderr=err)
            self._pid = proc.pid
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"{' '.join(self.argv)} exited with code {code}")
        return code

    def checkpoint(self):  # noqa: ANN201 (a submitit DelayedSubmission)
        """Called by submitit when the job is signalled: let the command checkpoint, then requeue it.

        This runs inside a signal handler while `__call__` waits on the child, so the child is reaped
        with `os.waitpid` rather than `Popen.wait` (whose lock the interrupted wait holds)."""
        import submitit

        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGUSR1)  # in case the signal did not reach it
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(self._pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.2)
        self._set_status("requeued")
        self._pid = 0
        return submitit.helpers.DelayedSubmission(self)


def sbatch_parameters(slurm: SlurmConfig, name: str, tasks_per_node: int, setup: list[str]) -> dict:
    """submitit's SlurmExecutor parameters for these resources."""
    params: dict = {
        "job_name": name,
        "nodes": slurm.nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "time": slurm.time,
        "signal_delay_s": slurm.signal_time,
        "setup": list(setup),
        "stderr_to_stdout": False,
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.max_parallel:
        params["array_parallelism"] = slurm.max_parallel
    for key in ("mem", "partition", "account", "qos", "constraint", "exclude"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    return params


def sbatch_script(params: dict, folder: str | os.PathLike, array_size: int = 0) -> str:
    """The sbatch script submitit writes for these parameters (to show and test what gets submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command, folder, map_count=array_size or None, **params)


def submit(commands: list[Command], params: dict, folder: str | os.PathLike) -> str:
    """Submit the commands as one SLURM job (an array when more than one); returns the job id.

    The environment is cleaned first, so a job submitted from inside a job starts afresh."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder))
    executor.update_parameters(**params)
    with clean_environment():
        if len(commands) == 1:
            job = executor.submit(commands[0])
        else:
            with executor.batch():
                jobs = [executor.submit(command) for command in commands]
            job = jobs[0]
    return str(job.job_id).split("_")[0]


def submit_eval_job(cfg: EvalJobConfig, log_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> str:
    """Evaluate an eval-flagged checkpoint in a job of its own; returns the SLURM job id or the pid."""
    log_dir, checkpoint = Path(log_dir).resolve(), Path(checkpoint).resolve()
    argv = [sys.executable, "-m", cfg.script, f"config={log_dir / 'config.yaml'}", f"checkpoint={checkpoint}"]
    out = log_dir / "logs" / f"eval_{checkpoint.name}"
    if cfg.launcher == "sbatch":
        command = Command(argv, stdout=f"{out}.out", stderr=f"{out}.err", grace_s=cfg.slurm.signal_time / 2)
        params = sbatch_parameters(cfg.slurm, f"eval_{checkpoint.name}", 1, cfg.setup)
        return submit([command], params, log_dir / "submitit")
    with open(f"{out}.out", "a") as stdout, open(f"{out}.err", "a") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=clean_env(), start_new_session=True)
    return str(proc.pid)


def squeue_jobs(job_id: str = "") -> list[str]:
    """The array tasks (or the job) of `job_id` still queued or running, e.g. ["12_0", "12_3"]; all jobs
    without an id."""
    select = ["-j", job_id] if job_id else []
    out = subprocess.run(
        ["squeue", "-h", "-r", *select, "-o", "%i"], capture_output=True, text=True, check=False
    )
    return out.stdout.split() if out.returncode == 0 else []
