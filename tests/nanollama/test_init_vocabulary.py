"""`init.checkpoint` under another vocabulary: every checkpoint records its tokenizer's identity, and a
start from a checkpoint whose ids mean other pieces (a sentencepiece model trained on other data, same
size) exits 2, unless `init.tokenizer_mismatch=allow`."""

from __future__ import annotations

import json

import pytest

from src.nanollama.data.text import ByteTokenizer, SentencePieceTokenizer, demo_documents
from src.nanollama.init_checkpoint import VOCABULARY
from src.nanollama.monitor.checkpoint import list_checkpoints
from tests.conftest import GPT_TINY, assert_bad_input, run_module

pytest.importorskip("sentencepiece")


def corpus(folder, docs):
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


def test_the_identity_is_what_the_ids_mean(tmp_path):
    docs = demo_documents()
    first = SentencePieceTokenizer.train(docs[:40], 400, tmp_path / "a")
    again = SentencePieceTokenizer.train(docs[:40], 400, tmp_path / "b")  # retrained elsewhere: the same
    other = SentencePieceTokenizer.train(docs[40:80], 400, tmp_path / "c")  # other data, the same size
    assert first.identity == again.identity != other.identity
    assert first.identity.startswith("sentencepiece-400-") and ByteTokenizer().identity == "byte-262"


def test_a_start_from_another_vocabulary_is_refused_unless_allowed(tmp_path):
    docs = demo_documents()
    first, second = corpus(tmp_path / "first", docs[:40]), corpus(tmp_path / "second", docs[40:80])
    tiny = [*GPT_TINY, "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400", "optim.steps=2"]
    tiny += [f"tokenizer.cache_dir={tmp_path / 'tokenizers'}", "evaluation.period=0", "generation.period=0"]
    tiny += ["data.valid_fraction=0.25"]

    def train(log_dir, source, *args):
        sources = f"data.sources=[{{path: {source}}}]"
        config = "config=src/apps/gpt/configs/debug.yaml"
        return run_module(
            "src.apps.gpt.train", config, *tiny, sources, f"orchestration.log_dir={log_dir}", *args
        )

    out = train(tmp_path / "a", first)
    assert out.returncode == 0, out.stderr[-3000:]
    (checkpoint,) = list_checkpoints(tmp_path / "a" / "checkpoints")
    recorded = json.loads((checkpoint / VOCABULARY).read_text())["vocabulary"]
    assert recorded.startswith("sentencepiece-400-")

    out = train(tmp_path / "b", second, f"init.checkpoint={tmp_path / 'a'}")
    assert_bad_input(out, "init.checkpoint", tmp_path / "b")
    assert "tokenizer" in out.stderr and "init.tokenizer_mismatch=allow" in out.stderr

    out = train(tmp_path / "c", second, f"init.checkpoint={tmp_path / 'a'}", "init.tokenizer_mismatch=allow")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "init.tokenizer_mismatch=allow" in (tmp_path / "c" / "logs" / "rank_0.log").read_text()

    out = train(tmp_path / "d", first, f"init.checkpoint={tmp_path / 'a'}")  # the same data: the same ids
    assert out.returncode == 0, out.stderr[-3000:]
