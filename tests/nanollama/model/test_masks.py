"""CPU tests of attention masks: causal, documents, prefix-LM, sliding window; flex = sdpa; mask caching."""

import pytest
import torch
import torch.nn.functional as F

from src.nanollama.config import ConfigError
from src.nanollama.model import attention
from src.nanollama.model.attention import (
    build_mask,
    cached_mask,
    causal_mask,
    dense_mask,
    document_mask,
    prefix_lm_mask,
    sliding_window_mask,
)
from src.nanollama.model.transformer import Transformer, TransformerConfig

VOCAB = 61
CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    kwargs = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, **kwargs}
    return Transformer(TransformerConfig(vocab_size=VOCAB, **kwargs)).eval()


def tokens(B: int = 2, T: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def doc_ids(lengths: list[list[int]]) -> torch.Tensor:
    """(B, T) document ids from each row's document lengths."""
    return torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    )


DOCS = doc_ids([[7, 20, 13], [40]])  # T = 40, not a multiple of flex's 128 block
PREFIX = torch.tensor([9, 0])


def reference(name: str) -> torch.Tensor:
    """Each mask written out by loops, (B, T, T)."""
    B, T = DOCS.shape
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                m[b, q, k] = {
                    "causal": k <= q,
                    "document": k <= q and DOCS[b, q] == DOCS[b, k],
                    "prefix_lm": k <= q or k < PREFIX[b],
                    "sliding_window": k <= q < k + 5,
                }[name]
    return m


MASK_MODS = {
    "causal": causal_mask,
    "document": document_mask(DOCS, causal_mask),
    "prefix_lm": prefix_lm_mask(PREFIX, causal_mask),
    "sliding_window": sliding_window_mask(5),
}


@pytest.mark.parametrize("name", list(MASK_MODS))
def test_dense_mask_matches_its_definition(name: str):
    got = dense_mask(MASK_MODS[name], 2, 40, 40, CPU)
    assert got.shape == (2, 1, 40, 40) and torch.equal(got[:, 0], reference(name))


@pytest.mark.parametrize("name", list(MASK_MODS))
def test_flex_matches_sdpa_for_every_mask(name: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g) for h in (4, 2, 2))  # GQA
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference(name)[:, None], enable_gqa=True)
    for backend in attention.BACKENDS:
        got = attention.attend(q, k, v, build_mask(MASK_MODS[name], 2, 40, 40, CPU, backend), backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{"doc_ids": DOCS}, {"prefix_len": PREFIX}, {}])
@pytest.mark.parametrize("window", [0, 5])
def test_model_flex_forward_matches_sdpa(kwargs: dict, window: int):
    sdpa = make(sliding_window=window)
    flex = make(sliding_window=window, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(flex(x, **kwargs), sdpa(x, **kwargs), atol=1e-5, rtol=0)


def test_bidirectional_document_mask():
    model, x = make(causal=False), tokens()
    with torch.no_grad():
        packed = model(x, doc_ids=DOCS)
        alone = model(x[:1, 7:27])  # the second document of row 0, on its own
    torch.testing.assert_close(packed[:1, 7:27], alone, atol=1e-5, rtol=0)


def test_packed_documents_equal_separate_sequences():
    """RoPE sees only q - kv, so positions need not restart per document: same logits as alone."""
    model, x = make(), tokens()
    with torch.no_grad():
        packed = model(x, doc_ids=DOCS)
        for start, end in ((0, 7), (7, 27), (27, 40)):
            torch.testing.assert_close(packed[:1, start:end], model(x[:1, start:end]), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1:], model(x[1:]), atol=1e-5, rtol=0)  # one document: causal


def test_document_mask_training_step_keeps_documents_apart():
    """A CPU training step (sdpa, dense mask): the loss of one document has no gradient through another
    document's tokens, and changing those tokens changes neither its loss nor its gradients."""
    model = make().train()
    x = tokens()

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        model.zero_grad()
        h = model.tok_embeddings(x).detach().requires_grad_()
        logits = model.output(model.trunk(h, doc_ids=DOCS))
        loss = F.cross_entropy(logits[0, 7:26], x[0, 8:27])  # next tokens inside document 1 of row 0
        loss.backward()
        return loss, h.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, h_grad, grads = step(x)
    assert h_grad[0, 7:27].abs().sum() > 0
    assert h_grad[0, :7].abs().sum() == 0 and h_grad[0, 27:].abs().sum() == 0 and h_grad[1].abs().sum() == 0
    other = x.clone()
    other[0, :7], other[0, 27:], other[1] = 3, 5, 8  # every token outside document 1 of row 0
    loss2, _, grads2 = step(other)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, atol=1e-6, rtol=0, msg=name)


def test_prefix_is_bidirectional_and_the_rest_causal():
    model, x = make(), tokens(1, 20)
    prefix = torch.tensor([8])
    y = x.clone()
    y[0, 7] = (x[0, 7] + 1) % VOCAB  # last prefix token
    z = x.clone()
    z[0, 12] = (x[0, 12] + 1) % VOCAB  # after the prefix
    with torch.no_grad():
        base, in_prefix, after = (model(t, prefix_len=prefix) for t in (x, y, z))
    assert not torch.allclose(in_prefix[0, 0], base[0, 0])  # position 0 sees the end of the prefix
    assert torch.equal(after[0, :12], base[0, :12])  # nothing sees past the prefix causally


def test_sliding_window_at_least_the_length_is_causal():
    model, windowed = make(), make(sliding_window=40)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(windowed(x), model(x), atol=1e-5, rtol=0)
        assert not torch.allclose(make(sliding_window=4)(x)[:, 10:], model(x)[:, 10:])


def test_sliding_window_config_is_checked():
    with pytest.raises(ConfigError) as err:
        TransformerConfig(sliding_window=-1).check()
    assert err.value.key == "sliding_window"
    with pytest.raises(ConfigError) as err:
        TransformerConfig(sliding_window=8, causal=False).check()
    assert err.value.key == "sliding_window"


def test_too_large_dense_mask_names_the_sizes():
    with pytest.raises(ValueError, match=r"batch 2 x 16385 queries x 16385 keys"):
        dense_mask(causal_mask, 2, 16385, 16385, CPU)
    model = make(dim=16, n_heads=2, n_kv_heads=0, n_layers=1)
    x = torch.zeros(1, 2**14 + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="attention=flex"):
        model(x, doc_ids=torch.zeros_like(x))


def test_static_masks_are_built_once_per_shape(monkeypatch):
    """Causal and sliding-window masks are cached by (mask, length, device); document masks are built for
    every batch (their content changes), once per forward for all layers."""
    built = []

    def counting(*args, **kwargs):
        built.append(args[0])
        return create_block_mask(*args, **kwargs)

    create_block_mask = attention.create_block_mask
    monkeypatch.setattr(attention, "create_block_mask", counting)
    monkeypatch.setattr(attention, "_MASKS", {})
    x = tokens(T=136)  # 2 blocks of 128, so documents need a real (non-trivial) block mask
    docs = doc_ids([[60, 76], [136]])
    for window in (0, 16):
        model = make(sliding_window=window, attention="flex")
        with torch.no_grad():
            for _ in range(3):
                model(x)
        assert len(built) == 1, f"window {window}: built {len(built)} times"
        with torch.no_grad():
            for _ in range(2):
                model(x, doc_ids=docs)
        assert len(built) == 3  # once per forward, not per layer
        built.clear()
    assert set(attention._MASKS) == {
        ("causal", 136, CPU, True),
        ("sliding_window:16", 136, CPU, True),
    }
    sdpa = make(sliding_window=16)
    with torch.no_grad():
        sdpa(x)
        sdpa(x)
    assert (
        cached_mask("sliding_window:16", 136, CPU, block=False)
        is attention._MASKS[("sliding_window:16", 136, CPU, False)]
    )
