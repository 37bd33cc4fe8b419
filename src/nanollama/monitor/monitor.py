"""`Monitor`: the plumbing around a training loop, as one context manager.

It owns the log dir (config.yaml, logs/, metrics/, checkpoints/, wandb/) and holds its lock, and after
every optimizer step `end_step` logs metrics, writes the profiler row, checks the loss is finite (or,
with `spikes` on, watches it for spikes and rolls back), counts skipped steps, honours preemption signals
and saves checkpoints. `resume` restores everything a run needs to continue exactly as if it had never
stopped, after checking that the config still fits the checkpoints; `config.yaml` is rewritten only
once the resume has succeeded. A rollback restores the same, but keeps the events and the spike count.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from ..app import RunConfig
from ..config import ConfigError, RunError, to_dict, to_yaml
from ..distributed import Cluster, unwrap
from ..flops import model_flops_per_token
from ..init_checkpoint import VOCABULARY
from ..jobs import submit_eval_job
from ..optim import EMA, ClipState
from .activations import ActivationProbe
from .checkpoint import (
    NONFINITE_PREFIX,
    SPIKE_PREFIX,
    Checkpointer,
    checkpoint_name,
    latest_checkpoint,
    rng_state,
    set_rng_state,
)
from .console import console_line, short, summary_line
from .files import write_synced
from .lock import LogDirLock
from .logger import JsonlWriter, process_info, setup_logging
from .preemption import PreemptionHandler
from .profiler import HeavyProfiler, LightProfiler
from .run_config import RESUME_FIXED, RESUME_MAY_CHANGE, check_against_run
from .run_start import start_line
from .spikes import LossSpikeError, SpikeGuard
from .tensorboard import TensorboardLogger
from .wandb import WandbLogger

logger = logging.getLogger(__name__)


class NonFiniteLossError(RunError):
    """The loss became nan or inf, or the gradients were dead (not finite, or 0) `max_skipped_steps`
    times in a row or on the run's last step; the run stops (exit 1) and keeps its last good checkpoint."""


class Monitor:
    def __init__(self, run_config: RunConfig, cluster: Cluster, seq_len: int = 0, vocabulary: str = ""):
        """`seq_len`: the positions of a row, for the model's FLOPs per token (0: 6 x parameters).
        `vocabulary`: the tokenizer's identity, recorded in every checkpoint (init_checkpoint.VOCABULARY)."""
        self.cfg = cfg = run_config.orchestration
        self.cluster, self.run_config = cluster, run_config
        self.total_steps = run_config.optim.steps
        self.seq_len = seq_len
        self.vocabulary = vocabulary
        self.log_dir = Path(cfg.log_dir)
        self.rank = cluster.rank
        self.step = 0
        self.skipped = 0  # consecutive dead steps: update skipped (non-finite gradients) or a zero gradient
        self.last_skipped = False  # the last step's update was skipped (non-finite gradients)
        self.spikes = SpikeGuard(cfg.spikes)  # train_step multiplies the LR by `spikes.lr_scale`
        self.clip_state = ClipState()  # adaptive clipping's running grad norm (train_step)
        self.ema: EMA | None = None  # the weights' EMA (optim.ema_decay > 0), made by `resume`
        self._rolled_back_to: int | None = None
        self.flops_per_token, self.peak_flops = 0.0, 0.0  # set by `resume` (see _count_flops)
        self._train_start, self._train_tokens = 0.0, 0
        self.stop = False
        self.objects: dict[str, Any] = {}
        self._stack = ExitStack()

    # ---- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        try:
            return self._enter()
        except BaseException:
            self._stack.close()
            raise

    def _enter(self) -> Monitor:
        enter = self._stack.enter_context
        self._lock()
        self.config_changes: list[str] = []
        if latest_checkpoint(self.log_dir / "checkpoints") is not None:
            self.config_changes = check_against_run(
                self.run_config, self.log_dir / "config.yaml", "a resume", RESUME_MAY_CHANGE, RESUME_FIXED
            )
        metrics = self.log_dir / "metrics"
        for sub in ("metrics", "logs"):
            (self.log_dir / sub).mkdir(parents=True, exist_ok=True)
        setup_logging(self.log_dir / "logs", self.rank, self.cfg.logging.level)
        world = self.cluster.world_size
        self.checkpointer = enter(  # before any write: it removes stale temporary folders (a full disk's)
            Checkpointer(self.cfg.checkpoint, self.log_dir / "checkpoints", self.rank, world)
        )
        logger.info(f"{self.cluster.describe()}, {process_info()}")
        logger.info(f"log dir: {self.log_dir.resolve()}")
        logger.info(start_line(self.run_config))  # the app and start time, for `python -m src.nanollama.runs`
        self.raw = enter(JsonlWriter(metrics / f"raw_{self.rank}.jsonl"))
        self.evals = enter(JsonlWriter(metrics / f"eval_{self.rank}.jsonl"))
        self.events = enter(JsonlWriter(metrics / f"events_{self.rank}.jsonl"))
        device = self.cluster.device
        profile_csv = metrics / f"profile_{self.rank}.csv"
        self.profiler = enter(LightProfiler(self.cfg.profiler.light, profile_csv, device, self.total_steps))
        self.heavy = enter(
            HeavyProfiler(self.cfg.profiler.heavy, self.log_dir / "profiler", self.rank, device)
        )
        self.wandb = enter(
            WandbLogger(
                self.cfg.wandb, self.log_dir, self.cfg.name, to_dict(self.run_config), self.cluster.is_main
            )
        )
        self.tensorboard = enter(TensorboardLogger(self.cfg.tensorboard, self.log_dir, self.cluster.is_main))
        probe_jsonl = metrics / f"probe_{self.rank}.jsonl"
        self.probe = enter(ActivationProbe(self.cfg.probe, probe_jsonl, self.wandb.log))
        self.preemption = enter(PreemptionHandler(self.cfg.preemption_grace_s))
        self._tokens, self._samples = 0, 0
        self._last_log = (time.perf_counter(), 0, 0)
        self._start = time.perf_counter()
        self._start_step = 0
        return self

    def _lock(self) -> None:
        """Rank 0 holds the log dir's lock; every rank refuses to start if another run holds it."""
        lock = self._stack.enter_context(LogDirLock(self.log_dir))
        refusal = ""  # rank 0's reason not to start; the other ranks only learn that there is one
        if self.cluster.is_main:
            try:
                holder = lock.acquire()
                refusal = f"{self.log_dir} is in use by another run ({holder})" if holder else ""
            except OSError as e:  # decided with the other ranks below, so none waits forever
                refusal = f"cannot write {lock.path}: {e.strerror}"
        if self.cluster.all_reduce([float(bool(refusal))], op="max")[0]:
            raise ConfigError("orchestration.log_dir", refusal or "rank 0 could not take the log dir's lock")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.objects:
                try:
                    self._refuse_a_dead_end()
                except NonFiniteLossError as e:
                    logger.error(f"run stopped at step {self.step}: {type(e).__name__}: {e}")
                    raise
                self.save_checkpoint()
                logger.info(self._summary())
            elif exc_type is not None:
                logger.error(f"run stopped at step {self.step}: {exc_type.__name__}: {exc}")
        finally:
            self._stack.close()

    # ---- state ---------------------------------------------------------------------------------

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any) -> int:
        """Register what a checkpoint holds and restore the latest one if any; returns the step.

        With `optim.ema_decay` > 0 in the run's config, an EMA of the model's weights starts here (from
        the weights as they are, e.g. `init.checkpoint`'s), is updated by `train_step` and checkpointed."""
        self.objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}
        self._hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        decay = self.run_config.optim.ema_decay
        self.ema = EMA(model, decay) if decay else None
        found = self.checkpointer.load_latest(model, optimizer, self.ema)
        if found is not None:
            path, state = found
            self._restore(state)
            self.events.load_state_dict(state.get("event_metrics", {"offset": 0}))
            self.spikes.load_state_dict(state.get("spikes", {}))
            for change in self.config_changes:
                logger.info(f"config changed on resume: {change}")
                self.events.write({"step": self.step, "event": "config_change", "change": change})
        else:  # a restart before any checkpoint starts over: drop what the dead run wrote
            for part in (self.profiler, self.raw, self.evals, self.probe, self.events):
                part.load_state_dict({"offset": 0})
        if self.cluster.is_main:  # only now: a resume that failed leaves the run's config as it was
            _write_atomic(self.log_dir / "config.yaml", to_yaml(self.run_config))
        self._start_step = self.step
        self._count_flops(model)
        self.heavy.start(self.step)
        return self.step

    def _count_flops(self, model: nn.Module) -> None:
        """Model FLOPs per token (rows of `seq_len` positions) and the device's peak, for `mfu`."""
        self.flops_per_token = model_flops_per_token(unwrap(model), self.seq_len)
        self.peak_flops = self.cluster.peak_flops()
        per_device = f"peak {self.peak_flops:.4g} FLOP/s per device"
        logger.info(f"{self.flops_per_token:.4g} training FLOPs per token, {per_device}")
        self._train_start, self._train_tokens = time.perf_counter(), self._tokens

    def _summary(self) -> str:
        seconds = time.perf_counter() - self._train_start
        tokens = self._tokens - self._train_tokens
        peak = self.peak_flops * self.cluster.world_size
        mfu = self.flops_per_token * tokens / max(seconds, 1e-9) / peak if peak else math.nan
        return summary_line(self._start_step, self.step, tokens, seconds, mfu)

    def _restore(self, state: dict) -> None:
        """Everything but model, optimizer, events and spike bookkeeping, for a resume and a rollback."""
        o = self.objects
        _restore_schedule(o["optimizer"], o["scheduler"], state["scheduler"], self._hyper)
        o["loader"].load_state_dict(state["data"])
        self.profiler.load_state_dict(state["profiler"])
        self.raw.load_state_dict(state["raw_metrics"])
        self.evals.load_state_dict(state["eval_metrics"])
        self.probe.load_state_dict(state.get("probe_metrics", {"offset": 0}))
        self.clip_state = ClipState(**state.get("grad_clip", {}))
        if state.get("grad_scaler"):  # a float16 run's (a disabled scaler ignores it)
            self.cluster.grad_scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)

    def rank_state(self) -> dict:
        return {
            "step": self.step,
            "scheduler": self.objects["scheduler"].state_dict(),
            "data": self.objects["loader"].state_dict(),
            "profiler": self.profiler.state_dict(),
            "raw_metrics": self.raw.state_dict(),
            "eval_metrics": self.evals.state_dict(),
            "probe_metrics": self.probe.state_dict(),
            "event_metrics": self.events.state_dict(),
            "skipped": self.skipped,
            "spikes": self.spikes.state_dict(),
            "grad_clip": vars(self.clip_state).copy(),
            "grad_scaler": self.cluster.grad_scaler.state_dict(),
            "rng": rng_state(),
        }

    def save_checkpoint(self, eval_flag: bool = False) -> Path:
        """Save; a loader with `consumed()` (a list of flat records, one per source) also has what it has
        read logged and written to `data_{rank}.json` beside the checkpoint."""
        o = self.objects
        records: dict[str, Any] = {}
        if self.vocabulary and self.cluster.is_main:
            records[VOCABULARY] = {"vocabulary": self.vocabulary}
        if hasattr(o["loader"], "consumed"):
            sources = o["loader"].consumed()
            records[f"data_{self.rank}.json"] = {"step": self.step, "rank": self.rank, "sources": sources}
            if not (self.checkpointer.root / checkpoint_name(self.step)).exists():
                for record in sources:
                    logger.info(f"data consumed at step {self.step}: " + _fields(record))
        path = self.checkpointer.save(
            self.step, o["model"], o["optimizer"], self.rank_state(), eval_flag, records, self.ema
        )
        if eval_flag and self.cluster.is_main and self.cfg.eval_job.script:
            self._submit_eval(path)
        return path

    def _submit_eval(self, path: Path) -> None:
        """A failed submission must not stop training: the flag stays, and eval.py can be run by hand."""
        job = self.cfg.eval_job
        try:
            job_id = submit_eval_job(job, self.log_dir, path)
            logger.info(f"eval job {job_id} ({job.launcher}) submitted for {path}")
        except Exception as e:  # noqa: BLE001
            logger.error(f"could not submit the eval job for {path} ({type(e).__name__}: {e}); run eval.py")

    # ---- per step ------------------------------------------------------------------------------

    def phase(self, name: str):
        return self.profiler.phase(name)

    def log_eval(self, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics}
        self.evals.write(record)
        self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self.tensorboard.log({f"eval/{k}": v for k, v in metrics.items()}, step, self._start_step)
        logger.info("eval " + _fields(record))

    def end_step(
        self,
        step: int,
        loss: float,
        tokens: int,
        eval_checkpoint: bool = False,
        samples: int = 0,
        **metrics: float,
    ) -> int:
        """Call after each optimizer step with the rank's loss and the global tokens of the step; returns
        the step the loop goes on from: `step`, or after a rollback the checkpoint's. Metric lines carry
        tokens/s over all ranks and per device, and with `samples` (global samples of the step, for apps
        whose samples are not rows of tokens, e.g. images) samples/s likewise.

        `eval_checkpoint` saves an eval-flagged checkpoint, for an evaluation outside this job.
        """
        if self._rolled_back_to is not None and step != self._rolled_back_to + 1:
            raise RuntimeError("after a rollback the loop must go on from the step end_step returned")
        self._rolled_back_to = None
        self.step = step
        self._tokens += tokens
        self._samples += samples
        with self.phase("monitor"):
            # one tiny collective a step, so every rank stops (or rolls back) at the same step, whoever saw
            # what; flags are summed with the loss, so a flag set anywhere is > 0 everywhere
            flags = [float(self.preemption.requested), float(not math.isfinite(loss)), loss]
            preempted, non_finite, loss_sum = self.cluster.all_reduce(flags)
            preempted, non_finite = preempted > 0, non_finite > 0
            mean_loss = math.nan if non_finite else loss_sum / self.cluster.world_size
            spike = self.spikes.is_spike(mean_loss)
            if spike:
                if self._on_spike(step, mean_loss):
                    self.stop = self.stop or preempted  # the checkpoint rolled back to is the one to resume
                    return self.step
            elif non_finite:
                raise NonFiniteLossError(
                    f"loss is not finite at step {step} (rank {self.rank}: {loss}); " + self._set_aside_bad()
                )
            else:
                self.spikes.observe(mean_loss)
            # a rollback target must be a checkpoint whose next step was no spike
            sound = not spike or self.cfg.spikes.action == "continue"
            self._count_skipped(step, metrics.get("grad_norm"), sound)
            if step % self.cfg.logging.period == 0 or step == self.total_steps:
                self._log_metrics(step, mean_loss, loss, metrics)
        self.profiler.end_step(step, tokens)
        self.heavy.step()
        if self.heavy.trace_path is not None:
            self.wandb.save_file(self.heavy.trace_path)
            self.heavy.trace_path = None
        period = self.cfg.checkpoint.period
        if preempted or eval_checkpoint or (period > 0 and step % period == 0):
            self.save_checkpoint(eval_flag=eval_checkpoint)
        if preempted:
            logger.warning(f"preempted: checkpoint saved at step {step}, exiting")
            self.stop = True
        return step

    def _on_spike(self, step: int, loss: float) -> bool:
        """A loss spike (every rank agrees: `loss` is the mean over ranks): logged, then a rollback to the
        last good checkpoint or none, and an LR cut. Returns whether it rolled back."""
        cfg, guard = self.cfg.spikes, self.spikes
        value = loss if math.isfinite(loss) else str(loss)
        self.events.write({"step": step, "event": "loss_spike", "loss": value, "ema": guard.ema})
        logger.warning(f"step {step}: loss spike, loss {loss:.4g} > {cfg.factor} x EMA {guard.ema:.4g}")
        if cfg.action == "rollback":
            if guard.rollbacks >= cfg.max_rollbacks:
                raise LossSpikeError(
                    f"loss spike at step {step} (loss {loss:.4g}, EMA {guard.ema:.4g}) after "
                    f"{guard.rollbacks} rollbacks (orchestration.spikes.max_rollbacks={cfg.max_rollbacks}); "
                    + self._set_aside_bad(SPIKE_PREFIX, "a loss spike")
                )
            if self._rollback(step):
                self._cut_lr(step)
                return True
        first = not guard.spiking  # continue (or nothing to roll back to): a streak cuts once
        guard.observe(loss, spike=True)
        if first:
            self._cut_lr(step)
        return False

    def _cut_lr(self, step: int) -> None:
        cfg, guard = self.cfg.spikes, self.spikes
        old = guard.lr_scale
        guard.cut_lr()
        if guard.lr_scale != old:
            lasting = f"for {cfg.lr_factor_steps} steps" if cfg.lr_factor_steps else "for good"
            self.events.write({"step": step, "event": "lr_cut", "lr_scale": guard.lr_scale, "from": old})
            logger.warning(f"step {step}: LR scale {old:.4g} -> {guard.lr_scale:.4g} {lasting}")

    def _rollback(self, step: int) -> bool:
        """Back to the newest confirmed checkpoint (its next step was finite and no spike) with everything
        `resume` restores; the checkpoints after it are moved aside, to be saved afresh. False: none."""
        target = self.checkpointer.confirmed
        if target is None or not target.is_dir():
            logger.warning(f"step {step}: no good checkpoint to roll back to, training on")
            return False
        o = self.objects
        self.checkpointer.set_aside_unconfirmed(SPIKE_PREFIX, "a loss spike")
        state = self.checkpointer.load(target, o["model"], o["optimizer"], self.ema)
        self._restore(state)
        self.spikes.load_statistic(state.get("spikes", {}))
        self.spikes.rollbacks += 1
        n, most = self.spikes.rollbacks, self.cfg.spikes.max_rollbacks
        self.events.write({"step": step, "event": "rollback", "to_step": self.step, "rollbacks": n})
        logger.warning(f"step {step}: rolled back to step {self.step} ({target}), rollback {n} of {most}")
        self._rolled_back_to = self.step
        return True

    def _set_aside_bad(
        self, prefix: str = NONFINITE_PREFIX, why: str = "dead gradients (not finite, or 0)"
    ) -> str:
        """Move aside the checkpoints whose weights gave nan (or a spike); says where a restart resumes."""
        return f"last good checkpoint: {self.checkpointer.set_aside_unconfirmed(prefix, why) or 'none'}"

    def _count_skipped(self, step: int, grad_norm: float | None, sound: bool = True) -> None:
        """Dead steps: `train_step` skips the update of a step whose gradients are not finite (the norm is
        global, so every rank sees the same), and a gradient norm of exactly 0 (a collapsed model: nothing
        left to learn from) changes nothing either. Too many in a row stop the run. A live step confirms
        the checkpoints before it, unless it was a loss spike (not `sound`). No norm given: live."""
        self.last_skipped = grad_norm is not None and not math.isfinite(grad_norm)
        if grad_norm is None or (math.isfinite(grad_norm) and grad_norm != 0):
            self.skipped = 0
            if sound:
                self.checkpointer.confirm()
            return
        self.skipped += 1
        what = "update skipped" if grad_norm != 0 else "nothing to learn"
        self.events.write({"step": step, "event": "skipped_step", "grad_norm": str(grad_norm)})
        logger.warning(f"step {step}: gradient norm {grad_norm}, {what} ({self.skipped} in a row)")
        if self.skipped > self.cfg.max_skipped_steps:
            raise NonFiniteLossError(
                f"gradient norm {grad_norm} for {self.skipped} steps in a row (to step {step}; "
                f"orchestration.max_skipped_steps={self.cfg.max_skipped_steps}); " + self._set_aside_bad()
            )

    def _refuse_a_dead_end(self) -> None:
        """A run that ends on skipped steps (non-finite gradients) is no success, however few: its last
        weights are those that gave them. Nothing is saved of them; a restart resumes from the last good
        checkpoint. A preempted run mid-way will resume and is let go; one at its last step is not. (A
        zero gradient alone is legitimate now and then: a batch that reaches no trained part.)"""
        preempted_midway = self.stop and self.step < self.total_steps
        if self.last_skipped and not preempted_midway:
            raise NonFiniteLossError(
                f"the run ended at step {self.step} on {self.skipped} dead steps in a row (gradient norm "
                "not finite or 0: no update); " + self._set_aside_bad()
            )

    def _log_metrics(self, step: int, mean_loss: float, loss: float, metrics: dict) -> None:
        """`mean_loss` over ranks comes from end_step's one collective; `loss` is this rank's."""
        now = time.perf_counter()
        elapsed = now - self._start
        done = step - self._start_step
        record = {"step": step, "loss": mean_loss, "rank_loss": loss, **metrics}
        last_time, last_tokens, last_samples = self._last_log
        seconds, world = max(now - last_time, 1e-9), self.cluster.world_size
        record["tokens_per_s"] = (self._tokens - last_tokens) / seconds
        record["tokens_per_s_per_device"] = record["tokens_per_s"] / world
        if self._samples:
            record["samples_per_s"] = (self._samples - last_samples) / seconds
            record["samples_per_s_per_device"] = record["samples_per_s"] / world
        self._last_log = (now, self._tokens, self._samples)
        if self.peak_flops > 0:
            record["mfu"] = self.flops_per_token * record["tokens_per_s_per_device"] / self.peak_flops
        record["memory_gib"] = _memory_gib(self.cluster.device)
        record["eta_s"] = elapsed / max(done, 1) * (self.total_steps - step)
        self.raw.write(record)
        self.wandb.log(record, step=step)
        train = {f"train/{k}": v for k, v in record.items() if k != "step"}
        self.tensorboard.log(train, step, self._start_step)
        logger.info(console_line(record, self.total_steps))


def _restore_schedule(optimizer: Any, scheduler: Any, saved: dict, hyper: list[dict]) -> None:
    """The checkpoint's step and moments, this config's hyperparameters: a resume with another
    `optim.lr` (or weight decay, betas) trains with it, from the schedule's position at the checkpoint."""
    for group, ours in zip(optimizer.param_groups, hyper):
        group.update(ours)
    scheduler.load_state_dict({**saved, "base_lrs": scheduler.base_lrs})
    with warnings.catch_warnings():  # get_lr outside step() warns; it is the closed form we want here
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _memory_gib(device: torch.device) -> float:
    """The device's peak allocated memory (GPU), or the process's resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _fields(record: dict) -> str:
    return " ".join(f"{k}={short(v)}" for k, v in record.items())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must not leave an empty config.yaml.tmp behind
