"""Evaluate a multiplication checkpoint on a split and clear its eval flag.

    python -m src.apps.multiplication.eval config=<run log dir>/config.yaml [checkpoint=<dir>] [split=test]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated, laid out at the
curriculum stage of its step. The result (accuracy, digit accuracies, answer loss, speed) is appended to
`metrics/eval_{rank}.jsonl` of the run and printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...nanollama.config import ConfigError, entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .data import SPLITS
from .evaluation import evaluate
from .modes import Schedule
from .train import TrainConfig, build_model, load_tokenizer


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir
    split: str = "valid"  # valid | test

    def check(self) -> None:
        super().check()
        if self.split not in SPLITS[1:]:
            raise ConfigError("split", f"must be valid or test, got {self.split!r}")


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with Cluster(cfg.cluster) as cluster:
        tok = load_tokenizer(cfg)
        model = build_model(cfg, training=False, device=cluster.device)
        load_model_weights(path, model, ema=cfg.evaluation.use_ema)
        model = model.to(cluster.device).eval()
        step = checkpoint_step(path)
        stage = Schedule(cfg.train, cfg.data).stage(max(step - 1, 0))
        seed = cfg.orchestration.seed
        metrics = evaluate(model, tok, cfg.evaluation, cfg.data, cfg.train, seed, cluster, stage, cfg.split)
        result = {"step": step, **metrics, "split": cfg.split}
        if cluster.is_main:
            print(
                f"step {step}: {cfg.train.mode} {cfg.data.k}x{cfg.data.m} {cfg.split} accuracy "
                f"{result['accuracy']:.4f}, digit accuracy {result['digit_accuracy']:.4f}, answer loss "
                f"{result['loss']:.4f} ({result['n']} problems, {result['answers_per_s']:.0f} answers/s)"
            )
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


main = entrypoint(EvalRunConfig, run_eval)


if __name__ == "__main__":
    main()
