"""Multiplication problems: generation, the line format, and the resumable, rank-sharded loader.

Digits are written least-significant first, as in Deng et al. (arXiv 2405.14838), whose Internalize-CoT
files the app reads as they are: `a * b||cot #### answer`, tokens separated by spaces, e.g.

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 7 1 ) + ... #### 5 5 6 0 8 2 0 1

The chain lists the partial products a * b_j shifted by j (K + 1 + j digits, zero-padded), and after each
one but the first the running sum `( s_j )` of those so far; the answer has K + M digits. A step of the
chain is one partial product with its running sum (what the latent curriculum replaces, one at a time).

Problems are split into train, valid and test by a hash of (a, b), so the splits never share a problem,
whether they are generated on the fly or written once to files by `make_data`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...nanollama.config import ConfigError, FileError, read_utf8
from ...nanollama.data.loader import ShardedEpochSampler

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

# Roles of the tokens of a row: what a position's token is, and so how its prediction is weighted.
PAD, QUESTION, CHAIN, LATENT, SEP, ANSWER = range(6)


class MultiplicationTokenizer:
    """Digits, the operator and separators, pad/eos, and `num_latent` latent-position tokens (learned
    pause embeddings; with continuous thoughts, placeholders whose embedding is replaced)."""

    SYMBOLS = ("<pad>", "<eos>", "*", "||", "####", "+", "(", ")")

    def __init__(self, num_latent: int = 0):
        self.itos = [str(d) for d in range(10)] + list(self.SYMBOLS)
        self.itos += [f"<latent_{i}>" for i in range(num_latent)]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad, self.eos = self.stoi["<pad>"], self.stoi["<eos>"]
        self.times, self.think, self.answer = self.stoi["*"], self.stoi["||"], self.stoi["####"]
        self.plus, self.open, self.close = self.stoi["+"], self.stoi["("], self.stoi[")"]
        self.num_latent = num_latent

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def latent(self, i: int) -> int:
        return self.stoi[f"<latent_{i}>"]

    def encode(self, text: str) -> list[int]:
        return [self.stoi[s] for s in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.itos[i] for i in ids)


# ----------------------------------------------------------------------------- problems and chains


@dataclass
class Problem:
    a: list[int]  # digits, least significant first
    b: list[int]
    steps: list[list[str]]  # the chain, one list of tokens per partial product (with its running sum)
    answer: list[int]

    @property
    def chain(self) -> list[str]:
        return [t for step in self.steps for t in step]


def digits(n: int, width: int) -> list[int]:
    """n in `width` digits, least significant first (zero-padded)."""
    return [(n // 10**i) % 10 for i in range(width)]


def value(ds: list[int]) -> int:
    return sum(d * 10**i for i, d in enumerate(ds))


def make_problem(a: int, b: int, k: int, m: int) -> Problem:
    """The problem a * b with its chain of shifted partial products and running sums."""
    steps, total = [], 0
    for j, bj in enumerate(digits(b, m)):
        partial = a * bj * 10**j
        total += partial
        text = [str(d) for d in digits(partial, k + 1 + j)]
        if j:
            text = ["+", *text, "(", *[str(d) for d in digits(total, k + 1 + j)], ")"]
        steps.append(text)
    return Problem(digits(a, k), digits(b, m), steps, digits(a * b, k + m))


def running_sums(a: list[int], b: list[int]) -> list[int]:
    """The running sum behind each answer digit (Bai et al. 2025): s_i = sum_{j+l=i} a_j b_l + s_{i-1}
    // 10; answer digit i is s_i mod 10. The target of the auxiliary regression head."""
    sums, carry = [], 0
    for i in range(len(a) + len(b)):
        s = sum(a[j] * b[i - j] for j in range(len(a)) if 0 <= i - j < len(b)) + carry
        sums.append(s)
        carry = s // 10
    return sums


def split_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """0 train, 1 valid, 2 test for each problem: a splitmix64 hash of (a, b), 1/20 each to valid and
    test, so that the splits are disjoint however the problems are drawn."""
    x = (a.astype(np.uint64) << np.uint64(32)) ^ b.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    bucket = (x % np.uint64(20)).astype(np.int64)
    return np.where(bucket == 0, 1, np.where(bucket == 1, 2, 0))


def draw_problems(rng: np.random.Generator, n: int, k: int, m: int, split: str) -> list[tuple[int, int]]:
    """n pairs (a, b) of exactly k and m digits from `split`, by rejection."""
    want, out = SPLITS.index(split), []
    while len(out) < n:
        a = rng.integers(10 ** (k - 1), 10**k, size=2 * n)
        b = rng.integers(10 ** (m - 1), 10**m, size=2 * n)
        keep = split_of(a, b) == want
        out += list(zip(a[keep].tolist(), b[keep].tolist()))
    return out[:n]


def format_line(p: Problem) -> str:
    """The Internalize-CoT line of a problem."""
    question = " ".join(map(str, p.a)) + " * " + " ".join(map(str, p.b))
    return f"{question}||{' '.join(p.chain)} #### {' '.join(map(str, p.answer))}"


def parse_line(line: str) -> Problem:
    """A problem from an Internalize-CoT line; ValueError saying what is wrong."""
    if line.count("||") != 1 or line.count("####") != 1:
        raise ValueError("expected 'a * b||chain #### answer'")
    question, rest = line.split("||")
    chain, answer = rest.split("####")
    operands = question.split("*")
    if len(operands) != 2:
        raise ValueError("the question must be 'a * b'")
    a, b, ans = (_digits(s, what) for s, what in ((operands[0], "a"), (operands[1], "b"), (answer, "answer")))
    tokens = chain.split()
    if any(t not in "0123456789+()" or len(t) != 1 for t in tokens):
        raise ValueError("the chain may hold only digits, '+', '(' and ')'")
    steps: list[list[str]] = [[]]
    for t in tokens:
        if t == "+" and steps[-1]:
            steps.append([])
        steps[-1].append(t)
    return Problem(a, b, [s for s in steps if s], ans)


def _digits(text: str, what: str) -> list[int]:
    parts = text.split()
    if not parts or any(len(p) != 1 or not p.isdigit() for p in parts):
        raise ValueError(f"{what} must be single digits separated by spaces, got {text.strip()!r}")
    return [int(p) for p in parts]


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Every line of an Internalize-CoT file (blank lines skipped); a malformed line, or operands of
    other lengths than the first line's, is a FileError naming `path:line`."""
    if not Path(path).is_file():
        raise FileError(path, "file not found")
    problems, shape = [], None
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = parse_line(line)
        except ValueError as e:
            raise FileError(f"{path}:{n}", f"malformed line ({e})") from None
        if shape is None:
            shape = (len(p.a), len(p.b), len(p.answer))
        elif (len(p.a), len(p.b), len(p.answer)) != shape:
            raise FileError(f"{path}:{n}", f"operands and answer of lengths other than line 1's {shape}")
        problems.append(p)
    if not problems:
        raise FileError(path, "no problems in the file")
    return problems


# ----------------------------------------------------------------------------- rows of each mode


@dataclass
class RowLayout:
    """How a problem becomes a row: what replaces the chain (mode, stage, removal)."""

    mode: str = "plain"  # plain | cot | latent | internalize
    latents: int = 0  # latent positions after `||`
    skip_steps: int = 0  # latent curriculum: chain steps replaced by the latents
    removed: int = 0  # internalize: chain tokens removed from the left (the offset included)


def encode_row(p: Problem, tok: MultiplicationTokenizer, layout: RowLayout) -> tuple[list[int], list[int]]:
    """(tokens, roles) of one row: question `||` [latents | chain] `####` answer eos."""
    question = [*p.a, tok.times, *p.b, tok.think]
    chain: list[str] = []
    if layout.mode == "cot":
        chain = p.chain
    elif layout.mode == "latent":
        chain = [t for step in p.steps[layout.skip_steps :] for t in step] if layout.skip_steps else []
    elif layout.mode == "internalize":
        chain = p.chain[layout.removed :]
    latents = [tok.latent(i) for i in range(layout.latents)]
    tokens = [*question, *latents, *(tok.stoi[t] for t in chain), tok.answer, *p.answer, tok.eos]
    roles = [QUESTION] * len(question) + [LATENT] * len(latents) + [CHAIN] * len(chain)
    roles += [SEP] + [ANSWER] * (len(p.answer) + 1)
    return tokens, roles


def collate(
    problems: list[Problem], tok: MultiplicationTokenizer, layouts: list[RowLayout]
) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, roles, running sums) (B, T), right-padded; sums are at the answer digits, 0 elsewhere."""
    rows = [encode_row(p, tok, layout) for p, layout in zip(problems, layouts)]
    T = max(len(t) for t, _ in rows)
    tokens = torch.full((len(rows), T), tok.pad, dtype=torch.long)
    roles = torch.full((len(rows), T), PAD, dtype=torch.long)
    sums = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, ((t, r), p) in enumerate(zip(rows, problems)):
        tokens[i, : len(t)], roles[i, : len(r)] = torch.tensor(t), torch.tensor(r)
        first = len(t) - len(p.answer) - 1
        sums[i, first : first + len(p.answer)] = torch.tensor(running_sums(p.a, p.b), dtype=torch.float32)
    return tokens, roles, sums


# ----------------------------------------------------------------------------- the loader


@dataclass
class DataConfig:
    k: int = 4  # digits of a
    m: int = 4  # digits of b
    batch_size: int = 128  # global rows per optimizer step
    train_file: str = ""  # Internalize-CoT files; empty: problems generated on the fly
    valid_file: str = ""
    test_file: str = ""

    def check(self) -> None:
        for key in ("k", "m", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.k > 9 or self.m > 9:
            raise ConfigError("k", f"at most 9 digits a side, got {self.k}x{self.m}")

    def file(self, split: str) -> str:
        return getattr(self, f"{split}_file")


ENUMERATE_UP_TO = 10**6  # operand pairs: a smaller space is listed whole, a larger one drawn from
DRAW_ROUNDS = 50  # rounds of draws that may add no new problem before the split counts as exhausted


def check_eval_size(cfg: DataConfig, n: int, key: str = "evaluation.n_problems") -> None:
    """A drawn (large) space can give n distinct problems quickly only if n is well below what the split
    holds; a listed (small) one gives what it holds."""
    space = 81 * 10 ** (cfg.k + cfg.m - 2)
    if space > ENUMERATE_UP_TO and n > space // 40:  # split_of gives valid and test 1/20 each
        raise ConfigError(key, f"{n} is over half the ~{space // 20} problems of a {cfg.k}x{cfg.m} split")


def distinct_problems(rng: np.random.Generator, n: int, k: int, m: int, split: str) -> list[tuple[int, int]]:
    """Up to n distinct pairs (a, b) of `split`, in a random order: every pair of a small space (listed,
    then shuffled: fewer than n if the split holds fewer), else drawn until n distinct ones (or, asked for
    about as many as the split holds, until draws stop finding new ones: fewer)."""
    if 81 * 10 ** (k + m - 2) <= ENUMERATE_UP_TO:
        a, b = np.meshgrid(np.arange(10 ** (k - 1), 10**k), np.arange(10 ** (m - 1), 10**m), indexing="ij")
        a, b = a.ravel(), b.ravel()
        keep = np.flatnonzero(split_of(a, b) == SPLITS.index(split))
        chosen = rng.permutation(keep)[:n]
        return list(zip(a[chosen].tolist(), b[chosen].tolist()))
    seen: dict[tuple[int, int], None] = {}  # insertion-ordered
    idle = 0
    while len(seen) < n and idle < DRAW_ROUNDS:
        before = len(seen)
        seen.update(dict.fromkeys(draw_problems(rng, min(n - len(seen), 1 << 16), k, m, split)))
        idle = idle + 1 if len(seen) == before else 0
    return list(seen)


def load_split(cfg: DataConfig, split: str, n: int, seed: int) -> list[Problem]:
    """A fixed evaluation set, each problem at most once: the first n problems of the split's file, or n
    distinct ones drawn from (seed, split); fewer when the split holds fewer (`n` in the eval line)."""
    if cfg.file(split):
        return read_problems(cfg.file(split))[:n]
    rng = np.random.default_rng([seed, 1 + SPLITS.index(split), 7])
    pairs = distinct_problems(rng, n, cfg.k, cfg.m, split)
    if len(pairs) < n:
        logger.info(f"{split}: {len(pairs)} problems of {cfg.k}x{cfg.m} digits in the split, fewer than {n}")
    return [make_problem(a, b, cfg.k, cfg.m) for a, b in pairs]


def batch_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


@dataclass
class LoaderState:
    """What a checkpoint keeps of the loader: the position, and the schedule's state it served with."""

    batches: int = 0  # micro-batches served
    stage: int = 0  # curriculum stage / removal level of the last step
    resets: int = 0  # optimizer resets done so far
    epoch: int = 0  # file source: position in the sampler
    batch_in_epoch: int = 0


class ProblemStream:
    """Micro-batches `(tokens, roles, sums)` of this rank's training problems, laid out by `layout()`.

    Generated problems: micro-batch n of rank r is drawn from the generator of (seed, r, n), so the state
    is a count. A file: the core's `ShardedEpochSampler` order, so the state is (epoch, batch in epoch).
    `layout(rng)` gives the row layout of each problem (the train loop's schedule), drawing any random
    offset from the batch's own generator.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tok: MultiplicationTokenizer,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.tok, self.micro, self.seed, self.rank = cfg, tok, micro_batch, seed, rank
        self.state = LoaderState()
        self.layout = lambda rng: RowLayout()
        self.problems = read_problems(cfg.train_file) if cfg.train_file else None
        self.sampler = None
        if self.problems is not None:
            self.sampler = ShardedEpochSampler(len(self.problems), micro_batch, seed, rank, world_size)
        self._order = None

    def __enter__(self) -> ProblemStream:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __iter__(self) -> ProblemStream:
        return self

    def next_problems(self, rng: np.random.Generator) -> list[Problem]:
        s = self.state
        if self.problems is None:
            pairs = draw_problems(rng, self.micro, self.cfg.k, self.cfg.m, "train")
            return [make_problem(a, b, self.cfg.k, self.cfg.m) for a, b in pairs]
        shard = self.sampler.shard(s.epoch)
        idx = shard[s.batch_in_epoch * self.micro : (s.batch_in_epoch + 1) * self.micro]
        s.batch_in_epoch += 1
        if s.batch_in_epoch == self.sampler.batches_per_epoch:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        return [self.problems[i] for i in idx]

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        rng = batch_rng(self.seed, self.rank, self.state.batches)
        problems = self.next_problems(rng)
        self.state.batches += 1
        return collate(problems, self.tok, [self.layout(rng) for _ in problems])

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(**state)


def check_files(cfg: DataConfig) -> None:
    """Every given file reads, and its problems are the configured K x M ones."""
    for split in SPLITS:
        if path := cfg.file(split):
            p = read_problems(path)[0]
            if (len(p.a), len(p.b)) != (cfg.k, cfg.m):
                raise FileError(
                    path, f"{len(p.a)}x{len(p.b)} problems, but data.k x data.m = {cfg.k}x{cfg.m}"
                )
