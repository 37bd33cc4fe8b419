"""Held-out evaluation: the model's loss beside the Bayes-optimal loss on the same sequences.

`evaluation.seq_len` evaluates on sequences longer (or shorter) than training, and
`evaluation.position_buckets` splits every figure by position, e.g. to see where a model trained at
length L breaks down at 4L, beside the Bayes loss of the same positions (which is not flat: early
positions have less context).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError
from ...nanollama.distributed import Cluster
from .data import DataConfig, check_dataset, eval_batches, eval_seq_len, eval_sequences
from .generator import GSSM


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    n_sequences: int = 256  # held-out sequences (global; on-disk data: 0 means the whole test split)
    batch_size: int = 64  # global sequences per evaluation batch
    asynchronous: bool = (
        False  # save an eval-flagged checkpoint for `eval.py` instead of evaluating in the loop
    )
    seq_len: int = 0  # positions per held-out sequence (0: data.seq_len); longer: length extrapolation
    position_buckets: int = 0  # k > 0: also loss, bayes_loss and gap over k equal buckets of positions
    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)
    early_stop_patience: int = 0  # stop after this many evaluations without a lower loss (0: never)

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError("period", f"must be >= 0, got {self.period}")
        if self.batch_size < 1 or self.n_sequences < 0:
            raise ConfigError("batch_size", "batch_size must be >= 1 and n_sequences >= 0")
        if self.early_stop_patience < 0:
            raise ConfigError("early_stop_patience", f"must be >= 0, got {self.early_stop_patience}")
        if self.early_stop_patience and (self.period < 1 or self.asynchronous):
            raise ConfigError("early_stop_patience", "needs in-loop evaluations (period > 0, synchronous)")
        for key in ("seq_len", "position_buckets"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0 (0: default), got {getattr(self, key)}")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


def check_evaluation(ev: EvaluationConfig, data: DataConfig, world_size: int = 1) -> int:
    """Checks across the two sections, so that a script refuses bad input at start-up (`check_inputs`)
    rather than at its first evaluation: lengths and sizes, then the dataset on disk; returns the
    evaluation length."""
    seq_len = eval_seq_len(data, ev.seq_len)
    if ev.position_buckets > seq_len:
        raise ConfigError("evaluation.position_buckets", f"{ev.position_buckets} > {seq_len} positions")
    if ev.batch_size < world_size:
        raise ConfigError("evaluation.batch_size", f"{ev.batch_size} is below the world size {world_size}")
    if data.path:
        check_dataset(data)  # complete and of the training length, before its test split is read
    n_sequences = eval_sequences(data, ev.n_sequences)
    if n_sequences < world_size:  # each rank evaluates its share of every batch: at least one sequence
        raise ConfigError("evaluation.n_sequences", f"{n_sequences} sequences for {world_size} ranks")
    return seq_len


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    """Bucket i holds the predictions at positions edges[i] <= t < edges[i + 1] (t = 0 predicts the
    second token); sizes differ by at most one when `buckets` does not divide seq_len."""
    return [i * seq_len // buckets for i in range(buckets + 1)]


def summarize(loss_sums: Tensor, bayes_sums: Tensor, n_sequences: int, buckets: int) -> dict[str, float]:
    """Per-position sums (over every rank's sequences) -> the eval line: overall, then per bucket."""
    seq_len = loss_sums.numel()
    result = _losses(float(loss_sums.sum()), float(bayes_sums.sum()), n_sequences * seq_len, "")
    result["seq_len"] = seq_len
    edges = bucket_edges(seq_len, buckets) if buckets else []
    for i, (lo, hi) in enumerate(pairwise(edges)):
        loss, bayes = float(loss_sums[lo:hi].sum()), float(bayes_sums[lo:hi].sum())
        result |= _losses(loss, bayes, n_sequences * (hi - lo), f"_pos_{i}")
    return result


def _losses(loss_sum: float, bayes_sum: float, count: int, suffix: str) -> dict[str, float]:
    loss, bayes_loss = loss_sum / count, bayes_sum / count
    values = {"loss": loss, "bayes_loss": bayes_loss, "gap": loss - bayes_loss, "n_tokens": int(count)}
    return {key + suffix: value for key, value in values.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, gssm: GSSM, ev: EvaluationConfig, data: DataConfig, seed: int, cluster: Cluster
) -> dict[str, float]:
    """Per-position sums of losses and the number of sequences are reduced across ranks (one small
    collective), then divided once, overall and per position bucket; `seed` (orchestration.seed) draws
    the held-out sequences."""
    seq_len = check_evaluation(ev, data, cluster.world_size)
    was_training = model.training
    model.eval()
    loss_sums = torch.zeros(seq_len, dtype=torch.float64)
    bayes_sums = torch.zeros(seq_len, dtype=torch.float64)
    n_sequences = 0
    batches = eval_batches(
        data,
        gssm,
        ev.n_sequences,
        ev.batch_size,
        seed,
        cluster.rank,
        cluster.world_size,
        seq_len,
    )
    for tokens, bayes_logprobs in batches:
        tokens = tokens.to(cluster.device)
        with cluster.autocast():
            logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        loss_sums += losses.view(targets.shape).sum(0).double().cpu()
        bayes_sums -= torch.from_numpy(np.asarray(bayes_logprobs[:, 1:], dtype=np.float64)).sum(0)
        n_sequences += targets.shape[0]
    local = [*loss_sums.tolist(), *bayes_sums.tolist(), float(n_sequences)]
    sums = torch.tensor(cluster.all_reduce(local), dtype=torch.float64)
    model.train(was_training)
    return summarize(sums[:seq_len], sums[seq_len:-1], int(sums[-1]), ev.position_buckets)
