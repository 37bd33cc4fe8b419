"""The dVAE's objective: reconstruction, KL to a uniform prior, and the beta-TCVAE decomposition.

All in float32. The KL terms are per latent position (summed over the N positions, then divided by N), so
their weights do not change meaning with N.

beta-TCVAE (Chen et al. 2018, arXiv 1802.04942) splits the KL, averaged over the data, into

    E[log q(z|x) - log p(z)] = MI (index-code) + TC (total correlation) + dim-KL (dimension-wise)
      MI     = E[log q(z|x) - log q(z)]
      TC     = E[log q(z) - sum_n log q(z_n)]
      dim-KL = E[sum_n log q(z_n) - log p(z_n)]

with the aggregate posterior estimated by minibatch-weighted sampling (their eq. 4): for a batch of M of a
data set of size D,  log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(M D), and the same per position for
q(z_n). The three terms telescope, so they always sum to the batch's sampled KL estimate. The estimator is
biased, and its biases are not the same for each term: with D >> M the marginals are underestimated by
about log(D) per position, which shows up as a large positive TC offset and a negative dim-KL; on small
batches each sample's own q(z_i | x_i) dominates the sums and the estimates swing, MI and dim-KL can come
out negative. `relu` clamps each negative estimate to 0 in the loss (the logged values stay raw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nanollama.config import ConfigError
from .schedules import ScheduleConfig


@dataclass
class LossConfig:
    pad_weight: float = 1.0  # weight of pad positions in the reconstruction loss (0: pads are ignored)
    # weight beta of the KL to the uniform prior; DALL-E: cosine from 0 to 6.6 over 5000 updates
    kl: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("cosine", 0.0, 6.6, 5000))
    mi_weight: float = 0.0  # beta-TCVAE: index-code mutual information
    tc_weight: float = 0.0  # total correlation
    dim_kl_weight: float = 0.0  # dimension-wise KL
    relu: bool = False  # clamp negative MI/TC/dim-KL estimates to 0 in the loss

    def check(self) -> None:
        if not 0 <= self.pad_weight <= 1:
            raise ConfigError("pad_weight", f"must be in [0, 1], got {self.pad_weight}")
        if key := self.kl.outside(lambda weight: weight >= 0):
            raise ConfigError(f"kl.{key}", f"the KL weight must stay >= 0, got {getattr(self.kl, key)}")
        for key in ("mi_weight", "tc_weight", "dim_kl_weight"):  # a negative one rewards the term: unbounded
            if getattr(self, key) < 0:
                raise ConfigError(
                    key,
                    f"must be >= 0 (a negative one makes the loss unbounded below), got {getattr(self, key)}",
                )

    @property
    def tcvae(self) -> bool:
        return any(w != 0 for w in (self.mi_weight, self.tc_weight, self.dim_kl_weight))


def reconstruction_loss(logits: Tensor, targets: Tensor, pad: int, pad_weight: float) -> Tensor:
    """Mean cross-entropy over positions, pads weighted by `pad_weight`, in float32."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    weights = torch.where(targets.flatten() == pad, pad_weight, 1.0).to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp(min=1e-12)


def kl_uniform(logits: Tensor) -> Tensor:
    """KL(q(z|x) || uniform over K), per latent position and sample: sum_k q log q + log K, averaged."""
    logq = logits.float().log_softmax(-1)
    return ((logq.exp() * logq).sum(-1) + math.log(logits.shape[-1])).mean()


def mws_terms(logits: Tensor, codes: Tensor, dataset_size: int) -> dict[str, Tensor]:
    """MI, TC and dim-KL (per position) of the sampled `codes` (M, N) under code logits (M, N, K), with the
    minibatch-weighted sampling estimate of the aggregate posterior; `kl_sampled` is their sum,
    E[log q(z|x) - log p(z)]."""
    M, N, K = logits.shape
    logq = logits.float().log_softmax(-1)  # (M_j, N, K)
    # lq[i, j, n] = log q(z_n = codes[i, n] | x_j)
    lq = torch.gather(logq.permute(1, 0, 2), 2, codes.t().unsqueeze(1).expand(N, M, M)).permute(2, 1, 0)
    log_qz_x = lq.diagonal(dim1=0, dim2=1).sum(0)  # (M,): log q(z_i | x_i)
    norm = math.log(M * dataset_size)
    log_qz = torch.logsumexp(lq.sum(2), dim=1) - norm
    log_qz_prod = (torch.logsumexp(lq, dim=1) - norm).sum(1)
    log_pz = -N * math.log(K)
    return {
        "mi": (log_qz_x - log_qz).mean() / N,
        "tc": (log_qz - log_qz_prod).mean() / N,
        "dim_kl": (log_qz_prod - log_pz).mean() / N,
        "kl_sampled": (log_qz_x - log_pz).mean() / N,
    }


def dvae_objective(
    recon_logits: Tensor,
    targets: Tensor,
    code_logits: Tensor,
    codes: Tensor,
    cfg: LossConfig,
    beta: float,
    pad: int,
    dataset_size: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss and its terms (detached, for the log)."""
    recon = reconstruction_loss(recon_logits, targets, pad, cfg.pad_weight)
    kl = kl_uniform(code_logits)
    terms = {"recon": recon, "kl": kl}
    loss = recon + beta * kl
    if len(codes) > 1:  # the aggregate posterior needs a batch
        mws = mws_terms(code_logits, codes, dataset_size)
        terms.update(mws)
        for key, weight in (("mi", cfg.mi_weight), ("tc", cfg.tc_weight), ("dim_kl", cfg.dim_kl_weight)):
            if weight:
                loss = loss + weight * (mws[key].clamp(min=0) if cfg.relu else mws[key])
    return loss, {k: v.detach() for k, v in terms.items()}
