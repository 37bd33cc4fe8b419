"""Any `optim.steps` override of an app's CPU configs is a valid config: phase lengths (warmup, decay) are
fractions there, so a quick smoke run needs no other key."""

from __future__ import annotations

import importlib

import pytest

from src.nanollama.config import ConfigError, build_config, read_config
from tests.conftest import ROOT

CONFIGS = sorted(
    p
    for p in (ROOT / "src" / "apps").glob("*/configs/*.yaml")
    if not p.stem.startswith(("gpu", "nanovlm")) and "sweep" not in p.stem
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
@pytest.mark.parametrize("steps", [3, 20])
def test_a_short_run_of_any_cpu_config_is_valid(path, steps):
    app = path.parent.parent.name
    cls = importlib.import_module(f"src.apps.{app}.train").main.config_class
    build_config(cls, read_config(cls, path), [f"optim.steps={steps}"])


def test_an_explicit_warmup_longer_than_the_run_is_still_refused():
    path = ROOT / "src/apps/gssm/configs/debug.yaml"
    cls = importlib.import_module("src.apps.gssm.train").main.config_class
    with pytest.raises(ConfigError, match=r"optim.warmup: 30 steps exceed optim.steps \(20\)"):
        build_config(cls, read_config(cls, path), ["optim.steps=20", "optim.warmup=30"])
