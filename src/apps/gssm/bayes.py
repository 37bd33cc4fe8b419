"""The Bayes-optimal loss of a GSSM: exact log p(x_t | x_<t), forward algorithm over the joint hidden state.

The joint hidden state H stacks the hidden nodes that are ancestors of the observed node (the others never
influence the tokens, so they are marginalised out for free). One time step applies each node's
conditional p(z_i(t) | z_i(t-1), parents(t)) in topological order: when node i is updated, its parents
already hold their time-t values and it still holds its own time-(t-1) value, so the product of these
node updates is exactly the joint transition T[H_prev, H_next]. Small graphs multiply by the materialised
T (one BLAS call per step); larger ones apply the node updates one by one, which costs B * N * sum_i d_i
per step instead of B * N^2, and never holds an (N, N) matrix.
"""

from __future__ import annotations

import math

import numpy as np

from .generator import GSSM, Node, Sample, conditional_table

MAX_JOINT_STATES = 4096  # above this the exact forward pass is deemed too expensive
JOINT_MATRIX_STATES = 512  # up to this many joint states, step with the materialised T[H_prev, H_next]
JOINT_MATRIX_ENTRIES = 1 << 22  # per-sequence T (context hidden nodes): materialise if B * N^2 fits
LIKELIHOOD_CHUNK = 1 << 21  # entries of emission likelihoods (B, steps, N) gathered at once


def relevant_hidden(gssm: GSSM) -> list[Node]:
    """Hidden ancestors of the observed node, in topological order."""
    needed, frontier = set(), list(gssm.observed.inputs)
    while frontier:
        name = frontier.pop()
        if name not in needed:
            needed.add(name)
            frontier.extend(gssm.node(name).inputs)
    return [node for node in gssm.hidden if node.name in needed]


def joint_size(gssm: GSSM) -> int:
    """N, the number of joint hidden states of the forward pass; ValueError if too many to be exact."""
    n = math.prod(node.dim for node in relevant_hidden(gssm))
    if n > MAX_JOINT_STATES:
        raise ValueError(
            f"exact Bayes loss needs the joint hidden state of {n} states (> {MAX_JOINT_STATES}): "
            "use fewer or smaller hidden nodes"
        )
    return n


def conditional_logprobs(gssm: GSSM, sample: Sample, method: str = "auto") -> np.ndarray:
    """log p(x_t | x_<t) under the true model, (B, T) float64, for the tokens of `sample`.

    Context nodes use the per-sequence kernels that drew `sample` (`sample.kernels`): this is an oracle
    that knows each sequence's kernels, hence a lower bound on what in-context learning can reach.
    `method`: "joint" (materialised T), "factored" (node by node) or "auto" (joint when small).
    """
    hidden = relevant_hidden(gssm)
    n = joint_size(gssm)
    tokens = sample.tokens
    B, T = tokens.shape
    step = _transition(gssm, sample, hidden, B, n, method)
    alpha = np.full((B, n), 1.0 / n)  # t = -1: independent uniform previous states
    a, ones, norms = np.empty((B, n)), np.ones(n), np.empty((T, B))
    for lo, lik in _emission_chunks(gssm, sample, hidden, n):
        for s, lik_t in enumerate(lik):
            step(alpha, a)
            a *= lik_t
            norm = np.matmul(a, ones, out=norms[lo + s])
            np.divide(a, norm[:, None], out=alpha)
    with np.errstate(divide="ignore"):
        return np.log(norms).T


def bayes_loss(gssm: GSSM, sample: Sample) -> float:
    """Mean -log p(x_t | x_<t) over positions 1..T-1, the targets of a causal LM fed tokens[:, :-1]."""
    return float(-conditional_logprobs(gssm, sample)[:, 1:].mean())


def _node_tensor(gssm: GSSM, node: Node, sample: Sample) -> np.ndarray:
    """p(z | inputs), one axis per input then the node's own axis; a leading batch axis if per sequence."""
    table = conditional_table(node, gssm.node_kernels(node.name, sample))
    return table.reshape(table.shape[:-2] + node.in_dims + (node.dim,))


def _transition(gssm: GSSM, sample: Sample, hidden: list[Node], B: int, n: int, method: str):
    """A function alpha (B, N) -> alpha @ T, with T fixed or per sequence."""
    dims = tuple(node.dim for node in hidden)
    tensors = [_node_tensor(gssm, node, sample) for node in hidden]
    per_sequence = any(t.ndim == len(node.in_dims) + 2 for t, node in zip(tensors, hidden))
    if method == "auto":
        small = B * n * n <= JOINT_MATRIX_ENTRIES if per_sequence else n <= JOINT_MATRIX_STATES
        method = "joint" if small else "factored"

    def factored(alpha: np.ndarray) -> np.ndarray:
        """alpha (B, M, *dims): apply every hidden node's update in topological order."""
        labels = list(range(2 + len(hidden)))  # 0: batch, 1: M, 2 + i: hidden node i
        new = len(labels)
        for i, (node, tensor) in enumerate(zip(hidden, tensors)):
            inputs = [2 + next(k for k, h in enumerate(hidden) if h.name == name) for name in node.inputs]
            sub = ([0] if tensor.ndim == len(node.in_dims) + 2 else []) + inputs + [new]
            out = [new if label == 2 + i else label for label in labels]
            alpha = np.einsum(alpha, labels, tensor, sub, out)
        return alpha

    if method == "factored":

        def step(alpha: np.ndarray, out: np.ndarray) -> None:
            out[...] = factored(alpha.reshape((B, 1) + dims)).reshape(B, n)

        return step
    if method != "joint":
        raise ValueError(f"unknown method '{method}' (expected auto, joint or factored)")
    eye = np.broadcast_to(np.eye(n).reshape((1, n) + dims), ((B if per_sequence else 1), n) + dims)
    joint = np.ascontiguousarray(factored(eye).reshape(-1, n, n))  # BLAS needs contiguous operands
    if per_sequence:
        return lambda alpha, out: np.matmul(alpha[:, None, :], joint, out=out[:, None, :])
    return lambda alpha, out: np.matmul(alpha, joint[0], out=out)


def _emission_chunks(gssm: GSSM, sample: Sample, hidden: list[Node], n: int):
    """Yield (t0, lik) with lik[s, b, H] = p(x[b, t0 + s] | H), a few steps at a time to bound memory."""
    obs = gssm.observed
    table = conditional_table(obs, gssm.node_kernels(obs.name, sample))  # (..., parent rows, V)
    table = np.swapaxes(table.reshape((-1,) + table.shape[-2:]), 1, 2)  # (1 or B, V, parent rows)
    # Parent row of every joint hidden state: unravel H over the hidden dims, re-ravel over the parents.
    coords = np.indices(tuple(node.dim for node in hidden)).reshape(len(hidden), n)
    position = {node.name: i for i, node in enumerate(hidden)}
    parent_row = sum(
        (coords[position[name]] * s for name, s in zip(obs.inputs, obs.strides)), np.zeros(n, int)
    )
    expand = not np.array_equal(parent_row, np.arange(n))
    if len(table) == 1:  # fixed emission: spread it over H once
        table = table[:, :, parent_row] if expand else table
        expand = False
    tokens = sample.tokens.T
    T, B = tokens.shape
    seq = np.arange(B) if len(table) > 1 else np.zeros(B, int)
    steps = max(1, LIKELIHOOD_CHUNK // (B * n))
    for lo in range(0, T, steps):
        lik = table[seq, tokens[lo : lo + steps]]  # (steps, B, parent rows or N)
        yield lo, lik[..., parent_row] if expand else lik


def filtered_marginals(gssm: GSSM, sample: Sample) -> dict[str, np.ndarray]:
    """p(z_t | x_<=t) per hidden ancestor of the tokens, (B, T, state_dim): the forward algorithm of
    `bayes.conditional_logprobs`, keeping the normalised joint state and summing it onto each node."""
    hidden = relevant_hidden(gssm)
    n, dims = joint_size(gssm), tuple(node.dim for node in hidden)
    B, T = sample.tokens.shape
    step = _transition(gssm, sample, hidden, B, n, "auto")
    alpha, a = np.full((B, n), 1.0 / n), np.empty((B, n))
    out = {node.name: np.empty((B, T, node.dim)) for node in hidden}
    for lo, lik in _emission_chunks(gssm, sample, hidden, n):
        for s, lik_t in enumerate(lik):
            step(alpha, a)
            a *= lik_t
            np.divide(a, a.sum(1, keepdims=True), out=alpha)
            joint = alpha.reshape((B, *dims))
            for i, node in enumerate(hidden):
                others = tuple(1 + j for j in range(len(hidden)) if j != i)
                out[node.name][:, lo + s] = joint.sum(axis=others)
    return out
