"""Shared test helpers: run entrypoints as real processes (one, or several under torchrun)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests use tiny tensors: a second OpenMP thread only spin-waits (10x slower on a busy 2-core box).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "tmp" / "inductor"))


# A GSSM debug run small enough for a test: a few seconds a run.
GSSM_TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "data.seq_len=16",
    "data.batch_size=8",
    "optim.warmup=2",
    "orchestration.logging.period=1",
    "evaluation.n_sequences=16",
    "evaluation.batch_size=8",
    "orchestration.checkpoint.keep_only=0",
]


def child_env(**extra: str) -> dict:
    from src.nanollama.jobs import clean_env

    env = clean_env()  # as from a fresh shell: no SLURM job or process group of ours (SLURM_CONF stays)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_module(
    module: str, *args: str, nproc: int = 1, timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root, or under `torchrun --standalone` with `nproc` ranks."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def assert_bad_input(out: subprocess.CompletedProcess, needle: str, log_dir: Path | None = None) -> None:
    """Bad input: exit code 2, one line on stderr that names the culprit, and no run folder created."""
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert log_dir is None or not log_dir.exists()


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def losses(log_dir: Path, rank: int = 0) -> dict[int, float]:
    """Step -> loss of a run's training metrics."""
    from src.nanollama.monitor.logger import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(log_dir / "metrics" / f"raw_{rank}.jsonl")}


def crash_after(src: Path, dst: Path, step: int) -> None:
    """A copy of a run as if it had died after its checkpoint at `step` (its later files still there)."""
    from src.nanollama.monitor.checkpoint import list_checkpoints

    shutil.copytree(src, dst)
    for path in list_checkpoints(dst / "checkpoints"):
        if int(path.name) > step:
            shutil.rmtree(path)
    assert int(list_checkpoints(dst / "checkpoints")[-1].name) == step
