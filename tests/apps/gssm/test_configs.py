from pathlib import Path

import pytest

from src.apps.gssm.bayes import joint_size
from src.apps.gssm.generator import GSSM
from src.apps.gssm.train import TrainConfig
from src.nanollama.config import load_config

CONFIGS = sorted((Path(__file__).parents[3] / "src/apps/gssm/configs").glob("*.yaml"))


def test_the_documented_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"debug", "base", "sparse", "dense", "low_entropy", "slow", "dead", "context"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_a_tractable_true_model(path):
    cfg = load_config(TrainConfig, [f"config={path}"])
    gssm = GSSM(cfg.data.gssm)
    assert joint_size(gssm) <= 4096  # the Bayes-optimal loss stays exact
    assert cfg.data.batch_size % cfg.optim.accumulation_steps == 0
    modes = {node.mode for node in cfg.data.gssm.nodes}
    if path.stem in ("slow", "dead", "context"):
        assert path.stem in modes
