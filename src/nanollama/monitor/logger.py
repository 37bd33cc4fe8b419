"""Per-rank text logs and JSONL metric files that survive restarts without duplicated steps."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..config import ConfigError

FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


@dataclass
class LoggingConfig:
    period: int = 10  # steps between metric lines
    level: str = "INFO"

    def check(self) -> None:
        if self.period < 1:
            raise ConfigError("period", f"must be >= 1, got {self.period}")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("level", f"unknown level '{self.level}'")


def setup_logging(folder: str | os.PathLike, rank: int, level: str = "INFO") -> None:
    """Every rank logs to `logs/rank_{rank}.log`; rank 0 also to the console."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_nanollama", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(Path(folder) / f"rank_{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._nanollama = True
        root.addHandler(handler)
    root.setLevel(level.upper())


def process_info() -> str:
    """Host and memory facts that help find a defective node in a large job."""
    vm = psutil.virtual_memory()
    return f"available memory {vm.available / 2**30:.1f}/{vm.total / 2**30:.1f} GiB, {os.cpu_count()} cpus"


class JsonlWriter:
    """Append-only JSON lines; its state is the byte offset, so a resume drops lines past the checkpoint.

    Evaluation jobs append to the same files from other processes; their lines name the checkpoint they
    evaluated, belong to no step of this process, and survive the truncation. A file lock keeps the
    truncation and their appends apart.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = None

    def __enter__(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()
            self.file = None

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)

    def write(self, record: dict) -> None:
        with self._locked():
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def state_dict(self) -> dict:
        return {"offset": self.file.tell()}

    def load_state_dict(self, state: dict) -> None:
        with self._locked():
            offset = state["offset"]
            if self.path.stat().st_size > offset:
                with open(self.path) as f:
                    f.seek(offset)
                    kept = [line for line in f if line.strip() and "checkpoint" in json.loads(line)]
                self.file.truncate(offset)
                self.file.seek(0, os.SEEK_END)
                self.file.writelines(kept)
                self.file.flush()
            self.file.seek(0, os.SEEK_END)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
