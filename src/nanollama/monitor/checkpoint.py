"""Atomic, resumable checkpoints with an eval guard.

Layout of one checkpoint, `checkpoints/{step:010d}/`:
    dcp/            model + optimizer through torch.distributed.checkpoint (sharded under FSDP)
    model.pt        consolidated model weights, for evaluation and notebooks
    state_{rank}.pt everything else a rank needs to continue exactly (step, scheduler, data, RNG, ...)
    data_{rank}.json what the rank's data loader had consumed (sources, epochs, documents, tokens), to read
    eval            present while an evaluation of this checkpoint is pending

A checkpoint is written to `.tmp-{step}` and renamed when complete, so a crash mid-save never
leaves a folder that a restart would load. `keep_only` never removes an eval-flagged checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..config import ConfigError

logger = logging.getLogger(__name__)

EVAL_FLAG = "eval"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case for us."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class CheckpointConfig:
    period: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_only: int = 0  # how many checkpoints to keep (0: all); eval-flagged ones are never removed

    def check(self) -> None:
        for key in ("period", "keep_only"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


def checkpoint_name(step: int) -> str:
    return f"{step:010d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-deleted folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and len(p.name) == 10)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name)


def has_eval_flag(path: str | os.PathLike) -> bool:
    return (Path(path) / EVAL_FLAG).exists()


def clear_eval_flag(path: str | os.PathLike) -> bool:
    """Clear exactly this checkpoint's flag; returns whether one was set."""
    flag = Path(path) / EVAL_FLAG
    if flag.exists():
        flag.unlink()
        return True
    return False


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(checkpoint: str, log_dir: str | os.PathLike) -> Path:
    """An explicit checkpoint folder, or else the latest one of a run (for evaluation and probing)."""
    if checkpoint:
        if not (Path(checkpoint) / "model.pt").is_file():
            raise ConfigError("checkpoint", f"{checkpoint} is not a checkpoint folder (no model.pt)")
        return Path(checkpoint)
    path = latest_checkpoint(Path(log_dir) / "checkpoints")
    if path is None:
        raise ConfigError("orchestration.log_dir", f"no checkpoint in {log_dir}")
    return path


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load the consolidated weights of a checkpoint folder into an unwrapped model."""
    file = Path(path) / "model.pt"
    if not file.is_file():
        raise ConfigError("checkpoint", f"no model.pt in {path}")
    model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))


class Checkpointer:
    """Saves and restores the whole training state; every rank calls `save`/`load` together."""

    def __init__(self, cfg: CheckpointConfig, root: str | os.PathLike, rank: int = 0, world_size: int = 1):
        self.cfg, self.root = cfg, Path(root)
        self.rank, self.world_size = rank, world_size

    def __enter__(self) -> Checkpointer:
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.iterdir():
                if stale.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    logger.warning(f"removing incomplete checkpoint folder {stale}")
                    shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rank_state: dict[str, Any],
        eval_flag: bool = False,
        records: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically; an existing one of the same step only gains the flag.

        `records` maps file names to JSON-able objects this rank writes into the checkpoint."""
        final = self.root / checkpoint_name(step)
        if final.exists():
            if eval_flag and self.rank == 0:
                (final / EVAL_FLAG).touch()
            return final
        start = time.perf_counter()
        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.save(rank_state, tmp / f"state_{self.rank}.pt")
        for name, record in (records or {}).items():
            (tmp / name).write_text(json.dumps(record, indent=1) + "\n")
        if self.rank == 0:
            torch.save(full, tmp / "model.pt")
            if eval_flag:
                (tmp / EVAL_FLAG).touch()
        self._barrier()
        if self.rank == 0:
            os.rename(tmp, final)
            self._keep_only()
        self._barrier()
        logger.info(f"saved checkpoint {final} in {time.perf_counter() - start:.2f}s")
        return final

    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer in place; return this rank's saved state."""
        path = Path(path)
        state_file = path / f"state_{self.rank}.pt"
        saved_ranks = len(list(path.glob("state_*.pt")))
        if saved_ranks != self.world_size:
            raise ConfigError(
                "checkpoint", f"{path} was saved by {saved_ranks} ranks, this run has {self.world_size}"
            )
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        logger.info(f"resumed from {path}")
        return torch.load(state_file, map_location="cpu", weights_only=False)

    def _keep_only(self) -> None:
        """Remove the oldest checkpoints beyond `keep_only`, except those awaiting evaluation."""
        if self.cfg.keep_only <= 0:
            return
        for old in list_checkpoints(self.root)[: -self.cfg.keep_only]:
            if has_eval_flag(old):
                continue
            trash = old.with_name(TRASH_PREFIX + old.name)
            os.rename(old, trash)  # a crash mid-delete leaves no half checkpoint behind
            shutil.rmtree(trash, ignore_errors=True)
