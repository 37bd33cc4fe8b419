"""`orchestration.tensorboard.enabled`: train and eval scalars in log_dir/tensorboard/, read back with
TensorBoard's own reader; a resumed run shows each step once; a missing package is bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from src.nanollama.config import ConfigError, build_config
from src.nanollama.monitor import tensorboard
from src.nanollama.monitor.orchestration import OrchestrationConfig
from tests.conftest import GSSM_TINY, ROOT, assert_bad_input, child_env, crash_after, losses, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"
ARGS = [
    "optim.steps=6",
    "orchestration.checkpoint.period=3",
    "evaluation.period=3",
    "orchestration.tensorboard.enabled=true",
]


def train(log_dir: Path) -> None:
    out = run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *GSSM_TINY, *ARGS)
    assert out.returncode == 0, out.stderr[-3000:]


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = reader.EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    found = [(e.step, e.value) for e in events.Scalars(tag)]
    steps = [step for step, _ in found]
    assert steps == sorted(set(steps)), f"{tag}: steps repeated or out of order: {steps}"
    return dict(found)


def test_scalars_and_an_exact_resume_without_repeated_steps(tmp_path):
    pytest.importorskip("tensorboard")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full)
    train_loss = scalars(full, "train/loss")
    assert train_loss == pytest.approx(losses(full), rel=1e-6) and list(train_loss) == [1, 2, 3, 4, 5, 6]
    assert list(scalars(full, "eval/gap")) == [3, 6] and list(scalars(full, "train/lr")) == list(range(1, 7))

    crash_after(full, resumed, 3)  # steps 4-6 of the dead run are still in its event file
    train(resumed)
    assert len(list((resumed / "tensorboard").iterdir())) == 2  # the dead run's file and the resume's
    assert scalars(resumed, "train/loss") == pytest.approx(train_loss, rel=1e-6)
    assert scalars(resumed, "eval/loss") == pytest.approx(scalars(full, "eval/loss"), rel=1e-6)


def test_only_rank_0_and_only_when_enabled(tmp_path):
    off = tensorboard.TensorboardLogger(tensorboard.TensorboardConfig(enabled=False), tmp_path / "a", True)
    other_rank = tensorboard.TensorboardLogger(
        tensorboard.TensorboardConfig(enabled=True), tmp_path / "b", False
    )
    for logger in (off, other_rank):
        with logger:
            logger.log({"train/loss": 1.0}, 1, 0)
    assert not (tmp_path / "a" / "tensorboard").exists() and not (tmp_path / "b" / "tensorboard").exists()


def test_missing_package_is_bad_input_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError) as error:
        build_config(OrchestrationConfig, {"tensorboard": {"enabled": True}})
    assert str(error.value) == 'tensorboard.enabled=true needs tensorboard: pip install -e ".[tensorboard]"'
    build_config(OrchestrationConfig, {"tensorboard": {"enabled": False}})  # off: no package needed

    # a real run, tensorboard unimportable: exit 2 before the log dir exists
    log_dir = tmp_path / "run"
    code = "import sys; sys.modules['tensorboard'] = None; from src.apps.gssm.train import main; main()"
    args = [CONFIG, f"orchestration.log_dir={log_dir}", "orchestration.tensorboard.enabled=true"]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    needle = 'orchestration.tensorboard.enabled=true needs tensorboard: pip install -e ".[tensorboard]"'
    assert_bad_input(out, needle, log_dir)
