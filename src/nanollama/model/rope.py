"""Rotary position embeddings, in Hugging Face Llama's convention (dims i and i + head_dim/2 pair up).

The cos/sin tables live in non-persistent buffers: never saved, built for a default length and grown
on demand. Precomputed tables matter under torch.compile, which would otherwise inline pow and cos
into every element of q and k (measured 5x slower RoPE on CPU).
"""

import torch
from torch import Tensor, nn


def rope_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Float32 (length, head_dim) tables: cos, and sin with the sign of rotate_half folded in.

    HF's inv_freq; elementwise products rather than an outer product, which autocast would run in low
    precision.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, head_dim) by position with (T, head_dim) tables from `rope_tables`.

    HF's `x * cos + rotate_half(x) * sin` where rotate_half(x) = cat(-x2, x1): the sign lives in the
    sin table and cat(x2, x1) is a roll, three ops instead of five in eager mode.
    """
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, dims=-1), sin.to(x.dtype))


class RotaryEmbedding(nn.Module):
    """Holds the tables; `forward(seq_len)` returns the first seq_len rows of cos and sin."""

    def __init__(self, head_dim: int, theta: float, length: int = 4096):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(length, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(length, head_dim), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self, length: int = 0) -> None:
        """(Re)compute the tables, e.g. after a meta-device build; `length` 0 keeps the current length."""
        cos, sin = rope_tables(length or self.cos.shape[0], self.head_dim, self.theta, self.cos.device)
        self.cos, self.sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)

    @torch.compiler.disable  # rare; a compiled model recompiles once for the new table shape
    def grow(self, seq_len: int) -> None:
        self.reset(max(seq_len, 2 * self.cos.shape[0]))

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if seq_len > self.cos.shape[0]:
            self.grow(seq_len)
        return self.cos[:seq_len], self.sin[:seq_len]
