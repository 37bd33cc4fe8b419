"""Adaptive clipping and float16's GradScaler: what they do to a step, and that both resume exactly.

The float16 path itself needs CUDA; here `train_step` runs it with an enabled CPU GradScaler (float32
numbers, the same calls), which is everything but the fp16 kernels.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from src.nanollama.app import RunConfig
from src.nanollama.config import build_config
from src.nanollama.distributed import Cluster, ClusterConfig
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.monitor.monitor import Monitor
from src.nanollama.optim import ClipState, OptimConfig, build_optimizer, build_scheduler, clip_gradients
from src.nanollama.trainer import causal_lm_loss, train_step
from tests.conftest import GSSM_TINY, crash_after, losses, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"


def gssm(log_dir: Path, *args: str):
    out = run_module("src.apps.gssm.train", CONFIG, *GSSM_TINY, f"orchestration.log_dir={log_dir}", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def model_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    (scale * model(torch.randn(8, 4)).pow(2).mean()).backward()
    return model


def total_norm(model: nn.Module) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


def test_adaptive_clipping_starts_at_clip_then_follows_the_clipped_norms():
    cfg = build_config(OptimConfig, {"clip": 0.5, "clip_mode": "adaptive", "clip_adaptive_factor": 2.0})
    state = ClipState()
    model = model_with_grads(100.0)
    norm, max_norm = clip_gradients(model, cfg, state)
    assert max_norm == 0.5 and total_norm(model) == pytest.approx(0.5)  # no statistic yet: the fixed clip
    assert state.seen == 1 and state.ema == pytest.approx(0.5)  # the clipped norm, not the raw one
    model = model_with_grads(100.0)
    norm, max_norm = clip_gradients(model, cfg, state)
    assert max_norm == pytest.approx(1.0) and total_norm(model) == pytest.approx(1.0) and norm > 1
    small = model_with_grads(1e-3)
    before = [p.grad.clone() for p in small.parameters()]
    clip_gradients(small, cfg, state)
    assert all(torch.equal(p.grad, b) for p, b in zip(small.parameters(), before))
    clip_gradients(model_with_grads(float("nan")), cfg, state)
    assert state.seen == 3  # a non-finite norm (a skipped step) never enters the EMA


def test_adaptive_clipping_resumes_exactly(tmp_path):
    """Factor 1 clips nearly every step at the running norm: a resume without its state would differ."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [
        "optim.steps=8",
        "orchestration.checkpoint.period=4",
        "optim.clip_mode=adaptive",
        "optim.clip_adaptive_factor=1.0",
    ]
    gssm(full, *args)
    raw = read_jsonl(full / "metrics" / "raw_0.jsonl")
    assert sum(r["grad_norm"] > r["clip"] for r in raw) >= 4
    crash_after(full, resumed, 4)
    gssm(resumed, *args)
    assert losses(resumed) == losses(full)
    assert [r["clip"] for r in read_jsonl(resumed / "metrics" / "raw_0.jsonl")] == [r["clip"] for r in raw]


def test_float16_on_cpu_exits_2_naming_cluster_dtype(tmp_path, capsys):
    """In-process (a subprocess costs seconds): the script's own main, its exit code and stderr."""
    from src.apps.gssm.train import main

    log_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([CONFIG, f"orchestration.log_dir={log_dir}", "cluster.dtype=float16", "cluster.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "cluster.dtype" in err[0] and "CUDA" in err[0]
    assert not log_dir.exists()


class FixedBatches:
    """The same batch every step: a stateful loader with nothing to restore."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.fixture
def monitor_parts(tmp_path):
    """Model, optimizer, scheduler, loader, cluster and an entered Monitor on a tmp log dir."""

    def make(log_dir: Path, optim: OptimConfig, scaler: torch.amp.GradScaler | None = None):
        cluster = Cluster(ClusterConfig(device="cpu"))
        if scaler is not None:
            cluster.grad_scaler = scaler  # what cluster.dtype=float16 makes on CUDA
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
        optimizer = build_optimizer(model, optim, "cpu")
        scheduler = build_scheduler(optimizer, optim)
        run_config = build_config(RunConfig, {"orchestration": {"log_dir": str(log_dir)}})
        run_config.optim = optim
        monitor = Monitor(run_config, cluster)
        stack.append(monitor.__enter__())
        loader = FixedBatches(torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1)))
        monitor.resume(model, optimizer, scheduler, loader)
        return model, optimizer, scheduler, loader, cluster, monitor

    stack: list[Monitor] = []
    yield make
    for monitor in stack:
        monitor.objects = {}  # no checkpoint on the way out
        monitor.__exit__(None, None, None)
    for handler in [h for h in logging.getLogger().handlers if getattr(h, "_nanollama", False)]:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_grad_scaler_skips_an_overflow_matches_an_unscaled_step_and_resumes(monitor_parts, tmp_path):
    optim = build_config(OptimConfig, {"steps": 4, "scheduler": "constant", "lr": 1e-2})

    def step(parts, i: int) -> tuple[float, dict]:
        model, optimizer, scheduler, loader, cluster, monitor = parts
        # x 1e4: gradients large enough that 2^127 times them overflow float32
        loss_fn = lambda tokens: 1e4 * causal_lm_loss(model(tokens[:, :-1]), tokens)  # noqa: E731
        return train_step(
            model, optimizer, scheduler, cluster, monitor, optim, i, lambda: loader.tokens, loss_fn
        )

    plain = monitor_parts(tmp_path / "plain", optim)
    step(plain, 0)
    # 2^127 overflows the gradients; one backoff (2^-100) brings the scale to 2^27, where they are finite
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100, growth_interval=1)
    scaled = monitor_parts(tmp_path / "scaled", optim, scaler)
    before = copy.deepcopy(scaled[0].state_dict())
    _, overflow = step(scaled, 0)
    assert not math.isfinite(overflow["grad_norm"]) and overflow["loss_scale"] == 2.0**127
    assert all(torch.equal(t, before[k]) for k, t in scaled[0].state_dict().items())  # not applied
    _, metrics = step(scaled, 1)
    assert metrics["loss_scale"] == 2.0**27 and metrics["grad_norm"] < float("inf")
    # a power-of-two scale, unscaled before clipping: exactly the unscaled step
    assert all(torch.equal(t, plain[0].state_dict()[k]) for k, t in scaled[0].state_dict().items())
    assert scaler.get_scale() == 2.0**28  # growth_interval=1: a clean step doubles it

    monitor = scaled[-1]
    monitor.step = 2
    monitor.save_checkpoint()
    monitor.objects = {}
    monitor.__exit__(None, None, None)  # gives the log dir's lock back
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0)
    monitor_parts(tmp_path / "scaled", optim, fresh)  # the same log dir: resumes step 2
    assert fresh.state_dict() == scaler.state_dict()
