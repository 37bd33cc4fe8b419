"""Text corpora and tokenizers that work offline, on every machine.

- `demo_documents` gives real English text with no download (Python's own help texts, plus the
  `fortunes` files where Debian installed them), so text apps and tests run anywhere;
- `split_documents` splits by a hash of each document, so adding documents never moves the others;
- `read_corpus` reads a folder of `.txt` / `.jsonl` files (UTF-8: other bytes exit 2 naming the file
  and the offset, rather than being replaced silently);
- the tokenizers share one small interface; apps read the special ids from the tokenizer itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, FileError, read_utf8, section
from ..extras import require

FORTUNE_DIR = "/usr/share/games/fortunes"
SPECIALS = ("bos", "eos", "pad", "mask", "cls", "sep")

# GPT-2's pre-tokenization regex (tiktoken's r50k_base pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------- corpora


def _fortune_documents(folder: str | os.PathLike) -> list[str]:
    """Fortune files separate their quotes by lines holding a single `%`."""
    docs: list[str] = []
    root = Path(folder)
    if not root.is_dir():
        return docs
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")):
        doc: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
            if line.strip() == "%":
                if "".join(doc).strip():
                    docs.append("\n".join(doc).strip("\n"))
                doc = []
            else:
                doc.append(line)
    return docs


def demo_documents(fortune_dir: str | os.PathLike = FORTUNE_DIR) -> list[str]:
    """Real English text that ships with Python (and Debian's fortunes when installed), in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    return [d for d in docs if d] + _fortune_documents(fortune_dir)


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: list[str], valid_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Each document's side depends only on (its text, seed): stable when documents are added or removed,
    and duplicates never straddle train and valid."""
    if not 0.0 <= valid_fraction <= 1.0:
        raise ConfigError("valid_fraction", f"must be in [0, 1], got {valid_fraction}")
    train, valid = [], []
    for doc in docs:
        (valid if _unit_hash(doc, seed) < valid_fraction else train).append(doc)
    return train, valid


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileError(f"{path}:{lineno}", f"invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise FileError(f"{path}:{lineno}", "expected an object with a string 'text' field")
        docs.append(record["text"])
    return docs


def read_corpus(folder: str | os.PathLike) -> list[str]:
    """Documents of a folder (recursively, sorted by path): one per `.txt` file, one per `.jsonl` line."""
    root = Path(folder)
    if not root.is_dir():
        raise FileError(folder, "corpus folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise FileError(folder, "no .txt or .jsonl files in the corpus folder")
    docs: list[str] = []
    for path in files:
        if path.suffix == ".txt":
            docs.append(read_utf8(path))
        else:
            docs.extend(_read_jsonl(path))
    return docs


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """The interface every tokenizer offers: `encode`, `decode`, `vocab_size` and the special ids.

    `encode` never produces special ids from raw text (a document containing "<mask>" stays text);
    apps add `bos`, `eos`, `mask`, ... themselves. `decode` drops special ids.
    """

    kind: str
    vocab_size: int
    digest: str = ""  # sha256 of what defines the vocabulary (sentencepiece: its pieces; tiktoken: the ranks)
    bos: int
    eos: int
    pad: int
    mask: int
    cls: int
    sep: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SPECIALS}

    @property
    def identity(self) -> str:
        """What fixes the meaning of every id (kind, size, and a hash of the pieces or the ranks file): two
        tokenizers with the same identity map text to the same ids. Recorded in every checkpoint."""
        return f"{self.kind}-{self.vocab_size}" + (f"-{self.digest[:16]}" if self.digest else "")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then the specials: exact round trip of any text, no training."""

    kind = "byte"

    def __init__(self) -> None:
        for i, name in enumerate(SPECIALS):
            setattr(self, name, 256 + i)
        self.vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE with byte fallback and no normalization, so that decoding gives back the text."""

    kind = "sentencepiece"

    # Fixed settings of the training; part of the cache key.
    SETTINGS = dict(
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols="<mask>,<cls>,<sep>",
        input_sentence_size=1_000_000,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        num_threads=2,
        minloglevel=2,
    )

    def __init__(self, model_file: str | os.PathLike):
        spm = require("sentencepiece", "text", "a sentencepiece tokenizer")
        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.vocab_size = self.sp.get_piece_size()
        pieces = "\n".join(self.sp.id_to_piece(i) for i in range(self.vocab_size))  # what each id means
        self.digest = hashlib.sha256(pieces.encode()).hexdigest()
        self.bos, self.eos, self.pad = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.mask, self.cls, self.sep = (self.sp.piece_to_id(p) for p in ("<mask>", "<cls>", "<sep>"))

    @classmethod
    def cache_path(cls, docs: list[str], vocab_size: int, cache_dir: str | os.PathLike) -> Path:
        """Name derived from (corpus, vocab size, settings, library version): same inputs, same model."""
        spm = require("sentencepiece", "text", "a sentencepiece tokenizer")
        h = hashlib.sha256(json.dumps([vocab_size, cls.SETTINGS, spm.__version__]).encode())
        for doc in docs:
            h.update(hashlib.sha256(doc.encode("utf-8", errors="surrogatepass")).digest())
        return Path(cache_dir) / f"sentencepiece_v{vocab_size}_{h.hexdigest()[:16]}.model"

    @classmethod
    def train(cls, docs: list[str], vocab_size: int, cache_dir: str | os.PathLike) -> SentencePieceTokenizer:
        """Train once per (corpus, vocab size); later calls (and other ranks) load the cached model."""
        path = cls.cache_path(docs, vocab_size, cache_dir)
        if not path.exists():
            cls._train_to(path, docs, vocab_size)
        return cls(path)

    @classmethod
    def _train_to(cls, path: Path, docs: list[str], vocab_size: int) -> None:
        spm = require("sentencepiece", "text", "a sentencepiece tokenizer")
        path.parent.mkdir(parents=True, exist_ok=True)
        # SentencePiece trains on "sentences" of bounded length: feed lines, not whole documents.
        lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
        if not lines:
            raise ConfigError("kind", "a sentencepiece tokenizer cannot train on a corpus with no text")
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            prefix = os.path.join(tmp, "model")
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, **cls.SETTINGS
                )
            except RuntimeError as e:
                raise ConfigError("vocab_size", f"sentencepiece training failed: {e}") from None
            os.replace(prefix + ".model", path)  # atomic: concurrent ranks never read a partial file

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    """A tiktoken `Encoding` from a local `.tiktoken` ranks file and GPT-2's regex; specials come after the
    ranks."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike, pattern: str = GPT2_PATTERN):
        tiktoken = require("tiktoken", "text", "a tiktoken tokenizer")
        load_tiktoken_bpe = require("tiktoken.load", "text", "a tiktoken tokenizer").load_tiktoken_bpe
        if not Path(path).is_file():
            raise ConfigError("path", f"tiktoken ranks file not found: {path}")
        # tiktoken caches files by *path* only; passing the content hash makes it notice a rewritten file.
        self.digest = digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        ranks = load_tiktoken_bpe(str(path), expected_hash=digest)
        first = max(ranks.values()) + 1
        specials = {f"<|{name}|>": first + i for i, name in enumerate(SPECIALS)}
        for name, i in zip(SPECIALS, specials.values()):
            setattr(self, name, i)
        self.encoding = tiktoken.Encoding(
            name=Path(path).stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        specials = set(self.special_ids.values())
        return self.encoding.decode([i for i in ids if i not in specials])


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """The `.tiktoken` format: base64 token, a space, the rank; one per line."""
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- config


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # byte | sentencepiece | tiktoken
    vocab_size: int = 4096  # sentencepiece only; the others take it from their vocabulary
    path: str = ""  # tiktoken ranks file
    cache_dir: str = "tmp/tokenizers"  # where trained sentencepiece models are kept

    def check(self) -> None:
        if self.kind not in ("byte", "sentencepiece", "tiktoken"):
            raise ConfigError("kind", f"must be byte, sentencepiece or tiktoken, got {self.kind!r}")
        if self.kind == "sentencepiece" and self.vocab_size < 256 + 8:
            raise ConfigError(
                "vocab_size",
                f"must be at least 264 (256 bytes, unk, 6 specials, pieces), got {self.vocab_size}",
            )
        if self.kind == "tiktoken" and not self.path:
            raise ConfigError("path", "a tiktoken tokenizer needs the path of its ranks file")
        if self.kind != "byte":  # the library, before any log dir exists
            require(self.kind, "text", f"kind={self.kind}")


def build_tokenizer(cfg: TokenizerConfig, docs: list[str] | None = None, key: str = "tokenizer") -> Tokenizer:
    """The tokenizer a config asks for; `docs` is the training corpus of a sentencepiece tokenizer.
    `key` is where `cfg` sits in the run config: errors name full keys, e.g. `tokenizer.path`."""
    with section(key):
        cfg.check()
        if cfg.kind == "byte":
            return ByteTokenizer()
        if cfg.kind == "tiktoken":
            return TiktokenTokenizer(cfg.path)
        if not docs:
            raise ConfigError("kind", "a sentencepiece tokenizer needs documents to train on")
        return SentencePieceTokenizer.train(docs, cfg.vocab_size, cfg.cache_dir)
