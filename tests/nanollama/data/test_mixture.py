import itertools
import json
import re

import numpy as np
import pytest

from src.nanollama.data.mixture import Mixture, SourceSampler
from src.nanollama.data.packing import SourceConfig, TextDataConfig, TextStream
from src.nanollama.data.text import ByteTokenizer


def pairs(batch: list) -> list:
    """The collate of these tests: the (dataset, sample) pairs as they come."""
    return batch


def make(sizes=(100, 50, 30), weights=(0.5, 0.3, 0.2), batch_size=4, **kw) -> Mixture:
    """A mixture over `range` datasets, so each sample is its own index."""
    names = kw.pop("names", [f"d{i}" for i in range(len(sizes))])
    return Mixture([range(n) for n in sizes], names, list(weights), batch_size, pairs, **kw)


def test_sampler_draws_as_rng_choice_and_a_permutation_per_epoch():
    """The sampler's fast draw is numpy's `rng.choice(n, p=...)`, as TextStream always drew, zero weights
    of exhausted sources included."""
    sizes, weights = [7, 5, 3], np.array([2.0, 1.0, 0.5])
    sampler = SourceSampler(sizes, list(weights), [4, 4, 4], [4, 0, 1], rank=1, world_size=2)
    rng, epoch, position = np.random.default_rng([4, 0, 1]), [0, 0, 0], [0, 0, 0]
    for _ in range(2000):
        s = int(rng.choice(3, p=weights / weights.sum()))
        order = np.random.default_rng([4, s, epoch[s]]).permutation(sizes[s])[1 : sizes[s] - sizes[s] % 2 : 2]
        assert sampler.draw() == (s, int(order[position[s]]))
        position[s] += 1
        if position[s] == len(order):
            epoch[s], position[s] = epoch[s] + 1, 0
    assert sampler.epoch == epoch and sampler.position == position and sum(sampler.samples) == 2000
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    capped = SourceSampler([4, 50, 50], [5.0, 1.0, 3.0], [0, 0, 0], [9], epochs=[1, 0, 0])
    capped.rng = b
    draws = [capped.draw()[0] for _ in range(3000)]
    p = np.array([5.0, 1.0, 3.0])
    for i, s in enumerate(draws):
        assert s == int(a.choice(3, p=p / p.sum()))
        if i + 1 == [j for j, d in enumerate(draws) if d == 0][-1] + 1:  # source 0 has run its epoch
            p = np.array([0.0, 1.0, 3.0])
    assert capped.exhausted == [True, False, False] and draws.count(0) == 4


def test_proportions_follow_the_weights():
    m = make(batch_size=100)
    counts = np.bincount([s for s, _ in itertools.chain(*itertools.islice(m, 200))], minlength=3)
    for count, p in zip(counts, [0.5, 0.3, 0.2]):  # 20k draws, within 4 binomial sigmas
        assert abs(count / 20_000 - p) < 4 * np.sqrt(p * (1 - p) / 20_000)


def test_each_epoch_visits_the_shard_once_and_ranks_split_the_dataset():
    epochs_by_rank = []
    for rank in range(3):
        m = make(sizes=[23, 9], weights=[1.0, 1.0], batch_size=1, epochs=[3, 0], rank=rank, world_size=3)
        seen = [i for ((s, i),) in itertools.islice(m, 200) if s == 0]
        assert len(seen) == 3 * 7 and m.sampler.exhausted[0]  # 23 // 3 a rank and epoch, then no more
        epochs = [seen[e * 7 : (e + 1) * 7] for e in range(3)]
        assert all(len(set(e)) == 7 for e in epochs)  # every index of the epoch's shard exactly once
        assert epochs[0] != epochs[1]  # reshuffled every epoch
        epochs_by_rank.append(epochs)
    for e in range(3):  # in each epoch the ranks' shards are disjoint and cover all but the remainder
        shards = [set(epochs_by_rank[r][e]) for r in range(3)]
        assert len(set.union(*shards)) == 21 and sum(map(len, shards)) == 21


def test_per_dataset_seeds_set_the_orders():
    def orders(seeds):
        m = make(sizes=[20, 20], weights=[1.0, 1.0], batch_size=10, seed=3, seeds=seeds)
        draws = list(itertools.chain(*itertools.islice(m, 6)))
        return [s for s, _ in draws], [[i for s, i in draws if s == d] for d in (0, 1)]

    (which_a, (a0, a1)), (which_b, (b0, b1)), (which_c, (c0, c1)) = (
        orders([1, 2]),
        orders([1, 2]),
        orders([1, 5]),
    )
    assert which_a == which_b == which_c  # the draws of datasets depend on `seed` only
    assert (a0, a1) == (b0, b1) and a0 == c0 and a1 != c1
    assert make(sizes=[20], weights=[1.0], seed=0).sampler.shard(0, 0).tolist() != (
        make(sizes=[20], weights=[1.0], seed=1).sampler.shard(0, 0).tolist()
    )


def test_exact_resume_through_json():
    kw = dict(sizes=[13, 8, 5], weights=[0.5, 0.3, 0.2], batch_size=5, epochs=[0, 3, 2], rank=1, world_size=2)
    m = make(**kw)
    reference, states = [], []
    for _ in range(60):
        reference.append(next(m))
        states.append(json.loads(json.dumps(m.state_dict())))
    assert all(m.sampler.exhausted[1:]) and m.batches == 60
    left = [
        k for k in range(1, 60) if states[k]["sampler"]["exhausted"] != states[k - 1]["sampler"]["exhausted"]
    ]
    for at in [0, 9, left[0] - 1, left[0], left[-1], 50]:
        resumed = make(**kw)
        resumed.load_state_dict(states[at])
        assert [next(resumed) for _ in reference[at + 1 :]] == reference[at + 1 :]
        assert resumed.consumed() == m.consumed() and resumed.batches == 60


@pytest.mark.parametrize(
    "change, what",
    [
        (dict(sizes=[13, 9, 5]), "sizes"),
        (dict(names=["a", "b", "c"]), "names"),
        (dict(world_size=3), "world_size"),
    ],
)
def test_a_state_from_another_mixture_is_refused(change, what):
    kw = dict(sizes=[13, 8, 5], rank=1, world_size=2)
    m = make(**kw)
    next(m)
    with pytest.raises(ValueError, match=what):
        make(**{**kw, **change}).load_state_dict(json.loads(json.dumps(m.state_dict())))


def test_epoch_caps_drop_a_dataset_and_renormalise():
    m = make(sizes=[40, 1000, 1000], weights=[0.6, 0.3, 0.1], batch_size=50, epochs=[1, 0, 0])
    draws = list(itertools.chain(*itertools.islice(m, 120)))
    last0 = max(k for k, (s, _) in enumerate(draws) if s == 0)
    assert sorted(i for s, i in draws if s == 0) == list(range(40))  # its one epoch, then gone
    assert m.consumed()[0]["exhausted"] and not m.consumed()[1]["exhausted"]
    after = np.bincount([s for s, _ in draws[last0 + 1 :]], minlength=3)
    share = after[1] / after[1:].sum()  # the others keep their ratio: 0.3 / (0.3 + 0.1)
    assert after[0] == 0 and abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / after[1:].sum())
    bounded = make(sizes=[10, 6], weights=[1.0, 1.0], batch_size=3, epochs=[2, 1])
    batches = list(bounded)  # 26 samples in all: 8 whole batches, the last two draws dropped
    assert len(batches) == bounded.count_batches() == 8
    with pytest.raises(StopIteration):
        next(bounded)


@pytest.mark.parametrize("batch_size, rank, world_size", [(4, 0, 1), (7, 1, 2), (1, 2, 3)])
def test_stop_after_ends_after_the_named_epochs_and_count_batches_is_exact(batch_size, rank, world_size):
    kw = dict(sizes=[30, 200], weights=[0.3, 0.7], batch_size=batch_size, rank=rank, world_size=world_size)
    m = make(stop_after=("d0", 2), **kw)
    counted, batches = m.count_batches(), list(m)
    assert counted == len(batches) > 0
    per_epoch = 30 // world_size
    record = m.consumed()[0]
    assert (record["epoch"], record["position"], record["samples"]) == (2, 0, 2 * per_epoch)
    assert any(s == 0 for s, _ in batches[-1])  # the last batch is the one its final epoch ended in
    with pytest.raises(StopIteration):
        next(m)
    assert m.state_dict()["batches"] == counted
    with pytest.raises(ValueError, match="endless"):
        make(**kw).count_batches()
    with pytest.raises(ValueError, match="stop_after"):
        make(stop_after=("nope", 1), **kw)


def test_stop_after_alone_drops_the_batch_it_cannot_fill():
    m = make(sizes=[10], weights=[1.0], batch_size=3, stop_after=("d0", 1))
    assert m.count_batches() == len(list(m)) == 3
    record = m.consumed()[0]  # the state is that of the last batch returned
    assert (record["epoch"], record["position"], record["samples"]) == (0, 9, 9)


def test_consumed_records_after_known_draws():
    m = make(sizes=[10, 3], weights=[1.0, 1e-9], batch_size=4, rank=1, world_size=2, seed=5)
    next(m), next(m)
    a, b = json.loads(json.dumps(m.consumed()))
    assert a == {
        "name": "d0",
        "shard": "1/2",
        "seed": 5,
        "epoch": 1,
        "position": 3,
        "epoch_samples": 5,
        "epochs": 1.6,
        "samples": 8,
        "exhausted": False,
    }
    assert (b["epoch"], b["position"], b["samples"], b["epoch_samples"]) == (0, 0, 0, 1)


def test_plan_says_over_or_under_one_epoch_and_when_a_cap_leaves():
    m = Mixture([range(1437), range(5000)], ["digits", "text"], [0.8, 0.2], 10, pairs)
    digits, text = m.plan(150)  # 1,500 samples: 1,200 digits, 300 texts
    assert digits.startswith("digits: ~1,200 of 1,437 samples per rank") and "under one epoch" in digits
    assert (
        text.startswith("text: ~300 of 5,000") and "0.06 epochs" in text and "most samples never seen" in text
    )
    digits, text = m.plan(1500)
    assert "~12,000 of 1,437" in digits and "~8.4 epochs" in digits and "over one epoch" in digits
    assert "~3,000 of 5,000" in text and "under one epoch" in text
    capped = Mixture([range(100), range(5000)], ["digits", "text"], [0.5, 0.5], 10, pairs, epochs=[2, 0])
    digits, text = capped.plan(1000)  # digits run out after 400 draws, ~40 batches; text takes the rest
    assert "~200 of 100" in digits and "capped at 2 epochs: leaves the mix after ~40 batches" in digits
    assert "~9,800 of 5,000" in text and "over one epoch" in text
    actual = next(k for k, _ in enumerate(capped) if capped.sampler.exhausted[0]) + 1
    assert abs(actual - 40) <= 8
    assert "not reached" in capped.plan(20)[0]
    stop = Mixture(
        [range(100), range(5000)], ["digits", "text"], [0.5, 0.5], 10, pairs, stop_after=("digits", 3)
    )
    digits, text = stop.plan(1000)
    assert "stop_after 3 epochs: ends the stream after ~60 batches" in digits and "~300 of 5,000" in text
    assert re.search(r"\(about one epoch", make(sizes=[100], weights=[1.0], batch_size=10).plan(10)[0])


def test_invalid_mixtures_name_the_dataset():
    with pytest.raises(ValueError, match="'d1' has 2 samples for 3 ranks"):
        make(sizes=[10, 2], weights=[1.0, 1.0], world_size=3)
    with pytest.raises(ValueError, match="'d0' has weight 0"):
        make(sizes=[10, 2], weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="unique"):
        make(sizes=[10, 2], weights=[1.0, 1.0], names=["a", "a"])
    with pytest.raises(ValueError, match="source 1 has 0 samples"):
        SourceSampler([3, 0], [1.0, 1.0], [0, 0], [0])


def test_text_stream_draws_through_the_sampler(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(9))
    )
    cfg = TextDataConfig(
        sources=[SourceConfig(path=str(tmp_path / "a"))], valid_fraction=0.0, seq_len=7, batch_size=2
    )
    with TextStream(cfg, ByteTokenizer()) as stream:
        for _ in range(5):
            next(stream)
        assert isinstance(stream.sampler, SourceSampler)
        assert stream.state_dict()["documents"] == stream.sampler.samples == stream.documents
        assert stream.epoch is stream.sampler.epoch and stream.consumed()[0]["documents"] == sum(
            stream.sampler.samples
        )
