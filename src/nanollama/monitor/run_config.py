"""Which config changes a run's checkpoints survive.

A checkpoint is only meaningful with the config that made it: the model's shape, the tokenizer, the data
layout, the task. A resume (or an evaluation) with a config that changes any of those exits 2 naming the
keys and both values; keys that only steer the run from here on (length, LR, logging, evaluation,
checkpointing, the device) may change, and the changes are logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..app import RunConfig
from ..config import ConfigError, read_yaml, to_dict

# Keys (or whole sections) a resumed run may change; every other key is fixed by its checkpoints.
RESUME_MAY_CHANGE = (
    "orchestration",
    "optim",
    "evaluation",
    "generation",
    "cluster",
    "model.attention",
    "model.activation_checkpointing",  # recomputes the same values: the checkpoints mean the same
    "data.num_workers",
    "data.epochs",
    "tokenizer.cache_dir",
)
# within those sections: the data streams follow from the seed; the optimizer's state holds exactly the
# parameters the groups leave unfrozen (and their LRs), so the groups must not change under a resume
RESUME_FIXED = ("orchestration.seed", "optim.groups")
# An evaluation may also change the RoPE scaling and the batch it reads the data with.
EVAL_MAY_CHANGE = RESUME_MAY_CHANGE + (
    *(f"model.rope_{k}" for k in ("scaling", "factor", "original_length", "beta_fast", "beta_slow")),
    "data.batch_size",
)
# 0 means "filled in from the data" (graph, tokenizer): an eval script fills it in after this check.
AUTO_ZERO = ("model.vocab_size",)


# Mappings compared as one value: a prefix added to or dropped from `optim.groups` changes the run too.
WHOLE = ("optim.groups",)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists are leaves (a GSSM graph or the sources compare whole), and so
    are the mappings of WHOLE."""
    if not isinstance(tree, dict) or prefix in WHOLE:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_changes(saved: dict, ours: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, our value) for keys both configs have and that differ (an automatic 0 aside)."""
    old, new = flatten(saved), flatten(ours)
    return [
        (k, old[k], new[k])
        for k in new
        if k in old and old[k] != new[k] and not (k in AUTO_ZERO and new[k] == 0)
    ]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_against_run(
    cfg: RunConfig,
    run_config: str | os.PathLike,
    what: str,
    may_change: tuple[str, ...],
    fixed: tuple[str, ...] = (),
) -> list[str]:
    """Compare `cfg` with the run's saved `config.yaml`: a fixed key that differs is a ConfigError naming
    it and both values; returns "key: old -> new" for the keys that may change. No file: nothing to do."""
    if not Path(run_config).is_file():
        return []
    changes = config_changes(read_yaml(run_config), to_dict(cfg))
    fixed = [c for c in changes if not _matches(c[0], may_change) or _matches(c[0], fixed)]
    if fixed:
        key, old, new = fixed[0]
        others = ", ".join(k for k, _, _ in fixed[1:])
        raise ConfigError(
            key,
            f"{_short(new)} here, {_short(old)} in {run_config}: {what} cannot change it"
            + (f" (also changed: {others})" if others else ""),
        )
    return [f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in changes]
