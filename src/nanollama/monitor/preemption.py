"""SIGUSR1/SIGUSR2/SIGTERM ask the run to finish its step, checkpoint and exit cleanly.

SLURM jobs are signalled with SIGUSR2 before their time limit (submitit's choice) and requeued. A step
that does not end must not hold the run hostage: a second signal (or Ctrl-C) while one is pending, or
one still pending after `orchestration.preemption_grace_s`, stops the run at once (`StoppedBySignal`,
exit 1). Checkpoints are written atomically, so whatever was saved before stays whole.
"""

from __future__ import annotations

import logging
import signal

from ..config import RunError

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StoppedBySignal(RunError):
    """The run was stopped mid-step; a restart resumes from its last checkpoint."""


class PreemptionHandler:
    """Records the signal; the training loop decides when it is safe to stop (end of a step), unless a
    second signal comes, or the first is still pending after `grace_s` seconds (0: no limit)."""

    def __init__(self, grace_s: float = 0.0) -> None:
        self.requested = False
        self.grace_s = grace_s
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise StoppedBySignal(
                f"received {name} again: stopped mid-step (a restart resumes the last checkpoint)"
            )
        logger.warning(f"received {name}: checkpointing at the end of this step")
        self.requested = True
        if self.grace_s > 0:
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _overdue(self, signum: int, frame: object) -> None:
        raise StoppedBySignal(
            f"the step did not end within orchestration.preemption_grace_s={self.grace_s:g} s of the signal: "
            "stopped mid-step (a restart resumes the last checkpoint)"
        )

    def __enter__(self) -> PreemptionHandler:
        for sig in (*SIGNALS, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._overdue)
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
