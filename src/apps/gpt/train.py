"""Train a causal language model on packed text.

    python -m src.apps.gpt.train config=src/apps/gpt/configs/debug.yaml [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.gpt.train config=...

Rows pack several documents; attention is masked at document boundaries. Evaluation lines report the
validation loss, perplexity and bits per byte; every `generation.period` steps sample completions of
`generation.prompts` go to the text log. The run is `optim.steps` long, or with `data.epochs` > 0 exactly
as long as those epochs of the data (`optim.steps` is then set from the stream). Every checkpoint logs
and records (`data_{rank}.json`) how much of each source it has consumed. `init.checkpoint` starts from
another run's weights; `build_training` is the app's hook for the core's tools (the LR finder).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from ...nanollama.app import RunConfig, Training, check_use_ema, train_entrypoint
from ...nanollama.config import ConfigError, section
from ...nanollama.data.packing import TextDataConfig, TextStream
from ...nanollama.data.text import Tokenizer, TokenizerConfig
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import load_init
from ...nanollama.model.transformer import Transformer, TransformerConfig
from ...nanollama.trainer import (
    build_text_tokenizer,
    build_transformer,
    causal_lm_loss,
    check_text_masks,
    eval_weights,
    start_run,
    steps_in_epochs,
)
from .evaluation import EvaluationConfig, GenerationConfig, complete, evaluate

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)

    def check_inputs(self) -> None:
        """What the run will read, before the log dir exists: the tokenizer's files (a sentencepiece
        model is trained here, once; later calls load it from its cache), the validation split, and
        batches that divide across ranks and whose attention masks can be built."""
        world = detect_environment().world_size
        tokenizer = load_tokenizer(self)
        ev = self.evaluation
        if ev.batch_size % world:
            raise ConfigError(
                "evaluation.batch_size", f"{ev.batch_size} does not divide by world size {world}"
            )
        with section("data"):
            TextStream(self.data, tokenizer, "valid", 0, world)
        check_text_masks(self, self.model, self.data, ev.batch_size, world)


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    return build_text_tokenizer(cfg.tokenizer, cfg.data, cfg.model)


def build_model(cfg: TrainConfig, training: bool, device: torch.device) -> Transformer:
    return build_transformer(cfg.model, cfg.orchestration.seed, training, device)


def gpt_loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Next-token loss of packed rows; the document mask keeps attention inside each document."""
    tokens, doc_ids = batch
    return causal_lm_loss(model(tokens[:, :-1], doc_ids=doc_ids[:, :-1]), tokens)


def log_samples(model: torch.nn.Module, tokenizer: Tokenizer, cfg: TrainConfig, step: int) -> None:
    gen = cfg.generation
    seed = cfg.orchestration.seed
    texts = complete(model, tokenizer, gen.prompts, gen.max_new_tokens, gen.temperature, seed)
    for prompt, text in zip(gen.prompts, texts):
        logger.info(f"sample at step {step}: {prompt!r} -> {text!r}")


def train_stream(cfg: TrainConfig, tokenizer: Tokenizer, cluster: Cluster) -> TextStream:
    micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
    data = dataclasses.replace(cfg.data, batch_size=micro)
    with section("data"):
        return TextStream(data, tokenizer, "train", cluster.rank, cluster.world_size)


def build_training(cfg: TrainConfig, cluster: Cluster, loader: Any = None, init: bool = True) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`)."""
    loader = loader if loader is not None else train_stream(cfg, load_tokenizer(cfg), cluster)
    model = build_model(cfg, training=True, device=cluster.device)
    if init:
        load_init(model, cfg.init)

    def next_batch() -> list[torch.Tensor]:
        return [t.to(cluster.device, non_blocking=True) for t in next(loader)]

    return Training(model, loader, next_batch, gpt_loss)


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        acc = cfg.optim.accumulation_steps
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, acc)
        tokenizer = load_tokenizer(cfg)
        stream = train_stream(cfg, tokenizer, cluster)
        if cfg.data.epochs:  # the run is as long as the data
            cfg.optim.steps = steps_in_epochs(stream.count_batches(), cluster, acc, str(cfg.data.epochs))
        check_model = lambda: build_model(cfg, training=False, device=torch.device("meta"))  # noqa: E731
        run = stack.enter_context(
            start_run(
                cfg,
                cluster,
                stream,
                build_training,
                check_model,
                cfg.data.seq_len,
                vocabulary=tokenizer.identity,
            )
        )
        step, monitor = run.step, run.monitor
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        length = f" ({cfg.data.epochs} epochs of the data)" if cfg.data.epochs else ""
        logger.info(f"training from step {step} to {cfg.optim.steps}{length}, {micro} rows/rank/micro-step")

        while step < cfg.optim.steps and not monitor.stop:
            loss, metrics = run.train_step(step)
            step += 1
            with monitor.phase("eval"):
                if cfg.evaluation.due(step, cfg.optim.steps):
                    with eval_weights(monitor, cfg.evaluation.use_ema):
                        monitor.log_eval(
                            step, evaluate(run.model, tokenizer, cfg.evaluation, cfg.data, cluster)
                        )
                if cfg.generation.due(step, cfg.optim.steps):
                    log_samples(run.model, tokenizer, cfg, step)
            step = monitor.end_step(step, loss, tokens_per_step, **metrics)


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
