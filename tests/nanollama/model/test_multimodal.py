"""Multimodal inputs to the core transformer: spliced embeddings, prefix-LM attention, and generation that
reads a prefix of embeddings before its prompt (cached = full forward, batched = one by one)."""

import pytest
import torch

from src.nanollama.model.generate import generate, prefill
from src.nanollama.model.transformer import Transformer, TransformerConfig

VOCAB, DIM = 53, 32
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=VOCAB, dim=DIM, n_heads=4, n_kv_heads=2, n_layers=2, **kwargs)
    return Transformer(cfg).eval()


def test_spliced_embeddings_equal_a_hand_built_input():
    model = make()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 1:4] = True  # row 0: three embeddings at 1..3
    mask[1, 5:8] = True  # row 1: three at 5..7
    extra = torch.randn(2, 3, DIM, generator=g, requires_grad=True)
    hand = model.tok_embeddings(tokens).detach().clone()
    hand[0, 1:4], hand[1, 5:8] = extra[0].detach(), extra[1].detach()
    spliced = model(tokens, embeddings=extra, splice_mask=mask)
    torch.testing.assert_close(spliced, model(embeddings=hand), atol=0, rtol=0)
    assert not torch.equal(spliced, model(tokens))  # the embeddings did replace something
    spliced.sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0  # gradients reach the spliced inputs


def test_tokens_and_embeddings_without_a_mask_are_refused():
    model = make()
    with pytest.raises(ValueError, match="splice_mask"):
        model(torch.zeros(1, 3, dtype=torch.long), embeddings=torch.zeros(1, 3, DIM))
    with pytest.raises(ValueError, match="needs tokens"):
        model()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_prefix_lm_mask_semantics(backend: str):
    """Image + prompt (the prefix) attend both ways, the answer causally: changing an answer token leaves
    every prefix output alone; changing a prompt token changes the outputs before it (inside the prefix)
    and everything after it."""
    model = make(attention=backend)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(1, 4, DIM, generator=g)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=g)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, :4] = True
    prefix = 7  # 4 image slots + 3 prompt tokens; 5 answer tokens follow
    prefix_len = torch.tensor([prefix])

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(t, embeddings=image, splice_mask=mask, prefix_len=prefix_len)

    base = run(tokens)
    answer_changed = tokens.clone()
    answer_changed[0, 9] = (tokens[0, 9] + 1) % VOCAB
    out = run(answer_changed)
    torch.testing.assert_close(out[:, :9], base[:, :9], atol=1e-6, rtol=0)  # before the change: same
    assert not torch.allclose(out[:, 9:], base[:, 9:])

    prompt_changed = tokens.clone()
    prompt_changed[0, 5] = (tokens[0, 5] + 1) % VOCAB
    out = run(prompt_changed)
    for t in range(12):  # every position, image slots included, sees the prompt token
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-6), t

    with torch.no_grad():  # a plain causal model: image slots would not see the later prompt token
        causal = model(prompt_changed, embeddings=image, splice_mask=mask)
        causal_base = model(tokens, embeddings=image, splice_mask=mask)
    torch.testing.assert_close(causal[:, :5], causal_base[:, :5], atol=1e-6, rtol=0)


def greedy_by_full_forward(model: Transformer, image: torch.Tensor, prompt: list[int], n: int, lm: bool):
    """Reference decoding: the whole sequence re-run without a cache at every step."""
    k, out = len(image), []
    for _ in range(n):
        tokens = torch.tensor([[0] * k + prompt + out])
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[0, :k] = True
        prefix_len = torch.tensor([k + len(prompt)]) if lm else None
        with torch.no_grad():
            logits = model(tokens, embeddings=image, splice_mask=mask, prefix_len=prefix_len)
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_generation_with_a_prefix_of_embeddings(prefix_lm: bool):
    """Cached greedy decoding after a prefix equals full forwards; a batch of rows with different prefix
    and prompt lengths equals each row alone."""
    model = make()
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(k, DIM, generator=g) for k in (4, 4, 2, 6)]
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 1, 5, 0)]
    batched = generate(model, prompts, 6, prefix=images, prefix_lm=prefix_lm)
    for image, prompt, got in zip(images, prompts, batched):
        assert generate(model, [prompt], 6, prefix=[image], prefix_lm=prefix_lm) == [got]
        assert greedy_by_full_forward(model, image, prompt, 6, prefix_lm) == got


def test_prefix_lm_changes_the_prefill():
    """Bidirectional reading of the prompt is a different model of it: the first new token's logits
    differ from a causal prefill's."""
    model = make(seed=3)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(4, DIM, generator=g) for _ in range(3)]
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 2, 3)]
    with torch.no_grad():
        causal, _ = prefill(model, prompts, 4, images)
        both_ways, _ = prefill(model, prompts, 4, images, prefix_lm=True)
    assert (causal - both_ways).abs().amax(-1).min() > 1e-4  # every row
