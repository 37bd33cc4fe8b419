"""Write a finite GSSM dataset (train/test split) to disk, for scaling laws in the number of data.

    python -m src.apps.gssm.make_data config=src/apps/gssm/configs/debug.yaml data.path=data/gssm_debug \
        n_train=10000 n_test=500

Training with the same config and `data.path` then reads it back instead of generating on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...nanollama.config import ConfigError, cli_main, load_config
from .generator import GSSM, write_dataset
from .train import TrainConfig


@dataclass
class MakeDataConfig(TrainConfig):
    n_train: int = 10_000  # training sequences
    n_test: int = 1_000  # held-out sequences

    def check(self) -> None:
        if not self.data.path:
            raise ConfigError("data.path", "required: the folder to write")
        if Path(self.data.path).exists():
            raise ConfigError("data.path", f"{self.data.path} already exists")
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError("n_train", "n_train and n_test must be >= 1")

    def check_inputs(self) -> None:
        """Nothing to read: the dataset is what this script writes."""


def make_data(cfg: MakeDataConfig) -> Path:
    gssm = GSSM(cfg.data.gssm)
    counts = {"train": cfg.n_train, "test": cfg.n_test}
    write_dataset(gssm, cfg.data.path, counts, cfg.data.seq_len + 1, cfg.orchestration.seed)
    print(f"wrote {counts} sequences of {cfg.data.seq_len + 1} tokens to {cfg.data.path}")
    return Path(cfg.data.path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    make_data(load_config(MakeDataConfig, argv))


if __name__ == "__main__":
    main()
