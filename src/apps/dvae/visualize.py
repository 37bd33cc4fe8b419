"""Figures of a dVAE checkpoint: held-out grids beside their reconstructions, and the codebook's usage.

    python -m src.apps.dvae.visualize run=<run log dir> [out=<file.html>] [checkpoint=<checkpoint dir>]
        [split=valid|test] [n_grids=8] [max_grids=-1]

The model is the run's latest checkpoint (or `checkpoint`), loaded as `eval.py` does (with
`evaluation.use_ema` in the run's config: its EMA weights); codes are the argmax codes. `grids`: the first
`n_grids` grids of the split, in evaluation order (whole pairs first), each as two heatmaps in the ARC
palette (pads and non-colour tokens blank). `codebook`: how often each code is taken over the split's
first `max_grids` grids (0: all; -1, the default: the run's `evaluation.max_grids`, so that the figures
count the grids its eval lines count), sorted, with the usage share and perplexity of `evaluation.py`. Both
figures go to one self-contained HTML file (plotly.js inlined: it opens offline), by default
`<run>/figures/dvae.html`; `notebooks/dvae.ipynb` draws the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...nanollama.config import ConfigError, entrypoint, load_config
from ...nanollama.distributed import Cluster
from ...nanollama.extras import require
from ...nanollama.monitor.checkpoint import checkpoint_step, load_model_weights
from ...nanollama.trainer import checkpoint_to_evaluate
from .data import INPUT, GridSet, deserialise, load_grids, serialise
from .eval import EvalRunConfig
from .evaluation import Tally, eval_units
from .model import DVAE
from .train import build_model

if TYPE_CHECKING:
    import plotly.graph_objects as go

FEATURE = "src.apps.dvae.visualize"  # needs plotly (the notebooks extra), imported on use

# The ARC palette, in the order of evaluation.PALETTE: black, blue, red, green, yellow, grey, magenta,
# orange, light blue, maroon.
ARC_COLOURS = (
    "#000000",
    "#0074D9",
    "#FF4136",
    "#2ECC40",
    "#FFDC00",
    "#AAAAAA",
    "#F012BE",
    "#FF851B",
    "#7FDBFF",
    "#870C25",
)
# discrete: colour c fills [c - 0.5, c + 0.5] of z in [-0.5, 9.5]
COLOURSCALE = [[(c + edge) / len(ARC_COLOURS), hex_] for c, hex_ in enumerate(ARC_COLOURS) for edge in (0, 1)]


def load_model(run: str | Path, checkpoint: str = "") -> tuple[EvalRunConfig, DVAE, int]:
    """(the run's config, its model in eval mode with the checkpoint's weights, the checkpoint's step):
    the latest checkpoint unless `checkpoint` is given. Bad input is a ConfigError, as for eval.py."""
    argv = [f"config={Path(run) / 'config.yaml'}", f"orchestration.log_dir={run}"]
    cfg = load_config(EvalRunConfig, argv + ([f"checkpoint={checkpoint}"] if checkpoint else []))
    path = checkpoint_to_evaluate(cfg, cfg.checkpoint)
    model = build_model(cfg, Cluster(cfg.cluster).device)
    load_model_weights(path, model, ema=getattr(cfg.evaluation, "use_ema", False))  # as eval.py
    return cfg, model.eval(), checkpoint_step(path)


def grid_order(grids: GridSet, max_grids: int = 0) -> list[int]:
    """The split's grids in evaluation order: whole pairs (input, output) first, then the lone grids."""
    return [i for unit in eval_units(grids, max_grids) for i in unit]


@torch.no_grad()
def argmax_codes(
    model: DVAE, grids: GridSet, index: list[int], max_size: int, batch_size: int = 64
) -> tuple[np.ndarray, list[list[list[int]]]]:
    """Codes (G, N) of the grids `index` and their reconstructions (rows of colours, -1: not a colour)."""
    vocab = model.cfg.vocab
    device = next(model.parameters()).device
    codes, recons = [], []
    for b in range(0, len(index), batch_size):
        rows = [serialise(grids.grid(i), vocab, max_size) for i in index[b : b + batch_size]]
        recon, _, c = model(torch.from_numpy(np.stack(rows)).to(device), kind="argmax")
        codes.append(c.cpu().numpy())
        recons += [deserialise(p, vocab) for p in recon.argmax(-1).cpu().tolist()]
    return np.concatenate(codes) if codes else np.zeros((0, model.cfg.n_latents), np.int64), recons


def code_counts(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """(K,) how often each code is taken, over every grid and latent position of `codes` (G, N)."""
    return np.bincount(np.asarray(codes).ravel(), minlength=n_codes)


def codebook_stats(counts: np.ndarray) -> dict[str, float]:
    """`codebook_usage` (share of the K codes taken) and `codebook_perplexity`, as evaluation.py has them."""
    tally = Tally(len(counts))
    tally.code_counts = np.asarray(counts, dtype=float)
    metrics = tally.metrics()
    return {key: metrics[key] for key in ("codebook_usage", "codebook_perplexity")}


def as_image(rows: list[list[int]]) -> np.ndarray:
    """Ragged rows of colours -> a float array, NaN (drawn blank) past a row's end and for -1."""
    width = max((len(r) for r in rows), default=0)
    image = np.full((len(rows), width), np.nan)
    for r, row in enumerate(rows):
        image[r, : len(row)] = row
    image[image < 0] = np.nan
    return image


def _plotly(module: str = "graph_objects") -> Any:
    return require(f"plotly.{module}", "notebooks", FEATURE)


def heatmap(rows: list[list[int]], name: str) -> go.Heatmap:
    return _plotly().Heatmap(
        z=as_image(rows),
        name=name,
        colorscale=COLOURSCALE,
        zmin=-0.5,
        zmax=len(ARC_COLOURS) - 0.5,
        showscale=False,
        xgap=1,
        ygap=1,
        hovertemplate="row %{y}, column %{x}: colour %{z}<extra></extra>",
    )


def grids_figure(
    grids: GridSet, index: list[int], recons: list[list[list[int]]], codes: np.ndarray, title: str = ""
) -> go.Figure:
    """One row per grid: the original and its reconstruction, two heatmaps (2 traces a grid)."""
    titles = []
    for i, recon in zip(index, recons):
        original = grids.grid(i).tolist()
        role = "input" if grids.roles[i] == INPUT else "output"
        h, w = grids.shapes[i]
        verdict = "exact" if recon == original else "differs"
        titles += [f"{grids.task_ids[grids.tasks[i]]} {role} {h}x{w}", f"reconstruction ({verdict})"]
    rows, height = max(len(index), 1), max(260 * len(index), 300)
    fig = _plotly("subplots").make_subplots(
        rows=rows, cols=2, subplot_titles=titles, vertical_spacing=40 / height
    )
    for k, (i, recon, c) in enumerate(zip(index, recons, codes)):
        fig.add_trace(heatmap(grids.grid(i).tolist(), "original"), row=k + 1, col=1)
        fig.add_trace(heatmap(recon, "reconstruction"), row=k + 1, col=2)
        fig.layout.annotations[2 * k + 1].hovertext = f"codes {c.tolist()}"
    fig.update_yaxes(autorange="reversed", showticklabels=False, constrain="domain")
    fig.update_xaxes(showticklabels=False, constrain="domain")
    for n in range(1, 2 * len(index) + 1):  # square cells in every panel
        fig.update_yaxes(scaleanchor=f"x{n if n > 1 else ''}", row=(n + 1) // 2, col=2 - n % 2)
    fig.update_layout(title=title, height=height, width=620)
    return fig


def codebook_figure(counts: np.ndarray, title: str = "") -> go.Figure:
    """Codes sorted by how often they are taken: a bar each, the code's id on the axis."""
    order = np.argsort(-counts, kind="stable")
    stats = codebook_stats(counts)
    graph = _plotly()
    fig = graph.Figure(graph.Bar(x=[str(c) for c in order], y=counts[order], name="code uses"))
    used = int((counts > 0).sum())
    fig.update_layout(
        title=f"{title}codebook: {used} of {len(counts)} codes used (usage {stats['codebook_usage']:.3f}), "
        f"perplexity {stats['codebook_perplexity']:.2f}",
        xaxis=dict(title="code (sorted by use)", type="category"),
        yaxis=dict(title="uses (grids x latent positions)"),
    )
    return fig


def figures(
    model: DVAE, grids: GridSet, max_size: int, n_grids: int = 8, max_grids: int = 0, title: str = ""
) -> dict[str, go.Figure]:
    """{"grids": the first `n_grids` grids beside their reconstructions, "codebook": the code counts over
    the first `max_grids` grids (0: all)}."""
    index = grid_order(grids, max_grids)
    codes, recons = argmax_codes(model, grids, index, max_size)
    n = min(n_grids, len(index))
    drawn = grids_figure(grids, index[:n], recons[:n], codes[:n], f"{title}originals | reconstructions")
    return {"grids": drawn, "codebook": codebook_figure(code_counts(codes, model.cfg.n_codes), title)}


def write_html(figs: dict[str, go.Figure], path: str | Path, title: str = "dVAE") -> Path:
    """All figures in one self-contained HTML file (plotly.js inlined once: it opens offline)."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figs.values())]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f'<head><meta charset="utf-8"><title>{title}</title></head>'
    path.write_text(f"<html>{head}<body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return path


@dataclass
class VisualizeConfig:
    run: str = ""  # the run folder (its config.yaml and checkpoints)
    out: str = ""  # the HTML file; empty: <run>/figures/dvae.html
    checkpoint: str = ""  # a checkpoint folder; empty: the run's latest
    split: str = "valid"  # valid | test (held-out eval tasks)
    n_grids: int = 8  # grids drawn beside their reconstructions
    max_grids: int = -1  # grids whose codes are counted (0: the whole split; -1: evaluation.max_grids)

    def check(self) -> None:
        require("plotly", "notebooks", FEATURE)
        if not (Path(self.run) / "config.yaml").is_file():
            raise ConfigError("run", f"'{self.run}' is not a run folder (no config.yaml)")
        if self.split not in ("valid", "test"):
            raise ConfigError("split", f"must be valid or test, got {self.split!r}")
        for key, low in (("n_grids", 1), ("max_grids", -1)):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")


def visualize(cfg: VisualizeConfig) -> Path:
    run_cfg, model, step = load_model(cfg.run, cfg.checkpoint)
    grids = load_grids(run_cfg.data, cfg.split)
    title = f"{run_cfg.orchestration.name} step {step}, {cfg.split}: "
    max_grids = run_cfg.evaluation.max_grids if cfg.max_grids < 0 else cfg.max_grids
    figs = figures(model, grids, run_cfg.data.max_size, cfg.n_grids, max_grids, title)
    path = write_html(figs, cfg.out or Path(cfg.run) / "figures" / "dvae.html", title.rstrip(": "))
    print(f"wrote {path}: {len(figs['grids'].data) // 2} grids, {figs['codebook'].layout.title.text}")
    return path


main = entrypoint(VisualizeConfig, visualize)

if __name__ == "__main__":
    main()
