"""The core transformer with what the modes add: continuous thoughts and a running-sum regression head.

Continuous thoughts (Coconut, arXiv 2412.06769): the input embedding of latent position j is the last
hidden state (after the final norm) at position j - 1. Thought j depends on thought j - 1, so they are
computed one after another; with a KV cache each is one incremental step of one position, not a full
forward of the prefix. The core `KVCache` writes in place (for generation, without gradients); training
needs the same arithmetic with autograd, so `GradKVCache` writes out of place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nanollama.model.attention import KVCache
from ...nanollama.model.transformer import Transformer


class _GradLayerCache:
    """A layer's view of a `GradKVCache`: `update` replaces the buffers by updated copies."""

    def __init__(self, cache: GradKVCache, i: int, slots: Tensor):
        self.cache, self.i, self.slots = cache, i, slots

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c, i = self.cache, self.i
        c.k[i] = c.k[i].index_copy(2, self.slots, k.to(c.k[i].dtype))
        c.v[i] = c.v[i].index_copy(2, self.slots, v.to(c.v[i].dtype))
        return c.k[i][:, :, : c.kv_len], c.v[i][:, :, : c.kv_len]


class GradKVCache(KVCache):
    """A KVCache through which gradients flow (out-of-place writes; costs a copy of the buffers a step)."""

    def layer(self, i: int, slots: Tensor) -> _GradLayerCache:  # type: ignore[override]
        return _GradLayerCache(self, i, slots)


def new_grad_cache(model: Transformer, batch: int, max_len: int) -> GradKVCache:
    cfg, weight = model.cfg, model.output.weight
    shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
    return GradKVCache(*shape, device=weight.device, dtype=weight.dtype)


class MultiplicationModel(nn.Module):
    """Transformer (+ latent feedback, + an optional linear head on block `aux_layer` predicting the
    running sum). forward(tokens, latent_start, num_latent) -> (float32 logits, running-sum predictions
    (B, T) or None)."""

    def __init__(self, transformer: Transformer, continuous: bool, aux_layer: int | None = None):
        super().__init__()
        self.transformer, self.continuous = transformer, continuous
        self.aux_head = None
        self._captured: list[Tensor] = []
        if aux_layer is not None:
            self.aux_head = nn.Linear(transformer.cfg.dim, 1)
            transformer.layers[aux_layer].register_forward_hook(lambda m, i, out: self._captured.append(out))

    # The activation probe and FSDP look for the blocks and the embeddings on the model itself.
    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.transformer.tok_embeddings

    def forward(
        self, tokens: Tensor, latent_start: int = 0, num_latent: int = 0, cached: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        self._captured = []
        model = self.transformer
        if self.continuous and num_latent:
            h = self.thoughts(tokens, latent_start, num_latent, cached)
        else:
            h = model.trunk(model.tok_embeddings(tokens))
        aux = None
        if self.aux_head is not None:
            aux = self.aux_head(torch.cat(self._captured, 1)).squeeze(-1).float()
        self._captured = []
        return model.output(h).float(), aux

    def thoughts(self, tokens: Tensor, start: int, n: int, cached: bool = True) -> Tensor:
        """Final hidden states (B, T, dim) with positions start..start+n-1 fed back as continuous thoughts;
        `cached`: n incremental steps through a KV cache, else n full recomputations (the reference)."""
        model = self.transformer
        emb = model.tok_embeddings(tokens)
        if not cached:
            for j in range(start, start + n):
                fed = model.trunk(emb[:, :j])[:, -1:]
                emb = torch.cat([emb[:, :j], fed, emb[:, j + 1 :]], 1)
            self._captured = []  # the aux head reads the final pass only
            return model.trunk(emb)
        cache = new_grad_cache(model, tokens.shape[0], tokens.shape[1])
        parts = [model.trunk(emb[:, :start], cache=cache)]
        for _ in range(n):
            parts.append(model.trunk(parts[-1][:, -1:], cache=cache))
        if start + n < tokens.shape[1]:
            parts.append(model.trunk(emb[:, start + n :], cache=cache))
        return torch.cat(parts, 1)
