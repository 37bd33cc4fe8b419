"""Packed, resumable text stream: documents from weighted sources, cut into rows of `seq_len + 1` tokens.

- every document is `bos + tokens + eos`; documents are concatenated and cut into rows with no padding,
  the tail of a document continues in the next row, and each row carries document ids (counting from 0
  inside the row) so attention can be masked at document boundaries;
- at each document draw the source is chosen with probability proportional to its weight; each source
  walks its documents in a per-epoch permutation of (seed, source, epoch), rank r of w taking every w-th
  (both by `SourceSampler`, mixture.py, which the dataset mixtures of other apps share);
- the state (per-source epoch and position, the RNG, the tokens not yet emitted) is a small JSON object,
  so a resumed stream yields exactly the batches an uninterrupted one would;
- `consumed()` says how much of each source the stream has read (epochs, documents, tokens), for the
  record a checkpoint keeps; `count_batches()` is the exact length of an `epochs`-long stream.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .mixture import SourceSampler
from .text import Tokenizer, demo_documents, read_corpus, split_documents

SPLITS = {"train": 0, "valid": 1}


@dataclass
class SourceConfig:
    path: str = ""  # corpus folder for `read_corpus`; empty: the built-in demo corpus
    weight: float = 1.0

    def check(self) -> None:
        if not self.weight > 0:
            raise ConfigError("weight", f"must be > 0, got {self.weight}")


@dataclass
class TextDataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    valid_fraction: float = 0.05
    seq_len: int = 128  # positions the model sees; rows have seq_len + 1 tokens
    batch_size: int = 16  # rows per batch of the stream
    seed: int = 0  # document order and source draws (the train/valid split does not depend on it)
    tokens_file: str = (
        ""  # train split written by `python -m src.nanollama.data.pretokenize`; empty: on the fly
    )
    epochs: int = 0  # 0: endless; k: stop once source 0 has completed k epochs

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("sources", "needs at least one source")
        if not 0.0 <= self.valid_fraction <= 1.0:
            raise ConfigError("valid_fraction", f"must be in [0, 1], got {self.valid_fraction}")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.epochs < 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")
        if self.tokens_file and not Path(self.tokens_file).is_file():
            raise ConfigError("tokens_file", f"file not found: {self.tokens_file}")


# ----------------------------------------------------------------------------- documents


def source_documents(source: SourceConfig, valid_fraction: float, split: str) -> list[str]:
    """One side of a source's split; the split hashes each document, so it is the same for every seed."""
    docs = read_corpus(source.path) if source.path else demo_documents()
    train, valid = split_documents(docs, valid_fraction)
    return train if split == "train" else valid


class TextDocuments:
    """Documents tokenized when drawn: nothing to prepare, any tokenizer."""

    def __init__(self, docs: list[str], tokenizer: Tokenizer):
        self.docs, self.tokenizer = docs, tokenizer

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        ids = [self.tokenizer.bos, *self.tokenizer.encode(self.docs[i]), self.tokenizer.eos]
        return np.asarray(ids, dtype=np.int64)


class TokenFileDocuments:
    """Documents `lo..hi` of a pre-tokenized file (each already `bos ... eos`), read from a memory map."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, lo: int, hi: int):
        self.tokens, self.offsets, self.lo, self.hi = tokens, offsets, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> np.ndarray:
        start, end = self.offsets[self.lo + i], self.offsets[self.lo + i + 1]
        return np.asarray(self.tokens[start:end], dtype=np.int64)


class DocumentLengths:
    """Stand-in for a source's documents: zeros of each document's length, for a dry run of the stream
    (each length computed once, on first draw)."""

    def __init__(self, docs: TextDocuments | TokenFileDocuments):
        self.docs, self.lengths = docs, {}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self.lengths:
            self.lengths[i] = len(self.docs[i])
        return np.zeros(self.lengths[i], dtype=np.int64)


def token_file_paths(tokens_file: str | Path) -> tuple[Path, Path]:
    """`x.npy` -> (`x.docs.npy`, `x.meta.json`): the document offsets and the description of the file."""
    stem = str(tokens_file).removesuffix(".npy")
    return Path(stem + ".docs.npy"), Path(stem + ".meta.json")


def open_token_file(cfg: TextDataConfig, tokenizer: Tokenizer) -> list[TokenFileDocuments]:
    """One document list per source; refuses a file written for other sources, split or vocabulary."""
    docs_path, meta_path = token_file_paths(cfg.tokens_file)
    meta = json.loads(meta_path.read_text())
    expected = {
        "sources": [s.path for s in cfg.sources],
        "valid_fraction": cfg.valid_fraction,
        "vocab_size": tokenizer.vocab_size,
    }
    for key, value in expected.items():
        if meta[key] != value:
            raise ConfigError(
                "tokens_file", f"{cfg.tokens_file} was written for {key}={meta[key]}, not {value}"
            )
    tokens = np.load(cfg.tokens_file, mmap_mode="r")
    offsets = np.load(docs_path)
    bounds = np.cumsum([0, *meta["source_docs"]])
    return [TokenFileDocuments(tokens, offsets, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------- stream


class TextStream:
    """Endless (or `epochs`-long) batches `(tokens, doc_ids)`, both LongTensor (batch_size, seq_len + 1).

    `state_dict()` is the state right after the last batch returned; `load_state_dict` continues from it.
    """

    def __init__(
        self,
        cfg: TextDataConfig,
        tokenizer: Tokenizer,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ):
        if split not in SPLITS:
            raise ConfigError("split", f"must be train or valid, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        if cfg.tokens_file and split == "train":
            self.sources = open_token_file(cfg, tokenizer)
        else:
            self.sources = [
                TextDocuments(source_documents(s, cfg.valid_fraction, split), tokenizer) for s in cfg.sources
            ]
        for i, docs in enumerate(self.sources):
            if len(docs) < world_size:  # a held-out split too small is its fraction's fault
                key = "valid_fraction" if split == "valid" else f"sources.{i}"
                raise ConfigError(key, f"source {i} has {len(docs)} {split} documents for {world_size} ranks")
        self._start()

    def _start(self) -> None:
        """The state of a stream that has returned nothing yet. The sampler's sources are endless: the
        stream's own rule (stop once source 0 ran `epochs`) ends it."""
        n = len(self.sources)
        self.sampler = SourceSampler(
            sizes=[len(docs) for docs in self.sources],
            weights=[s.weight for s in self.cfg.sources],
            seeds=[self.cfg.seed] * n,
            draw_seed=[self.cfg.seed, SPLITS[self.split], self.rank],
            rank=self.rank,
            world_size=self.world_size,
        )
        self.tokens = [0] * n  # drawn from each source, for `consumed`
        self.buffer = np.zeros(0, dtype=np.int64)  # tokens drawn but not yet emitted
        self.buffer_docs = np.zeros(0, dtype=np.int64)  # their document ids, counted from the buffer's first

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self) -> TextStream:
        return self

    @property
    def epoch(self) -> list[int]:
        """Completed epochs of each source (the sampler's counters)."""
        return self.sampler.epoch

    @property
    def position(self) -> list[int]:
        return self.sampler.position

    @property
    def documents(self) -> list[int]:
        return self.sampler.samples

    def shard(self, source: int, epoch: int) -> np.ndarray:
        """This rank's documents of `source` in `epoch`; the remainder mod world_size is dropped so that
        every rank's epoch has the same length."""
        return self.sampler.shard(source, epoch)

    def _draw_document(self) -> np.ndarray:
        """The next document of a source chosen by weight; StopIteration once source 0 ran its epochs."""
        if self.cfg.epochs and self.epoch[0] >= self.cfg.epochs:
            raise StopIteration
        s, index = self.sampler.draw()
        doc = self.sources[s][index]
        self.tokens[s] += len(doc)
        return doc

    def _fill(self, n_tokens: int) -> None:
        docs, ids = [self.buffer], [self.buffer_docs]
        size, next_id = len(self.buffer), (int(self.buffer_docs[-1]) + 1 if len(self.buffer_docs) else 0)
        while size < n_tokens:
            doc = self._draw_document()
            docs.append(doc)
            ids.append(np.full(len(doc), next_id, dtype=np.int64))
            size, next_id = size + len(doc), next_id + 1
        self.buffer, self.buffer_docs = np.concatenate(docs), np.concatenate(ids)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        row, batch = self.cfg.seq_len + 1, self.cfg.batch_size
        before = self.state_dict()
        try:
            self._fill(row * batch)
        except StopIteration:
            self.load_state_dict(before)  # the state stays that of the last batch returned
            raise
        tokens = self.buffer[: row * batch].reshape(batch, row)
        docs = self.buffer_docs[: row * batch].reshape(batch, row)
        docs = docs - docs[:, :1]  # count documents from 0 inside each row
        self.buffer, self.buffer_docs = self.buffer[row * batch :], self.buffer_docs[row * batch :]
        if len(self.buffer_docs):
            self.buffer_docs = self.buffer_docs - self.buffer_docs[0]
        return torch.from_numpy(tokens.copy()), torch.from_numpy(docs)

    def count_batches(self) -> int:
        """Batches a fresh stream returns before its `epochs` end: a dry run of the same draws over document
        lengths only (each document tokenized once), so exact, rank by rank."""
        if not self.cfg.epochs:
            raise ValueError("an endless stream (epochs=0) has no length")
        dry = copy.copy(self)
        dry.sources = [DocumentLengths(docs) for docs in self.sources]
        dry._start()
        return sum(1 for _ in dry)

    def consumed(self) -> list[dict]:
        """What this rank has read of each source: completed epochs, the position in the current one
        (`epochs` counts both), documents and tokens drawn (the last few may still wait in the buffer,
        which the stream's state keeps). One flat, JSON-able record per source."""
        out = []
        for i, (s, docs) in enumerate(zip(self.cfg.sources, self.sources)):
            per_epoch = len(docs) // self.world_size
            record = {
                "source": i,
                "path": s.path or "demo",
                "epoch": self.epoch[i],
                "position": self.position[i],
                "epoch_documents": per_epoch,
                "epochs": self.epoch[i] + self.position[i] / per_epoch,
                "documents": self.documents[i],
                "tokens": self.tokens[i],
            }
            if self.cfg.tokens_file and self.split == "train":
                record["tokens_file"] = self.cfg.tokens_file
            out.append(record)
        return out

    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict()  # the format predates the sampler: its fields, renamed
        return {
            "epoch": sampler["epoch"],
            "position": sampler["position"],
            "documents": sampler["samples"],
            "tokens": list(self.tokens),
            "rng": sampler["rng"],
            "buffer": self.buffer.tolist(),
            "buffer_docs": self.buffer_docs.tolist(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; it must come from a stream with the same sources and world size."""
        if len(state["epoch"]) != len(self.sources) or state["world_size"] != self.world_size:
            raise ValueError(
                f"stream state for {len(state['epoch'])} sources on {state['world_size']} ranks, "
                f"this stream has {len(self.sources)} on {self.world_size}"
            )
        zeros = [0] * len(self.sources)  # states saved before these counters existed
        self.sampler.load_state_dict(
            {
                **self.sampler.state_dict(),  # sizes and world size, checked above
                "epoch": state["epoch"],
                "position": state["position"],
                "samples": state.get("documents", zeros),
                "rng": state["rng"],
            }
        )
        self.tokens = [int(t) for t in state.get("tokens", zeros)]
        self.buffer = np.asarray(state["buffer"], dtype=np.int64)
        self.buffer_docs = np.asarray(state["buffer_docs"], dtype=np.int64)
