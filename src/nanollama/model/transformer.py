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

from ..config import ConfigError
from .attention import BACKENDS, attend
from .rope import RotaryEmbedding, apply_rope


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
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    causal: bool = True  # False: bidirectional encoder
    attention: str = "sdpa"  # sdpa | flex
    init_std: float = 0.02

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


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.mask = "causal" if cfg.causal else None
        self.backend = cfg.attention
        # Separate q/k/v weights (not one fused qkv) keep HF Llama's layout.
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, self.mask, self.backend)
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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
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
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
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

    def trunk(self, h: Tensor) -> Tensor:
        """Blocks and final norm on embeddings h (B, T, dim) at positions 0..T-1: for apps that bring
        their own inputs (e.g. image patches) or heads (e.g. a classifier)."""
        cos, sin = self.rope(h.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> float32 logits (B, T, vocab_size)."""
        return self.output(self.trunk(self.tok_embeddings(tokens))).float()
