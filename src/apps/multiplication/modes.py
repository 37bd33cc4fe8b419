"""The training modes, their schedules and the loss.

| mode          | row after the question `a * b ||`                 | stage k of the curriculum            |
| ------------- | ------------------------------------------------- | ------------------------------------ |
| `plain`       | `#### answer`                                     | -                                    |
| `cot`         | `chain #### answer`                               | -                                    |
| `latent`      | `latents [rest of the chain] #### answer`         | first k chain steps -> k*c latents   |
| `internalize` | `chain minus its first removed tokens #### answer`| k*delta tokens removed (+ offset o)  |

A stage lasts `curriculum.stage_steps` optimizer steps (an "epoch" of the on-the-fly stream), so the
stage is a function of the step: a resumed run lays its rows out exactly as an uninterrupted one. The
optimizer is reset (moments and Adam's step count; the LR schedule goes on) when the stage changes,
once: the loader's state records the stage it last served with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError, check_range
from .data import ANSWER, CHAIN, LATENT, SEP, DataConfig, RowLayout, make_problem

MODES = ("plain", "cot", "latent", "internalize")


@dataclass
class LatentConfig:
    kind: str = "learned"  # learned (pause-token embeddings) | continuous (Coconut: hidden state fed back)
    num_latent: int = 4  # latent positions, without a curriculum
    per_step: int = 1  # c: latent positions per chain step replaced (curriculum)

    def check(self) -> None:
        if self.kind not in ("learned", "continuous"):
            raise ConfigError("kind", f"must be learned or continuous, got {self.kind!r}")
        check_range(self, "num_latent", 0)
        check_range(self, "per_step", 1)


@dataclass
class CurriculumConfig:
    stage_steps: int = 0  # optimizer steps per stage (latent) or removal epoch (internalize); 0: none
    max_stage: int = 0  # last stage; 0: every chain step replaced / every chain token removed
    reset_optimizer: bool = True  # reset the optimizer's state when the stage changes

    def check(self) -> None:
        check_range(self, "stage_steps", 0)
        check_range(self, "max_stage", 0)


@dataclass
class InternalizeConfig:
    delta: int = 8  # chain tokens removed from the left per stage
    smoothing: float = 4.0  # lambda: extra removal offset o ~ exp(-lambda o); 0: no offset

    def check(self) -> None:
        check_range(self, "delta", 1)
        check_range(self, "smoothing", 0)


@dataclass
class TeacherForcingConfig:
    schedule: str = "none"  # none | linear | cosine | step
    start_step: int = 0  # the share of self-fed positions grows from here
    ramp_steps: int = 1000  # linear, cosine: steps to reach max_share
    max_share: float = 0.25  # share of chain/answer inputs replaced by the model's own prediction

    def check(self) -> None:
        if self.schedule not in ("none", "linear", "cosine", "step"):
            raise ConfigError("schedule", f"must be none, linear, cosine or step, got {self.schedule!r}")
        check_range(self, "max_share", 0, 1)
        check_range(self, "ramp_steps", 1)
        check_range(self, "start_step", 0)

    def share(self, step: int) -> float:
        """Share of inputs fed the model's own previous prediction at `step`."""
        if self.schedule == "none" or step < self.start_step:
            return 0.0
        x = min(1.0, (step - self.start_step) / self.ramp_steps)
        ramp = {"linear": x, "cosine": (1 - math.cos(math.pi * x)) / 2, "step": 1.0}[self.schedule]
        return self.max_share * ramp


@dataclass
class AuxConfig:
    weight: float = 0.0  # > 0: regress the running sum at each answer digit from block `layer`
    layer: int = -1  # block index (negative: from the end)

    def check(self) -> None:
        if self.weight < 0:
            raise ConfigError("weight", f"must be >= 0, got {self.weight}")


@dataclass
class TrainingConfig:
    mode: str = "plain"  # plain | cot | latent | internalize
    answer_weight: float = 1.0  # loss weight of answer tokens; chain and separator tokens weigh 1
    latent: LatentConfig = field(default_factory=LatentConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    internalize: InternalizeConfig = field(default_factory=InternalizeConfig)
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.answer_weight < 0:
            raise ConfigError("answer_weight", f"must be >= 0, got {self.answer_weight}")
        if self.mode == "internalize" and not self.curriculum.stage_steps:
            raise ConfigError("curriculum.stage_steps", "internalize removes tokens per stage: must be > 0")


class Schedule:
    """Stage of each step, and the row layout (plus removal offsets) it gives, for one K x M task."""

    def __init__(self, cfg: TrainingConfig, data: DataConfig):
        self.cfg = cfg
        probe = make_problem(10 ** (data.k - 1), 10 ** (data.m - 1), data.k, data.m)
        self.chain_steps, self.chain_len = len(probe.steps), len(probe.chain)
        c = cfg.curriculum
        if cfg.mode == "latent":
            self.last_stage = c.max_stage or self.chain_steps
        elif cfg.mode == "internalize":
            self.last_stage = c.max_stage or math.ceil(self.chain_len / cfg.internalize.delta)
        else:
            self.last_stage = 0

    @property
    def staged(self) -> bool:
        return self.cfg.curriculum.stage_steps > 0 and self.cfg.mode in ("latent", "internalize")

    def stage(self, step: int) -> int:
        """The stage of the step after `step` optimizer steps (0-based)."""
        if not self.staged:
            return self.last_stage
        return min(step // self.cfg.curriculum.stage_steps, self.last_stage)

    @property
    def max_latents(self) -> int:
        lat = self.cfg.latent
        return max(lat.num_latent, lat.per_step * self.last_stage) if self.cfg.mode == "latent" else 0

    def layout(self, stage: int, rng: np.random.Generator | None = None) -> RowLayout:
        """The layout at `stage`; with `rng` (training), internalize adds its smoothing offset."""
        cfg = self.cfg
        if cfg.mode == "latent":
            if not self.staged:
                return RowLayout("latent", latents=cfg.latent.num_latent, skip_steps=self.chain_steps)
            return RowLayout("latent", latents=stage * cfg.latent.per_step, skip_steps=stage)
        if cfg.mode == "internalize":
            removed = stage * cfg.internalize.delta
            lam = cfg.internalize.smoothing
            if rng is not None and lam > 0 and removed > 0:
                o = np.arange(self.chain_len + 1)
                p = np.exp(-lam * o)
                removed += int(rng.choice(o, p=p / p.sum()))
            return RowLayout("internalize", removed=min(removed, self.chain_len))
        return RowLayout(cfg.mode)


def latent_span(roles: Tensor) -> tuple[int, int]:
    """(first column, count) of the latent positions, the same in every row (the rows' layout)."""
    cols = (roles == LATENT).any(0).nonzero().flatten()
    if not len(cols):
        return 0, 0
    return int(cols[0]), len(cols)


def feed_own_predictions(model: nn.Module, tokens: Tensor, roles: Tensor, share: float) -> Tensor:
    """Scheduled sampling: each chain/answer input (a predicted token) is replaced, with probability
    `share`, by the model's greedy prediction of it from a teacher-forced pass (global RNG: checkpointed)."""
    if share <= 0:
        return tokens
    with torch.no_grad():
        logits, _ = model(tokens, *latent_span(roles))
    predicted = torch.cat([tokens[:, :1], logits[:, :-1].argmax(-1)], 1)
    fed = torch.isin(roles, torch.tensor([CHAIN, SEP, ANSWER], device=roles.device))
    fed &= torch.rand(tokens.shape, device=tokens.device) < share
    fed[:, -1] = False
    return torch.where(fed, predicted, tokens)


def role_weights(roles: Tensor, answer_weight: float) -> Tensor:
    """Weight of predicting each token: chain and separator 1, answer `answer_weight`, others 0."""
    w = ((roles == CHAIN) | (roles == SEP)).float()
    return w + answer_weight * (roles == ANSWER).float()


def multiplication_loss(
    model: nn.Module,
    batch: list[Tensor],
    cfg: TrainingConfig,
    share: float = 0.0,
    metrics: dict | None = None,
) -> Tensor:
    """Weighted next-token loss (+ aux.weight * the running-sum regression loss)."""
    tokens, roles, sums = batch
    inputs = feed_own_predictions(model, tokens, roles, share)
    logits, aux = model(inputs, *latent_span(roles))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    w = role_weights(roles[:, 1:], cfg.answer_weight).flatten()
    loss = (ce * w).sum() / w.sum().clamp_min(1e-9)
    if aux is not None and cfg.aux.weight > 0:
        digit = (roles[:, 1:] == ANSWER) & (tokens[:, 1:] < 10)
        aux_loss = F.mse_loss(aux[:, :-1][digit], sums[:, 1:][digit] / 100)
        if metrics is not None:
            metrics["aux_loss"] = float(aux_loss.detach())
        loss = loss + cfg.aux.weight * aux_loss
    return loss
