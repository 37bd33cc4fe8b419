"""The pieces every app's training loop shares: model construction, seeding, and one optimizer step.

The loop itself stays in the app (data, loss, evaluation are the app's); what would otherwise be
copied line by line between apps lives here.
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .app import BuildTraining, RunConfig, Training, set_vocab_size
from .config import ConfigError
from .data.packing import TextDataConfig, source_documents
from .data.text import Tokenizer, TokenizerConfig, build_tokenizer
from .distributed import Cluster
from .init_checkpoint import check_init, resumes
from .model.attention import batch_mask_error, flex_backward_available
from .model.transformer import Transformer, TransformerConfig
from .monitor.checkpoint import clear_eval_flag, find_checkpoint
from .monitor.logger import JsonlWriter
from .monitor.monitor import Monitor
from .monitor.run_config import EVAL_MAY_CHANGE, check_against_run
from .optim import (
    OptimConfig,
    base_lr,
    build_optimizer,
    build_scheduler,
    check_groups,
    clip_gradients,
    freeze,
)

logger = logging.getLogger(__name__)


def training_attention(cfg: TransformerConfig, training: bool, device: torch.device) -> None:
    """Flex falls back to sdpa where it cannot train (no FlexAttention backward on CPU), with a warning."""
    if training and cfg.attention == "flex" and not flex_backward_available(device):
        logger.warning(f"FlexAttention has no backward on {device.type}: training with sdpa instead")
        cfg.attention = "sdpa"


def build_transformer(cfg: TransformerConfig, seed: int, training: bool, device: torch.device) -> Transformer:
    """Deterministic init from the global seed, with the attention that can train on `device`."""
    training_attention(cfg, training, device)
    torch.manual_seed(seed)
    return Transformer(cfg)


def build_text_tokenizer(tok: TokenizerConfig, data: TextDataConfig, model: TransformerConfig) -> Tokenizer:
    """A text app's tokenizer, and the vocabulary size it fixes (0 in `model`: take the tokenizer's).

    A sentencepiece model is trained on the training split of the sources, cached by a hash of corpus
    and settings: eval and other entrypoints rebuild the very same one from the run's config.
    """
    docs = None
    if tok.kind == "sentencepiece":
        docs = [d for s in data.sources for d in source_documents(s, data.valid_fraction, "train")]
    tokenizer = build_tokenizer(tok, docs)
    set_vocab_size(model, tokenizer.vocab_size, "tokenizer")
    return tokenizer


def check_text_masks(
    cfg: RunConfig, model: TransformerConfig, data: TextDataConfig, eval_batch_size: int, world_size: int
) -> None:
    """A text app's per-batch attention masks (documents, padding) can be built for its largest batch on
    a rank, training micro-batch or evaluation batch: refused at start-up, not at the first batch."""
    rows = max(
        data.batch_size // (world_size * cfg.optim.accumulation_steps),
        eval_batch_size // world_size,
        1,
    )
    if why := batch_mask_error(model.attention, cfg.cluster.device_type, rows, data.seq_len):
        raise ConfigError("data.seq_len", why)


def steps_in_epochs(batches: int, cluster: Cluster, accumulation_steps: int, epochs: str) -> int:
    """Optimizer steps of a `data.epochs`-long run from this rank's `batches`: the fewest of any rank
    (shards hold as many documents but not as many tokens; ranks draw datasets in different orders), so
    that every rank stops at the same step. `epochs` names the length in the error."""
    fewest = int(-cluster.all_reduce([-float(batches)], op="max")[0])
    steps = fewest // accumulation_steps
    if steps < 1:
        raise ConfigError("data.epochs", f"{epochs} epochs give {fewest} batches per rank")
    return steps


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank Python, NumPy and torch streams (their states are checkpointed with the run)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits of tokens[:, :-1], in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cluster: Cluster,
    monitor: Monitor,
    cfg: OptimConfig,
    step: int,
    next_batch: Callable[[], Any],
    loss_fn: Callable[[Any], torch.Tensor],
) -> tuple[float, dict[str, float]]:
    """One optimizer step over `cfg.accumulation_steps` micro-batches, timed by phase.

    `next_batch()` draws a micro-batch, `loss_fn(batch)` returns its mean loss. Gradients are synced
    only on the last micro-step. A step whose gradient norm is not finite is not applied (the scheduler
    still moves on; the Monitor counts such steps). The LR is the scheduler's times the Monitor's
    loss-spike scale; under float16 the loss is scaled (`cluster.grad_scaler`) and the gradients unscaled
    before they are clipped. The weights' EMA (`monitor.ema`) follows every applied step. Returns the
    rank's mean loss and the step's lr and grad norm (+ the adaptive clipping threshold, the float16 loss
    scale).
    """
    model.train()
    acc = cfg.accumulation_steps
    scaler = cluster.grad_scaler  # disabled (all calls pass through) unless cluster.dtype=float16
    loss_sum = torch.zeros((), device=cluster.device)
    with monitor.probe.capture(model, step + 1):  # activation statistics every probe.period steps
        for micro_step in range(acc):
            with monitor.phase("data"):
                batch = next_batch()
            with monitor.phase("model"), cluster.gradient_sync(model, micro_step == acc - 1):
                with cluster.autocast():
                    loss = loss_fn(batch)
                scaler.scale(loss / acc).backward()
                loss_sum += loss.detach()
    with monitor.phase("optim"):
        scaler.unscale_(optimizer)  # clipping, and the norm logged, see the true gradients
        grad_norm, max_norm = clip_gradients(model, cfg, monitor.clip_state)
        # set for this update only: scheduler.step() below sets the schedule's own LR again
        lrs = [lr * monitor.spikes.lr_scale for lr in scheduler.get_last_lr()]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        applied = math.isfinite(grad_norm)  # the global norm: every rank skips the same steps
        if applied:
            scaler.step(optimizer)  # optimizer.step() (its own inf check agrees: the same gradients)
            if monitor.ema is not None:
                monitor.ema.update()
        metrics = {"lr": base_lr(optimizer, lrs), "grad_norm": grad_norm}  # multiplier 1's (optim.groups)
        if scaler.is_enabled():
            metrics["loss_scale"] = scaler.get_scale()
            scaler.update()  # an overflowed (skipped) step halves the scale, enough clean steps double it
        if cfg.clip_mode == "adaptive":
            metrics["clip"] = max_norm
        with warnings.catch_warnings():
            if not applied:  # a skipped first step (fp16's overflows) is meant, not a misordered loop
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / acc, metrics


@dataclass
class Run:
    """A training run set up by `start_run`, ready for the app's loop."""

    cfg: RunConfig
    cluster: Cluster
    monitor: Monitor
    training: Training  # its model unwrapped
    model: nn.Module  # wrapped by the cluster (DDP, FSDP2, compile): what the loop trains and evaluates
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any  # entered: batches come through `training.next_batch`
    step: int  # the step to start from: 0, or the resumed checkpoint's

    def train_step(self, step: int) -> tuple[float, dict[str, float]]:
        """`train_step` of this run's model, optimizer and data at `step` (see the function)."""
        loss_fn = lambda batch: self.training.loss(self.model, batch)  # noqa: E731
        return train_step(
            self.model,
            self.optimizer,
            self.scheduler,
            self.cluster,
            self.monitor,
            self.cfg.optim,
            step,
            self.training.next_batch,
            loss_fn,
        )


def count_by_part(names: list[str]) -> str:
    """`vision.a.w, vision.b.w, lm.w` -> `vision: 2, lm: 1`."""
    parts: dict[str, int] = {}
    for name in names:
        part = name.split(".")[0]
        parts[part] = parts.get(part, 0) + 1
    return ", ".join(f"{p}: {n}" for p, n in parts.items())


@contextmanager
def start_run(
    cfg: RunConfig,
    cluster: Cluster,
    loader: Any,
    build_training: BuildTraining,
    check_model: Callable[[], nn.Module],
    seq_len: int = 0,
    prefix_map: dict | None = None,
    vocabulary: str = "",
) -> Iterator[Run]:
    """Everything between an app's data stream and its loop, in the one order that works; the app
    builds its data first (it may fix `optim.steps` or the vocabulary, and bad data must exit 2 before
    the log dir exists).

    1. Whether the log dir holds a checkpoint is read before the Monitor, which creates the log dir.
    2. On a fresh start, `init.checkpoint` is checked against `check_model()`, the app's model built
       under the meta device (no memory, no init; it must not move itself to a device), and so is
       `optim.groups` in any case: a wrong path, shape or prefix exits 2 while there is no log dir.
    3. The Monitor takes the log dir's lock and sets up logging, so all that follows is in the run's log.
    4. `build_training(cfg, cluster, loader, init)` makes the app's Training from its `loader` (not yet
       entered); `init` (load `init.checkpoint`) only on a fresh start: a resume's own checkpoint wins
       over its starting point.
    5. Its loader is entered (worker threads, files) and closed with the run.
    6. `optim.groups` multipliers of 0 freeze their parameters before the wrap, so DDP never registers
       them and FSDP2 shards only what trains.
    7. The cluster wraps the model (DDP, FSDP2, compile); the optimizer is built on the wrapped model's
       parameters (FSDP2's are sharded), then the schedule.
    8. The per-rank random streams are seeded after the model's init (seeded by the global seed alone,
       the same weights on every rank); a resume then replaces them with the checkpoint's.
    9. The Monitor restores the latest checkpoint (model, optimizer, schedule, data, streams) if any.

    `seq_len`: positions per row, for the FLOP count (0: 6 x parameters per token). `prefix_map`: the
    check's `init.prefix_map` where the app picks its own (BERT's task switch). `vocabulary`: the
    tokenizer's identity (`Tokenizer.identity`): saved with every checkpoint, and `init.checkpoint` of
    another vocabulary is refused.
    """
    resuming = resumes(cfg.orchestration.log_dir)
    # a resume's own checkpoint wins: its starting point may have moved on (a requeue after a clean-up)
    warning = "" if resuming else check_init(cfg.init, check_model, prefix_map, vocabulary)
    with torch.device("meta"):  # a prefix that matches nothing, or everything frozen: exit 2 here
        check_groups(check_model(), cfg.optim)
    with ExitStack() as stack:
        monitor = stack.enter_context(Monitor(cfg, cluster, seq_len, vocabulary))
        if warning and not resuming:  # in the run's log, which exists from here
            logger.warning(warning)
        training = build_training(cfg, cluster, loader, init=not resuming)
        loader = stack.enter_context(training.loader)
        if frozen := freeze(training.model, cfg.optim):
            logger.info(f"frozen: {len(frozen)} tensors ({count_by_part(frozen)})")
        model = cluster.wrap(training.model)
        optimizer = build_optimizer(model, cfg.optim, cluster.device_type)
        scheduler = build_scheduler(optimizer, cfg.optim)
        seed_everything(cfg.orchestration.seed, cluster.rank)
        step = monitor.resume(model, optimizer, scheduler, loader)
        yield Run(cfg, cluster, monitor, training, model, optimizer, scheduler, loader, step)


def eval_weights(monitor: Monitor, use_ema: bool) -> AbstractContextManager:
    """Evaluate in the loop under this: with `use_ema` the model holds its EMA weights inside the block."""
    if use_ema and monitor.ema is not None:
        return monitor.ema.swapped()
    return nullcontext()


def checkpoint_to_evaluate(cfg: RunConfig, checkpoint: str) -> Path:
    """The checkpoint an eval, probe or generate script reads (`checkpoint`, else the latest of
    `orchestration.log_dir`): it must pass its manifest, and the keys that fix its weights' shape and
    meaning must match its run's `config.yaml` (ConfigError naming the key and both values)."""
    path = find_checkpoint(checkpoint, cfg.orchestration.log_dir)
    check_against_run(cfg, path.parent.parent / "config.yaml", f"evaluating {path}", EVAL_MAY_CHANGE)
    return path


def record_eval(checkpoint: str | os.PathLike, cluster: Cluster, result: dict) -> None:
    """What an app's eval.py does with its result: append it, naming the checkpoint, to
    `metrics/eval_{rank}.jsonl` of the run that holds the checkpoint, then, once every rank has written,
    clear the checkpoint's eval flag."""
    log_dir = Path(checkpoint).parent.parent
    with JsonlWriter(log_dir / "metrics" / f"eval_{cluster.rank}.jsonl") as writer:
        writer.write({**result, "checkpoint": str(checkpoint)})  # the training run's resume keeps such lines
    cluster.barrier()
    if cluster.is_main:
        clear_eval_flag(checkpoint)
