"""Shared test helpers: run entrypoints as real processes (one, or several under torchrun)."""

from __future__ import annotations

import os
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


def child_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
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


@pytest.fixture
def repo_root() -> Path:
    return ROOT
