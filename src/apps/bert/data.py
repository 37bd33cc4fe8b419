"""BERT's data: masked packed text for pretraining, labelled sentences for classification.

- `Masker` corrupts tokens the BERT way (select 15%, of them 80% mask, 10% a random token, 10% kept);
  `MaskedStream` applies it to the core's packed `TextStream`, with a per-batch seed so that a resumed
  run masks exactly as an uninterrupted one would;
- `read_glue` reads CoLA and SST-2 as the GLUE distribution lays them out;
- `split_sentences` and `shuffled_examples` build the default classification task from any corpus: a
  genuine sentence (label 1) against the same words shuffled (label 0), held out by document;
- `Sentences` tokenizes examples once (`cls + tokens + sep`) and pads each batch to its longest row.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...nanollama.config import ConfigError, FileError, read_utf8
from ...nanollama.data.packing import SourceConfig, TextStream, source_documents
from ...nanollama.data.text import Tokenizer, split_documents

IGNORE = -100  # target of the positions that are not predicted (cross_entropy's ignore_index)
Example = tuple[str, int]  # (sentence, label)
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}

# ----------------------------------------------------------------------------- masked LM


class Masker:
    """BERT's corruption of token ids; the special ids (bos, eos, pad, mask, cls, sep) are never selected
    and never drawn as random replacements."""

    def __init__(self, tokenizer: Tokenizer, prob: float = 0.15):
        self.prob, self.mask_id = prob, tokenizer.mask
        self.specials = torch.tensor(sorted(set(tokenizer.special_ids.values())))
        normal = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        normal[self.specials] = False
        self.normal_ids = normal.nonzero().flatten()

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, targets): targets hold the original id where a token was selected, IGNORE elsewhere."""
        selected = (torch.rand(tokens.shape, generator=generator) < self.prob) & ~torch.isin(
            tokens, self.specials
        )
        action = torch.rand(tokens.shape, generator=generator)
        randoms = self.normal_ids[torch.randint(len(self.normal_ids), tokens.shape, generator=generator)]
        inputs = torch.where(selected & (action < 0.8), self.mask_id, tokens)
        inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), randoms, inputs)
        return inputs, torch.where(selected, tokens, IGNORE)


def batch_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of ints (seed, split, rank, batch), well mixed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


class MaskedStream:
    """Batches `(inputs, doc_ids, targets)` (batch, seq_len) of a packed `TextStream`, masked by `Masker`.

    Batch n of rank r is masked with the generator of (seed, split, r, n): the state is the stream's plus
    the batch count, and the masks do not depend on anything else the run draws.
    """

    def __init__(self, stream: TextStream, masker: Masker, seed: int, split: str = "train"):
        self.stream, self.masker, self.seed, self.split = stream, masker, seed, split
        self.batches = 0

    def __enter__(self) -> MaskedStream:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self) -> MaskedStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        tokens, doc_ids = next(self.stream)
        tokens, doc_ids = (
            tokens[:, :-1],
            doc_ids[:, :-1],
        )  # rows have seq_len + 1 tokens (made for next-token)
        key = (self.seed, SPLIT_IDS[self.split], self.stream.rank, self.batches)
        inputs, targets = self.masker(tokens, batch_generator(*key))
        self.batches += 1
        return inputs, doc_ids, targets

    def consumed(self) -> list[dict]:
        return self.stream.consumed()

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.batches = int(state["batches"])


# ----------------------------------------------------------------------------- GLUE

GLUE = {"cola": "CoLA", "sst2": "SST-2"}  # task -> folder of the GLUE distribution
GLUE_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}


def read_glue(task: str, glue_dir: str, split: str) -> list[Example]:
    """Labelled sentences of `glue_dir/{CoLA,SST-2}/{train,dev,test}.tsv`.

    CoLA: no header, 4 columns (source, label, original mark, sentence). SST-2: a `sentence\\tlabel` header.
    GLUE's own test files carry no labels: they are refused (a labelled test.tsv in the train format is read).
    """
    folder = Path(glue_dir) / GLUE[task]
    if not folder.is_dir():
        raise ConfigError(
            "task.glue_dir", f"{folder} is not a folder (expected the GLUE layout {GLUE[task]}/)"
        )
    path = folder / GLUE_FILES[split]
    if not path.is_file():
        raise FileError(path, "file not found")
    lines = read_utf8(path).splitlines()
    if lines and lines[0].startswith("index\t"):
        raise FileError(path, "has no labels (GLUE hides its test labels): evaluate split=valid")
    if task == "sst2":
        if not lines or lines[0].split("\t") != ["sentence", "label"]:
            raise FileError(f"{path}:1", "expected the SST-2 header 'sentence<TAB>label'")
        rows, columns, first = lines[1:], 2, 2
    else:
        rows, columns, first = lines, 4, 1
    examples = []
    for lineno, line in enumerate(rows, first):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != columns:
            raise FileError(
                f"{path}:{lineno}", f"expected {columns} tab-separated columns, got {len(fields)}"
            )
        sentence, label = (fields[0], fields[1]) if task == "sst2" else (fields[3], fields[1])
        if label not in ("0", "1") or not sentence.strip():
            raise FileError(f"{path}:{lineno}", f"expected a 0/1 label and a sentence, got {line[:60]!r}")
        examples.append((sentence, int(label)))
    if not examples:
        raise FileError(path, "no examples")
    return examples


# ----------------------------------------------------------------------------- shuffled sentences

HELDOUT_SEED = (
    1  # hash seed that cuts the held-out documents into valid and test (independent of the first cut)
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
NOT_PROSE = re.compile(r"[<>{}=\[\]|\\#@$^~]|\*\*|--|\.\.\.|::")


def sentences(doc: str, min_words: int, max_words: int) -> list[str]:
    """Prose sentences of a document: paragraphs with their lines joined, cut after . ! or ? before a
    capital; code, grammar rules and tables (brackets, operators) are left out."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(line.strip() for line in paragraph.splitlines())
        for sentence in SENTENCE_END.split(text):
            n = len(sentence.split())
            if (
                min_words <= n <= max_words
                and sentence[0].isupper()
                and sentence[-1] in ".!?"
                and not NOT_PROSE.search(sentence)
            ):
                out.append(sentence)
    return out


def _sentence_rng(sentence: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(sentence.encode("utf-8", errors="surrogatepass")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "big")])


def shuffle_words(sentence: str, rng: np.random.Generator) -> str:
    """The words in another order, starting with a word (not a quote or bracket) with its capital, the
    final mark at the end: only the order tells it from the genuine one (the sentence itself if no order
    does)."""
    words, end = sentence[:-1].split(), sentence[-1]
    if words[0][1:].islower() or len(words[0]) == 1:  # "The" -> "the", but "CPython" and "I/O" stay
        words[0] = words[0][0].lower() + words[0][1:]
    for _ in range(100):
        shuffled = [words[i] for i in rng.permutation(len(words))]
        if shuffled != words and shuffled[0][0].isalpha():
            break
    else:
        return sentence  # nothing else starts with a word: the sentence is left out
    shuffled[0] = shuffled[0][0].upper() + shuffled[0][1:]
    return " ".join(shuffled) + end


def shuffled_examples(sentence_list: list[str], seed: int) -> list[Example]:
    """Every sentence twice: genuine (1) and shuffled (0); each shuffle is drawn from (seed, sentence), so
    it does not change when other documents are added."""
    examples = []
    for sentence in sentence_list:
        shuffled = shuffle_words(sentence, _sentence_rng(sentence, seed))
        if shuffled != sentence:
            examples += [(sentence, 1), (shuffled, 0)]
    return examples


def split_sentences(
    sources: list[SourceConfig], valid_fraction: float, test_fraction: float, min_words: int, max_words: int
) -> dict[str, list[str]]:
    """Sentences of each split, held out by document: train from the core's train split; the core's valid
    split cut again by a hash into `valid` and `test` (`test_fraction` of it). Each sentence is kept once,
    in the first split that has it (train, valid, test): documents that quote each other leak nothing."""
    docs = {
        split: [d for s in sources for d in source_documents(s, valid_fraction, split)]
        for split in ("train", "valid")
    }
    docs["valid"], docs["test"] = split_documents(docs["valid"], test_fraction, seed=HELDOUT_SEED)
    seen: set[str] = set()
    out = {}
    for split in ("train", "valid", "test"):
        found = dict.fromkeys(s for d in docs[split] for s in sentences(d, min_words, max_words))
        out[split] = [s for s in found if s not in seen]
        seen.update(found)
    return out


# ----------------------------------------------------------------------------- batches of sentences


class Sentences(Dataset):
    """Examples tokenized once as `cls + tokens + sep` (cut to `seq_len`); a batch is padded to its longest
    row and comes as (tokens, doc_ids, labels), with doc_ids 0 on the tokens and 1 on the padding, so the
    core's document mask is also the padding mask."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer, seq_len: int):
        self.examples, self.pad = examples, tokenizer.pad
        body = seq_len - 2
        self.ids = [[tokenizer.cls, *tokenizer.encode(text)[:body], tokenizer.sep] for text, _ in examples]
        self.labels = [label for _, label in examples]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Rows padded to the batch's longest; the DataLoader's default collate stacks them."""
        tokens, doc_ids, labels = self.batch(indices)
        return list(zip(tokens, doc_ids, labels))

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        width = max(len(self.ids[i]) for i in indices)
        tokens = torch.full((len(indices), width), self.pad, dtype=torch.long)
        for row, i in enumerate(indices):
            tokens[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
        doc_ids = torch.tensor([[0] * len(self.ids[i]) + [1] * (width - len(self.ids[i])) for i in indices])
        return tokens, doc_ids, torch.tensor([self.labels[i] for i in indices])
