"""Early stopping on a held-out metric, for runs on finite data trained for several epochs.

Its state is the run's own evaluation lines: a resumed run replays `metrics/eval_{rank}.jsonl` (already
cut back to the checkpoint by the Monitor), so it stops at the same step an uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    patience: int  # evaluations without a new best before stopping; 0: never stop
    key: str = "loss"  # lower is better
    best: float = math.inf
    best_step: int = -1
    waited: int = 0  # evaluations since the best

    def observe(self, step: int, metrics: dict) -> bool:
        """Record one evaluation; True once `patience` evaluations in a row did not beat the best."""
        value = metrics.get(self.key, math.nan)
        if isinstance(value, (int, float)) and value < self.best:
            self.best, self.best_step, self.waited = float(value), step, 0
        else:
            self.waited += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def replay(self, records: list[dict], until: int) -> None:
        """The in-loop evaluations up to step `until` (eval jobs' lines name a checkpoint: skipped)."""
        for record in records:
            if "checkpoint" not in record and record.get("step", math.inf) <= until:
                self.observe(record["step"], record)
