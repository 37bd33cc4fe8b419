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
from .files import naming

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
        self.file = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing queued
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
        """One whole line or none: a failed write (full disk) is cut back off and names the file."""
        data = (json.dumps(record) + "\n").encode()
        with self._locked():
            end = self.file.seek(0, os.SEEK_END)
            try:
                with naming(self.path):
                    while data:
                        data = data[self.file.write(data) :]
            except OSError:
                with contextlib.suppress(OSError):
                    self.file.truncate(end)
                raise

    def state_dict(self) -> dict:
        return {"offset": self.file.tell()}

    def load_state_dict(self, state: dict) -> None:
        with self._locked():
            offset = state["offset"]
            if self.path.stat().st_size > offset:
                with open(self.path) as f:
                    f.seek(offset)
                    kept = [line for line in f if "checkpoint" in _parse(line)]
                self.file.truncate(offset)
                self.file.seek(0, os.SEEK_END)
                self.file.write("".join(kept).encode())
            self.file.seek(0, os.SEEK_END)


def _parse(line: str) -> dict:
    """A line's record; {} for a blank or torn one (a writer killed mid-line, before writes were atomic)."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file; a torn line (a killed writer) is skipped."""
    with open(path) as f:
        return [record for line in f if (record := _parse(line))]
