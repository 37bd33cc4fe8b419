"""Activation checkpointing recomputes each block in backward: same losses and gradients, fewer saved
tensors, and nothing changes outside training (no grad, KV cache) or under FSDP across two ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.nanollama.config import to_yaml
from src.nanollama.model.transformer import Transformer, TransformerConfig
from src.nanollama.monitor.run_config import RESUME_FIXED, RESUME_MAY_CHANGE, check_against_run
from tests.conftest import GSSM_TINY, losses, run_module

VOCAB = 37


def model(checkpointing: bool, **kwargs) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, n_layers=3, activation_checkpointing=checkpointing, **kwargs)
    return Transformer(cfg)


def loss_and_grads(m: Transformer, tokens: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict]:
    logits = m(tokens[:, :-1], **kwargs)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def saved_tensors(m: Transformer, tokens: torch.Tensor) -> int:
    """How many tensors autograd keeps for backward: what checkpointing saves memory on."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(tokens)
    return count


@pytest.mark.parametrize("kwargs", [{}, {"n_kv_heads": 2, "tie_embeddings": True}, {"causal": False}])
def test_same_loss_and_gradients(kwargs):
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model(False, **kwargs), tokens)
    loss_ac, grads_ac = loss_and_grads(model(True, **kwargs), tokens)
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys()
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=1e-7, msg=name)


def test_same_gradients_with_a_per_batch_mask():
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    _, grads = loss_and_grads(model(False), tokens, doc_ids=doc_ids)
    _, grads_ac = loss_and_grads(model(True), tokens, doc_ids=doc_ids)
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=0, atol=1e-7, msg=name)


def test_fewer_saved_tensors_and_off_without_grad():
    tokens = torch.randint(0, VOCAB, (2, 16))
    plain, ac = model(False), model(True)
    assert saved_tensors(ac, tokens) < saved_tensors(plain, tokens) / 3
    with torch.no_grad():  # evaluation: same logits, and no checkpoint regions at all
        torch.testing.assert_close(ac(tokens), plain(tokens), rtol=0, atol=0)
    cache = ac.new_cache(2, 20)
    with torch.no_grad():
        first = ac(tokens, cache=cache)
    torch.testing.assert_close(first, plain(tokens).detach(), rtol=0, atol=0)


def test_resume_may_switch_it(tmp_path):
    """Recomputation changes no value: a run may resume with it switched on."""
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(TransformerConfig(vocab_size=VOCAB)))
    ours = TransformerConfig(vocab_size=VOCAB, activation_checkpointing=True)
    may_change = tuple(k.removeprefix("model.") for k in RESUME_MAY_CHANGE if k.startswith("model."))
    assert check_against_run(ours, saved, "a resume", may_change, RESUME_FIXED) == [
        "activation_checkpointing: False -> True"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_same_losses(tmp_path: Path, parallelism: str):
    runs = {}
    for on in (False, True):
        log_dir = tmp_path / f"ac_{on}"
        out = run_module(
            "src.apps.gssm.train",
            "config=src/apps/gssm/configs/debug.yaml",
            f"orchestration.log_dir={log_dir}",
            *GSSM_TINY,
            "model.n_layers=2",
            "optim.steps=4",
            "evaluation.period=0",
            f"cluster.parallelism={parallelism}",
            f"model.activation_checkpointing={on}",
            nproc=2,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs[on] = losses(log_dir)
    assert list(runs[True]) == [1, 2, 3, 4]
    assert runs[True] == pytest.approx(runs[False], rel=1e-6)
