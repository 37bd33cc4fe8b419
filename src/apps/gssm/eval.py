"""Evaluate a GSSM checkpoint and clear its eval flag.

    python -m src.apps.gssm.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. The result is
appended to `metrics/eval_{rank}.jsonl` of the run and printed, with the evaluation length and the
RoPE scaling it used: any run can be evaluated past its training length, e.g. at 4x with YaRN,

    python -m src.apps.gssm.eval config=<run>/config.yaml evaluation.seq_len=256 \
        evaluation.position_buckets=4 model.rope_scaling=yarn model.rope_factor=4 \
        model.rope_original_length=64
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from ...nanollama.app import set_vocab_size
from ...nanollama.config import entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.model.transformer import Transformer
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .evaluation import bucket_edges, evaluate
from .generator import GSSM
from .train import TrainConfig, build_model

# Recorded on every eval line: a checkpoint may be evaluated with another RoPE scaling than it trained with.
ROPE_KEYS = ("rope_scaling", "rope_factor", "rope_original_length")


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir


def load_frozen(cfg: EvalRunConfig, path: Path, device: torch.device) -> tuple[GSSM, Transformer]:
    """The run's true model and the checkpoint's weights, in eval mode, for evaluation and probing."""
    gssm = GSSM(cfg.data.gssm)
    set_vocab_size(cfg.model, gssm.vocab_size, "observed node")
    model = build_model(cfg, training=False, device=device)
    load_model_weights(path, model, ema=cfg.evaluation.use_ema)
    return gssm, model.to(device).eval()


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        gssm, model = load_frozen(cfg, path, cluster.device)
        result = {
            "step": checkpoint_step(path),
            **evaluate(model, gssm, cfg.evaluation, cfg.data, cfg.orchestration.seed, cluster),
            **{key: getattr(cfg.model, key) for key in ROPE_KEYS},
            "checkpoint": str(path),
        }
        if cluster.is_main:
            print(report(result, cfg))
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


def report(r: dict, cfg: EvalRunConfig) -> str:
    """The console summary: one line, then the length and RoPE when not the training ones, and buckets."""
    lines = [
        f"step {r['step']}: eval loss {r['loss']:.4f}, bayes loss {r['bayes_loss']:.4f}, "
        f"gap {r['gap']:.4f} nats/token ({r['n_tokens']} tokens)"
    ]
    if r["seq_len"] != cfg.data.seq_len or r["rope_scaling"] != "none":
        scaling, factor = r["rope_scaling"], r["rope_factor"]
        rope = "plain rope" if scaling == "none" else f"rope {scaling} x{factor:g}"
        lines.append(f"  at seq_len {r['seq_len']} (trained at {cfg.data.seq_len}), {rope}")
    buckets = cfg.evaluation.position_buckets
    for i, (lo, hi) in enumerate(pairwise(bucket_edges(r["seq_len"], buckets) if buckets else [])):
        lines.append(
            f"  positions {lo:>5}-{hi - 1:<5} loss {r[f'loss_pos_{i}']:.4f}, "
            f"bayes loss {r[f'bayes_loss_pos_{i}']:.4f}, gap {r[f'gap_pos_{i}']:.4f}"
        )
    return "\n".join(lines)


main = entrypoint(EvalRunConfig, run_eval)


if __name__ == "__main__":
    main()
