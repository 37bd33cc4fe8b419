"""RoPE scaling (linear, NTK-aware, YaRN): factor 1 is plain RoPE, tables equal Hugging Face's
ROPE_INIT_FUNCTIONS, NTK checked by hand, tables stay non-persistent and are rebuilt on init, and
exported scaled models give HF Llama the same logits."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from src.nanollama import hf
from src.nanollama.config import ConfigError
from src.nanollama.model.io import load_model, load_model_config, save_model
from src.nanollama.model.rope import (
    SCALINGS,
    RopeScaling,
    RotaryEmbedding,
    ntk_theta,
    rope_frequencies,
    rope_tables,
)
from src.nanollama.model.transformer import Transformer, TransformerConfig

CPU = torch.device("cpu")
VOCAB = 29


def scaled(kind: str, factor: float = 4.0, original: int = 64, **betas: float) -> RopeScaling:
    return RopeScaling(kind, factor, original, **betas)


# ------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("kind", SCALINGS)
def test_factor_one_is_plain_rope_bit_for_bit(kind: str):
    plain = rope_tables(300, 16, 500.0, CPU)
    for table, expected in zip(rope_tables(300, 16, 500.0, CPU, scaled(kind, 1.0)), plain, strict=True):
        assert torch.equal(table, expected)


def hf_rope_init(kind: str, head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """HF's own inv_freq and attention factor for a LlamaConfig with this rope_scaling."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params: dict = {"rope_type": kind, "factor": scaling.factor, "rope_theta": theta}
    if kind == "yarn":
        params |= {"original_max_position_embeddings": scaling.original_length}
        params |= {"beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_scaling=params,
        max_position_embeddings=round(scaling.factor * max(scaling.original_length, 1)),
    )
    return ROPE_INIT_FUNCTIONS[kind](config, CPU)


@pytest.mark.parametrize(
    "head_dim, theta, factor, original, betas",
    [
        (16, 1e4, 4.0, 64, {}),
        (64, 5e5, 8.0, 4096, {}),
        (32, 1e4, 2.5, 100, {}),
        (128, 1e6, 16.0, 8192, {"beta_fast": 16.0, "beta_slow": 2.0}),
        (8, 1e2, 1.0, 16, {}),
    ],
)
@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_linear_and_yarn_equal_hf_rope_init_functions(kind, head_dim, theta, factor, original, betas):
    scaling = scaled(kind, factor, original, **betas)
    hf_inv_freq, hf_attention = hf_rope_init(kind, head_dim, theta, scaling)
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling)
    assert torch.equal(inv_freq, hf_inv_freq)
    assert attention == pytest.approx(hf_attention, rel=1e-12)
    if kind == "yarn" and factor > 1:
        assert attention == pytest.approx(0.1 * math.log(factor) + 1)


def test_ntk_by_hand():
    """theta' = theta * factor^(d/(d-2)): the first frequency is kept, the last is divided by factor."""
    d, theta, factor = 8, 100.0, 4.0
    assert ntk_theta(theta, factor, d) == pytest.approx(100.0 * 4.0 ** (8 / 6))
    inv_freq, attention = rope_frequencies(d, theta, scaled("ntk", factor))
    plain, _ = rope_frequencies(d, theta)
    expected = torch.tensor([(100.0 * 4.0 ** (8 / 6)) ** (-2 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert inv_freq[0] == 1.0 and attention == 1.0
    assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / factor, rel=1e-6)
    assert (inv_freq < plain)[1:].all() and (inv_freq > plain / factor)[1:-1].all()  # in between


def test_linear_position_interpolation_is_plain_rope_at_position_over_factor():
    cos, sin = rope_tables(64, 16, 1e4, CPU, scaled("linear", 4.0))
    plain_cos, plain_sin = rope_tables(16, 16, 1e4, CPU)
    torch.testing.assert_close(cos[::4], plain_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[::4], plain_sin, rtol=0, atol=1e-6)


def test_yarn_keeps_fast_dims_interpolates_slow_ones_and_scales_cos_sin():
    d, theta, original, factor = 64, 1e4, 64, 4.0
    inv_freq, attention = rope_frequencies(d, theta, scaled("yarn", factor, original))
    plain, _ = rope_frequencies(d, theta)
    rotations = original * plain / (2 * math.pi)  # turns of each dim over the training length
    assert torch.equal(inv_freq[rotations > 32], plain[rotations > 32])  # beta_fast: extrapolated
    assert torch.equal(inv_freq[rotations < 1], plain[rotations < 1] / factor)  # beta_slow: interpolated
    cos, sin = rope_tables(3, d, theta, CPU, scaled("yarn", factor, original))
    assert torch.allclose(cos[0], torch.full((d,), attention)) and attention > 1
    assert torch.allclose(cos[1] ** 2 + sin[1] ** 2, torch.full((d,), attention**2))


# --------------------------------------------------------------------------------------------- module


def model_config(**kwargs) -> TransformerConfig:
    return TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, **kwargs)


YARN = {"rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_length": 16}


def test_tables_are_not_saved_and_are_rebuilt_by_init_weights_and_reset():
    torch.manual_seed(0)
    model = Transformer(model_config(**YARN))
    assert not any("cos" in name or "sin" in name for name in model.state_dict())
    expected = rope_tables(4096, 16, 1e4, CPU, scaled("yarn", 4.0, 16))
    assert torch.equal(model.rope.cos, expected[0]) and torch.equal(model.rope.sin, expected[1])
    with torch.device("meta"):
        meta = Transformer(model_config(**YARN))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.rope.cos, expected[0]) and torch.equal(meta.rope.sin, expected[1])
    model.rope.cos.zero_()
    model.rope.reset()
    assert torch.equal(model.rope.cos, expected[0])


def test_tables_grow_with_their_scaling():
    rope = RotaryEmbedding(8, 100.0, length=4, scaling=scaled("yarn", 4.0, 8))
    cos, sin = rope(40)
    expected_cos, expected_sin = rope_tables(40, 8, 100.0, CPU, scaled("yarn", 4.0, 8))
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_scaled_model_is_the_plain_one_at_factor_one_and_differs_otherwise(kind: str):
    torch.manual_seed(0)
    plain = Transformer(model_config()).eval()
    one = Transformer(model_config(rope_scaling=kind, rope_original_length=16)).eval()
    four = Transformer(model_config(rope_scaling=kind, rope_factor=4.0, rope_original_length=16)).eval()
    one.load_state_dict(plain.state_dict())
    four.load_state_dict(plain.state_dict())
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(one(x), plain(x))
        assert not torch.allclose(four(x), plain(x))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rope_scaling": "dynamic"}, "rope_scaling"),
        ({"rope_scaling": "linear", "rope_factor": 0.5}, "rope_factor"),
        ({"rope_factor": 4.0}, "rope_factor"),  # no effect without a scaling: refused, not ignored
        ({"rope_scaling": "yarn", "rope_factor": 4.0}, "rope_original_length"),
        ({"rope_original_length": -1}, "rope_original_length"),
        ({"rope_scaling": "yarn", "rope_original_length": 8, "rope_beta_slow": 64.0}, "rope_beta_fast"),
        ({"rope_scaling": "ntk", "rope_factor": 2.0, "dim": 4}, "rope_scaling"),  # head_dim 2
    ],
)
def test_bad_scaling_config_names_the_key(kwargs: dict, key: str):
    cfg = dataclasses.replace(model_config(), **kwargs)
    with pytest.raises(ConfigError) as error:
        cfg.check()
    assert error.value.key == key, error.value


# ---------------------------------------------------------------------------------- Hugging Face


def export(tmp_path, **rope) -> tuple[Transformer, dict]:
    """A trained-looking model with this RoPE, exported; returns it and the config.json written."""
    torch.manual_seed(0)
    model = Transformer(model_config(n_kv_heads=1, **rope)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    (tmp_path / "ckpt").mkdir()
    save_model(tmp_path / "ckpt", model.cfg, model.state_dict())
    hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    return model, json.loads((tmp_path / "hf" / "config.json").read_text())


def assert_hf_logits_match(folder, model: Transformer, T: int = 80) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (reference(x).logits.float() - model(x)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(
    "rope, hf_scaling",
    [
        ({"rope_scaling": "linear", "rope_factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        (
            {**YARN, "rope_beta_fast": 16.0},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0},
        ),
    ],
)
def test_linear_and_yarn_export_to_hf_rope_scaling_with_the_same_logits(tmp_path, rope: dict, hf_scaling):
    model, config = export(tmp_path, **rope)
    assert hf_scaling.items() <= config["rope_scaling"].items()
    assert_hf_logits_match(tmp_path / "hf", model)  # 80 positions: 5x yarn's original length
    hf.import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_model_config(tmp_path / "back") == model.cfg
    without_ours = {k: v for k, v in config.items() if k != "nanollama"}  # as if saved by transformers
    assert hf.from_hf_config(without_ours, tmp_path / "x") == model.cfg


def test_ntk_exports_as_plain_rope_with_its_base(tmp_path):
    """Static NTK is exactly plain RoPE with base theta * factor^(d/(d-2)); HF's "dynamic" NTK is not
    (it rescales with the sequence length), so it is not used."""
    model, config = export(tmp_path, rope_scaling="ntk", rope_factor=4.0)
    assert config["rope_scaling"] is None and config["rope_theta"] == ntk_theta(1e4, 4.0, 16)
    assert_hf_logits_match(tmp_path / "hf", model)
    hf.import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_model_config(tmp_path / "back") == model.cfg  # our own config comes back, ntk included


def test_import_of_a_yarn_folder_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=1e3,
        max_position_embeddings=96,
        rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32},
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "ours")
    model = load_model(tmp_path / "ours")
    cfg = model.cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_length) == ("yarn", 3.0, 32)
    assert_hf_logits_match(tmp_path / "hf", model, T=100)


@pytest.mark.parametrize(
    "rope, needle",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic'"),
        ({"rope_type": "yarn", "factor": 2.0, "mscale": 0.7, "mscale_all_dim": 0.7}, "mscale"),
        ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.5}, "attention_factor"),
        ({"rope_type": "yarn", "factor": 2.0, "truncate": False}, "truncate"),
        ({"rope_type": "linear"}, "without a factor"),
    ],
)
def test_import_refuses_rope_it_cannot_reproduce(tmp_path, rope: dict, needle: str):
    config = {**hf.to_hf_config(model_config()), "rope_scaling": rope, "nanollama": None}
    with pytest.raises(ConfigError) as error:
        hf.from_hf_config(config, tmp_path / "config.json")
    assert error.value.key == "hf" and needle in str(error.value), error.value
