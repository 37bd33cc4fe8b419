"""Write a finite GSSM dataset (train/test split) to disk, for scaling laws in the number of data.

    python -m src.apps.gssm.make_data config=src/apps/gssm/configs/debug.yaml data.path=data/gssm_debug \
        n_train=10000 n_test=500

Training with the same config and `data.path` then reads it back instead of generating on the fly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...nanollama.config import ConfigError, check_range, cli_main, load_config
from .bayes import conditional_logprobs, joint_size
from .generator import GSSM, split_rng
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
        check_range(self, "n_train", 1)
        check_range(self, "n_test", 1)

    def check_inputs(self) -> None:
        """Nothing to read: the dataset is what this script writes."""


def write_dataset(
    gssm: GSSM,
    folder: str | os.PathLike,
    n_sequences: dict[str, int],
    seq_len: int,
    seed: int,
    batch_size: int = 256,
) -> None:
    """Write `{split}.npy` (N, T) int32 tokens, `{split}_bayes.npy` (N, T) float32 log p(x_t | x_<t) under the
    true model, and `meta.json`; all into a temporary sibling folder renamed at the end, so `folder` either
    holds a complete dataset or does not exist."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"dataset folder already exists: {folder}")
    joint_size(gssm)  # fail before generating anything if the Bayes pass is intractable
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        bayes_loss = {}
        for split, n in n_sequences.items():
            rng = split_rng(seed, split)
            tokens = np.lib.format.open_memmap(tmp / f"{split}.npy", "w+", np.int32, (n, seq_len))
            logprobs = np.lib.format.open_memmap(tmp / f"{split}_bayes.npy", "w+", np.float32, (n, seq_len))
            total = 0.0
            for lo in range(0, n, batch_size):
                sample = gssm.sample(min(batch_size, n - lo), seq_len, rng)
                lp = conditional_logprobs(gssm, sample)
                tokens[lo : lo + len(lp)] = sample.tokens
                logprobs[lo : lo + len(lp)] = lp
                total -= lp[:, 1:].sum()
            tokens.flush()
            logprobs.flush()
            del tokens, logprobs  # close the memory maps before the rename
            bayes_loss[split] = total / max(1, n * (seq_len - 1))
        meta = {
            "graph": dataclasses.asdict(gssm.cfg),
            "vocab_size": gssm.vocab_size,
            "seq_len": seq_len,
            "seed": seed,
            "n_sequences": dict(n_sequences),
            "bayes_loss": bayes_loss,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
