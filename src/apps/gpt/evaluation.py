"""Held-out loss, perplexity and bits per byte on the validation split, and sample generations.

Bits per byte divide the summed loss by the UTF-8 bytes of the decoded targets, so that runs with
different tokenizers compare: bpb = loss_nats * n_tokens / (ln 2 * n_bytes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...nanollama.config import ConfigError, check_range, section
from ...nanollama.data.packing import TextDataConfig, TextStream
from ...nanollama.data.text import Tokenizer
from ...nanollama.distributed import Cluster, unwrap
from ...nanollama.model.generate import generate


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    batches: int = 8  # validation batches per evaluation, the same ones every time
    batch_size: int = 16  # global rows per validation batch

    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError("period", f"must be >= 0, got {self.period}")
        for key in ("batches", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


@dataclass
class GenerationConfig:
    period: int = 0  # steps between sample generations written to the text log, and at the end (0: never)
    prompts: list[str] = field(default_factory=lambda: ["The "])
    max_new_tokens: int = 64
    temperature: float = 0.8

    def check(self) -> None:
        for key in ("period", "max_new_tokens", "temperature"):
            check_range(self, key, 0)

    def due(self, step: int, total_steps: int) -> bool:
        return self.period > 0 and (step % self.period == 0 or step == total_steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, tokenizer: Tokenizer, ev: EvaluationConfig, data: TextDataConfig, cluster: Cluster
) -> dict[str, float]:
    """Sums of losses, tokens and bytes over every rank's share of the first `ev.batches` validation
    batches of `data` (one small collective), divided once."""
    if ev.batch_size % cluster.world_size:
        raise ConfigError("evaluation.batch_size", f"does not divide by world size {cluster.world_size}")
    data = dataclasses.replace(data, batch_size=ev.batch_size // cluster.world_size, epochs=0)
    with section("data"):
        stream = TextStream(data, tokenizer, "valid", cluster.rank, cluster.world_size)
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, n_bytes = 0.0, 0, 0
    for _ in range(ev.batches):
        tokens, doc_ids = (t.to(cluster.device) for t in next(stream))
        with cluster.autocast():
            logits = model(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
        targets = tokens[:, 1:]
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        n_tokens += targets.numel()
        n_bytes += sum(len(tokenizer.decode(row).encode("utf-8")) for row in targets.tolist())
    loss_sum, n_tokens, n_bytes = cluster.all_reduce([loss_sum, float(n_tokens), float(n_bytes)])
    model.train(was_training)
    loss = loss_sum / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": loss_sum / (math.log(2) * n_bytes),
        "n_tokens": int(n_tokens),
        "n_bytes": int(n_bytes),
    }


@torch.no_grad()
def complete(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[str]:
    """Completions of `prompts` (each after bos, stopping at eos); a fixed seed leaves the global RNG
    untouched, so sampling in the loop does not change training."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    ids = [[tokenizer.bos, *tokenizer.encode(p)] for p in prompts]
    out = generate(inner, ids, max_new_tokens, temperature, stop_tokens=[tokenizer.eos], seed=seed)
    inner.train(was_training)
    return [tokenizer.decode(row) for row in out]
