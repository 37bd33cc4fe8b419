"""The dVAE's pieces on their own: quantisers (ReinMax against Algorithm 2, Gumbel-softmax), the KL and
beta-TCVAE estimates, the schedules and the evaluation monitors on hand-made codes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.apps.dvae.data import INPUT, OUTPUT, GridVocab
from src.apps.dvae.evaluation import Tally
from src.apps.dvae.losses import kl_uniform, mws_terms, reconstruction_loss
from src.apps.dvae.model import (
    DVAE,
    DVAEConfig,
    QuantiserConfig,
    draw_uniforms,
    gumbel_softmax,
    lattice_prior,
    quantise,
    sample_codes,
)
from src.apps.dvae.schedules import ScheduleConfig
from src.apps.dvae.train import StepValues, TrainConfig
from src.nanollama.config import ConfigError, build_config, read_yaml, validate
from src.nanollama.distributed import Cluster, ClusterConfig
from src.nanollama.model.transformer import TransformerConfig


def draws(kind: str, logits: torch.Tensor, seed: int) -> torch.Tensor:
    return draw_uniforms(kind, logits.shape, torch.Generator().manual_seed(seed), logits.device)


def algorithm_2(logits: torch.Tensor, tau: float, sample: torch.Tensor) -> torch.Tensor:
    """ReinMax as Liu et al. 2023 write it (Algorithm 2), with autograd doing the backward pass."""
    pi0 = logits.softmax(-1)
    pi1 = (sample + (logits / tau).softmax(-1)) / 2
    pi1 = ((pi1.log() - logits).detach() + logits).softmax(-1)
    pi2 = 2 * pi1 - pi0 / 2
    return pi2 - pi2.detach() + sample


@pytest.mark.parametrize("tau", [1.0, 1.5, 3.0])
def test_reinmax_forward_is_one_hot_and_backward_matches_algorithm_2(tau):
    torch.manual_seed(0)
    logits = torch.randn(8, 5, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(8, 5, 7, dtype=torch.float64)
    weights, codes = quantise(logits, "reinmax", tau, uniform=draws("reinmax", logits, 1))
    assert torch.equal(weights, F.one_hot(codes, 7).double())  # one-hot, the sampled codes
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    reference = algorithm_2(logits, tau, F.one_hot(codes, 7).double())
    (expected,) = torch.autograd.grad((reference * upstream).sum(), logits)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert not torch.allclose(grad, torch.zeros_like(grad))


def test_reinmax_samples_follow_softmax_without_noise():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5]]]).expand(20000, 1, 4)
    codes = sample_codes(logits, draws("reinmax", logits, 0))
    freq = torch.bincount(codes.flatten(), minlength=4).double() / codes.numel()
    assert torch.allclose(freq, logits[0, 0].double().softmax(-1), atol=0.01)


def test_reinmax_refuses_tau_below_one():
    cfg = QuantiserConfig(kind="reinmax", tau=ScheduleConfig("cosine", 1.0, 0.5, 100))
    with pytest.raises(ConfigError, match="tau.end: reinmax needs tau >= 1"):
        validate(cfg)
    validate(QuantiserConfig(kind="reinmax", tau=ScheduleConfig("linear", 2.0, 1.0, 100)))
    validate(QuantiserConfig(kind="gumbel", tau=ScheduleConfig("cosine", 1.0, 0.0625, 100)))


def test_gumbel_soft_sums_to_one_and_tends_to_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(64, 4, 10)
    distances = []
    for tau in (2.0, 0.5, 0.1, 0.01, 0.0001):
        y = gumbel_softmax(logits, tau, draws("gumbel", logits, 0))
        assert torch.allclose(y.sum(-1), torch.ones(64, 4), atol=1e-5)
        distances.append(float((y - F.one_hot(y.argmax(-1), 10)).abs().sum(-1).mean()))
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-3


def test_gumbel_hard_rows_are_one_hot_with_the_soft_gradient():
    logits = torch.randn(6, 3, 5, requires_grad=True)
    hard_rows = torch.tensor([True, False, True, False, False, True])
    y, codes = quantise(logits, "gumbel", 0.7, hard_rows, draws("gumbel", logits, 2))
    assert torch.equal(y[hard_rows], F.one_hot(codes[hard_rows], 5).float())
    assert not torch.equal(y[~hard_rows], F.one_hot(codes[~hard_rows], 5).float())
    soft = gumbel_softmax(logits, 0.7, draws("gumbel", logits, 2))
    upstream = torch.randn(6, 3, 5)
    (a,) = torch.autograd.grad((y * upstream).sum(), logits)
    (b,) = torch.autograd.grad((soft * upstream).sum(), logits)
    assert torch.allclose(a, b, atol=1e-6)


def test_kl_to_uniform_matches_the_closed_form():
    K = 16
    assert float(kl_uniform(torch.zeros(4, 8, K))) == pytest.approx(0.0, abs=1e-7)  # uniform posterior
    assert float(kl_uniform(torch.full((2, 3, K), 7.0))) == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.full((2, 3, K), -1e4)
    one_hot[..., 0] = 0
    assert float(kl_uniform(one_hot)) == pytest.approx(math.log(K), rel=1e-6)
    logits = torch.randn(5, 4, K)
    q = logits.softmax(-1)
    assert float(kl_uniform(logits)) == pytest.approx(float((q * (q * K).log()).sum(-1).mean()), rel=1e-5)


def test_mws_terms_sum_to_the_sampled_kl():
    torch.manual_seed(0)
    logits = torch.randn(32, 6, 10) * 2
    codes = sample_codes(logits, draws("reinmax", logits, 0))
    t = mws_terms(logits, codes, dataset_size=1000)
    assert float(t["mi"] + t["tc"] + t["dim_kl"]) == pytest.approx(float(t["kl_sampled"]), abs=1e-5)
    logq = logits.log_softmax(-1).gather(2, codes.unsqueeze(-1)).squeeze(-1)  # log q(z_i | x_i)
    direct = (logq.sum(1) + 6 * math.log(10)).mean() / 6
    assert float(t["kl_sampled"]) == pytest.approx(float(direct), rel=1e-5)


def test_mws_tc_is_nonnegative_on_large_independent_batches():
    """Independent positions (a product posterior): TC >= 0 on average over large batches."""
    tcs = []
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(512, 4, 8, generator=g) * 3
        codes = sample_codes(logits, torch.rand(512, 4, generator=g))
        tcs.append(float(mws_terms(logits, codes, dataset_size=512)["tc"]))
    assert np.mean(tcs) >= 0


def test_reconstruction_loss_weights_pads():
    vocab = GridVocab()
    targets = torch.tensor([[1, 2, vocab.eos, vocab.pad, vocab.pad]])
    logits = torch.randn(1, 5, vocab.size)
    ce = F.cross_entropy(logits[0], targets[0], reduction="none")
    assert float(reconstruction_loss(logits, targets, vocab.pad, 0.0)) == pytest.approx(float(ce[:3].mean()))
    assert float(reconstruction_loss(logits, targets, vocab.pad, 1.0)) == pytest.approx(float(ce.mean()))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (ScheduleConfig("constant", 0.3, 9.0, 10), {0: 0.3, 5: 0.3, 100: 0.3}),
        (ScheduleConfig("linear", 0.0, 0.5, 10), {0: 0.0, 5: 0.25, 10: 0.5, 50: 0.5}),
        (ScheduleConfig("cosine", 0.0, 6.6, 5000), {0: 0.0, 2500: 3.3, 5000: 6.6, 9000: 6.6}),
        (ScheduleConfig("cosine", 1.0, 1 / 16, 150_000), {0: 1.0, 75_000: (1 + 1 / 16) / 2, 150_000: 1 / 16}),
        (ScheduleConfig("linear", 1.0, 2.0, 0), {0: 2.0}),
    ],
)
def test_schedule_values(schedule, expected):
    for step, value in expected.items():
        assert schedule.value(step) == pytest.approx(value)
    quarter = ScheduleConfig("cosine", 0.0, 1.0, 100).value(25)
    assert quarter == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))


def test_step_values_of_a_run_config():
    cfg = build_config(TrainConfig, read_yaml("src/apps/dvae/configs/gumbel.yaml"))
    at = {step: StepValues.at(cfg, step) for step in (0, 1500, 3000, 3999, 4000, 8000)}
    assert at[0].tau == 1.0 and at[8000].tau == pytest.approx(0.25) and at[4000].tau == pytest.approx(0.625)
    assert at[0].noise == 0.0 and at[1500].noise == pytest.approx(0.5) and at[3000].noise == 1.0
    assert at[3999].hard_prob == 0.0 and at[4000].hard_prob == 0.5  # hard rows from hard_start on
    assert at[0].beta == 0.0 and at[4000].beta == pytest.approx(0.05) and at[0].mask_share == 0.0
    cfg.quantiser.kind = "reinmax"
    assert StepValues.at(cfg, 1500).hard_prob == 0.0 and StepValues.at(cfg, 0).noise == 1.0


def test_vocab_ids_come_from_the_model_config():
    cfg = DVAEConfig(n_colours=10)
    validate(cfg)
    v = cfg.vocab
    assert (v.row_end, v.eos, v.pad, v.mask, v.size) == (10, 11, 12, 13, 14)
    assert cfg.encoder.vocab_size == cfg.decoder.vocab_size == 14
    wide = DVAEConfig(n_colours=12)
    validate(wide)
    assert (wide.vocab.row_end, wide.vocab.pad, wide.encoder.vocab_size) == (12, 14, 16)
    with pytest.raises(ConfigError, match="encoder.causal"):
        validate(DVAEConfig(encoder=TransformerConfig(causal=True)))


def test_model_shapes_and_gradients_reach_the_encoder():
    cfg = DVAEConfig(n_latents=3, n_codes=8)
    cfg.encoder = TransformerConfig(dim=16, n_layers=1, n_heads=2, causal=False)
    cfg.decoder = TransformerConfig(dim=16, n_layers=1, n_heads=2, causal=False)
    validate(cfg)
    model = DVAE(cfg, max_size=3)
    tokens = torch.randint(0, 14, (4, 16))  # a (3 + 1) x (3 + 1) canvas
    for kind in ("gumbel", "reinmax"):
        recon, logits, codes = model(tokens, kind, 1.0, None, torch.Generator().manual_seed(0))
        assert recon.shape == (4, 16, 14) and logits.shape == (4, 3, 8) and codes.shape == (4, 3)
        assert recon.dtype == torch.float32
        model.zero_grad()
        recon.logsumexp(-1).sum().backward()
        assert model.encoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())  # no unused parameter (DDP)


def test_lattice_prior_anchors_tile_the_canvas():
    side = 11
    prior = lattice_prior(32, side, 0.5)  # a 4 x 8 lattice
    assert prior.shape == (32, side * side) and float(prior.max()) <= 0
    peaks = prior.argmax(1)
    rows, cols = peaks // side, peaks % side
    assert rows.unique().numel() == 4 and cols.unique().numel() == 8  # every anchor has its own cell
    assert bool((rows.view(4, 8).diff(dim=0) > 0).all()) and bool((cols.view(4, 8).diff(dim=1) > 0).all())
    wide = lattice_prior(32, side, 2.0)
    assert bool((wide >= prior).all()) and float((wide - prior).max()) > 1  # wider: a flatter bias
    assert lattice_prior(7, side, 0.5).shape == (7, side * side)  # a prime: one row of 7


def tiny_dvae(locality: float) -> DVAE:
    cfg = DVAEConfig(n_latents=4, n_codes=8, locality=locality)
    cfg.encoder = TransformerConfig(dim=16, n_layers=1, n_heads=2, causal=False)
    cfg.decoder = TransformerConfig(dim=16, n_layers=1, n_heads=2, causal=False)
    validate(cfg)
    torch.manual_seed(0)
    return DVAE(cfg, max_size=7)  # an 8 x 8 canvas, anchors on a 2 x 2 lattice


@pytest.mark.parametrize("locality", [0.25, 0.0])
def test_lattice_prior_ties_each_latent_to_its_region(locality):
    """With the prior, a cell moves the logits of the latent anchored near it far more than those of the
    latent across the canvas; without it (locality 0) attention starts uniform: no latent is singled out."""
    model = tiny_dvae(locality)
    assert (model.prior is None) == (locality == 0)
    assert "prior" not in model.state_dict()  # rebuilt from the config
    tokens = torch.zeros(1, 64, dtype=torch.long)
    changed = tokens.clone()
    changed[0, 1 * 8 + 1] = 5  # cell (1, 1): next to latent 0's anchor (2, 2), far from latent 3's (6, 6)
    with torch.no_grad():
        delta = (model.encode(changed) - model.encode(tokens)).norm(dim=-1)[0]
    if locality:
        assert float(delta[0]) > 20 * float(delta[3])
    else:
        assert float(delta[0]) < 3 * float(delta[3])


def test_locality_must_be_nonnegative():
    with pytest.raises(ConfigError, match="locality"):
        validate(DVAEConfig(locality=-1.0))


@pytest.mark.parametrize("kind", ["gumbel", "reinmax"])
def test_the_training_forward_compiles_to_one_graph(kind):
    """The quantiser's generator draws are made before the model runs: no graph break (4 graphs before)."""
    model = tiny_dvae(0.5)
    tokens = torch.randint(0, 14, (4, 64))
    hard_rows = torch.tensor([True, False, True, False])
    explained = torch._dynamo.explain(model)(tokens, kind, 1.0, hard_rows, torch.Generator().manual_seed(0))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_monitors_on_hand_made_codes():
    vocab = GridVocab()
    pad, eos, re = vocab.pad, vocab.eos, vocab.row_end
    targets = torch.tensor([[1, 2, re, eos, pad], [3, re, eos, pad, pad], [4, 4, re, eos, pad]])
    # row 0: only a pad position wrong (not counted); row 1: its eos wrong
    pred = torch.tensor([[1, 2, re, eos, 5], [3, re, 7, pad, pad], [4, 4, re, eos, pad]])
    tally = Tally(n_codes=4)
    roles = torch.tensor([INPUT, OUTPUT, OUTPUT])
    tally.add_batch(pred, targets, roles, torch.ones(3), pad)
    tally.add_batch(pred, targets, roles, torch.zeros(3), pad)  # filler rows count nothing
    tally.add_codes(torch.tensor([[0, 1], [0, 1], [0, 0]]))
    tally.add_pairs(torch.tensor([[0, 1], [0, 0]]), torch.tensor([[0, 1], [1, 1]]))  # 0 and 2 changes
    with Cluster(ClusterConfig(device="cpu")) as cluster:
        m = tally.reduce(cluster).metrics()
    assert m["token_accuracy"] == pytest.approx(10 / 11)
    assert m["sample_accuracy"] == pytest.approx(2 / 3)
    assert m["input_token_accuracy"] == 1.0 and m["input_sample_accuracy"] == 1.0
    assert m["output_token_accuracy"] == pytest.approx(6 / 7) and m["output_sample_accuracy"] == 0.5
    assert m["codebook_usage"] == pytest.approx(2 / 4)
    freq = np.array([4, 2]) / 6
    assert m["codebook_perplexity"] == pytest.approx(math.exp(-(freq * np.log(freq)).sum()))
    assert m["pair_code_changes"] == pytest.approx(1.0) and m["n_pairs"] == 2 and m["n_grids"] == 3
