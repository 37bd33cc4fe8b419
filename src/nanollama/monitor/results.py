"""A run's log dir as pandas DataFrames, so that plotting notebooks stay a few lines long.

Reads the files of the log-dir layout (see monitor.py): `metrics/raw_{rank}.jsonl`, `eval_{rank}.jsonl`,
`probe_{rank}.jsonl`, `profile_{rank}.csv`, `probe_accuracy.json` and `config.yaml`. A missing file gives
an empty DataFrame, so a notebook runs on any run, finished or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import yaml

from .logger import read_jsonl

METRIC_FILES = {"raw": "raw_{rank}.jsonl", "eval": "eval_{rank}.jsonl", "probe": "probe_{rank}.jsonl"}


def load_run(log_dir: str | os.PathLike, rank: int = 0) -> dict[str, pd.DataFrame]:
    """{"raw", "eval", "probe", "profile", "probe_accuracy"}: one DataFrame per metrics file of `rank`,
    sorted by step (the linear-probe results, one row per node and layer, are the same for every rank)."""
    metrics = Path(log_dir) / "metrics"
    if not metrics.is_dir():
        raise FileNotFoundError(f"{log_dir} is not a run folder (no metrics/)")
    run = {}
    for name, pattern in METRIC_FILES.items():
        path = metrics / pattern.format(rank=rank)
        run[name] = _by_step(pd.DataFrame(read_jsonl(path)) if path.is_file() else pd.DataFrame())
    profile = metrics / f"profile_{rank}.csv"
    run["profile"] = _by_step(pd.read_csv(profile) if profile.is_file() else pd.DataFrame())
    accuracy = metrics / "probe_accuracy.json"
    run["probe_accuracy"] = (
        pd.DataFrame(json.loads(accuracy.read_text())["results"]) if accuracy.is_file() else pd.DataFrame()
    )
    return run


def run_config(log_dir: str | os.PathLike) -> dict:
    """The resolved config the run wrote (`config.yaml`), as nested dicts."""
    return yaml.safe_load((Path(log_dir) / "config.yaml").read_text())


def _by_step(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("step", kind="stable", ignore_index=True) if "step" in frame else frame
