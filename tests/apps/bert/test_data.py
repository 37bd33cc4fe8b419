"""BERT data in-process: MLM masking, GLUE readers, the shuffled-sentence task, padded batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from src.apps.bert.data import (
    IGNORE,
    Masker,
    Sentences,
    batch_generator,
    read_glue,
    sentences,
    shuffle_words,
    shuffled_examples,
    split_sentences,
)
from src.apps.bert.tasks import Tally, mcc
from src.nanollama.config import ConfigError
from src.nanollama.data.packing import SourceConfig, source_documents
from src.nanollama.data.text import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures"


# ----------------------------------------------------------------------------- masking


def random_text_with_specials(tok: ByteTokenizer, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (n,), generator=g)
    special_ids = torch.tensor(list(tok.special_ids.values()))
    where = torch.rand(n, generator=g) < 0.1  # 10% special tokens sprinkled in
    tokens[where] = special_ids[torch.randint(len(special_ids), (int(where.sum()),), generator=g)]
    return tokens.view(100, -1)


def test_masking_proportions_specials_and_determinism():
    tok = ByteTokenizer()
    masker = Masker(tok, 0.15)
    tokens = random_text_with_specials(tok, 200_000, seed=0)
    inputs, targets = masker(tokens, batch_generator(0, 0, 0, 0))
    selected = targets != IGNORE
    special = torch.isin(tokens, torch.tensor(list(tok.special_ids.values())))
    assert not (selected & special).any()  # specials are never selected...
    assert torch.equal(inputs[special], tokens[special])  # ...nor changed
    assert torch.equal(targets[selected], tokens[selected])  # the targets are the originals
    assert (selected.sum() / (~special).sum()).item() == pytest.approx(0.15, abs=0.005)
    n = selected.sum().item()
    masked = (inputs[selected] == tok.mask).float().sum().item() / n
    kept = (inputs[selected] == tokens[selected]).float().sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 256, abs=0.01)  # a random draw hits the original 1/256 times
    replaced = inputs[selected & (inputs != tok.mask) & (inputs != tokens)]
    assert len(replaced) / n == pytest.approx(0.1 - 0.1 / 256, abs=0.01)
    assert replaced.max() < 256  # random replacements are ordinary tokens
    assert not torch.equal(inputs[~selected], inputs[~selected] * 0)  # the rest is untouched text
    assert torch.equal(inputs[~selected], tokens[~selected])
    again = masker(tokens, batch_generator(0, 0, 0, 0))
    other = masker(tokens, batch_generator(0, 0, 0, 1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    assert not torch.equal(other[1], targets)


# ----------------------------------------------------------------------------- GLUE


def test_glue_cola_has_no_header_and_four_columns():
    train = read_glue("cola", str(FIXTURES), "train")
    assert len(train) == 28  # every line is an example: no header to skip
    assert train[0] == ("The cat slept on the warm mat.", 1)
    assert train[1] == ("The cat slept the warm mat on.", 0)
    assert len(read_glue("cola", str(FIXTURES), "valid")) == 9  # dev.tsv
    assert [label for _, label in read_glue("cola", str(FIXTURES), "test")] == [0, 1, 0]  # labelled test


def test_glue_sst2_has_a_header():
    train = read_glue("sst2", str(FIXTURES), "train")
    assert len(train) == 20 and train[0] == ("a warm , funny and deeply moving film ", 1)
    assert sum(label for _, label in train) == 10
    with pytest.raises(ConfigError, match="no labels") as err:  # GLUE's own test.tsv: index, sentence
        read_glue("sst2", str(FIXTURES), "test")
    assert err.value.key.endswith("SST-2/test.tsv")


@pytest.mark.parametrize(
    "task, name, text, where",
    [
        ("cola", "train.tsv", "fx0\t1\t\tfine.\nfx1\t1\tno sentence column\n", "train.tsv:2"),
        ("cola", "train.tsv", "fx0\tyes\t\tA label that is not 0/1.\n", "train.tsv:1"),
        ("sst2", "train.tsv", "text\tlabel\nfine\t1\n", "train.tsv:1"),
        ("sst2", "dev.tsv", "sentence\tlabel\nfine\t1\nbad\t1\t0\n", "dev.tsv:3"),
    ],
)
def test_a_bad_glue_file_names_the_file_and_line(tmp_path, task, name, text, where):
    folder = tmp_path / {"cola": "CoLA", "sst2": "SST-2"}[task]
    shutil.copytree(FIXTURES / folder.name, folder)
    (folder / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        read_glue(task, str(tmp_path), "train" if name == "train.tsv" else "valid")
    assert err.value.key == f"{folder}/{where}"


def test_a_non_utf8_glue_file_names_the_file_and_the_byte(tmp_path):
    shutil.copytree(FIXTURES / "CoLA", tmp_path / "CoLA")
    path = tmp_path / "CoLA" / "dev.tsv"
    path.write_bytes(b"fx0\t1\t\tGood.\nfx0\t1\t\tCaf\xe9 au lait.\n")
    with pytest.raises(ConfigError) as err:
        read_glue("cola", str(tmp_path), "valid")
    assert (err.value.key, err.value.message) == (str(path), "not UTF-8 at byte 23")


def test_missing_glue_folder_or_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        read_glue("cola", str(tmp_path), "train")
    assert err.value.key == "task.glue_dir" and "CoLA" in err.value.message
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(ConfigError) as err:
        read_glue("sst2", str(tmp_path), "valid")
    assert err.value.key == f"{tmp_path}/SST-2/dev.tsv" and "not found" in err.value.message


# ----------------------------------------------------------------------------- shuffled sentences


def test_shuffled_task_is_held_out_by_document_balanced_and_deterministic():
    demo = [SourceConfig()]
    split = split_sentences(demo, 0.25, 0.5, 6, 40)
    train_docs = source_documents(demo[0], 0.25, "train")
    held_docs = source_documents(demo[0], 0.25, "valid")
    assert not set(train_docs) & set(held_docs)  # the core's document split
    in_docs = lambda docs: {s for d in docs for s in sentences(d, 6, 40)}  # noqa: E731
    assert set(split["train"]) == in_docs(train_docs)
    assert set(split["valid"]) | set(split["test"]) <= in_docs(held_docs)  # held out by document...
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(split[a]) & set(split[b])  # ...and no sentence quoted on two sides
    for name, sentence_list in split.items():
        examples = shuffled_examples(sentence_list, seed=0)
        assert len(examples) >= 200, name
        genuine = [s for s, label in examples if label == 1]
        shuffled = [s for s, label in examples if label == 0]
        assert len(genuine) == len(shuffled) == len(set(genuine))  # exactly balanced, each sentence once
        for g, s in zip(genuine, shuffled):
            assert s != g and sorted(s[:-1].lower().split()) == sorted(g[:-1].lower().split())
            assert s[0].isupper() and s[-1] == g[-1]  # only the order tells them apart
    assert split_sentences(demo, 0.25, 0.5, 6, 40) == split
    train = shuffled_examples(split["train"], seed=0)
    assert shuffled_examples(split["train"], seed=0) == train
    assert shuffled_examples(split["train"], seed=1) != train


def test_shuffle_words_keeps_capital_and_final_mark():
    rng = __import__("numpy").random.default_rng(0)
    out = shuffle_words("The quick brown fox jumps over the lazy dog.", rng)
    assert out != "The quick brown fox jumps over the lazy dog." and out.endswith(".") and out[0].isupper()
    assert "The" not in out.split()[1:]  # the old first word lost its capital
    assert shuffle_words("Go go go.", rng) == "Go go go."  # one distinct word: nothing to shuffle


def test_sentences_skip_code_and_grammar():
    doc = (
        'The "if" statement is used for conditional execution.\n\n   if_stmt ::= "if" expression ":" suite\n'
    )
    assert sentences(doc, 3, 40) == ['The "if" statement is used for conditional execution.']


# ----------------------------------------------------------------------------- batches and metrics


def test_sentences_pad_each_batch_and_mask_the_padding():
    tok = ByteTokenizer()
    data = Sentences([("ab", 1), ("abcd", 0), ("abcdefghij", 1)], tok, seq_len=8)
    tokens, doc_ids, labels = data.batch([0, 1])
    assert tokens.tolist() == [
        [tok.cls, 97, 98, tok.sep, tok.pad, tok.pad],
        [tok.cls, 97, 98, 99, 100, tok.sep],
    ]
    assert doc_ids.tolist() == [[0, 0, 0, 0, 1, 1], [0] * 6] and labels.tolist() == [1, 0]
    long, _, _ = data.batch([2])
    assert long.shape == (1, 8) and long[0, -1] == tok.sep  # cut to seq_len, sep kept


def test_tally_metrics_and_mcc():
    tally = Tally()
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tally.add(logits, torch.tensor([1, 0, 0, 1, 1]))
    m = tally.metrics(binary=True)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5
    assert (tally.sums["tp"], tally.sums["fp"], tally.sums["tn"], tally.sums["fn"]) == (2, 1, 1, 1)
    assert m["mcc"] == pytest.approx((2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5)
    tally.add(logits, torch.tensor([1, 0, 0, 1, 1]), weight=0.0)  # a filler batch counts nothing
    assert tally.metrics(binary=True) == m
    assert mcc(5, 0, 5, 0) == 1.0 and mcc(0, 5, 0, 5) == -1.0 and mcc(3, 2, 0, 0) == 0.0
