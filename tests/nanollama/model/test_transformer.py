"""CPU tests of the core transformer: shapes, masks, GQA, backends, init, config, compile, HF parity."""

import math
import os
from dataclasses import dataclass, field

import pytest
import torch

from src.nanollama.config import ConfigError, build_config
from src.nanollama.hf import to_hf_config, to_hf_name
from src.nanollama.model import attention
from src.nanollama.model.attention import flex_backward_available
from src.nanollama.model.rope import RotaryEmbedding, rope_tables
from src.nanollama.model.transformer import Transformer, TransformerConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 61
# Eager flex on CPU is unfused by design here; attention.py silences this, but pytest resets filters.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=VOCAB, **kwargs)).eval()


def tokens(B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_dtype():
    for kwargs in ({}, {"n_kv_heads": 2}, {"causal": False}, {"tie_embeddings": True}):
        logits = make(**kwargs)(tokens(3, 17))
        assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32


def test_causal_mask_hides_future():
    x, y = tokens(seed=1), tokens(seed=2)
    y[:, :10] = x[:, :10]  # same past, different future
    causal = make()
    assert torch.equal(causal(x)[:, :10], causal(y)[:, :10])
    assert not torch.allclose(causal(x)[:, 10:], causal(y)[:, 10:])
    bidirectional = make(causal=False)
    assert not torch.allclose(bidirectional(x)[:, :10], bidirectional(y)[:, :10])


def test_gqa_equals_repeated_kv_heads():
    gqa = make(n_heads=4, n_kv_heads=2)
    mha = make(n_heads=4)
    group, head_dim = 2, gqa.cfg.head_dim
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # kv head j serves query heads j*group...
            state[name] = w.view(-1, head_dim, w.shape[1]).repeat_interleave(group, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_forward_matches_sdpa(causal: bool):
    sdpa = make(n_kv_heads=2, causal=causal)
    flex = make(n_kv_heads=2, causal=causal, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    x = tokens(T=40)  # not a multiple of the 128 block size
    with torch.no_grad():
        torch.testing.assert_close(flex(x), sdpa(x), atol=1e-5, rtol=0)


def test_new_masks_need_only_a_mask_mod(monkeypatch):
    """A mask added to MASK_MODS works on both backends: sdpa through a dense mask, flex through blocks."""
    monkeypatch.setitem(attention.MASK_MODS, "causal_via_mask_mod", attention.causal_mask)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    expected = attention.attend(q, k, v, "causal", "sdpa")
    for backend in attention.BACKENDS:
        got = attention.attend(q, k, v, "causal_via_mask_mod", backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    block_mask = attention.cached_mask("causal", 40, torch.device("cpu"), block=True)
    assert attention.cached_mask("causal", 40, torch.device("cpu"), block=True) is block_mask  # built once


def test_flex_backward_only_off_cpu():
    assert not flex_backward_available(torch.device("cpu"))
    assert flex_backward_available("cuda")


def test_tied_embeddings_share_storage():
    untied, tied = make(), make(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    n_untied = sum(p.numel() for p in untied.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_untied - n_tied == VOCAB * tied.cfg.dim


def test_init_statistics():
    model = make(dim=256, n_layers=4, n_heads=4)
    std = model.cfg.init_std
    scaled = std / math.sqrt(2 * model.cfg.n_layers)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        assert abs(p.std().item() - expected) < 0.03 * expected, name
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_init_is_deterministic_and_works_from_meta_device():
    a, b = make(seed=3, n_kv_heads=2), make(seed=3, n_kv_heads=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        meta = Transformer(a.cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.init_weights()
    torch.manual_seed(5)
    a.init_weights()
    x = tokens()
    assert torch.equal(meta(x), a(x))


def test_state_dict_holds_only_parameters():
    model = make()
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_rope_tables_grow_on_demand():
    rope = RotaryEmbedding(head_dim=8, theta=100.0, length=4)
    cos, sin = rope(10)
    assert cos.shape == sin.shape == (10, 8) and rope.cos.shape[0] >= 10
    expected_cos, expected_sin = rope_tables(10, 8, 100.0, torch.device("cpu"))
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_backward_reaches_every_parameter():
    model = make(n_kv_heads=2).train()
    x = tokens()
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@dataclass
class RootConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["vocab_size=-1"], "model.vocab_size"),
        (["n_heads=3"], "model.n_heads"),  # does not divide dim=64
        (["n_kv_heads=3"], "model.n_kv_heads"),  # does not divide n_heads=4
        (["dim=40", "n_heads=8"], "model.dim"),  # head_dim 5 is odd: no RoPE pairs
        (["attention=xformers"], "model.attention"),
        (["norm_eps=0"], "model.norm_eps"),
        (["n_layers=0"], "model.n_layers"),
    ],
)
def test_config_check_names_the_key(overrides: list[str], key: str):
    with pytest.raises(ConfigError) as err:
        build_config(RootConfig, overrides=[f"model.{o}" for o in overrides])
    assert err.value.key == key


def test_config_allows_unset_vocab_but_model_requires_it():
    TransformerConfig().check()  # vocab_size=0: the app fills it in
    with pytest.raises(ConfigError) as err:
        Transformer(TransformerConfig())
    assert err.value.key == "vocab_size"


def test_ffn_dim_follows_llama_rule():
    assert TransformerConfig(dim=256).hidden_dim == 704  # 8/3 * 256 = 682.7 -> multiple of 32
    assert TransformerConfig(dim=4096, multiple_of=256).hidden_dim == 11008  # Llama-2 7B
    assert TransformerConfig(dim=64, ffn_dim=100).hidden_dim == 100


def test_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model = make(dim=32, n_layers=1, n_heads=2)
    x = tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    model = make(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500.0, tie_embeddings=tie)
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg))
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {to_hf_name(name): tensor for name, tensor in model.state_dict().items()}
    if tie:
        del state["lm_head.weight"]  # HF ties it to model.embed_tokens.weight itself
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    x = tokens(2, 33)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits.float()
    assert (ours - theirs).abs().max().item() < 1e-4
