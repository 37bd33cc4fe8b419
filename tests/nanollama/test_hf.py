"""Hugging Face interop: exported checkpoints load in transformers with the same logits, round trips are
exact, and bad input exits 2 with one line naming the key or file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.nanollama import hf
from src.nanollama.config import to_dict
from src.nanollama.model.io import load_model, load_model_config
from src.nanollama.model.transformer import Transformer, TransformerConfig
from src.nanollama.monitor.checkpoint import CheckpointConfig, Checkpointer
from tests.conftest import ROOT, child_env, run_module

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 37


def tokens(B: int = 2, T: int = 19, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def train_a_little(model: Transformer, steps: int = 3) -> torch.optim.Optimizer:
    """A few AdamW steps on random tokens, so weights are no longer at their init (norms != 1...)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = tokens(4, 17, seed=100 + step)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def make_checkpoint(tmp: Path, trained: bool = False, **kwargs) -> tuple[Path, Transformer]:
    """A checkpoint written the way training does: `<run>/checkpoints/<step>/` + `<run>/config.yaml`
    (with `attention` as given, though training on CPU uses sdpa, as the training scripts do)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, **{"dim": 32, "n_layers": 2, "n_heads": 4, **kwargs})
    model = Transformer(dataclasses.replace(cfg, attention="sdpa"))
    optimizer = train_a_little(model) if trained else torch.optim.AdamW(model.parameters())
    run = tmp / "run"
    with Checkpointer(CheckpointConfig(), run / "checkpoints") as checkpointer:
        ckpt = checkpointer.save(1, model, optimizer, {"step": 1})
    run_config = {"orchestration": {"log_dir": str(run)}, "optim": {"steps": 1}, "model": to_dict(cfg)}
    (run / "config.yaml").write_text(yaml.safe_dump(run_config))
    return ckpt, model.eval()


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits.float()


def ours(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# Every pair of (trained, GQA, tied) values appears once: the full product takes twice as long.
@pytest.mark.parametrize(
    "trained, n_kv_heads, tie", [(False, 0, False), (True, 2, False), (True, 0, True), (False, 2, True)]
)
def test_exported_logits_match_hf_llama(tmp_path, trained: bool, n_kv_heads: int, tie: bool):
    ckpt, model = make_checkpoint(
        tmp_path, trained, n_kv_heads=n_kv_heads, tie_embeddings=tie, rope_theta=5e2
    )
    out = hf.export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = safetensors_torch.load_file(out / "model.safetensors")
    assert ("lm_head.weight" in saved) is not tie  # tied: HF re-ties it from tie_word_embeddings
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == (n_kv_heads or 4) and config["tie_word_embeddings"] is tie
    x = tokens()
    assert (hf_logits(out, x) - ours(model, x)).abs().max().item() < 1e-4


def test_export_of_a_real_training_run(tmp_path):
    """The real path: a 3-step GSSM training run's last checkpoint, read through ../../config.yaml."""
    log_dir = tmp_path / "run"
    tiny = ["optim.steps=3", "optim.warmup=0", "model.dim=32", "model.n_layers=1", "data.seq_len=16"]
    tiny += ["data.batch_size=8", "evaluation.n_sequences=16", "evaluation.batch_size=8"]
    config = "config=src/apps/gssm/configs/debug.yaml"
    train = run_module("src.apps.gssm.train", config, f"orchestration.log_dir={log_dir}", *tiny)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = log_dir / "checkpoints" / "0000000003"
    hf.main(["export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"])
    model = load_model(ckpt)
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(tmp_path / "hf", x) - ours(model, x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_exact(tmp_path, tie: bool):
    """export -> import gives the same tensors and the same config, even fields HF has no word for."""
    unusual = {"multiple_of": 16, "attention": "flex", "init_std": 0.01}
    ckpt, _ = make_checkpoint(tmp_path, trained=True, n_kv_heads=2, tie_embeddings=tie, **unusual)
    hf.export_hf(ckpt, tmp_path / "hf")
    back = hf.import_hf(tmp_path / "hf", tmp_path / "imported")
    assert sorted(p.name for p in back.iterdir()) == ["model.pt", "model.yaml"]
    assert load_model_config(back) == load_model_config(ckpt)
    assert load_model_config(back).attention == "flex" and load_model_config(back).multiple_of == 16
    original = torch.load(ckpt / "model.pt", weights_only=True)
    imported = torch.load(back / "model.pt", weights_only=True)
    assert imported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name
    reloaded = load_model(back)
    assert (reloaded.output.weight is reloaded.tok_embeddings.weight) is tie
    # An imported folder (model.yaml inside) exports again to the same HF files.
    hf.export_hf(back, tmp_path / "hf2")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name


@pytest.mark.parametrize("tie", [False, True])
def test_import_of_a_folder_saved_by_transformers(tmp_path, tie: bool):
    """A genuine HF folder (transformers' own config.json, no nanollama section, sharded weights)."""
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: move them so a mixed-up norm would show
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf.import_hf(tmp_path / "hf", tmp_path / "imported")
    model = load_model(tmp_path / "imported")
    assert model.cfg.ffn_dim == 80 and model.cfg.n_kv_heads == 2 and model.cfg.rope_theta == 1000.0
    assert model.cfg.tie_embeddings is tie and model.cfg.norm_eps == 1e-6
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits.float()
    assert (ours(model, x) - expected).abs().max().item() < 1e-4


def test_renaming_is_a_bijection():
    model = Transformer(TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4))
    names = list(model.state_dict())
    hf_names = [hf.to_hf_name(n) for n in names]
    assert "model.layers.1.post_attention_layernorm.weight" in hf_names and "lm_head.weight" in hf_names
    assert len(set(hf_names)) == len(names)
    assert [hf.from_hf_name(n) for n in hf_names] == names
    for bad, fn in [("layers.0.attention.wq.weight", hf.to_hf_name), ("model.foo.weight", hf.from_hf_name)]:
        with pytest.raises(hf.ConfigError):
            fn(bad)


# ------------------------------------------------------------------------------------------- bad input


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        hf.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_unknown_verb_exits_2_in_a_real_process_that_never_imports_transformers():
    """`-X importtime` lists every module the process imported, on stderr beside the error line."""
    cmd = [sys.executable, "-X", "importtime", "-m", "src.nanollama.hf", "convert", "ckpt=x", "out=y"]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    imported = [
        line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "torch" in imported and not {"transformers", "safetensors"} & set(imported)
    errors = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith("error: verb:") and "convert" in errors[0]


def test_bad_input_names_the_key_or_file(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path)
    missing = tmp_path / "nope"
    assert "ckpt: checkpoint folder not found" in error_line(capsys, ["export", f"ckpt={missing}", "out=x"])
    assert "out: required" in error_line(capsys, ["export", f"ckpt={ckpt}"])
    assert "ckptt: unknown key" in error_line(capsys, ["export", f"ckptt={ckpt}", "out=x"])
    assert "error: verb:" in error_line(capsys, [])
    (tmp_path / "taken").mkdir()
    assert "out: already exists" in error_line(
        capsys, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'taken'}"]
    )
    assert "hf: folder not found" in error_line(capsys, ["import", f"hf={missing}", f"out={tmp_path / 'o'}"])
    assert "hf: no config.json" in error_line(capsys, ["import", f"hf={ckpt}", f"out={tmp_path / 'o'}"])

    lonely = tmp_path / "lonely"  # no model.yaml, no ../../config.yaml
    lonely.mkdir()
    assert "model.yaml" in error_line(capsys, ["export", f"ckpt={lonely}", f"out={tmp_path / 'o'}"])
    (ckpt / "model.pt").unlink()
    assert "ckpt: no model.pt" in error_line(capsys, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'o'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lonely", "run", "taken"]  # nothing half-written


def test_bidirectional_model_is_refused(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path, causal=False)
    err = error_line(capsys, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"])
    assert err.startswith("error: model.causal:") and "bidirectional" in err
    assert not (tmp_path / "hf").exists()


def test_sliding_window_model_is_refused(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path, sliding_window=4)
    err = error_line(capsys, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"])
    assert err.startswith("error: model.sliding_window:")
    assert not (tmp_path / "hf").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, capsys):
    """Weights that do not fit the config fail after the temporary folder exists: it is removed."""
    ckpt, _ = make_checkpoint(tmp_path)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["model"]["dim"] = 64
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    err = error_line(capsys, ["export", f"ckpt={ckpt}", f"out={tmp_path / 'out' / 'hf'}"])
    assert "model.pt" in err and "shape" in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"head_dim": 16}, "head_dim"),
        ({"hidden_size": ...}, "missing hidden_size"),  # ...: key removed
    ],
)
def test_import_refuses_what_our_model_cannot_represent(tmp_path, capsys, change: dict, needle: str):
    config = {**hf.to_hf_config(TransformerConfig(vocab_size=VOCAB, dim=32, n_heads=4)), **change}
    config = {key: value for key, value in config.items() if value is not ...}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    err = error_line(capsys, ["import", f"hf={tmp_path / 'hf'}", f"out={tmp_path / 'out'}"])
    assert err.startswith("error: hf:") and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
