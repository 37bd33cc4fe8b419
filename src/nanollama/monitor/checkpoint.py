"""Atomic, resumable checkpoints with an eval guard.

Layout of one checkpoint, `checkpoints/{step:010d}/`:
    dcp/            model + optimizer (+ the weights' EMA) through torch.distributed.checkpoint (sharded
                    under FSDP)
    model.pt        consolidated model weights, for evaluation and notebooks
    ema.pt          consolidated EMA of the weights, same keys (only with `optim.ema_decay` > 0)
    state_{rank}.pt everything else a rank needs to continue exactly (step, scheduler, data, RNG, ...)
    data_{rank}.json what the rank's data loader had consumed (sources, epochs, documents, tokens), to read
    manifest.json   every file's size and CRC-32, written last (manifest.py)
    confirmed       present once a step from these weights had finite gradients
    eval            present while an evaluation of this checkpoint is pending

A checkpoint is written to `.tmp-{step}` and renamed when complete, so a crash mid-save never
leaves a folder that a restart would load; a failed write (full disk) removes its `.tmp-` folder and
stops the run with one line. Nothing non-finite is ever saved. A checkpoint that fails its manifest
on load is moved aside to `.corrupt-{step}` (never deleted) and the previous one is loaded instead.

A checkpoint is *confirmed* once a step from its weights had finite gradients. When a run stops on
non-finite gradients or loss, the unconfirmed checkpoints (their weights gave nan) are moved aside to
`.nonfinite-{step}`, so the next start resumes from the newest confirmed one. `keep_only` never removes
an eval-flagged checkpoint, the newest confirmed one, or an unconfirmed one. With loss-spike detection
(spikes.py) a step must also be no spike to confirm: the newest confirmed checkpoint is the rollback
target, and a rollback moves the ones after it to `.spike-{step}`.
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
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..config import ConfigError, RunError
from ..model.io import EMA_WEIGHTS, WEIGHTS, check_shapes, load_weights
from .files import naming, write_synced
from .manifest import checksum_part, verify_checkpoint, write_manifest

if TYPE_CHECKING:
    from ..optim import EMA

logger = logging.getLogger(__name__)

EVAL_FLAG = "eval"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"
CORRUPT_PREFIX = ".corrupt-"
NONFINITE_PREFIX = ".nonfinite-"
SPIKE_PREFIX = ".spike-"
CONFIRMED = "confirmed"


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (full disk, read-only folder); its `.tmp-` folder is removed."""


class NonFiniteStateError(RunError):
    """The model or optimizer holds nan or inf: such a state is never saved."""


class CorruptCheckpointError(RunError):
    """A checkpoint that fails its manifest or cannot be read."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"corrupt checkpoint {path}: {problem}")


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
    """An explicit checkpoint folder, or else the latest one of a run (for evaluation and probing); either
    must pass its manifest (ConfigError naming it otherwise)."""
    if checkpoint:
        if not (Path(checkpoint) / "model.pt").is_file():
            raise ConfigError("checkpoint", f"{checkpoint} is not a checkpoint folder (no model.pt)")
        path = Path(checkpoint)
    else:
        path = latest_checkpoint(Path(log_dir) / "checkpoints")
        if path is None:
            raise ConfigError("orchestration.log_dir", f"no checkpoint in {log_dir}")
    problem = verify_checkpoint(path, only=(WEIGHTS,))  # evaluation reads the weights alone
    if problem:
        raise ConfigError("checkpoint", f"corrupt checkpoint {path}: {problem}")
    return path


def load_model_weights(path: str | os.PathLike, model: nn.Module, ema: bool = False) -> None:
    """Load the consolidated weights of a checkpoint folder (`ema`: their EMA, `ema.pt`) into an unwrapped
    model; weights that do not fit the model are a ConfigError naming the first mismatched tensor."""
    name = EMA_WEIGHTS if ema else WEIGHTS
    if ema:
        if not (Path(path) / EMA_WEIGHTS).is_file():
            raise ConfigError(
                "evaluation.use_ema", f"{path} has no {EMA_WEIGHTS} (its run had optim.ema_decay=0)"
            )
        if problem := verify_checkpoint(path, only=(EMA_WEIGHTS,)):
            raise ConfigError("checkpoint", f"corrupt checkpoint {path}: {problem}")
    state = load_weights(path, name=name)
    check_shapes(model, state, str(Path(path) / name))
    if bad := [name for name, t in state.items() if _is_bad(t)]:  # never saved so: the file is damaged
        raise ConfigError("checkpoint", f"corrupt checkpoint {path}: non-finite values in {bad[0]}")
    model.load_state_dict(state)


def describe_error(error: BaseException) -> str:
    """One line for a failed read or write: the OS error and path when there is one anywhere in the chain
    (DCP wraps each rank's exception), else the exception's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, CheckpointException) and seen.failures:
            seen = next(iter(seen.failures.values()))[0]
            continue
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}: {seen.filename}" if seen.filename else seen.strerror
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this rank's shard of a DTensor


def non_finite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of this rank's parameters, buffers and optimizer states that hold nan or inf."""
    bad = [name for name, t in model.state_dict().items() if _is_bad(t)]
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            bad += [f"optimizer state {i}.{k}" for k, t in state.items() if _is_bad(t)]
    return bad


def _is_bad(tensor: Any) -> bool:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return False
    return not bool(torch.isfinite(_local(tensor)).all())


class Checkpointer:
    """Saves and restores the whole training state; every rank calls `save`/`load` together.

    Each phase of a save ends with the ranks agreeing whether it failed anywhere, so a write that fails
    on one rank stops every rank at the same point instead of leaving the others waiting in a barrier.
    """

    def __init__(self, cfg: CheckpointConfig, root: str | os.PathLike, rank: int = 0, world_size: int = 1):
        self.cfg, self.root = cfg, Path(root)
        self.rank, self.world_size = rank, world_size
        self.confirmed: Path | None = None  # newest checkpoint whose weights gave finite gradients
        self.unconfirmed: list[Path] = []  # saved (or resumed) since the last step with finite gradients

    def __enter__(self) -> Checkpointer:
        if self.rank == 0:  # before anything new is written: a stale .tmp- may be what fills the disk
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.iterdir():
                if stale.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                    shutil.rmtree(stale, ignore_errors=True)
                    logger.warning(f"removed incomplete checkpoint folder {stale}")  # after: room to log
        self._barrier()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _anywhere(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a barrier too)."""
        if self.world_size == 1:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rank_state: dict[str, Any],
        eval_flag: bool = False,
        records: dict[str, Any] | None = None,
        ema: EMA | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically; an existing one of the same step only gains the flag.

        `records` maps file names to JSON-able objects this rank writes into the checkpoint. A model or
        optimizer with nan or inf anywhere is refused (NonFiniteStateError) before anything is written."""
        final = self.root / checkpoint_name(step)
        if final.exists():
            if eval_flag and self.rank == 0:
                (final / EVAL_FLAG).touch()
            return final
        bad = non_finite_tensors(model, optimizer)
        if self._anywhere(bool(bad)):
            where = f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else "another rank's shard"
            raise NonFiniteStateError(
                f"not saving step {step}: non-finite values in {where}; "
                f"last good checkpoint: {latest_checkpoint(self.root) or 'none'}"
            )
        start = time.perf_counter()
        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"

        def prepare() -> None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write() -> None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if ema is not None:
                state["ema"] = ema.state_dict()
            with _quiet_dcp():
                dcp.save(state, checkpoint_id=tmp / "dcp")
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            ema_full = ema.full_state_dict(full) if ema is not None else None  # every rank: gathers
            _torch_save(rank_state, tmp / f"state_{self.rank}.pt")
            for name, record in (records or {}).items():
                write_synced(tmp / name, json.dumps(record, indent=1) + "\n")
            if self.rank == 0:
                _torch_save(full, tmp / "model.pt")
                if ema_full is not None:
                    _torch_save(ema_full, tmp / EMA_WEIGHTS)
                if eval_flag:
                    (tmp / EVAL_FLAG).touch()

        entries: dict[str, Any] = {}

        def checksum() -> None:  # every rank a share of the files, all of them written by now
            entries.update(checksum_part(tmp, self.rank, self.world_size))

        def publish() -> None:
            parts = [entries]
            if self.world_size > 1:
                parts = [None] * self.world_size
                dist.all_gather_object(parts, entries)
            if self.rank == 0:
                write_manifest(tmp, {k: v for part in parts for k, v in part.items()})  # last: complete
                os.rename(tmp, final)

        for phase in (prepare, write, checksum, publish):
            error = None
            try:
                phase()
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                error = e
            if self._anywhere(error is not None):
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                what = describe_error(error) if error else "failed on another rank"
                raise CheckpointWriteError(f"could not write checkpoint {final}: {what}") from error
        self.unconfirmed.append(final)
        if self.rank == 0:
            self._keep_only()
        self._barrier()
        logger.info(f"saved checkpoint {final} in {time.perf_counter() - start:.2f}s")
        return final

    def load(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None = None,
    ) -> dict:
        """Restore model, optimizer (and `ema`) in place; return this rank's saved state. A checkpoint that
        fails its manifest or cannot be read raises CorruptCheckpointError on every rank. An EMA that the
        checkpoint lacks (EMA switched on at a resume) restarts from the loaded weights."""
        path = Path(path)
        problem = verify_checkpoint(path, self.rank, self.world_size)
        if self._anywhere(problem is not None):
            raise CorruptCheckpointError(path, problem or "failed verification on another rank")
        saved_ranks = len(list(path.glob("state_*.pt")))
        if saved_ranks != self.world_size:
            raise ConfigError(
                "checkpoint", f"{path} was saved by {saved_ranks} ranks, this run has {self.world_size}"
            )
        error, state = None, {}
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            if ema is not None and (path / EMA_WEIGHTS).is_file():
                state["ema"] = ema.state_dict()
            with _quiet_dcp():
                dcp.load(state, checkpoint_id=path / "dcp")
            rank_state = torch.load(path / f"state_{self.rank}.pt", map_location="cpu", weights_only=False)
        except (Exception, CheckpointException) as e:
            error = e
        if self._anywhere(error is not None):
            raise CorruptCheckpointError(
                path, describe_error(error) if error else "unreadable on another rank"
            )
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if ema is not None and "ema" not in state:
            ema.reset()
            logger.warning(f"{path} has no EMA of the weights: the EMA starts from its weights")
        bad = non_finite_tensors(model, optimizer)  # never saved so: damage the checksums cannot see
        if self._anywhere(bool(bad)):
            raise CorruptCheckpointError(path, f"non-finite values in {bad[0] if bad else 'another rank'}")
        logger.info(f"resumed from {path}")
        return rank_state

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None = None
    ) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that is sound; corrupt ones are moved aside to `.corrupt-{step}`
        (never deleted). None when there is no checkpoint; a RunError when none of them loads."""
        candidates = list_checkpoints(self.root)
        for path in reversed(candidates):
            try:
                state = self.load(path, model, optimizer, ema)
                self._read_confirmations(path)
                return path, state
            except CorruptCheckpointError as e:
                self._barrier()
                if self.rank == 0:
                    aside = move_aside(path, CORRUPT_PREFIX)
                    logger.error(f"{e}; moved aside to {aside}, trying the previous checkpoint")
                self._barrier()
        if candidates:
            raise RunError(
                f"no checkpoint of {self.root} could be loaded (moved aside as {CORRUPT_PREFIX}*); "
                "move one back or start a new log dir"
            )
        return None

    def _read_confirmations(self, resumed: Path) -> None:
        """What earlier runs confirmed: the checkpoints after the newest `confirmed` one are in doubt (a
        run that stopped, or ended, on nan left them). A run from before confirmations doubts only the
        checkpoint it resumes from."""
        found = list_checkpoints(self.root)
        marked = [p for p in found if (p / CONFIRMED).exists()]
        self.confirmed = marked[-1] if marked else None
        self.unconfirmed = [p for p in found if p > marked[-1]] if marked else [resumed]

    def confirm(self) -> None:
        """A step had finite gradients: the weights of every checkpoint saved before it are sound (marked
        `confirmed`, for later runs), and the confirmed one they replace may go (`keep_only`)."""
        if self.unconfirmed:
            if self.rank == 0:
                for path in self.unconfirmed:
                    if path.is_dir():
                        (path / CONFIRMED).touch()
            self.confirmed, self.unconfirmed = self.unconfirmed[-1], []
            if self.rank == 0:
                self._keep_only()

    def set_aside_unconfirmed(
        self, prefix: str = NONFINITE_PREFIX, why: str = "non-finite gradients"
    ) -> Path | None:
        """The run stops on nan (or rolls back from a loss spike): move the checkpoints whose weights gave
        it to `{prefix}{step}` (never deleted); returns the newest checkpoint left, the one a restart
        resumes. A rollback then saves the same steps afresh."""
        self._barrier()
        if self.rank == 0:
            for path in self.unconfirmed:
                if path.is_dir():
                    aside = move_aside(path, prefix)
                    logger.warning(f"{path}: its weights gave {why}, moved aside to {aside}")
        self.unconfirmed = []
        self._barrier()
        return latest_checkpoint(self.root)

    def _keep_only(self) -> None:
        """Remove the oldest checkpoints beyond `keep_only`, except those awaiting evaluation, the newest
        confirmed one and the unconfirmed ones (whose weights may yet prove bad)."""
        if self.cfg.keep_only <= 0:
            return
        spared = {self.confirmed, *self.unconfirmed}
        for old in list_checkpoints(self.root)[: -self.cfg.keep_only]:
            if has_eval_flag(old) or old in spared:
                continue
            trash = old.with_name(TRASH_PREFIX + old.name)
            os.rename(old, trash)  # a crash mid-delete leaves no half checkpoint behind
            shutil.rmtree(trash, ignore_errors=True)


def move_aside(path: Path, prefix: str) -> Path:
    """Rename a checkpoint out of the listing (`{prefix}{name}`, `.1`, `.2`... if taken); never delete it."""
    aside = path.with_name(prefix + path.name)
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{prefix}{path.name}.{n}")
    os.rename(path, aside)
    return aside


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, so a full disk surfaces as the OSError that names the path."""
    with naming(path), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
