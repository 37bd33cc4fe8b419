"""Tokenize the train split once, so training reads a memory map instead of tokenizing on the fly.

    python -m src.nanollama.data.pretokenize out=tmp/tokens.npy [tokenizer.kind=byte] [data.seed=0]

Writes `out` (all documents as `bos ... eos`, uint16 or uint32), `<out>.docs.npy` (int64 start offsets of
the documents, plus the end) and `<out>.meta.json` (what the file was written for, checked by the stream).
Each file is written under a temporary name and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError, cli_main, load_config
from .packing import TextDataConfig, TextDocuments, source_documents, token_file_paths
from .text import Tokenizer, TokenizerConfig, build_tokenizer


@dataclass
class PretokenizeConfig:
    out: str = ""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)

    def check(self) -> None:
        if not self.out.endswith(".npy"):
            raise ConfigError("out", f"must name a .npy file, got {self.out!r}")


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_token_file(
    out: str | os.PathLike, cfg: TextDataConfig, tokenizer: Tokenizer, progress: bool = True
) -> None:
    """Tokenize every source's train split, in source order, into `out` and its two companion files."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = [
        TextDocuments(source_documents(s, cfg.valid_fraction, "train"), tokenizer) for s in cfg.sources
    ]
    dtype = token_dtype(tokenizer.vocab_size)
    raw = out.with_name(out.name + ".raw")
    offsets = [0]
    with (
        open(raw, "wb") as f,
        tqdm(
            total=sum(map(len, sources)), desc="tokenize", unit="doc", file=sys.stderr, disable=not progress
        ) as bar,
    ):
        for docs in sources:
            for i in range(len(docs)):
                ids = docs[i].astype(dtype)
                ids.tofile(f)
                offsets.append(offsets[-1] + len(ids))
                bar.update()
    tmp = out.with_name(out.name + ".tmp")
    tokens = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(offsets[-1],))
    if offsets[-1]:
        tokens[:] = np.fromfile(raw, dtype=dtype)
    tokens.flush()
    del tokens
    os.replace(tmp, out)
    raw.unlink()
    docs_path, meta_path = token_file_paths(out)
    _save_atomic(docs_path, np.asarray(offsets, dtype=np.int64))
    meta = {
        "sources": [s.path for s in cfg.sources],
        "source_docs": [len(d) for d in sources],
        "valid_fraction": cfg.valid_fraction,
        "vocab_size": tokenizer.vocab_size,
        "bos": tokenizer.bos,
        "eos": tokenizer.eos,
        "tokens": offsets[-1],
    }
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, meta_path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = load_config(PretokenizeConfig, argv)
    train_docs = None
    if cfg.tokenizer.kind == "sentencepiece":  # trained on the train split, like the apps do
        train_docs = [
            d for s in cfg.data.sources for d in source_documents(s, cfg.data.valid_fraction, "train")
        ]
    tokenizer = build_tokenizer(cfg.tokenizer, train_docs)
    write_token_file(cfg.out, cfg.data, tokenizer)
    print(f"wrote {cfg.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
