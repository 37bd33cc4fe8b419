"""Activation statistics every `probe.period` steps: what a loss curve hides until it diverges.

On a probed step, forward hooks on the model's blocks record, from the step's first micro-batch, the
residual stream's mean, std, max |x| and kurtosis, and the entropy of each block's attention (recomputed
from the block's own q/k projections, since sdpa never forms the weights); after the backward passes
come the gradient norms per layer. Hooks exist only during probed steps: `period: 0` (the default)
costs nothing. One line per probed step goes to `metrics/probe_{rank}.jsonl`, with flat keys:

    step
    layer_{i}/resid_{mean,std,max_abs,kurtosis}   i = 0: the embeddings (input of block 0),
                                                  i >= 1: the output of block i - 1
    layer_{i}/attn_entropy                        i >= 1: block i - 1's attention, nats, mean over the
                                                  sequences, heads and query positions
    layer_{i}/grad_norm                           i = 0: the embeddings, i >= 1: block i - 1
    head/grad_norm                                every other parameter (final norm, output layer)

Kurtosis is E[(x - mean)^4] / std^4 over all entries (3 for a Gaussian): outlier features show as a
large value long before they show in the loss. Gradients are taken before clipping. Blocks are found
through DDP's `.module`; a compiled model runs its probed steps eagerly (see `uncompiled`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from ..config import ConfigError
from ..distributed import unwrap, wrappers
from ..model.attention import Mask, cached_mask, dense_mask
from ..model.rope import apply_rope
from .logger import JsonlWriter

RESIDUAL_STATS = ("mean", "std", "max_abs", "kurtosis")
LogFn = Callable[[dict, int], None]  # e.g. WandbLogger.log(metrics, step)


@dataclass
class ProbeConfig:
    period: int = 0  # steps between probed steps (0: off)
    max_tokens: int = 4096  # residual-stream positions per layer in the statistics (0: the whole micro-batch)
    attn_sequences: int = 2  # sequences whose attention entropy is recomputed (0: no entropy)

    def check(self) -> None:
        for key in ("period", "max_tokens", "attn_sequences"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


@contextlib.contextmanager
def uncompiled(model: nn.Module) -> Iterator[None]:
    """Run a compiled model eagerly: dynamo does not guard on hooks of submodules, so a graph compiled
    before the hooks were added would silently skip them. Probed steps are rare; the compiled graph is
    reused untouched afterwards. `model.compile()` keeps its graph in `_compiled_call_impl`."""
    chain = wrappers(model)
    compiled = [(m, m._compiled_call_impl) for m in chain if getattr(m, "_compiled_call_impl", None)]
    with contextlib.ExitStack() as stack:
        if any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in chain):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        for m, _ in compiled:
            m._compiled_call_impl = None
        try:
            yield
        finally:
            for m, call in compiled:
                m._compiled_call_impl = call


def residual_stats(x: Tensor, max_tokens: int = 0) -> Tensor:
    """mean, std, max |x| and kurtosis over all entries of x (..., dim), from its first `max_tokens` rows."""
    x = x.detach().flatten(0, -2)
    x = (x[:max_tokens] if max_tokens else x).float().flatten()
    mean = x.mean()
    centered = x - mean
    var = centered.square().mean()
    kurtosis = centered.pow(4).mean() / var.square().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.stack([mean, var.sqrt(), x.abs().max(), kurtosis])


def attention_weights(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) (B, H, T, T) of `attn` (our `Attention`) on its input x (B, T, dim), as its
    forward computes it (same projections, RoPE, grouped-query sharing, and its static mask unless the call
    brought one, for the first B rows of its batch); sdpa never forms it."""
    B, T, _ = x.shape
    H, H_kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, H_kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // H_kv, dim=1)  # query head h reads kv head h // (H / H_kv), as sdpa's GQA
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(d)
    mask = attn.mask if mask is None else mask
    if isinstance(mask, str):
        mask = cached_mask(mask, T, x.device, block=False)
    elif isinstance(mask, BlockMask):
        mask = dense_mask(mask.mask_mod, B, T, T, x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:B], float("-inf"))  # (B or 1, 1, T, T)
    return scores.softmax(-1)


def attention_entropy(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask = None) -> Tensor:
    """Mean entropy (nats) of the attention rows, over sequences, heads and query positions: log(t + 1) at
    query t for uniform causal attention, 0 for attention on a single position."""
    return torch.special.entr(attention_weights(attn, x, cos, sin, mask)).sum(-1).mean()


def _group_norm(grads: list[Tensor]) -> Tensor:
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor, reduced here


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """Gradient norm per layer (see the module docstring for the groups); every rank must call it."""
    inner = unwrap(model)
    group: dict[int, str] = {}
    if isinstance(getattr(inner, "tok_embeddings", None), nn.Module):
        group.update((id(p), "layer_0") for p in inner.tok_embeddings.parameters())
    for i, block in enumerate(getattr(inner, "layers", [])):
        group.update((id(p), f"layer_{i + 1}") for p in block.parameters())
    grads: dict[str, list[Tensor]] = {name: [] for name in dict.fromkeys([*group.values(), "head"])}
    for p in inner.parameters():
        if p.grad is not None:
            grads[group.get(id(p), "head")].append(p.grad)
    norms = torch.stack([_group_norm(g).float().cpu() for g in grads.values()]).tolist()
    return {f"{name}/grad_norm": norm for name, norm in zip(grads, norms, strict=True)}


class ActivationProbe:
    """Owns `metrics/probe_{rank}.jsonl` (opened only when probing is on); its byte offset goes into
    checkpoints like the other metric files', so a resumed run has every probed step once."""

    def __init__(self, cfg: ProbeConfig, path: str | os.PathLike, log: LogFn | None = None):
        self.cfg, self.log = cfg, log
        self.writer = JsonlWriter(path) if cfg.period > 0 else None
        self._state = {"offset": 0}  # kept as loaded while off, so turning probing back on loses nothing

    def __enter__(self) -> ActivationProbe:
        if self.writer:
            self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.writer:
            self.writer.__exit__(*exc)

    def state_dict(self) -> dict:
        return self.writer.state_dict() if self.writer else self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = state
        if self.writer:
            self.writer.load_state_dict(state)

    def due(self, step: int) -> bool:
        return self.cfg.period > 0 and step % self.cfg.period == 0

    @contextlib.contextmanager
    def capture(self, model: nn.Module, step: int) -> Iterator[None]:
        """Wrap the forward and backward passes of optimizer step `step`; on a probed step, writes its line
        on the way out (after the backward passes, before the optimizer step)."""
        if not self.due(step):
            yield
            return
        stats: dict[int, Tensor] = {}
        entropy: dict[int, Tensor] = {}
        handles = []
        for i, block in enumerate(getattr(unwrap(model), "layers", [])):
            handles.append(block.register_forward_hook(functools.partial(self._on_block, stats, i)))
            attn = getattr(block, "attn", None)
            if self.cfg.attn_sequences and hasattr(attn, "q_proj"):
                # inside the block's forward, where FSDP2 has gathered the block's parameters
                hook = functools.partial(self._on_attention, entropy, i)
                handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with uncompiled(model):
                yield
        finally:
            for handle in handles:
                handle.remove()
        record: dict[str, float] = {"step": step}
        for i, values in sorted(stats.items()):
            named = zip(RESIDUAL_STATS, values.tolist(), strict=True)
            record.update((f"layer_{i}/resid_{name}", v) for name, v in named)
            if i - 1 in entropy:
                record[f"layer_{i}/attn_entropy"] = entropy[i - 1].item()
        record.update(gradient_norms(model))
        self.writer.write(record)
        if self.log is not None:
            self.log({f"probe/{k}": v for k, v in record.items() if k != "step"}, step)

    # The hooks keep only the first micro-batch of a step.
    @torch.no_grad()
    def _on_block(
        self, stats: dict[int, Tensor], i: int, module: nn.Module, args: tuple, output: Tensor
    ) -> None:
        if i + 1 in stats:
            return
        if i == 0:
            stats[0] = residual_stats(args[0], self.cfg.max_tokens)
        stats[i + 1] = residual_stats(output, self.cfg.max_tokens)

    @torch.no_grad()
    def _on_attention(
        self, entropy: dict[int, Tensor], i: int, module: nn.Module, args: tuple, kw: dict
    ) -> None:
        x, cos, sin, mask, cache = (*args, *[None] * 5)[:5]
        mask, cache = kw.get("mask", mask), kw.get("cache", cache)
        if i not in entropy and cache is None:  # with a KV cache, q attends to more than this call's keys
            n = self.cfg.attn_sequences
            entropy[i] = attention_entropy(module, x[:n], cos, sin, mask)
