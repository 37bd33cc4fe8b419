import numpy as np
import pytest
import torch

from src.apps.gssm.data import DataConfig, GeneratedStream, eval_batches
from src.apps.gssm.generator import GSSM
from src.apps.gssm.graph import GSSMConfig
from src.nanollama.config import ConfigError
from src.nanollama.distributed import micro_batch_size


def test_ranks_draw_different_data_and_the_stream_resumes():
    gssm = GSSM(GSSMConfig())
    rank0, rank1 = GeneratedStream(gssm, 4, 16, seed=0, rank=0), GeneratedStream(gssm, 4, 16, seed=0, rank=1)
    assert not torch.equal(next(rank0), next(rank1))
    state = rank0.state_dict()
    expected = [next(rank0) for _ in range(3)]
    again = GeneratedStream(gssm, 4, 16, seed=0, rank=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (next(again) for _ in range(3)), strict=True))


def test_global_batch_splits_exactly():
    assert micro_batch_size(32, world_size=2, accumulation_steps=4) == 4
    with pytest.raises(ConfigError, match="data.batch_size"):
        micro_batch_size(30, world_size=4, accumulation_steps=1)


def test_eval_set_is_fixed_and_split_across_ranks():
    gssm, cfg = GSSM(GSSMConfig()), DataConfig(seq_len=8)
    whole = [t for t, _ in eval_batches(cfg, gssm, n_sequences=12, batch_size=4, seed=3, rank=0, world=1)]
    assert all(
        torch.equal(a, b) for a, b in zip(whole, (t for t, _ in eval_batches(cfg, gssm, 12, 4, 3, 0, 1)))
    )
    halves = [list(eval_batches(cfg, gssm, 12, 4, 3, rank, 2)) for rank in (0, 1)]
    for i, batch in enumerate(whole):  # two ranks together see exactly the one-rank evaluation set
        assert torch.equal(halves[0][i][0], batch[0::2]) and torch.equal(halves[1][i][0], batch[1::2])
        assert np.all(halves[0][i][1] <= 0)
