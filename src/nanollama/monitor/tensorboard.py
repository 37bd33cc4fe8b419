"""Optional TensorBoard mirror of the train and eval scalars, in `tensorboard/` of the log dir, so that
`tensorboard --logdir runs` shows every run under `runs/`. Needs the `tensorboard` extra."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..extras import require

logger = logging.getLogger(__name__)


@dataclass
class TensorboardConfig:
    enabled: bool = False
    flush_s: int = 30  # seconds between flushes of the event file (a live `tensorboard` sees that late)

    def check(self) -> None:
        if self.enabled:
            require("tensorboard", "tensorboard", "enabled=true")
        if self.flush_s < 1:
            raise ConfigError("flush_s", f"must be >= 1, got {self.flush_s}")


class TensorboardLogger:
    """Rank 0 only. The writer opens at the first scalar, once the resumed step is known: its
    `purge_step` (the first step after the resume) hides what a dead run logged past its checkpoint, so
    a restart shows each step once, with the values of the steps that count."""

    def __init__(self, cfg: TensorboardConfig, log_dir: str | os.PathLike, active: bool):
        self.cfg, self.folder = cfg, Path(log_dir) / "tensorboard"
        self.active = active and cfg.enabled
        self.writer: Any = None

    def __enter__(self) -> TensorboardLogger:
        return self

    def log(self, metrics: dict, step: int, resumed_step: int) -> None:
        """Numeric values of `metrics` (tag -> value) as scalars at `step`; the run resumed at
        `resumed_step` (0: a fresh start)."""
        if not self.active:
            return
        if self.writer is None:
            require("tensorboard", "tensorboard", "orchestration.tensorboard.enabled=true")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(self.folder), purge_step=resumed_step + 1, flush_secs=self.cfg.flush_s
            )
            logger.info(f"tensorboard events in {self.folder} from step {resumed_step + 1}")
        for tag, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, global_step=step)

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
