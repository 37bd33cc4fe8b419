"""A run's log dir, or a whole sweep's, as pandas DataFrames, so that plotting notebooks stay short.

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


def load_sweep(log_dir: str | os.PathLike, kind: str = "raw", rank: int = 0) -> pd.DataFrame:
    """A sweep's metrics of one kind ("raw", "eval", "probe", "profile") in one table: a row per task
    and step, with the task's index, its state and its grid values (a column per dotted key)."""
    status = sweep_status(log_dir)
    frames = []
    for task in status.to_dict("records"):
        run_dir = Path(log_dir) / "runs" / str(task["task"])
        if not (run_dir / "metrics").is_dir():
            continue  # not started yet
        frame = load_run(run_dir, rank)[kind]
        if len(frame):
            frames.append(frame.assign(**{k: [v] * len(frame) for k, v in task.items()}))
    columns = list(status.columns)
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    return table[columns + [c for c in table.columns if c not in columns]]


def sweep_status(log_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per task of a sweep: index, state (pending, running, requeued, done, failed, stopped by a
    signal), exit code and grid values. States come from the tasks' own status files, never from SLURM
    accounting."""
    log_dir = Path(log_dir)
    if not (log_dir / "sweep.yaml").is_file():
        raise FileNotFoundError(f"{log_dir} is not a sweep folder (no sweep.yaml)")
    sweep = yaml.safe_load((log_dir / "sweep.yaml").read_text())
    rows = []
    for task in sweep["tasks"]:
        path = log_dir / "tasks" / f"{task['index']}.status"
        state = json.loads(path.read_text()) if path.is_file() else {"state": "pending"}
        values = {k: _cell(v) for k, v in task["values"].items()}
        rows.append(
            {"task": task["index"], "state": state["state"], "exit_code": state.get("exit_code"), **values}
        )
    return pd.DataFrame(rows)


def _cell(value: object) -> object:
    """Grid values that are lists or mappings become their JSON text, so they can label rows."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


SCALING_COLUMNS = ["step", "loss", "bayes_loss", "lr", "N", "D", "data_path", "graph"]


def scaling_points(log_dir: str | os.PathLike) -> pd.DataFrame:
    """A GSSM scaling sweep as points for a scaling-law fit: one row per task with evaluations, with its
    grid values, `state`, `loss` (its best held-out loss: the min over its evaluations, early stopping),
    `step` (where), `bayes_loss` (the true model's loss on the same sequences: the irreducible E), `lr`,
    `N` (non-embedding parameters, Kaplan et al.'s N), `D` (training sequences: the train split of
    `data.path`, or when generated on the fly the fresh sequences drawn up to `step`), `data_path`, and
    `graph` (the GSSM graph as JSON: two sweeps are comparable only if they share it)."""
    rows = []
    evals = load_sweep(log_dir, "eval")
    for task, lines in evals.groupby("task", sort=True) if len(evals) else []:
        best = lines.loc[lines["loss"].idxmin()]
        cfg = run_config(Path(log_dir) / "runs" / str(task))
        data = cfg["data"]
        if data.get("path"):
            meta = json.loads((Path(data["path"]) / "meta.json").read_text())
            D, graph = meta["n_sequences"]["train"], meta["graph"]
        else:
            D, graph = int(best["step"]) * data["batch_size"], data["gssm"]
        rows.append(
            {
                **best.to_dict(),
                "step": int(best["step"]),
                "lr": cfg["optim"]["lr"],
                "N": non_embedding_parameters(cfg["model"]),
                "D": D,
                "data_path": data.get("path", ""),
                "graph": json.dumps(graph, sort_keys=True),
            }
        )
    columns = [*sweep_status(log_dir).columns, *SCALING_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def non_embedding_parameters(model: dict) -> int:
    """The transformer's parameters outside the token embedding and output head, counted on the meta
    device (no memory, no initialisation) from a run config's `model` section."""
    import torch

    from ..model.transformer import Transformer, TransformerConfig

    with torch.device("meta"):
        return Transformer(TransformerConfig(**model)).parameter_counts()["non_embedding"]
