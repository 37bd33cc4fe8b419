"""Exact-match accuracy of greedily generated answers, per-digit accuracy, and the answer loss.

Each rank evaluates every world_size-th problem of the split's fixed set; counts (problems, exact answers,
right digits per position, loss sums, tokens) are summed across ranks with one collective and divided
once, so the figures do not depend on the number of ranks. The model generates what follows the
question (and its latent positions): its own chain in `cot` and `internalize`, then `####` and the
answer, which is read after the last `####`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError, check_range
from ...nanollama.distributed import Cluster, unwrap
from ...nanollama.model.generate import generate
from .data import ANSWER, CHAIN, SEP, DataConfig, MultiplicationTokenizer, Problem, collate, load_split
from .model import MultiplicationModel
from .modes import Schedule, TrainingConfig, latent_span


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    n_problems: int = 512  # problems of the split evaluated, the same ones every time
    batch_size: int = 256  # problems generated at once per rank

    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)

    def check(self) -> None:
        if self.period < 0:
            raise ConfigError("period", f"must be >= 0, got {self.period}")
        check_range(self, "n_problems", 1)
        check_range(self, "batch_size", 1)

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


def read_answer(generated: list[int], tok: MultiplicationTokenizer) -> list[int]:
    """The digits after the last `####`, up to eos (or the end)."""
    if tok.eos in generated:
        generated = generated[: generated.index(tok.eos)]
    if tok.answer in generated:
        generated = generated[len(generated) - generated[::-1].index(tok.answer) :]
    return generated


@torch.no_grad()
def generate_continuous(
    model: MultiplicationModel, prompts: Tensor, n: int, max_new_tokens: int, eos: int
) -> list[list[int]]:
    """Greedy generation after prompts (B, P) and n continuous thoughts, all through one KV cache."""
    tr = model.transformer
    cache = tr.new_cache(prompts.shape[0], prompts.shape[1] + n + max_new_tokens)
    h = tr.trunk(tr.tok_embeddings(prompts), cache=cache)
    for _ in range(n):
        h = tr.trunk(h[:, -1:], cache=cache)
    logits = tr.output(h[:, -1]).float()
    out, done = [], torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        tokens = logits.argmax(-1)
        out.append(tokens)
        done |= tokens == eos
        if bool(done.all()):
            break
        logits = tr(tokens[:, None], cache=cache)[:, -1]
    return torch.stack(out, 1).tolist()


@torch.no_grad()
def answer_batch(
    model: MultiplicationModel, tokens: Tensor, roles: Tensor, tok: MultiplicationTokenizer
) -> list[list[int]]:
    """The answers the model generates for a batch laid out as in training (prompt: up to the first
    chain, separator or answer token)."""
    generated_roles = (roles == CHAIN) | (roles == SEP) | (roles == ANSWER)
    prompt_len = int(generated_roles.float().argmax(1).min())
    max_new = tokens.shape[1] - prompt_len + 4
    start, n = latent_span(roles)
    if model.continuous and n:
        rows = generate_continuous(model, tokens[:, :start], n, max_new, tok.eos)
    else:
        prompts = tokens[:, :prompt_len].tolist()
        rows = generate(model.transformer, prompts, max_new, stop_tokens=[tok.eos])
    return [read_answer(r, tok) for r in rows]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tok: MultiplicationTokenizer,
    ev: EvaluationConfig,
    data: DataConfig,
    train: TrainingConfig,
    seed: int,
    cluster: Cluster,
    stage: int,
    split: str = "valid",
    problems: list[Problem] | None = None,
) -> dict[str, float]:
    """Metrics of the split's first `ev.n_problems` problems (drawn with `seed`, orchestration.seed),
    laid out as at `stage` of the `train` schedule."""
    inner = unwrap(model)
    schedule = Schedule(train, data)
    if problems is None:
        problems = load_split(data, split, ev.n_problems, seed)
    mine = problems[cluster.rank :: cluster.world_size]
    width = len(problems[0].answer)
    was_training = inner.training
    inner.eval()
    loss_sum, loss_tokens, exact, answer_tokens, gen_time = 0.0, 0, 0, 0, 0.0
    right = [0] * width
    for i in range(0, len(mine), ev.batch_size):
        chunk = mine[i : i + ev.batch_size]
        tokens, roles, _ = collate(chunk, tok, [schedule.layout(stage)] * len(chunk))
        tokens, roles = tokens.to(cluster.device), roles.to(cluster.device)
        with cluster.autocast():
            logits, _ = inner(tokens, *latent_span(roles))
        answer = roles[:, 1:] == ANSWER
        ce = F.cross_entropy(logits[:, :-1][answer].float(), tokens[:, 1:][answer], reduction="sum")
        loss_sum, loss_tokens = loss_sum + float(ce), loss_tokens + int(answer.sum())
        begin = time.perf_counter()
        with cluster.autocast():
            answers = answer_batch(inner, tokens, roles, tok)
        gen_time += time.perf_counter() - begin
        for p, got in zip(chunk, answers):
            exact += got == p.answer
            answer_tokens += len(got) + 1
            for d in range(width):
                right[d] += d < len(got) and got[d] == p.answer[d]
    inner.train(was_training)
    sums = cluster.all_reduce([loss_sum, loss_tokens, len(mine), exact, answer_tokens, *right])
    (slowest,) = cluster.all_reduce([gen_time], op="max")
    loss_sum, loss_tokens, n, exact, answer_tokens, *right = sums
    result = {
        "loss": loss_sum / max(loss_tokens, 1),
        "accuracy": exact / n,
        "digit_accuracy": sum(right) / (n * width),
        **{f"digit_accuracy_{d}": r / n for d, r in enumerate(right)},
        "answers_per_s": n / max(slowest, 1e-9),
        "answer_tokens_per_s": answer_tokens / max(slowest, 1e-9),
        "n": int(n),
        "stage": stage,
    }
    return result
