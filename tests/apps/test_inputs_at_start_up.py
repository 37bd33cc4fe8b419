"""Every app checks all a run will read at start-up (`check_inputs`), before its log dir exists: bad
eval sizes, eval data, tokenizer files, GLUE splits, batches against the world size, input bytes. Each
of these used to train for all its steps, then fail at the first evaluation (or crash)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    BERT_FINETUNE,
    BERT_FIXTURES,
    GPT_TINY,
    GSSM_TINY,
    ROOT,
    assert_bad_input,
    child_env,
    run_module,
)

FINETUNE, FIXTURES = BERT_FINETUNE, BERT_FIXTURES

SHORT = ["optim.steps=2", "optim.warmup=0"]  # had a case pass start-up, it would still end soon
GPT = ["src.apps.gpt.train", "config=src/apps/gpt/configs/debug.yaml", *GPT_TINY, *SHORT]
GSSM = ["src.apps.gssm.train", "config=src/apps/gssm/configs/debug.yaml", *GSSM_TINY, *SHORT]
BERT = ["src.apps.bert.train", FINETUNE, "data.batch_size=8", "evaluation.batch_size=4", *SHORT]


def glue_without_dev(tmp_path: Path) -> str:
    """A GLUE folder whose CoLA has its train.tsv only."""
    (tmp_path / "glue" / "CoLA").mkdir(parents=True)
    shutil.copy(FIXTURES / "CoLA" / "train.tsv", tmp_path / "glue" / "CoLA" / "train.tsv")
    return str(tmp_path / "glue")


def latin1_corpus(tmp_path: Path) -> str:
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "corpus" / "2.txt").write_bytes("un café\n".encode("latin-1"))
    return str(tmp_path / "corpus")


CASES = {  # id: (entrypoint and its tiny config, bad arguments, the one line on stderr)
    "gpt-valid-fraction": (
        GPT,
        ["data.valid_fraction=0"],
        "error: data.valid_fraction: source 0 has 0 valid",
    ),
    "gpt-eval-batches": (GPT, ["evaluation.batches=0"], "error: evaluation.batches"),
    "gssm-n-sequences": (GSSM, ["evaluation.n_sequences=0"], "error: evaluation.n_sequences"),
    "bert-cola-dev": (
        BERT,
        ["task.name=cola", "task.glue_dir={glue}"],
        "error: {glue}/CoLA/dev.tsv: file not found",
    ),
    "gpt-seq-len": (GPT, ["data.seq_len=100000"], "error: data.seq_len: dense attention mask"),
    "tiktoken-file": (
        GPT,
        ["tokenizer.kind=tiktoken", "tokenizer.path={tmp}/no"],
        "error: tokenizer.path: tiktoken",
    ),
    "latin1-corpus": (
        GPT,
        ["data.sources=[{{path: {corpus}}}]"],
        "error: {corpus}/2.txt: not UTF-8 at byte 6",
    ),
    "gssm-eval": (
        ["src.apps.gssm.eval", *GSSM[1:]],
        ["evaluation.n_sequences=0"],
        "error: evaluation.n_sequences",
    ),
}


@pytest.mark.parametrize("command, args, needle", CASES.values(), ids=CASES.keys())
def test_bad_inputs_of_every_app_exit_2_at_start_up(tmp_path, command, args, needle):
    where = {"tmp": tmp_path}
    if "{glue}" in needle:
        where["glue"] = glue_without_dev(tmp_path)
    if "{corpus}" in needle:
        where["corpus"] = latin1_corpus(tmp_path)
    log_dir = tmp_path / "run"
    args = [arg.format(**where) for arg in args]
    out = run_module(*command, f"orchestration.log_dir={log_dir}", *args, timeout=120)
    assert_bad_input(out, needle.format(**where), log_dir)


@pytest.mark.parametrize(
    "command, args",
    [(GPT, ["evaluation.batch_size=3"]), (GSSM, ["evaluation.batch_size=1"])],
    ids=["gpt", "gssm"],
)
def test_eval_batches_are_checked_against_the_world_size_from_the_environment(tmp_path, command, args):
    """The world size is read as Cluster reads it (here: torchrun's variables), before any process group."""
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", *command, f"orchestration.log_dir={log_dir}", *args]
    env = child_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_bad_input(out, "error: evaluation.batch_size", log_dir)


def test_an_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    log_dir = tmp_path / "run"
    out = run_module("src.apps.gssm.train", f"config={empty}", f"orchestration.log_dir={log_dir}")
    assert_bad_input(out, f"error: config: {empty} is empty", log_dir)
