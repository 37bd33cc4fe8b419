"""SIGUSR1/SIGUSR2/SIGTERM ask the run to finish its step, checkpoint and exit cleanly.

SLURM jobs are signalled with SIGUSR2 before their time limit (submitit's choice) and requeued.
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionHandler:
    """Records the signal; the training loop decides when it is safe to stop (end of a step)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        logger.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step")
        self.requested = True

    def __enter__(self) -> PreemptionHandler:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
