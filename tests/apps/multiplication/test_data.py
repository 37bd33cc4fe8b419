"""The multiplication app's data, schedules and model pieces, in process (fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.apps.multiplication.data import (
    ANSWER,
    LATENT,
    SPLITS,
    DataConfig,
    MultiplicationTokenizer,
    ProblemStream,
    RowLayout,
    collate,
    format_line,
    load_split,
    make_problem,
    parse_line,
    read_problems,
    running_sums,
    split_of,
    value,
)
from src.apps.multiplication.evaluation import generate_continuous, read_answer
from src.apps.multiplication.make_data import main as make_data
from src.apps.multiplication.model import MultiplicationModel
from src.apps.multiplication.modes import Schedule, TeacherForcingConfig, TrainingConfig
from src.nanollama.config import FileError, build_config
from src.nanollama.model.transformer import Transformer, TransformerConfig

# The Internalize-CoT layout (Deng et al.'s data files): digits least significant first.
DENG_LINE = (
    "5 6 3 2 * 7 4 3 4||5 9 4 5 1 + 0 0 6 2 5 1 ( 5 9 0 8 6 1 ) + 0 0 5 9 0 7 0 ( 5 9 5 7 7 8 0 ) + "
    "0 0 0 0 6 2 9 0 ( 5 9 5 7 3 1 0 1 ) #### 5 9 5 7 3 1 0 1"
)


@pytest.mark.parametrize("k, m", [(1, 1), (2, 3), (4, 4), (5, 2)])
def test_chain_of_thought_arithmetic(k, m):
    """Every partial product is a * b_j * 10^j, every running sum the sum so far, the answer a * b."""
    rng = np.random.default_rng(k * 10 + m)
    for _ in range(50):
        a, b = int(rng.integers(10 ** (k - 1), 10**k)), int(rng.integers(10 ** (m - 1), 10**m))
        p = make_problem(a, b, k, m)
        assert value(p.a) == a and value(p.b) == b and len(p.answer) == k + m and value(p.answer) == a * b
        assert len(p.steps) == m
        total = 0
        for j, step in enumerate(p.steps):
            if j:
                assert step[0] == "+" and step[-1] == ")"
                partial, running = step[1 : step.index("(")], step[step.index("(") + 1 : -1]
            else:
                partial, running = step, step
            b_j = (b // 10**j) % 10
            total += a * b_j * 10**j
            assert len(partial) == len(running) == k + 1 + j
            assert value([int(d) for d in partial]) == a * b_j * 10**j
            assert value([int(d) for d in running]) == total
        sums = running_sums(p.a, p.b)
        assert [s % 10 for s in sums] == p.answer


def test_lines_round_trip_and_deng_format_reads():
    p = make_problem(2365, 4347, 4, 4)
    assert parse_line(format_line(p)) == p
    assert format_line(p).startswith("5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 )")
    q = parse_line(DENG_LINE)
    assert q.a == [5, 6, 3, 2] and q.b == [7, 4, 3, 4] and q.answer == [5, 9, 5, 7, 3, 1, 0, 1]
    assert len(q.steps) == 4 and q.steps[0] == "5 9 4 5 1".split() and q.steps[1][0] == "+"
    assert format_line(q) == DENG_LINE


@pytest.mark.parametrize(
    "line, why",
    [
        ("5 6 * 7 4 5 9 0 4", "expected"),
        ("5 6 * 7 4||5 x 4 #### 5 9 0 4", "chain"),
        ("5 6 7 4||5 9 4 #### 5 9 0 4", "question"),
        ("56 * 7 4||5 9 4 #### 5 9 0 4", "single digits"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "train.txt"
    path.write_text(DENG_LINE + "\n\n" + line + "\n")
    with pytest.raises(FileError, match=why) as e:
        read_problems(path)
    assert e.value.key == f"{path}:3"


def test_make_data_splits_share_no_problem(tmp_path, capsys):
    make_data([f"out={tmp_path}", "k=2", "m=2", "train=800", "valid=100", "test=100"])
    splits = {s: read_problems(tmp_path / f"{s}.txt") for s in ("train", "valid", "test")}
    keys = {s: {(value(p.a), value(p.b)) for p in ps} for s, ps in splits.items()}
    assert [len(keys[s]) for s in keys] == [800, 100, 100]  # no repeats within a file either
    assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]
    a, b = (np.array([k[i] for k in keys["valid"]]) for i in (0, 1))
    assert (split_of(a, b) == 1).all()


def test_stream_resumes_exactly_and_ranks_differ():
    tok = MultiplicationTokenizer()
    cfg = DataConfig(k=3, m=3)
    stream = ProblemStream(cfg, tok, 8, seed=0)
    stream.layout = lambda rng: RowLayout("cot")
    next(stream)
    state = stream.state_dict()
    expected = next(stream)
    other = ProblemStream(cfg, tok, 8, seed=0)
    other.layout = stream.layout
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(next(other), expected))
    rank1 = ProblemStream(cfg, tok, 8, seed=0, rank=1, world_size=2)
    rank1.layout = stream.layout
    rank1.load_state_dict(state)
    assert not torch.equal(next(rank1)[0], expected[0])


def test_curriculum_and_removal_schedules():
    data = DataConfig(k=4, m=4)
    latent = build_config(
        TrainingConfig, {"mode": "latent", "latent": {"per_step": 2}, "curriculum": {"stage_steps": 10}}
    )
    s = Schedule(latent, data)
    assert [s.stage(step) for step in (0, 9, 10, 25, 39, 40, 1000)] == [0, 0, 1, 2, 3, 4, 4]
    assert s.max_latents == 8
    assert s.layout(3) == RowLayout("latent", latents=6, skip_steps=3)
    tokens, roles, _ = collate([make_problem(1234, 5678, 4, 4)], MultiplicationTokenizer(8), [s.layout(4)])
    assert int((roles == LATENT).sum()) == 8 and int((roles == ANSWER).sum()) == 9

    internalize = build_config(
        TrainingConfig,
        {"mode": "internalize", "internalize": {"delta": 20}, "curriculum": {"stage_steps": 5}},
    )
    s = Schedule(internalize, data)
    assert s.chain_len == 56 and s.last_stage == 3
    assert [s.stage(step) for step in (0, 4, 5, 14, 15, 99)] == [0, 0, 1, 2, 3, 3]
    assert [s.layout(k).removed for k in range(4)] == [0, 20, 40, 56]
    rng = np.random.default_rng(0)
    removed = np.array([s.layout(1, rng).removed for _ in range(2000)]) - 20
    assert removed.min() == 0 and (removed == 0).mean() == pytest.approx(1 - np.exp(-4), abs=0.02)
    assert s.layout(0, rng).removed == 0  # no offset before the first removal

    tf = TeacherForcingConfig(schedule="linear", start_step=10, ramp_steps=10, max_share=0.5)
    assert [tf.share(step) for step in (0, 10, 15, 20, 50)] == [0, 0, 0.25, 0.5, 0.5]
    tf.schedule = "cosine"
    assert tf.share(15) == pytest.approx(0.25) and tf.share(20) == pytest.approx(0.5)
    tf.schedule = "step"
    assert (tf.share(9), tf.share(10)) == (0, 0.5)


def tiny_model(continuous: bool, aux_layer: int | None = 0) -> MultiplicationModel:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=30, dim=32, n_layers=2, n_heads=4)
    return MultiplicationModel(Transformer(cfg), continuous, aux_layer)


def test_continuous_thoughts_kv_cached_equal_naive_recomputation():
    model = tiny_model(continuous=True)
    tokens = torch.randint(0, 30, (3, 14))
    cached, cached_aux = model(tokens, 5, 4, cached=True)
    naive, naive_aux = model(tokens, 5, 4, cached=False)
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_aux, naive_aux, atol=1e-5, rtol=1e-5)
    (cached.square().mean() + cached_aux.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (naive.square().mean() + naive_aux.sum()).backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    plain = tiny_model(continuous=False)  # thoughts change what follows them
    assert not torch.allclose(plain(tokens, 5, 4)[0][:, 9:], naive[:, 9:])


def test_continuous_generation_is_greedy_decoding_of_the_naive_model():
    model = tiny_model(continuous=True, aux_layer=None).eval()
    prompts, n = torch.randint(0, 30, (2, 5)), 3
    got = generate_continuous(model, prompts, n, 6, eos=-1)
    seq = torch.cat([prompts, torch.zeros(2, n, dtype=torch.long)], 1)
    for _ in range(6):
        logits, _ = model(seq, 5, n, cached=False)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == seq[:, 5 + n :].tolist()


def test_read_answer_takes_the_digits_after_the_last_separator():
    tok = MultiplicationTokenizer()
    ids = tok.encode("1 2 + 3 #### 4 5 #### 6 7 <eos> 8")
    assert read_answer(ids, tok) == [6, 7]
    assert read_answer(tok.encode("6 7"), tok) == [6, 7]


def test_every_config_builds_and_the_sweep_crosses_mode_and_size():
    from pathlib import Path

    from src.apps.multiplication.train import TrainConfig
    from src.nanollama.config import read_yaml
    from src.nanollama.launcher import expand_grid

    folder = Path("src/apps/multiplication/configs")
    for path in sorted(folder.glob("*.yaml")):
        build_config(TrainConfig, read_yaml(path))
    same = [build_config(TrainConfig, read_yaml(folder / f"{m}4x4.yaml")) for m in ("plain", "cot", "latent")]
    assert len({(c.model.dim, c.model.n_layers, c.data.batch_size) for c in same}) == 1
    sweep = read_yaml(folder / "sweep.yaml")
    points = expand_grid(sweep["grid"])
    assert {(p["train.mode"], p["data.k"]) for p in points} == {
        (m, k) for m in ("plain", "cot", "latent", "internalize") for k in (3, 4, 5)
    }


def test_an_eval_split_holds_each_problem_once():
    """2x2's test split holds 417 problems: asking for 1,000 gives those 417, once each, not 1,000 draws."""
    small = load_split(DataConfig(k=2, m=2), "test", 1000, seed=0)
    pairs = [(tuple(p.a), tuple(p.b)) for p in small]
    assert len(pairs) == len(set(pairs)) == 417
    a = np.array([value(p.a) for p in small])
    b = np.array([value(p.b) for p in small])
    assert (split_of(a, b) == SPLITS.index("test")).all()
    assert load_split(DataConfig(k=2, m=2), "test", 50, seed=0) == small[:50]  # a prefix: the same problems
    large = load_split(DataConfig(k=4, m=4), "valid", 512, seed=0)  # drawn, not listed
    assert len({(tuple(p.a), tuple(p.b)) for p in large}) == 512
