"""Optional wandb mirror of the metrics; a restarted run resumes the same wandb run id."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "nanollama"
    entity: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.mode not in ("disabled", "offline", "online"):
            raise ConfigError("mode", f"'{self.mode}' is not one of disabled, offline, online")


class WandbLogger:
    """Rank 0 only; the run id lives in `wandb/run_id` of the log dir, so restarts resume it."""

    def __init__(self, cfg: WandbConfig, log_dir: str | os.PathLike, name: str, config: dict, active: bool):
        self.cfg, self.folder, self.name, self.config = cfg, Path(log_dir) / "wandb", name, config
        self.active = active and cfg.mode != "disabled"
        self.run = None

    def __enter__(self) -> WandbLogger:
        if not self.active:
            return self
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        id_file = self.folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            mode=self.cfg.mode,
            project=self.cfg.project,
            entity=self.cfg.entity or None,
            group=self.cfg.group or None,
            tags=self.cfg.tags or None,
            name=self.name,
            id=run_id,
            resume="allow",
            dir=str(self.folder.parent),
            config=self.config,
        )
        logger.info(f"wandb run {run_id} ({self.cfg.mode})")
        return self

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def save_file(self, path: str | os.PathLike) -> None:
        """Attach a file (e.g. a profiler trace) to the run."""
        if self.run is not None:
            self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def __exit__(self, *exc) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc[0] is None else 1)
            self.run = None
