"""Linear probes: ~100% where the labels are a linear function of the features, ~chance on noise, and the
residual stream they read is the model's."""

from __future__ import annotations

import pytest
import torch

from src.nanollama.config import ConfigError, build_config
from src.nanollama.linear_probe import LinearProbeConfig, majority_chance, probe_accuracy, residual_streams
from src.nanollama.model.transformer import Transformer, TransformerConfig


def test_linearly_decodable_labels_are_decoded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=g) * torch.logspace(-2, 1, 16) + 3  # badly scaled on purpose
    y = (x @ torch.randn(16, 5, generator=g)).argmax(-1)
    score = probe_accuracy(x[:4000], y[:4000], x[4000:], y[4000:])
    assert score["accuracy"] > 0.98 and score["train_accuracy"] > 0.98
    assert score["chance"] < 0.6


def test_noise_is_at_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=g)
    y = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 6000, replacement=True, generator=g)
    score = probe_accuracy(x[:4000], y[:4000], x[4000:], y[4000:])
    assert score["chance"] == pytest.approx(0.5, abs=0.04)
    assert abs(score["accuracy"] - score["chance"]) < 0.03


def test_majority_chance():
    assert majority_chance(torch.tensor([2, 2, 1]), torch.tensor([2, 0, 0, 2])) == 0.5


def test_residual_streams_are_the_model_s():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=7, dim=16, n_layers=3, n_heads=2))
    tokens = torch.randint(0, 7, (5, 6))
    streams = residual_streams(model, tokens, batch_size=2)
    assert len(streams) == 4 and all(s.shape == (5, 6, 16) for s in streams)
    torch.testing.assert_close(streams[0], model.tok_embeddings(tokens).detach())
    torch.testing.assert_close(model.output(model.norm(streams[-1])), model(tokens).detach())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_config_check():
    with pytest.raises(ConfigError, match="test_fraction"):
        build_config(LinearProbeConfig, {"test_fraction": 1.0})
    with pytest.raises(ConfigError, match="n_sequences"):
        build_config(LinearProbeConfig, {"n_sequences": 3, "test_fraction": 0.1})
    assert build_config(LinearProbeConfig, {"n_sequences": 8}).n_test == 2
