"""Linear probes: is a quantity linearly decodable from a layer of a frozen model?

A probe is a multinomial logistic regression from features to integer labels, fit full-batch with L-BFGS
on features standardised with the training rows' statistics (L-BFGS converges in a few dozen steps on
them), scored on held-out rows. Its accuracy means little alone: compare it with chance (always answering
the training rows' majority class) and with the same probe on the input embeddings, which tells what the
current token alone gives away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .distributed import unwrap


@dataclass
class LinearProbeConfig:
    n_sequences: int = 512  # fresh sequences to collect features on, split by sequence into train and test
    test_fraction: float = 0.25  # share of the sequences held out for the test accuracy
    batch_size: int = 64  # sequences per forward pass when collecting features
    max_iter: int = 100  # L-BFGS iterations
    weight_decay: float = 1e-5  # L2 on the weights (standardised features): keeps separable data finite

    def check(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.n_sequences < 2 or round(self.n_sequences * self.test_fraction) in (0, self.n_sequences):
            raise ConfigError("n_sequences", f"{self.n_sequences} leaves no train or no test sequence")
        for key in ("batch_size", "max_iter"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")

    @property
    def n_test(self) -> int:
        return round(self.n_sequences * self.test_fraction)


class LinearProbe(nn.Module):
    """Standardisation (fixed) then a linear map to class logits."""

    def __init__(self, mean: Tensor, std: Tensor, n_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((x.float() - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self(x).argmax(-1)


def fit_linear_probe(
    x: Tensor, y: Tensor, n_classes: int = 0, weight_decay: float = 1e-5, max_iter: int = 100
) -> LinearProbe:
    """Fit on features x (N, D) and labels y (N,) in [0, n_classes); n_classes 0: y.max() + 1."""
    x, y = x.float(), y.long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    probe = LinearProbe(mean, std, n_classes or int(y.max()) + 1).to(x.device)
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    x = (x - mean) / std  # once, not at every evaluation of the loss

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe.linear(x), y) + weight_decay / 2 * probe.linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.requires_grad_(False)


def majority_chance(y_train: Tensor, y_test: Tensor) -> float:
    """Test accuracy of always answering the most frequent training label."""
    return (y_test == torch.bincount(y_train.flatten()).argmax()).float().mean().item()


def probe_accuracy(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    weight_decay: float = 1e-5,
    max_iter: int = 100,
) -> dict[str, float]:
    """Fit a probe on the training rows; its test and train accuracies next to chance."""
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    probe = fit_linear_probe(x_train, y_train, n_classes, weight_decay, max_iter)
    return {
        "accuracy": (probe.predict(x_test) == y_test).float().mean().item(),
        "train_accuracy": (probe.predict(x_train) == y_train).float().mean().item(),
        "chance": majority_chance(y_train, y_test),
    }


@torch.no_grad()
def residual_streams(model: nn.Module, tokens: Tensor, batch_size: int = 64) -> list[Tensor]:
    """The residual stream of a model with blocks in `.layers`, on tokens (N, T): a list of n_layers + 1
    float32 CPU tensors (N, T, dim): the input of block 0 (the embeddings), then every block's output."""
    layers = unwrap(model).layers
    streams: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]
    handles = [layers[0].register_forward_pre_hook(lambda m, args: streams[0].append(args[0].float().cpu()))]
    for i, block in enumerate(layers):
        hook = lambda m, args, out, i=i: streams[i + 1].append(out.float().cpu())  # noqa: E731
        handles.append(block.register_forward_hook(hook))
    try:
        for lo in range(0, len(tokens), batch_size):
            model(tokens[lo : lo + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in streams]
