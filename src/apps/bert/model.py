"""The core transformer as a bidirectional encoder, under a task's head.

The encoder's vocabulary projection is removed: it returns the final-norm hidden states, and the head
(`TokenHead` for the masked LM, `SentenceHead` for classification) is the task's. State-dict keys are
`encoder.*` and `head.*`, so a task switch loads the first and starts the second afresh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nanollama.model.transformer import Transformer


class Bert(nn.Module):
    def __init__(self, encoder: Transformer, head: nn.Module):
        super().__init__()
        if encoder.cfg.causal:
            raise ValueError("BERT needs a bidirectional encoder (model.causal: false)")
        self.encoder = encoder
        self.encoder.output = nn.Identity()  # hidden states out; the head is the task's
        self.head = head

    # The activation probe and FSDP look for the blocks and the embeddings on the model itself.
    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.encoder.tok_embeddings

    def forward(self, tokens: Tensor, doc_ids: Tensor | None = None, select: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> the head's outputs; `select` (bool (B, T)) tells the head which positions count.

        doc_ids (B, T): attention stays within equal ids (packed documents, or tokens apart from padding).
        """
        return self.head(self.encoder(tokens, doc_ids=doc_ids), select)


class TokenHead(nn.Module):
    """Masked LM: logits over the vocabulary at the selected positions (N, vocab), or at all (B, T, vocab)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: Tensor, select: Tensor | None = None) -> Tensor:
        return self.proj(h if select is None else h[select])


class SentenceHead(nn.Module):
    """Classifier logits (B, n_classes) of each row, from its first position (`cls`) or from the mean of its
    selected positions (`mean`: the tokens, not the padding)."""

    def __init__(self, dim: int, n_classes: int, pool: str = "cls"):
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(dim, n_classes)

    def forward(self, h: Tensor, select: Tensor | None = None) -> Tensor:
        if self.pool == "cls":
            return self.proj(h[:, 0])
        weights = torch.ones_like(h[..., 0]) if select is None else select.to(h.dtype)
        pooled = (h * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.proj(pooled)
