"""Train a vision-language model: a SigLIP-style encoder, pixel shuffle, a projector and the core LM.

    python -m src.apps.vlm.train config=src/apps/vlm/configs/debug.yaml [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.vlm.train config=...

The data is a mixture of datasets (digits, shapes, text) drawn by weight, each with its own epochs and
shard seed, resumed exactly; every checkpoint records what each dataset has given (`data_{rank}.json`).
The run is `optim.steps` long, or `data.epochs` epochs of the dataset `data.epochs_of`. Parts train at
their own LR or are frozen through `optim.groups` (prefixes `vision.`, `projector.`, `lm.`; 0 freezes).
The encoder can start from a SigLIP folder (`vision.pretrained`), the LM from an imported HF Llama
(`init.checkpoint=<imported> 'init.prefix_map={"": lm.}'`), the whole model from another run (`init`).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from ...nanollama.app import RunConfig, Training, check_use_ema, set_vocab_size, train_entrypoint
from ...nanollama.config import ConfigError
from ...nanollama.data.mixture import Mixture
from ...nanollama.data.text import Tokenizer, TokenizerConfig, build_tokenizer
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import check_init, load_init
from ...nanollama.model.attention import batch_mask_error, flex_backward_available
from ...nanollama.model.transformer import TransformerConfig
from ...nanollama.model.vision import VisionConfig, load_siglip, siglip_config
from ...nanollama.optim import check_groups
from ...nanollama.trainer import eval_weights, start_run, steps_in_epochs, training_attention
from .data import (
    Processor,
    ProcessorConfig,
    RowBuilder,
    Sample,
    VLMDataConfig,
    build_dataset,
    longest_texts,
)
from .evaluation import EvaluationConfig, evaluate
from .model import VLM, VLMConfig, image_tokens, vlm_loss

logger = logging.getLogger(__name__)
VISION_KEYS = ("image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "ffn_dim")


@dataclass
class TrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=TransformerConfig)  # the LM
    vision: VisionConfig = field(default_factory=VisionConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)
        if self.tokenizer.kind == "sentencepiece":
            raise ConfigError("tokenizer.kind", "vlm takes byte or tiktoken (a fixed vocabulary)")

    def check_inputs(self) -> None:
        """Everything the run will read, before the log dir exists: the data of every dataset and its
        valid split, rows that fit `data.seq_len`, the SigLIP folder against `vision`, the starting
        checkpoint and `optim.groups` against the model, and the per-batch masks."""
        world = detect_environment().world_size
        tokenizer = load_tokenizer(self)
        check_datasets(self, world)
        rows = row_builder(self, tokenizer)
        for d in self.data.datasets:
            prompt, answer = longest_texts(d.kind)
            rows.row(
                Sample(
                    None if d.kind == "text" else np.zeros((1, 1, 3), dtype=np.float32),
                    prompt,
                    answer,
                    d.kind,
                )
            )
        if self.vision.pretrained and not self.vlm.blind:
            found = siglip_config(self.vision.pretrained)
            for key in VISION_KEYS:
                mine, theirs = getattr(self.vision, key), getattr(found, key)
                if key == "ffn_dim":
                    mine, theirs = self.vision.hidden_dim, found.hidden_dim
                if mine != theirs:
                    raise ConfigError(f"vision.{key}", f"{mine}, but {self.vision.pretrained} has {theirs}")
            load_siglip(self.vision.pretrained)  # its tensors read and shape-checked: a bad file exits here
        build = partial(build_model, self, training=False, device=torch.device("meta"))
        check_init(self.init, build)
        with torch.device("meta"):
            check_groups(build(), self.optim)
        check_finite_length(self, world)
        micro = micro_batch_size(self.data.batch_size, world, self.optim.accumulation_steps)
        rows_per_forward = max(micro, self.evaluation.batch_size)
        backend = self.model.attention if flex_backward_available(self.cluster.device_type) else "sdpa"
        if why := batch_mask_error(backend, self.cluster.device_type, rows_per_forward, self.data.seq_len):
            raise ConfigError("data.seq_len", why)


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    tokenizer = build_tokenizer(cfg.tokenizer)
    set_vocab_size(cfg.model, tokenizer.vocab_size, "tokenizer")
    return tokenizer


def check_datasets(cfg: TrainConfig, world: int) -> None:
    """Every dataset's train and valid splits load and split across ranks."""
    for i, d in enumerate(cfg.data.datasets):
        key = f"data.datasets.{i}"
        for split in ("train", "valid"):
            n = len(build_dataset(d, cfg.data, split))
            if n < world:
                raise ConfigError(key, f"{d.name}: {n} {split} samples for {world} ranks")


def row_builder(cfg: TrainConfig, tokenizer: Tokenizer) -> RowBuilder:
    processor = Processor(cfg.processor, cfg.vision.image_size)
    k = image_tokens(cfg.vlm, cfg.vision)
    return RowBuilder(tokenizer, processor, cfg.data.seq_len, k, cfg.vlm.loss)


def build_model(cfg: TrainConfig, training: bool, device: torch.device) -> VLM:
    """Deterministic init from the global seed (the encoder loads `vision.pretrained` if set); flex falls
    back to sdpa where it cannot train."""
    training_attention(cfg.model, training, device)
    torch.manual_seed(cfg.orchestration.seed)
    return VLM(cfg.vlm, cfg.vision, cfg.model)


def build_mixture(cfg: TrainConfig, rows: RowBuilder, cluster: Cluster) -> Mixture:
    """This rank's share of the training mixture, `micro` samples a batch."""
    collate = lambda picks: rows([sample for _, sample in picks])  # noqa: E731
    return _mixture(cfg, collate, cluster.rank, cluster.world_size)


def _mixture(cfg: TrainConfig, collate: Any, rank: int, world: int) -> Mixture:
    data = cfg.data
    micro = micro_batch_size(data.batch_size, world, cfg.optim.accumulation_steps)
    try:
        return Mixture(
            [build_dataset(d, data, "train") for d in data.datasets],
            [d.name for d in data.datasets],
            [d.weight for d in data.datasets],
            micro,
            collate,
            seed=data.seed,
            seeds=[d.seed if d.seed >= 0 else data.seed for d in data.datasets],
            epochs=[d.epochs for d in data.datasets],
            stop_after=(data.epochs_of, data.epochs) if data.epochs else None,
            rank=rank,
            world_size=world,
        )
    except ValueError as e:
        raise ConfigError("data.datasets", str(e)) from None


def check_finite_length(cfg: TrainConfig, world: int) -> None:
    """With an epoch cap on every dataset (and no `data.epochs`) the data ends: `optim.steps` must fit in
    it on every rank, else the run would die mid-way with the log dir half-written."""
    if cfg.data.epochs or not all(d.epochs for d in cfg.data.datasets):
        return
    batches = min(_mixture(cfg, lambda picks: picks, r, world).count_batches() for r in range(world))
    steps = batches // cfg.optim.accumulation_steps
    if cfg.optim.steps > steps:
        raise ConfigError(
            "optim.steps",
            f"{cfg.optim.steps}, but the epoch caps of data.datasets end the data after {steps} steps "
            "(lower optim.steps, use data.epochs, or leave a dataset endless with epochs: 0)",
        )


def build_training(cfg: TrainConfig, cluster: Cluster, loader: Any = None, init: bool = True) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`)."""
    tokenizer = load_tokenizer(cfg)
    loader = loader if loader is not None else build_mixture(cfg, row_builder(cfg, tokenizer), cluster)
    model = build_model(cfg, training=True, device=cluster.device)
    if init:
        load_init(model, cfg.init)

    def next_batch() -> Any:
        return next(loader).to(cluster.device)

    return Training(model, loader, next_batch, vlm_loss)


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        acc = cfg.optim.accumulation_steps
        tokenizer = load_tokenizer(cfg)
        rows, vocabulary = row_builder(cfg, tokenizer), tokenizer.identity
        mixture = build_mixture(cfg, rows, cluster)
        if cfg.data.epochs:  # the run is as long as those epochs of the named dataset
            cfg.optim.steps = steps_in_epochs(mixture.count_batches(), cluster, acc, str(mixture.stop))
        check_model = lambda: build_model(cfg, training=False, device=torch.device("meta"))  # noqa: E731
        run = stack.enter_context(
            start_run(
                cfg, cluster, mixture, build_training, check_model, cfg.data.seq_len, vocabulary=vocabulary
            )
        )
        step, monitor, vlm = run.step, run.monitor, run.training.model
        for line in mixture.plan(cfg.optim.steps * acc):
            logger.info(f"data plan: {line}")
        n_params = sum(p.numel() for p in vlm.parameters())
        n_train = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        logger.info(
            f"training from step {step} to {cfg.optim.steps}: {n_params:,} parameters ({n_train:,} trained), "
            f"{vlm.n_image_tokens} image tokens per image"
        )
        samples = cfg.data.batch_size
        tokens = samples * cfg.data.seq_len  # positions the LM runs per step (padding included)

        while step < cfg.optim.steps and not monitor.stop:
            loss, metrics = run.train_step(step)
            step += 1
            with monitor.phase("eval"):
                if cfg.evaluation.due(step, cfg.optim.steps):
                    with eval_weights(monitor, cfg.evaluation.use_ema):
                        monitor.log_eval(step, evaluate(run.model, rows, cfg.evaluation, cfg.data, cluster))
            step = monitor.end_step(step, loss, tokens, samples=samples, **metrics)


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
