"""Starting a run from another run's checkpoint without resuming it (`init.checkpoint`).

Only the model's weights are taken: the optimizer, the schedule, the step and the data start afresh (a
resume, by contrast, continues all of them). `init.prefix_map` renames checkpoint tensors on the way in,
e.g. `{"encoder.": ""}` loads a BERT encoder into a bare Transformer; with a map, only the tensors under
its source prefixes are taken. `init.strict` (default) requires every model weight under the map's
target prefixes (all of them without a map) to come from the checkpoint; shapes always must match. A run
that resumes from its own checkpoint ignores its starting point.

Checks run at start-up, before the log dir exists (`check_init`, on a model built on the meta device), so
a wrong path or a mismatched shape exits 2 with one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .config import ConfigError
from .model.io import WEIGHTS
from .monitor.checkpoint import find_checkpoint, latest_checkpoint

logger = logging.getLogger(__name__)
KEY = "init.checkpoint"
VOCABULARY = "vocabulary.json"  # in every checkpoint of a run with a tokenizer: {"vocabulary": identity}


@dataclass
class InitConfig:
    checkpoint: str = ""  # a run folder (its latest checkpoint) or a checkpoint folder; empty: fresh init
    prefix_map: dict[str, str] = field(default_factory=dict)  # checkpoint prefix -> model prefix
    strict: bool = True  # every model weight under the map's targets (all, without a map) must be loaded
    tokenizer_mismatch: str = "refuse"  # refuse | allow: a checkpoint of another vocabulary (logged)

    def check(self) -> None:
        if self.prefix_map and not self.checkpoint:
            raise ConfigError("prefix_map", "needs init.checkpoint")
        if self.tokenizer_mismatch not in ("refuse", "allow"):
            raise ConfigError(
                "tokenizer_mismatch", f"must be refuse or allow, got {self.tokenizer_mismatch!r}"
            )


def find_init(cfg: InitConfig) -> Path | None:
    """The checkpoint folder `init.checkpoint` names (a run folder: its latest checkpoint), checked against
    its manifest; None without one. ConfigError naming `init.checkpoint` otherwise."""
    if not cfg.checkpoint:
        return None
    folder = Path(cfg.checkpoint)
    try:
        return (
            find_checkpoint("", folder)
            if (folder / "checkpoints").is_dir()
            else find_checkpoint(str(folder), "")
        )
    except ConfigError as e:
        raise ConfigError(KEY, e.message) from None


def saved_vocabulary(checkpoint: Path) -> str:
    """The tokenizer identity a checkpoint was saved with ("" for a checkpoint without one)."""
    try:
        return str(json.loads((checkpoint / VOCABULARY).read_text())["vocabulary"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_vocabulary(cfg: InitConfig, path: Path, vocabulary: str) -> str:
    """Embeddings mean nothing under another tokenizer: a sentencepiece model trained on other data has
    the same size but other pieces. Refused (exit 2) unless `init.tokenizer_mismatch: allow`; returns
    the warning to log, if any."""
    theirs = saved_vocabulary(path)
    if not vocabulary or theirs == vocabulary:
        return ""
    if not theirs:
        return f"{path} records no tokenizer: its vocabulary cannot be checked against this run's"
    if cfg.tokenizer_mismatch == "allow":
        return f"init.tokenizer_mismatch=allow: {path} has tokenizer {theirs}, this run {vocabulary}"
    raise ConfigError(
        KEY,
        f"{path} was trained with tokenizer {theirs}, this run has {vocabulary}: the tokenizer.* keys (and "
        "a sentencepiece model's data.sources) must give its vocabulary, or init.tokenizer_mismatch=allow",
    )


def resumes(log_dir: str | Path) -> bool:
    """Whether a run in `log_dir` will resume from its own checkpoint (then its starting point is moot)."""
    return latest_checkpoint(Path(log_dir) / "checkpoints") is not None


def mapped_weights(path: Path, prefix_map: dict[str, str]) -> dict[str, Tensor]:
    """The checkpoint's weights renamed by `prefix_map` (longest source prefix first); memory-mapped, so
    a start-up check costs no read of the tensors."""
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (truncated, not a zip: the same error to the user)
        raise ConfigError(KEY, f"cannot read {path / WEIGHTS} ({type(e).__name__})") from None
    if not prefix_map:
        return state
    sources = sorted(prefix_map, key=len, reverse=True)
    mapped = {}
    for name, tensor in state.items():
        src = next((s for s in sources if name.startswith(s)), None)
        if src is not None:
            mapped[prefix_map[src] + name[len(src) :]] = tensor
    return mapped


def init_names(
    model: nn.Module, state: dict[str, Tensor], cfg: InitConfig, where: str, prefix_map: dict | None = None
) -> list[str]:
    """The names `state` would load into `model` under the rules above; ConfigError naming the first
    tensor that breaks them."""
    prefix_map = cfg.prefix_map if prefix_map is None else prefix_map
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if not state:
        raise ConfigError(KEY, f"{where}: no tensor under the prefixes of init.prefix_map {prefix_map}")
    if unexpected := sorted(set(state) - set(expected)):
        raise ConfigError(KEY, f"{where}: {unexpected[0]} is not a weight of this model")
    for name in state:
        if tuple(state[name].shape) != expected[name]:
            raise ConfigError(
                KEY, f"{where}: {name} has shape {tuple(state[name].shape)}, this model's is {expected[name]}"
            )
    targets = tuple(prefix_map.values()) or ("",)
    missing = [n for n in expected if n.startswith(targets) and n not in state]
    if cfg.strict and missing:
        raise ConfigError(KEY, f"{where}: no {missing[0]} for this model (init.strict=false keeps it fresh)")
    return sorted(state)


def check_init(
    cfg: InitConfig, build: Callable[[], nn.Module], prefix_map: dict | None = None, vocabulary: str = ""
) -> str:
    """At start-up: the path, the vocabulary (`vocabulary`: this run's tokenizer identity, see
    `VOCABULARY`), then the names and shapes against the model `build()` makes on the meta device (no
    memory, no init). Returns a warning for the run's log (a vocabulary mismatch allowed), if any."""
    path = find_init(cfg)
    if path is None:
        return ""
    warning = check_vocabulary(cfg, path, vocabulary)
    with torch.device("meta"):
        model = build()
    init_names(
        model,
        mapped_weights(path, cfg.prefix_map if prefix_map is None else prefix_map),
        cfg,
        str(path),
        prefix_map,
    )
    return warning


def load_init_weights(model: nn.Module, path: Path, cfg: InitConfig, prefix_map: dict | None = None) -> int:
    """Load the checkpoint folder's weights, renamed by `prefix_map` (default `cfg.prefix_map`), into the
    unwrapped model; the rest keeps its fresh init. Returns how many tensors were loaded."""
    prefix_map = cfg.prefix_map if prefix_map is None else prefix_map
    state = mapped_weights(path, prefix_map)
    names = init_names(model, state, cfg, str(path), prefix_map)
    if bad := [n for n in names if state[n].is_floating_point() and not torch.isfinite(state[n]).all()]:
        raise ConfigError(KEY, f"corrupt checkpoint {path}: non-finite values in {bad[0]}")
    model.load_state_dict(state, strict=False)
    return len(names)


def load_init(model: nn.Module, cfg: InitConfig) -> Path | None:
    """`init.checkpoint`'s weights into the (unwrapped) model, logged; returns the checkpoint folder
    (None: no init)."""
    path = find_init(cfg)
    if path is None:
        return None
    loaded = load_init_weights(model, path, cfg)
    fresh = len(model.state_dict()) - loaded
    how = f" through prefix map {cfg.prefix_map}" if cfg.prefix_map else ""
    logger.info(f"initialised {loaded} tensors from {path}{how}" + (f", {fresh} fresh" if fresh else ""))
    return path
