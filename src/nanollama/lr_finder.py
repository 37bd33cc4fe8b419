"""LR range test on any app's own training step.

    python -m src.nanollama.lr_finder script=src.apps.gssm.train config=src/apps/gssm/configs/debug.yaml \
        [min_lr=1e-7 max_lr=10 steps=100 out=...] [dotted.key=value ...]

The LR grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps of the app's training
step (its model, data, loss, optimizer settings, clipping and accumulation: the app's train.py hook
`build_training`, see `trainer.Training`), from the run's starting weights. The sweep stops early once the
loss, or its running EMA, exceeds `diverge` x its minimum so far, or is not finite. The suggested LR is
where the smoothed loss falls fastest against log LR, before its minimum (Smith 2017, "Cyclical learning
rates"; the fastai LR finder). Smoothing is an EMA run forward then backward over the points before the
divergence, so the curve neither lags the LR nor is pulled up early by the exploding tail.

Nothing of the run is touched: no Monitor, no checkpoint, nothing in `orchestration.log_dir`. Results go
to `out` (default `{log_dir}_lr_finder`): `lr_finder.csv` (step, lr, loss, smoothed), `lr_finder.json`
(the suggestion), `lr_finder.html` (plotly, when installed) and `logs/`. The finder's own keys are the
top-level ones above; every other `key=value` (and `config=`) is the app's.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import json
import logging
import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .app import BuildTraining, RunConfig, TrainEntrypoint, Training
from .config import ConfigError, RunError, build_config, cli_main, load_config, to_dict
from .distributed import Cluster
from .extras import MissingExtra, require
from .launcher import config_class
from .monitor.logger import setup_logging
from .optim import ClipState, OptimConfig, build_optimizer, freeze
from .trainer import seed_everything, train_step

logger = logging.getLogger(__name__)


@dataclass
class LRFinderConfig:
    script: str = ""  # the app's training module, e.g. src.apps.gssm.train
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100  # optimizer steps of the sweep (at most: it stops on divergence)
    smoothing: float = 0.9  # EMA factor of the loss curve
    diverge: float = 4.0  # stop once the loss (or its EMA) exceeds this times its minimum so far
    out: str = ""  # output folder; empty: {orchestration.log_dir}_lr_finder

    def check(self) -> None:
        if not self.script:
            raise ConfigError("script", "required (the app's training module, e.g. src.apps.gssm.train)")
        if not 0 < self.min_lr < self.max_lr:
            raise ConfigError("min_lr", f"need 0 < min_lr < max_lr, got {self.min_lr} and {self.max_lr}")
        if self.steps < 3:
            raise ConfigError("steps", f"must be >= 3, got {self.steps}")
        if not 0 <= self.smoothing < 1:
            raise ConfigError("smoothing", f"must be in [0, 1), got {self.smoothing}")
        if not self.diverge > 1:
            raise ConfigError("diverge", f"must be > 1, got {self.diverge}")

    def lr(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.steps - 1))


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]  # the points before the divergence, smoothed
    suggested_lr: float
    min_loss_lr: float  # the LR of the smoothed loss's minimum (a common rule: a tenth of it)
    diverged: bool  # stopped early
    out: Path


class _NoMonitor:
    """What `train_step` asks of a Monitor, without a log dir: no timing, probe, spike scale or EMA."""

    ema = None

    def __init__(self) -> None:
        self.clip_state = ClipState()
        self.spikes = SimpleNamespace(lr_scale=1.0)
        self.probe = self

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, model: torch.nn.Module, step: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def smooth(values: list[float], beta: float) -> np.ndarray:
    """Zero-phase smoothing: a bias-corrected EMA forward, then the same backward over its result."""

    def ema(x: np.ndarray) -> np.ndarray:
        out, avg = np.empty_like(x), 0.0
        for i, v in enumerate(x):
            avg = beta * avg + (1 - beta) * v
            out[i] = avg / (1 - beta ** (i + 1))
        return out

    return ema(ema(np.asarray(values, dtype=float))[::-1])[::-1]


def _diverged(value: float, best: float, factor: float) -> bool:
    return value > best + (factor - 1) * abs(best)  # factor x best for a positive loss


def stable_length(losses: list[float], factor: float) -> int:
    """How many points come before the first loss above `factor` x the lowest one before it."""
    best = math.inf
    for i, loss in enumerate(losses):
        if i > 0 and _diverged(loss, best, factor):
            return i
        best = min(best, loss)
    return len(losses)


def suggest(lrs: list[float], smoothed: np.ndarray) -> tuple[float, float]:
    """(steepest descent of the smoothed loss against log LR before its minimum, the minimum's LR)."""
    low = int(np.argmin(smoothed))
    if low == 0:
        return lrs[0], lrs[0]
    slope = np.gradient(smoothed[: low + 1], np.log(lrs[: low + 1]))
    return lrs[int(np.argmin(slope))], lrs[low]


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """The finder's own `key=value` arguments, and the app's (config= and dotted keys)."""
    own = {f.name for f in dataclasses.fields(LRFinderConfig)}
    ours, theirs = [], []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(arg, "arguments must be key=value")
        (ours if arg.split("=", 1)[0] in own else theirs).append(arg)
    return ours, theirs


def load(argv: list[str]) -> tuple[LRFinderConfig, RunConfig, BuildTraining]:
    """The finder's config, the app's run config (checked as its train.py would) and the app's hook."""
    ours, theirs = split_args(argv)
    finder = build_config(LRFinderConfig, overrides=ours)
    cls = config_class(finder.script)  # the script imports and names a RunConfig
    main = importlib.import_module(finder.script).main
    if not isinstance(main, TrainEntrypoint):
        raise ConfigError(
            "script", f"{finder.script} has no build_training hook (its main is not an app.train_entrypoint)"
        )
    cfg = load_config(cls, theirs)
    if not finder.out:
        finder.out = str(cfg.orchestration.log_dir).rstrip("/") + "_lr_finder"
    if Path(finder.out).resolve() == Path(cfg.orchestration.log_dir).resolve():
        raise ConfigError("out", f"{finder.out} is the run's log dir: the finder never writes there")
    return finder, cfg, main.build_training


def find_lr(argv: list[str]) -> LRFinderResult:
    finder, cfg, hook = load(argv)
    out = Path(finder.out)
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        setup_logging(out / "logs", cluster.rank)
        training = hook(cfg, cluster)
        stack.enter_context(training.loader)
        freeze(training.model, cfg.optim)  # before DDP registers the parameters (trainer.start_run)
        model = cluster.wrap(training.model)
        sweep_cfg = dataclasses.replace(cfg.optim, lr=finder.min_lr)
        optimizer = build_optimizer(model, sweep_cfg, cluster.device_type)
        ratio = finder.max_lr / finder.min_lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: ratio ** (min(i, finder.steps - 1) / (finder.steps - 1))
        )
        seed_everything(cfg.orchestration.seed, cluster.rank)
        logger.info(
            f"LR sweep of {finder.script}: {finder.min_lr:g} -> {finder.max_lr:g} in {finder.steps} steps"
        )
        lrs, losses, diverged = _sweep(finder, cluster, model, optimizer, scheduler, training, cfg.optim)
    if len(lrs) < 2:
        raise RunError(f"the loss diverged at once (lr {finder.min_lr:g}): lower min_lr")
    stable = stable_length(losses, finder.diverge)
    smoothed = smooth(losses[:stable], finder.smoothing)
    suggested, low = suggest(lrs[:stable], smoothed)
    result = LRFinderResult(lrs, losses, smoothed.tolist(), suggested, low, diverged, out)
    if cluster.is_main:
        _write(result, finder, cfg)
    return result


def _sweep(
    finder: LRFinderConfig,
    cluster: Cluster,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    training: Training,
    optim_cfg: OptimConfig,
) -> tuple[list[float], list[float], bool]:
    """Run the sweep; the last points kept are those before the loss diverged."""
    monitor, loss_fn = _NoMonitor(), partial(training.loss, model)
    lrs, losses = [], []
    avg, best, lowest = 0.0, math.inf, math.inf
    for step in range(finder.steps):
        lr = scheduler.get_last_lr()[0]
        rank_loss, _ = train_step(
            model, optimizer, scheduler, cluster, monitor, optim_cfg, step, training.next_batch, loss_fn
        )
        loss = cluster.all_reduce([rank_loss])[0] / cluster.world_size
        if not math.isfinite(loss):
            logger.info(f"step {step}: lr {lr:.3g}, loss {loss}: diverged, stopping")
            return lrs, losses, True
        avg = finder.smoothing * avg + (1 - finder.smoothing) * loss
        smoothed = avg / (1 - finder.smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(loss)
        logger.info(f"step {step}: lr {lr:.3g}, loss {loss:.4f}, smoothed {smoothed:.4f}")
        best = min(best, smoothed)
        if step > 0 and (
            _diverged(smoothed, best, finder.diverge) or _diverged(loss, lowest, finder.diverge)
        ):
            logger.info(f"loss {loss:.4g} (smoothed {smoothed:.4g}) diverged (x{finder.diverge:g}): stopping")
            return lrs, losses, True
        lowest = min(lowest, loss)
    return lrs, losses, False


def _write(result: LRFinderResult, finder: LRFinderConfig, cfg: RunConfig) -> None:
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lr_finder.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed"])
        for i, (lr, loss) in enumerate(zip(result.lrs, result.losses)):
            smoothed = f"{result.smoothed[i]:.8g}" if i < len(result.smoothed) else ""  # none past divergence
            writer.writerow([i, f"{lr:.8g}", f"{loss:.8g}", smoothed])
    summary = {
        "suggested_lr": result.suggested_lr,
        "min_loss_lr": result.min_loss_lr,
        "steps_run": len(result.lrs),
        "diverged": result.diverged,
        "finder": dataclasses.asdict(finder),
        "config": to_dict(cfg),
    }
    (out / "lr_finder.json").write_text(json.dumps(summary, indent=1) + "\n")
    plotted = _plot(result, out / "lr_finder.html")
    logger.info(f"wrote {out / 'lr_finder.csv'}{', lr_finder.html' if plotted else ''}, lr_finder.json")


def _plot(result: LRFinderResult, path: Path) -> bool:
    """Loss and smoothed loss against LR (log axis), the suggestion marked; needs plotly."""
    try:
        go = require("plotly.graph_objects", "notebooks", "the LR finder's plot")
    except MissingExtra as e:  # the plot is a nicety: the CSV and JSON are written anyway
        logger.info(f"{e} (no plot)")
        return False
    fig = go.Figure()
    fig.add_scatter(x=result.lrs, y=result.losses, mode="lines", name="loss", opacity=0.4)
    fig.add_scatter(x=result.lrs[: len(result.smoothed)], y=result.smoothed, mode="lines", name="smoothed")
    fig.add_vline(x=result.suggested_lr, line_dash="dash", annotation_text=f"{result.suggested_lr:.3g}")
    fig.update_layout(xaxis_type="log", xaxis_title="learning rate", yaxis_title="loss", title="LR finder")
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js beside it: small, viewable offline
    return True


@cli_main
def main(argv: list[str] | None = None) -> None:
    result = find_lr(sys.argv[1:] if argv is None else argv)
    note = " (the loss never fell: lower min_lr)" if result.suggested_lr == result.lrs[0] else ""
    stopped = ", stopped on divergence" if result.diverged else ""
    print(
        f"suggested lr: {result.suggested_lr:.3g} (steepest descent of the smoothed loss; its minimum at "
        f"lr {result.min_loss_lr:.3g}; {len(result.lrs)} steps{stopped}){note}; curve in {result.out}"
    )


if __name__ == "__main__":
    main()
