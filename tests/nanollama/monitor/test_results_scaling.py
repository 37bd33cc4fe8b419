"""`scaling_points`: a sweep folder, in the launcher's layout, as one point per task for a scaling fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from src.nanollama.model.transformer import Transformer, TransformerConfig
from src.nanollama.monitor.results import non_embedding_parameters, scaling_points

GRAPH = {"seed": 0, "nodes": [{"name": "x", "state_dim": 8, "parents": [], "observed": True}]}


def fake_sweep(log_dir: Path, tasks: list[dict]) -> Path:
    """A sweep folder as the launcher and the runs leave it; each task: grid `values`, run `config`,
    `evals` (eval lines) and `state`."""
    index = [{"index": i, "values": t["values"]} for i, t in enumerate(tasks)]
    (log_dir / "tasks").mkdir(parents=True)
    (log_dir / "sweep.yaml").write_text(yaml.safe_dump({"script": "src.apps.gssm.train", "tasks": index}))
    for i, task in enumerate(tasks):
        (log_dir / "tasks" / f"{i}.status").write_text(json.dumps({"state": task.get("state", "done")}))
        run = log_dir / "runs" / str(i)
        (run / "metrics").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(task["config"]))
        lines = [json.dumps(line) + "\n" for line in task.get("evals", [])]
        (run / "metrics" / "eval_0.jsonl").write_text("".join(lines))
    return log_dir


def config(dim: int, lr: float = 1e-3, path: str = "", batch_size: int = 8) -> dict:
    return {
        "optim": {"lr": lr},
        "model": {"vocab_size": 8, "dim": dim, "n_layers": 2, "n_heads": 2},
        "data": {"gssm": GRAPH, "seq_len": 16, "batch_size": batch_size, "path": path},
    }


def evals(*losses: float, bayes: float = 1.0, period: int = 10) -> list[dict]:
    return [{"step": period * (k + 1), "loss": v, "bayes_loss": bayes} for k, v in enumerate(losses)]


def test_non_embedding_parameters_count_everything_but_the_embeddings_and_head():
    model = {"vocab_size": 8, "dim": 32, "n_layers": 2, "n_heads": 2}
    reference = Transformer(TransformerConfig(**model))
    expected = sum(
        p.numel()
        for name, p in reference.named_parameters()
        if not name.startswith(("tok_embeddings", "output"))
    )
    assert non_embedding_parameters(model) == expected > 0
    # the embedding size is not in it
    assert non_embedding_parameters({**model, "vocab_size": 1000}) == expected
    assert non_embedding_parameters({**model, "dim": 64}) > 3 * expected
    assert torch.get_default_device().type == "cpu"  # the meta device did not leak


def test_model_sweep_points_take_each_tasks_best_evaluation(tmp_path):
    log_dir = fake_sweep(
        tmp_path / "sweep",
        [
            {"values": {"model.dim": 16}, "config": config(16), "evals": evals(2.0, 1.6, 1.7, bayes=1.25)},
            {"values": {"model.dim": 32}, "config": config(32), "evals": evals(1.9, 1.5, 1.4, bayes=1.25)},
            {"values": {"model.dim": 48}, "config": config(48), "state": "running"},  # no evaluation yet
        ],
    )
    points = scaling_points(log_dir)
    assert list(points["task"]) == [0, 1] and list(points["model.dim"]) == [16, 32]
    assert list(points["loss"]) == [1.6, 1.4] and list(points["step"]) == [20, 30]
    assert list(points["bayes_loss"]) == [1.25, 1.25]
    assert list(points["N"]) == [non_embedding_parameters(config(d)["model"]) for d in (16, 32)]
    assert list(points["D"]) == [20 * 8, 30 * 8]  # generated on the fly: sequences drawn by the best step
    assert json.loads(points["graph"][0]) == GRAPH and points["graph"].nunique() == 1
    assert list(points["lr"]) == [1e-3, 1e-3] and list(points["data_path"]) == ["", ""]


def test_data_sweep_points_read_the_dataset_size_and_graph_from_meta_json(tmp_path):
    tasks = []
    for n in (64, 128):
        path = tmp_path / f"d{n}"
        path.mkdir()
        meta = {"graph": GRAPH, "n_sequences": {"train": n, "test": 32}, "bayes_loss": {"test": 1.3}}
        (path / "meta.json").write_text(json.dumps(meta))
        tasks.append(
            {"values": {"data.path": str(path)}, "config": config(32, path=str(path)), "evals": evals(1.5)}
        )
    points = scaling_points(fake_sweep(tmp_path / "sweep", tasks))
    assert list(points["D"]) == [64, 128] and points["N"].nunique() == 1
    assert json.loads(points["graph"][1]) == GRAPH


def test_a_sweep_without_evaluations_gives_an_empty_table_and_a_missing_one_a_clear_error(tmp_path):
    log_dir = fake_sweep(tmp_path / "sweep", [{"values": {"model.dim": 16}, "config": config(16)}])
    points = scaling_points(log_dir)
    assert len(points) == 0 and {"task", "model.dim", "loss", "N", "D"} <= set(points.columns)
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        scaling_points(tmp_path / "nowhere")
