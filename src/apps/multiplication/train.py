"""Train a transformer on K x M multiplication: plain, with a chain of thought, latent positions, or
stepwise internalisation of the chain (see modes.py for the table of modes).

    python -m src.apps.multiplication.train config=src/apps/multiplication/configs/debug.yaml [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.multiplication.train config=...

Problems are generated on the fly (or read from Internalize-CoT files, `data.train_file`). Evaluation
lines report the exact-match `accuracy` of greedily generated answers, `digit_accuracy` and its value per
answer digit, the answer loss and the generation speed. A change of curriculum stage resets the optimizer
(`train.curriculum.reset_optimizer`), logged as an event; the stage lives in the checkpoint.
`build_training` is the app's hook for the core's tools (the LR finder, at step 0's stage and schedule).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ...nanollama.app import RunConfig, Training, check_use_ema, set_vocab_size, train_entrypoint
from ...nanollama.config import ConfigError, section
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import load_init
from ...nanollama.model.transformer import TransformerConfig
from ...nanollama.trainer import build_transformer, eval_weights, start_run
from .data import DataConfig, MultiplicationTokenizer, ProblemStream, check_eval_size, check_files, load_split
from .evaluation import EvaluationConfig, evaluate
from .model import MultiplicationModel
from .modes import Schedule, TrainingConfig, multiplication_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)
        if not self.model.causal:
            raise ConfigError("model.causal", "the answer is generated: must be true")
        if not self.data.file("valid"):
            check_eval_size(self.data, self.evaluation.n_problems)
        n = self.model.n_layers
        if self.train.aux.weight > 0 and not -n <= self.train.aux.layer < n:
            raise ConfigError("train.aux.layer", f"no block {self.train.aux.layer} in {n} layers")

    def check_inputs(self) -> None:
        """The data files (every line, before the log dir exists), and batches that divide across ranks."""
        world = detect_environment().world_size
        with section("data"):
            check_files(self.data)
        micro_batch_size(self.data.batch_size, world, self.optim.accumulation_steps)
        if self.data.train_file and len(load_split(self.data, "train", 10**9, 0)) < self.data.batch_size:
            raise ConfigError("data.train_file", f"fewer problems than one batch of {self.data.batch_size}")
        load_tokenizer(self)


def load_tokenizer(cfg: TrainConfig) -> MultiplicationTokenizer:
    """The app's tokenizer, and the vocabulary size it fixes (0 in `model`: take the tokenizer's)."""
    tok = MultiplicationTokenizer(Schedule(cfg.train, cfg.data).max_latents)
    set_vocab_size(cfg.model, tok.vocab_size, "tokenizer")
    return tok


def build_model(cfg: TrainConfig, training: bool, device: torch.device) -> MultiplicationModel:
    transformer = build_transformer(cfg.model, cfg.orchestration.seed, training, device)
    t = cfg.train
    continuous = t.mode == "latent" and t.latent.kind == "continuous"
    aux_layer = t.aux.layer if t.aux.weight > 0 else None
    return MultiplicationModel(transformer, continuous, aux_layer).to(device)


def reset_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments and step counts (Adam starts afresh); the LR schedule is not touched."""
    optimizer.state.clear()


@dataclass
class StepState:
    """What the training step reads and writes at the current step: the loop sets the teacher-forcing
    `share` (and the stream's stage and layout) before each step; `extra` (the loss's own metrics) and
    `tokens` (counted by next_batch) are read after it."""

    share: float
    extra: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


def build_training(
    cfg: TrainConfig, cluster: Cluster, stream: ProblemStream | None = None, init: bool = True
) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`); its `state` (a
    StepState) holds step 0's stage and share until the loop sets them."""
    schedule = Schedule(cfg.train, cfg.data)
    if stream is None:
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        seed, rank = cfg.orchestration.seed, cluster.rank
        stream = ProblemStream(cfg.data, load_tokenizer(cfg), micro, seed, rank, cluster.world_size)
        stream.state.stage = schedule.stage(0)
        stream.layout = lambda rng: schedule.layout(stream.state.stage, rng)
    model = build_model(cfg, training=True, device=cluster.device)
    if init:
        load_init(model, cfg.init)
    state = StepState(cfg.train.teacher_forcing.share(0))

    def next_batch() -> list[torch.Tensor]:
        batch = next(stream)
        state.tokens += batch[0].numel() * cluster.world_size
        return [t.to(cluster.device, non_blocking=True) for t in batch]

    def loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return multiplication_loss(model, batch, cfg.train, state.share, state.extra)

    return Training(model, stream, next_batch, loss, state)


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        tok = load_tokenizer(cfg)
        schedule = Schedule(cfg.train, cfg.data)
        stream = ProblemStream(cfg.data, tok, micro, cfg.orchestration.seed, cluster.rank, cluster.world_size)
        check_model = lambda: build_model(cfg, training=False, device=torch.device("meta"))  # noqa: E731
        run = stack.enter_context(start_run(cfg, cluster, stream, build_training, check_model))
        step, monitor, state = run.step, run.monitor, run.training.state
        if step == 0:
            stream.state.stage = schedule.stage(0)
        logger.info(
            f"{cfg.train.mode} on {cfg.data.k}x{cfg.data.m}: training from step {step} to {cfg.optim.steps}, "
            f"{micro} rows/rank/micro-step, stage {stream.state.stage} of {schedule.last_stage}"
        )

        while step < cfg.optim.steps and not monitor.stop:
            stage = schedule.stage(step)
            if stage != stream.state.stage:  # once: the stage served last is in the loader's state
                stream.state.stage = stage
                event = {"step": step, "event": "stage", "stage": stage}
                if cfg.train.curriculum.reset_optimizer:
                    reset_optimizer(run.optimizer)
                    stream.state.resets += 1
                    event["event"] = "stage_optimizer_reset"
                monitor.events.write(event)
                logger.info(
                    f"step {step}: stage {stage}" + (", optimizer reset" if "reset" in event["event"] else "")
                )
            stream.layout = lambda rng, stage=stage: schedule.layout(stage, rng)
            state.share = share = cfg.train.teacher_forcing.share(step)
            loss, metrics = run.train_step(step)
            step += 1
            with monitor.phase("eval"):
                if cfg.evaluation.due(step, cfg.optim.steps):
                    with eval_weights(monitor, cfg.evaluation.use_ema):
                        metrics_eval = evaluate(
                            run.model,
                            tok,
                            cfg.evaluation,
                            cfg.data,
                            cfg.train,
                            cfg.orchestration.seed,
                            cluster,
                            schedule.stage(step - 1),
                        )
                        monitor.log_eval(step, metrics_eval)
            step = monitor.end_step(
                step, loss, state.tokens, **metrics, **state.extra, stage=stage, tf_share=share
            )
            state.tokens = 0


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
