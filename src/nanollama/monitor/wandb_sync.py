"""Cast a run's local logs into a wandb run: for runs trained with wandb off, or where there was no network.

    python -m src.nanollama.monitor.wandb_sync log_dir=<run> [mode=online|offline] [project=...] [name=...]

`config.yaml` becomes the wandb config and the metric files of one rank are logged step by step under the
keys the live logger uses: training lines (`raw`) as they are, evaluations as `eval/...`, activation
statistics as `probe/...`; linear-probe accuracies (`probe_accuracy.json`) go to the summary. Text values
(e.g. an evaluation's checkpoint path) are left out. Each call makes a new wandb run, in `<log_dir>/wandb/`;
an offline one is uploaded later with `wandb sync <its folder>`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError, cli_main, load_config
from .logger import read_jsonl

# metric file -> key prefix, as `Monitor` logs them live
PREFIXES = {"raw": "", "eval": "eval/", "probe": "probe/"}


@dataclass
class SyncConfig:
    log_dir: str = ""  # the run folder
    mode: str = "online"  # online | offline
    project: str = ""  # empty: the run's orchestration.wandb.project
    entity: str = ""  # empty: the run's orchestration.wandb.entity, else wandb's default
    name: str = ""  # empty: the run's orchestration.name
    rank: int = 0  # whose metric files

    def check(self) -> None:
        if not (Path(self.log_dir) / "config.yaml").is_file():
            raise ConfigError("log_dir", f"'{self.log_dir}' is not a run folder (no config.yaml)")
        if self.mode not in ("online", "offline"):
            raise ConfigError("mode", f"'{self.mode}' is not one of online, offline")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_history(log_dir: str | Path, rank: int = 0) -> dict[int, dict[str, float]]:
    """step -> the metrics of every file at that step, prefixed; in step order (wandb needs it increasing)."""
    history: dict[int, dict[str, float]] = defaultdict(dict)
    for name, prefix in PREFIXES.items():
        path = Path(log_dir) / "metrics" / f"{name}_{rank}.jsonl"
        for record in read_jsonl(path) if path.is_file() else []:
            keep = {prefix + k: v for k, v in record.items() if _number(v) and (k != "step" or not prefix)}
            history[record["step"]].update(keep)
    return dict(sorted(history.items()))


def probe_summary(log_dir: str | Path) -> dict[str, float]:
    path = Path(log_dir) / "metrics" / "probe_accuracy.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())["results"]
    return {f"probe_accuracy/{r['node']}/layer_{r['layer']}": r["accuracy"] for r in results}


def sync(cfg: SyncConfig) -> str:
    """Log everything to a new wandb run; returns its folder."""
    import wandb

    run_config = yaml.safe_load((Path(cfg.log_dir) / "config.yaml").read_text()) or {}
    orchestration = run_config.get("orchestration", {})
    live = orchestration.get("wandb", {})
    history = read_history(cfg.log_dir, cfg.rank)
    run = wandb.init(
        mode=cfg.mode,
        project=cfg.project or live.get("project") or "nanollama",
        entity=cfg.entity or live.get("entity") or None,
        group=live.get("group") or None,
        tags=live.get("tags") or None,
        name=cfg.name or orchestration.get("name"),
        dir=cfg.log_dir,
        config=run_config,
    )
    try:
        for step, metrics in history.items():
            run.log(metrics, step=step)
        run.summary.update(probe_summary(cfg.log_dir))
        folder = str(Path(run.dir).parent)
    finally:
        run.finish()
    print(f"logged {len(history)} steps of {cfg.log_dir} to wandb run {run.id} ({cfg.mode}): {folder}")
    return folder


@cli_main
def main(argv: list[str] | None = None) -> None:
    sync(load_config(SyncConfig, argv))


if __name__ == "__main__":
    main()
