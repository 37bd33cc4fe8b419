"""The app contract: what every app's train.py gives the core, typed (docs/new_app.md tells it whole).

An app's `TrainConfig` extends `RunConfig` with its own sections (model, data, evaluation, ...). Its
train.py exports `main = train_entrypoint(TrainConfig, train, build_training)`: the launcher reads the
config class from it, the LR finder the `build_training` hook, and `python -m` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from torch import nn

from .config import ConfigError, cli_main, load_config
from .distributed import ClusterConfig
from .init_checkpoint import InitConfig
from .model.transformer import TransformerConfig
from .monitor.orchestration import OrchestrationConfig
from .optim import OptimConfig


@dataclass
class RunConfig:
    """The sections the core reads of every run: the Monitor `orchestration`, the Cluster `cluster`, the
    optimizer and schedule `optim`, the starting weights `init`. `check_inputs`, which an app overrides,
    reads everything the run will read (data, eval data, tokenizer files) before the log dir exists."""

    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def check_inputs(self) -> None:
        """Nothing to read beyond the config."""


@dataclass
class Training:
    """One app's training step, as its train.py's hook `build_training(cfg, cluster, loader=None,
    init=True)` builds it: the app's own loop runs it, and so do the core's tools (the LR finder), which
    know nothing else of the app. The hook builds the data stream when `loader` is None (train() builds it
    earlier, before the log dir exists) and loads `init.checkpoint` when `init` (False on a resume)."""

    model: nn.Module  # unwrapped, with its starting weights; the caller wraps it (cluster.wrap)
    loader: Any  # the data stream: a context manager with state_dict/load_state_dict, not yet entered
    next_batch: Callable[[], Any]  # the next micro-batch on the device (from `loader`, once entered)
    loss: Callable[[nn.Module, Any], Any]  # mean loss (a 0-d tensor) of a micro-batch under the wrapped model
    state: Any = None  # what the loss reads that the app's loop sets each step (schedules), if anything


BuildTraining = Callable[..., Training]  # (cfg, cluster, loader=None, init=True) -> Training
C = TypeVar("C", bound=RunConfig)


@dataclass(frozen=True)
class TrainEntrypoint(Generic[C]):
    """An app's `main`: `main(argv)` loads the config (defaults < YAML < CLI, checked, inputs read) and
    runs `train`, with `config.cli_main`'s exit codes; the core's tools read the other two fields."""

    config_class: type[C]
    train: Callable[[C], Any]
    build_training: BuildTraining

    def __call__(self, argv: list[str] | None = None) -> Any:
        return cli_main(lambda: self.train(load_config(self.config_class, argv)))()


def train_entrypoint(
    config_class: type[C], train: Callable[[C], Any], build: BuildTraining
) -> TrainEntrypoint[C]:
    if not issubclass(config_class, RunConfig):
        raise TypeError(f"{config_class.__name__} must extend app.RunConfig")
    return TrainEntrypoint(config_class, train, build)


def set_vocab_size(
    model: TransformerConfig, vocab_size: int, source: str, key: str = "model.vocab_size"
) -> None:
    """`vocab_size: 0` in a model's config means the data's own vocabulary (`source`'s); any other value
    must equal it. Resolved in the config, so config.yaml (and a resume's or eval's check) records it."""
    if model.vocab_size not in (0, vocab_size):
        raise ConfigError(key, f"{model.vocab_size} != {source}'s {vocab_size}")
    model.vocab_size = vocab_size


def check_use_ema(use_ema: bool, optim: OptimConfig) -> None:
    """`evaluation.use_ema` needs an EMA to evaluate."""
    if use_ema and not optim.ema_decay:
        raise ConfigError("evaluation.use_ema", "needs optim.ema_decay > 0 (no EMA of the weights is kept)")
