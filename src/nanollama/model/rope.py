"""Rotary position embeddings, in Hugging Face Llama's convention (dims i and i + head_dim/2 pair up).

The cos/sin tables live in non-persistent buffers: never saved, built for a default length and grown
on demand. Precomputed tables matter under torch.compile, which would otherwise inline pow and cos
into every element of q and k (measured 5x slower RoPE on CPU).

Scaling, for evaluating past the training length (`RopeScaling`; factor 1 is plain RoPE, bit for bit):

- `linear`: position interpolation (Chen et al. 2023), every frequency divided by `factor`;
  HF's rope_type "linear".
- `ntk`: "NTK-aware" scaling (bloc97, 2023), plain RoPE with base theta * factor^(d / (d - 2)), so the
  highest frequency is kept and the lowest is interpolated by `factor`. Static: HF's "dynamic" instead
  recomputes the base from the current sequence length, a different function.
- `yarn`: YaRN (Peng et al. 2023), interpolation only for the dims whose wavelength exceeds the
  training length, a linear ramp between beta_fast and beta_slow rotations, and cos/sin scaled by
  0.1 ln(factor) + 1; HF's rope_type "yarn" with its defaults (truncate, no mscale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .eager import eager

SCALINGS = ("none", "linear", "ntk", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched for sequences longer than the training length."""

    kind: str = "none"  # none | linear | ntk | yarn
    factor: float = 1.0  # target length / original length
    original_length: int = 0  # yarn: the training length the ramp refers to
    beta_fast: float = 32.0  # yarn: dims rotating more than this over original_length are kept
    beta_slow: float = 1.0  # yarn: dims rotating less than this are fully interpolated

    @property
    def plain(self) -> bool:
        return self.kind == "none" or self.factor == 1.0

    @classmethod
    def of(cls, cfg: Any) -> RopeScaling:
        """From a model config's `rope_*` fields (TransformerConfig's names)."""
        fields = (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_length)
        return cls(*fields, cfg.rope_beta_fast, cfg.rope_beta_slow)

    def check(self, head_dim: int) -> None:
        """Errors name TransformerConfig's fields, as `of` reads them."""
        if self.kind not in SCALINGS:
            raise ConfigError("rope_scaling", f"must be one of {', '.join(SCALINGS)}, got {self.kind!r}")
        if not self.factor >= 1:
            raise ConfigError("rope_factor", f"must be >= 1 (target / training length), got {self.factor}")
        if self.kind == "none" and self.factor != 1:
            raise ConfigError("rope_factor", f"{self.factor} has no effect with rope_scaling=none")
        if self.original_length < 0:
            raise ConfigError("rope_original_length", f"must be >= 0, got {self.original_length}")
        if self.kind == "yarn" and self.original_length < 1:
            raise ConfigError("rope_original_length", "required by rope_scaling=yarn (the training length)")
        if self.kind == "ntk" and head_dim <= 2:
            raise ConfigError("rope_scaling", f"ntk needs head_dim > 2, got {head_dim}")
        if not 0 < self.beta_slow < self.beta_fast:
            bounds = f"{self.beta_slow}, {self.beta_fast}"
            raise ConfigError("rope_beta_fast", f"need 0 < rope_beta_slow < rope_beta_fast, got {bounds}")


def default_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """HF's inv_freq, op for op (theta^(-2i/d)), so tables match it bit for bit."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
    return 1.0 / theta ** (exponents / head_dim)


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """The base that keeps the highest frequency and divides the lowest (i = d/2 - 1) by `factor`."""
    return theta * factor ** (head_dim / (head_dim - 2))


def yarn_attention_factor(factor: float) -> float:
    """YaRN's sqrt(1/t) temperature, applied to cos and sin (so to q.k twice): 0.1 ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_correction_range(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[float, float]:
    """Dims between which the ramp goes from extrapolation (kept) to interpolation (divided by factor):
    where the number of rotations over original_length crosses beta_fast and beta_slow (HF truncates)."""

    def dim_of(rotations: float) -> float:
        wavelengths = scaling.original_length / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(theta))

    low, high = math.floor(dim_of(scaling.beta_fast)), math.ceil(dim_of(scaling.beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling, device: torch.device | None) -> Tensor:
    """Per-dim blend of plain and linearly interpolated frequencies, in HF's order of operations."""
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(device=device, dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    low, high = yarn_correction_range(head_dim, theta, scaling)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp.to(device=device, dtype=torch.float)
    return interpolation * (1 - keep) + extrapolation * keep


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling = RopeScaling(), device: torch.device | None = None
) -> tuple[Tensor, float]:
    """(inv_freq (head_dim/2,), attention factor): what HF's ROPE_INIT_FUNCTIONS return."""
    if scaling.plain:
        return default_inv_freq(head_dim, theta, device), 1.0
    if scaling.kind == "linear":
        return default_inv_freq(head_dim, theta, device) / scaling.factor, 1.0
    if scaling.kind == "ntk":
        return default_inv_freq(head_dim, ntk_theta(theta, scaling.factor, head_dim), device), 1.0
    if scaling.kind == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling, device), yarn_attention_factor(scaling.factor)
    raise ValueError(f"unknown RoPE scaling {scaling.kind!r} (one of {', '.join(SCALINGS)})")


def rope_tables(
    length: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: RopeScaling = RopeScaling(),
) -> tuple[Tensor, Tensor]:
    """Float32 (length, head_dim) tables: cos, and sin with the sign of rotate_half folded in, both
    times the attention factor (as HF applies it).

    Elementwise products rather than an outer product, which autocast would run in low precision.
    """
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, head_dim) by position with (T, head_dim) tables from `rope_tables`.

    HF's `x * cos + rotate_half(x) * sin` where rotate_half(x) = cat(-x2, x1): the sign lives in the
    sin table and cat(x2, x1) is a roll, three ops instead of five in eager mode.
    """
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, dims=-1), sin.to(x.dtype))


class RotaryEmbedding(nn.Module):
    """Holds the tables; `forward(seq_len)` returns the first seq_len rows of cos and sin."""

    def __init__(self, head_dim: int, theta: float, length: int = 4096, scaling: RopeScaling = RopeScaling()):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("cos", torch.empty(length, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(length, head_dim), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self, length: int = 0) -> None:
        """(Re)compute the tables, e.g. after a meta-device build; `length` 0 keeps the current length."""
        length = length or self.cos.shape[0]
        cos, sin = rope_tables(length, self.head_dim, self.theta, self.cos.device, self.scaling)
        self.cos, self.sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)

    @eager  # rare; a compiled model recompiles once for the new table shape
    def grow(self, seq_len: int) -> None:
        self.reset(max(seq_len, 2 * self.cos.shape[0]))

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if seq_len > self.cos.shape[0]:
            self.grow(seq_len)
        return self.cos[:seq_len], self.sin[:seq_len]
