"""Held-out answer accuracy per task template, answer (caption) loss, and text-only loss.

Each image dataset's valid split gives its first `evaluation.samples` samples (the same every time), rank
r taking every world_size-th. Answers are generated greedily with the KV cache after the image and the
prompt, and must equal the reference exactly. Counts and summed losses are all-reduced in one collective
and divided once, so the figures do not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...nanollama.config import ConfigError
from ...nanollama.distributed import Cluster, unwrap
from .data import TASKS, RowBuilder, VLMDataConfig, build_dataset


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    samples: int = 200  # held-out samples per dataset, the same ones every time
    batch_size: int = 64  # samples per forward / generation batch on a rank
    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError("period", f"must be >= 0, got {self.period}")
        for key in ("samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


def eval_datasets(data: VLMDataConfig) -> list[tuple[str, Any]]:
    """(kind, valid split) of every configured dataset."""
    return [(d.kind, build_dataset(d, data, "valid")) for d in data.datasets]


def _sums(model: nn.Module, rows: RowBuilder, samples: list, cluster: Cluster, answer_tokens: int) -> dict:
    """Summed target losses and, for image samples, exact answers, per task, over `samples`."""
    batch = rows(samples).to(cluster.device)
    with cluster.autocast():
        logits = model(batch)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch.tokens[:, 1:].flatten(), reduction="none")
    mask = batch.loss_mask.flatten().float()
    per_row = (losses * mask).view(len(samples), -1).sum(1).tolist()
    targets = batch.loss_mask.sum(1).tolist()
    out: dict[str, float] = {}
    correct = [False] * len(samples)
    if samples[0].image is not None:
        inner = unwrap(model)
        tok = rows.tokenizer
        prompts = [rows.prompt_ids(s.prompt) for s in samples]
        with cluster.gathered(model):
            answers = inner.answer(batch.images, prompts, answer_tokens, tok.eos)
        correct = [tok.decode(a).strip() == s.answer for a, s in zip(answers, samples)]
    for s, loss, n, ok in zip(samples, per_row, targets, correct):
        for key, value in ((f"loss_sum_{s.task}", loss), (f"targets_{s.task}", n), (f"n_{s.task}", 1.0)):
            out[key] = out.get(key, 0.0) + value
        out[f"correct_{s.task}"] = out.get(f"correct_{s.task}", 0.0) + float(ok)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, rows: RowBuilder, ev: EvaluationConfig, data: VLMDataConfig, cluster: Cluster
) -> dict[str, float]:
    """`loss` (answer tokens of image samples), `accuracy` and `accuracy_{task}`, `text_loss` when a
    text-only dataset is mixed in, and the sample counts, over the valid split of every dataset of `data`."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    datasets = eval_datasets(data)
    answer_tokens = rows.max_answer_tokens([ds for _, ds in datasets])
    for _, ds in datasets:
        mine = list(range(cluster.rank, min(ev.samples, len(ds)), cluster.world_size))
        for start in range(0, len(mine), ev.batch_size):
            part = [ds[i] for i in mine[start : start + ev.batch_size]]
            for key, value in _sums(model, rows, part, cluster, answer_tokens).items():
                sums[key] = sums.get(key, 0.0) + value
    tasks = list(dict.fromkeys(t for kind, _ in datasets for t in TASKS[kind]))
    keys = [f"{stat}_{t}" for t in tasks for stat in ("loss_sum", "targets", "n", "correct")]
    total = dict(zip(keys, cluster.all_reduce([sums.get(k, 0.0) for k in keys])))
    model.train(was_training)
    image_tasks = [t for t in tasks if t != "text"]
    result: dict[str, float] = {}
    if image_tasks:
        loss_sum = sum(total[f"loss_sum_{t}"] for t in image_tasks)
        n_targets = sum(total[f"targets_{t}"] for t in image_tasks)
        n = sum(total[f"n_{t}"] for t in image_tasks)
        result["loss"] = loss_sum / max(n_targets, 1.0)
        result["accuracy"] = sum(total[f"correct_{t}"] for t in image_tasks) / max(n, 1.0)
        for t in image_tasks:
            result[f"accuracy_{t}"] = total[f"correct_{t}"] / max(total[f"n_{t}"], 1.0)
        result["n_samples"] = int(n)
    if "text" in tasks:
        result["text_loss"] = total["loss_sum_text"] / max(total["targets_text"], 1.0)
        result.setdefault("loss", result["text_loss"])
    return result
