"""EMA of the weights in real GSSM runs: exact resume, evaluation on the EMA, HF export of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import GSSM_TINY, assert_bad_input, crash_after, losses, run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"
EMA = ["optim.ema_decay=0.9", "optim.steps=6", "orchestration.checkpoint.period=3", "evaluation.period=3"]


def train(log_dir: Path, *args: str) -> None:
    out = run_module("src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *GSSM_TINY, *args)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("ema") / "full"
    train(log_dir, *EMA, "evaluation.use_ema=true")
    return log_dir


def weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(path / name, weights_only=True)


def test_resume_with_ema_gives_the_same_losses_and_ema(ema_run, tmp_path):
    resumed = tmp_path / "resumed"
    crash_after(ema_run, resumed, 3)
    train(resumed, *EMA, "evaluation.use_ema=true")
    assert losses(resumed) == losses(ema_run)
    assert read_jsonl(resumed / "metrics" / "eval_0.jsonl") == read_jsonl(
        ema_run / "metrics" / "eval_0.jsonl"
    )
    last = "checkpoints/0000000006"
    ours, theirs = weights(resumed / last, "ema.pt"), weights(ema_run / last, "ema.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model = weights(ema_run / last, "model.pt")
    assert model.keys() == ours.keys() and not torch.equal(model["norm.weight"], ours["norm.weight"])


def test_eval_with_use_ema_reads_the_ema_weights(ema_run):
    in_loop = read_jsonl(ema_run / "metrics" / "eval_0.jsonl")[-1]  # evaluated on the EMA
    out = run_module("src.apps.gssm.eval", f"config={ema_run}/config.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    offline = read_jsonl(ema_run / "metrics" / "eval_0.jsonl")[-1]
    assert offline["loss"] == pytest.approx(in_loop["loss"], rel=1e-6)
    out = run_module("src.apps.gssm.eval", f"config={ema_run}/config.yaml", "evaluation.use_ema=false")
    assert out.returncode == 0, out.stderr[-2000:]
    trained = read_jsonl(ema_run / "metrics" / "eval_0.jsonl")[-1]
    assert trained["loss"] != pytest.approx(in_loop["loss"], rel=1e-4)  # model.pt: another model


def test_hf_export_takes_the_ema(ema_run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    ckpt = ema_run / "checkpoints" / "0000000006"
    out = run_module("src.nanollama.hf", "export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", "ema=true")
    assert out.returncode == 0, out.stderr[-2000:]
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["model.norm.weight"], weights(ckpt, "ema.pt")["norm.weight"])


def test_use_ema_without_ema_exits_2(tmp_path):
    log_dir = tmp_path / "run"
    out = run_module(
        "src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", "evaluation.use_ema=true"
    )
    assert_bad_input(out, "evaluation.use_ema: needs optim.ema_decay > 0", log_dir)


@pytest.mark.slow
def test_fsdp_orthograd_and_ema_match_ddp(tmp_path):
    """Sharded: Orthograd's dot products span the shards, the EMA is saved sharded and consolidated."""
    args = [*EMA, "optim.name=orthograd"]
    for kind in ("ddp", "fsdp"):
        out = run_module(
            "src.apps.gssm.train",
            CONFIG,
            f"orchestration.log_dir={tmp_path / kind}",
            *GSSM_TINY,
            *args,
            f"cluster.parallelism={kind}",
            nproc=2,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    last = "checkpoints/0000000006"
    ddp, fsdp = weights(tmp_path / "ddp" / last, "ema.pt"), weights(tmp_path / "fsdp" / last, "ema.pt")
    assert all(torch.allclose(ddp[k], fsdp[k], atol=1e-6) for k in ddp)
