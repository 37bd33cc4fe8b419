"""CPU tests of the SigLIP vision encoder: HF parity (full, truncated), round trips, pixel shuffle, errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.nanollama.config import ConfigError
from src.nanollama.model.vision import (
    VisionConfig,
    VisionEncoder,
    export_siglip,
    from_siglip_state_dict,
    load_siglip,
    load_siglip_weights,
    pixel_shuffle,
    pixel_unshuffle,
    siglip_config,
    to_siglip_state_dict,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

HF_KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    num_channels=3,
)


def hf_vision(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**(HF_KW | kwargs))).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def pixels(B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def hf_outputs(model, x: torch.Tensor):
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("siglip") / "vision"
    hf_vision().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    return transformers.SiglipVisionModel.from_pretrained(hf_folder).eval()


def ours(folder: Path, select_layer: int = -1) -> VisionEncoder:
    cfg = siglip_config(folder)
    cfg.select_layer = select_layer
    return VisionEncoder(cfg).eval()


def test_config_from_hf(hf_folder):
    cfg = siglip_config(hf_folder)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim) == (32, 3, 4, 64)
    assert (cfg.image_size, cfg.patch_size, cfg.channels, cfg.n_patches) == (16, 4, 3, 16)
    assert cfg.ffn_dim == 64 and cfg.select_layer == -1 and cfg.pretrained == str(hf_folder)


def test_last_hidden_state_matches_hf(hf_folder, hf_model):
    enc, x = ours(hf_folder), pixels()
    with torch.no_grad():
        y = enc(x)
    assert y.shape == (2, 16, 32)
    assert (y - hf_outputs(hf_model, x).last_hidden_state).abs().max() < 1e-4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_select_layer_matches_hf_hidden_states(hf_folder, hf_model, k):
    enc, x = ours(hf_folder, k), pixels()
    assert len(enc.layers) == k == enc.cfg.built_layers and enc.post_layernorm is None
    with torch.no_grad():
        y = enc(x)
    out = hf_outputs(hf_model, x)
    assert len(out.hidden_states) == 4  # embeddings, then each block
    assert (y - out.hidden_states[k]).abs().max() < 1e-4
    if k == 3:  # block 3 without post-norm is not last_hidden_state: the norm really is skipped
        assert (y - out.last_hidden_state).abs().max() > 1e-2


def test_round_trip_exact_and_hf_loads_export(hf_folder, hf_model, tmp_path):
    enc = ours(hf_folder)
    out = export_siglip(enc, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
    original = {
        k: v for k, v in load_file(hf_folder / "model.safetensors").items() if not k.startswith("head.")
    }
    exported = load_file(out / "model.safetensors")
    assert all(k.startswith("vision_model.") for k in exported)
    exported = {k.removeprefix("vision_model."): v for k, v in exported.items()}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model" and config["hidden_act"] == "gelu_pytorch_tanh"
    reloaded = transformers.SiglipVisionModel.from_pretrained(out).eval()
    x = pixels(seed=3)
    assert torch.equal(hf_outputs(reloaded, x).last_hidden_state, hf_outputs(hf_model, x).last_hidden_state)
    cfg, state = load_siglip(out)  # and ours again: same config, same tensors
    assert cfg.dim == 32 and cfg.n_layers == 3 and cfg.select_layer == -1
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(ConfigError, match="already exists"):
        export_siglip(enc, out)


def test_truncated_export_reloads_same_encoder(hf_folder, tmp_path):
    enc = ours(hf_folder, 2)
    out = export_siglip(enc, tmp_path / "trunc")
    cfg = siglip_config(out)
    assert cfg.select_layer == 2 and cfg.n_layers == 2
    x = pixels()
    with torch.no_grad():
        y = enc(x)
        assert torch.equal(VisionEncoder(cfg).eval()(x), y)
    hf = transformers.SiglipVisionModel.from_pretrained(out).eval()
    assert (hf_outputs(hf, x).hidden_states[2] - y).abs().max() < 1e-4


def test_full_siglip_model_loads_without_text(tmp_path):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    text |= dict(vocab_size=50, max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=text, vision_config=HF_KW)
    full = transformers.SiglipModel(config).eval()
    full.save_pretrained(tmp_path / "full")
    keys = load_file(tmp_path / "full" / "model.safetensors").keys()
    assert any(k.startswith("text_model.") for k in keys) and "logit_scale" in keys
    cfg, state = load_siglip(tmp_path / "full")
    assert cfg.n_layers == 3 and not any("text" in k or "head" in k for k in state)
    enc, x = VisionEncoder(cfg).eval(), pixels()
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x).last_hidden_state
        assert (enc(x) - expected).abs().max() < 1e-4


def test_sharded_checkpoint_and_bare_file(hf_folder, tmp_path):
    state = load_file(hf_folder / "model.safetensors")
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    x = pixels()
    with torch.no_grad():
        y = ours(folder)(x)
        assert torch.equal(y, ours(hf_folder)(x))
    # A bare .safetensors: the shapes come from our own config; pretrained loads it at init.
    file = str(hf_folder / "model.safetensors")
    bare = VisionEncoder(VisionConfig(image_size=16, dim=32, n_layers=3, ffn_dim=64, pretrained=file)).eval()
    enc = VisionEncoder(VisionConfig(image_size=16, dim=32, n_layers=3, ffn_dim=64))
    assert load_siglip_weights(enc, file) == len(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(bare(x), y) and torch.equal(enc.eval()(x), y)


def test_random_init_deterministic_and_meta():
    cfg = VisionConfig()
    torch.manual_seed(0)
    a = VisionEncoder(cfg)
    with torch.device("meta"):
        b = VisionEncoder(cfg)
    assert b.patch_embedding.weight.is_meta
    b.to_empty(device="cpu")
    torch.manual_seed(5)
    a.init_weights()
    torch.manual_seed(5)
    b.init_weights()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    y = a(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, cfg.n_patches, cfg.dim) and torch.isfinite(y).all()
    assert cfg.n_patches == 64 and cfg.head_dim == 16 and cfg.hidden_dim == 256 and cfg.built_layers == 2
    names = set(to_siglip_state_dict(a.state_dict()))
    assert "vision_model.encoder.layers.1.self_attn.out_proj.bias" in names
    assert from_siglip_state_dict(to_siglip_state_dict(a.state_dict())).keys() == a.state_dict().keys()


def test_attention_is_bidirectional():
    enc = VisionEncoder(VisionConfig(image_size=8, patch_size=4, n_layers=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    x2 = x.clone()
    x2[..., 4:, 4:] += 1.0  # change only the last patch
    with torch.no_grad():
        assert not torch.allclose(enc(x)[:, 0], enc(x2)[:, 0])  # the first patch sees it


def test_pixel_shuffle_shapes_inverse_and_order():
    x = torch.randn(2, 36, 5)
    for f in (1, 2, 3, 6):
        y = pixel_shuffle(x, f)
        assert y.shape == (2, 36 // f**2, 5 * f**2)
        assert torch.equal(pixel_unshuffle(y, f), x)
    # 4x4 grid, patch value = its index 0..15 (row-major); factor 2 -> 2x2 tokens of 4 patches each.
    grid = torch.arange(16.0).view(1, 16, 1)
    tokens = pixel_shuffle(grid, 2)[0].tolist()
    assert tokens == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # With D > 1, each patch's D values stay together, patches in (row, col) order within the token.
    two = torch.stack([torch.arange(16.0), -torch.arange(16.0)], dim=-1).unsqueeze(0)
    assert pixel_shuffle(two, 2)[0, 1].tolist() == [2, -2, 3, -3, 6, -6, 7, -7]
    for bad, f in ((torch.randn(1, 15, 2), 1), (torch.randn(1, 36, 2), 4)):
        with pytest.raises(ValueError):
            pixel_shuffle(bad, f)


def test_config_errors(hf_folder, tmp_path):
    cases = [
        (dict(image_size=30, patch_size=4), "patch_size", "must divide image_size (30), got 4"),
        (dict(n_heads=5), "n_heads", "must divide dim"),
        (dict(select_layer=0), "select_layer", "got 0"),
        (dict(select_layer=3), "select_layer", "got 3"),
        (dict(dim=0), "dim", "positive"),
        (dict(pretrained=str(tmp_path / "nope")), "pretrained", f"not found: {tmp_path / 'nope'}"),
    ]
    for kwargs, key, message in cases:
        with pytest.raises(ConfigError) as e:
            VisionEncoder(VisionConfig(**kwargs))
        assert e.value.key == key and message in e.value.message
    # Shape mismatch: a 64-wide encoder cannot take the 32-wide checkpoint.
    enc = VisionEncoder(VisionConfig(image_size=16, dim=64, n_layers=3))
    with pytest.raises(ConfigError) as e:
        load_siglip_weights(enc, hf_folder)
    assert e.value.key == "vision.pretrained"
    assert "embeddings.patch_embedding.weight has shape (32, 3, 4, 4)" in e.value.message
    assert "(64, 3, 4, 4)" in e.value.message and "\n" not in str(e.value)
    # A full (select_layer -1) encoder with fewer blocks than the file would post-norm the wrong block.
    with pytest.raises(ConfigError, match="3 layers, the encoder has 2"):
        load_siglip_weights(
            VisionEncoder(VisionConfig(image_size=16, dim=32, n_layers=2, ffn_dim=64)), hf_folder
        )


def test_file_errors(hf_folder, tmp_path):
    state = load_file(hf_folder / "model.safetensors")
    enc = VisionEncoder(VisionConfig(image_size=16, dim=32, n_layers=3, ffn_dim=64))
    bad = tmp_path / "extra.safetensors"
    save_file(state | {"vision_model.encoder.layers.0.mystery.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError) as e:
        load_siglip_weights(enc, bad)
    assert str(bad) in str(e.value) and "vision_model.encoder.layers.0.mystery.weight" in str(e.value)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "encoder.layers.2.mlp.fc2.bias"}, missing)
    with pytest.raises(ConfigError) as e:
        load_siglip_weights(enc, missing)
    assert str(missing) in str(e.value) and "missing tensor encoder.layers.2.mlp.fc2.bias " in str(e.value)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((hf_folder / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ConfigError) as e:
        load_siglip(corrupt)
    assert str(corrupt / "model.safetensors") in str(e.value) and "\n" not in str(e.value)
    (corrupt / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json"):
        siglip_config(corrupt)
    (corrupt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        siglip_config(corrupt)
