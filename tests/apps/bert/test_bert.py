"""End-to-end runs of the BERT app as real processes: pretraining, fine-tuning from it (task switch),
exact resume, GLUE fine-tuning and evaluation, metric reduction across ranks, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from src.apps.bert.tasks import Tally, build_task
from src.apps.bert.train import TrainConfig, build_model, find_init, load_init, load_tokenizer
from src.nanollama.config import build_config, read_yaml
from src.nanollama.monitor.checkpoint import latest_checkpoint
from src.nanollama.monitor.logger import read_jsonl
from src.nanollama.optim import lr_factor
from tests.apps.bert.reduce_ranks import share
from tests.conftest import BERT_FINETUNE, BERT_FIXTURES, assert_bad_input, crash_after, losses, run_module

FIXTURES = BERT_FIXTURES
MLM = "config=src/apps/bert/configs/debug.yaml"
FINETUNE = BERT_FINETUNE
SHORT = ["optim.steps=20", "optim.warmup=2", "orchestration.logging.period=1", "evaluation.period=10"]


def train(config: str, log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    out = run_module("src.apps.bert.train", config, f"orchestration.log_dir={log_dir}", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def log_text(log_dir: Path) -> str:
    return (log_dir / "logs" / "rank_0.log").read_text()


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory) -> Path:
    """The MLM debug config as shipped (200 steps, ~6 s)."""
    log_dir = tmp_path_factory.mktemp("bert") / "mlm"
    train(MLM, log_dir)
    return log_dir


def test_mlm_debug_learns_evaluates_and_dumps_predictions(mlm_run):
    loss = losses(mlm_run)
    assert list(loss) == list(range(10, 201, 10)) and loss[10] > loss[200] + 0.5
    evals = read_jsonl(mlm_run / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [100, 200] and evals[1]["loss"] < evals[0]["loss"]
    assert evals[1]["n"] > 500 and 0 < evals[1]["accuracy"] < 1
    assert "prediction at step 200: mlm: '" in log_text(mlm_run)  # text with [original→prediction]
    assert "→" in log_text(mlm_run)
    assert yaml.safe_load((mlm_run / "config.yaml").read_text())["task"]["name"] == "mlm"  # the task type

    out = run_module("src.apps.bert.eval", f"config={mlm_run}/config.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 200: mlm valid loss" in out.stdout
    offline = read_jsonl(mlm_run / "metrics" / "eval_0.jsonl")[-1]
    assert offline["loss"] == pytest.approx(evals[1]["loss"], rel=1e-5)
    assert offline["accuracy"] == evals[1]["accuracy"]
    out = run_module("src.apps.bert.eval", f"config={mlm_run}/config.yaml", "split=test")
    assert out.returncode == 2 and "split" in out.stderr


def test_finetune_debug_learns_from_scratch(tmp_path):
    """The fine-tuning debug config as shipped (300 steps, ~12 s): held-out loss falls, accuracy rises."""
    log_dir = tmp_path / "ft"
    train(FINETUNE, log_dir)
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [100, 200, 300]
    assert evals[0]["loss"] > evals[1]["loss"] > evals[2]["loss"]
    assert evals[2]["accuracy"] > 0.55 and evals[2]["n"] > 200
    assert "prediction at step 300: shuffled: label=1 pred=" in log_text(log_dir)


def test_finetune_from_mlm_loads_the_encoder_and_starts_a_fresh_head(mlm_run, tmp_path):
    cfg = build_config(TrainConfig, read_yaml("src/apps/bert/configs/finetune_debug.yaml"))
    cfg.init.checkpoint = str(mlm_run)
    task = build_task(cfg.task, cfg.data, cfg.evaluation, cfg.orchestration.seed, load_tokenizer(cfg))
    init = find_init(cfg)
    assert init.path == latest_checkpoint(mlm_run / "checkpoints") and init.task == "mlm"
    model = build_model(cfg, task, training=True, device=torch.device("cpu"))
    fresh = build_model(cfg, task, training=True, device=torch.device("cpu"))
    load_init(model, init, task.name)
    saved = torch.load(init.path / "model.pt", weights_only=True)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, saved[k]) for k, v in encoder.items())  # exactly the encoder
    assert not torch.equal(fresh.encoder.tok_embeddings.weight, saved["encoder.tok_embeddings.weight"])
    assert model.head.proj.weight.shape == (2, cfg.model.dim)  # a classifier, not the MLM projection...
    assert torch.equal(model.head.proj.weight, fresh.head.proj.weight)  # ...initialised as a fresh run's

    log_dir = tmp_path / "ft"
    train(FINETUNE, log_dir, f"init.checkpoint={mlm_run}", *SHORT)
    assert f"initialised encoder from {init.path} (task mlm -> shuffled, fresh head)" in log_text(log_dir)
    raw = read_jsonl(log_dir / "metrics" / "raw_0.jsonl")
    run_cfg = build_config(TrainConfig, read_yaml(log_dir / "config.yaml"))
    assert [r["step"] for r in raw] == list(range(1, 21))  # step 0, fresh schedule from its warmup
    assert [r["lr"] for r in raw] == pytest.approx([1e-3 * lr_factor(s, run_cfg.optim) for s in range(20)])
    state = torch.load(latest_checkpoint(log_dir / "checkpoints") / "state_0.pt", weights_only=False)
    assert state["step"] == 20 and state["scheduler"]["last_epoch"] == 20  # not the MLM run's 100 + 20
    evals = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")
    assert [e["step"] for e in evals] == [10, 20] and {"accuracy", "mcc", "loss"} <= set(evals[0])
    assert "prediction at step 20: shuffled: label=1 pred=" in log_text(log_dir)


def test_rewarm_starts_at_the_checkpoint_lr(mlm_run, tmp_path):
    log_dir = tmp_path / "rewarm"
    train(FINETUNE, log_dir, f"init.checkpoint={mlm_run}", *SHORT, "optim.warmup=0", "optim.rewarm_steps=5")
    last = read_jsonl(mlm_run / "metrics" / "raw_0.jsonl")[-1]  # the MLM run's last step
    state = torch.load(latest_checkpoint(mlm_run / "checkpoints") / "state_0.pt", weights_only=False)
    start = state["scheduler"]["_last_lr"][0]
    assert start < last["lr"]  # the LR of the step after the checkpoint, where the cosine got to
    assert read_yaml(log_dir / "config.yaml")["optim"]["rewarm_from"] == pytest.approx(start)
    lrs = [r["lr"] for r in read_jsonl(log_dir / "metrics" / "raw_0.jsonl")]
    assert lrs[0] == pytest.approx(start) and lrs[5] == pytest.approx(
        1e-3 * lr_factor(5, build_config(TrainConfig, read_yaml(log_dir / "config.yaml")).optim)
    )
    assert lrs[0] < lrs[1] < lrs[4]  # up from the checkpoint's LR towards the new peak


@pytest.mark.parametrize("kind", ["mlm", "finetune"])
def test_same_task_resume_gives_the_same_losses(mlm_run, tmp_path, kind):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [
        *SHORT,
        "optim.steps=8",
        "orchestration.checkpoint.period=3",
        "orchestration.checkpoint.keep_only=0",
    ]
    args += ["evaluation.period=4"]
    if kind == "mlm":
        config, args = MLM, [*args, "optim.accumulation_steps=2"]
    else:  # the run's own checkpoint wins over init.checkpoint
        config, args = FINETUNE, [*args, f"init.checkpoint={mlm_run}"]
    train(config, full, *args)
    crash_after(full, resumed, 3)
    train(config, resumed, *args)
    assert losses(resumed) == losses(full)  # exactly, step by step
    assert read_jsonl(resumed / "metrics" / "eval_0.jsonl") == read_jsonl(full / "metrics" / "eval_0.jsonl")
    assert "training from step 3 to 8" in log_text(resumed)
    assert "initialised" not in log_text(resumed).split("resumed from")[-1]


def test_glue_cola_fine_tunes_and_evaluates_across_ranks(tmp_path):
    """CoLA's dev.tsv has 9 rows: 5 and 4 on two ranks, batches of 2 (rank 1 runs a filler batch). The
    two-rank figures must be the single-process ones: sums and counts are reduced, not per-rank ratios."""
    log_dir = tmp_path / "cola"
    args = ["task.name=cola", f"task.glue_dir={FIXTURES}", "data.batch_size=8", "evaluation.batch_size=4"]
    train(FINETUNE, log_dir, *SHORT, *args)
    assert "prediction at step 20: cola: label=" in log_text(log_dir)
    out = run_module("src.apps.bert.eval", f"config={log_dir}/config.yaml")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 20: cola valid" in out.stdout and "mcc" in out.stdout and "(9 predictions)" in out.stdout
    single = read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-1]
    assert single["accuracy"] == pytest.approx(
        read_jsonl(log_dir / "metrics" / "eval_0.jsonl")[-2]["accuracy"]
    )
    out = run_module("src.apps.bert.eval", f"config={log_dir}/config.yaml", nproc=2)
    assert out.returncode == 0, out.stderr[-2000:]
    for rank in (0, 1):
        two = read_jsonl(log_dir / "metrics" / f"eval_{rank}.jsonl")[-1]
        assert two["n"] == 9
        for key in ("loss", "accuracy", "mcc"):
            assert two[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    out = run_module("src.apps.bert.eval", f"config={log_dir}/config.yaml", "split=test")
    assert out.returncode == 0 and "cola test" in out.stdout and "(3 predictions)" in out.stdout
    sst2 = [f"config={log_dir}/config.yaml", "task.name=sst2", "split=test"]
    out = run_module("src.apps.bert.eval", *sst2)  # a CoLA checkpoint is not evaluated as another task
    assert_bad_input(out, "task.name: 'sst2' here, 'cola' in")


def test_metric_reduction_sums_counts_across_two_ranks(tmp_path):
    out = run_module("tests.apps.bert.reduce_ranks", str(tmp_path), nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r: json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)}
    both = Tally()
    for rank in (0, 1):
        both.add(*share(rank))
    expected = both.metrics(binary=True)
    assert expected["accuracy"] == pytest.approx(5 / 14)
    mean_of_ratios = (results[0]["local"]["accuracy"] + results[1]["local"]["accuracy"]) / 2
    assert mean_of_ratios == pytest.approx((3 / 4 + 2 / 10) / 2) != pytest.approx(5 / 14)
    for rank in (0, 1):
        reduced = results[rank]["reduced"]
        assert reduced["n"] == 14
        for key in ("loss", "accuracy", "mcc"):
            assert reduced[key] == pytest.approx(expected[key], rel=1e-9), key


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model.dimm=3"], "model.dimm"),
        (["task.name=nli"], "task.name"),
        (["model.causal=true"], "model.causal"),
        (["task.name=cola"], "task.glue_dir"),
        (["task.name=sst2", "task.glue_dir=/nonexistent"], "task.glue_dir"),
        (["init.checkpoint=/nonexistent"], "init.checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_log_dir(tmp_path, args, needle):
    log_dir = tmp_path / "run"
    out = run_module("src.apps.bert.train", FINETUNE, f"orchestration.log_dir={log_dir}", *args)
    assert_bad_input(out, needle, log_dir)


def test_bad_glue_row_and_mismatched_init_exit_2(mlm_run, tmp_path):
    glue = tmp_path / "glue"
    (glue / "CoLA").mkdir(parents=True)
    (glue / "CoLA" / "train.tsv").write_text("fx0\t1\t\tGood.\nfx0\t1\tOnly three columns.\n")
    out = run_module("src.apps.bert.train", FINETUNE, "task.name=cola", f"task.glue_dir={glue}")
    assert out.returncode == 2 and f"{glue}/CoLA/train.tsv:2" in out.stderr, out.stderr
    out = run_module("src.apps.bert.train", FINETUNE, f"init.checkpoint={mlm_run}", "model.dim=32")
    assert out.returncode == 2 and "error: model.dim: 32 differs from 64" in out.stderr, out.stderr


def test_eval_of_an_mlm_checkpoint_with_a_classification_config_exits_2(mlm_run):
    checkpoint = latest_checkpoint(mlm_run / "checkpoints")
    out = run_module("src.apps.bert.eval", FINETUNE, f"checkpoint={checkpoint}")
    assert_bad_input(out, f"task.name: 'shuffled' here, 'mlm' in {mlm_run}/config.yaml")
