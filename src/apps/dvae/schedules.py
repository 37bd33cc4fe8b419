"""Scalar schedules of the optimizer step (temperature, KL weight, masking share).

Each is a pure function of the step, so a resumed run (whose step is in the checkpoint) continues them
exactly, and they are easy to test and plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ...nanollama.config import ConfigError

SHAPES = ("constant", "linear", "cosine")


@dataclass
class ScheduleConfig:
    shape: str = "constant"  # constant (always `start`) | linear | cosine (from start to end)
    start: float = 0.0  # value at step 0
    end: float = 0.0  # value from step `length` on
    length: int = 0  # steps from start to end (0: `end` from step 0, unless constant)

    def check(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError("shape", f"'{self.shape}' is not one of {', '.join(SHAPES)}")
        if self.length < 0:
            raise ConfigError("length", f"must be >= 0, got {self.length}")

    def value(self, step: int) -> float:
        if self.shape == "constant":
            return self.start
        t = 1.0 if self.length == 0 else min(max(step / self.length, 0.0), 1.0)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))

    def outside(self, allowed: Callable[[float], bool]) -> str:
        """The key (`start` or `end`) of the first value the schedule takes that is not `allowed`, or ""."""
        for key in ("start",) if self.shape == "constant" else ("start", "end"):
            if not allowed(getattr(self, key)):
                return key
        return ""
