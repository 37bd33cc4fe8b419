"""Profilers: a light one that times every step into a CSV, and a heavy torch.profiler window.

The light profiler's `ProfilerState` (last step written, bytes of CSV written) travels in
checkpoints: a resumed run truncates the CSV back to the checkpoint and appends from there, so the
file has every step exactly once. On CUDA, phases synchronize the device when profiled, so the
times are the device's and not the launch queue's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import torch

from ..config import ConfigError, check_range

logger = logging.getLogger(__name__)

PHASES = ("data", "model", "optim", "eval", "monitor")
COLUMNS = (
    ["step"]
    + [f"{p}_s" for p in PHASES]
    + ["step_s", "tokens", "tokens_per_s", "rss_mb", "cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb"]
)


@dataclass
class LightProfilerConfig:
    enabled: bool = True
    period: int = 1  # profile every `period` steps
    steps: int = -1  # number of steps to profile; -1: all the optimizer steps of the run

    def check(self) -> None:
        if self.period < 1:
            raise ConfigError("period", f"must be >= 1, got {self.period}")


@dataclass
class HeavyProfilerConfig:
    start: int = 0  # first step of the torch.profiler window (0: off)
    warmup: int = 1
    steps: int = 3  # active steps recorded in the trace

    def check(self) -> None:
        for key, low in (("start", 0), ("warmup", 0), ("steps", 1)):
            check_range(self, key, low)


@dataclass
class ProfilerConfig:
    light: LightProfilerConfig = field(default_factory=LightProfilerConfig)
    heavy: HeavyProfilerConfig = field(default_factory=HeavyProfilerConfig)


@dataclass
class ProfilerState:
    step: int = 0  # last step written to the CSV
    offset: int = 0  # bytes of CSV written up to that step


def memory_mb(device: torch.device) -> dict[str, float]:
    mb = 2**20
    out = {"rss_mb": psutil.Process().memory_info().rss / mb}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / mb
        out["cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / mb
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / mb
    return out


class LightProfiler:
    """Per-step wall times of the training phases, tokens/s and memory, one CSV row a step."""

    def __init__(
        self, cfg: LightProfilerConfig, path: str | os.PathLike, device: torch.device, total_steps: int
    ):
        self.cfg, self.path, self.device = cfg, Path(path), device
        self.steps = total_steps if cfg.steps < 0 else cfg.steps
        self.state = ProfilerState()
        self.times: dict[str, float] = defaultdict(float)
        self.file = None
        self.step_start = time.perf_counter()

    def __enter__(self) -> LightProfiler:
        if self.cfg.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
            self.state.offset = self.file.tell()  # a resume truncates back to its checkpoint
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = ProfilerState(**state)
        if self.file:
            self._truncate(self.state.offset)

    def _truncate(self, offset: int) -> None:
        """Drop rows written after the checkpoint this run resumes from."""
        self.file.seek(0, os.SEEK_END)
        if self.file.tell() > offset:
            self.file.truncate(offset)
        self.file.seek(0, os.SEEK_END)
        self.state.offset = self.file.tell()

    def active(self, step: int) -> bool:
        return self.file is not None and step <= self.steps and step % self.cfg.period == 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Accumulate the wall time of one phase of the current step."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.file is not None:
                self._sync()
            self.times[name] += time.perf_counter() - start

    def end_step(self, step: int, tokens: int) -> None:
        """Write the row of `step` (if profiled) and start timing the next one."""
        if self.active(step):
            self._sync()
            elapsed = time.perf_counter() - self.step_start
            row = {"step": step, **{f"{p}_s": self.times.get(p, 0.0) for p in PHASES}}
            row.update(step_s=elapsed, tokens=tokens, tokens_per_s=tokens / max(elapsed, 1e-9))
            row.update(memory_mb(self.device))
            if self.state.offset == 0:
                self.file.write(",".join(COLUMNS) + "\n")
            self.file.write(",".join(_fmt(row.get(c, "")) for c in COLUMNS) + "\n")
            self.file.flush()
            self.state = ProfilerState(step=step, offset=self.file.tell())
        self.times.clear()
        self.step_start = time.perf_counter()


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class HeavyProfiler:
    """A torch.profiler window over a few steps, exported as a chrome trace (open in Perfetto)."""

    def __init__(self, cfg: HeavyProfilerConfig, folder: str | os.PathLike, rank: int, device: torch.device):
        self.cfg, self.folder, self.rank, self.device = cfg, Path(folder), rank, device
        self.prof = None
        self.trace_path: Path | None = None

    def __enter__(self) -> HeavyProfiler:
        return self

    def start(self, step: int) -> None:
        """Arm the window; `step` is the last step done (call once, after any resume)."""
        if self.cfg.start <= 0 or step >= self.cfg.start:
            return  # off, or the window was already passed before a resume
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        wait = max(0, self.cfg.start - 1 - step)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=wait, warmup=self.cfg.warmup, active=self.cfg.steps, repeat=1
            ),
            on_trace_ready=self._export,
            record_shapes=True,
            profile_memory=True,
        )
        self.prof.__enter__()

    def _export(self, prof: torch.profiler.profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.folder / f"trace_rank{self.rank}_step{prof.step_num:06d}.json"
        prof.export_chrome_trace(str(self.trace_path))
        logger.info(f"heavy profiler trace written to {self.trace_path}")

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def __exit__(self, *exc) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
