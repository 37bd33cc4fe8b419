"""The VLM's data: image-question-answer tasks and text-only documents, and how a sample becomes a row.

- **digits** (real): scikit-learn's 1,797 handwritten 8x8 digits, held out by image (a fixed split of the
  images, whatever the run's seed), each asked three questions ("What digit is this?" -> "seven", "Is it
  even?" -> "no", "What is this digit plus two?" -> "nine");
- **shapes** (generated): 1-3 coloured shapes in the cells of a 3x3 grid, asked about colour, shape,
  count, absolute and relative position; sample i of a split is a pure function of (seed, split, i);
- **text** (text only): the demo corpus's documents, the second modality, to keep the LM's language.

A row is `[image slots] bos prompt answer eos [pad]`, `seq_len + 1` tokens: the image slots are
placeholders the projected patches are spliced into (`splice_mask`), `prefix_len` covers image + bos +
prompt (read bidirectionally under a prefix-LM), and `loss_mask` selects the targets that count: the
answer (and its eos), or with `vlm.loss=text` every text token. A text row is `bos document eos`, causal,
every token a target. The processor (resize, normalise) is the config's own, recorded with the run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...nanollama.config import ConfigError
from ...nanollama.data.text import Tokenizer, demo_documents, split_documents
from ...nanollama.extras import require

KINDS = ("digits", "shapes", "text")
NUMBERS = "zero one two three four five six seven eight nine ten eleven".split()
DIGIT_TASKS = ("digit", "even", "plus_two")
SHAPE_TASKS = ("color", "shape", "count", "where", "left_of")
TASKS = {"digits": DIGIT_TASKS, "shapes": SHAPE_TASKS, "text": ("text",)}
DIGITS_SPLIT_SEED = 1234  # the held-out digit images never change with the run's seed


class Sample(NamedTuple):
    image: np.ndarray | None  # (H, W, 3) floats in [0, 1]; None for text
    prompt: str
    answer: str
    task: str


# ------------------------------------------------------------------------------------------ config


@dataclass
class DatasetConfig:
    name: str = "digits"  # how logs, records and `data.epochs_of` call it
    kind: str = "digits"  # digits | shapes | text
    weight: float = 1.0  # share of the samples drawn (normalised over the datasets)
    epochs: int = 0  # 0: endless (reshuffled each epoch); k: leaves the mix after k epochs
    seed: int = -1  # shard shuffle seed; -1: data.seed

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "digits":  # the images ship with scikit-learn
            require("sklearn", "vision", "kind=digits")
        if not self.weight > 0:
            raise ConfigError("weight", f"must be > 0, got {self.weight}")
        if self.epochs < 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")


@dataclass
class ShapesConfig:
    train_size: int = 20000  # samples per split: each a scene and one question
    valid_size: int = 1000
    seed: int = 0  # the scenes (train and valid draw disjoint streams of it)

    def check(self) -> None:
        for key in ("train_size", "valid_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class ProcessorConfig:
    """What every image goes through before the encoder; recorded in the run's config."""

    resize: str = "bilinear"  # nearest | bilinear | bicubic: to vision.image_size
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, after scaling to [0, 1]
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def check(self) -> None:
        if self.resize not in ("nearest", "bilinear", "bicubic"):
            raise ConfigError("resize", f"must be nearest, bilinear or bicubic, got {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean", "mean and std need one value per channel (3)")
        if not all(s > 0 for s in self.std):
            raise ConfigError("std", f"must all be > 0, got {self.std}")


@dataclass
class VLMDataConfig:
    datasets: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])
    seq_len: int = 64  # positions the LM sees (image slots included); rows have seq_len + 1 tokens
    batch_size: int = 32  # global samples per optimizer step
    seed: int = 0  # the mixture's draws and default shard seed
    valid_fraction: float = 0.2  # digits: share of the images held out
    epochs_of: str = ""  # with `epochs` > 0: the run lasts that many epochs of this dataset
    epochs: int = 0
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def check(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets", "needs at least one dataset")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError("datasets", f"dataset names must be unique, got {names}")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 < self.valid_fraction < 1:
            raise ConfigError("valid_fraction", f"must be in (0, 1), got {self.valid_fraction}")
        if self.epochs < 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")
        if self.epochs and self.epochs_of not in names:
            raise ConfigError("epochs_of", f"{self.epochs_of!r} is not one of the datasets {names}")
        if self.epochs_of and not self.epochs:
            raise ConfigError("epochs", "epochs_of needs epochs > 0")


# ------------------------------------------------------------------------------------------ digits


def number_word(n: int) -> str:
    return NUMBERS[n]


@functools.cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) floats in [0, 1] and (1797,) labels, from the copy that ships with scikit-learn."""
    digits = require("sklearn.datasets", "vision", "the digits dataset").load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digits_split(split: str, valid_fraction: float) -> np.ndarray:
    """Indices of the images on one side of the fixed held-out split."""
    n = len(load_digits_arrays()[1])
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    n_valid = round(n * valid_fraction)
    return np.sort(order[:n_valid] if split == "valid" else order[n_valid:])


class DigitsDataset:
    """Every (image, question) pair of a split: item i is image i // 3 asked question i % 3."""

    def __init__(self, split: str, valid_fraction: float):
        self.images, self.labels = load_digits_arrays()
        self.index = digits_split(split, valid_fraction)

    def __len__(self) -> int:
        return len(self.index) * len(DIGIT_TASKS)

    def __getitem__(self, i: int) -> Sample:
        j, task = int(self.index[i // len(DIGIT_TASKS)]), DIGIT_TASKS[i % len(DIGIT_TASKS)]
        image = np.repeat(self.images[j][:, :, None], 3, axis=2)  # grey to the encoder's 3 channels
        d = int(self.labels[j])
        if task == "digit":
            return Sample(image, "What digit is this?", number_word(d), task)
        if task == "even":
            return Sample(image, "Is it even?", "yes" if d % 2 == 0 else "no", task)
        return Sample(image, "What is this digit plus two?", number_word(d + 2), task)


# ------------------------------------------------------------------------------------------ shapes

COLORS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("square", "circle", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SHAPES_CANVAS = 24  # pixels of the rendered scene (the processor resizes it to vision.image_size)


def draw_shape(canvas: np.ndarray, shape: str, cell: int, color: tuple[float, float, float]) -> None:
    """Paint `shape` into 3x3-grid cell `cell` of canvas (S, S, 3), in place."""
    size = canvas.shape[0] // 3
    top, left = (cell // 3) * size, (cell % 3) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c, r = size / 2, size * 0.4
    if shape == "square":
        inside = (np.abs(y - c) <= r * 0.85) & (np.abs(x - c) <= r * 0.85)
    elif shape == "circle":
        inside = (y - c) ** 2 + (x - c) ** 2 <= r**2
    else:  # an upward triangle: its width grows linearly from the apex
        rows = (y - (c - r)) / (2 * r)
        inside = (rows >= 0) & (rows <= 1) & (np.abs(x - c) <= rows * r)
    canvas[top : top + size, left : left + size][inside] = color


class ShapesDataset:
    """Scenes of 1-3 shapes of distinct kinds and colours in distinct cells, one question each.

    Item i asks question SHAPE_TASKS[i % 5] about a scene drawn from default_rng([seed, split, i]): a
    deterministic function of the seed, so train and valid never overlap and nothing is stored.
    """

    def __init__(self, split: str, cfg: ShapesConfig):
        self.split, self.seed = split, cfg.seed
        self.size = cfg.train_size if split == "train" else cfg.valid_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
        task = SHAPE_TASKS[i % len(SHAPE_TASKS)]
        k = int(rng.integers(2, 4)) if task == "left_of" else int(rng.integers(1, 4))
        kinds = [SHAPES[j] for j in rng.permutation(len(SHAPES))[:k]]
        colors = [list(COLORS)[j] for j in rng.permutation(len(COLORS))[:k]]
        while True:  # left_of needs its two shapes in different columns
            cells = [int(c) for c in rng.permutation(9)[:k]]
            if task != "left_of" or cells[0] % 3 != cells[1] % 3:
                break
        canvas = np.zeros((SHAPES_CANVAS, SHAPES_CANVAS, 3), dtype=np.float32)
        for kind, color, cell in zip(kinds, colors, cells):
            draw_shape(canvas, kind, cell, COLORS[color])
        if task == "color":
            return Sample(canvas, f"What color is the {kinds[0]}?", colors[0], task)
        if task == "shape":
            return Sample(canvas, f"What shape is the {colors[0]} one?", kinds[0], task)
        if task == "count":
            return Sample(canvas, "How many shapes are there?", number_word(k), task)
        if task == "where":
            return Sample(canvas, f"Where is the {kinds[0]}?", CELLS[cells[0]], task)
        left = cells[0] % 3 < cells[1] % 3
        return Sample(canvas, f"Is the {kinds[0]} left of the {kinds[1]}?", "yes" if left else "no", task)


# ------------------------------------------------------------------------------------------ text


class TextDataset:
    """The demo corpus's documents of one split, as text-only samples (the whole document is the answer)."""

    def __init__(self, split: str, valid_fraction: float = 0.05):
        train, valid = split_documents(demo_documents(), valid_fraction)
        self.docs = train if split == "train" else valid

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> Sample:
        return Sample(None, "", self.docs[i], "text")


def longest_texts(kind: str) -> tuple[str, str]:
    """The longest prompt and answer a dataset of `kind` can ask (text rows are cut to fit instead)."""
    if kind == "digits":
        return "What is this digit plus two?", max(NUMBERS, key=len)
    if kind == "shapes":
        kind_word, color = max(SHAPES, key=len), max(COLORS, key=len)
        prompts = [
            f"What color is the {kind_word}?",
            f"What shape is the {color} one?",
            "How many shapes are there?",
            f"Where is the {kind_word}?",
            f"Is the {kind_word} left of the {kind_word}?",
        ]
        return max(prompts, key=len), max([*COLORS, *SHAPES, *CELLS, *NUMBERS[:4]], key=len)
    return "", ""


def build_dataset(d: DatasetConfig, cfg: VLMDataConfig, split: str) -> Any:
    if d.kind == "digits":
        return DigitsDataset(split, cfg.valid_fraction)
    if d.kind == "shapes":
        return ShapesDataset(split, cfg.shapes)
    return TextDataset(split)


# ------------------------------------------------------------------------------------------ rows


class Processor:
    """Image (H, W, 3) in [0, 1] -> normalised (3, S, S) tensor for the encoder."""

    def __init__(self, cfg: ProcessorConfig, image_size: int):
        self.cfg, self.size = cfg, image_size
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray) -> Tensor:
        x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32).permute(2, 0, 1)
        if x.shape[1:] != (self.size, self.size):
            smooth = self.cfg.resize != "nearest"
            x = F.interpolate(
                x[None],
                size=(self.size, self.size),
                mode=self.cfg.resize,
                align_corners=False if smooth else None,
            )[0]
        return (x.clamp(0, 1) - self.mean) / self.std


@dataclass
class Batch:
    tokens: Tensor  # (B, seq_len + 1)
    splice_mask: Tensor  # (B, seq_len) bool: input positions that are image slots
    images: Tensor  # (B, 3, S, S): a blank for text rows
    prefix_len: Tensor  # (B,) image + bos + prompt (0 for text rows)
    loss_mask: Tensor  # (B, seq_len) bool: targets that count
    tasks: list[str]  # per row

    def to(self, device: torch.device) -> Batch:
        names = ("tokens", "splice_mask", "images", "prefix_len", "loss_mask")
        return Batch(**{k: getattr(self, k).to(device, non_blocking=True) for k in names}, tasks=self.tasks)


class RowBuilder:
    """Samples -> a Batch of fixed-length rows (static shapes: one compiled graph, cached static masks)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        processor: Processor,
        seq_len: int,
        image_tokens: int,
        loss: str = "answer",
    ):
        self.tokenizer, self.processor = tokenizer, processor
        self.seq_len, self.image_tokens, self.loss = seq_len, image_tokens, loss

    def prompt_ids(self, prompt: str) -> list[int]:
        """What generation is given after the image: bos and the prompt."""
        return [self.tokenizer.bos, *self.tokenizer.encode(prompt)]

    def row(self, sample: Sample) -> tuple[list[int], int, int, int]:
        """(tokens, image slots, prefix length, first target position) of one sample, not yet padded."""
        tok = self.tokenizer
        if sample.image is None:
            ids = [tok.bos, *tok.encode(sample.answer)][: self.seq_len] + [tok.eos]
            return ids, 0, 0, 0
        k = self.image_tokens
        prompt = self.prompt_ids(sample.prompt)
        ids = [tok.pad] * k + prompt + tok.encode(sample.answer) + [tok.eos]
        if len(ids) > self.seq_len + 1:
            raise ConfigError(
                "data.seq_len",
                f"{self.seq_len} is too short for {k} image slots + {len(ids) - k} tokens: {sample.prompt!r}",
            )
        first = k if self.loss == "text" else k + len(prompt) - 1  # target j predicts token j + 1
        return ids, k, k + len(prompt), first

    def __call__(self, samples: list[Sample]) -> Batch:
        B, T = len(samples), self.seq_len + 1
        tokens = torch.full((B, T), self.tokenizer.pad, dtype=torch.long)
        splice = torch.zeros(B, T - 1, dtype=torch.bool)
        loss_mask = torch.zeros(B, T - 1, dtype=torch.bool)
        prefix = torch.zeros(B, dtype=torch.long)
        images = []
        for b, sample in enumerate(samples):
            ids, k, prefix[b], first = self.row(sample)
            tokens[b, : len(ids)] = torch.tensor(ids)
            splice[b, :k] = True
            loss_mask[b, first : len(ids) - 1] = True
            if sample.image is not None and k:
                images.append(self.processor(sample.image))
            else:  # a blank: every row has an image (static shapes, see model.py)
                images.append(torch.zeros(3, self.processor.size, self.processor.size))
        return Batch(tokens, splice, torch.stack(images), prefix, loss_mask, [s.task for s in samples])

    def max_answer_tokens(self, datasets: list[Any]) -> int:
        """The longest answer (with its eos) of image datasets, for generation's budget."""
        longest = 1
        for ds in datasets:
            if isinstance(ds, DigitsDataset):
                answers = NUMBERS
            elif isinstance(ds, ShapesDataset):
                answers = [*COLORS, *SHAPES, *NUMBERS[:4], *CELLS, "yes", "no"]
            else:
                continue
            longest = max(longest, *(len(self.tokenizer.encode(a)) + 1 for a in answers))
        return longest
