import json
import os

import pytest

from src.nanollama.config import ConfigError, build_config
from src.nanollama.data.text import (
    SPECIALS,
    ByteTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerConfig,
    build_tokenizer,
    demo_documents,
    read_corpus,
    split_documents,
    write_tiktoken_ranks,
)

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "Crème brûlée, naïve café, Straße, Ελληνικά, 日本語",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 \U0001f9ea",
    "  leading spaces,\ttabs,\n\nblank lines and trailing space  ",
    "<mask> and <|bos|> are plain text here",
    "",
]


@pytest.fixture(scope="module")
def demo():
    return demo_documents()


def check_interface(tok):
    ids = tok.special_ids
    assert set(ids) == set(SPECIALS)
    assert len(set(ids.values())) == len(SPECIALS), "special ids must be distinct"
    assert all(0 <= i < tok.vocab_size for i in ids.values())
    for text in SAMPLES:
        encoded = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in encoded)
        assert not set(encoded) & set(ids.values()), "raw text must never produce special ids"
        assert tok.decode(encoded) == text
    # Specials added by an app are dropped when decoding.
    assert tok.decode([tok.bos, *tok.encode("abc"), tok.eos, tok.pad]) == "abc"


# ----------------------------------------------------------------------------- corpora


def test_demo_corpus_is_english_and_deterministic(demo):
    assert len(demo) > 50 and sum(map(len, demo)) > 300_000
    words = " ".join(demo).lower().split()
    for common in ("the", "and", "of", "is", "to"):
        assert words.count(common) > 100
    assert demo == demo_documents()


def test_fortunes_are_split_on_percent_lines(tmp_path):
    (tmp_path / "wisdom").write_text("First quote\n  -- someone\n%\nSecond quote\n%\n\n%\nThird\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "wisdom.u8").write_text("ignored")
    docs = demo_documents(fortune_dir=tmp_path)
    assert docs[-3:] == ["First quote\n  -- someone", "Second quote", "Third"]
    assert len(docs) == len(demo_documents(fortune_dir=tmp_path / "missing")) + 3


def test_split_is_deterministic_disjoint_and_stable(demo):
    train, valid = split_documents(demo, 0.2, seed=1)
    assert (train, valid) == split_documents(demo, 0.2, seed=1)
    assert sorted(train + valid) == sorted(demo) and not set(train) & set(valid)
    assert 0 < len(valid) < len(train)
    assert split_documents(demo, 0.2, seed=2) != (train, valid)
    # Adding documents leaves every earlier document on its side.
    train2, valid2 = split_documents(["a new document", "another one", *demo], 0.2, seed=1)
    assert set(train) <= set(train2) and set(valid) <= set(valid2)
    assert split_documents(demo, 0.0)[1] == [] and split_documents(demo, 1.0)[0] == []
    with pytest.raises(ConfigError, match="valid_fraction"):
        split_documents(demo, 1.5)


def test_read_corpus_txt_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "notes.md").write_text("not a corpus file")
    assert read_corpus(tmp_path) == ["first document\nwith two lines", "second", "third"]


def test_read_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        read_corpus(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no .txt or .jsonl"):
        read_corpus(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ConfigError) as e:
        read_corpus(tmp_path)
    assert e.value.key == f"{bad}:2"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        read_corpus(tmp_path)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(SPECIALS) and tok.bos == 256
    check_interface(tok)
    assert tok.encode("é") == [0xC3, 0xA9]


def test_sentencepiece_trains_offline_and_round_trips(demo, tmp_path):
    tok = SentencePieceTokenizer.train(demo[:30], 512, tmp_path)
    assert tok.vocab_size == 512
    check_interface(tok)
    text = "The following methods can be defined to customize the meaning of attribute access."
    assert len(tok.encode(text)) < len(text.encode()) / 2, "BPE should compress English text"
    for text in demo[30:35]:  # unseen documents, including characters absent from training
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_cache_is_reused(demo, tmp_path):
    docs = demo[:10]
    first = SentencePieceTokenizer.train(docs, 400, tmp_path)
    (model,) = tmp_path.iterdir()
    os.utime(model, (0, 0))  # a retrain would replace the file and its mtime
    second = SentencePieceTokenizer.train(docs, 400, tmp_path)
    assert second.model_file == first.model_file and os.stat(model).st_mtime == 0
    assert list(tmp_path.iterdir()) == [model], "no leftover temporary files"
    # Another vocabulary size or corpus is another model.
    SentencePieceTokenizer.train(docs, 420, tmp_path)
    SentencePieceTokenizer.train(docs[1:], 400, tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def test_sentencepiece_vocab_too_large_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        SentencePieceTokenizer.train(["a tiny corpus"], 4096, tmp_path)


@pytest.fixture
def ranks_file(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b" an", b" and"):
        ranks[merge] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken_ranks(ranks, path)
    return path


def test_tiktoken_from_local_file(ranks_file):
    tok = TiktokenTokenizer(ranks_file)
    assert tok.vocab_size == 266 + len(SPECIALS) and tok.bos == 266
    check_interface(tok)
    assert tok.encode(" the") == [259] and tok.encode(" and the thing") == [265, 259, 32, 256, 261]


def test_tiktoken_sees_a_rewritten_ranks_file(ranks_file):
    assert TiktokenTokenizer(ranks_file).encode(" the") == [259]
    write_tiktoken_ranks({bytes([i]): i for i in range(256)}, ranks_file)  # same path, merges removed
    assert TiktokenTokenizer(ranks_file).encode(" the") == list(b" the")


def test_config_and_build(demo, tmp_path, ranks_file):
    assert isinstance(build_tokenizer(TokenizerConfig()), ByteTokenizer)
    cfg = build_config(
        TokenizerConfig, {"kind": "sentencepiece", "vocab_size": 400, "cache_dir": str(tmp_path)}
    )
    assert build_tokenizer(cfg, demo[:10]).vocab_size == 400
    assert build_tokenizer(TokenizerConfig(kind="tiktoken", path=str(ranks_file))).vocab_size == 272
    for bad, key in (
        ({"kind": "wordpiece"}, "kind"),
        ({"kind": "sentencepiece", "vocab_size": 100}, "vocab_size"),
        ({"kind": "tiktoken"}, "path"),
    ):
        with pytest.raises(ConfigError) as e:
            build_config(TokenizerConfig, bad)
        assert e.value.key == key
    with pytest.raises(ConfigError, match="not found"):
        build_tokenizer(TokenizerConfig(kind="tiktoken", path=str(tmp_path / "none.tiktoken")))
    with pytest.raises(ConfigError, match="documents"):
        build_tokenizer(cfg)


def test_jsonl_round_trip_of_demo(tmp_path, demo):
    # A corpus written as jsonl reads back exactly, including unusual characters.
    docs = demo[:5] + SAMPLES
    with (tmp_path / "c.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    assert read_corpus(tmp_path) == docs


def test_non_utf8_corpus_files_name_the_file_and_the_byte(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_corpus(tmp_path)
    assert (e.value.key, e.value.message) == (str(bad), "not UTF-8 at byte 3")
    bad.unlink()
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as e:
        read_corpus(tmp_path)
    assert (e.value.key, e.value.message) == (str(bad), "not UTF-8 at byte 28")  # of the file, not the line


def test_tokenizer_errors_name_their_full_key(tmp_path):
    missing = TokenizerConfig(kind="tiktoken", path=str(tmp_path / "none.tiktoken"))
    too_large = TokenizerConfig(kind="sentencepiece", vocab_size=100_000, cache_dir=str(tmp_path))
    for cfg, docs, key in (
        (missing, None, "tokenizer.path"),
        (too_large, ["a tiny corpus"], "tokenizer.vocab_size"),
    ):
        with pytest.raises(ConfigError) as e:
            build_tokenizer(cfg, docs)
        assert e.value.key == key
