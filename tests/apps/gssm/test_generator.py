"""GSSM sampling: the samples follow the kernels, modes constrain them, seeds determine everything."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from src.apps.gssm import generator, make_data
from src.apps.gssm.bayes import conditional_logprobs
from src.apps.gssm.generator import GSSM, Sample, alias_table
from src.apps.gssm.graph import GSSMConfig, NodeConfig
from src.apps.gssm.make_data import write_dataset


def make(*nodes: NodeConfig, seed: int = 0) -> GSSM:
    return GSSM(GSSMConfig(nodes=list(nodes), seed=seed))


def expected_table(gssm: GSSM, name: str, kernels: list[np.ndarray]) -> np.ndarray:
    """p(z | inputs) straight from the definition, one input combination at a time (inputs: the node's own
    previous state first if hidden, then its parents in declared order; first input most significant)."""
    node = gssm.node(name)
    rows = []
    for inputs in itertools.product(*(range(d) for d in node.in_dims)):
        if node.cfg.kernel_type == "fullrank" or not inputs:
            rows.append(kernels[0][np.ravel_multi_index(inputs, node.in_dims) if inputs else 0])
        else:
            p = np.prod([kernel[i] for kernel, i in zip(kernels, inputs)], axis=0)
            rows.append(p / p.sum())
    return np.array(rows)


def transition_counts(sample: Sample, gssm: GSSM, name: str) -> np.ndarray:
    """Counts of (joint input row, next state) over t >= 1, where every input of the node is observed."""
    node = gssm.node(name)
    states = {**sample.hidden, gssm.observed.name: sample.tokens}
    columns = []
    for i, input_name in enumerate(node.inputs):
        own = input_name == name and not node.cfg.observed and i == 0
        columns.append(states[input_name][:, :-1] if own else states[input_name][:, 1:])
    rows = np.ravel_multi_index(columns, node.in_dims) if columns else np.zeros_like(states[name][:, 1:])
    counts = np.zeros((node.n_rows, node.dim))
    np.add.at(counts, (rows.ravel(), states[name][:, 1:].ravel()), 1)
    return counts


def assert_matches(counts: np.ndarray, table: np.ndarray) -> None:
    """Pearson chi-square over the cells expecting at least 5 draws, within 6 standard deviations."""
    expected = counts.sum(1, keepdims=True) * table
    assert (counts[expected == 0] == 0).all(), "a zero-probability state was sampled"
    used = expected >= 5
    stat = ((counts - expected)[used] ** 2 / expected[used]).sum()
    dof = used.sum() - used.any(1).sum()
    assert dof >= (table.shape[1] - 1) * table.shape[0] // 2, "too few draws for a meaningful test"
    assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)


FULLRANK = [
    NodeConfig("a", 3),
    NodeConfig("b", 4, parents=["a"]),
    NodeConfig("x", 5, parents=["b", "a"], observed=True),
]
PRODUCT = [
    NodeConfig(n.name, n.state_dim, parents=n.parents, observed=n.observed, kernel_type="product")
    for n in FULLRANK
]


@pytest.mark.parametrize("nodes", [FULLRANK, PRODUCT], ids=["fullrank", "product"])
def test_empirical_transitions_match_the_kernels(nodes):
    gssm = make(*nodes)
    sample = gssm.sample(2000, 40, np.random.default_rng(1))
    for name in ("a", "b", "x"):
        assert_matches(transition_counts(sample, gssm, name), expected_table(gssm, name, gssm.kernels[name]))


def test_product_sampler_on_the_fly_matches_the_table(monkeypatch):
    """Product nodes too large to materialise take another path; it must sample the same distribution."""
    monkeypatch.setattr(generator, "TABLE_LIMIT", 8)
    gssm = make(*PRODUCT, NodeConfig("c", 3, mode="context", kernel_type="product", parents=["a"]))
    assert isinstance(gssm._samplers["b"], generator.ProductSampler)
    sample = gssm.sample(2000, 40, np.random.default_rng(2))
    for name in ("b", "x"):
        assert_matches(transition_counts(sample, gssm, name), expected_table(gssm, name, gssm.kernels[name]))


def test_iid_observed_node():
    gssm = make(NodeConfig("x", 6, observed=True, alpha=0.5))
    sample = gssm.sample(500, 100, np.random.default_rng(0))
    assert sample.hidden == {} and gssm.hidden_names == []
    assert_matches(np.bincount(sample.tokens.ravel(), minlength=6)[None], gssm.kernels["x"][0])


def test_sample_shapes_and_dtypes():
    gssm = make(
        NodeConfig("z", 4),
        NodeConfig("w", 2, mode="context"),
        NodeConfig("x", 7, parents=["z", "w"], observed=True),
    )
    sample = gssm.sample(3, 11, np.random.default_rng(0))
    assert gssm.vocab_size == 7 and gssm.hidden_names == ["z", "w"]
    assert sample.tokens.shape == (3, 11) and sample.tokens.dtype == np.int64
    assert sample.tokens.min() >= 0 and sample.tokens.max() < 7
    assert {k: (v.shape, v.dtype) for k, v in sample.hidden.items()} == {
        "z": ((3, 11), np.int64),
        "w": ((3, 11), np.int64),
    }
    assert [k.shape for k in sample.kernels["w"]] == [(3, 2, 2)]
    assert set(sample.kernels) == {"w"} and set(gssm.kernels) == {"z", "x"}


@pytest.mark.parametrize(
    "kernels",
    [np.full((1, 5), 0.2), np.eye(4), np.array([[0.5, 0.0, 0.5], [1e-300, 0.0, 1.0]])]
    + [np.random.default_rng(d).dirichlet(np.full(d, a), 200) for d in (2, 7, 64) for a in (0.01, 1.0)],
)
def test_alias_table_reproduces_the_distribution(kernels):
    prob, alias = alias_table(kernels)
    n, d = kernels.shape
    assert ((prob >= 0) & (prob <= 1)).all() and ((alias >= 0) & (alias < d)).all()
    rebuilt = prob.copy()
    np.add.at(rebuilt, (np.arange(n).repeat(d), alias.ravel()), (1 - prob).ravel())
    np.testing.assert_allclose(rebuilt / d, kernels, atol=1e-13)
    # A zero-probability state is never kept and never an alias that can be taken.
    assert (prob[kernels == 0] == 0).all()
    assert not (np.take_along_axis(kernels == 0, alias, 1) & (prob < 1)).any()


def test_slow_puts_the_argmax_on_the_diagonal():
    for kernel_type in ("fullrank", "product"):
        gssm = make(
            NodeConfig("z", 6, mode="slow", kernel_type=kernel_type, alpha=0.3),
            NodeConfig("x", 3, parents=["z"], observed=True),
        )
        (kernel,) = gssm.kernels["z"]
        np.testing.assert_array_equal(kernel.argmax(1), np.arange(6))
        np.testing.assert_allclose(kernel.sum(1), 1)


def test_dead_puts_the_argmax_on_one_column():
    for kernel_type in ("fullrank", "product"):
        gssm = make(
            NodeConfig("a", 3),
            NodeConfig("z", 5, mode="dead", parents=["a"], kernel_type=kernel_type),
            NodeConfig("x", 3, parents=["z"], observed=True),
        )
        column = gssm.dead_columns["z"]
        for kernel in gssm.kernels["z"]:
            assert (kernel.argmax(1) == column).all()
        assert (expected_table(gssm, "z", gssm.kernels["z"]).argmax(1) == column).all()
    # The column is part of the true model: drawn from the kernel seed.
    assert (
        len(
            {
                make(
                    NodeConfig("z", 50, mode="dead"), NodeConfig("x", 2, parents=["z"], observed=True), seed=s
                ).dead_columns["z"]
                for s in range(5)
            }
        )
        > 1
    )


def test_context_kernels_are_redrawn_for_every_sequence():
    gssm = make(NodeConfig("z", 3), NodeConfig("x", 4, parents=["z"], observed=True, mode="context"))
    fixed = [k.copy() for k in gssm.kernels["z"]]
    first = gssm.sample(2, 5, np.random.default_rng(0))
    second = gssm.sample(2, 5, np.random.default_rng(1))
    (k1,), (k2,) = first.kernels["x"], second.kernels["x"]
    assert k1.shape == (2, 3, 4)
    assert not np.allclose(k1[0], k1[1]) and not np.allclose(k1, k2)
    for kernel, before in zip(gssm.kernels["z"], fixed):
        np.testing.assert_array_equal(kernel, before)


def test_each_sequence_follows_its_own_context_kernel():
    gssm = make(
        NodeConfig("z", 2), NodeConfig("x", 3, parents=["z"], observed=True, mode="context", alpha=0.5)
    )
    sample = gssm.sample(2, 20000, np.random.default_rng(0))
    (kernel,) = sample.kernels["x"]
    for b in range(2):
        counts = np.zeros((2, 3))
        np.add.at(counts, (sample.hidden["z"][b], sample.tokens[b]), 1)
        assert_matches(counts, kernel[b])


def test_kernel_seed_determines_the_model():
    nodes = [
        NodeConfig("z", 4, kernel_type="product"),
        NodeConfig("y", 3, parents=["z"]),
        NodeConfig("x", 5, parents=["z", "y"], observed=True),
    ]
    a, b, c = make(*nodes, seed=0), make(*nodes, seed=0), make(*nodes, seed=1)
    for name in a.kernels:
        for ka, kb, kc in zip(a.kernels[name], b.kernels[name], c.kernels[name]):
            np.testing.assert_array_equal(ka, kb)
            assert not np.allclose(ka, kc)
    # Each node has its own stream: editing one node leaves the others' kernels alone.
    edited = make(nodes[0], NodeConfig("y", 3, parents=["z"], alpha=0.1), nodes[2], seed=0)
    np.testing.assert_array_equal(edited.kernels["z"][0], a.kernels["z"][0])
    assert not np.allclose(edited.kernels["y"][0], a.kernels["y"][0])


def test_sampling_rng_determines_the_sample():
    gssm = make(
        NodeConfig("z", 4, mode="slow"),
        NodeConfig("w", 3, parents=["z"], mode="context"),
        NodeConfig("x", 5, parents=["w"], observed=True),
    )
    s1 = gssm.sample(4, 30, np.random.default_rng(7))
    s2 = gssm.sample(4, 30, np.random.default_rng(7))
    s3 = gssm.sample(4, 30, np.random.default_rng(8))
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    for name in s1.hidden:
        np.testing.assert_array_equal(s1.hidden[name], s2.hidden[name])
    np.testing.assert_array_equal(s1.kernels["w"][0], s2.kernels["w"][0])
    assert not np.array_equal(s1.tokens, s3.tokens)
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    gssm.sample(4, 30, rng)
    rng.bit_generator.state = state
    np.testing.assert_array_equal(gssm.sample(4, 30, rng).tokens, s1.tokens)


# ----------------------------------------------------------------------------------------------------------
# write_dataset

SMALL = [NodeConfig("z", 3), NodeConfig("x", 5, parents=["z"], observed=True)]


def test_write_dataset(tmp_path):
    gssm = make(*SMALL)
    folder = tmp_path / "data"
    write_dataset(gssm, folder, {"train": 50, "test": 20}, seq_len=16, seed=3, batch_size=16)
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "test.npy",
        "test_bayes.npy",
        "train.npy",
        "train_bayes.npy",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind
    train, test = np.load(folder / "train.npy"), np.load(folder / "test.npy")
    assert (train.shape, train.dtype, test.shape, test.dtype) == ((50, 16), np.int32, (20, 16), np.int32)
    assert len({row.tobytes() for row in train} & {row.tobytes() for row in test}) == 0
    for split, tokens in (("train", train), ("test", test)):
        logprobs = np.load(folder / f"{split}_bayes.npy")
        assert logprobs.dtype == np.float32 and logprobs.shape == tokens.shape
        again = conditional_logprobs(gssm, Sample(tokens=tokens.astype(np.int64), hidden={}, kernels={}))
        np.testing.assert_allclose(logprobs, again, rtol=1e-6)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["seq_len"] == 16 and meta["seed"] == 3 and meta["n_sequences"] == {"train": 50, "test": 20}
    assert (
        meta["vocab_size"] == 5
        and GSSMConfig(nodes=[NodeConfig(**n) for n in meta["graph"]["nodes"]]).nodes == SMALL
    )
    np.testing.assert_allclose(
        meta["bayes_loss"]["test"], -np.load(folder / "test_bayes.npy")[:, 1:].mean(), rtol=1e-5
    )
    # Same seed, same data; the folder is never overwritten.
    write_dataset(gssm, tmp_path / "again", {"test": 20}, seq_len=16, seed=3, batch_size=16)
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "test.npy"), test)
    with pytest.raises(FileExistsError):
        write_dataset(gssm, folder, {"train": 1}, seq_len=4, seed=0)


def test_write_dataset_is_atomic(tmp_path, monkeypatch):
    calls = []

    def failing(gssm, sample):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("disk full")
        return np.zeros(sample.tokens.shape)

    monkeypatch.setattr(make_data, "conditional_logprobs", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(
            make(*SMALL), tmp_path / "data", {"train": 40, "test": 10}, seq_len=8, seed=0, batch_size=10
        )
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_refuses_intractable_bayes_before_writing(tmp_path):
    gssm = make(
        NodeConfig("a", 70), NodeConfig("b", 70), NodeConfig("x", 2, parents=["a", "b"], observed=True)
    )
    with pytest.raises(ValueError, match="4900"):
        write_dataset(gssm, tmp_path / "data", {"train": 1}, seq_len=4, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_with_context_nodes(tmp_path):
    nodes = [
        NodeConfig("z", 3, mode="context"),
        NodeConfig("x", 4, parents=["z"], observed=True, mode="context"),
    ]
    write_dataset(make(*nodes), tmp_path / "data", {"test": 30}, seq_len=10, seed=0, batch_size=8)
    logprobs = np.load(tmp_path / "data" / "test_bayes.npy")
    assert np.isfinite(logprobs).all() and (logprobs <= 0).all()
