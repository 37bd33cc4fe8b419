"""GSSM training data: generated on the fly, or read from a finite dataset written to disk.

Either way the loader's state after each batch is what a checkpoint stores, so a resumed run
draws exactly the batches an uninterrupted run would. Every rank has its own stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...nanollama.config import ConfigError
from .generator import GSSM
from .graph import GSSMConfig

# Independent RNG streams derived from the global seed (kernels use data.gssm.seed instead).
TRAIN_STREAM, EVAL_STREAM = 1, 2


@dataclass
class DataConfig:
    gssm: GSSMConfig = field(default_factory=GSSMConfig)
    seq_len: int = 64  # positions the model sees; sequences have seq_len + 1 tokens
    batch_size: int = 32  # global sequences per optimizer step (all ranks, all micro-steps)
    path: str = ""  # folder written by `python -m src.apps.gssm.make_data`; empty: generate on the fly
    num_workers: int = 0  # DataLoader workers for on-disk data

    def check(self) -> None:
        if self.seq_len < 1:
            raise ConfigError("seq_len", f"must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


def check_dataset(cfg: DataConfig) -> None:
    """A dataset on disk must be complete and written for the same sequence length."""
    for name in ("train.npy", "test.npy", "test_bayes.npy", "meta.json"):
        if not (Path(cfg.path) / name).is_file():
            raise ConfigError("data.path", f"no {name} in {cfg.path} (write it with src.apps.gssm.make_data)")
    meta = json.loads((Path(cfg.path) / "meta.json").read_text())
    if meta["seq_len"] != cfg.seq_len + 1:
        raise ConfigError(
            "data.seq_len", f"{cfg.path} holds sequences of {meta['seq_len']} tokens, need seq_len + 1"
        )


class GeneratedStream:
    """Endless batches from the true model, from a per-rank numpy RNG whose state is checkpointed."""

    def __init__(self, gssm: GSSM, batch_size: int, seq_len: int, seed: int, rank: int):
        self.gssm, self.batch_size, self.seq_len = gssm, batch_size, seq_len
        self.rng = np.random.default_rng([seed, TRAIN_STREAM, rank])

    def __enter__(self) -> GeneratedStream:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self) -> GeneratedStream:
        return self

    def __next__(self) -> torch.Tensor:
        return torch.from_numpy(self.gssm.sample(self.batch_size, self.seq_len + 1, self.rng).tokens)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class DiskStream:
    """Batches of a finite dataset, reshuffled each epoch, sharded by rank, resumable mid-epoch."""

    def __init__(self, path: str, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int):
        from ...nanollama.data.loader import ArrayDataset, ResumableLoader

        dataset = ArrayDataset(Path(path) / "train.npy")
        self.loader = ResumableLoader(dataset, batch_size, seed, rank, world_size, num_workers=num_workers)
        self.iterator = None
        self.state = self.loader.state_dict()

    def __enter__(self) -> DiskStream:
        self.loader.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.loader.__exit__(*exc)

    def __iter__(self) -> DiskStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        batch, self.state = next(self.iterator)
        return batch

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.state, self.iterator = state, None


def build_stream(cfg: DataConfig, gssm: GSSM, batch_size: int, seed: int, rank: int, world_size: int):
    if cfg.path:
        check_dataset(cfg)
        return DiskStream(cfg.path, batch_size, seed, rank, world_size, cfg.num_workers)
    return GeneratedStream(gssm, batch_size, cfg.seq_len, seed, rank)


def eval_seq_len(cfg: DataConfig, seq_len: int = 0) -> int:
    """The evaluation length: 0 means the training one; other lengths are generated on the fly, since a
    dataset on disk holds one length only."""
    if cfg.path and seq_len not in (0, cfg.seq_len):
        raise ConfigError(
            "evaluation.seq_len",
            f"{seq_len} != data.seq_len {cfg.seq_len}: {cfg.path} holds one length (other lengths need "
            "generated data, data.path='')",
        )
    return seq_len or cfg.seq_len


def eval_sequences(cfg: DataConfig, n_sequences: int) -> int:
    """How many held-out sequences an evaluation reads: `n_sequences` generated, or of the test split on
    disk at most that many (0: all of it)."""
    if not cfg.path:
        if n_sequences < 1:
            raise ConfigError("evaluation.n_sequences", "must be >= 1 (0: all of data.path's test split)")
        return n_sequences
    available = len(np.load(Path(cfg.path) / "test.npy", mmap_mode="r"))
    return min(n_sequences or available, available)


def eval_batches(
    cfg: DataConfig,
    gssm: GSSM,
    n_sequences: int,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    seq_len: int = 0,
):
    """The same held-out (tokens, Bayes log-probs) batches at every evaluation, whatever the world size.

    Each global batch is split evenly across ranks (a remainder is dropped), so every rank runs the
    same number of forward passes, as FSDP requires. `seq_len` (0: data.seq_len) sets the positions
    of generated sequences, e.g. longer than training to test length extrapolation.
    """
    seq_len, n_sequences = eval_seq_len(cfg, seq_len), eval_sequences(cfg, n_sequences)
    if cfg.path:
        tokens = np.load(Path(cfg.path) / "test.npy", mmap_mode="r")
        bayes = np.load(Path(cfg.path) / "test_bayes.npy", mmap_mode="r")
    else:
        from .bayes import conditional_logprobs

        rng = np.random.default_rng([seed, EVAL_STREAM])
    for start in range(0, n_sequences, batch_size):
        size = min(batch_size, n_sequences - start)
        if cfg.path:
            batch_tokens, batch_bayes = tokens[start : start + size], bayes[start : start + size]
        else:
            sample = gssm.sample(size, seq_len + 1, rng)
            batch_tokens, batch_bayes = sample.tokens, conditional_logprobs(gssm, sample)
        rows = slice(rank, size - size % world, world)
        yield torch.from_numpy(np.asarray(batch_tokens[rows], dtype=np.int64)), np.asarray(batch_bayes[rows])
