"""Vision encoder -> pixel shuffle -> projector -> the core causal transformer (nanoVLM's design).

The encoder's patches (B, N, Dv) are pixel-shuffled into N / f^2 tokens of Dv f^2 features (fewer,
richer image tokens), projected to the LM's width and spliced into the LM's input at the row's image
slots. The LM reads image + prompt bidirectionally under `vlm.prefix_lm` (PaliGemma) and the answer
causally. Module names (`vision.`, `projector.`, `lm.`) are what `optim.groups` prefixes refer to.

Every row of a batch carries an image, a blank one for text-only rows (whose image slots keep their token
embeddings): batches have static shapes (one compiled graph), and every rank uses every parameter every
step, so DDP needs no unused-parameter search and FSDP's collectives stay in step across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError
from ...nanollama.model.generate import generate
from ...nanollama.model.transformer import Transformer, TransformerConfig
from ...nanollama.model.vision import VisionConfig, VisionEncoder, pixel_shuffle
from .data import Batch

PROJECTORS = ("linear", "mlp")
LOSSES = ("answer", "text")


@dataclass
class VLMConfig:
    projector: str = "linear"  # linear (nanoVLM) | mlp (LLaVA-1.5: linear, GELU, linear)
    pixel_shuffle: int = 2  # patches merged per side into one image token (1: none)
    prefix_lm: bool = True  # image + prompt attend both ways; False: all causal
    loss: str = "answer"  # answer: answer tokens only | text: prompt and answer tokens
    blind: bool = False  # the text-only baseline: the LM never sees the image (no encoder is built)
    projector_std: float = 0.0  # std of the image tokens at init for unit-scale patches; 0: the LM's init_std

    def check(self) -> None:
        if self.projector not in PROJECTORS:
            raise ConfigError("projector", f"must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.loss not in LOSSES:
            raise ConfigError("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.projector_std < 0:
            raise ConfigError(
                "projector_std", f"must be >= 0 (0: the LM's init_std), got {self.projector_std}"
            )
        if self.pixel_shuffle < 1:
            raise ConfigError("pixel_shuffle", f"must be >= 1, got {self.pixel_shuffle}")


def check_shapes(vlm: VLMConfig, vision: VisionConfig) -> None:
    """The patch grid must split into pixel_shuffle x pixel_shuffle blocks (before any weight exists)."""
    grid = vision.image_size // vision.patch_size
    if grid % vlm.pixel_shuffle:
        raise ConfigError(
            "vlm.pixel_shuffle", f"{vlm.pixel_shuffle} does not divide the {grid}x{grid} patch grid"
        )


def image_tokens(vlm: VLMConfig, vision: VisionConfig) -> int:
    """Image slots per image in a row."""
    if vlm.blind:
        return 0
    return vision.n_patches // vlm.pixel_shuffle**2


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kind: str):
        super().__init__()
        self.kind = kind
        hidden = out_dim if kind == "mlp" else 0
        self.fc1 = nn.Linear(in_dim, hidden or out_dim, bias=kind == "mlp")
        self.fc2 = nn.Linear(hidden, out_dim) if kind == "mlp" else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(F.gelu(x)) if self.fc2 is not None else x


class VLM(nn.Module):
    def __init__(self, vlm: VLMConfig, vision: VisionConfig, lm: TransformerConfig):
        super().__init__()
        vlm.check()
        check_shapes(vlm, vision)
        self.cfg = vlm
        self.lm = Transformer(lm)
        self.vision = None if vlm.blind else VisionEncoder(vision)
        self.projector = None
        if not vlm.blind:
            self.projector = Projector(vision.dim * vlm.pixel_shuffle**2, lm.dim, vlm.projector)
            self.init_projector()
        self.n_image_tokens = image_tokens(vlm, vision)

    @torch.no_grad()
    def init_projector(self) -> None:
        """Image tokens at the scale of the LM's token embeddings (std init_std) for unit-scale patches;
        an MLP's hidden layer keeps unit scale."""
        fc1, fc2 = self.projector.fc1, self.projector.fc2
        last = fc2 if fc2 is not None else fc1
        if fc2 is not None:
            nn.init.normal_(fc1.weight, std=1 / math.sqrt(fc1.in_features))
            nn.init.zeros_(fc1.bias)
            nn.init.zeros_(fc2.bias)
        std = self.cfg.projector_std or self.lm.cfg.init_std
        nn.init.normal_(last.weight, std=std / math.sqrt(last.in_features))

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(n, 3, S, S) normalised pixels -> (n, image tokens, lm dim)."""
        patches = self.vision(images)
        return self.projector(pixel_shuffle(patches, self.cfg.pixel_shuffle))

    def forward(self, batch: Batch) -> Tensor:
        """Logits (B, seq_len, vocab) of the rows' inputs (tokens[:, :-1] with the images spliced in)."""
        tokens = batch.tokens[:, :-1]
        prefix_len = batch.prefix_len if self.cfg.prefix_lm else None
        if self.vision is None:
            return self.lm(tokens, prefix_len=prefix_len)
        # Every row carries an image (a blank one for text rows, whose slots keep their token embeddings):
        # static shapes for torch.compile, and every parameter in use on every rank at every step.
        images = self.image_embeddings(batch.images)
        h = self.lm.embed(tokens)
        k = self.n_image_tokens
        placed = torch.where(batch.splice_mask[:, :k, None], images.to(h.dtype), h[:, :k])
        return self.lm(embeddings=torch.cat([placed, h[:, k:]], dim=1), prefix_len=prefix_len)

    @torch.no_grad()
    def answer(
        self, images: Tensor | None, prompts: list[list[int]], max_new_tokens: int, eos: int
    ) -> list[list[int]]:
        """Greedy answers, decoded with the KV cache: each row reads its image then its prompt."""
        prefix = None
        if self.vision is not None and images is not None:
            prefix = list(self.image_embeddings(images).to(self.lm.output.weight.dtype))
        return generate(
            self.lm, prompts, max_new_tokens, stop_tokens=[eos], prefix=prefix, prefix_lm=self.cfg.prefix_lm
        )


def vlm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy over the targets the loss mask selects (answers, or all text)."""
    logits = model(batch)
    targets = batch.tokens[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    mask = batch.loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)
