"""Evaluate a GPT checkpoint on the validation split and clear its eval flag.

    python -m src.apps.gpt.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. The result (loss,
perplexity, bits per byte) is appended to `metrics/eval_{rank}.jsonl` of the run and printed.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ...nanollama.config import entrypoint
from ...nanollama.data.text import Tokenizer
from ...nanollama.distributed import Cluster
from ...nanollama.model.transformer import Transformer
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .evaluation import evaluate
from .train import TrainConfig, build_model, load_tokenizer


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir


def load_frozen(cfg: EvalRunConfig, path: Path, device: torch.device) -> tuple[Tokenizer, Transformer]:
    """The run's tokenizer and the checkpoint's weights, in eval mode."""
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, training=False, device=device)
    load_model_weights(path, model, ema=cfg.evaluation.use_ema)
    return tokenizer, model.to(device).eval()


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        tokenizer, model = load_frozen(cfg, path, cluster.device)
        result = {
            "step": checkpoint_step(path),
            **evaluate(model, tokenizer, cfg.evaluation, cfg.data, cluster),
        }
        if cluster.is_main:
            print(
                f"step {result['step']}: eval loss {result['loss']:.4f} nats/token, perplexity "
                f"{result['perplexity']:.2f}, {result['bpb']:.4f} bits/byte ({result['n_tokens']} tokens)"
            )
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


main = entrypoint(EvalRunConfig, run_eval)


if __name__ == "__main__":
    main()
