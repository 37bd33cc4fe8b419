"""`scaling_points`: a sweep folder, in the launcher's layout, as one point per task for a scaling fit."""

from __future__ import annotations

import json

import pytest
import torch

from src.nanollama.model.transformer import Transformer, TransformerConfig
from src.nanollama.monitor.results import non_embedding_parameters, scaling_points
from tests.conftest import SCALING_GRAPH as GRAPH
from tests.conftest import fake_sweep
from tests.conftest import scaling_config as config
from tests.conftest import scaling_evals as evals


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
