"""Held-out evaluation: the model's loss beside the Bayes-optimal loss on the same sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...nanollama.config import ConfigError
from ...nanollama.distributed import Cluster
from .data import eval_batches
from .generator import GSSM

if TYPE_CHECKING:
    from .train import TrainConfig


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    n_sequences: int = 256  # held-out sequences (global; on-disk data: 0 means the whole test split)
    batch_size: int = 64  # global sequences per evaluation batch
    asynchronous: bool = (
        False  # save an eval-flagged checkpoint for `eval.py` instead of evaluating in the loop
    )

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError("period", f"must be >= 0, got {self.period}")
        if self.batch_size < 1 or self.n_sequences < 0:
            raise ConfigError("batch_size", "batch_size must be >= 1 and n_sequences >= 0")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


@torch.no_grad()
def evaluate(model: nn.Module, gssm: GSSM, cfg: TrainConfig, cluster: Cluster) -> dict[str, float]:
    """Sums of losses and token counts are reduced across ranks, then divided once."""
    was_training = model.training
    model.eval()
    loss_sum, bayes_sum, count = 0.0, 0.0, 0
    ev = cfg.evaluation
    if ev.batch_size < cluster.world_size:
        raise ConfigError("evaluation.batch_size", f"must be >= world size {cluster.world_size}")
    batches = eval_batches(
        cfg.data,
        gssm,
        ev.n_sequences,
        ev.batch_size,
        cfg.orchestration.seed,
        cluster.rank,
        cluster.world_size,
    )
    for tokens, bayes_logprobs in batches:
        tokens = tokens.to(cluster.device)
        with cluster.autocast():
            logits = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        loss_sum += losses.item()
        bayes_sum += -float(bayes_logprobs[:, 1:].sum())
        count += tokens[:, 1:].numel()
    loss_sum, bayes_sum, count = cluster.all_reduce([loss_sum, bayes_sum, float(count)])
    model.train(was_training)
    loss, bayes_loss = loss_sum / count, bayes_sum / count
    return {"loss": loss, "bayes_loss": bayes_loss, "gap": loss - bayes_loss, "n_tokens": int(count)}
