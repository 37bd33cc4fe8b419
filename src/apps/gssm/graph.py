"""The GSSM graph config: which nodes exist, how they depend on each other, and its validation.

A graph is a list of nodes; exactly one is observed (its states are the tokens), the others are
hidden. Hidden nodes read their own previous state and their parents' current states, so the
parent relation must be a DAG; `topological_order` gives the order in which a time step is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from src.nanollama.config import ConfigError

MODES = ("default", "slow", "dead", "context")
KERNEL_TYPES = ("product", "fullrank")


@dataclass
class NodeConfig:
    name: str = ""
    state_dim: int = 2
    alpha: float = 1.0  # Dirichlet concentration of kernel rows (small: peaked, low entropy)
    parents: list[str] = field(default_factory=list)
    mode: str = "default"  # default | slow | dead | context
    kernel_type: str = "fullrank"  # product | fullrank
    observed: bool = False

    def check(self) -> None:
        """Checks that need only this node; graph-level checks live in `GSSMConfig.check`."""
        who = f"node '{self.name}'"
        if not self.name:
            raise ConfigError("name", "node name must not be empty")
        if self.mode not in MODES:
            raise ConfigError(
                "mode", f"{who}: unknown mode '{self.mode}' (expected one of {', '.join(MODES)})"
            )
        if self.kernel_type not in KERNEL_TYPES:
            raise ConfigError(
                "kernel_type",
                f"{who}: unknown kernel_type '{self.kernel_type}' (one of {', '.join(KERNEL_TYPES)})",
            )
        min_dim = 2 if self.observed else 1
        if self.state_dim < min_dim:
            kind = "an observed" if self.observed else "a hidden"
            raise ConfigError(
                "state_dim", f"{who}: {kind} node needs state_dim >= {min_dim}, got {self.state_dim}"
            )
        if not self.alpha > 0:
            raise ConfigError("alpha", f"{who}: alpha must be > 0, got {self.alpha}")
        if self.observed and self.mode in ("slow", "dead"):
            raise ConfigError("mode", f"{who} is observed: mode '{self.mode}' only applies to hidden nodes")
        if self.mode == "slow" and self.parents:
            raise ConfigError("mode", f"{who}: mode 'slow' needs a node without parents, got {self.parents}")
        if len(set(self.parents)) != len(self.parents):
            raise ConfigError("parents", f"{who}: duplicate parent in {self.parents}")


def _default_nodes() -> list[NodeConfig]:
    return [
        NodeConfig(name="z", state_dim=4),
        NodeConfig(name="x", state_dim=8, parents=["z"], observed=True),
    ]


@dataclass
class GSSMConfig:
    nodes: list[NodeConfig] = field(default_factory=_default_nodes)
    seed: int = 0  # seed of the kernels, i.e. of the true model (shared by every rank, train and test)

    def check(self) -> None:
        for i, node in enumerate(self.nodes):
            try:
                node.check()
            except ConfigError as e:
                raise e.prefixed(f"nodes.{i}") from None
        _check_names(self.nodes)
        _check_observed(self.nodes)
        topological_order(self.nodes)


def _check_names(nodes: list[NodeConfig]) -> None:
    first_index: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.name in first_index:
            raise ConfigError(
                f"nodes.{i}.name", f"duplicate node name '{node.name}' (also nodes.{first_index[node.name]})"
            )
        first_index[node.name] = i
    for i, node in enumerate(nodes):
        for parent in node.parents:
            if parent not in first_index:
                raise ConfigError(f"nodes.{i}.parents", f"node '{node.name}': unknown parent '{parent}'")


def _check_observed(nodes: list[NodeConfig]) -> None:
    observed = [node.name for node in nodes if node.observed]
    if not observed:
        raise ConfigError("nodes", "no observed node: exactly one node needs observed: true")
    if len(observed) > 1:
        raise ConfigError(
            "nodes", f"more than one observed node: {', '.join(observed)} (exactly one allowed)"
        )
    # Tokens are emitted from the hidden state; a hidden node reading tokens would break the HMM structure
    # (and the exact Bayes forward pass).
    for i, node in enumerate(nodes):
        if observed[0] in node.parents:
            raise ConfigError(
                f"nodes.{i}.parents",
                f"node '{node.name}': the observed node '{observed[0]}' cannot be a parent",
            )


def topological_order(nodes: list[NodeConfig]) -> list[NodeConfig]:
    """Parents before children (Kahn's algorithm, ties kept in declared order).

    Raises a ConfigError naming the nodes of one cycle if there is one. Unknown parents are ignored here
    (`GSSMConfig.check` reports them first).
    """
    by_name = {node.name: node for node in nodes}
    children: dict[str, list[str]] = {node.name: [] for node in nodes}
    n_missing = {node.name: 0 for node in nodes}
    for node in nodes:
        for parent in node.parents:
            if parent in by_name:
                children[parent].append(node.name)
                n_missing[node.name] += 1
    ready = [node.name for node in nodes if n_missing[node.name] == 0]
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for child in children[name]:
            n_missing[child] -= 1
            if n_missing[child] == 0:
                ready.append(child)
    if len(order) < len(nodes):
        cycle = _find_cycle(by_name, blocked={name for name, k in n_missing.items() if k > 0})
        raise ConfigError("nodes", f"cycle in parents: {' -> '.join(cycle)}")
    return [by_name[name] for name in order]


def _find_cycle(by_name: dict[str, NodeConfig], blocked: set[str]) -> list[str]:
    """One cycle among the nodes Kahn's algorithm could not order; every one of them has a blocked parent,
    so walking blocked parents must revisit a node, and the revisited stretch is a cycle."""
    name = min(blocked)
    path: list[str] = []
    while name not in path:
        path.append(name)
        name = next(p for p in by_name[name].parents if p in blocked)
    cycle = path[path.index(name) :] + [name]
    return cycle[::-1]  # parent -> child reads in the direction of the dependency
