"""Compare multiplication runs: size, accuracy, and what an answer costs.

    python -m src.apps.multiplication.compare RUN [RUN ...]

One row per run folder: parameters, best and last validation accuracy and answer loss (in-loop eval
lines), the last test accuracy (eval.py split=test) if any, accuracy per million parameters, forward
FLOPs per answer and measured answers per second. FLOPs count every position a problem's row runs
through the model, latent and chain positions included: 2 * (matmul parameters) per position plus
attention's 2 * 2 * dim per (query, key) pair of each layer, causal (T (T + 1) / 2 pairs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ...nanollama.config import ConfigError, build_config, cli_main, read_yaml
from ...nanollama.monitor.logger import read_jsonl
from .data import MultiplicationTokenizer, collate, make_problem
from .modes import Schedule
from .train import TrainConfig, build_model, load_tokenizer


def row_length(cfg: TrainConfig, tok: MultiplicationTokenizer) -> int:
    """Tokens (and latent positions) of a problem's row at the run's last stage."""
    schedule = Schedule(cfg.train, cfg.data)
    p = make_problem(10 ** (cfg.data.k - 1), 10 ** (cfg.data.m - 1), cfg.data.k, cfg.data.m)
    stage = schedule.stage(cfg.optim.steps - 1)
    return collate([p], tok, [schedule.layout(stage)])[0].shape[1]


def forward_flops(cfg: TrainConfig, matmul_params: int, T: int) -> float:
    return 2 * matmul_params * T + 4 * cfg.model.n_layers * cfg.model.dim * T * (T + 1) / 2


def summarize(run: Path) -> dict:
    if not (run / "config.yaml").is_file():
        raise ConfigError(str(run), "not a run folder (no config.yaml)")
    cfg = build_config(TrainConfig, read_yaml(run / "config.yaml"))
    tok = load_tokenizer(cfg)
    with torch.device("meta"):
        model = build_model(cfg, training=False, device=torch.device("meta"))
    params = sum(p.numel() for p in model.parameters())
    matmul = params - model.tok_embeddings.weight.numel()  # an embedding lookup is no matmul
    evals = (
        read_jsonl(run / "metrics" / "eval_0.jsonl") if (run / "metrics" / "eval_0.jsonl").is_file() else []
    )
    valid = [e for e in evals if e.get("split", "valid") == "valid"]
    test = [e for e in evals if e.get("split") == "test"]
    T = row_length(cfg, tok)
    last = valid[-1] if valid else {}
    return {
        "run": run.name,
        "mode": cfg.train.mode + (f"/{cfg.train.latent.kind}" if cfg.train.mode == "latent" else ""),
        "task": f"{cfg.data.k}x{cfg.data.m}",
        "params": params,
        "best acc": max((e["accuracy"] for e in valid), default=float("nan")),
        "last acc": last.get("accuracy", float("nan")),
        "best loss": min((e["loss"] for e in valid), default=float("nan")),
        "last loss": last.get("loss", float("nan")),
        "test acc": test[-1]["accuracy"] if test else float("nan"),
        "acc/Mparam": last.get("accuracy", float("nan")) / (params / 1e6),
        "positions": T,
        "FLOPs/answer": forward_flops(cfg, matmul, T),
        "answers/s": (test or valid or [{}])[-1].get("answers_per_s", float("nan")),
    }


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value or abs(value) >= 1e4 or 0 < abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def table(rows: list[dict]) -> str:
    cells = [list(rows[0])] + [[_cell(v) for v in r.values()] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    runs = sys.argv[1:] if argv is None else argv
    if not runs:
        raise ConfigError("RUN", "usage: python -m src.apps.multiplication.compare RUN [RUN ...]")
    rows = [summarize(Path(r)) for r in runs]
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
