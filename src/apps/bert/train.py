"""Train a BERT-style encoder: masked-LM pretraining or sentence-classification fine-tuning.

    python -m src.apps.bert.train config=src/apps/bert/configs/debug.yaml [key=value ...]
    python -m src.apps.bert.train config=src/apps/bert/configs/finetune_debug.yaml \
        init.checkpoint=runs/bert_debug
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.bert.train config=...

`task.name` picks the task handler (`mlm`, `shuffled`, `cola`, `sst2`). A run restarted in its own log dir
resumes fully. `init.checkpoint` (the core's, `src/nanollama/init_checkpoint.py`) starts a new run from
another run's checkpoint: with the same task type it takes all the weights, with another it takes the encoder
(`init.prefix_map` {"encoder.": "encoder."}) and starts a fresh head; either way the optimizer and
schedule start anew (`optim.rewarm_steps` > 0 re-warms from the checkpoint's LR). An explicit
`init.prefix_map` replaces that choice. `build_training` is the app's hook for the core's tools.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...nanollama.app import RunConfig, Training, check_use_ema, train_entrypoint
from ...nanollama.config import ConfigError, read_yaml, to_dict
from ...nanollama.data.packing import TextDataConfig
from ...nanollama.data.text import Tokenizer, TokenizerConfig
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import InitConfig, load_init_weights
from ...nanollama.init_checkpoint import find_init as find_checkpoint_to_start_from
from ...nanollama.model.transformer import TransformerConfig
from ...nanollama.trainer import (
    build_text_tokenizer,
    build_transformer,
    check_text_masks,
    eval_weights,
    start_run,
)
from .model import Bert
from .tasks import EvaluationConfig, Task, TaskConfig, build_task

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig(causal=False))
    data: TextDataConfig = field(default_factory=TextDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)
        if self.model.causal:
            raise ConfigError("model.causal", "BERT is a bidirectional encoder: must be false")
        if self.data.seq_len < 3:
            raise ConfigError("data.seq_len", f"must hold cls, a token and sep, got {self.data.seq_len}")

    def check_inputs(self) -> None:
        """What the run will read, before the log dir exists: the tokenizer's files (a sentencepiece
        model is trained here, once; later calls load it from its cache) and the task's train and valid
        data (GLUE files, held-out sentences or text), in batches that fit every rank, and mlm's attention
        masks."""
        world = detect_environment().world_size
        task = build_task(
            self.task, self.data, self.evaluation, self.orchestration.seed, load_tokenizer(self)
        )
        task.check_inputs(world)
        if task.name == "mlm":
            check_text_masks(self, self.model, self.data, self.evaluation.batch_size, world)


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    return build_text_tokenizer(cfg.tokenizer, cfg.data, cfg.model)


def build_model(cfg: TrainConfig, task: Task, training: bool, device: torch.device) -> Bert:
    """Encoder, then head, from the global seed: a fresh head is the same whatever the encoder loads."""
    encoder = build_transformer(cfg.model, cfg.orchestration.seed, training, device)
    return Bert(encoder, task.build_head(encoder))


# ----------------------------------------------------------------------------- starting from a checkpoint


@dataclass
class InitSource:
    path: Path  # the checkpoint folder
    task: str  # task type of the run that saved it
    lr: float  # LR of the step after it
    cfg: InitConfig  # this run's init section (its prefix_map, if given, says what is taken)


# Keys of the starting run's config that must match: the weights' shapes and meaning, and the tokenizer
# (a sentencepiece model is trained on the training split of the sources).
MATCHING = {
    "model": None,  # every key but the attention backend
    "tokenizer": ("kind", "vocab_size", "path"),
    "data": ("sources", "valid_fraction"),
}


def find_init(cfg: TrainConfig) -> InitSource | None:
    """The checkpoint of `init.checkpoint`, checked against this run's config (ConfigError naming the key)."""
    path = find_checkpoint_to_start_from(cfg.init)
    if path is None:
        return None
    run_config = read_yaml(path.parent.parent / "config.yaml")
    if "name" not in run_config.get("task", {}):
        raise ConfigError(
            "init.checkpoint", f"{path} is not from a BERT run (no task.name in its config.yaml)"
        )
    ours = to_dict(cfg)
    for section, keys in MATCHING.items():
        theirs = run_config.get(section, {})
        for key in keys or [k for k in ours[section] if k != "attention"]:
            if ours[section][key] != theirs.get(key):
                raise ConfigError(
                    f"{section}.{key}", f"{ours[section][key]} differs from {theirs.get(key)} of {path}"
                )
    state = torch.load(path / "state_0.pt", map_location="cpu", weights_only=False)
    return InitSource(path, run_config["task"]["name"], float(state["scheduler"]["_last_lr"][0]), cfg.init)


def init_prefix_map(init: InitSource, task: str) -> dict[str, str]:
    """What is taken: all the weights for the same task type, else the encoder; `init.prefix_map` if set."""
    if init.cfg.prefix_map:
        return init.cfg.prefix_map
    return {} if init.task == task else {"encoder.": "encoder."}


def load_init(model: Bert, init: InitSource, task: str) -> None:
    """The encoder's weights (and the head's, if the task type is the same) from the checkpoint."""
    prefix_map = init_prefix_map(init, task)
    load_init_weights(model, init.path, init.cfg, prefix_map)
    if init.cfg.prefix_map:
        logger.info(
            f"initialised from {init.path} through prefix map {prefix_map} (task {init.task} -> {task})"
        )
        return
    parts = ("encoder", "head") if init.task == task else ("encoder",)
    fresh = "" if init.task == task else ", fresh head"
    logger.info(f"initialised {' and '.join(parts)} from {init.path} (task {init.task} -> {task}{fresh})")


@dataclass
class StepTokens:
    """The tokens a step's batches held on all ranks (the task says what counts), reset by the loop."""

    tokens: int = 0


def build_training(
    cfg: TrainConfig, cluster: Cluster, loader: Any = None, init: bool = True, task: Task | None = None
) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`); `task`: the one the
    loop built already."""
    task = task or build_task(cfg.task, cfg.data, cfg.evaluation, cfg.orchestration.seed, load_tokenizer(cfg))
    if loader is None:
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        loader = task.train_loader(micro, cluster.rank, cluster.world_size)
    model = build_model(cfg, task, training=True, device=cluster.device)
    if init and (source := find_init(cfg)):
        load_init(model, source, task.name)
    state = StepTokens()

    def next_batch() -> list[torch.Tensor]:
        batch = next(loader)
        state.tokens += task.tokens(batch) * cluster.world_size
        return [t.to(cluster.device, non_blocking=True) for t in batch]

    return Training(model, loader, next_batch, task.loss, state)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        tokenizer = load_tokenizer(cfg)
        task = build_task(cfg.task, cfg.data, cfg.evaluation, cfg.orchestration.seed, tokenizer)
        loader = task.train_loader(micro, cluster.rank, cluster.world_size)
        init = find_init(cfg)
        if init and cfg.optim.rewarm_steps and not cfg.optim.rewarm_from:
            cfg.optim.rewarm_from = init.lr  # recorded in config.yaml, so a resume re-warms the same way
        check_model = lambda: build_model(cfg, task, training=False, device=torch.device("meta"))  # noqa: E731
        build = partial(build_training, task=task)
        prefix_map = init_prefix_map(init, task.name) if init else None
        run = stack.enter_context(
            start_run(
                cfg, cluster, loader, build, check_model, cfg.data.seq_len, prefix_map, tokenizer.identity
            )
        )
        step, monitor, tokens = run.step, run.monitor, run.training.state
        logger.info(
            f"task {task.name}: training from step {step} to {cfg.optim.steps}, {micro} rows/rank/micro-step"
        )

        while step < cfg.optim.steps and not monitor.stop:
            loss, metrics = run.train_step(step)
            step += 1
            with monitor.phase("eval"):
                if cfg.evaluation.due(step, cfg.optim.steps):
                    with eval_weights(monitor, cfg.evaluation.use_ema):
                        monitor.log_eval(step, task.evaluate(run.model, "valid", cluster))
                        for line in task.dump(run.model, cluster.device):
                            logger.info(f"prediction at step {step}: {line}")
            step = monitor.end_step(step, loss, tokens.tokens, **metrics, **task.train_metrics())
            tokens.tokens = 0


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
