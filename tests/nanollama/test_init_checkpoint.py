"""`init.checkpoint`: a new GSSM run starts from another run's weights, with everything else fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from src.apps.gssm.train import TrainConfig, build_training
from src.nanollama.config import build_config, read_yaml
from src.nanollama.distributed import Cluster, ClusterConfig
from src.nanollama.monitor.checkpoint import latest_checkpoint
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.optim import lr_factor
from tests.conftest import GSSM_TINY, assert_bad_input, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"


def train(log_dir: Path, *args: str):
    return run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *GSSM_TINY, *args)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("init") / "source"
    out = train(log_dir, "optim.steps=5")
    assert out.returncode == 0, out.stderr[-2000:]
    return log_dir


def config(*args: str) -> TrainConfig:
    data = read_yaml("src/apps/gssm/configs/debug.yaml")
    return build_config(TrainConfig, data, [*GSSM_TINY, *args])


def test_init_loads_the_weights_and_starts_fresh(source, tmp_path):
    saved = torch.load(latest_checkpoint(source / "checkpoints") / "model.pt", weights_only=True)
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        start = build_training(config(f"init.checkpoint={source}"), cluster).model.state_dict()
        fresh = build_training(config(), cluster).model.state_dict()
        # a prefix map takes only what it names: the blocks; embeddings and head stay fresh
        part = config(f"init.checkpoint={source}", "init.prefix_map={layers.: layers.}")
        partial = build_training(part, cluster).model.state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    assert not torch.equal(fresh["tok_embeddings.weight"], saved["tok_embeddings.weight"])
    name = "layers.0.attn.q_proj.weight"
    assert torch.equal(partial[name], saved[name])
    assert torch.equal(partial["tok_embeddings.weight"], fresh["tok_embeddings.weight"])

    log_dir = tmp_path / "new"
    out = train(log_dir, f"init.checkpoint={source}", "optim.steps=3")
    assert out.returncode == 0, out.stderr[-2000:]
    raw = read_jsonl(log_dir / "metrics" / "raw_0.jsonl")
    cfg = build_config(TrainConfig, read_yaml(log_dir / "config.yaml"))
    assert [r["step"] for r in raw] == [1, 2, 3]  # from step 0, on a fresh schedule
    assert [r["lr"] for r in raw] == pytest.approx([cfg.optim.lr * lr_factor(s, cfg.optim) for s in range(3)])
    assert raw[0]["loss"] < read_jsonl(source / "metrics" / "raw_0.jsonl")[0]["loss"]  # trained weights
    state = torch.load(latest_checkpoint(log_dir / "checkpoints") / "state_0.pt", weights_only=False)
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    dcp_to_torch_save(latest_checkpoint(log_dir / "checkpoints") / "dcp", tmp_path / "full.pt")
    optim = torch.load(tmp_path / "full.pt", weights_only=False)["optim"]
    assert {float(v["step"]) for v in optim["state"].values()} == {3.0}  # a fresh AdamW: not 5 + 3 steps
    log = (log_dir / "logs" / "rank_0.log").read_text()
    assert f"initialised {len(saved)} tensors from {latest_checkpoint(source / 'checkpoints')}" in log


@pytest.mark.parametrize(
    "args, needle",
    [
        (["init.checkpoint=/nonexistent"], "init.checkpoint: /nonexistent is not a checkpoint folder"),
        (["model.dim=64"], "init.checkpoint: "),  # shape mismatch, named below
        (["init.prefix_map={nothing.: x.}"], "no tensor under the prefixes"),
    ],
)
def test_bad_init_exits_2_before_the_log_dir(source, tmp_path, args, needle):
    log_dir = tmp_path / "run"
    if not any(a.startswith("init.checkpoint") for a in args):
        args = [f"init.checkpoint={source}", *args]
    out = train(log_dir, *args)
    assert_bad_input(out, needle, log_dir)
    if "model.dim=64" in args:
        assert "has shape" in out.stderr and "this model's is" in out.stderr
