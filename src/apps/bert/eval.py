"""Evaluate a BERT checkpoint on a split of its task and clear its eval flag.

    python -m src.apps.bert.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>] [split=test]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. `split` is `valid`
(default) or `test` (classification tasks: the held-out test documents of `shuffled`, a labelled GLUE
test.tsv). The result is appended to `metrics/eval_{rank}.jsonl` of the run and printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...nanollama.config import entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .tasks import build_task
from .train import TrainConfig, build_model, load_tokenizer


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir
    split: str = "valid"  # valid | test


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with Cluster(cfg.cluster) as cluster:
        task = build_task(cfg.task, cfg.data, cfg.evaluation, cfg.orchestration.seed, load_tokenizer(cfg))
        model = build_model(cfg, task, training=False, device=cluster.device)
        load_model_weights(path, model, ema=cfg.evaluation.use_ema)
        model = model.to(cluster.device).eval()
        metrics = task.evaluate(model, cfg.split, cluster)
        result = {"step": checkpoint_step(path), **metrics, "split": cfg.split, "checkpoint": str(path)}
        if cluster.is_main:
            extra = f", mcc {result['mcc']:.4f}" if "mcc" in result else ""
            print(
                f"step {result['step']}: {task.name} {cfg.split} loss {result['loss']:.4f}, "
                f"accuracy {result['accuracy']:.4f}{extra} ({result['n']} predictions)"
            )
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


main = entrypoint(EvalRunConfig, run_eval)


if __name__ == "__main__":
    main()
