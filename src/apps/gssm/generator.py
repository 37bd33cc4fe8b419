"""Sampling sequences from a GSSM, and writing train/test datasets with their Bayes-optimal log-probs.

Semantics: a hidden node at time t is drawn from p(z_i(t) | z_i(t-1), parents(t)); the observed node
from p(x(t) | parents(t)). Inputs are [self-previous (hidden only)] + parents in declared order, and
at t=0 a hidden node's previous state is uniform. Kernel rows are Dirichlet(alpha):
- `fullrank`: one kernel over the joint input, (prod of input dims, state_dim);
- `product`: one kernel per input, (d_input, state_dim), p(z | inputs) ∝ prod_j K_j[input_j, z].
Modes: `slow` puts each row's argmax on the diagonal, `dead` on one fixed column, `context` re-draws
the node's kernels for every sequence (from the sampling RNG, not from `GSSMConfig.seed`).

Speed: the loop runs over time and hidden nodes only, vectorised over the batch; the observed node is
conditionally independent across time given the hidden states, so it is drawn in one shot. Draws use
Walker's alias method (one uniform, two gathers, no branches): inverse-CDF search costs a branch
misprediction per bisection step and was 3-10x slower here. Per-sequence (context) tables are stacked
into one flat table indexed with a per-sequence offset, so they take the same path as fixed ones.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .graph import GSSMConfig, NodeConfig, topological_order

# Largest conditional table (entries, all sequences together) a product node materialises; beyond it the
# node's probabilities are computed on the fly from its per-input kernels at every step.
TABLE_LIMIT = 1 << 22


@dataclass
class Sample:
    tokens: np.ndarray  # (B, T) int64, observed node states
    hidden: dict[str, np.ndarray]  # name -> (B, T) int64 hidden states (for linear probes)
    kernels: dict[str, list[np.ndarray]]  # context node -> its kernels, each with a leading batch dim


@dataclass(frozen=True)
class Node:
    """A node with its inputs resolved: [itself (previous state), if hidden] + parents in declared order."""

    cfg: NodeConfig
    inputs: tuple[str, ...]
    in_dims: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def dim(self) -> int:
        return self.cfg.state_dim

    @property
    def n_rows(self) -> int:
        """Rows of the joint conditional table: one per joint input (1 for a node without inputs)."""
        return math.prod(self.in_dims)

    @property
    def strides(self) -> tuple[int, ...]:
        """Mixed-radix strides turning the inputs into a row index (first input most significant)."""
        return tuple(math.prod(self.in_dims[j + 1 :]) for j in range(len(self.in_dims)))

    @property
    def kernel_shapes(self) -> list[tuple[int, int]]:
        if self.cfg.kernel_type == "fullrank" or not self.inputs:
            return [(self.n_rows, self.dim)]
        return [(d, self.dim) for d in self.in_dims]


def resolve_nodes(cfg: GSSMConfig) -> list[Node]:
    """The nodes in topological order with their inputs."""
    dims = {node.name: node.state_dim for node in cfg.nodes}
    resolved = []
    for node in topological_order(cfg.nodes):
        inputs = tuple(node.parents) if node.observed else (node.name, *node.parents)
        resolved.append(Node(node, inputs, tuple(dims[name] for name in inputs)))
    return resolved


# ----------------------------------------------------------------------------------------------------------
# Kernels


def _node_rng(seed: int, name: str) -> np.random.Generator:
    """One stream per node, so editing one node of a graph leaves the other nodes' kernels unchanged."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _swap_max_into(kernel: np.ndarray, columns: np.ndarray) -> None:
    """In place: swap each row's largest entry with the one in `columns[row]`, which becomes the argmax."""
    target = np.broadcast_to(columns[:, None], kernel.shape[:-1] + (1,))
    top = kernel.argmax(-1)[..., None]
    top_value = np.take_along_axis(kernel, top, -1)
    target_value = np.take_along_axis(kernel, target, -1)
    np.put_along_axis(kernel, top, target_value, -1)
    np.put_along_axis(kernel, target, top_value, -1)


def draw_kernels(
    node: Node, rng: np.random.Generator, batch: tuple[int, ...] = (), dead_column: int | None = None
) -> list[np.ndarray]:
    """Dirichlet(alpha) rows for every kernel of `node`, with `batch` leading dims, then the mode's argmax
    constraint (`slow`: diagonal, `dead`: `dead_column`)."""
    concentration = np.full(node.dim, float(node.cfg.alpha))
    kernels = [rng.dirichlet(concentration, size=batch + (rows,)) for rows, _ in node.kernel_shapes]
    for kernel in kernels:
        if node.cfg.mode == "slow":
            _swap_max_into(kernel, np.arange(node.dim))
        elif node.cfg.mode == "dead":
            _swap_max_into(kernel, np.full(kernel.shape[-2], dead_column))
    return kernels


def normalise_log(logp: np.ndarray) -> np.ndarray:
    """exp-normalise along the last axis; rows with no mass at all (tiny alpha) become uniform."""
    top = logp.max(-1, keepdims=True)
    empty = ~np.isfinite(top)
    p = np.exp(logp - np.where(empty, 0.0, top))
    p = np.where(empty, 1.0, p)
    return p / p.sum(-1, keepdims=True)


def _log(kernel: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(kernel)


def conditional_table(node: Node, kernels: list[np.ndarray]) -> np.ndarray:
    """p(z | inputs) as (..., n_rows, dim), rows in the mixed-radix order of `Node.strides`."""
    if len(kernels) == 1 and kernels[0].shape[-2] == node.n_rows:
        return kernels[0]
    batch = kernels[0].shape[:-2]
    logp = np.zeros(batch + node.in_dims + (node.dim,))
    for j, kernel in enumerate(kernels):
        shape = batch + tuple(d if i == j else 1 for i, d in enumerate(node.in_dims)) + (node.dim,)
        logp = logp + _log(kernel).reshape(shape)
    return normalise_log(logp).reshape(batch + (node.n_rows, node.dim))


# ----------------------------------------------------------------------------------------------------------
# Samplers. `bind(u)` takes the uniforms (T, B) of one node and returns `draw(rows, t, out)`, which samples
# the node at time(s) t given its inputs' joint row index times `row_scale` (int or slice t; out optional).


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias tables for every row of p (n, d), vectorised over rows.

    Column k is kept with probability prob[k] and otherwise replaced by alias[k]. Built by the "sweep" of
    Hübschle-Schneider & Sanders (2019): lights (p * d < 1) are filled in order by heavies in order, heavy j
    taking over while the cumulative excess S_j of heavies up to j exceeds the cumulative deficit D of the
    lights filled so far; once it does not, heavy j keeps 1 + S_j - D and is itself filled by heavy j + 1.
    Both "which heavy" questions are one stable sort per row of the merged S and D keys.
    """
    n, d = p.shape
    q = p * d
    heavy = q >= 1.0
    heavy[np.arange(n), q.argmax(1)] = True  # rounding could leave a row without any q >= 1
    order = np.argsort(heavy, axis=1, kind="stable")  # lights first, then heavies
    qs = np.take_along_axis(q, order, 1)
    n_light = (d - heavy.sum(1))[:, None]
    is_light = np.arange(d) < n_light
    deficit = np.cumsum(np.where(is_light, 1.0 - qs, 0.0), 1)
    D = np.concatenate([np.zeros((n, 1)), deficit], 1)  # D[c]: deficit of the first c lights
    S = np.where(is_light, -1.0, np.cumsum(np.where(is_light, 0.0, qs - 1.0), 1))  # lights: below every D
    keys_order = np.argsort(np.concatenate([S, D], 1), axis=1, kind="stable")  # ties: S before D
    n_S_so_far = np.cumsum(keys_order < d, 1)
    rank = np.empty_like(keys_order)
    np.put_along_axis(rank, keys_order, np.broadcast_to(np.arange(2 * d + 1), rank.shape), 1)
    # Light number k (deficit D[k] before it) goes to the first heavy with S > D[k].
    n_S_le_D = np.take_along_axis(n_S_so_far, rank[:, d : 2 * d], 1) - n_light
    light_alias = n_light + n_S_le_D
    # Heavy m is done after c = #{D[c] < S_m} lights and keeps 1 + S_m - D[c]; its alias is the next heavy.
    n_D_lt_S = rank[:, :d] + 1 - np.take_along_axis(n_S_so_far, rank[:, :d], 1)
    done_after = np.minimum(n_D_lt_S, n_light)
    heavy_prob = np.clip(1.0 + S - np.take_along_axis(D, done_after, 1), 0.0, 1.0)
    prob_sorted = np.where(is_light, qs, heavy_prob)
    prob_sorted[:, -1] = 1.0  # the last heavy has nothing left to give to
    alias_sorted = np.minimum(np.where(is_light, light_alias, np.arange(1, d + 1)), d - 1)
    prob, alias = np.empty_like(q), np.empty_like(order)
    np.put_along_axis(prob, order, prob_sorted, 1)
    np.put_along_axis(alias, order, np.take_along_axis(order, alias_sorted, 1), 1)
    return prob, alias


class AliasSampler:
    """O(1), branch-free sampling from a materialised table (n_rows, dim), or one per sequence
    (B, n_rows, dim): one uniform picks a column and, with its remaining bits, keeps it or takes its alias."""

    def __init__(self, table: np.ndarray):
        self.per_sequence = table.ndim == 3
        self.n_rows, self.dim = table.shape[-2:]
        prob, alias = alias_table(table.reshape(-1, self.dim))
        self.prob, self.alias = prob.ravel(), alias.ravel()
        self.row_scale = self.dim

    def bind(self, u: np.ndarray) -> Callable[..., np.ndarray]:
        scaled = u * self.dim
        cols = np.minimum(scaled.astype(np.int64), self.dim - 1)
        frac = scaled - cols
        keys = cols + np.arange(u.shape[-1]) * (self.n_rows * self.dim) if self.per_sequence else cols
        prob, alias, copyto = self.prob, self.alias, np.copyto

        def draw(rows: np.ndarray, t: int | slice, out: np.ndarray | None = None) -> np.ndarray:
            index = rows + keys[t]
            out = alias.take(index, out=out)
            copyto(out, cols[t], where=frac[t] < prob.take(index))
            return out

        return draw


class ProductSampler:
    """On-the-fly p(z | inputs) ∝ prod_j K_j[input_j, z], for product nodes too large to materialise."""

    def __init__(self, kernels: list[np.ndarray], strides: tuple[int, ...], in_dims: tuple[int, ...]):
        self.per_sequence = kernels[0].ndim == 3
        self.log_kernels = [_log(k) for k in kernels]
        self.strides, self.in_dims = strides, in_dims
        self.chunk = max(1, (1 << 20) // kernels[0].shape[-1])  # draws per step of the loop below
        self.row_scale = 1

    def bind(self, u: np.ndarray) -> Callable[..., np.ndarray]:
        seq = np.broadcast_to(np.arange(u.shape[-1]), u.shape)

        def draw(rows: np.ndarray, t: int | slice, out: np.ndarray | None = None) -> np.ndarray:
            result = self._draw(rows.ravel(), u[t].ravel(), seq[t].ravel()).reshape(rows.shape)
            if out is not None:
                out[...] = result
            return result

        return draw

    def _draw(self, rows: np.ndarray, u: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Inverse CDF of the normalised product, a chunk of draws at a time to bound memory."""
        result = np.empty(rows.shape, np.int64)
        for lo in range(0, len(rows), self.chunk):
            sl = slice(lo, lo + self.chunk)
            logp = 0.0
            for log_kernel, stride, d in zip(self.log_kernels, self.strides, self.in_dims):
                index = rows[sl] // stride % d
                logp = logp + (log_kernel[seq[sl], index] if self.per_sequence else log_kernel[index])
            cdf = np.cumsum(normalise_log(logp), axis=1)
            result[sl] = (u[sl, None] >= cdf[:, :-1]).sum(1)
        return result


def make_sampler(node: Node, kernels: list[np.ndarray]) -> AliasSampler | ProductSampler:
    batch = math.prod(kernels[0].shape[:-2])
    if len(kernels) > 1 and batch * node.n_rows * node.dim > TABLE_LIMIT:
        return ProductSampler(kernels, node.strides, node.in_dims)
    return AliasSampler(conditional_table(node, kernels))


# ----------------------------------------------------------------------------------------------------------
# The model


class GSSM:
    """The true model: fixed kernels drawn from `cfg.seed`; `sample` draws sequences (and context kernels)."""

    def __init__(self, cfg: GSSMConfig):
        cfg.check()
        self.cfg = cfg
        self.nodes = resolve_nodes(cfg)
        self.observed = next(node for node in self.nodes if node.cfg.observed)
        self.hidden = [node for node in self.nodes if not node.cfg.observed]
        self.hidden_names = [node.name for node in self.hidden]
        self.vocab_size = self.observed.dim
        self.dead_columns: dict[str, int] = {}
        self.kernels: dict[str, list[np.ndarray]] = {}
        for node in self.nodes:
            rng = _node_rng(cfg.seed, node.name)
            if node.cfg.mode == "dead":
                self.dead_columns[node.name] = int(rng.integers(node.dim))
            if node.cfg.mode != "context":
                self.kernels[node.name] = draw_kernels(
                    node, rng, dead_column=self.dead_columns.get(node.name)
                )
        self._samplers = {name: make_sampler(self.node(name), k) for name, k in self.kernels.items()}

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def node_kernels(self, name: str, sample: Sample | None = None) -> list[np.ndarray]:
        """The kernels that generated `sample` for node `name`: per sequence for context nodes."""
        if name in self.kernels:
            return self.kernels[name]
        if sample is None or name not in sample.kernels:
            raise ValueError(
                f"context node '{name}' has per-sequence kernels: pass the sample that drew them"
            )
        return sample.kernels[name]

    def sample(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> Sample:
        """Draw `batch_size` sequences; `rng`'s state alone determines the result (context kernels, then the
        initial states, then one uniform per sequence, node and step)."""
        B, T = batch_size, seq_len
        context = {
            node.name: draw_kernels(node, rng, (B,)) for node in self.nodes if node.cfg.mode == "context"
        }
        samplers = {
            **self._samplers,
            **{name: make_sampler(self.node(name), k) for name, k in context.items()},
        }
        states = {node.name: np.empty((T + 1, B), np.int64) for node in self.hidden}
        for node in self.hidden:
            states[node.name][0] = rng.integers(node.dim, size=B)
        u = rng.random((len(self.nodes), T, B))
        draws = {node.name: samplers[node.name].bind(u[i]) for i, node in enumerate(self.nodes)}
        self._run_hidden(states, samplers, draws, T)
        obs = self.observed
        scale = samplers[obs.name].row_scale
        rows = np.zeros((T, B), np.int64)
        for name, stride in zip(obs.inputs, obs.strides):
            rows += states[name][1:] * (stride * scale)
        tokens = draws[obs.name](rows, slice(None)).T.copy()
        hidden = {name: states[name][1:].T.copy() for name in self.hidden_names}
        return Sample(tokens=tokens, hidden=hidden, kernels=context)

    def _run_hidden(self, states: dict[str, np.ndarray], samplers: dict, draws: dict, T: int) -> None:
        """The sequential part: hidden nodes step by step, parents before children within a step.

        Hidden states are (T + 1, B): row 0 holds the uniform previous state of t = 0, row t + 1 time t.
        """
        plans = []
        for node in self.hidden:
            scale = samplers[node.name].row_scale
            strides = [stride * scale for stride in node.strides]
            parents = [(states[name][1:], stride) for name, stride in zip(node.inputs[1:], strides[1:])]
            plans.append((states[node.name], strides[0], parents, draws[node.name]))
        for t in range(T):
            for own, own_stride, parents, draw in plans:
                rows = own[t] * own_stride
                for parent, stride in parents:
                    rows += parent[t] * stride
                draw(rows, t, own[t + 1])


# ----------------------------------------------------------------------------------------------------------
# Datasets


def split_rng(seed: int, split: str) -> np.random.Generator:
    """An independent stream per split name: train and test never draw from the same stream, and adding a
    split leaves the others unchanged."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(split.encode()),)))
