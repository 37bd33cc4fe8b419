"""CPU tests of cached decoding and generation: cache = full forward, batching, sampling, stops, backends."""

import pytest
import torch

from src.nanollama.model.generate import generate, left_pad, sample
from src.nanollama.model.transformer import Transformer, TransformerConfig

VOCAB = 61
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    kwargs = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, **kwargs}
    return Transformer(TransformerConfig(vocab_size=VOCAB, **kwargs)).eval()


def prompts(lengths: tuple[int, ...] = (5, 12, 1, 8), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def cached_logits(model: Transformer, tokens: torch.Tensor, chunks: list[int], **kwargs) -> torch.Tensor:
    """Logits of `tokens` fed through a KV cache in chunks of the given sizes (a prefill, then steps)."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + 3)
    out, t = [], 0
    for size in chunks:
        out.append(model(tokens[:, t : t + size], cache=cache, **kwargs))
        t += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 4}])
def test_cached_decoding_matches_full_forward(backend: str, extra: dict):
    model = make(attention=backend, **extra)
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
    got = cached_logits(model, x, [7] + [1] * 10 + [3])  # prefill, single steps, a multi-token step
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bucketed_cache_attention_equals_full_cache_attention(backend: str):
    """Attending to the filled prefix rounded up to a power of two gives the full cache's logits."""
    model = make(attention=backend)
    x = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full_cache = cached_logits(model, x, [20] + [1] * 60)
        cache, out, filled = model.new_cache(2, 96), [], 0
        for size in [20] + [1] * 60:
            filled += size
            out.append(model(x[:, filled - size : filled], cache=cache))
            assert cache.kv_len == 96 or filled <= cache.kv_len < 2 * max(filled, 32)
            cache.attend_to(filled + 1)  # the next step's slot
    assert [cache.attend_to(n) for n in (1, 32, 33, 64, 65, 96, 97)] == [32, 32, 64, 64, 96, 96, 96]
    torch.testing.assert_close(torch.cat(out, dim=1), full_cache, atol=1e-5, rtol=0)


def test_generation_across_buckets_is_argmax_of_full_forward():
    model = make()
    prompt = prompts((30,))[0]
    out = generate(model, [prompt], max_new_tokens=50)[0]  # buckets 32, 64, then all 96 slots
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(50):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert out == tokens[len(prompt) :]


def test_cache_stores_kv_heads_once():
    model = make(n_heads=4, n_kv_heads=2)
    cache = model.new_cache(3, 16)
    assert len(cache.k) == model.cfg.n_layers
    assert cache.k[0].shape == (3, 2, 16, model.cfg.head_dim) == cache.v[0].shape


def test_left_padded_rows_match_their_own_forward():
    """Per-row positions and the key-padding mask: each padded row gives its unpadded logits."""
    model = make()
    rows = prompts((9, 4, 1))
    tokens, start = left_pad(rows, torch.device("cpu"))
    cache = model.new_cache(len(rows), 16, start)
    with torch.no_grad():
        logits = model(tokens, cache=cache)
        for row, prompt in enumerate(rows):
            alone = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(logits[row, -len(prompt) :], alone, atol=1e-5, rtol=0)


def test_prefix_lm_prefill_matches_full_forward():
    model = make()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    prefix_len = torch.tensor([5, 8])
    with torch.no_grad():
        full = model(x, prefix_len=prefix_len)
    # The whole prefix must be in the cache before the rest is decoded: prefill 8 >= both prefixes.
    got = cached_logits(model, x, [8, 1, 1, 2], prefix_len=prefix_len)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_mixed_lengths_batch_equals_each_prompt_alone():
    model = make()
    batch = prompts()
    together = generate(model, batch, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in batch]
    assert together == alone
    assert all(len(row) == 12 for row in together)


def test_greedy_is_argmax_of_full_forward():
    model = make()
    prompt = prompts((6,))[0]
    new = generate(model, [prompt], max_new_tokens=5)[0]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert new == tokens[len(prompt) :]


def test_sampling_is_reproducible_with_a_seed():
    model = make()
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, prompts(), seed=3, **kwargs)
    assert a == generate(model, prompts(), seed=3, **kwargs)
    assert a != generate(model, prompts(), seed=4, **kwargs)


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).expand(4000, VOCAB)
    drawn = sample(logits, 2.0, 5, 1.0, torch.Generator().manual_seed(0))
    best = set(logits[0].topk(5).indices.tolist())
    assert set(drawn.tolist()) == best  # all k reachable, nothing else


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 0, 0.7, g).tolist()) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(sample(logits, 1.0, 0, 0.5, g).tolist()) == {1}  # the best token alone reaches 0.5
    assert set(sample(logits, 1.0, 0, 1.0, g).tolist()) == {0, 1, 2, 3}
    assert set(sample(logits, 0.0, 0, 1.0, g).tolist()) == {1}  # temperature 0: greedy


def test_stop_tokens_end_rows():
    model = make()
    batch = prompts()
    free = generate(model, batch, max_new_tokens=12)
    stop = free[0][3]  # a token row 0 emits at step 3 (maybe earlier too)
    stopped = generate(model, batch, max_new_tokens=12, stop_tokens=[stop])
    for row, full in zip(stopped, free, strict=True):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:end]  # unchanged up to and including the stop token, nothing after it
    assert len(stopped[0]) <= 4


def test_all_rows_stopped_ends_early():
    model = make()
    first = generate(model, [[1, 2, 3]], max_new_tokens=1)[0][0]
    assert generate(model, [[1, 2, 3]], max_new_tokens=50, stop_tokens=[first], stop_check_every=1) == [
        [first]
    ]


def test_flex_and_sdpa_generate_the_same_tokens():
    sdpa, flex = make(), make(attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    batch = prompts()
    assert generate(flex, batch, max_new_tokens=8) == generate(sdpa, batch, max_new_tokens=8)


def test_generate_refuses_empty_prompts_and_bidirectional_models():
    with pytest.raises(ValueError, match="at least one token"):
        generate(make(), [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="causal"):
        generate(make(causal=False), [[1]], max_new_tokens=2)
    assert generate(make(), [[1], [2]], max_new_tokens=0) == [[], []]


def test_compiled_decode_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model = make(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    batch = prompts((3, 7))
    eager = generate(model, batch, max_new_tokens=40)  # across the 32-slot bucket into the 64 one
    assert generate(model, batch, max_new_tokens=40, compile=True) == eager
    assert generate(model, batch[::-1], max_new_tokens=40, compile=True) == eager[::-1]  # reuses the steps
    torch._dynamo.reset()
