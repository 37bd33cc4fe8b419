"""Resumable loader over a finite on-disk dataset (e.g. an (N, T) `.npy` array of token sequences).

Built for scaling laws in the amount of data, where the number of epochs must be exact and a restart
must continue with exactly the batches an uninterrupted run would have seen:

- `ShardedEpochSampler` makes the order a pure function of (seed, epoch, rank, position), so a state is
  three integers and nothing about the order needs to be saved;
- `ResumableLoader` counts the batches it *yields*, not the ones the sampler or the DataLoader workers
  have produced ahead, and hands each batch out with the state to restart from right after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ArrayDataset(Dataset):
    """Rows of a `.npy` file, memory-mapped so that only the rows read are loaded.

    The map is reopened lazily in each worker process rather than pickled with the dataset.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._array: np.ndarray | None = None
        self.shape: tuple[int, ...] = self.array.shape

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index], dtype=np.int64))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """A whole batch in one fancy-indexed read (DataLoader uses this instead of one read per row)."""
        rows = np.array(self.array[np.asarray(indices)], dtype=np.int64)
        return list(torch.from_numpy(rows))


class ShardedEpochSampler(Sampler[list[int]]):
    """Index batches of this rank, epoch after epoch, starting at (`epoch`, `batch_in_epoch`).

    Every epoch is a fresh permutation drawn from (seed, epoch); rank r takes every world_size-th
    index of it. The remainder (N mod world_size, then the last partial batch) is dropped so that all
    ranks do the same number of steps per epoch and stay in step.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = None,
        epoch: int = 0,
        batch_in_epoch: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=}, {rank=}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.epochs = rank, world_size, shuffle, epochs
        self.samples_per_rank = num_samples // world_size
        self.batches_per_epoch = self.samples_per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_samples} samples make no full batch of {batch_size} on each of {world_size} ranks"
            )
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, in the order they are served."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[self.rank : self.samples_per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.batch_in_epoch  # read once: later changes don't touch this pass
        while self.epochs is None or epoch < self.epochs:
            shard = self.shard(epoch)
            for b in range(start, self.batches_per_epoch):
                yield shard[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch, start = epoch + 1, 0


class ResumableLoader:
    """Iterator of `(batch, state)`: `state` is what `load_state_dict` needs to continue after `batch`.

    Context manager: leaving it stops the DataLoader workers. Iterating again continues where the
    last batch left off; `load_state_dict` moves the position (workers restart on the next batch).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        pin_memory: bool = False,
    ):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.sampler = ShardedEpochSampler(len(dataset), batch_size, seed, rank, world_size, shuffle, epochs)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.epoch, self.batch_in_epoch = 0, 0
        self._batches: Iterator | None = None  # live DataLoader iterator, started at the consumed position

    def __enter__(self) -> ResumableLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes now instead of whenever the iterator is garbage-collected."""
        batches, self._batches = self._batches, None
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, dict]:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)  # StopIteration after the last epoch
        self._advance()
        return batch, self.state_dict()

    def _start(self) -> Iterator:
        self.sampler.epoch, self.sampler.batch_in_epoch = self.epoch, self.batch_in_epoch
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            in_order=True,  # the state is counted from the yield order, which must be the sampler's
        )
        return iter(loader)

    def _advance(self) -> None:
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": s.seed,
            "num_samples": s.num_samples,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position (and the seed that drew its order); the shapes of the stream must match."""
        s = self.sampler
        for key in ("num_samples", "batch_size", "world_size"):
            if key in state and state[key] != getattr(s, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader {getattr(s, key)}")
        if not (state["epoch"] >= 0 and 0 <= state["batch_in_epoch"] < self.batches_per_epoch):
            raise ValueError(f"loader state out of range: {state}")
        self.close()
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        s.seed = state.get("seed", s.seed)
