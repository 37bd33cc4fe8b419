"""GSSM graph config: every invalid graph is rejected with a ConfigError naming the offending key and node."""

from __future__ import annotations

import signal

import pytest

from src.apps.gssm.graph import GSSMConfig, NodeConfig, topological_order
from src.nanollama.config import ConfigError, build_config


def graph(*nodes: NodeConfig) -> GSSMConfig:
    return GSSMConfig(nodes=list(nodes))


def hidden(name: str, dim: int = 3, **kw) -> NodeConfig:
    return NodeConfig(name=name, state_dim=dim, **kw)


def observed(parents: list[str], dim: int = 4, **kw) -> NodeConfig:
    return NodeConfig(name="x", state_dim=dim, parents=parents, observed=True, **kw)


def test_default_graph_is_valid():
    cfg = GSSMConfig()
    cfg.check()
    assert [(n.name, n.state_dim, n.parents, n.observed) for n in cfg.nodes] == [
        ("z", 4, [], False),
        ("x", 8, ["z"], True),
    ]


def test_valid_graphs():
    graph(observed([])).check()  # iid tokens
    graph(
        hidden("a", mode="slow"), hidden("b", parents=["a"], mode="dead"), observed(["b"], mode="context")
    ).check()
    graph(hidden("a", 1), observed(["a"], 2)).check()  # a constant hidden node is allowed


INVALID = {
    "empty name": (graph(hidden(""), observed([""])), "nodes.0.name", ["empty"]),
    "duplicate name": (
        graph(hidden("a"), hidden("a"), observed(["a"])),
        "nodes.1.name",
        ["duplicate", "'a'"],
    ),
    "unknown parent": (
        graph(hidden("a"), observed(["a", "q"])),
        "nodes.1.parents",
        ["unknown parent", "'q'"],
    ),
    "duplicate parent": (graph(hidden("a"), observed(["a", "a"])), "nodes.1.parents", ["duplicate", "'x'"]),
    "no observed": (graph(hidden("a"), hidden("b")), "nodes", ["no observed"]),
    "two observed": (
        graph(hidden("a"), observed(["a"]), NodeConfig("y", 3, parents=["a"], observed=True)),
        "nodes",
        ["more than one", "x", "y"],
    ),
    "slow observed": (graph(hidden("a"), observed(["a"], mode="slow")), "nodes.1.mode", ["'x'", "slow"]),
    "dead observed": (graph(hidden("a"), observed(["a"], mode="dead")), "nodes.1.mode", ["'x'", "dead"]),
    "slow with parents": (
        graph(hidden("a"), hidden("b", parents=["a"], mode="slow"), observed(["b"])),
        "nodes.1.mode",
        ["'b'", "slow", "parents"],
    ),
    "bad mode": (graph(hidden("a", mode="fast"), observed(["a"])), "nodes.0.mode", ["'a'", "'fast'"]),
    "bad kernel_type": (
        graph(hidden("a"), observed(["a"], kernel_type="lowrank")),
        "nodes.1.kernel_type",
        ["'x'", "'lowrank'"],
    ),
    "hidden state_dim 0": (graph(hidden("a", 0), observed(["a"])), "nodes.0.state_dim", ["'a'", ">= 1"]),
    "observed state_dim 1": (graph(hidden("a"), observed(["a"], 1)), "nodes.1.state_dim", ["'x'", ">= 2"]),
    "alpha 0": (graph(hidden("a", alpha=0.0), observed(["a"])), "nodes.0.alpha", ["'a'", "> 0"]),
    "alpha negative": (graph(hidden("a"), observed(["a"], alpha=-1.0)), "nodes.1.alpha", ["'x'", "> 0"]),
    "observed as parent": (
        graph(hidden("a", parents=["x"]), observed([])),
        "nodes.0.parents",
        ["'a'", "observed", "'x'"],
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_graph_is_rejected(case):
    cfg, key, words = INVALID[case]
    with pytest.raises(ConfigError) as info:
        cfg.check()
    assert info.value.key == key
    assert "\n" not in str(info.value)
    for word in words:
        assert word in info.value.message


@pytest.fixture
def deadline():
    """Fail instead of hanging: the reference implementation looped forever on cycles."""

    def timeout(*_):
        raise TimeoutError("check() did not terminate")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "nodes, cycle",
    [
        ([hidden("a", parents=["a"]), observed(["a"])], ["a"]),
        ([hidden("a", parents=["b"]), hidden("b", parents=["a"]), observed(["a"])], ["a", "b"]),
        # d hangs below the cycle a -> b -> c: it cannot be ordered either, but is not on the cycle.
        (
            [
                hidden("d", parents=["c"]),
                hidden("a", parents=["c"]),
                hidden("b", parents=["a"]),
                hidden("c", parents=["b"]),
                hidden("e"),
                observed(["d", "e"]),
            ],
            ["a", "b", "c"],
        ),
    ],
)
def test_cycle_terminates_and_names_its_nodes(deadline, nodes, cycle):
    with pytest.raises(ConfigError) as info:
        graph(*nodes).check()
    assert info.value.key == "nodes"
    assert "cycle" in info.value.message
    named = info.value.message.split(":", 1)[1].replace(" ", "").split("->")
    assert named[0] == named[-1] and sorted(set(named)) == cycle


def test_topological_order_puts_parents_first_and_keeps_declared_order():
    nodes = [
        observed(["c", "a"]),
        hidden("c", parents=["b"]),
        hidden("a"),
        hidden("b", parents=["a"]),
        hidden("e"),
    ]
    assert [n.name for n in topological_order(nodes)] == ["a", "e", "b", "c", "x"]


def test_errors_carry_the_full_key_through_build_config():
    data = {
        "nodes": [
            {"name": "a", "mode": "slw"},
            {"name": "x", "state_dim": 4, "parents": ["a"], "observed": True},
        ]
    }
    with pytest.raises(ConfigError) as info:
        build_config(GSSMConfig, data)
    assert info.value.key == "nodes.0.mode"
    cfg = build_config(GSSMConfig, {"nodes": data["nodes"][1:] + [{"name": "a"}]}, ["seed=3"])
    assert cfg.seed == 3 and cfg.nodes[1].name == "a" and cfg.nodes[0].observed
