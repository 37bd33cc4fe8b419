"""The exact forward pass against brute-force enumeration of every hidden path and every token sequence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from src.apps.gssm.bayes import bayes_loss, conditional_logprobs, joint_size
from src.apps.gssm.generator import GSSM, Sample
from src.apps.gssm.graph import GSSMConfig, NodeConfig

T = 4


def node_prob(gssm: GSSM, kernels: dict, name: str, inputs: tuple[int, ...], z: int) -> float:
    """p(z | inputs) by the definition of the kernel types, one scalar at a time."""
    node = gssm.node(name)
    if node.cfg.kernel_type == "fullrank" or not inputs:
        row = np.ravel_multi_index(inputs, node.in_dims) if inputs else 0
        return float(kernels[name][0][row, z])
    p = np.prod([kernel[i] for kernel, i in zip(kernels[name], inputs)], axis=0)
    return float(p[z] / p.sum())


def brute_force(gssm: GSSM, kernels: dict) -> tuple[np.ndarray, np.ndarray]:
    """All token sequences (V^T, T) and their probabilities, summing over every hidden path including the
    uniform previous state of t = 0."""
    hidden = gssm.hidden
    joint = list(itertools.product(*(range(node.dim) for node in hidden)))
    value = [dict(zip([node.name for node in hidden], h)) for h in joint]

    def inputs(node, prev: dict, cur: dict) -> tuple[int, ...]:
        return tuple(
            prev[name] if i == 0 and not node.cfg.observed else cur[name]
            for i, name in enumerate(node.inputs)
        )

    n = len(joint)
    transition = np.ones((n, n))
    for i, j in itertools.product(range(n), range(n)):
        for node in hidden:
            transition[i, j] *= node_prob(
                gssm, kernels, node.name, inputs(node, value[i], value[j]), value[j][node.name]
            )
    V, obs = gssm.vocab_size, gssm.observed
    emission = np.array(
        [[node_prob(gssm, kernels, obs.name, inputs(obs, h, h), x) for x in range(V)] for h in value]
    )
    paths = np.indices((n,) * (T + 1)).reshape(T + 1, -1).T  # (paths, T + 1) with the t = -1 state first
    weight = np.full(len(paths), 1.0 / n)
    for t in range(T):
        weight *= transition[paths[:, t], paths[:, t + 1]]
    xs = np.indices((V,) * T).reshape(T, -1).T  # (V^T, T)
    p = np.zeros(len(xs))
    for k, x in enumerate(xs):
        p[k] = (weight * np.prod(emission[paths[:, 1:], x], axis=1)).sum()
    return xs, p


GRAPHS = {
    "product": [
        NodeConfig("a", 2, kernel_type="product"),
        NodeConfig("b", 3, parents=["a"], kernel_type="product"),
        NodeConfig("x", 2, parents=["b", "a"], kernel_type="product", observed=True),
    ],
    "fullrank": [
        NodeConfig("a", 2, alpha=0.5),
        NodeConfig("b", 3, parents=["a"]),
        NodeConfig("x", 2, parents=["a", "b"], observed=True),
    ],
    "context hidden": [
        NodeConfig("a", 2, mode="slow"),
        NodeConfig("b", 3, parents=["a"], kernel_type="product", mode="context"),
        NodeConfig("x", 2, parents=["b"], observed=True),
    ],
    "context observed": [
        NodeConfig("b", 3, mode="dead"),
        NodeConfig("a", 2, parents=["b"]),
        NodeConfig("x", 2, parents=["a", "b"], kernel_type="product", observed=True, mode="context"),
    ],
}


@pytest.mark.parametrize("method", ["joint", "factored"])
@pytest.mark.parametrize("name", GRAPHS)
def test_forward_equals_brute_force(name, method):
    gssm = GSSM(GSSMConfig(nodes=GRAPHS[name], seed=5))
    # Context kernels: one draw, shared by every enumerated sequence.
    drawn = gssm.sample(1, T, np.random.default_rng(0)).kernels
    xs, p = brute_force(gssm, {**gssm.kernels, **{k: [v[0] for v in ks] for k, ks in drawn.items()}})
    per_sequence = {k: [np.repeat(v, len(xs), 0) for v in ks] for k, ks in drawn.items()}
    logprobs = conditional_logprobs(gssm, Sample(tokens=xs, hidden={}, kernels=per_sequence), method=method)
    assert logprobs.shape == xs.shape
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(logprobs.sum(1)), p, rtol=1e-10)
    # Each conditional, not just the product: log p(x_t | x_<t) = log p(x_<=t) - log p(x_<t).
    V = gssm.vocab_size
    marginals = [p.reshape((V,) * T).sum(axis=tuple(range(t, T))).reshape(-1) for t in range(T + 1)]
    for t in range(T):
        prefix = np.ravel_multi_index(xs[:, : t + 1].T, (V,) * (t + 1))
        expected = np.log(marginals[t + 1][prefix]) - (np.log(marginals[t][prefix // V]) if t else 0.0)
        np.testing.assert_allclose(logprobs[:, t], expected, rtol=1e-10, atol=1e-12)
    entropy = -(p * np.log(p)).sum() / T
    np.testing.assert_allclose(-(p * logprobs.sum(1)).sum() / T, entropy, rtol=1e-10)


def test_bayes_loss_skips_the_first_position():
    gssm = GSSM(GSSMConfig(nodes=GRAPHS["fullrank"]))
    sample = gssm.sample(8, 12, np.random.default_rng(0))
    assert bayes_loss(gssm, sample) == pytest.approx(-conditional_logprobs(gssm, sample)[:, 1:].mean())


def test_iid_tokens_have_the_kernel_logprobs():
    gssm = GSSM(GSSMConfig(nodes=[NodeConfig("x", 5, observed=True)]))
    sample = gssm.sample(3, 7, np.random.default_rng(0))
    expected = np.log(gssm.kernels["x"][0][0, sample.tokens])
    np.testing.assert_allclose(conditional_logprobs(gssm, sample), expected, rtol=1e-12)


def test_methods_agree_on_a_larger_graph():
    nodes = [
        NodeConfig("a", 4, mode="slow"),
        NodeConfig("b", 3, parents=["a"], kernel_type="product", mode="context"),
        NodeConfig("c", 5, parents=["b", "a"]),
        NodeConfig("x", 6, parents=["c", "a"], kernel_type="product", observed=True),
    ]
    gssm = GSSM(GSSMConfig(nodes=nodes))
    sample = gssm.sample(5, 30, np.random.default_rng(0))
    np.testing.assert_allclose(
        conditional_logprobs(gssm, sample, "joint"),
        conditional_logprobs(gssm, sample, "factored"),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        conditional_logprobs(gssm, sample, "auto"), conditional_logprobs(gssm, sample, "joint")
    )


def test_hidden_nodes_that_cannot_reach_the_tokens_are_left_out():
    """Per-node kernel streams make the two models identical on the nodes that matter."""
    core = [NodeConfig("a", 3), NodeConfig("x", 4, parents=["a"], observed=True)]
    gssm = GSSM(GSSMConfig(nodes=core))
    far = [NodeConfig("far", 70), NodeConfig("child", 70, parents=["far"])]  # 3 * 70 * 70 > 4096 if counted
    wider = GSSM(GSSMConfig(nodes=[*core, *far]))
    assert joint_size(wider) == 3
    sample = wider.sample(4, 10, np.random.default_rng(0))
    np.testing.assert_allclose(conditional_logprobs(wider, sample), conditional_logprobs(gssm, sample))


def test_too_many_joint_states_is_refused():
    nodes = [
        NodeConfig("a", 17),
        NodeConfig("b", 17),
        NodeConfig("c", 17),
        NodeConfig("x", 2, parents=["a", "b", "c"], observed=True),
    ]
    gssm = GSSM(GSSMConfig(nodes=nodes))
    with pytest.raises(ValueError, match="4913"):
        conditional_logprobs(gssm, gssm.sample(1, 2, np.random.default_rng(0)))


def test_context_nodes_need_the_sample_kernels():
    gssm = GSSM(GSSMConfig(nodes=GRAPHS["context hidden"]))
    tokens = gssm.sample(2, 5, np.random.default_rng(0)).tokens
    with pytest.raises(ValueError, match="'b'"):
        conditional_logprobs(gssm, Sample(tokens=tokens, hidden={}, kernels={}))
