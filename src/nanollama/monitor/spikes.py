"""Loss-spike detection: a running statistic of the loss, the spike rule, and the LR cut that follows.

`SpikeGuard` is pure bookkeeping (no I/O, no collectives): `Monitor.end_step` feeds it the loss averaged
over ranks, so every rank takes the same decision at the same step, and saves its state with each
checkpoint, so a resumed run detects, cuts and counts exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, RunError

ACTIONS = ("rollback", "continue")


@dataclass
class SpikeConfig:
    enabled: bool = False  # off: only a non-finite loss stops the run (NonFiniteLossError), as ever
    factor: float = 3.0  # a step whose mean loss exceeds factor x the loss EMA is a spike (so is nan/inf)
    ema_decay: float = 0.99  # of the running loss statistic (spikes are kept out of it)
    warmup: int = 20  # steps observed before detection starts (the early loss falls too fast to judge)
    action: str = "rollback"  # rollback: reload the last good checkpoint; continue: keep the weights
    # (under continue, spike losses enter the EMA, so a lasting rise is absorbed, and only the first spike
    # of a streak cuts the LR)
    lr_factor: float = 0.5  # the LR is multiplied by it on each spike (1: keep the LR)
    lr_factor_steps: int = 0  # 0: the cut is for good; N: for the next N optimizer steps
    max_rollbacks: int = 3  # the spike after this many rollbacks stops the run (LossSpikeError, exit 1)

    def check(self) -> None:
        if not self.factor > 1:
            raise ConfigError("factor", f"must be > 1, got {self.factor}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.action not in ACTIONS:
            raise ConfigError("action", f"'{self.action}' is not one of {', '.join(ACTIONS)}")
        if not 0 < self.lr_factor <= 1:
            raise ConfigError("lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        for key in ("warmup", "lr_factor_steps", "max_rollbacks"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


class LossSpikeError(RunError):
    """A loss spike after `max_rollbacks` rollbacks: the run stops and keeps its last good checkpoint."""


class SpikeGuard:
    """The loss EMA and how many steps fed it, the LR scale in force and for how long, the rollbacks done."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.ema = 0.0
        self.seen = 0  # losses in the EMA; detection starts once `warmup` of them are in
        self.lr_scale = 1.0  # multiplies the scheduler's LR (train_step reads it)
        self.scale_steps_left = 0  # optimizer steps the scale still holds for (lr_factor_steps > 0 only)
        self.rollbacks = 0
        self.spiking = False  # the last step observed was a spike (continue: a streak cuts the LR once)

    def is_spike(self, loss: float) -> bool:
        if not self.cfg.enabled:
            return False
        if not math.isfinite(loss):
            return True
        return self.seen >= self.cfg.warmup and loss > self.cfg.factor * self.ema

    def observe(self, loss: float, spike: bool = False) -> None:
        """A step kept (no spike, or one under `continue`): its loss enters the EMA, and a time-limited LR
        cut runs down by one."""
        self.spiking = spike
        if math.isfinite(loss):
            d = self.cfg.ema_decay
            self.ema = loss if self.seen == 0 else d * self.ema + (1 - d) * loss
            self.seen += 1
        if self.scale_steps_left > 0:
            self.scale_steps_left -= 1
            if self.scale_steps_left == 0:
                self.lr_scale = 1.0

    def cut_lr(self) -> None:
        """Cuts compound; a time-limited one restarts its count."""
        self.lr_scale *= self.cfg.lr_factor
        self.scale_steps_left = self.cfg.lr_factor_steps

    def state_dict(self) -> dict:
        keys = ("ema", "seen", "lr_scale", "scale_steps_left", "rollbacks", "spiking")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def load_statistic(self, state: dict) -> None:
        """A rollback: the loss statistic goes back with the weights; the LR scale and the count do not."""
        self.ema, self.seen = state.get("ema", 0.0), state.get("seen", 0)
        self.spiking = False
