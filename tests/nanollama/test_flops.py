"""Parameter and FLOP accounting against hand counts and torch's FLOP counter, the device peak (table,
measured and cached, overridden), and the console line for people."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from src.nanollama import flops
from src.nanollama.model.transformer import Transformer, TransformerConfig
from src.nanollama.monitor.console import console_line, count, duration, summary_line


def tiny(**kw) -> Transformer:
    return Transformer(TransformerConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, ffn_dim=16, **kw))


def test_parameter_counts_match_a_hand_count():
    # block: q, k, v, o 4 x 8x8 = 256; gate, up 2 x 8x16 = 256; down 16x8 = 128; two norms 16; final norm 8
    assert tiny().parameter_counts() == {"total": 824, "embedding": 160, "non_embedding": 664}
    tied = tiny(tie_embeddings=True).parameter_counts()
    assert tied == {"total": 744, "embedding": 80, "non_embedding": 664}


def test_flops_per_token_matches_a_hand_count():
    # W = 664 - 24 (norms) + 80 (head) = 720 matmul weights; attention 12 * 1 layer * 8 * keys
    T = 4
    assert tiny().flops_per_token(T) == 6 * 720 + 12 * 8 * (T + 1) / 2
    assert tiny(causal=False).flops_per_token(T) == 6 * 720 + 12 * 8 * T
    # window 2 over 4 positions: 1, 2, 2, 2 keys
    assert tiny(sliding_window=2).flops_per_token(T) == 6 * 720 + 12 * 8 * (1 + 2 + 2 + 2) / 4


def test_the_matmul_term_is_what_torch_counts_in_forward_and_backward():
    model, T = tiny(), 6
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 10, (2, T))).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = 12 * 8 * (T + 1) / 2
    assert counts.get("aten.mm", 0) == (model.flops_per_token(T) - attention) * 2 * T


def test_models_without_their_own_count_get_6_x_their_matmul_weights():
    model = nn.Sequential(nn.Embedding(100, 4), nn.Linear(4, 3))
    assert flops.model_flops_per_token(model, 16) == 6 * (4 * 3 + 3)
    assert flops.model_flops_per_token(tiny(), 4) == tiny().flops_per_token(4)


def test_known_gpus_come_from_the_table_by_dtype():
    assert flops.table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.table_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert flops.table_peak("Tesla V100-SXM2-16GB", "bfloat16") is None  # no bf16 units: measured
    assert flops.table_peak("Some New GPU", "bfloat16") is None
    assert flops.matmul_dtype("float32", "cuda", "high") == "tf32"
    assert flops.matmul_dtype("float32", "cuda", "highest") == "float32"
    assert flops.matmul_dtype("float32", "cpu", "high") == "float32"


def test_the_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "measure_peak", lambda device, dtype: calls.append(dtype) or 5e10)
    cpu = torch.device("cpu")
    assert flops.peak_flops(cpu, "float32") == 5e10
    assert flops.peak_flops(cpu, "float32") == 5e10
    assert flops.peak_flops(cpu, "bfloat16") == 5e10
    assert calls == ["float32", "bfloat16"]  # one measurement per dtype
    cached = json.loads((tmp_path / "nanollama" / "peak_flops.json").read_text())
    assert len(cached) == 2 and all(v == 5e10 for v in cached.values())
    assert flops.peak_flops(cpu, "float32", override=1e12) == 1e12  # cluster.peak_flops
    (tmp_path / "nanollama" / "peak_flops.json").write_text("{corrupt")
    assert flops.peak_flops(cpu, "float32") == 5e10 and len(calls) == 3  # a corrupt cache is measured anew


def test_a_real_measurement_is_a_plausible_cpu_peak():
    peak = flops.measure_peak(torch.device("cpu"), "float32", seconds=0.2)
    assert 1e8 < peak < 1e13


def test_console_units():
    assert [duration(s) for s in (0, 59.6, 3599, 3600 * 27 + 61)] == [
        "0:00:00",
        "0:01:00",
        "0:59:59",
        "27:01:01",
    ]
    assert duration(float("inf")) == "-"
    assert [count(x) for x in (950, 12_345, 4_560_000, 7.89e9)] == ["950", "12.3k", "4.56M", "7.89G"]


def test_the_console_line_is_for_people():
    record = {"step": 100, "loss": 2.03125, "rank_loss": 2.0, "lr": 0.003, "grad_norm": 0.21}
    record |= {"tokens_per_s": 12_345.0, "tokens_per_s_per_device": 6000.0, "mfu": 0.0312}
    record |= {"memory_gib": 1.25, "eta_s": 83.0, "accuracy": 0.5}
    line = console_line(record, 300)
    assert line == (
        "step 100/300 | loss 2.031 | lr 0.003 | grad_norm 0.21 | 12.3k tok/s | MFU 3.12% | mem 1.25 GiB"
        " | ETA 0:01:23 | accuracy=0.5"
    )
    many = {"step": 5, "loss": 1.0} | {f"term_{i}": float(i) for i in range(15)}  # the dVAE's many terms
    assert console_line(many, 10) == "step 5/10 | loss 1 | term_0=0 term_1=1 term_2=2 (+12 in metrics/raw)"
    summary = summary_line(0, 300, 614_400, 41.0, 0.021)
    assert (
        summary
        == "done: steps 0->300 (300 this run), 614k tokens, wall 0:00:41, mean 15k tok/s, mean MFU 2.1%"
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measure_peak_runs_in_each_cpu_dtype(dtype):
    assert flops.measure_peak(torch.device("cpu"), dtype, seconds=0.05) > 0
