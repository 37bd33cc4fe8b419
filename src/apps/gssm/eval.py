"""Evaluate a GSSM checkpoint and clear its eval flag.

    python -m src.apps.gssm.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. The result is
appended to `metrics/eval_{rank}.jsonl` of the run and printed.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ...nanollama.config import ConfigError, cli_main, load_config
from ...nanollama.distributed import Cluster
from ...nanollama.monitor.checkpoint import (
    checkpoint_step,
    clear_eval_flag,
    latest_checkpoint,
    load_model_weights,
)
from ...nanollama.monitor.logger import JsonlWriter
from .evaluation import evaluate
from .generator import GSSM
from .train import TrainConfig, build_model, set_vocab_size


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir


def find_checkpoint(cfg: EvalRunConfig) -> Path:
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not (path / "model.pt").is_file():
            raise ConfigError("checkpoint", f"{path} is not a checkpoint folder (no model.pt)")
        return path
    path = latest_checkpoint(
        Path(cfg.orchestration.log_dir or f"runs/{cfg.orchestration.name}") / "checkpoints"
    )
    if path is None:
        raise ConfigError("orchestration.log_dir", f"no checkpoint in {cfg.orchestration.log_dir}")
    return path


def run_eval(cfg: EvalRunConfig) -> dict:
    path = find_checkpoint(cfg)
    log_dir = path.parent.parent
    with ExitStack() as stack:
        cluster = stack.enter_context(Cluster(cfg.cluster))
        gssm = GSSM(cfg.data.gssm)
        set_vocab_size(cfg, gssm)
        model = build_model(cfg, training=False, device=cluster.device)
        load_model_weights(path, model)
        model.to(cluster.device)
        result = {
            "step": checkpoint_step(path),
            **evaluate(model, gssm, cfg, cluster),
            "checkpoint": str(path),
        }
        with JsonlWriter(log_dir / "metrics" / f"eval_{cluster.rank}.jsonl") as writer:
            writer.write(result)
        cluster.barrier()
        if cluster.is_main:
            clear_eval_flag(path)
            r = result
            print(
                f"step {r['step']}: eval loss {r['loss']:.4f}, bayes loss {r['bayes_loss']:.4f}, "
                f"gap {r['gap']:.4f} nats/token ({r['n_tokens']} tokens)"
            )
    return result


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_eval(load_config(EvalRunConfig, argv))


if __name__ == "__main__":
    main()
