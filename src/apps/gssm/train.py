"""Train a transformer on sequences of a graph-structured sequential model (GSSM).

    python -m src.apps.gssm.train config=src/apps/gssm/configs/debug.yaml [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m src.apps.gssm.train config=...

Evaluation lines report the model's loss next to the true model's (`bayes_loss`) on the same
held-out sequences, and their `gap`. `build_training` is the app's hook for the core's tools (the LR
finder: `python -m src.nanollama.lr_finder script=src.apps.gssm.train config=...`).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...nanollama.app import RunConfig, Training, check_use_ema, set_vocab_size, train_entrypoint
from ...nanollama.distributed import Cluster, detect_environment, micro_batch_size
from ...nanollama.init_checkpoint import load_init
from ...nanollama.model.transformer import Transformer, TransformerConfig
from ...nanollama.monitor.early_stopping import EarlyStopping
from ...nanollama.monitor.logger import read_jsonl
from ...nanollama.trainer import build_transformer, causal_lm_loss, eval_weights, start_run
from .data import DataConfig, build_stream
from .evaluation import EvaluationConfig, check_evaluation, evaluate
from .generator import GSSM

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunConfig):
    model: TransformerConfig = field(default_factory=TransformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self) -> None:
        check_use_ema(self.evaluation.use_ema, self.optim)

    def check_inputs(self) -> None:
        """What the run will read, before the log dir exists: the dataset on disk and the held-out
        sequences of every evaluation."""
        check_evaluation(self.evaluation, self.data, detect_environment().world_size)


def build_model(cfg: TrainConfig, training: bool, device: torch.device) -> Transformer:
    return build_transformer(cfg.model, cfg.orchestration.seed, training, device)


def gssm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(model(tokens[:, :-1]), tokens)


def build_training(cfg: TrainConfig, cluster: Cluster, loader: Any = None, init: bool = True) -> Training:
    """The app's training step for its loop and the core's tools (see `Training`)."""
    if loader is None:
        gssm = GSSM(cfg.data.gssm)
        set_vocab_size(cfg.model, gssm.vocab_size, "observed node")  # its state_dim
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        seed = cfg.orchestration.seed
        loader = build_stream(cfg.data, gssm, micro, seed, cluster.rank, cluster.world_size)
    model = build_model(cfg, training=True, device=cluster.device)
    if init:
        load_init(model, cfg.init)

    def next_batch() -> torch.Tensor:
        return next(loader).to(cluster.device, non_blocking=True)

    return Training(model, loader, next_batch, gssm_loss)


def train(cfg: TrainConfig) -> None:
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        micro = micro_batch_size(cfg.data.batch_size, cluster.world_size, cfg.optim.accumulation_steps)
        gssm = GSSM(cfg.data.gssm)
        set_vocab_size(cfg.model, gssm.vocab_size, "observed node")
        stream = build_stream(cfg.data, gssm, micro, cfg.orchestration.seed, cluster.rank, cluster.world_size)
        check_model = lambda: build_model(cfg, training=False, device=torch.device("meta"))  # noqa: E731
        run = stack.enter_context(
            start_run(cfg, cluster, stream, build_training, check_model, cfg.data.seq_len)
        )
        step, monitor = run.step, run.monitor
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        logger.info(f"training from step {step} to {cfg.optim.steps}, {micro} sequences/rank/micro-step")
        early = EarlyStopping(cfg.evaluation.early_stop_patience)
        early.replay(read_jsonl(monitor.evals.path), until=step)

        while step < cfg.optim.steps and not monitor.stop and not early.stopped:
            loss, metrics = run.train_step(step)
            step += 1
            eval_due = cfg.evaluation.due(step, cfg.optim.steps)
            if eval_due and not cfg.evaluation.asynchronous:
                with monitor.phase("eval"), eval_weights(monitor, cfg.evaluation.use_ema):
                    metrics_eval = evaluate(
                        run.model, gssm, cfg.evaluation, cfg.data, cfg.orchestration.seed, cluster
                    )
                    monitor.log_eval(step, metrics_eval)
                if early.observe(step, metrics_eval):
                    best = {"best_step": early.best_step, "best_loss": early.best}
                    monitor.events.write({"step": step, "event": "early_stop", **best})
                    logger.info(f"early stop at step {step}: best held-out loss at step {early.best_step}")
            eval_checkpoint = eval_due and cfg.evaluation.asynchronous
            step = monitor.end_step(step, loss, tokens_per_step, eval_checkpoint, **metrics)


main = train_entrypoint(TrainConfig, train, build_training)


if __name__ == "__main__":
    main()
