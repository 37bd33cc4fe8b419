"""AdamW (or Orthograd) with weight-decay param groups, warmup + LR schedules, gradient clipping (fixed or
adaptive), and an EMA of the weights.

Per-part learning rates: `optim.groups` maps module-name prefixes (as in `model.named_parameters()`, e.g.
`vision.`, `projector.`, `lm.layers.0.`) to multipliers of `optim.lr`; the longest matching prefix wins,
and a parameter no prefix matches gets 1. Every (multiplier, decay) pair is one param group with its own
`lr` and `lr_mult`, so the `LambdaLR` (a factor times each group's initial LR) scales every schedule
alike. A multiplier of 0 freezes the part (`freeze`): no gradient, no optimizer state, no share of the
gradient norm, the weights untouched.

Schedules are pure functions of the optimizer step (`lr_factor`), so they are easy to test, plot and
resume: a `LambdaLR` only needs its `last_epoch` back to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "linear", "cosine", "wsd", "inv_sqrt")
CLIP_MODES = ("fixed", "adaptive")
OPTIMIZERS = ("adamw", "orthograd")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | orthograd (AdamW on gradients made orthogonal to their weights)
    steps: int = 1000  # total optimizer steps
    lr: float = 1e-3  # peak LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # max grad norm; 0 disables clipping (the norm is still computed and returned)
    clip_mode: str = "fixed"  # fixed: at `clip`; adaptive: at clip_adaptive_factor x the grad-norm EMA
    clip_adaptive_factor: float = 2.0  # adaptive: the threshold in units of the running grad norm
    clip_ema_decay: float = 0.99  # adaptive: of the grad-norm EMA (fed the clipped norms: outliers stay out)
    accumulation_steps: int = 1  # micro-batches per optimizer step
    scheduler: str = "cosine"  # constant | linear | cosine | wsd | inv_sqrt
    warmup: float = 0.0  # >= 1: steps; in [0, 1): fraction of `steps`
    decay: float = 0.2  # wsd only: length of the final decay phase (>= 1: steps; < 1: fraction of steps)
    min_lr_ratio: float = 0.0  # floor as a fraction of lr (for linear, cosine, wsd, inv_sqrt)
    rewarm_steps: int = 0  # > 0: the first steps go linearly from `rewarm_from` to the schedule's LR
    rewarm_from: float = 0.0  # LR at step 0 of a re-warm, e.g. the LR a continued checkpoint stopped at
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights (DALL-E: 0.999), checkpointed; 0: off
    # parameter-name prefix -> multiplier of `lr` (longest prefix wins, unmatched: 1); 0 freezes the part
    groups: dict[str, float] = field(default_factory=dict)

    @property
    def warmup_steps(self) -> int:
        return _to_steps(self.warmup, self.steps)

    @property
    def decay_steps(self) -> int:
        return _to_steps(self.decay, self.steps)

    def check(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("name", f"'{self.name}' is not one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        for key in ("weight_decay", "clip"):
            if not getattr(self, key) >= 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(key, f"must be in [0, 1), got {getattr(self, key)}")
        if self.lr / (1 - self.beta1) >= torch.finfo(torch.float32).max:  # Adam's first step size
            raise ConfigError("lr", f"{self.lr} / (1 - beta1) overflows float32")
        for prefix, mult in self.groups.items():
            if not (math.isfinite(mult) and mult >= 0):
                raise ConfigError(
                    "groups", f"'{prefix}': the LR multiplier must be finite and >= 0, got {mult}"
                )
            if self.lr * mult / (1 - self.beta1) >= torch.finfo(torch.float32).max:
                raise ConfigError("groups", f"'{prefix}': lr x {mult} / (1 - beta1) overflows float32")
        if not self.eps > 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if self.clip_mode not in CLIP_MODES:
            raise ConfigError("clip_mode", f"'{self.clip_mode}' is not one of {', '.join(CLIP_MODES)}")
        if not self.clip_adaptive_factor > 0:
            raise ConfigError("clip_adaptive_factor", f"must be > 0, got {self.clip_adaptive_factor}")
        if not 0 <= self.clip_ema_decay < 1:
            raise ConfigError("clip_ema_decay", f"must be in [0, 1), got {self.clip_ema_decay}")
        if self.accumulation_steps < 1:
            raise ConfigError("accumulation_steps", f"must be >= 1, got {self.accumulation_steps}")
        if self.scheduler not in SCHEDULERS:
            choices = ", ".join(SCHEDULERS)
            raise ConfigError("scheduler", f"unknown scheduler '{self.scheduler}' (choose from {choices})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check_length("warmup", self.warmup, self.steps)
        if not 0 <= self.rewarm_steps <= self.steps:
            raise ConfigError("rewarm_steps", f"must be in [0, steps={self.steps}], got {self.rewarm_steps}")
        if not self.rewarm_from >= 0:
            raise ConfigError("rewarm_from", f"must be >= 0, got {self.rewarm_from}")
        if self.scheduler == "wsd":
            _check_length("decay", self.decay, self.steps)
            if self.warmup_steps + self.decay_steps > self.steps:
                raise ConfigError(
                    "decay",
                    f"warmup ({self.warmup_steps} steps) + decay ({self.decay_steps} steps) "
                    f"exceed steps ({self.steps})",
                )


def _to_steps(length: float, steps: int) -> int:
    """A phase length given either in steps (>= 1) or as a fraction of `steps` (< 1)."""
    return int(length) if length >= 1 else round(length * steps)


def _check_length(key: str, length: float, steps: int) -> None:
    if not length >= 0:
        raise ConfigError(key, f"must be >= 0, got {length}")
    if length >= 1 and length != int(length):
        raise ConfigError(key, f"a length >= 1 counts steps and must be a whole number, got {length}")
    if _to_steps(length, steps) > steps:
        raise ConfigError(key, f"{_to_steps(length, steps)} steps exceed optim.steps ({steps})")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names `optim.groups` uses: DDP's `module.` and compile's `_orig_mod.`
    stripped (FSDP2 and compile-in-place keep the names)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def lr_multiplier(name: str, groups: dict[str, float]) -> float:
    """The multiplier of the longest prefix in `groups` that `name` starts with; 1 if none does."""
    best = max((prefix for prefix in groups if name.startswith(prefix)), key=len, default=None)
    return 1.0 if best is None else float(groups[best])


def _named_multipliers(model: nn.Module, groups: dict[str, float]) -> list[tuple[str, nn.Parameter, float]]:
    """(first name, parameter, multiplier) of each distinct parameter. A tied parameter is reached under
    each of its names (`output.weight` = `tok_embeddings.weight`): all of them must agree."""
    base = _unwrap(model)
    names: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = []
    for name, p in base.named_parameters():
        mults = {n: lr_multiplier(n, groups) for n in names[id(p)]}
        if len(set(mults.values())) > 1:
            got = ", ".join(f"{n}: {m:g}" for n, m in mults.items())
            raise ConfigError("optim.groups", f"tied parameter gets different LR multipliers ({got})")
        out.append((name, p, mults[name]))
    return out


def check_groups(model: nn.Module, cfg: OptimConfig) -> None:
    """Every prefix of `optim.groups` matches some parameter of `model` (a typo would silently train the
    part at the full LR), tied parameters agree, and something is left to train. Reads names only: call it
    at start-up on a model built on the meta device, before the log dir exists."""
    base = _unwrap(model)
    names = [n for n, _ in base.named_parameters(remove_duplicate=False)]
    for prefix in cfg.groups:
        if not any(n.startswith(prefix) for n in names):
            raise ConfigError("optim.groups", f"prefix '{prefix}' matches no parameter of the model")
    named = _named_multipliers(base, cfg.groups)
    if named and not any(p.requires_grad and mult > 0 for _, p, mult in named):
        raise ConfigError("optim.groups", "every parameter is frozen (multiplier 0): nothing to train")


def freeze(model: nn.Module, cfg: OptimConfig) -> list[str]:
    """Freeze the parameters whose multiplier is 0 (`requires_grad=False`); returns their names.

    Call it before `Cluster.wrap`: DDP registers the parameters that require grad when it wraps, and one
    frozen later would never get the gradient its reducer waits for (a DDP model refuses it here). FSDP2
    copes either way. `build_optimizer` calls it too, so a bare or FSDP2 model is frozen even if the app
    did not. Idempotent.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = []
    for name, p, mult in _named_multipliers(model, cfg.groups):
        if mult != 0:
            continue
        if p.requires_grad and isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                f"optim.groups freezes {name}, but the model was wrapped for DDP first: call "
                "freeze(model, cfg.optim) before cluster.wrap(model)"
            )
        p.requires_grad_(False)
        frozen.append(name)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, groups: dict[str, float] | None = None) -> list[dict]:
    """One group per (LR multiplier, decay): decay only matrices (weights, embeddings); norm gains, biases
    and other 1-D params are left alone. Frozen parameters (multiplier 0, or no grad) are in none, so they
    hold no optimizer state. Groups come in the order their multipliers first appear, decay first; each has
    `lr_mult` (build_optimizer sets `lr` from it)."""
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for mult in dict.fromkeys(m for _, p, m in _named_multipliers(model, groups or {}) if p.requires_grad):
        buckets[(mult, True)], buckets[(mult, False)] = [], []
    for _, p, mult in _named_multipliers(model, groups or {}):
        if p.requires_grad and mult > 0:
            buckets[(mult, p.ndim >= 2)].append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
        for (mult, decay), params in buckets.items()
        if params
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW (`optim.name=orthograd`: OrthoAdamW) over `param_groups`, each at `cfg.lr` x its multiplier;
    the fused kernel only on CUDA, where it exists and pays off. Checks `optim.groups` against the model
    and freezes its 0-multiplier parts (see `freeze`: do that before wrapping for DDP)."""
    check_groups(model, cfg)
    frozen = freeze(model, cfg)
    if frozen:
        logger.info(f"optim.groups freezes {len(frozen)} parameters: {', '.join(frozen)}")
    groups = param_groups(model, cfg.weight_decay, cfg.groups)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    cls = OrthoAdamW if cfg.name == "orthograd" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device_type == "cuda")


def base_lr(optimizer: torch.optim.Optimizer, lrs: list[float]) -> float:
    """The LR of multiplier 1 among the groups' `lrs` (what a run logs as its LR, whatever part comes
    first): a group's with `lr_mult` 1 if there is one, else the first group's divided by its multiplier."""
    mults = [group.get("lr_mult", 1.0) for group in optimizer.param_groups]
    for mult, lr in zip(mults, lrs):
        if mult == 1.0:
            return lr
    return lrs[0] / mults[0]


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based).

    Warmup is linear, reaching 1 at step `warmup - 1` (it starts at 1/warmup, not 0, so no step is
    wasted); the schedule then runs from 1 at step `warmup` to `min_lr_ratio` at step `steps`.
    A re-warm blends in front of it: step i < rewarm_steps gets (1 - i/k) rewarm_from + (i/k) schedule,
    so a run continued from a checkpoint starts at the LR the checkpoint stopped at, with no jump.
    """
    factor = schedule_factor(step, cfg)
    if step < cfg.rewarm_steps:
        t = step / cfg.rewarm_steps
        return (1 - t) * cfg.rewarm_from / cfg.lr + t * factor
    return factor


def schedule_factor(step: int, cfg: OptimConfig) -> float:
    """`lr_factor` without the re-warm: warmup, then the schedule."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "inv_sqrt":
        # Noam: continuous with warmup at its peak; with no warmup, decay from step 1 on.
        scale = max(warmup, 1)
        return max(floor, math.sqrt(scale / max(step, scale)))
    if cfg.scheduler == "wsd":
        start = cfg.steps - cfg.decay_steps
        if step < start:
            return 1.0
        return floor + (1 - floor) * (1 - _progress(step, start, cfg.steps))
    progress = _progress(step, warmup, cfg.steps)
    if cfg.scheduler == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler '{cfg.scheduler}'")


def _progress(step: int, start: int, end: int) -> float:
    """Fraction of [start, end] done at `step`, clamped to [0, 1] (steps past the end stay at the floor)."""
    if end <= start:
        return 1.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Call `.step()` once per optimizer step; the LR of step i is `cfg.lr * lr_factor(i, cfg)`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Total gradient norm (for logging), clipping gradients to `max_norm` unless it is 0.

    Under FSDP2 the gradients are sharded DTensors and the norm is a DTensor too: it is gathered with
    `full_tensor()` so every rank clips with, and reports, the same global norm.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


@dataclass
class ClipState:
    """The running grad norm of adaptive clipping; checkpointed with the run, so a resume clips the same."""

    ema: float = 0.0
    seen: int = 0  # finite norms in the EMA; before the first, adaptive clipping uses the fixed `clip`


def clip_gradients(model: nn.Module, cfg: OptimConfig, state: ClipState) -> tuple[float, float]:
    """Clip as `cfg.clip_mode` says; returns the total norm before clipping and the threshold used.

    Adaptive: the threshold is `clip_adaptive_factor` x the EMA of past norms, each entered clipped, so a
    burst of large gradients cannot raise its own threshold; non-finite norms (a skipped step) stay out.
    """
    if cfg.clip_mode == "fixed":
        return clip_grad_norm(model, cfg.clip), cfg.clip
    max_norm = cfg.clip_adaptive_factor * state.ema if state.seen else cfg.clip
    norm = clip_grad_norm(model, max_norm)
    if math.isfinite(norm):
        clipped = min(norm, max_norm) if max_norm > 0 else norm
        d = cfg.clip_ema_decay
        state.ema = d * state.ema + (1 - d) * clipped if state.seen else clipped
        state.seen += 1
    return norm, max_norm


# ------------------------------------------------------------------------------------------ Orthograd


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this rank's shard of a DTensor


def _reduce_over_shards(sums: Tensor, params: list[Tensor]) -> Tensor:
    """Per-parameter sums of local shards -> sums over the whole parameter (FSDP2: one all-reduce)."""
    mesh = getattr(params[0], "device_mesh", None)
    if mesh is not None and dist.is_initialized():
        dist.all_reduce(sums, group=mesh.get_group())
    return sums


@torch.no_grad()
def orthogonalize_gradients(params: Iterable[Tensor], eps: float = 1e-30) -> None:
    """In place, each gradient g of a weight w becomes g - (w.g / w.w) w, rescaled to the norm of g.

    Orthograd (Prieto et al. 2025, "Grokking at the edge of numerical stability"): the component along w
    only grows or shrinks the weights (the naive loss minimisation that ends in softmax collapse), so it
    is removed; the rescaling keeps the step size the optimizer would have taken. Under FSDP2 the dot
    products are summed over the shards, so every rank uses the whole parameter's.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    w = [_local(p).flatten().float() for p in params]
    g = [_local(p.grad).flatten().float() for p in params]
    dots = torch.stack([torch.stack([wi @ gi, wi @ wi, gi @ gi]) for wi, gi in zip(w, g)])
    dots = _reduce_over_shards(dots, params)
    proj = dots[:, 0] / (dots[:, 1] + eps)
    orth = [gi - a * wi for gi, a, wi in zip(g, proj, w)]
    orth_sq = _reduce_over_shards(torch.stack([o @ o for o in orth]), params)
    scale = dots[:, 2].sqrt() / (orth_sq.sqrt() + eps)
    for p, o, c in zip(params, orth, scale):
        grad = _local(p.grad)
        grad.copy_((o * c).view_as(grad))


class OrthoAdamW(torch.optim.AdamW):
    """AdamW whose step first makes every gradient orthogonal to its weight (`orthogonalize_gradients`).

    A subclass, not a wrapper: its state dict is AdamW's, so checkpoints, DCP and a resume that switches
    `optim.name` work unchanged. Clipping before it is unaffected (the per-tensor norms are kept)."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        orthogonalize_gradients(p for group in self.param_groups for p in group["params"])
        return super().step(closure)


# ------------------------------------------------------------------------------------------------ EMA


class EMA:
    """Exponential moving average of the weights: after every applied step, ema <- d ema + (1 - d) w.

    It starts from the weights it is built from (step 0), so after n steps
    ema_n = d^n w_0 + (1 - d) sum_k d^(n-k) w_k. The average is a copy of every parameter with the same
    placement (a DTensor shard under FSDP2, on the parameter's device), saved and loaded through DCP with
    the model (`state_dict` hands DCP the tensors themselves, so a load fills them in place), and
    consolidated to `ema.pt` for evaluation and export. Names are the unwrapped model's (DDP's `module.`
    stripped), as in `model.pt`.
    """

    def __init__(self, model: nn.Module, decay: float):
        base = getattr(model, "module", model)  # DDP wraps; FSDP2 and compile(in place) keep the names
        self.decay = decay
        self.params: dict[str, Tensor] = dict(base.named_parameters())
        first = {id(p): name for name, p in self.params.items()}
        # every state-dict name of each parameter, tied ones included (output.weight = tok_embeddings.weight)
        self.aliases = {n: first[id(p)] for n, p in base.named_parameters(remove_duplicate=False)}
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.decay
        shadows, params = list(self.shadow.values()), [p.detach() for p in self.params.values()]
        if any(hasattr(p, "device_mesh") for p in params):
            for s, p in zip(shadows, params):
                s.lerp_(p, weight)
        else:
            torch._foreach_lerp_(shadows, params, weight)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights (a resume from a checkpoint saved without one)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach())

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    @torch.no_grad()
    def full_state_dict(self, model_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`model_state` (the consolidated model.pt) with every parameter replaced by its average, on CPU.
        Under FSDP2 every rank must call it (the shards are gathered)."""
        full = {}
        for name, s in self.shadow.items():
            full[name] = (s.full_tensor() if hasattr(s, "full_tensor") else s).detach().cpu()
        return {k: full[self.aliases[k]] if k in self.aliases else v for k, v in model_state.items()}

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block (to evaluate them), its own after."""
        with torch.no_grad():
            backup = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])
