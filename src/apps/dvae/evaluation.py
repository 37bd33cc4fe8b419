"""Held-out reconstruction and codebook monitors, and grids printed side by side.

Every figure is a ratio of counts summed over all ranks (one collective), never a mean of per-rank ratios:

- `token_accuracy`: right tokens among the non-pad positions (cells, row ends, eos); `sample_accuracy`:
  grids whose every non-pad position is right (then the decoded grid is exact); both also per role,
  `input_*` and `output_*` (a pair's input and output grids);
- `codebook_usage`: distinct codes taken (argmax) anywhere on the evaluated grids / K;
  `codebook_perplexity`: exp of the entropy of the code frequencies over all latent positions;
- `pair_code_changes`: latent positions whose code differs between a pair's input and output, averaged
  over the pairs whose two grids fit;
- `mi`, `tc`, `dim_kl`, `kl_sampled` (losses.mws_terms, per evaluation batch) and `kl`, averaged over grids;
- `grids_per_s`: evaluated grids per second of evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ...nanollama.config import ConfigError
from ...nanollama.distributed import Cluster
from .data import INPUT, OUTPUT, GridSet, GridVocab, serialise
from .losses import kl_uniform, mws_terms, reconstruction_loss


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations (0: only at the end of training)
    batch_size: int = 32  # global grids per evaluation batch
    max_grids: int = 0  # evaluate the first pairs and grids up to this many grids (0: the whole split)
    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)

    def check(self) -> None:
        for key, low in (("period", 0), ("batch_size", 1), ("max_grids", 0)):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


COUNTS = ("loss_sum", "weight_sum", "n", "n_tokens", "right_tokens", "right_samples", "pairs", "pair_changes")
ROLE_COUNTS = ("n", "n_tokens", "right_tokens", "right_samples")
TERMS = ("kl", "mi", "tc", "dim_kl", "kl_sampled")


class Tally:
    """Counts of one evaluation on one rank; `reduce` sums them over the ranks, `metrics` divides once."""

    def __init__(self, n_codes: int):
        self.counts = dict.fromkeys(COUNTS, 0.0)
        self.roles = {role: dict.fromkeys(ROLE_COUNTS, 0.0) for role in (INPUT, OUTPUT)}
        self.terms = dict.fromkeys(TERMS, 0.0)  # sums of per-batch means x grids
        self.code_counts = np.zeros(n_codes)
        self.seconds = 0.0

    def add_batch(self, pred: Tensor, targets: Tensor, roles: Tensor, weight: Tensor, pad: int) -> None:
        """pred, targets (B, L); roles (B,); weight (B,) 1 for real rows, 0 for filler rows."""
        real = weight > 0
        pred, targets, roles = pred[real], targets[real], roles[real]
        counted = targets != pad
        right = (pred == targets) & counted
        tokens, rights = counted.sum(1), right.sum(1)
        exact = rights == tokens
        self.counts["n"] += len(targets)
        self.counts["n_tokens"] += float(tokens.sum())
        self.counts["right_tokens"] += float(rights.sum())
        self.counts["right_samples"] += float(exact.sum())
        for role, c in self.roles.items():
            mine = roles == role
            c["n"] += float(mine.sum())
            c["n_tokens"] += float(tokens[mine].sum())
            c["right_tokens"] += float(rights[mine].sum())
            c["right_samples"] += float(exact[mine].sum())

    def add_codes(self, codes: Tensor) -> None:
        self.code_counts += np.bincount(codes.flatten().cpu().numpy(), minlength=len(self.code_counts))

    def add_pairs(self, input_codes: Tensor, output_codes: Tensor) -> None:
        """Codes (P, N) of the pairs' inputs and outputs."""
        self.counts["pairs"] += len(input_codes)
        self.counts["pair_changes"] += float((input_codes != output_codes).sum())

    def reduce(self, cluster: Cluster) -> Tally:
        flat = [*self.counts.values(), *(v for c in self.roles.values() for v in c.values())]
        flat += [*self.terms.values(), *self.code_counts.tolist()]
        flat += [self.seconds]
        total = cluster.all_reduce(flat)
        out = Tally(len(self.code_counts))
        it = iter(total[:-1])
        for key in COUNTS:
            out.counts[key] = next(it)
        for c in out.roles.values():
            for key in ROLE_COUNTS:
                c[key] = next(it)
        for key in TERMS:
            out.terms[key] = next(it)
        out.code_counts = np.array(list(it))
        out.seconds = total[-1] / cluster.world_size  # the ranks evaluate side by side
        return out

    def metrics(self) -> dict[str, float]:
        c, K = self.counts, len(self.code_counts)
        ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
        freq = self.code_counts / max(self.code_counts.sum(), 1)
        entropy = -float((freq[freq > 0] * np.log(freq[freq > 0])).sum())
        out = {
            "loss": ratio(c["loss_sum"], c["weight_sum"]),
            "token_accuracy": ratio(c["right_tokens"], c["n_tokens"]),
            "sample_accuracy": ratio(c["right_samples"], c["n"]),
        }
        for role, name in ((INPUT, "input"), (OUTPUT, "output")):
            r = self.roles[role]
            out[f"{name}_token_accuracy"] = ratio(r["right_tokens"], r["n_tokens"])
            out[f"{name}_sample_accuracy"] = ratio(r["right_samples"], r["n"])
        out["codebook_usage"] = float((self.code_counts > 0).sum()) / K
        out["codebook_perplexity"] = math.exp(entropy)
        out["pair_code_changes"] = ratio(c["pair_changes"], c["pairs"])
        out.update({key: ratio(value, c["n"]) for key, value in self.terms.items()})
        out["grids_per_s"] = ratio(c["n"], self.seconds)
        out["n_grids"], out["n_pairs"] = int(c["n"]), int(c["pairs"])
        return out


def eval_units(grids: GridSet, max_grids: int) -> list[list[int]]:
    """The grids to evaluate, in units that stay on one rank: each pair whose two grids fit (input,
    output), then the grids left alone; cut at `max_grids` grids (0: all)."""
    paired = set(grids.pairs.flatten().tolist())
    units = [list(p) for p in grids.pairs.tolist()] + [[i] for i in range(len(grids)) if i not in paired]
    if max_grids:
        kept, n = [], 0
        for unit in units:
            if n + len(unit) > max_grids:
                break
            kept.append(unit)
            n += len(unit)
        units = kept
    return units


@torch.no_grad()
def evaluate(
    model: nn.Module,
    grids: GridSet,
    vocab: GridVocab,
    max_size: int,
    cfg: EvaluationConfig,
    pad_weight: float,
    dataset_size: int,
    cluster: Cluster,
) -> dict[str, float]:
    """Reconstruct with the argmax codes. Rank r takes units r, r + w, ...; every rank runs as many batches
    (filler rows of weight 0 where its share is short: sharded models gather weights in every forward)."""
    world, rank = cluster.world_size, cluster.rank
    units = eval_units(grids, cfg.max_grids)
    if not units:
        raise ConfigError("data.valid_share", "no held-out grid fits max_size: nothing to evaluate")
    shares = [[i for u in units[r::world] for i in u] for r in range(world)]
    mine, size = shares[rank], max(cfg.batch_size // world, 1)
    n_batches = max(math.ceil(len(s) / size) for s in shares)
    tally = Tally(model_codes(model))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    all_codes = []
    for b in range(n_batches):
        index = mine[b * size : (b + 1) * size]
        weight = torch.ones(len(index))
        if len(index) < size:  # filler rows, weight 0
            weight = torch.cat([weight, torch.zeros(size - len(index))])
            index = index + [0] * (size - len(index))
        tokens = torch.from_numpy(np.stack([serialise(grids.grid(i), vocab, max_size) for i in index]))
        tokens = tokens.to(cluster.device)
        with cluster.autocast():
            recon, logits, codes = model(tokens, kind="argmax")
        real = weight.bool()
        n_real = int(real.sum())
        if n_real == 0:
            continue
        real_dev = real.to(cluster.device)
        t, lg, cd = tokens[real_dev], logits[real_dev], codes[real_dev]
        rec = recon[real_dev]
        w = torch.where(t == vocab.pad, pad_weight, 1.0)
        tally.counts["loss_sum"] += float(reconstruction_loss(rec, t, vocab.pad, pad_weight) * w.sum())
        tally.counts["weight_sum"] += float(w.sum())
        roles = torch.from_numpy(grids.roles[index]).to(cluster.device)
        tally.add_batch(recon.argmax(-1), tokens, roles, weight.to(cluster.device), vocab.pad)
        tally.add_codes(cd)
        tally.terms["kl"] += float(kl_uniform(lg)) * n_real
        if n_real > 1:
            for key, value in mws_terms(lg, cd, dataset_size).items():
                tally.terms[key] += float(value) * n_real
        all_codes.append(cd.cpu())
    tally.seconds = time.perf_counter() - start
    if all_codes:
        codes = torch.cat(all_codes)
        position = {g: k for k, g in enumerate(mine)}
        pairs = [u for u in units[rank::world] if len(u) == 2]
        if pairs:
            inputs = codes[[position[p[0]] for p in pairs]]
            outputs = codes[[position[p[1]] for p in pairs]]
            tally.add_pairs(inputs, outputs)
    model.train(was_training)
    return tally.reduce(cluster).metrics()


def model_codes(model: nn.Module) -> int:
    inner = getattr(model, "module", model)
    return inner.cfg.n_codes


# ----------------------------------------------------------------------------- printing grids

# ANSI 256-colour backgrounds of the ARC palette (0 black, 1 blue, 2 red, 3 green, 4 yellow, 5 grey,
# 6 magenta, 7 orange, 8 light blue, 9 maroon)
PALETTE = (16, 27, 196, 40, 226, 246, 201, 208, 117, 88)


def render(rows: list[list[int]], colour: bool) -> list[str]:
    """Text lines of a grid: two-character coloured cells, or the digits; -1 (not a colour) is `?`."""
    lines = []
    for row in rows:
        cells = []
        for c in row:
            if c < 0 or c >= len(PALETTE):
                cells.append("??" if colour else "?")
            elif colour:
                cells.append(f"\x1b[48;5;{PALETTE[c]}m  \x1b[0m")
            else:
                cells.append(str(c))
        lines.append("".join(cells))
    return lines


def side_by_side(left: list[list[int]], right: list[list[int]], colour: bool, gap: int = 4) -> str:
    """Two grids next to each other (ragged rows are fine: a model's output need not be rectangular)."""
    a, b = render(left, colour), render(right, colour)
    width = max((len(r) for r in left), default=0) * (2 if colour else 1)
    lines = []
    for i in range(max(len(a), len(b))):
        cell = a[i] if i < len(a) else ""
        pad = width - (len(left[i]) * (2 if colour else 1) if i < len(left) else 0)
        lines.append(cell + " " * (pad + gap) + (b[i] if i < len(b) else ""))
    return "\n".join(lines)
