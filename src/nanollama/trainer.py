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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .data.packing import TextDataConfig, source_documents
from .data.text import Tokenizer, TokenizerConfig, build_tokenizer
from .distributed import Cluster
from .model.attention import batch_mask_error, flex_backward_available
from .model.transformer import Transformer, TransformerConfig
from .monitor.checkpoint import clear_eval_flag, find_checkpoint
from .monitor.logger import JsonlWriter
from .monitor.monitor import Monitor
from .monitor.run_config import EVAL_MAY_CHANGE, check_against_run
from .optim import OptimConfig, base_lr, clip_gradients

logger = logging.getLogger(__name__)


def build_transformer(cfg: TransformerConfig, seed: int, training: bool, device: torch.device) -> Transformer:
    """Deterministic init from the global seed; flex falls back to sdpa where it cannot train."""
    if training and cfg.attention == "flex" and not flex_backward_available(device):
        logger.warning(f"FlexAttention has no backward on {device.type}: training with sdpa instead")
        cfg.attention = "sdpa"
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
    if model.vocab_size not in (0, tokenizer.vocab_size):
        raise ConfigError("model.vocab_size", f"{model.vocab_size} != tokenizer's {tokenizer.vocab_size}")
    model.vocab_size = tokenizer.vocab_size
    return tokenizer


def check_text_masks(cfg: Any, world_size: int) -> None:
    """A text app's per-batch attention masks (documents, padding) can be built for its largest batch on
    a rank, training micro-batch or evaluation batch: refused at start-up, not at the first batch."""
    rows = max(
        cfg.data.batch_size // (world_size * cfg.optim.accumulation_steps),
        cfg.evaluation.batch_size // world_size,
        1,
    )
    if why := batch_mask_error(cfg.model.attention, cfg.cluster.device_type, rows, cfg.data.seq_len):
        raise ConfigError("data.seq_len", why)


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
class Training:
    """One app's training step, as its train.py's hook `build_training(cfg, cluster, loader=None,
    init=True)` builds it: the app's own loop runs it, and so do the core's tools (the LR finder), which
    know nothing else of the app. The hook builds the data stream when `loader` is None (train() builds it
    earlier, before the log dir exists) and loads `init.checkpoint` when `init` (train() passes False when
    the run resumes)."""

    model: nn.Module  # unwrapped, with its starting weights; the caller wraps it (cluster.wrap)
    loader: Any  # the data stream: a context manager with state_dict/load_state_dict, not yet entered
    next_batch: Callable[[], Any]  # the next micro-batch on the device (from `loader`, once entered)
    loss: Callable[[nn.Module, Any], torch.Tensor]  # mean loss of a micro-batch under the wrapped model


def check_use_ema(cfg: Any) -> None:
    """`evaluation.use_ema` needs an EMA to evaluate (a cross-section check, for an app's config)."""
    if getattr(cfg.evaluation, "use_ema", False) and not cfg.optim.ema_decay:
        raise ConfigError("evaluation.use_ema", "needs optim.ema_decay > 0 (no EMA of the weights is kept)")


def eval_weights(monitor: Monitor, use_ema: bool) -> AbstractContextManager:
    """Evaluate in the loop under this: with `use_ema` the model holds its EMA weights inside the block."""
    if use_ema and monitor.ema is not None:
        return monitor.ema.swapped()
    return nullcontext()


def checkpoint_to_evaluate(cfg: Any) -> Path:
    """The checkpoint an eval, probe or generate script reads (`cfg.checkpoint`, else the latest of
    `orchestration.log_dir`): it must pass its manifest, and the keys that fix its weights' shape and
    meaning must match its run's `config.yaml` (ConfigError naming the key and both values)."""
    path = find_checkpoint(cfg.checkpoint, cfg.orchestration.log_dir)
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
