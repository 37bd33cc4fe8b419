"""Loss spikes: the guard's rule and bookkeeping, then real GSSM runs whose loss really spikes.

The spike is driven, not faked: a run trains 10 sane steps, then resumes with `optim.lr` 1000x too
large. Step 11's loss comes from the sane weights (no spike, it confirms checkpoint 10); its update
ruins them, so step 12's loss is an order of magnitude up.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from src.nanollama.config import ConfigError
from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.monitor.spikes import SpikeConfig, SpikeGuard
from tests.conftest import GSSM_TINY, crash_after, losses, run_module

SANE = [
    "config=src/apps/gssm/configs/debug.yaml",
    *GSSM_TINY,
    "optim.scheduler=constant",  # the same LR whatever optim.steps says, so a run can be extended
    "orchestration.checkpoint.period=1",
    "orchestration.checkpoint.keep_only=1",  # the rollback target must survive it
    "orchestration.spikes.enabled=true",
    "orchestration.spikes.warmup=3",
]
SPIKING = ["optim.steps=20", "optim.lr=3.0"]  # 1000x the sane 3e-3


def gssm(log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run_module("src.apps.gssm.train", *SANE, f"orchestration.log_dir={log_dir}", *args)


def events(log_dir: Path, *kinds: str) -> list[dict]:
    found = read_jsonl(log_dir / "metrics" / "events_0.jsonl")
    return [e for e in found if e["event"] in kinds]


@pytest.fixture(scope="module")
def sane_run(tmp_path_factory) -> Path:
    """10 steps at lr 3e-3, spikes watched: checkpoints 9 and 10, the last step confirmed 9."""
    log_dir = tmp_path_factory.mktemp("spikes") / "sane"
    out = gssm(log_dir, "optim.steps=10")
    assert out.returncode == 0, out.stderr[-3000:]
    return log_dir


def test_guard_rule_warmup_ema_and_lr_cut():
    guard = SpikeGuard(SpikeConfig(enabled=True, factor=2.0, ema_decay=0.5, warmup=2, lr_factor=0.5))
    assert not guard.is_spike(100.0)  # nothing seen yet: no detection
    guard.observe(2.0)
    guard.observe(4.0)
    assert guard.ema == 3.0 and guard.seen == 2
    assert guard.is_spike(6.5) and not guard.is_spike(6.0) and guard.is_spike(math.nan)
    guard.cut_lr()
    guard.cut_lr()  # cuts compound
    assert guard.lr_scale == 0.25 and guard.scale_steps_left == 0
    guard.observe(math.inf)  # a non-finite loss never enters the statistic
    assert guard.ema == 3.0 and guard.seen == 2 and guard.lr_scale == 0.25  # lr_factor_steps=0: for good

    timed = SpikeGuard(SpikeConfig(enabled=True, lr_factor=0.1, lr_factor_steps=2))
    timed.cut_lr()
    timed.observe(1.0)
    assert timed.lr_scale == pytest.approx(0.1) and timed.scale_steps_left == 1
    timed.observe(1.0)
    assert timed.lr_scale == 1.0 and timed.scale_steps_left == 0

    restored = SpikeGuard(guard.cfg)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert not SpikeGuard(SpikeConfig()).is_spike(math.nan)  # disabled: NonFiniteLossError's business


@pytest.mark.parametrize(
    "kwargs, key",
    [({"factor": 1.0}, "factor"), ({"action": "skip"}, "action"), ({"lr_factor": 0.0}, "lr_factor")],
)
def test_config_check_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        SpikeConfig(**kwargs).check()
    assert e.value.key == key


def test_a_spike_rolls_back_cuts_the_lr_and_a_resume_after_it_matches(sane_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sane_run, run)
    spiking = [*SPIKING, "orchestration.spikes.lr_factor=0.001"]
    out = gssm(run, *spiking)
    assert out.returncode == 0, out.stderr[-3000:]

    (spike,) = events(run, "loss_spike")
    (rollback,) = events(run, "rollback")
    (cut,) = events(run, "lr_cut")
    assert spike["step"] == 12 and spike["loss"] > 3 * spike["ema"]
    assert rollback == {"step": 12, "event": "rollback", "to_step": 10, "rollbacks": 1}
    assert cut["step"] == 12 and cut["lr_scale"] == 0.001
    # keep_only=1 spared checkpoint 10 while 11 was newer (10 was the target); 11 gave the spike: aside
    assert (run / "checkpoints" / ".spike-0000000011").is_dir()
    log = (run / "logs" / "rank_0.log").read_text()
    assert "rolled back to step 10" in log and "LR scale 1 -> 0.001 for good" in log

    raw = read_jsonl(run / "metrics" / "raw_0.jsonl")
    assert [r["step"] for r in raw] == list(range(1, 21))  # the abandoned steps' lines are gone
    after = [r for r in raw if r["step"] > 10]
    assert all(r["lr"] == pytest.approx(3e-3) for r in after)  # 3.0 x 0.001, from step 11 on
    assert max(r["loss"] for r in after) < 2 * spike["ema"]  # trained on, sanely
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["0000000019", "0000000020"]

    resumed = tmp_path / "resumed"
    crash_after(run, resumed, 19)
    out = gssm(resumed, *spiking)
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(resumed) == losses(run)
    assert read_jsonl(resumed / "metrics" / "raw_0.jsonl")[-1]["lr"] == raw[-1]["lr"]  # the scale resumed
    final = [torch.load(d / "checkpoints" / "0000000020" / "model.pt") for d in (run, resumed)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    kinds = ("loss_spike", "rollback", "lr_cut")
    assert events(resumed, *kinds) == events(run, *kinds)


def test_the_spike_after_max_rollbacks_stops_the_run_in_one_line(sane_run, tmp_path):
    """lr_factor=1 changes nothing: the replay spikes again at step 12, which is one rollback too many."""
    run = tmp_path / "run"
    shutil.copytree(sane_run, run)
    out = gssm(run, *SPIKING, "orchestration.spikes.lr_factor=1", "orchestration.spikes.max_rollbacks=1")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert "LossSpikeError: loss spike at step 12" in lines[0]
    assert "orchestration.spikes.max_rollbacks=1" in lines[0]
    assert lines[0].endswith(f"last good checkpoint: {run / 'checkpoints' / '0000000010'}")
    assert [e["step"] for e in events(run, "loss_spike")] == [12, 12]
    assert len(events(run, "rollback")) == 1 and not events(run, "lr_cut")


@pytest.mark.slow
def test_two_ranks_roll_back_together(tmp_path):
    """Each rank sees its own loss; the rule reads their mean, so both roll back at the same step."""
    run = tmp_path / "run"
    for args in (["optim.steps=10"], [*SPIKING, "orchestration.spikes.lr_factor=0.001"]):
        out = run_module("src.apps.gssm.train", *SANE, f"orchestration.log_dir={run}", *args, nproc=2)
        assert out.returncode == 0, out.stderr[-3000:]
    per_rank = [read_jsonl(run / "metrics" / f"events_{rank}.jsonl") for rank in (0, 1)]
    assert per_rank[0] == per_rank[1]
    assert [e["event"] for e in per_rank[0] if e["step"] == 12] == ["loss_spike", "rollback", "lr_cut"]
    assert [r["step"] for r in read_jsonl(run / "metrics" / "raw_1.jsonl")] == list(range(1, 21))


def test_continue_keeps_the_weights_and_cuts_the_lr_once_per_streak(sane_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sane_run, run)
    args = ["optim.steps=16", "optim.lr=3.0", "orchestration.spikes.action=continue"]
    out = gssm(run, *args, "orchestration.spikes.lr_factor=0.001", "orchestration.spikes.lr_factor_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    spikes = events(run, "loss_spike")
    assert spikes[0]["step"] == 12 and not events(run, "rollback")
    assert [e["step"] for e in events(run, "lr_cut")] == [12]  # the ruined weights spike on: one cut
    lrs = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics" / "raw_0.jsonl")}
    assert lrs[12] == 3.0 and lrs[13] == lrs[15] == pytest.approx(3e-3) and lrs[16] == 3.0  # 3 steps
    assert len(list_checkpoints(run / "checkpoints")) <= 3  # spikes kept: checkpoints confirmed, removed
