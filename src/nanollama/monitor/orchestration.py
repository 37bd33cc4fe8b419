"""`orchestration:`, the run-config section of everything around the loop: the run's name and log dir,
its seed, and the settings of each part of the Monitor (checkpoints, logging, wandb, TensorBoard, the
profiler, activation statistics, the eval job, loss spikes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..jobs import EvalJobConfig
from .activations import ProbeConfig
from .checkpoint import CheckpointConfig
from .logger import LoggingConfig
from .profiler import ProfilerConfig
from .spikes import SpikeConfig
from .tensorboard import TensorboardConfig
from .wandb import WandbConfig


@dataclass
class OrchestrationConfig:
    name: str = "debug"  # run name
    log_dir: str = ""  # the one folder of the run; empty: runs/{name}
    seed: int = 0  # global seed
    max_skipped_steps: int = 8  # consecutive dead steps (gradient norm not finite, or 0) before the run stops
    # seconds a preemption signal may wait for the step to end before the run stops mid-step (0: no limit);
    # under SLURM's usual 90 s warning, 60 leaves the checkpoint time to be written
    preemption_grace_s: float = 60.0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval_job: EvalJobConfig = field(default_factory=EvalJobConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)

    def check(self) -> None:
        if not self.name:
            raise ConfigError("name", "must not be empty")
        if self.preemption_grace_s < 0:
            raise ConfigError(
                "preemption_grace_s", f"must be >= 0 (0: no limit), got {self.preemption_grace_s}"
            )
        if self.max_skipped_steps < 0:
            raise ConfigError("max_skipped_steps", f"must be >= 0, got {self.max_skipped_steps}")
        # resolved here, after the merge: a dataclass default (__post_init__) only sees the default name
        self.log_dir = self.log_dir or f"runs/{self.name}"
        if self.log_dir and Path(self.log_dir).exists() and not Path(self.log_dir).is_dir():
            raise ConfigError("log_dir", f"{self.log_dir} exists and is not a folder")
