import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from src.nanollama.config import ConfigError, build_config
from src.nanollama.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    lr_factor,
    param_groups,
)


class TinyLM(nn.Module):
    """Embedding + norm + biased MLP + head: every kind of parameter the grouping must sort."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.norm(self.emb(tokens)))))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def cfg(**kwargs) -> OptimConfig:
    return build_config(OptimConfig, kwargs)


# --- param groups and optimizer -------------------------------------------------------------------


def test_param_groups_decay_only_matrices():
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.emb.weight, model.fc.weight, model.head.weight])
    assert ids(no_decay["params"]) == ids([model.norm.weight, model.norm.bias, model.fc.bias])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_param_groups_skip_frozen_and_empty_groups():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [model[1].weight]


def test_param_groups_count_tied_weights_once():
    model = TinyLM(vocab=5, dim=5)
    model.head.weight = model.emb.weight
    decay = param_groups(model, 0.1)[0]
    assert len(decay["params"]) == 2  # emb/head (tied) and fc


def test_build_optimizer_uses_config():
    c = cfg(lr=3e-4, weight_decay=0.05, beta1=0.8, beta2=0.99, eps=1e-6)
    opt = build_optimizer(TinyLM(), c, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4 and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6
    assert not group["fused"]


def test_param_groups_split_by_multiplier_and_skip_frozen():
    model = TinyLM()
    groups = param_groups(model, 0.1, {"fc.": 3.0, "head.": 0.0})
    got = [(g["lr_mult"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]
    assert got == [
        (1.0, 0.1, [id(model.emb.weight)]),
        (1.0, 0.0, [id(model.norm.weight), id(model.norm.bias)]),
        (3.0, 0.1, [id(model.fc.weight)]),
        (3.0, 0.0, [id(model.fc.bias)]),
    ]  # head (multiplier 0) is in none


def test_build_optimizer_scales_group_lrs_and_freezes():
    model = TinyLM()
    opt = build_optimizer(model, cfg(lr=1e-3, groups={"fc.": 3.0, "head.": 0.0}), "cpu")
    assert [(g["lr_mult"], g["lr"]) for g in opt.param_groups] == [(1.0, 1e-3)] * 2 + [(3.0, 3e-3)] * 2
    assert not model.head.weight.requires_grad and model.fc.weight.requires_grad


# --- schedules --------------------------------------------------------------------------------------


def factors(c: OptimConfig, steps: list[int]) -> list[float]:
    return [lr_factor(s, c) for s in steps]


def test_warmup_is_linear_from_one_over_warmup_to_one():
    c = cfg(steps=100, warmup=10, scheduler="constant")
    assert factors(c, [0, 4, 9, 10, 99]) == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])


def test_warmup_as_fraction_equals_warmup_as_steps():
    as_steps, as_fraction = cfg(steps=200, warmup=20), cfg(steps=200, warmup=0.1)
    assert as_fraction.warmup_steps == 20
    assert factors(as_steps, list(range(200))) == factors(as_fraction, list(range(200)))


def test_constant_ignores_floor():
    c = cfg(steps=10, scheduler="constant", min_lr_ratio=0.5)
    assert factors(c, [0, 5, 9, 10]) == [1.0] * 4


def test_linear():
    # warmup 10, then 1 -> 0.1 over steps 10..110
    c = cfg(steps=110, warmup=10, scheduler="linear", min_lr_ratio=0.1)
    assert factors(c, [0, 9, 10, 60, 110]) == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1])


def test_cosine():
    c = cfg(steps=110, warmup=10, scheduler="cosine", min_lr_ratio=0.0)
    # a quarter of the way: 0.5 * (1 + cos(pi/4))
    quarter = 0.5 * (1 + math.sqrt(0.5))
    assert factors(c, [0, 9, 10, 35, 60, 110]) == pytest.approx([0.1, 1.0, 1.0, quarter, 0.5, 0.0])


def test_cosine_without_warmup_starts_at_peak():
    c = cfg(steps=100, scheduler="cosine", min_lr_ratio=0.2)
    assert factors(c, [0, 50, 100]) == pytest.approx([1.0, 0.6, 0.2])


def test_wsd():
    # warmup 10 steps, stable until 80, linear decay to 0.1 over the last 20% (steps 80..100)
    c = cfg(steps=100, warmup=10, scheduler="wsd", decay=0.2, min_lr_ratio=0.1)
    assert factors(c, [0, 9, 10, 50, 79, 80, 90, 100]) == pytest.approx(
        [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1]
    )
    assert factors(cfg(steps=100, warmup=10, scheduler="wsd", decay=20, min_lr_ratio=0.1), [90]) == [
        pytest.approx(0.55)
    ]


def test_inv_sqrt():
    c = cfg(steps=1000, warmup=16, scheduler="inv_sqrt", min_lr_ratio=0.3)
    # after warmup: sqrt(16 / step); floored at 0.3 (sqrt(16/step) < 0.3 from step 178 on)
    assert factors(c, [0, 15, 16, 64, 100, 400, 999]) == pytest.approx([1 / 16, 1.0, 1.0, 0.5, 0.4, 0.3, 0.3])


def test_inv_sqrt_without_warmup():
    c = cfg(steps=100, warmup=0, scheduler="inv_sqrt")
    assert factors(c, [0, 1, 4, 25]) == pytest.approx([1.0, 1.0, 0.5, 0.2])


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "wsd", "inv_sqrt"])
def test_min_lr_ratio_is_a_floor(scheduler):
    c = cfg(steps=50, warmup=5, scheduler=scheduler, min_lr_ratio=0.25)
    values = factors(c, list(range(5, 200)))  # inv_sqrt reaches it only at step 80, after `steps`
    assert min(values) == pytest.approx(0.25) and max(values) == pytest.approx(1.0)
    assert lr_factor(199, c) == pytest.approx(0.25)  # past the end it stays at the floor


def test_rewarm_goes_linearly_from_the_checkpoint_lr_to_the_schedule():
    base = cfg(steps=100, lr=1e-3, warmup=0, scheduler="cosine", min_lr_ratio=0.1)
    c = cfg(
        steps=100, lr=1e-3, warmup=0, scheduler="cosine", min_lr_ratio=0.1, rewarm_steps=10, rewarm_from=2e-4
    )
    assert lr_factor(0, c) == pytest.approx(0.2)  # exactly the LR the checkpoint stopped at
    for step in range(1, 10):  # a straight line between the start LR and the schedule
        t = step / 10
        assert lr_factor(step, c) == pytest.approx((1 - t) * 0.2 + t * lr_factor(step, base))
    assert factors(c, list(range(10, 101))) == factors(base, list(range(10, 101)))  # then the schedule
    rising = factors(cfg(steps=100, scheduler="constant", rewarm_steps=4, rewarm_from=0.0), [0, 1, 2, 3, 4])
    assert rising == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # from 0: a linear warmup
    falling = factors(
        cfg(steps=100, lr=1e-3, scheduler="constant", rewarm_steps=2, rewarm_from=3e-3), [0, 1, 2]
    )
    assert falling == pytest.approx([3.0, 2.0, 1.0])  # down from a higher LR works too
    opt = build_optimizer(TinyLM(), c, "cpu")
    build_scheduler(opt, c)  # LambdaLR sets the LR of step 0 at once
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_scheduler_drives_optimizer_lr_and_resumes():
    c = cfg(steps=20, lr=0.1, warmup=4, scheduler="cosine", min_lr_ratio=0.1)
    model = TinyLM()
    opt = build_optimizer(model, c, "cpu")
    sched = build_scheduler(opt, c)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, c) for s in range(10)])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * lr_factor(10, c)] * 2)

    resumed_opt = build_optimizer(model, c, "cpu")
    resumed = build_scheduler(resumed_opt, c)
    resumed.load_state_dict(sched.state_dict())
    resumed_opt.load_state_dict(opt.state_dict())
    sched.step(), resumed.step()
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


# --- config checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key, text",
    [
        ({"scheduler": "step"}, "scheduler", "unknown scheduler 'step' (choose from constant, linear"),
        ({"steps": 0}, "steps", ">= 1"),
        ({"lr": 0.0}, "lr", "> 0"),
        ({"weight_decay": -0.1}, "weight_decay", ">= 0"),
        ({"beta2": 1.0}, "beta2", "[0, 1)"),
        ({"eps": 0.0}, "eps", "> 0"),
        ({"clip": -1.0}, "clip", ">= 0"),
        ({"accumulation_steps": 0}, "accumulation_steps", ">= 1"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio", "[0, 1]"),
        ({"warmup": -0.1}, "warmup", ">= 0"),
        ({"warmup": 2.5}, "warmup", "whole number"),
        ({"steps": 10, "warmup": 11}, "warmup", "exceed"),
        ({"steps": 10, "scheduler": "wsd", "decay": 12}, "decay", "exceed"),
        ({"steps": 10, "scheduler": "wsd", "warmup": 5, "decay": 6}, "decay", "exceed steps"),
        ({"steps": 10, "rewarm_steps": 11}, "rewarm_steps", "[0, steps=10]"),
        ({"rewarm_from": -1e-3}, "rewarm_from", ">= 0"),
        ({"groups": {"fc.": -1.0}}, "groups", "'fc.': the LR multiplier must be finite and >= 0"),
        ({"groups": {"fc.": float("nan")}}, "groups", "must be finite"),
    ],
)
def test_check_names_the_key(kwargs, key, text):
    with pytest.raises(ConfigError) as err:
        cfg(**kwargs)
    assert err.value.key == key and text in err.value.message


def test_check_accepts_defaults_and_ignores_decay_outside_wsd():
    cfg()
    cfg(steps=10, warmup=5, decay=9, scheduler="cosine")


# --- gradient accumulation ------------------------------------------------------------------------


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_match_one_big_batch():
    """k micro-batches with loss/k summed give the big batch's gradient, hence the same AdamW step."""
    torch.manual_seed(0)
    k, c = 4, cfg(lr=1e-2, weight_decay=0.1, accumulation_steps=4)
    big, accumulated = TinyLM().double(), TinyLM().double()
    accumulated.load_state_dict(big.state_dict())
    tokens = torch.randint(0, 11, (8, 6))

    lm_loss(big, tokens).backward()
    for micro in tokens.chunk(k):
        (lm_loss(accumulated, micro) / c.accumulation_steps).backward()
    for g_big, g_acc in zip(grads(big), grads(accumulated), strict=True):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-12, atol=1e-14)

    for model in (big, accumulated):
        clip_grad_norm(model, c.clip)
        build_optimizer(model, c, "cpu").step()
    for p_big, p_acc in zip(big.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p_acc, p_big, rtol=1e-12, atol=1e-14)


# --- clipping --------------------------------------------------------------------------------------------


def model_and_batch() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return TinyLM(), torch.randint(0, 11, (4, 5))


def model_with_grads(scale: float) -> nn.Module:
    model, tokens = model_and_batch()
    (scale * lm_loss(model, tokens)).backward()
    return model


def manual_norm(model: nn.Module) -> float:
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))


def test_clip_grad_norm_clips_to_max_norm():
    model = model_with_grads(100.0)
    before = manual_norm(model)
    assert before > 1.0
    norm = clip_grad_norm(model, 1.0)
    assert isinstance(norm, float) and norm == pytest.approx(before, rel=1e-5)
    assert manual_norm(model) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_leaves_small_grads_alone():
    model = model_with_grads(1e-3)
    expected = grads(model)
    assert clip_grad_norm(model, 1.0) == pytest.approx(manual_norm(model), rel=1e-5)
    for g, e in zip(grads(model), expected, strict=True):
        assert torch.equal(g, e)


def test_clip_zero_only_measures():
    model = model_with_grads(100.0)
    expected = grads(model)
    assert clip_grad_norm(model, 0.0) == pytest.approx(manual_norm(model), rel=1e-5)
    for g, e in zip(grads(model), expected, strict=True):
        assert torch.equal(g, e)


def test_clip_grad_norm_without_grads_is_zero():
    assert clip_grad_norm(TinyLM(), 1.0) == 0.0


def _fsdp_clip_worker(rank: int, world_size: int, store: str, results) -> None:
    # The parent's OpenMP pool does not survive fork: ops would deadlock (DataLoader workers do the same).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"file://{store}")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model, tokens = model_and_batch()  # same weights and batch on every rank
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        (100.0 * lm_loss(model, tokens)).backward()
        norm = clip_grad_norm(model, 1.0)
        clipped = math.sqrt(sum(p.grad.full_tensor().pow(2).sum().item() for p in model.parameters()))
        results.put((rank, norm, clipped))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_clip_grad_norm_on_fsdp2_dtensors(tmp_path):
    """Sharded grads are DTensors: every rank must see, and clip with, the global norm."""
    expected = manual_norm(model_with_grads(100.0))
    results = mp.get_context("fork").SimpleQueue()
    workers = mp.start_processes(
        _fsdp_clip_worker,
        args=(2, str(tmp_path / "store"), results),
        nprocs=2,
        start_method="fork",
        join=False,
    )
    deadline = time.monotonic() + 60  # a hung collective must fail the test, not stall the suite
    try:
        while not workers.join(timeout=1):
            assert time.monotonic() < deadline, "FSDP workers did not finish in 60 s"
    finally:
        for process in workers.processes:
            process.kill()
    for _ in range(2):
        _, norm, clipped = results.get()
        assert norm == pytest.approx(expected, rel=1e-5)
        assert clipped == pytest.approx(1.0, rel=1e-5)
