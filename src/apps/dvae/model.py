"""The discrete VAE, from core pieces: encoder, pooler, quantiser, codebook and decoder.

    tokens (B, L) + 2D positions -> encoder (core Transformer trunk, bidirectional) -> states (B, L, d)
                  -> pooler (N learned queries cross-attending to the states) -> logits (B, N, K)
                  -> quantiser (gumbel | reinmax in training, argmax in evaluation) -> weights (B, N, K)
                  -> codebook (K, d') -> latents (B, N, d')
                  -> unpooler (the L canvas slots cross-attending to the latents)
                  -> decoder (core Transformer trunk, bidirectional, over the L slots)
                  -> logits over the grid vocabulary at every slot (B, L, V), float32

Positions are learned row and column embeddings of the grid canvas (data.py: cell (r, c) always sits at
r (S + 1) + c), added to the encoder's token embeddings and making the decoder's slot queries; RoPE, which
the core blocks apply along the flattened sequence, only tells how far apart two tokens are.

The lattice prior (`locality`): latent n has an anchor point on a regular lattice over the canvas, and both
cross-attentions add -d^2 / (2 sigma^2) to their scores, d the distance between a cell and the anchor,
sigma = locality x the lattice spacing. Without it (locality 0) the pooler's and the decoder's attention
both start uniform and must agree on which latent holds which part of the grid before any content gets
through: in CPU-budget runs (1,500 updates, gumbel.yaml's model) that never happens, the reconstruction
stays at the background colour. The prior only sets where each latent looks first; the learned scores can
override it.

The quantisers' random draws come from a generator the caller passes (seeded per batch), not from the
global RNG, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nanollama.app import set_vocab_size
from ...nanollama.config import ConfigError
from ...nanollama.model.eager import eager
from ...nanollama.model.transformer import Transformer, TransformerConfig
from .data import GridVocab, seq_len
from .schedules import ScheduleConfig

QUANTISERS = ("gumbel", "reinmax")


@dataclass
class DVAEConfig:
    n_colours: int = 10  # colour ids 0..n_colours-1; row_end, eos, pad and mask follow (GridVocab)
    n_latents: int = 16  # N: latent positions per grid
    n_codes: int = 64  # K: codebook size
    # width of the lattice prior tying latent n to its anchor, in lattice spacings (module docstring); 0: off
    locality: float = 0.5
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
        if self.locality < 0:
            raise ConfigError("locality", f"must be >= 0 (0: no lattice prior), got {self.locality}")
        for part in ("encoder", "decoder"):
            sub = getattr(self, part)
            if sub.causal:
                raise ConfigError(f"{part}.causal", "the dVAE reads whole grids: must be false")
            set_vocab_size(sub, self.vocab.size, "grid vocabulary (n_colours + 4)", f"{part}.vocab_size")


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
        if key := self.tau.outside(lambda tau: tau > 0):
            raise ConfigError(f"tau.{key}", f"the temperature must stay > 0, got {getattr(self.tau, key)}")
        if self.kind == "reinmax" and (key := self.tau.outside(lambda tau: tau >= 1)):
            raise ConfigError(
                f"tau.{key}", f"reinmax needs tau >= 1 (Liu et al. 2023), got {getattr(self.tau, key):g}"
            )
        if key := self.noise.outside(lambda scale: scale >= 0):
            raise ConfigError(
                f"noise.{key}", f"the noise scale must stay >= 0, got {getattr(self.noise, key)}"
            )
        if not 0 <= self.hard_prob <= 1:
            raise ConfigError("hard_prob", f"must be in [0, 1], got {self.hard_prob}")
        if self.hard_start < 0:
            raise ConfigError("hard_start", f"must be >= 0, got {self.hard_start}")


# ----------------------------------------------------------------------------- quantisers


@eager
def draw_uniforms(
    kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor | None:
    """The quantiser's uniform draws for code logits of `shape` (B, N, K): (B, N, K) for gumbel, (B, N) for
    reinmax, None for argmax. Drawn before the model runs: dynamo cannot trace a generator's draws, and a
    draw amid the forward pass split a compiled model into 4 graphs."""
    if kind == "gumbel":
        return torch.rand(shape, generator=generator, device=device)
    if kind == "reinmax":
        return torch.rand(shape[:-1], generator=generator, device=device)
    return None


def gumbel_softmax(logits: Tensor, tau: float, uniform: Tensor, noise: float = 1.0) -> Tensor:
    """softmax((logits + noise * g) / tau), g ~ Gumbel(0, 1) made from `uniform` (the shape of logits)."""
    u = uniform.to(logits.dtype)
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


def sample_codes(logits: Tensor, uniform: Tensor) -> Tensor:
    """Codes (B, N) drawn from softmax(logits) (no Gumbel noise: the inverse CDF at `uniform` (B, N))."""
    cdf = logits.detach().float().softmax(-1).cumsum(-1)
    u = uniform.float().unsqueeze(-1)
    return (cdf < u * cdf[..., -1:]).sum(-1).clamp(max=logits.shape[-1] - 1)


def quantise(
    logits: Tensor,
    kind: str,
    tau: float = 1.0,
    hard_rows: Tensor | None = None,
    uniform: Tensor | None = None,
    noise: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(weights (B, N, K) the decoder reads, codes (B, N)) from code logits (B, N, K).

    argmax: one-hot of the most likely code. gumbel: the soft relaxed sample, or on the rows of `hard_rows`
    (bool (B,)) its one-hot argmax with the soft sample's gradient (straight-through). reinmax: a one-hot
    sample with ReinMax's gradient. `uniform`: the draws of `draw_uniforms` (gumbel, reinmax).
    """
    K = logits.shape[-1]
    if kind == "argmax":
        codes = logits.argmax(-1)
        return F.one_hot(codes, K).to(logits.dtype), codes
    if kind == "gumbel":
        soft = gumbel_softmax(logits, tau, uniform, noise)
        codes = soft.argmax(-1)
        if hard_rows is None:
            return soft, codes
        hard = F.one_hot(codes, K).to(soft.dtype) - soft.detach() + soft
        return torch.where(hard_rows.view(-1, *[1] * (soft.dim() - 1)), hard, soft), codes
    if kind == "reinmax":
        codes = sample_codes(logits, uniform)
        return ReinMax.apply(logits, tau, F.one_hot(codes, K).to(logits.dtype)), codes
    raise ValueError(f"unknown quantiser {kind!r}")


# ----------------------------------------------------------------------------- the model


def lattice_prior(n_latents: int, side: int, locality: float) -> Tensor:
    """(N, side^2) score bias: -d^2 / (2 sigma^2) from each latent's anchor to each canvas cell.

    The anchors are the centres of an r x c lattice over the side x side canvas (r x c = N, r the largest
    divisor of N up to sqrt(N): 32 -> 4 x 8); sigma is `locality` lattice spacings along each axis."""
    rows = max(r for r in range(1, math.isqrt(n_latents) + 1) if n_latents % r == 0)
    cols = n_latents // rows
    n = torch.arange(n_latents)
    anchor_r, anchor_c = (n // cols + 0.5) * side / rows, (n % cols + 0.5) * side / cols
    cell = torch.arange(side * side)
    r, c = (cell // side + 0.5).float(), (cell % side + 0.5).float()
    dr = (r[None] - anchor_r[:, None]) / (locality * side / rows)
    dc = (c[None] - anchor_c[:, None]) / (locality * side / cols)
    return -0.5 * (dr**2 + dc**2)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B | 1, Q, dim) to a context (B, T, dim), with an optional
    score bias or mask (broadcastable to (B, heads, Q, T)); its output is (B, Q, dim)."""

    def __init__(self, dim: int, n_heads: int, init_std: float):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.o_proj.weight, std=init_std / 2)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        (B, T, D), Q, H = context.shape, x.shape[1], self.n_heads
        q = self.q_proj(x).view(-1, Q, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        k = self.k_proj(context).view(B, T, H, D // H).transpose(1, 2)
        v = self.v_proj(context).view(B, T, H, D // H).transpose(1, 2)
        mask = None if mask is None else mask.to(q.dtype) if mask.is_floating_point() else mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, Q, D))


class Pooler(nn.Module):
    """N learned queries cross-attend to the encoder's states; each gives one logit vector over K codes."""

    def __init__(self, enc: TransformerConfig, n_latents: int, n_codes: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(n_latents, enc.dim))
        nn.init.normal_(self.queries, std=enc.init_std)
        self.attn = CrossAttention(enc.dim, enc.n_heads, enc.init_std)
        self.norm = nn.RMSNorm(enc.dim, eps=enc.norm_eps)
        self.proj = nn.Linear(enc.dim, n_codes, bias=False)
        nn.init.normal_(self.proj.weight, std=enc.init_std)

    def forward(self, h: Tensor, prior: Tensor | None, keep: Tensor) -> Tensor:
        """h (B, T, dim) -> logits (B, N, K); `prior` (N, T) score bias; `keep` (bool (B, T)): the positions
        the queries may read."""
        if prior is None:
            mask = keep[:, None, None, :]
        else:
            mask = prior.to(h.dtype).masked_fill(~keep[:, None, None, :], float("-inf"))
        return self.proj(self.norm(self.attn(self.queries[None], h, mask))).float()


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig, max_size: int):
        super().__init__()
        enc, dec = cfg.encoder, cfg.decoder
        self.cfg, self.length, self.side = cfg, seq_len(max_size), max_size + 1
        self.encoder = Transformer(enc)
        self.encoder.output = nn.Identity()  # states out: the pooler reads them
        self.enc_rows, self.enc_cols = nn.Embedding(self.side, enc.dim), nn.Embedding(self.side, enc.dim)
        self.pooler = Pooler(enc, cfg.n_latents, cfg.n_codes)
        # unit scale, as token embeddings: at 0.02 the decoder learns codes several times slower
        self.codebook = nn.Embedding(cfg.n_codes, dec.dim)
        self.latent_norm = nn.RMSNorm(dec.dim, eps=dec.norm_eps)
        self.unpooler = CrossAttention(dec.dim, dec.n_heads, dec.init_std)
        self.decoder = Transformer(dec)
        del self.decoder.tok_embeddings  # its inputs are the slots, never tokens
        self.dec_rows, self.dec_cols = nn.Embedding(self.side, dec.dim), nn.Embedding(self.side, dec.dim)
        prior = lattice_prior(cfg.n_latents, self.side, cfg.locality) if cfg.locality > 0 else None
        self.register_buffer("prior", prior, persistent=False)  # rebuilt from the config, not checkpointed
        with torch.no_grad():
            for p in (self.enc_rows.weight, self.enc_cols.weight):
                nn.init.normal_(p, std=enc.init_std)
            for p in (self.dec_rows.weight, self.dec_cols.weight):
                nn.init.normal_(p, std=dec.init_std)

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
        return self.pooler(self.encoder.trunk(h), self.prior, tokens != self.cfg.vocab.pad)

    def decode(self, weights: Tensor) -> Tensor:
        """Code weights (B, N, K) -> logits (B, L, V) over the grid vocabulary at every position, float32."""
        latents = self.latent_norm(weights.to(self.codebook.weight.dtype) @ self.codebook.weight)
        slots = self.positions(self.dec_rows, self.dec_cols).expand(len(weights), -1, -1).to(latents.dtype)
        prior = None if self.prior is None else self.prior.T[None, None]
        h = self.decoder.trunk(slots + self.unpooler(slots, latents, prior))
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
        shape = (len(tokens), self.cfg.n_latents, self.cfg.n_codes)
        uniform = draw_uniforms(kind, shape, generator, tokens.device)
        logits = self.encode(tokens)
        weights, codes = quantise(logits, kind, tau, hard_rows, uniform, noise)
        return self.decode(weights), logits, codes
