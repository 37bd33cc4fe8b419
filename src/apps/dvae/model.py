"""The discrete VAE, from core pieces: encoder, pooler, quantiser, codebook and decoder.

    tokens (B, L) + 2D positions -> encoder (core Transformer trunk, bidirectional) -> states (B, L, d)
                  -> pooler (N learned queries cross-attending to the states) -> logits (B, N, K)
                  -> quantiser (gumbel | reinmax in training, argmax in evaluation) -> weights (B, N, K)
                  -> codebook (K, d') -> latents (B, N, d')
                  -> decoder (core Transformer trunk, bidirectional, on [latents; L slots])
                  -> logits over the grid vocabulary at every slot (B, L, V), float32

Positions are learned row and column embeddings of the grid canvas (data.py: cell (r, c) always sits at
r (S + 1) + c), added to the encoder's token embeddings and making the decoder's slot queries; RoPE, which
the core blocks apply along the flattened sequence, only tells how far apart two tokens are.

The quantisers' random draws come from a generator the caller passes (seeded per batch), not from the
global RNG, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.config import ConfigError
from ...nanollama.model.transformer import Transformer, TransformerConfig
from .data import GridVocab, seq_len
from .schedules import ScheduleConfig

QUANTISERS = ("gumbel", "reinmax")


@dataclass
class DVAEConfig:
    n_colours: int = 10  # colour ids 0..n_colours-1; row_end, eos, pad and mask follow (GridVocab)
    n_latents: int = 16  # N: latent positions per grid
    n_codes: int = 64  # K: codebook size
    encoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(causal=False))
    decoder: TransformerConfig = field(default_factory=lambda: TransformerConfig(causal=False))

    @property
    def vocab(self) -> GridVocab:
        return GridVocab(self.n_colours)

    def check(self) -> None:
        if self.n_colours < 2:
            raise ConfigError("n_colours", f"must be >= 2, got {self.n_colours}")
        if self.n_latents < 1:
            raise ConfigError("n_latents", f"must be >= 1, got {self.n_latents}")
        if self.n_codes < 2:
            raise ConfigError("n_codes", f"must be >= 2, got {self.n_codes}")
        for part in ("encoder", "decoder"):
            sub = getattr(self, part)
            if sub.causal:
                raise ConfigError(f"{part}.causal", "the dVAE reads whole grids: must be false")
            # resolved here, so config.yaml (and a resume or eval check) records the vocabulary used
            if sub.vocab_size not in (0, self.vocab.size):
                raise ConfigError(
                    f"{part}.vocab_size", f"{sub.vocab_size} != {self.vocab.size} (n_colours + 4)"
                )
            sub.vocab_size = self.vocab.size


@dataclass
class QuantiserConfig:
    kind: str = "gumbel"  # gumbel | reinmax (training); evaluation always takes the argmax code
    # temperature; DALL-E: cosine from 1 to 1/16 over 150k updates. ReinMax needs tau >= 1.
    tau: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("cosine", 1.0, 1 / 16, 150_000))
    hard_prob: float = 0.0  # gumbel: share of rows taking the straight-through hard sample instead...
    hard_start: int = 0  # ... from this step on
    # gumbel: scale of the Gumbel noise (1: Gumbel-softmax). A ramp from 0 lets the encoder learn to carry
    # the grid before the noise drowns its still-small logits (otherwise the decoder learns to ignore them).
    noise: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("constant", 1.0))

    def check(self) -> None:
        if self.kind not in QUANTISERS:
            raise ConfigError("kind", f"'{self.kind}' is not one of {', '.join(QUANTISERS)}")
        low, _ = self.tau.bounds()
        if not low > 0:
            raise ConfigError("tau.start", f"the temperature must stay > 0, the schedule reaches {low}")
        if self.kind == "reinmax" and low < 1:
            key = "tau.start" if self.tau.start < 1 else "tau.end"
            raise ConfigError(key, f"reinmax needs tau >= 1 (Liu et al. 2023), the schedule reaches {low:g}")
        if self.noise.bounds()[0] < 0:
            raise ConfigError("noise.start", "the noise scale must stay >= 0")
        if not 0 <= self.hard_prob <= 1:
            raise ConfigError("hard_prob", f"must be in [0, 1], got {self.hard_prob}")
        if self.hard_start < 0:
            raise ConfigError("hard_start", f"must be >= 0, got {self.hard_start}")


# ----------------------------------------------------------------------------- quantisers


def gumbel_softmax(
    logits: Tensor, tau: float, generator: torch.Generator | None = None, noise: float = 1.0
) -> Tensor:
    """softmax((logits + noise * g) / tau), g ~ Gumbel(0, 1) drawn from `generator`."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    return ((logits + noise * g) / tau).softmax(-1)


class ReinMax(torch.autograd.Function):
    """Liu et al. 2023 (arXiv 2304.08612), Algorithm 2: the forward pass is the one-hot `sample` D of
    softmax(logits); the backward pass is the second-order estimate, written out (the authors' form):

        pi0 = softmax(theta), pi1 = (D + softmax(theta / tau)) / 2
        grad = J_softmax(pi1)^T (2 g) + J_softmax(pi0)^T (-g / 2)    with J(p) = diag(p) - p p^T
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tau: float, sample: Tensor) -> Tensor:  # type: ignore[override]
        ctx.tau = tau
        ctx.save_for_backward(logits, sample)
        return sample

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, sample = ctx.saved_tensors
        pi0 = logits.softmax(-1)
        pi1 = 0.5 * (sample + (logits / ctx.tau).softmax(-1))
        g1 = 2 * grad * pi1
        g1 = g1 - pi1 * g1.sum(-1, keepdim=True)
        g0 = -0.5 * grad * pi0
        g0 = g0 - pi0 * g0.sum(-1, keepdim=True)
        return g0 + g1, None, None


def sample_codes(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Codes (B, N) drawn from softmax(logits) (no Gumbel noise: inverse CDF of one uniform each)."""
    cdf = logits.detach().float().softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[:-1], generator=generator, device=cdf.device).unsqueeze(-1)
    return (cdf < u * cdf[..., -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)


def quantise(
    logits: Tensor,
    kind: str,
    tau: float = 1.0,
    hard_rows: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(weights (B, N, K) the decoder reads, codes (B, N)) from code logits (B, N, K).

    argmax: one-hot of the most likely code. gumbel: the soft relaxed sample, or on the rows of `hard_rows`
    (bool (B,)) its one-hot argmax with the soft sample's gradient (straight-through). reinmax: a one-hot
    sample with ReinMax's gradient.
    """
    K = logits.shape[-1]
    if kind == "argmax":
        codes = logits.argmax(-1)
        return F.one_hot(codes, K).to(logits.dtype), codes
    if kind == "gumbel":
        soft = gumbel_softmax(logits, tau, generator, noise)
        codes = soft.argmax(-1)
        if hard_rows is None or not bool(hard_rows.any()):
            return soft, codes
        hard = F.one_hot(codes, K).to(soft.dtype) - soft.detach() + soft
        return torch.where(hard_rows.view(-1, *[1] * (soft.dim() - 1)), hard, soft), codes
    if kind == "reinmax":
        codes = sample_codes(logits, generator)
        return ReinMax.apply(logits, tau, F.one_hot(codes, K).to(logits.dtype)), codes
    raise ValueError(f"unknown quantiser {kind!r}")


# ----------------------------------------------------------------------------- the model


class Pooler(nn.Module):
    """N learned queries cross-attend to the encoder's states; each gives one logit vector over K codes."""

    def __init__(self, dim: int, n_heads: int, n_latents: int, n_codes: int, norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.zeros(n_latents, dim))
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.proj = nn.Linear(dim, n_codes, bias=False)

    def forward(self, h: Tensor, keep: Tensor | None = None) -> Tensor:
        """h (B, T, dim) -> logits (B, N, K); `keep` (bool (B, T)): the positions the queries may read."""
        B, T, D = h.shape
        N, H = self.queries.shape[0], self.n_heads
        q = self.q_proj(self.queries).view(1, N, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        k = self.k_proj(h).view(B, T, H, D // H).transpose(1, 2)
        v = self.v_proj(h).view(B, T, H, D // H).transpose(1, 2)
        mask = None if keep is None else keep[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, D)
        return self.proj(self.norm(self.o_proj(y))).float()


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig, max_size: int):
        super().__init__()
        enc, dec = cfg.encoder, cfg.decoder
        self.cfg, self.length, self.side = cfg, seq_len(max_size), max_size + 1
        self.encoder = Transformer(enc)
        self.encoder.output = nn.Identity()  # states out: the pooler reads them
        self.enc_rows, self.enc_cols = nn.Embedding(self.side, enc.dim), nn.Embedding(self.side, enc.dim)
        self.pooler = Pooler(enc.dim, enc.n_heads, cfg.n_latents, cfg.n_codes, enc.norm_eps)
        self.codebook = nn.Embedding(cfg.n_codes, dec.dim)
        self.decoder = Transformer(dec)
        del self.decoder.tok_embeddings  # its inputs are the latents and the slots, never tokens
        self.dec_rows, self.dec_cols = nn.Embedding(self.side, dec.dim), nn.Embedding(self.side, dec.dim)
        with torch.no_grad():
            for p in (self.pooler.queries, self.codebook.weight, self.enc_rows.weight, self.enc_cols.weight):
                nn.init.normal_(p, std=enc.init_std)
            for p in (self.dec_rows.weight, self.dec_cols.weight):
                nn.init.normal_(p, std=dec.init_std)
            for linear in (self.pooler.q_proj, self.pooler.k_proj, self.pooler.v_proj):
                nn.init.normal_(linear.weight, std=enc.init_std)
            nn.init.normal_(self.pooler.proj.weight, std=enc.init_std)
            nn.init.normal_(self.pooler.o_proj.weight, std=enc.init_std / 2)

    # FSDP shards per block, and the activation probe reads blocks: both look for `layers` on the model.
    @property
    def layers(self) -> list[nn.Module]:
        return [*self.encoder.layers, *self.decoder.layers]

    def positions(self, rows: nn.Embedding, cols: nn.Embedding) -> Tensor:
        """(L, dim): the row embedding plus the column embedding of every canvas position."""
        p = torch.arange(self.length, device=rows.weight.device)
        return rows(p // self.side) + cols(p % self.side)

    def encode(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) -> code logits (B, N, K), float32."""
        h = self.encoder.tok_embeddings(tokens) + self.positions(self.enc_rows, self.enc_cols)
        # the pooler reads the grid (cells, row ends, eos), not the padding, which would drown it out
        return self.pooler(self.encoder.trunk(h), tokens != self.cfg.vocab.pad)

    def decode(self, weights: Tensor) -> Tensor:
        """Code weights (B, N, K) -> logits (B, L, V) over the grid vocabulary at every position, float32."""
        latents = weights.to(self.codebook.weight.dtype) @ self.codebook.weight
        slots = self.positions(self.dec_rows, self.dec_cols).expand(len(weights), -1, -1).to(latents.dtype)
        h = self.decoder.trunk(torch.cat([latents, slots], 1))[:, latents.shape[1] :]
        return self.decoder.output(h).float()

    def forward(
        self,
        tokens: Tensor,
        kind: str = "argmax",
        tau: float = 1.0,
        hard_rows: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction logits (B, L, V), code logits (B, N, K), codes (B, N))."""
        logits = self.encode(tokens)
        weights, codes = quantise(logits, kind, tau, hard_rows, generator, noise)
        return self.decode(weights), logits, codes
