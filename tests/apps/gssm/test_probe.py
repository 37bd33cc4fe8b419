"""Probing in the GSSM app: activation statistics in the training loop (resumable), the Bayes filter behind
the probe's reference accuracy, and the linear-probe command on a trained checkpoint."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from src.apps.gssm.bayes import filtered_marginals
from src.apps.gssm.generator import GSSM
from src.apps.gssm.graph import GSSMConfig, NodeConfig
from src.apps.gssm.probe import main
from src.nanollama.monitor.checkpoint import list_checkpoints
from src.nanollama.monitor.logger import read_jsonl
from tests.conftest import run_module

CONFIG = "config=src/apps/gssm/configs/debug.yaml"
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "data.seq_len=16",
    "data.batch_size=8",
    "optim.warmup=2",
    "optim.lr=1e-2",
    "evaluation.n_sequences=16",
    "evaluation.batch_size=8",
    "orchestration.checkpoint.keep_only=0",
]
# Two hidden nodes, so the probe's table has a row per node and layer.
NODES = (
    "data.gssm.nodes=[{name: regime, state_dim: 2, alpha: 0.3, mode: slow}, "
    "{name: z, state_dim: 3, alpha: 0.1, parents: [regime]}, "
    "{name: x, state_dim: 6, alpha: 0.1, parents: [z], observed: true}]"
)
PROBED = ["optim.steps=30", "orchestration.checkpoint.period=15", "orchestration.probe.period=5"]


def train(log_dir: Path, *args: str, nproc: int = 1) -> None:
    out = run_module(
        "src.apps.gssm.train", CONFIG, f"orchestration.log_dir={log_dir}", *TINY, *args, nproc=nproc
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("probe") / "run"
    train(log_dir, NODES, *PROBED)
    return log_dir


def test_probe_lines_in_training_resume_exactly(trained, tmp_path):
    lines = read_jsonl(trained / "metrics" / "probe_0.jsonl")
    assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
    assert {"layer_0/resid_kurtosis", "layer_2/attn_entropy", "layer_2/grad_norm", "head/grad_norm"} <= set(
        lines[0]
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    shutil.rmtree(list_checkpoints(resumed / "checkpoints")[-1])  # as if it died after step 15's checkpoint
    train(resumed, NODES, *PROBED)
    assert read_jsonl(resumed / "metrics" / "probe_0.jsonl") == lines


def test_probe_command_writes_one_entry_per_layer_and_node(trained):
    out = run_module("src.apps.gssm.probe", f"config={trained}/config.yaml", "probing.n_sequences=128")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((trained / "metrics" / "probe_accuracy.json").read_text())
    assert report["step"] == 30 and report["n_test_sequences"] == 32
    results = report["results"]
    assert [(r["node"], r["layer"]) for r in results] == list(itertools.product(["regime", "z"], range(3)))
    for r in results:
        assert 0 <= r["chance"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["embedding_accuracy"] == results[3 * (r["node"] == "z")]["accuracy"]
        assert r["bayes_accuracy"] >= r["chance"] - 0.05
    z = [r for r in results if r["node"] == "z"]
    assert z[0]["accuracy"] > z[0]["chance"] + 0.1  # the token alone already tells much about z
    assert "embeddings" in out.stdout and "regime" in out.stdout


def test_probe_command_bad_input_exits_2(trained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"config={trained}/config.yaml", "probing.test_fraction=1.5"])
    assert exit_info.value.code == 2 and "probing.test_fraction" in capsys.readouterr().err


def test_filtered_marginals_match_brute_force():
    nodes = [
        NodeConfig(name="z", state_dim=3, alpha=0.5),
        NodeConfig(name="x", state_dim=4, alpha=0.5, parents=["z"], observed=True),
    ]
    gssm = GSSM(GSSMConfig(seed=1, nodes=nodes))
    sample = gssm.sample(2, 4, np.random.default_rng(0))
    marginals = filtered_marginals(gssm, sample)["z"]
    transition, emission = gssm.kernels["z"][0], gssm.kernels["x"][0]  # (prev z, z), (z, x)
    for b, t in itertools.product(range(2), range(4)):
        x = sample.tokens[b, : t + 1]
        post = np.zeros(3)
        for path in itertools.product(range(3), repeat=t + 2):  # z_{-1} (uniform), z_0 .. z_t
            p = 1 / 3
            for s in range(t + 1):
                p *= transition[path[s], path[s + 1]] * emission[path[s + 1], x[s]]
            post[path[-1]] += p
        np.testing.assert_allclose(marginals[b, t], post / post.sum(), rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_probe_lines(tmp_path, parallelism):
    """Gradients are global (all-reduced, or gathered from FSDP's shards); activations are each rank's own."""
    args = ["optim.steps=4", "orchestration.probe.period=2", f"cluster.parallelism={parallelism}"]
    train(tmp_path / "run", *args, nproc=2)
    ranks = [read_jsonl(tmp_path / "run" / "metrics" / f"probe_{r}.jsonl") for r in (0, 1)]
    assert [line["step"] for line in ranks[0]] == [line["step"] for line in ranks[1]] == [2, 4]
    for a, b in zip(*ranks, strict=True):
        for key in a:
            if key.endswith("grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["layer_1/resid_std"] != b["layer_1/resid_std"] and "layer_2/attn_entropy" in a


@pytest.mark.slow
def test_compiled_training_probes(tmp_path):
    train(tmp_path / "run", "optim.steps=4", "orchestration.probe.period=2", "cluster.compile=true")
    lines = read_jsonl(tmp_path / "run" / "metrics" / "probe_0.jsonl")
    assert [line["step"] for line in lines] == [2, 4] and "layer_2/attn_entropy" in lines[1]
