"""Task handlers: one object per task type, which builds the head, feeds the batches, computes the loss
and the metrics, and dumps a few predictions into the text log.

- `mlm`: masked LM on the packed stream; metrics: loss and accuracy over the masked tokens;
- `shuffled`, `cola`, `sst2`: sentence classification from the `cls` position; metrics: loss, accuracy
  and Matthews correlation (CoLA's own metric).

Evaluation sums losses, hits, counts and confusion counts over every rank's share, all-reduces the sums
once and divides after: the global ratios, whatever each rank held (never a mean of per-rank ratios).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError, section
from ...nanollama.data.loader import ResumableLoader
from ...nanollama.data.packing import TextDataConfig, TextStream
from ...nanollama.data.text import Tokenizer
from ...nanollama.distributed import Cluster
from ...nanollama.model.transformer import Transformer
from .data import (
    GLUE,
    IGNORE,
    Example,
    MaskedStream,
    Masker,
    Sentences,
    read_glue,
    shuffled_examples,
    split_sentences,
)
from .model import SentenceHead, TokenHead

TASKS = ("mlm", "shuffled", "cola", "sst2")
SPLITS = ("train", "valid", "test")


@dataclass
class TaskConfig:
    name: str = "mlm"  # mlm | shuffled | cola | sst2
    mask_prob: float = 0.15  # mlm: share of the (non-special) tokens selected for prediction
    glue_dir: str = ""  # cola, sst2: the GLUE data folder, holding CoLA/ and SST-2/
    min_words: int = 6  # shuffled: sentences of min_words..max_words words
    max_words: int = 40
    test_fraction: float = 0.5  # shuffled: share of the held-out documents that is the test split
    pool: str = "mean"  # classification: the head reads the mean of the tokens, or the cls position (cls)
    dump: int = 4  # predictions written to the text log at each evaluation

    def check(self) -> None:
        if self.name not in TASKS:
            raise ConfigError("name", f"unknown task {self.name!r} (choose from {', '.join(TASKS)})")
        if not 0 < self.mask_prob < 1:
            raise ConfigError("mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        if self.name in GLUE and not self.glue_dir:
            raise ConfigError("glue_dir", f"task {self.name} needs the GLUE data folder")
        if not 2 <= self.min_words <= self.max_words:
            raise ConfigError("min_words", f"need 2 <= min_words <= max_words, got {self.min_words}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.pool not in ("cls", "mean"):
            raise ConfigError("pool", f"must be cls or mean, got {self.pool!r}")
        if self.dump < 0:
            raise ConfigError("dump", f"must be >= 0, got {self.dump}")


@dataclass
class EvaluationConfig:
    period: int = 0  # steps between in-loop evaluations of the valid split (0: only at the end)
    batches: int = 8  # mlm: validation batches, the same ones every time (classification: the whole split)
    batch_size: int = 32  # global rows per evaluation batch

    use_ema: bool = False  # evaluate the EMA of the weights (needs optim.ema_decay > 0; eval.py: ema.pt)

    def check(self) -> None:
        if self.period < 0 or self.batches < 1 or self.batch_size < 1:
            raise ConfigError("period", "need period >= 0, batches >= 1 and batch_size >= 1")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.period > 0 and step % self.period == 0)


# ----------------------------------------------------------------------------- metrics


class Tally:
    """Sums over predictions: summed loss, hits, count and the binary confusion counts (label 1 positive)."""

    KEYS = ("loss_sum", "correct", "count", "tp", "fp", "tn", "fn")

    def __init__(self, **sums: float):
        self.sums = {key: float(sums.get(key, 0.0)) for key in self.KEYS}

    @torch.no_grad()
    def add(self, logits: Tensor, labels: Tensor, weight: float = 1.0) -> None:
        """logits (N, C), labels (N,); a weight of 0 counts nothing (a rank's filler batch)."""
        pred = logits.argmax(-1)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        hits = pred == labels
        values = {"loss_sum": loss, "correct": hits.sum(), "count": len(labels)}
        if logits.shape[-1] == 2:
            positive, predicted = labels == 1, pred == 1
            values.update(
                tp=(positive & predicted).sum(),
                fp=(~positive & predicted).sum(),
                tn=(~positive & ~predicted).sum(),
                fn=(positive & ~predicted).sum(),
            )
        for key, value in values.items():
            self.sums[key] += weight * float(value)

    def reduce(self, cluster: Cluster) -> Tally:
        """The sums over all ranks (one small collective)."""
        return Tally(**dict(zip(self.KEYS, cluster.all_reduce([self.sums[k] for k in self.KEYS]))))

    def metrics(self, binary: bool) -> dict[str, float]:
        s, n = self.sums, max(self.sums["count"], 1.0)
        out = {"loss": s["loss_sum"] / n, "accuracy": s["correct"] / n, "n": int(s["count"])}
        if binary:
            out["mcc"] = mcc(s["tp"], s["fp"], s["tn"], s["fn"])
        return out


def mcc(tp: float, fp: float, tn: float, fn: float) -> float:
    """Matthews correlation from confusion counts; 0 when a margin is empty (e.g. one class predicted)."""
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


# ----------------------------------------------------------------------------- tasks


class Task:
    """What a task type brings to the shared loop; subclasses define the head, data, forward and dumps.
    It reads the task section (`cfg`), `data`, `ev` (evaluation) and `seed` (orchestration.seed)."""

    binary = False
    metric = "accuracy"  # the headline metric of the task

    def __init__(
        self, cfg: TaskConfig, data: TextDataConfig, ev: EvaluationConfig, seed: int, tokenizer: Tokenizer
    ):
        self.cfg, self.data, self.ev, self.seed = cfg, data, ev, seed
        self.tokenizer, self.name = tokenizer, cfg.name
        self._train: list[tuple[Tensor, int]] = []  # (hits, count) of the micro-batches of this step

    def build_head(self, encoder: Transformer) -> nn.Module:
        raise NotImplementedError

    def check_inputs(self, world_size: int) -> None:
        """Read what training and evaluation of the valid split will read (ConfigError if it cannot
        be), so that a run refuses bad input at start-up, not at its first evaluation."""
        raise NotImplementedError

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> Any:
        """Resumable iterator of training batches (has `state_dict`, `load_state_dict`)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(logits (N, C), labels (N,)) of the predicted positions of a batch."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, cluster: Cluster) -> dict[str, float]:
        raise NotImplementedError

    def dump(self, model: nn.Module, device: torch.device) -> list[str]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        """Mean cross-entropy over the predicted positions; their hits are kept for `train_metrics`."""
        logits, labels = self.forward(model, batch)
        self._train.append(((logits.detach().argmax(-1) == labels).sum(), len(labels)))
        return F.cross_entropy(logits.float(), labels, reduction="sum") / max(len(labels), 1)

    def train_metrics(self) -> dict[str, float]:
        """This rank's accuracy over the step's micro-batches (reset for the next step)."""
        hits, count = sum(float(h) for h, _ in self._train), sum(c for _, c in self._train)
        self._train = []
        return {"accuracy": hits / max(count, 1)}

    def tokens(self, batch: tuple[Tensor, ...]) -> int:
        """Tokens a batch feeds the model (padding not counted)."""
        return int((batch[0] != self.tokenizer.pad).sum())


class MLMTask(Task):
    def __init__(
        self, cfg: TaskConfig, data: TextDataConfig, ev: EvaluationConfig, seed: int, tokenizer: Tokenizer
    ):
        super().__init__(cfg, data, ev, seed, tokenizer)
        self.masker = Masker(tokenizer, cfg.mask_prob)

    def build_head(self, encoder: Transformer) -> nn.Module:
        m = encoder.cfg
        head = TokenHead(m.dim, m.vocab_size)
        if m.tie_embeddings:
            head.proj.weight = encoder.tok_embeddings.weight
        else:
            nn.init.normal_(head.proj.weight, std=m.init_std)
        return head

    def stream(self, split: str, batch_size: int, rank: int, world_size: int) -> MaskedStream:
        data = dataclasses.replace(self.data, batch_size=batch_size)
        if split != "train":
            data.epochs = 0  # evaluation reads its fixed first batches
        with section("data"):
            stream = TextStream(data, self.tokenizer, split, rank, world_size)
        return MaskedStream(stream, self.masker, self.seed, split)

    def check_inputs(self, world_size: int) -> None:
        self.eval_stream("valid", 0, world_size)  # its attention masks: `TrainConfig.check_inputs`

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> MaskedStream:
        return self.stream("train", batch_size, rank, world_size)

    def forward(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        inputs, doc_ids, targets = batch
        selected = targets != IGNORE
        return model(inputs, doc_ids=doc_ids, select=selected), targets[selected]

    def eval_stream(self, split: str, rank: int, world_size: int) -> MaskedStream:
        if split != "valid":
            raise ConfigError(
                "split", f"mlm is evaluated on the valid split of the packed text, not {split!r}"
            )
        size = self.ev.batch_size
        if size % world_size:
            raise ConfigError("evaluation.batch_size", f"{size} does not divide by world size {world_size}")
        return self.stream(split, size // world_size, rank, world_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, cluster: Cluster) -> dict[str, float]:
        stream, tally = self.eval_stream(split, cluster.rank, cluster.world_size), Tally()
        for _ in range(self.ev.batches):
            batch = [t.to(cluster.device) for t in next(stream)]
            with cluster.autocast():
                tally.add(*self.forward(model, batch))
        return tally.reduce(cluster).metrics(binary=False)

    @torch.no_grad()
    def dump(self, model: nn.Module, device: torch.device) -> list[str]:
        """The first rows of the first valid batch: text with `[original→prediction]` at masked positions."""
        if not self.cfg.dump:
            return []
        inputs, doc_ids, targets = next(self.stream("valid", self.cfg.dump, 0, 1))
        pred = model(inputs.to(device), doc_ids=doc_ids.to(device)).argmax(-1).cpu()
        decode = self.tokenizer.decode
        lines = []
        for row in range(len(inputs)):
            text, span = [], []  # unmasked runs are decoded whole (a byte-level character spans tokens)
            for t in range(inputs.shape[1]):
                if targets[row, t] == IGNORE:
                    span.append(int(inputs[row, t]))
                    continue
                text += [decode(span), f"[{decode([int(targets[row, t])])}→{decode([int(pred[row, t])])}]"]
                span = []
            lines.append(f"mlm: {''.join(text) + decode(span)!r}")
        return lines


class ExampleLoader(ResumableLoader):
    """The core's resumable loader, yielding the batches alone (the Monitor asks for the state)."""

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        return super().__next__()[0]


class ClassificationTask(Task):
    """Binary sentence classification (`shuffled`, `cola`, `sst2`) from the encoder's `cls` position."""

    binary = True

    def __init__(
        self, cfg: TaskConfig, data: TextDataConfig, ev: EvaluationConfig, seed: int, tokenizer: Tokenizer
    ):
        super().__init__(cfg, data, ev, seed, tokenizer)
        self.metric = "mcc" if self.name == "cola" else "accuracy"
        self._sentences: dict[str, Sentences] = {}
        self._split_sentences: dict[str, list[str]] | None = None

    def examples(self, split: str) -> list[Example]:
        t, data = self.cfg, self.data
        if t.name in GLUE:
            return read_glue(t.name, t.glue_dir, split)
        if self._split_sentences is None:
            args = (data.sources, data.valid_fraction, t.test_fraction, t.min_words, t.max_words)
            self._split_sentences = split_sentences(*args)
        examples = shuffled_examples(self._split_sentences[split], data.seed)
        if not examples:
            raise ConfigError("data.valid_fraction", f"no {split} sentences: hold out more documents")
        return examples

    def sentences(self, split: str) -> Sentences:
        if split not in SPLITS:
            raise ConfigError("split", f"must be one of {', '.join(SPLITS)}, got {split!r}")
        if split not in self._sentences:
            self._sentences[split] = Sentences(self.examples(split), self.tokenizer, self.data.seq_len)
        return self._sentences[split]

    def check_inputs(self, world_size: int) -> None:
        for split in ("train", "valid"):  # rows are padded to their longest: no mask to size up front
            self.examples(split)

    def build_head(self, encoder: Transformer) -> nn.Module:
        head = SentenceHead(encoder.cfg.dim, 2, self.cfg.pool)
        nn.init.normal_(head.proj.weight, std=encoder.cfg.init_std)
        nn.init.zeros_(head.proj.bias)
        return head

    def train_loader(self, batch_size: int, rank: int, world_size: int) -> ExampleLoader:
        data = self.sentences("train")
        if len(data) < batch_size * world_size:
            raise ConfigError("data.batch_size", f"larger than the {len(data)} training examples")
        return ExampleLoader(data, batch_size, self.data.seed, rank, world_size)

    def forward(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        tokens, doc_ids, labels = batch
        return model(tokens, doc_ids=doc_ids, select=doc_ids == 0), labels  # doc_ids 1: padding

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, cluster: Cluster) -> dict[str, float]:
        """The whole split, rank r taking examples r, r + w, ...; every rank runs as many batches (an empty
        share runs a filler batch of weight 0), since sharded models gather weights in every forward."""
        data, tally = self.sentences(split), Tally()
        world, size = cluster.world_size, max(self.ev.batch_size // cluster.world_size, 1)
        share = list(range(cluster.rank, len(data), world))
        for start in range(0, math.ceil(len(data) / world), size):
            indices, weight = share[start : start + size], 1.0
            if not indices:
                indices, weight = [0], 0.0
            batch = [t.to(cluster.device) for t in data.batch(indices)]
            with cluster.autocast():
                tally.add(*self.forward(model, batch), weight=weight)
        return tally.reduce(cluster).metrics(binary=True)

    @torch.no_grad()
    def dump(self, model: nn.Module, device: torch.device) -> list[str]:
        """The first valid examples: label, prediction, p(label 1) and the sentence."""
        data = self.sentences("valid")
        indices = list(range(min(self.cfg.dump, len(data))))
        if not indices:
            return []
        logits, labels = self.forward(model, [t.to(device) for t in data.batch(indices)])
        probs = logits.float().softmax(-1)[:, 1].tolist()
        return [
            f"{self.name}: label={label} pred={int(p > 0.5)} p1={p:.2f} {data.examples[i][0]!r}"
            for i, label, p in zip(indices, labels.tolist(), probs)
        ]


def build_task(
    cfg: TaskConfig, data: TextDataConfig, ev: EvaluationConfig, seed: int, tokenizer: Tokenizer
) -> Task:
    """The handler of task `cfg.name`."""
    kind = MLMTask if cfg.name == "mlm" else ClassificationTask
    return kind(cfg, data, ev, seed, tokenizer)
