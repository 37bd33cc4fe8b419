import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from src.nanollama.config import ConfigError, build_config
from src.nanollama.data.packing import SourceConfig, TextDataConfig, TextStream
from src.nanollama.data.pretokenize import main as pretokenize_main
from src.nanollama.data.pretokenize import write_token_file
from src.nanollama.data.text import ByteTokenizer
from tests.conftest import write_corpus

TOK = ByteTokenizer()


@pytest.fixture
def corpora(tmp_path) -> tuple[str, str]:
    return write_corpus(tmp_path / "a", "a", 40), write_corpus(tmp_path / "b", "b", 30)


def make_cfg(paths, weights=None, **kw) -> TextDataConfig:
    weights = weights or [1.0] * len(paths)
    sources = [SourceConfig(path=p, weight=w) for p, w in zip(paths, weights)]
    return TextDataConfig(**{"sources": sources, "valid_fraction": 0.0, "seq_len": 15, "batch_size": 3, **kw})


def flat(batches) -> np.ndarray:
    return np.concatenate([t.reshape(-1).numpy() for t, _ in batches])


def split_docs(tokens: np.ndarray) -> list[str]:
    """Texts of the complete documents (bos ... eos) of a token stream."""
    docs, cur = [], None
    for t in tokens.tolist():
        if t == TOK.bos:
            cur = []
        elif t == TOK.eos:
            if cur is not None:
                docs.append(TOK.decode(cur))
            cur = None
        elif cur is not None:
            cur.append(t)
    return docs


def test_config_check():
    with pytest.raises(ConfigError, match="sources.0.weight"):
        build_config(TextDataConfig, {"sources": [{"weight": 0.0}]})
    with pytest.raises(ConfigError, match="seq_len"):
        build_config(TextDataConfig, {"seq_len": 0})
    with pytest.raises(ConfigError, match="tokens_file"):
        build_config(TextDataConfig, {"tokens_file": "/nonexistent.npy"})
    assert build_config(TextDataConfig, {}).sources[0].path == ""


def test_rows_pack_the_document_stream_exactly(corpora):
    cfg = make_cfg(corpora[:1])
    with TextStream(cfg, TOK) as stream:
        batches = list(itertools.islice(stream, 30))
    for tokens, doc_ids in batches:
        assert tokens.shape == doc_ids.shape == (3, 16) and tokens.dtype == doc_ids.dtype == torch.int64
        assert (doc_ids[:, 0] == 0).all()
        steps = doc_ids[:, 1:] - doc_ids[:, :-1]
        assert ((steps == 0) | (steps == 1)).all()
        assert torch.equal(steps == 1, tokens[:, 1:] == TOK.bos)  # a new document exactly at each bos
    # the rows concatenated are the documents of the shuffled epochs, back to back, nothing lost
    order0 = np.random.default_rng([0, 0, 0]).permutation(40)
    order1 = np.random.default_rng([0, 0, 1]).permutation(40)
    texts = [json.loads(line)["text"] for line in open(f"{corpora[0]}/docs.jsonl")]
    expected = np.concatenate([[TOK.bos, *TOK.encode(texts[i]), TOK.eos] for i in [*order0, *order1]])
    got = flat(batches)
    assert len(got) <= len(expected)
    np.testing.assert_array_equal(got, expected[: len(got)])


def test_rank_shards_do_not_overlap(corpora):
    cfg = make_cfg(corpora[:1], epochs=1)
    seen = []
    for rank in range(3):
        with TextStream(cfg, TOK, rank=rank, world_size=3) as stream:
            seen.append(set(split_docs(flat(list(stream)))))
    assert all(len(s) > 5 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_exact_resume_from_any_state_through_json(corpora):
    cfg = make_cfg(corpora, weights=[2.0, 1.0])
    with TextStream(cfg, TOK) as stream:
        reference, states = [], []
        for _ in range(150):  # several epochs of both sources
            reference.append(next(stream))
            states.append(json.loads(json.dumps(stream.state_dict())))
    assert stream.epoch[0] >= 2 and stream.epoch[1] >= 1
    epoch_edges = [i for i in range(1, 150) if states[i]["epoch"] != states[i - 1]["epoch"]]
    for at in [0, 7, epoch_edges[0] - 1, epoch_edges[0], epoch_edges[-1], 120]:
        with TextStream(cfg, TOK) as resumed:
            resumed.load_state_dict(states[at])
            for want in reference[at + 1 : at + 12]:
                got = next(resumed)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_epochs_stop_after_one_pass_and_are_counted(corpora):
    cfg = make_cfg(corpora[:1], epochs=1)
    with TextStream(cfg, TOK) as stream:
        batches = list(stream)
        # every document was drawn; the part of the last ones short of a full batch is never emitted
        (record,) = stream.consumed()
        assert (record["epoch"], record["position"], record["epochs"], record["documents"]) == (1, 0, 1.0, 40)
        with pytest.raises(StopIteration):
            next(stream)
    docs = split_docs(flat(batches))
    assert len(docs) == len(set(docs)) and len(docs) >= 40 - 3  # one pass, less the unemitted tail
    with TextStream(make_cfg(corpora[:1]), TOK) as endless:
        for _ in range(len(batches) * 3):
            next(endless)
        assert endless.consumed()[0]["epoch"] >= 2


def test_consumed_counts_what_each_source_gave(corpora):
    cfg = make_cfg(corpora, weights=[2.0, 1.0])
    with TextStream(cfg, TOK, rank=1, world_size=2) as stream:
        n = 0
        for epochs_before in [[0, 0], *[[r["epoch"] for r in stream.consumed()] for _ in range(3)]]:
            for _ in range(17):
                next(stream)
            n += 17
            a, b = stream.consumed()
            assert [a["epoch"], b["epoch"]] >= epochs_before  # values move on from one look to the next
            # every token drawn was emitted in a row or waits in the buffer; positions count documents
            assert a["tokens"] + b["tokens"] == n * 3 * 16 + len(stream.buffer)
            for r, n_docs in [(a, 40), (b, 30)]:
                assert r["epoch_documents"] == n_docs // 2
                assert r["documents"] == r["epoch"] * r["epoch_documents"] + r["position"]
                assert r["epochs"] == pytest.approx(r["epoch"] + r["position"] / r["epoch_documents"])
        assert a["epoch"] >= 1 and b["epoch"] >= 1 and a["documents"] > b["documents"]
        assert (a["source"], a["path"], b["path"]) == (0, corpora[0], corpora[1])
        resumed = TextStream(cfg, TOK, rank=1, world_size=2)
        resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        assert resumed.consumed() == stream.consumed()
        json.dumps(stream.consumed())  # goes as is into the checkpoint's record


@pytest.mark.parametrize(
    "weights, rank, world_size, epochs",
    [([1.0], 0, 1, 1), ([1.0], 1, 2, 3), ([2.0, 1.0], 0, 1, 2), ([1.0, 3.0], 2, 3, 1)],
)
def test_count_batches_is_the_exact_length_of_the_stream(corpora, weights, rank, world_size, epochs):
    cfg = make_cfg(corpora[: len(weights)], weights=weights, epochs=epochs)
    with TextStream(cfg, TOK, rank=rank, world_size=world_size) as stream:
        counted = stream.count_batches()
        batches = list(stream)
        assert counted == len(batches) > 0
        # the last documents, short of a whole batch, are neither emitted nor counted
        assert epochs - 0.5 < stream.consumed()[0]["epochs"] <= epochs
        assert len(stream.buffer) < 3 * 16
    with pytest.raises(ValueError, match="endless"):
        TextStream(make_cfg(corpora[:1]), TOK).count_batches()


def test_an_epoch_ends_after_the_whole_batches_of_its_last_document(tmp_path):
    (tmp_path / "long").mkdir()
    for i in range(5):  # 302 tokens a document, batches of 48: the last one alone fills six batches
        (tmp_path / "long" / f"{i}.txt").write_text(f"{i}" * 300)
    with TextStream(make_cfg([str(tmp_path / "long")], epochs=1), TOK) as stream:
        assert len(list(stream)) == stream.count_batches() == 5 * 302 // 48


def test_state_after_stop_is_that_of_the_last_batch(corpora):
    cfg = make_cfg(corpora[:1], epochs=1)
    with TextStream(cfg, TOK) as stream:
        *_, last_state = [(b, stream.state_dict()) for b in stream][-1]
        assert stream.state_dict() == last_state


def test_mixing_follows_the_weights(tmp_path):
    paths = [write_corpus(tmp_path / "a", "a", 50), write_corpus(tmp_path / "b", "b", 50)]
    cfg = make_cfg(paths, weights=[3.0, 1.0], seq_len=255, batch_size=8)
    with TextStream(cfg, TOK) as stream:
        docs = split_docs(flat(list(itertools.islice(stream, 40))))
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert len(docs) > 1000 and abs(share_a - 0.75) < 0.04


def test_valid_split_is_disjoint_from_train(tmp_path):
    path = write_corpus(tmp_path / "a", "a", 200)
    cfg = make_cfg([path], valid_fraction=0.2, epochs=1, batch_size=1)
    with TextStream(cfg, TOK, split="train") as train, TextStream(cfg, TOK, split="valid") as valid:
        train_docs, valid_docs = set(split_docs(flat(list(train)))), set(split_docs(flat(list(valid))))
    assert 20 < len(valid_docs) < 60 and not train_docs & valid_docs


def test_pretokenized_file_gives_the_same_batches(corpora, tmp_path):
    out = tmp_path / "tok" / "train.npy"
    write_token_file(out, make_cfg(corpora), TOK, progress=False)
    tokens = np.load(out, mmap_mode="r")
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    on_the_fly = TextStream(make_cfg(corpora, weights=[1.0, 3.0]), TOK)
    from_file = TextStream(make_cfg(corpora, weights=[1.0, 3.0], tokens_file=str(out)), TOK)
    for _ in range(40):
        a, b = next(on_the_fly), next(from_file)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert from_file.state_dict() == on_the_fly.state_dict()
    assert [r["tokens_file"] for r in from_file.consumed()] == [str(out)] * 2
    assert [{k: v for k, v in r.items() if k != "tokens_file"} for r in from_file.consumed()] == (
        on_the_fly.consumed()
    )
    epochs = make_cfg(corpora, epochs=2)
    assert TextStream(dataclasses.replace(epochs, tokens_file=str(out)), TOK).count_batches() == (
        TextStream(epochs, TOK).count_batches()
    )
    with pytest.raises(ConfigError, match="tokens_file"):
        TextStream(make_cfg(corpora[:1], tokens_file=str(out)), TOK)


def test_pretokenize_cli(corpora, tmp_path, capsys):
    out = tmp_path / "cli.npy"
    pretokenize_main([f"out={out}", "data.valid_fraction=0.1", f"data.sources=[{{path: {corpora[0]}}}]"])
    meta = json.loads((tmp_path / "cli.meta.json").read_text())
    offsets = np.load(tmp_path / "cli.docs.npy")
    assert meta["sources"] == [corpora[0]] and offsets[-1] == len(np.load(out)) == meta["tokens"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.raw"))
    with pytest.raises(SystemExit) as e:
        pretokenize_main(["out=bad.txt"])
    assert e.value.code == 2 and "out" in capsys.readouterr().err
