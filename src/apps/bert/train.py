"""Train a BERT-style encoder: masked-LM pretraining or sentence-classification fine-tuning.

    python -m src.apps.bert.train config=src/apps/bert/configs/debug.yaml [key=value ...]
    python -m src.apps.bert.train config=src/apps/bert/configs/finetune_debug.yaml \
        init.checkpoint=runs/bert_debug
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.bert.train config=...

`task.name` picks the task handler (`mlm`, `shuffled`, `cola`, `sst2`). A run restarted in its own log dir
resumes fully. `init.checkpoint` (the core's, `src/nanollama/init.py`) starts a new run from another
run's checkpoint: with the same task type it takes all the weights, with another it takes the encoder
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

from ...nanollama.config import ConfigError, entrypoint, read_yaml, to_dict
from ...nanollama.data.packing import TextDataConfig
from ...nanollama.data.text import Tokenizer, TokenizerConfig
from ...nanollama.distributed import Cluster, ClusterConfig, detect_environment, micro_batch_size
from ...nanollama.init import InitConfig, check_init, load_init_weights, resumes
from ...nanollama.init import find_init as find_checkpoint_to_start_from
from ...nanollama.model.transformer import TransformerConfig
from ...nanollama.monitor.monitor import Monitor, OrchestrationConfig
from ...nanollama.optim import OptimConfig, build_optimizer, build_scheduler, freeze
from ...nanollama.trainer import (
    Training,
    build_text_tokenizer,
    build_transformer,
    check_use_ema,
    eval_weights,
    seed_everything,
    train_step,
)
from .model import Bert
from .tasks import EvaluationConfig, Task, TaskConfig, build_task

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig(causal=False))
    data: TextDataConfig = field(default_factory=TextDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    init: InitConfig = field(default_factory=InitConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self)
        if self.model.causal:
            raise ConfigError("model.causal", "BERT is a bidirectional encoder: must be false")
        if self.data.seq_len < 3:
            raise ConfigError("data.seq_len", f"must hold cls, a token and sep, got {self.data.seq_len}")

    def check_inputs(self) -> None:
        """What the run will read, before the log dir exists: the tokenizer's files (a sentencepiece
        model is trained here, once; later calls load it from its cache) and the task's train and valid
        data (GLUE files, held-out sentences or text), in batches that fit every rank."""
        build_task(self, load_tokenizer(self)).check_inputs(detect_environment().world_size)


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


def build_training(
    cfg: TrainConfig, cluster: Cluster, loader: Any = None, init: bool = True, task: Task | None = None
) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`); `task`: the one the
    loop built already."""
    task = task or build_task(cfg, load_tokenizer(cfg))
    if loader is None:
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        loader = task.train_loader(micro, cluster.rank, cluster.world_size)
    model = build_model(cfg, task, training=True, device=cluster.device)
    if init and (source := find_init(cfg)):
        load_init(model, source, task.name)

    def next_batch() -> list[torch.Tensor]:
        return [t.to(cluster.device, non_blocking=True) for t in next(loader)]

    return Training(model, loader, next_batch, task.loss)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        tokenizer = load_tokenizer(cfg)
        task = build_task(cfg, tokenizer)
        loader = task.train_loader(micro, cluster.rank, cluster.world_size)
        init = find_init(cfg)
        if init and cfg.optim.rewarm_steps and not cfg.optim.rewarm_from:
            cfg.optim.rewarm_from = init.lr  # recorded in config.yaml, so a resume re-warms the same way
        if init:  # names and shapes, before the log dir exists
            build = partial(build_model, cfg, task, training=False, device=cluster.device)
            check_init(cfg.init, build, init_prefix_map(init, task.name))
        resuming = resumes(cfg.orchestration.log_dir)

        monitor = stack.enter_context(Monitor(cfg.orchestration, cluster, cfg, cfg.optim.steps))
        # a run's own checkpoint wins over its starting point
        training = build_training(cfg, cluster, loader, init=not resuming, task=task)
        loader = stack.enter_context(loader)
        freeze(training.model, cfg.optim)  # `optim.groups` multipliers of 0, before DDP registers them
        model = cluster.wrap(training.model)
        optimizer = build_optimizer(model, cfg.optim, cluster.device_type)
        scheduler = build_scheduler(optimizer, cfg.optim)
        seed_everything(cfg.orchestration.seed, cluster.rank)
        step = monitor.resume(model, optimizer, scheduler, loader)
        logger.info(
            f"task {task.name}: training from step {step} to {cfg.optim.steps}, {micro} rows/rank/micro-step"
        )
        loss_fn, step_tokens = partial(task.loss, model), 0

        def next_batch() -> list[torch.Tensor]:
            nonlocal step_tokens
            batch = next(loader)
            step_tokens += task.tokens(batch) * cluster.world_size
            return [t.to(cluster.device, non_blocking=True) for t in batch]

        while step < cfg.optim.steps and not monitor.stop:
            loss, metrics = train_step(
                model, optimizer, scheduler, cluster, monitor, cfg.optim, step, next_batch, loss_fn
            )
            step += 1
            with monitor.phase("eval"):
                if cfg.evaluation.due(step, cfg.optim.steps):
                    with eval_weights(monitor, cfg.evaluation.use_ema):
                        monitor.log_eval(step, task.evaluate(model, "valid", cluster))
                        for line in task.dump(model, cluster.device):
                            logger.info(f"prediction at step {step}: {line}")
            step = monitor.end_step(step, loss, step_tokens, **metrics, **task.train_metrics())
            step_tokens = 0


main = entrypoint(TrainConfig, train)


if __name__ == "__main__":
    main()
