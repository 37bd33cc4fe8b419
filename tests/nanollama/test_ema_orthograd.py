"""EMA of the weights and Orthograd, on toys: the closed forms they must equal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.nanollama.config import ConfigError, build_config
from src.nanollama.optim import EMA, OptimConfig, OrthoAdamW, build_optimizer, orthogonalize_gradients


def test_ema_after_n_steps_is_the_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    d = 0.8
    ema = EMA(model, d)
    w0 = [p.detach().clone() for p in model.parameters()]
    history = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in model.parameters()])
        ema.update()
    n = len(history)
    for i, shadow in enumerate(ema.state_dict().values()):
        expected = d**n * w0[i] + (1 - d) * sum(d ** (n - k) * history[k - 1][i] for k in range(1, n + 1))
        torch.testing.assert_close(shadow, expected)


def test_ema_swaps_in_and_out_and_consolidates_tied_names():
    model = nn.Linear(2, 2)
    ema = EMA(model, 0.5)
    own = model.weight.detach().clone()
    with torch.no_grad():
        ema.shadow["weight"].fill_(7.0)
    with ema.swapped():
        assert bool((model.weight == 7.0).all())
    assert torch.equal(model.weight, own)
    state = {"weight": model.weight.detach(), "bias": model.bias.detach(), "alias": model.weight.detach()}
    ema.aliases["alias"] = "weight"  # as a tied output.weight maps to tok_embeddings.weight
    full = ema.full_state_dict(state)
    assert bool((full["weight"] == 7.0).all()) and bool((full["alias"] == 7.0).all())
    assert torch.equal(full["bias"], model.bias.detach())


def test_orthograd_gradient_is_orthogonal_to_the_weight_with_its_norm():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.zeros(3))]
    grads = [torch.randn_like(p) + 0.5 * p.detach() for p in params]  # a component along w on purpose
    for p, g in zip(params, grads):
        p.grad = g.clone()
    orthogonalize_gradients(params)
    for param, g in zip(params[:2], grads[:2]):
        w, used = param.detach(), param.grad
        assert abs(float((used * w).sum())) < 1e-5 * float(used.norm() * w.norm())  # orthogonal
        assert float(used.norm()) == pytest.approx(float(g.norm()), rel=1e-5)  # the original norm
        orth = g - (g * w).sum() / (w * w).sum() * w  # g minus its projection on w, rescaled
        torch.testing.assert_close(used, orth * g.norm() / orth.norm())
    torch.testing.assert_close(params[2].grad, grads[2])  # zero weights: nothing to remove


def test_orthograd_optimizer_steps_adamw_on_the_orthogonal_gradient():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    cfg = build_config(OptimConfig, overrides=["name=orthograd"])
    ortho = build_optimizer(a, cfg, "cpu")
    plain = build_optimizer(b, build_config(OptimConfig), "cpu")  # the same AdamW, groups and decay
    assert isinstance(ortho, OrthoAdamW)
    for _ in range(3):
        x = torch.randn(8, 4)
        for m in (a, b):
            m.zero_grad()
            m(x).square().sum().backward()
        orthogonalize_gradients(list(b.parameters()))
        ortho.step()
        plain.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("override, key", [("name=sgd", "name"), ("ema_decay=1.0", "ema_decay")])
def test_bad_optimizer_keys(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config(OptimConfig, overrides=[override])
