"""Evaluate a VLM checkpoint on the held-out splits and clear its eval flag.

    python -m src.apps.vlm.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. The result (answer
loss, `accuracy`, `accuracy_{task}`, `text_loss`) is appended to `metrics/eval_{rank}.jsonl` of the run
and printed; under torchrun the ranks share the samples and the counts are summed.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ...nanollama.config import entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .data import RowBuilder
from .evaluation import evaluate
from .model import VLM
from .train import TrainConfig, build_model, load_tokenizer, row_builder


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir


def load_frozen(cfg: EvalRunConfig, path: Path, device: torch.device) -> tuple[RowBuilder, VLM]:
    """The run's row builder (tokenizer, processor) and the checkpoint's weights, in eval mode. The
    encoder's weights come from the checkpoint, not from `vision.pretrained`."""
    rows = row_builder(cfg, load_tokenizer(cfg))
    cfg.vision.pretrained = ""
    model = build_model(cfg, training=False, device=device)
    load_model_weights(path, model, ema=cfg.evaluation.use_ema)
    return rows, model.to(device).eval()


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        rows, model = load_frozen(cfg, path, cluster.device)
        result = {"step": checkpoint_step(path), **evaluate(model, rows, cfg.evaluation, cfg.data, cluster)}
        if cluster.is_main:
            tasks = " ".join(f"{k[9:]}={v:.3f}" for k, v in result.items() if k.startswith("accuracy_"))
            accuracy = f"accuracy {result['accuracy']:.4f} ({tasks}), " if "accuracy" in result else ""
            print(f"step {result['step']}: {accuracy}answer loss {result['loss']:.4f}")
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


main = entrypoint(EvalRunConfig, run_eval)


if __name__ == "__main__":
    main()
