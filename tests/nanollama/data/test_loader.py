import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from src.nanollama.data.loader import ArrayDataset, ResumableLoader, ShardedEpochSampler

N, T = 23, 5  # 23 rows: remainders at every world size and batch size used below


@pytest.fixture
def dataset(tmp_path) -> ArrayDataset:
    """Row i is [i, i, ..., i] as uint16, so a batch's first column names the rows it holds."""
    path = tmp_path / "tokens.npy"
    np.save(path, np.repeat(np.arange(N, dtype=np.uint16)[:, None], T, axis=1))
    return ArrayDataset(path)


def rows(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def take(loader: ResumableLoader, n: int) -> list[tuple[list[int], dict]]:
    return [(rows(batch), state) for batch, state in itertools.islice(loader, n)]


# --- dataset --------------------------------------------------------------------------------------


def test_array_dataset_reads_rows_as_int64(dataset):
    assert len(dataset) == N
    row = dataset[7]
    assert row.dtype == torch.int64 and row.tolist() == [7] * T
    assert [r.tolist() for r in dataset.__getitems__([3, 1])] == [[3] * T, [1] * T]
    assert isinstance(dataset.array, np.memmap)


def test_array_dataset_pickles_without_its_map(dataset):
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._array is None and clone[4].tolist() == [4] * T


# --- sampler --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size, batch_size", [(1, 4), (2, 3), (3, 2), (4, 5)])
def test_rank_shards_are_disjoint_and_cover_all_but_the_remainder(world_size, batch_size):
    samplers = [
        ShardedEpochSampler(N, batch_size, seed=0, rank=r, world_size=world_size) for r in range(world_size)
    ]
    shards = [s.shard(epoch=3) for s in samplers]
    per_rank = N // world_size
    assert all(len(shard) == per_rank for shard in shards)
    covered = np.concatenate(shards)
    assert len(set(covered.tolist())) == per_rank * world_size  # disjoint

    batches = [list(itertools.islice(s, s.batches_per_epoch)) for s in samplers]
    assert all(len(b) == per_rank // batch_size for b in batches)  # ranks stay in step
    assert all(len(batch) == batch_size for b in batches for batch in b)  # no partial batch
    served = [i for b in batches for batch in b for i in batch]
    assert len(served) == len(set(served)) == world_size * (per_rank // batch_size) * batch_size


def test_epochs_are_shuffled_differently_and_deterministically():
    sampler = ShardedEpochSampler(N, 4, seed=5)
    epochs = [sampler.shard(e).tolist() for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert epochs == [ShardedEpochSampler(N, 4, seed=5).shard(e).tolist() for e in range(3)]
    assert ShardedEpochSampler(N, 4, seed=6).shard(0).tolist() != epochs[0]


def test_no_shuffle_serves_in_order():
    sampler = ShardedEpochSampler(N, 5, seed=0, rank=1, world_size=2, shuffle=False)
    assert list(itertools.islice(sampler, 2)) == [[1, 3, 5, 7, 9], [11, 13, 15, 17, 19]]


def test_sampler_runs_over_epochs_from_an_explicit_position():
    whole = list(itertools.islice(ShardedEpochSampler(N, 4, seed=1), 12))
    resumed = ShardedEpochSampler(N, 4, seed=1, epoch=1, batch_in_epoch=3)  # 5 batches per epoch
    assert list(itertools.islice(resumed, 4)) == whole[8:12]


def test_sampler_needs_one_full_batch():
    with pytest.raises(ValueError, match="no full batch"):
        ShardedEpochSampler(7, 4, seed=0, world_size=2)


# --- loader --------------------------------------------------------------------------------------


def test_batches_and_state_travel_together(dataset):
    with ResumableLoader(dataset, batch_size=4, seed=0) as loader:
        assert loader.batches_per_epoch == 5
        (first, state), *_ = take(loader, 1)
        assert len(first) == 4
        assert state == loader.state_dict()
        assert (state["epoch"], state["batch_in_epoch"]) == (0, 1)
        batch, _ = next(loader)
        assert batch.shape == (4, T) and batch.dtype == torch.int64


def test_epochs_are_counted_exactly_and_stop(dataset):
    with ResumableLoader(dataset, batch_size=4, seed=0, epochs=2) as loader:
        served = take(loader, 100)
        assert len(served) == 2 * loader.batches_per_epoch
        positions = [(s["epoch"], s["batch_in_epoch"]) for _, s in served]
        assert positions[3:6] == [(0, 4), (1, 0), (1, 1)]
        assert positions[-1] == (2, 0)
        first_epoch = [i for r, _ in served[:5] for i in r]
        assert len(set(first_epoch)) == 20  # each row at most once per epoch
        assert list(loader) == []  # stays exhausted


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 5, 7])  # mid-epoch, exactly at the boundary, next epoch
def test_resume_continues_the_uninterrupted_stream(dataset, num_workers, stop_after):
    with ResumableLoader(dataset, batch_size=4, seed=3, num_workers=num_workers) as loader:
        reference = [r for r, _ in take(loader, 12)]

    with ResumableLoader(dataset, batch_size=4, seed=3, num_workers=num_workers) as loader:
        served = take(loader, stop_after)
        _, state = served[-1]
        assert state == loader.state_dict()  # what was yielded, not what the workers prefetched
        state = json.loads(json.dumps(state))
    assert [r for r, _ in served] == reference[:stop_after]

    with ResumableLoader(dataset, batch_size=4, seed=3, num_workers=num_workers) as loader:
        loader.load_state_dict(state)
        assert [r for r, _ in take(loader, 12 - stop_after)] == reference[stop_after:]


def test_state_of_every_batch_restores_the_rest(dataset):
    """Any state handed out, even one older than the latest, restarts right after its batch."""
    with ResumableLoader(dataset, batch_size=4, seed=3, num_workers=2) as loader:
        served = take(loader, 8)
        for i in (1, 4, 6):
            loader.load_state_dict(served[i][1])
            assert [r for r, _ in take(loader, 8 - i - 1)] == [r for r, _ in served[i + 1 :]]


def test_ranks_resume_in_step(dataset):
    def stream(rank: int, state: dict | None = None) -> list[list[int]]:
        with ResumableLoader(dataset, batch_size=2, seed=0, rank=rank, world_size=3) as loader:
            if state:
                loader.load_state_dict(state)
            return [r for r, _ in take(loader, 6)]

    full = [stream(rank) for rank in range(3)]  # 7 rows per rank: 3 batches per epoch
    assert len({i for s in full for r in s[:3] for i in r}) == 3 * 3 * 2  # disjoint within an epoch
    resumed = [stream(rank, {"epoch": 1, "batch_in_epoch": 1, "seed": 0}) for rank in range(3)]
    assert [s[:2] for s in resumed] == [s[4:6] for s in full]


def test_state_is_json_and_checked(dataset):
    with ResumableLoader(dataset, batch_size=4, seed=9) as loader:
        take(loader, 6)
        state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["seed"] == 9 and (state["epoch"], state["batch_in_epoch"]) == (1, 1)

    other = ResumableLoader(dataset, batch_size=2, seed=9)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ResumableLoader(dataset, batch_size=4, seed=9).load_state_dict({**state, "batch_in_epoch": 5})


def test_load_restores_the_seed(dataset):
    with ResumableLoader(dataset, batch_size=4, seed=1) as loader:
        reference = [r for r, _ in take(loader, 4)]
    with ResumableLoader(dataset, batch_size=4, seed=2) as loader:
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 2, "seed": 1})
        assert [r for r, _ in take(loader, 2)] == reference[2:]
