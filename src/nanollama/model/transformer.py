"""Llama-style transformer: pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no biases.

Parameters have the shapes of Hugging Face's `LlamaForCausalLM` and RoPE follows its convention, so
export to HF is a pure renaming of tensors (see tests/nanollama/model/test_transformer.py). The model
knows nothing of any app: tokens in, float32 logits out.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from .attention import (
    BACKENDS,
    KVCache,
    LayerCache,
    Mask,
    attend,
    build_mask,
    cache_mask,
    document_mask,
    get_mask_mod,
    prefix_lm_mask,
    static_mask,
)
from .rope import RopeScaling, RotaryEmbedding, apply_rope


@dataclass
class TransformerConfig:
    vocab_size: int = 0  # 0: filled in by the app (e.g. from its data)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads; fewer gives grouped-query attention
    ffn_dim: int = 0  # 0: Llama rule, 8/3 * dim rounded up to a multiple of `multiple_of`
    multiple_of: int = 32
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | ntk | yarn: RoPE past the training length (see rope.py)
    rope_factor: float = 1.0  # target length / training length (1: plain RoPE whatever the scaling)
    rope_original_length: int = 0  # the training length the scaling refers to (yarn needs it)
    rope_beta_fast: float = 32.0  # yarn: ramp bounds, in rotations over rope_original_length
    rope_beta_slow: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    causal: bool = True  # False: bidirectional encoder
    attention: str = "sdpa"  # sdpa | flex
    init_std: float = 0.02
    sliding_window: int = 0  # > 0: causal attention to the last `sliding_window` positions only
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    def check(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "multiple_of"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        for key in ("vocab_size", "n_kv_heads", "ffn_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0 (0: default), got {getattr(self, key)}")
        for key in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError("dim", f"dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError("n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.attention not in BACKENDS:
            raise ConfigError("attention", f"must be one of {', '.join(BACKENDS)}, got {self.attention!r}")
        RopeScaling.of(self).check(self.head_dim)
        if self.sliding_window < 0:
            raise ConfigError("sliding_window", f"must be >= 0 (0: off), got {self.sliding_window}")
        if self.sliding_window and not self.causal:
            raise ConfigError("sliding_window", "needs causal: true (a causal window)")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.mask = static_mask(cfg.causal, cfg.sliding_window)  # used unless a forward brings its own
        self.backend = cfg.attention
        # Separate q/k/v weights (not one fused qkv) keep HF Llama's layout.
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask = None, cache: LayerCache | None = None
    ) -> Tensor:
        """x (B, T, dim); `mask` built for this batch replaces the static one; with `cache`, k and v are
        written into it and q attends to all its slots."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        y = attend(q, k, v, self.mask if mask is None else mask, self.backend)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask = None, cache: LayerCache | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        cfg.check()
        if cfg.vocab_size <= 0:
            raise ConfigError("vocab_size", "must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, scaling=RopeScaling.of(cfg))
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Careful init: N(0, init_std) everywhere, residual-branch outputs scaled by 1/sqrt(2 n_layers)
        so the residual stream's variance does not grow with depth; norms to 1. Deterministic given
        torch's RNG; also materialises a model built on the meta device (RoPE tables included)."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(linear.weight, std=std)
            for linear in (attn.o_proj, mlp.down_proj):  # the writes into the residual stream
                nn.init.normal_(linear.weight, std=residual_std)
            nn.init.ones_(layer.attn_norm.weight)
            nn.init.ones_(layer.mlp_norm.weight)
        nn.init.ones_(self.norm.weight)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        self.rope.reset()

    def trunk(
        self,
        h: Tensor,
        *,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        prefix_len: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Blocks and final norm on embeddings h (B, T, dim): for apps that bring their own inputs (e.g.
        image patches) or heads (e.g. a classifier). Options as in `forward`; without them, the training
        path: positions 0..T-1 and the static (cached) mask."""
        T = h.shape[1]
        slots = None if cache is None else cache.slots(T)
        if positions is None and cache is not None:
            positions = cache.positions(slots)
        if positions is None:
            cos, sin = self.rope(T)
        else:
            cos, sin = self.rope_at(positions, T if cache is None else cache.max_len)
        mask = self.batch_mask(h, doc_ids, prefix_len, cache, slots)
        recompute = self.cfg.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:  # keep only each block's input; its activations are rebuilt in backward
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, None if cache is None else cache.layer(i, slots))
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def parameter_counts(self) -> dict[str, int]:
        """`total`; `embedding`: the token embedding and, untied, the output head; `non_embedding`: the
        rest (blocks and final norm), the N of scaling laws (Kaplan et al. 2020)."""
        total = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        embedding = self.tok_embeddings.weight.numel()
        if not self.cfg.tie_embeddings:
            embedding += self.output.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward = 3 x forward) FLOPs per token on rows of `seq_len` positions:

            6 * W + 12 * n_layers * (n_heads * head_dim) * c

        W: the matmul weights (every linear layer, the output head included; an embedding lookup or a norm
        is no matmul), a multiply-add being 2 FLOPs; `c`: the mean number of keys a query attends to,
        (seq_len + 1) / 2 causal, seq_len bidirectional, fewer with a sliding window. The attention term is
        QK^T and AV (2 x 2 x d_attn x c forward each token), as PaLM (Chowdhery et al. 2022, appendix B)
        counts it, without the masked half that a causal kernel skips."""
        cfg, T = self.cfg, max(int(seq_len), 0)
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        if not cfg.causal:
            keys = float(T)
        elif cfg.sliding_window and cfg.sliding_window < T:
            w = cfg.sliding_window  # position t (1-based) sees min(t, w) keys
            keys = (w * (w + 1) / 2 + (T - w) * w) / T
        else:
            keys = (T + 1) / 2
        return 6.0 * weights + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys

    def new_cache(self, batch: int, max_len: int, start: Tensor | None = None) -> KVCache:
        """An empty KVCache for this model, on its device and in its dtype; see KVCache for `start`."""
        cfg, weight = self.cfg, self.output.weight
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        return KVCache(*shape, start=start, device=weight.device, dtype=weight.dtype)

    def rope_at(self, positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin (B, 1, T, head_dim) at per-row positions (B, T), which must be below `length`."""
        cos, sin = self.rope(length)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)

    def batch_mask(
        self,
        h: Tensor,
        doc_ids: Tensor | None,
        prefix_len: Tensor | None,
        cache: KVCache | None,
        slots: Tensor | None,
    ) -> Mask:
        """The data-dependent mask of this batch, built once for all layers; None: the static mask."""
        if doc_ids is None and prefix_len is None and cache is None:
            return None
        B, T = h.shape[:2]
        static = self.layers[0].attn.mask
        base = None if static is None else get_mask_mod(static)
        if base is None and (prefix_len is not None or cache is not None):
            raise ValueError("prefix_len and cache need a causal model (causal: true)")
        if prefix_len is not None:
            base = prefix_lm_mask(prefix_len, base)
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids with a KV cache is not supported (one document per row)")
            base = document_mask(doc_ids, base)
        if cache is not None:
            base, kv_len = cache_mask(cache.start, slots, base), cache.kv_len
        else:
            kv_len = T
        return build_mask(base, B, T, kv_len, h.device, self.cfg.attention)

    def embed(
        self, tokens: Tensor | None, embeddings: Tensor | None = None, splice_mask: Tensor | None = None
    ) -> Tensor:
        """The trunk's input (B, T, dim): token embeddings, given `embeddings`, or both spliced.

        With tokens and `splice_mask` (B, T) bool, `embeddings` (n, dim) or (B, k, dim), taken in row-major
        order, replace the token embeddings where the mask is set (e.g. image patches at placeholder
        positions): one gather and a `where`, no data-dependent shapes, so it compiles and its gradient
        reaches the embeddings. The model knows nothing of where they come from."""
        if tokens is None:
            if embeddings is None:
                raise ValueError("forward needs tokens, embeddings, or both with a splice_mask")
            return embeddings
        h = self.tok_embeddings(tokens)
        if embeddings is None:
            return h
        if splice_mask is None:
            raise ValueError("tokens and embeddings together need a splice_mask (where the embeddings go)")
        return splice(h, embeddings, splice_mask)

    def forward(
        self,
        tokens: Tensor | None = None,
        *,
        embeddings: Tensor | None = None,
        splice_mask: Tensor | None = None,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        prefix_len: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """tokens (B, T) -> float32 logits (B, T, vocab_size).

        embeddings: input embeddings instead of tokens (B, T, dim), or spliced into the tokens' where
        splice_mask (B, T) is set (see `embed`).
        positions (B, T): RoPE positions of each row (default 0..T-1, with a cache the cache's own).
        doc_ids (B, T): document of each token of packed rows; attention never crosses documents.
        prefix_len (B,): length of each row's bidirectional prefix (prefix-LM); the rest stays causal.
        cache: a KVCache the tokens are appended to, attending to everything it holds (generation).
        Masks from doc_ids, prefix_len and cache are built once per call, shared by every layer (flex:
        BlockMask; sdpa: dense); without them the static mask is cached per length.
        """
        h = self.embed(tokens, embeddings, splice_mask)
        h = self.trunk(h, positions=positions, doc_ids=doc_ids, prefix_len=prefix_len, cache=cache)
        return self.output(h).float()


def splice(h: Tensor, embeddings: Tensor, mask: Tensor) -> Tensor:
    """h (B, T, dim) with the rows of `embeddings` (n, dim) or (B, k, dim), in row-major order, written
    where mask (B, T) is set. Extra embeddings are ignored; too few is an index error."""
    flat = embeddings.reshape(-1, h.shape[-1]).to(h.dtype)
    index = (mask.flatten().cumsum(0) - 1).clamp_min(0)
    placed = flat[index].view_as(h)
    return torch.where(mask[..., None], placed, h)
